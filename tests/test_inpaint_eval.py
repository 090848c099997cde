"""Evaluating inpainting methods (metrics.inpainting): seeded batches, per-set seeds, mean scores,
and the example panels' mask overlay."""

import numpy as np
import pytest
import torch

from diffmodels.diffusion.inpaint import Sampler, inpaint_images
from diffmodels.diffusion.schedule import NoiseSchedule
from diffmodels.metrics.inpainting import (
    SET_SEED_STRIDE,
    evaluate_method,
    inpaint_mask_set,
    mean_scores,
    reconstructions,
)
from diffmodels.models.vae import VAE, VAEConfig
from diffmodels.reporting.sampling_figures import mask_overlay

pytestmark = pytest.mark.usefixtures("one_thread")


def toy_model(x, t):
    tf = t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return 0.3 * torch.tanh(x) + 0.1 * torch.sin(tf / 7.0) * x + 0.05


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    cfg = VAEConfig(in_channels=1, latent_channels=3, base_channels=4, channel_mult=(1, 1, 2, 2), blocks_per_level=1,
                    se=False, se_reduction=2, decoder_kernel=3, upsample="nearest")
    vae = VAE(cfg).eval()
    images = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    hole = torch.zeros(3, 16, 16, dtype=torch.bool)
    hole[:, 4:12, 0:8] = True
    settings = dict(encode=lambda x: vae.encode(x)[0], decode=vae.decode, denoise_fn=toy_model,
                    schedule=NoiseSchedule.from_kind("linear", 10), scale_factor=0.8,
                    sampler=Sampler("ddim", ddim_steps=5, eta=0.5))
    return images, hole, settings


def test_each_batch_has_its_own_seed_and_the_process_is_the_first_images(setup):
    images, hole, settings = setup
    out, process = inpaint_mask_set("replace_noised", images, hole, batch_size=2, seed=40, process_points=3, **settings)
    steps = []
    first = inpaint_images("replace_noised", images[:2], hole[:2], generator=torch.Generator().manual_seed(40),
                           callback=steps.append, **settings)
    rest = inpaint_images("replace_noised", images[2:], hole[2:], generator=torch.Generator().manual_seed(42),
                          **settings)
    assert torch.equal(out, torch.cat([first, rest])), "batch i seeded seed + i"
    assert len(steps) == 5 and len(process) == 3
    for got, k in zip(process, [0, 2, 4]):  # evenly spaced over the 5 steps, both ends
        assert torch.equal(got, steps[k].x0[:1])


def test_every_mask_set_gets_its_own_seeds_and_mean_scores(setup):
    images, hole, settings = setup
    recon = reconstructions(images, settings["encode"], settings["decode"], batch_size=2)
    masks = {"a": hole.numpy(), "b": hole.numpy()}  # the same holes under two names
    results = dict(evaluate_method("repaint", images, recon, masks, batch_size=3, seed=1, process_points=2,
                                   jump_length=1, resample=2, **settings))
    assert list(results) == ["a", "b"]
    for index, name in enumerate(masks):
        out, _ = inpaint_mask_set("repaint", images, hole, batch_size=3, seed=1 + SET_SEED_STRIDE * index,
                                  process_points=2, jump_length=1, resample=2, **settings)
        assert torch.equal(results[name].output, out)
        assert results[name].scores == mean_scores(out, images, recon, hole)
    assert not torch.equal(results["a"].output, results["b"].output), "sets do not share noise"


def test_mean_scores_average_the_images_where_a_score_is_defined():
    """The seam score is NaN for an image whose mask has no boundary (all keep): such images are
    left out of the mean, and a set where no image has a boundary scores None, not NaN."""
    images = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(3)) - 0.5  # in [-0.5, 0.5)
    hole = torch.zeros(2, 16, 16, dtype=torch.bool)
    hole[:, :8] = True
    output = images.clone()
    output[0, :, 8:] += 0.5  # image 0 off by 0.5 (0.25 in [0, 1] units) where kept
    scores = mean_scores(output, images, images, hole)
    assert scores["mae_image"] == pytest.approx(0.125, abs=1e-5), "mean of 0.25 and 0"
    assert scores["psnr_recon"] == scores["psnr_image"] and scores["seam"] is not None
    hole[1] = False  # image 1 all keep: no boundary, its seam is NaN
    one = mean_scores(output, images, images, hole)
    assert one["seam"] == mean_scores(output[:1], images[:1], images[:1], hole[:1])["seam"]
    assert mean_scores(output, images, images, torch.zeros_like(hole))["seam"] is None


def test_mask_overlay_tints_the_hole_only():
    image = np.full((4, 4, 1), 228, np.uint8)
    hole = np.zeros((4, 4), bool)
    hole[1:3, 1:3] = True
    out = mask_overlay(image, hole)
    assert (out[hole] == round(0.35 * 228 + 0.65 * 128)).all() and (out[~hole] == 228).all()
