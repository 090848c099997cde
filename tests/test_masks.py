import numpy as np
import pytest
from PIL import Image

from diffmodels.core.config import MASK_SETS
from diffmodels.core.errors import DataError
from diffmodels.data.masks import (
    GRID,
    load_mask_set,
    make_mask,
    make_mask_set,
    shift,
    write_mask_sets,
)

SIZE = 64


def tiles(mask: np.ndarray) -> np.ndarray:
    """(N, H, W) -> (N, H/8, W/8, 64): the pixels of each 8x8 tile."""
    n, h, w = mask.shape
    return mask.reshape(n, h // GRID, GRID, w // GRID, GRID).transpose(0, 1, 3, 2, 4).reshape(n, h // GRID, w // GRID, -1)


@pytest.mark.parametrize("name", MASK_SETS)
def test_every_mask_has_a_hole_and_kept_pixels(name):
    masks = make_mask_set(name, 32, SIZE, seed=0)
    assert masks.shape == (32, SIZE, SIZE) and masks.dtype == bool
    frac = masks.mean(axis=(1, 2))
    assert (frac > 0).all() and (frac < 1).all()


@pytest.mark.parametrize("shape", ["centre", "boxes", "brush", "half"])
def test_aligned_masks_follow_the_grid_and_offset_masks_do_not(shape):
    aligned = tiles(make_mask_set(f"{shape}_aligned", 32, SIZE, seed=1))
    offset = tiles(make_mask_set(f"{shape}_offset", 32, SIZE, seed=1))
    assert (aligned.all(-1) | ~aligned.any(-1)).all(), "each tile all hole or all keep"
    mixed = (offset.any(-1) & ~offset.all(-1)).any(axis=(1, 2))
    assert mixed.all(), "every offset mask cuts through some tile"


def test_offset_is_the_aligned_mask_shifted_by_1_to_7_px():
    for i in range(16):
        aligned = make_mask("centre_aligned", i, SIZE, seed=2)
        offset = make_mask("centre_offset", i, SIZE, seed=2)
        ys, xs = np.nonzero(aligned)
        oy, ox = np.nonzero(offset)
        dy, dx = oy.min() - ys.min(), ox.min() - xs.min()
        assert 1 <= abs(dy) <= 7 and 1 <= abs(dx) <= 7
        assert np.array_equal(shift(aligned, int(dy), int(dx)), offset)


def test_coverage_of_fixed_shapes():
    assert make_mask_set("centre_aligned", 4, SIZE, 0).mean() == 0.25
    assert make_mask_set("half_aligned", 4, SIZE, 0).mean() == 0.5
    half = make_mask_set("half_offset", 64, SIZE, 0).mean(axis=(1, 2))
    assert ((half >= (32 - 7) / 64) & (half <= (32 + 7) / 64)).all()
    boxes = make_mask_set("boxes_aligned", 64, SIZE, 0).mean(axis=(1, 2))
    assert boxes.min() >= 1 / 64 and boxes.max() <= 0.75


def test_shift_replicates_the_border():
    mask = np.zeros((8, 8), bool)
    mask[:, :4] = True  # left half
    moved = shift(mask, 0, 3)
    assert moved[:, :7].all() and not moved[:, 7:].any()
    moved = shift(mask, 0, -3)
    assert moved[:, :1].all() and not moved[:, 1:].any()


def test_masks_are_deterministic_and_independent_of_the_set_size():
    a = make_mask_set("brush_offset", 10, SIZE, seed=5)
    b = make_mask_set("brush_offset", 20, SIZE, seed=5)
    assert np.array_equal(a, b[:10])
    assert not np.array_equal(a, make_mask_set("brush_offset", 10, SIZE, seed=6))


def test_bad_names_and_sizes():
    with pytest.raises(ValueError, match="unknown mask set"):
        make_mask("circle_aligned", 0, SIZE, 0)
    with pytest.raises(ValueError, match="multiple of 8"):
        make_mask("centre_aligned", 0, 20, 0)


def test_write_and_load_round_trip_and_validation(tmp_path):
    manifest = write_mask_sets(tmp_path, ("centre_offset", "brush_aligned"), 5, 32, seed=0)
    assert manifest["sets"]["centre_offset"]["count"] == 5
    loaded = load_mask_set(tmp_path, "brush_aligned", size=32)
    assert np.array_equal(loaded, make_mask_set("brush_aligned", 5, 32, 0))
    with pytest.raises(DataError, match="images are 64x64"):
        load_mask_set(tmp_path, "brush_aligned", size=64)
    Image.fromarray(np.full((32, 32), 128, np.uint8)).save(tmp_path / "brush_aligned" / "00001.png")
    with pytest.raises(DataError, match="not binary"):
        load_mask_set(tmp_path, "brush_aligned")
    with pytest.raises(DataError, match="no mask PNGs"):
        load_mask_set(tmp_path, "half_aligned")
