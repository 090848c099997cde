"""The SD baselines' helpers (sd.baselines) that need no pipeline: seeded batches, PSNR, masks, flips.
The baselines themselves run end to end in test_sd_stages."""

import math

import numpy as np
import pytest
import torch

from diffmodels.core.errors import DiffmodelsError
from diffmodels.data.masks import write_mask_sets
from diffmodels.sd.baselines import (
    flip_view,
    inpaint_masks,
    psnr,
    seeded_batches,
    timed,
    to_uint8,
)


def test_seeded_batches_seed_each_batch_by_its_first_index():
    seen = []

    def fn(batch, generator):
        seen.append(list(batch))
        return torch.rand(len(batch), generator=generator)

    out = seeded_batches(fn, list("abcde"), 2, seed=10, desc="test")
    assert seen == [["a", "b"], ["c", "d"], ["e"]]
    expected = [torch.rand(n, generator=torch.Generator().manual_seed(10 + i)) for i, n in ((0, 2), (2, 2), (4, 1))]
    assert torch.equal(out, torch.cat(expected))


def test_psnr_over_all_pixels_or_where_told():
    a = torch.zeros(1, 3, 4, 4)
    b = a.clone()
    b[..., :2, :] = 0.1  # mse 0.01 on the top half, 0 below
    where = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    where[..., :2, :] = True
    assert psnr(a, b, where) == pytest.approx(20.0)
    assert psnr(a, b) == pytest.approx(10 * math.log10(1 / 0.005))
    assert psnr(a, a) == pytest.approx(120.0), "an exact match is capped (mse >= 1e-12), not inf"


def test_inpaint_masks_resize_nearest_and_say_when_there_are_too_few(tmp_path):
    write_mask_sets(tmp_path, ("centre_aligned",), 2, 16, seed=0)
    masks = inpaint_masks(tmp_path, "centre_aligned", 2, (32, 32))
    assert masks.shape == (2, 1, 32, 32) and set(masks.unique().tolist()) <= {0.0, 1.0}
    assert 0 < float(masks.mean()) < 1
    with pytest.raises(DiffmodelsError, match=r"centre_aligned: 2 masks for 3 test images \(raise data\.masks_per_set"):
        inpaint_masks(tmp_path, "centre_aligned", 3, (32, 32))


def test_timed_records_seconds_per_item_and_flip_views_invert_the_flip():
    metrics: dict = {}
    assert timed(metrics, "x", 4, lambda: 7) == 7 and metrics["x_seconds_per_image"] >= 0
    image = np.arange(2 * 3 * 1).reshape(2, 3, 1)
    assert (flip_view("vertical")(image) == image[::-1]).all()
    assert (flip_view("horizontal")(image) == image[:, ::-1]).all()
    assert (flip_view("rot180")(flip_view("rot180")(image)) == image).all()
    pixels = to_uint8(torch.tensor([[[[0.0, 0.5, 1.2]]]]).expand(1, 3, 1, 3))  # (1, 1, 3, 3): clamped, rounded
    assert pixels[0, 0].tolist() == [[0] * 3, [128] * 3, [255] * 3]
