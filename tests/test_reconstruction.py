"""VAE reconstruction rows: box blur, sharpness ratios, and the reference rows' order with the real
Inception network."""

import math

import numpy as np
import pytest
import torch

from diffmodels.metrics.fid import InceptionFeatures, inception_features
from diffmodels.metrics.reconstruction import (
    box_blur,
    flat_metrics,
    high_frequency_fraction,
    mean_gradient,
    reconstruction_rows,
    rows_table,
    sharpness_ratios,
)


def textures(n: int, size: int = 32, seed: int = 0, channels: int = 1) -> np.ndarray:
    """(n, size, size, channels) uint8: random axis-aligned rectangles and stripes (hard edges)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, size, size, channels), dtype=np.uint8)
    yy, xx = np.mgrid[0:size, 0:size]
    for img in out:
        img[:] = rng.integers(0, 60)
        for _ in range(4):
            y0, x0 = rng.integers(0, size - 6, 2)
            h, w = rng.integers(4, size // 2, 2)
            img[y0:y0 + h, x0:x0 + w] = rng.integers(80, 256, channels)
        period = rng.integers(3, 7)
        stripes = ((xx + yy * rng.integers(0, 2)) // period) % 2 == 0
        region = (yy > rng.integers(0, size // 2)) & stripes
        img[region] = 255 - img[region]
    return out


def blur_loop(images: np.ndarray, k: int) -> np.ndarray:
    """Direct float64 loop: mean of the k x k neighbourhood, indices reflected at the border."""
    n, h, w, c = images.shape
    r = k // 2

    def reflect(i: int, size: int) -> int:
        return -i if i < 0 else 2 * (size - 1) - i if i >= size else i

    out = np.zeros(images.shape, dtype=np.float64)
    for b in range(n):
        for y in range(h):
            for x in range(w):
                acc = np.zeros(c)
                for dy in range(-r, r + 1):
                    for dx in range(-r, r + 1):
                        acc += images[b, reflect(y + dy, h), reflect(x + dx, w)]
                out[b, y, x] = acc / (k * k)
    return np.round(out).astype(np.uint8)


@pytest.mark.parametrize(("k", "channels"), [(3, 1), (5, 3)])
def test_box_blur_equals_a_direct_loop_with_reflect_padding(k, channels):
    images = np.random.default_rng(k).integers(0, 256, (2, 9, 7, channels), dtype=np.uint8)
    np.testing.assert_array_equal(box_blur(images, k), blur_loop(images, k))
    np.testing.assert_array_equal(box_blur(images, 1), images)
    flat = np.full((1, 6, 6, 1), 77, dtype=np.uint8)
    np.testing.assert_array_equal(box_blur(flat, k), flat)  # the mean of a constant is the constant


def test_box_blur_refuses_even_sizes_and_tiny_images():
    with pytest.raises(ValueError, match="odd"):
        box_blur(np.zeros((1, 8, 8, 1), np.uint8), 4)
    with pytest.raises(ValueError, match="too small"):
        box_blur(np.zeros((1, 2, 8, 1), np.uint8), 5)


def test_mean_gradient_and_high_frequency_fraction_known_answers():
    ramp = np.tile((np.arange(8) * 10).astype(np.uint8), (8, 1))[None, :, :, None]
    assert mean_gradient(ramp) == pytest.approx(10 / 255, rel=1e-12)  # dx = 10/255 everywhere, dy = 0
    checker = ((np.add.outer(np.arange(8), np.arange(8)) % 2) * 255).astype(np.uint8)[None, :, :, None]
    # +-1 alternating: all energy at (0.5, 0.5) cycles/px, radius 0.707 > 0.125
    assert high_frequency_fraction(checker) == pytest.approx(1.0, abs=1e-12)
    wave = np.round(127.5 + 100 * np.cos(2 * math.pi * np.arange(16) / 16)).astype(np.uint8)
    slow = np.tile(wave, (16, 1))[None, :, :, None]  # 1/16 cycles/px: no high-frequency energy
    assert high_frequency_fraction(slow) < 1e-4
    assert high_frequency_fraction(np.full((2, 8, 8, 1), 9, np.uint8)) == 0.0  # flat: no energy at all


def test_sharpness_ratio_of_a_set_with_itself_is_one_and_blur_lowers_it():
    images = textures(6, seed=1)
    assert sharpness_ratios(images, images) == {"grad_ratio": 1.0, "hf_ratio": 1.0}
    r3, r5 = (sharpness_ratios(box_blur(images, k), images) for k in (3, 5))
    assert 0 < r5["grad_ratio"] < r3["grad_ratio"] < 1
    assert 0 < r5["hf_ratio"] < r3["hf_ratio"] < 1


@pytest.fixture(scope="module")
def rows():
    """Reference rows with the real FID network on 16 + 16 textures (80 images, about 5 s on an idle CPU)."""
    extractor = InceptionFeatures()
    originals, real_images = textures(16, seed=10), textures(16, seed=11)
    real = inception_features(real_images, extractor, batch_size=8)
    noisy = np.clip(originals.astype(int) + np.random.default_rng(0).integers(-20, 21, originals.shape), 0, 255)
    return reconstruction_rows(originals, noisy.astype(np.uint8), real,
                               lambda x: inception_features(x, extractor, batch_size=8),
                               real_images=real_images, kid_subsets=20, seed=0)


def test_reference_rows_are_ordered_real_blur3_blur5(rows):
    assert list(rows) == ["real", "blur3", "blur5", "vae"]
    assert rows["real"]["rkid_mean"] < rows["blur3"]["rkid_mean"] < rows["blur5"]["rkid_mean"]
    assert rows["real"]["rfid"] < rows["blur3"]["rfid"] < rows["blur5"]["rfid"]
    assert rows["blur5"]["grad_ratio"] < rows["blur3"]["grad_ratio"] < 1
    assert rows["blur5"]["hf_ratio"] < rows["blur3"]["hf_ratio"] < 1
    assert rows["real"]["grad_ratio"] == pytest.approx(1.0, abs=0.2)  # another sample of the same textures
    assert rows["blur5"]["psnr"] < rows["blur3"]["psnr"] and rows["blur5"]["ssim"] < rows["blur3"]["ssim"] < 1
    assert rows["real"]["psnr"] is None and rows["real"]["ssim"] is None  # originals against themselves
    assert rows["vae"]["grad_ratio"] > 1 and rows["vae"]["hf_ratio"] > 1  # added noise is "sharper" than the originals
    assert all(r["n"] == 16 and r["num_real"] == 16 for r in rows.values())


def test_the_vae_row_psnr_is_that_of_its_mse(rows):
    """The added +-20 noise (clipped) sets the PSNR: 10 log10(1 / MSE) over the whole set."""
    originals = textures(16, seed=10).astype(int)
    noisy = np.clip(originals + np.random.default_rng(0).integers(-20, 21, originals.shape), 0, 255)
    mse = np.mean(((noisy - originals) / 255.0) ** 2)
    assert rows["vae"]["psnr"] == pytest.approx(10 * math.log10(1 / mse), abs=1e-3)


def test_flat_metrics_and_table(rows):
    flat = flat_metrics(rows)
    assert flat["blur3/rfid"] == round(rows["blur3"]["rfid"], 5) and flat["real/psnr"] is None
    assert flat["extractor"].startswith("inception-v3") and flat["blur_padding"] == "reflect"
    lines = rows_table(rows).splitlines()
    header = lines[0].split("\t")
    assert header[:5] == ["row", "rfid", "rfid_low", "rfid_high", "rkid_mean"] and [
        line.split("\t")[0] for line in lines[1:]] == ["real", "blur3", "blur5", "vae"]
    assert lines[1].split("\t")[header.index("psnr")] == ""  # real row: no PSNR
    for row in rows.values():  # the bootstrap intervals bracket their estimates
        assert row["rfid_low"] <= row["rfid"] <= row["rfid_high"]
        assert row["rkid_low"] <= row["rkid_mean"] <= row["rkid_high"]


def test_mismatched_reconstructions_are_refused():
    with pytest.raises(ValueError, match="differ in shape"):
        reconstruction_rows(textures(3), textures(2), torch.zeros(3, 2048), lambda x: torch.zeros(len(x), 2048))
