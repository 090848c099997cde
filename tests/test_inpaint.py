"""Inpainting methods (diffusion.inpaint) against hand-written loops, exact clamps and known schedules."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffmodels.data.masks import make_mask
from diffmodels.diffusion.inpaint import (
    Sampler,
    clamp_mean,
    inpaint_images,
    latent_hole,
    paste_back,
    reconstruct,
    repaint,
    repaint_schedule,
    replace_noised,
    sdedit,
    upsample_tiles,
)
from diffmodels.diffusion.samplers import ddim_steps, ddpm_steps, run
from diffmodels.diffusion.schedule import NoiseSchedule
from diffmodels.models.vae import VAE, VAEConfig

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (2, 3, 4, 5)  # (B, C, h, w) latents


def toy_model(x, t):
    """A deterministic stand-in eps-network: smooth in x, varies with t."""
    tf = t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return 0.3 * torch.tanh(x) + 0.1 * torch.sin(tf / 7.0) * x + 0.05


def anchor_and_hole(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    anchor = torch.randn(SHAPE, generator=g, dtype=dtype)
    hole = torch.rand((SHAPE[0], 1, *SHAPE[2:]), generator=g) < 0.5
    hole[:, :, 0, 0], hole[:, :, 0, 1] = True, False  # at least one tile of each kind
    return anchor, hole


SAMPLERS = [Sampler("ddpm"), Sampler("ddpm", variance="posterior"), Sampler("ddim", ddim_steps=4, eta=0.5)]


# --------------------------------------------------------------------------------------------
# Mask mapping
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["nearest", "conservative"])
def test_grid_aligned_masks_map_exactly(policy):
    tiles = np.random.default_rng(0).random((3, 1, 4, 6)) < 0.4
    hole = torch.from_numpy(np.kron(tiles, np.ones((1, 1, 8, 8), dtype=bool)).astype(bool))
    assert torch.equal(latent_hole(hole, policy), torch.from_numpy(tiles))
    assert torch.equal(upsample_tiles(latent_hole(hole, policy)), hole)
    assert torch.equal(latent_hole(hole[:, 0], policy), torch.from_numpy(tiles)), "(B, H, W) masks too"


def test_misaligned_mask_follows_the_policy():
    """Hole rows [5, 13), cols [3, 20) of 24x24. Tiles span 0-7, 8-15, 16-23 with centre pixels 4, 12, 20."""
    hole = torch.zeros(1, 24, 24, dtype=torch.bool)
    hole[0, 5:13, 3:20] = True
    nearest = torch.tensor([[0, 0, 0], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)  # only pixel (12, 4), (12, 12) are holes
    conservative = torch.tensor([[1, 1, 1], [1, 1, 1], [0, 0, 0]], dtype=torch.bool)  # any hole pixel makes a hole tile
    assert torch.equal(latent_hole(hole, "nearest")[0, 0], nearest)
    assert torch.equal(latent_hole(hole, "conservative")[0, 0], conservative)


def test_nearest_policy_is_nearest_exact_downsampling_and_conservative_keeps_only_clean_tiles():
    masks = [make_mask(f"{s}_offset", i, 32, seed=3) for s in ("boxes", "brush", "centre") for i in range(3)]
    holes = torch.from_numpy(np.stack(masks))
    near, cons = latent_hole(holes, "nearest"), latent_hole(holes, "conservative")
    ref = F.interpolate(holes[:, None].float(), scale_factor=1 / 8, mode="nearest-exact") > 0.5
    assert torch.equal(near, ref)
    assert not (near & ~cons).any(), "a nearest hole tile is always a conservative hole tile"
    kept_pixels = ~upsample_tiles(cons)[:, 0]
    assert not (holes & kept_pixels).any(), "conservative: every pixel of a kept tile is kept"
    assert (cons & ~near).any(), "offset masks make the policies differ"


def test_mask_errors_are_one_line_value_errors():
    with pytest.raises(ValueError, match="boolean"):
        latent_hole(torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match="multiple of 8"):
        latent_hole(torch.zeros(1, 12, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask_policy"):
        latent_hole(torch.zeros(1, 8, 8, dtype=torch.bool), "majority")


# --------------------------------------------------------------------------------------------
# RePaint's time schedule
# --------------------------------------------------------------------------------------------


def test_repaint_schedule_explicit_sequences():
    # jumps at levels 1, 3 (every j from 1, below T - j + 1), taken resample - 1 times each
    assert repaint_schedule(5, 2, 2) == [5, 4, 3, 4, 5, 4, 3, 2, 1, 2, 3, 2, 1, 0]
    assert repaint_schedule(6, 2, 3) == [6, 5, 4, 3, 4, 5, 4, 3, 4, 5, 4, 3, 2, 1, 2, 3, 2, 1, 2, 3, 2, 1, 0]
    assert repaint_schedule(10, 3, 2) == [10, 9, 8, 7, 8, 9, 10, 9, 8, 7, 6, 5, 4, 5, 6, 7, 6, 5, 4,
                                          3, 2, 1, 2, 3, 4, 3, 2, 1, 0]
    # jump 1 is the paper's alg. 1 with U = 3: every step t -> t-1 for t > 1 taken U times
    assert repaint_schedule(4, 1, 3) == [4, 3, 4, 3, 4, 3, 2, 3, 2, 3, 2, 1, 2, 1, 2, 1, 0]
    assert repaint_schedule(4, 2, 1) == [4, 3, 2, 1, 0], "resample 1: plain descent"
    assert repaint_schedule(3, 5, 4) == [3, 2, 1, 0], "jumps longer than T are never taken"


@pytest.mark.parametrize("T, j, r", [(20, 4, 3), (50, 10, 10), (17, 5, 2)])
def test_repaint_schedule_properties(T, j, r):
    levels = repaint_schedule(T, j, r)
    moves = np.diff(levels)
    assert levels[0] == T and levels[-1] == 0 and set(moves) <= {-1, 1}
    assert min(levels) == 0 and max(levels) == T
    jump_points = len(range(1, T - j + 1, j))
    assert (moves == 1).sum() == jump_points * (r - 1) * j
    assert (moves == -1).sum() == T + jump_points * (r - 1) * j


def test_repaint_schedule_rejects_bad_settings():
    with pytest.raises(ValueError, match="RePaint"):
        repaint_schedule(10, 0, 2)


# --------------------------------------------------------------------------------------------
# clamp_mean
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", SAMPLERS, ids=["ddpm", "ddpm-posterior", "ddim"])
def test_clamp_mean_kept_tiles_equal_the_anchor_bit_for_bit_at_every_step(sampler):
    s = NoiseSchedule.from_kind("linear", 12)
    anchor, hole = anchor_and_hole()
    seen = []
    z0 = run(clamp_mean(toy_model, anchor, hole, s, sampler=sampler, generator=torch.Generator().manual_seed(1)),
             seen.append)
    keep = ~hole.expand(SHAPE)
    assert [st.t_prev for st in seen][-1] == 0 and len(seen) == len(sampler.grid(s)) - 1
    for st in seen:
        assert torch.equal(st.x[keep], anchor[keep]), f"kept tiles moved at t={st.t}"
        assert not torch.equal(st.x[~keep], anchor[~keep])
    assert torch.equal(z0[keep], anchor[keep])


@pytest.mark.parametrize("sampler", SAMPLERS, ids=["ddpm", "ddpm-posterior", "ddim"])
def test_clamp_mean_with_an_all_hole_mask_is_the_plain_shared_sampler(sampler):
    """Single steps (ddpm_step / ddim_step) reproduce one uninterrupted sampler run, noise included."""
    s = NoiseSchedule.from_kind("linear", 12)
    anchor, _ = anchor_and_hole()
    hole = torch.ones(SHAPE[0], 1, *SHAPE[2:], dtype=torch.bool)
    ours = run(clamp_mean(toy_model, anchor, hole, s, sampler=sampler, generator=torch.Generator().manual_seed(2)))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(SHAPE, generator=g)
    if sampler.kind == "ddpm":
        ref = run(ddpm_steps(toy_model, x, s, variance=sampler.variance, generator=g))
    else:
        ref = run(ddim_steps(toy_model, x, s, num_steps=sampler.ddim_steps, eta=sampler.eta, generator=g))
    assert torch.equal(ours, ref)


def test_clamp_mean_matches_a_handwritten_ddpm_loop():
    """clamp_mean: start from noise with kept tiles = z_a; eq. 11 step; re-clamp to z_a; noise only when t > 1."""
    T = 6
    s = NoiseSchedule.from_kind("linear", T, 1e-2, 0.3)
    anchor, hole = anchor_and_hole(torch.float64)
    got = run(clamp_mean(toy_model, anchor, hole, s, generator=torch.Generator().manual_seed(3)))
    g = torch.Generator().manual_seed(3)
    x = torch.where(hole, torch.randn(SHAPE, generator=g, dtype=torch.float64), anchor)
    for t in range(T, 0, -1):
        beta, alpha, abar = s.betas[t], s.alphas[t], s.alpha_bar[t]
        eps = toy_model(x, torch.full((SHAPE[0],), t))
        x = (x - beta / (1 - abar).sqrt() * eps) / alpha.sqrt()
        if t > 1:
            x = x + beta.sqrt() * torch.randn(SHAPE, generator=g, dtype=torch.float64)
        x = torch.where(hole, x, anchor)
    torch.testing.assert_close(got, x, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------
# replace_noised and repaint
# --------------------------------------------------------------------------------------------


def _replaced(s, anchor, hole, x, t, g):
    n = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    return torch.where(hole, x, s.alpha_bar[t].sqrt() * anchor + (1 - s.alpha_bar[t]).sqrt() * n)


def _ddpm_step(s, x, t, g):
    beta, alpha, abar = s.betas[t], s.alphas[t], s.alpha_bar[t]
    x = (x - beta / (1 - abar).sqrt() * toy_model(x, torch.full((SHAPE[0],), t))) / alpha.sqrt()
    return x + beta.sqrt() * torch.randn(SHAPE, generator=g, dtype=torch.float64) if t > 1 else x


def test_replace_noised_matches_a_handwritten_loop():
    T = 6
    s = NoiseSchedule.from_kind("linear", T, 1e-2, 0.3)
    anchor, hole = anchor_and_hole(torch.float64)
    seen = []
    got = run(replace_noised(toy_model, anchor, hole, s, generator=torch.Generator().manual_seed(4)), seen.append)
    g = torch.Generator().manual_seed(4)
    x = _replaced(s, anchor, hole, torch.randn(SHAPE, generator=g, dtype=torch.float64), T, g)
    for t in range(T, 0, -1):
        x = _replaced(s, anchor, hole, _ddpm_step(s, x, t, g), t - 1, g)
    torch.testing.assert_close(got, x, rtol=0, atol=1e-12)
    keep = ~hole.expand(SHAPE)
    assert torch.equal(got[keep], anchor[keep]), "level 0: q_sample(z_a, 0, n) is z_a exactly"
    assert not torch.equal(seen[0].x[keep], anchor[keep]), "intermediate kept tiles are noised"


def test_repaint_matches_a_handwritten_loop_over_its_schedule():
    T, j, r = 6, 2, 2
    s = NoiseSchedule.from_kind("linear", T, 1e-2, 0.3)
    anchor, hole = anchor_and_hole(torch.float64)
    calls = []

    def spy(x, t):
        calls.append(int(t[0]))
        return toy_model(x, t)

    got = run(repaint(spy, anchor, hole, s, jump_length=j, resample=r, generator=torch.Generator().manual_seed(5)))
    levels = repaint_schedule(T, j, r)
    assert calls == [t for t, t_next in zip(levels, levels[1:]) if t_next < t], "one denoiser call per step down"
    g = torch.Generator().manual_seed(5)
    x = _replaced(s, anchor, hole, torch.randn(SHAPE, generator=g, dtype=torch.float64), T, g)
    for t, t_next in zip(levels, levels[1:]):
        if t_next < t:
            x = _replaced(s, anchor, hole, _ddpm_step(s, x, t, g), t_next, g)
        else:  # alg. 1: x_t ~ N(sqrt(1 - beta_t) x_{t-1}, beta_t I)
            x = s.alphas[t_next].sqrt() * x + s.betas[t_next].sqrt() * torch.randn(SHAPE, generator=g, dtype=torch.float64)
    torch.testing.assert_close(got, x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("sampler", SAMPLERS, ids=["ddpm", "ddpm-posterior", "ddim"])
def test_repaint_without_resampling_is_replace_noised(sampler):
    s = NoiseSchedule.from_kind("linear", 12)
    anchor, hole = anchor_and_hole()
    a = run(repaint(toy_model, anchor, hole, s, jump_length=3, resample=1, sampler=sampler,
                    generator=torch.Generator().manual_seed(6)))
    b = run(replace_noised(toy_model, anchor, hole, s, sampler=sampler, generator=torch.Generator().manual_seed(6)))
    assert torch.equal(a, b)


def test_repaint_on_a_ddim_grid_jumps_over_grid_levels():
    s = NoiseSchedule.from_kind("linear", 20)
    anchor, hole = anchor_and_hole()
    calls = []

    def spy(x, t):
        calls.append(int(t[0]))
        return toy_model(x, t)

    sampler = Sampler("ddim", ddim_steps=4)  # grid 0, 5, 10, 15, 20
    run(repaint(spy, anchor, hole, s, jump_length=1, resample=2, sampler=sampler))
    # grid indices 4 3 4 3 2 3 2 1 2 1 0 -> levels 20 15 20 15 10 15 10 5 10 5 0; a call per step down
    assert calls == [20, 20, 15, 15, 10, 10, 5]


# --------------------------------------------------------------------------------------------
# sdedit
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler, expected", [(Sampler("ddpm"), [7, 6, 5, 4, 3, 2, 1]),
                                               (Sampler("ddim", ddim_steps=4), [7, 5])])
def test_sdedit_noises_the_anchor_to_t0_then_denoises_from_there(sampler, expected):
    s = NoiseSchedule.from_kind("linear", 20)
    anchor, _ = anchor_and_hole()
    calls, first = [], []

    def spy(x, t):
        calls.append(int(t[0]))
        first.append(x.clone())
        return toy_model(x, t)

    out = run(sdedit(spy, anchor, s, 7, sampler=sampler, generator=torch.Generator().manual_seed(7)))
    assert calls == expected
    n = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(first[0], s.q_sample(anchor, torch.full((SHAPE[0],), 7), n), rtol=0, atol=0)
    assert out.shape == anchor.shape and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="t0"):
        next(sdedit(spy, anchor, s, 21))


@pytest.mark.parametrize("sampler", SAMPLERS, ids=["ddpm", "ddpm-posterior", "ddim"])
def test_sdedit_matches_a_handwritten_loop(sampler):
    """Meng et al. alg. 1: z_t0 = sqrt(abar_t0) z_a + sqrt(1 - abar_t0) n, then the sampler's steps
    from t0 down to 0 written out (DDPM eq. 11, noise only when t > 1; DDIM eq. 12 on the grid)."""
    T, t0 = 12, 7
    s = NoiseSchedule.from_kind("linear", T, 1e-2, 0.3)
    anchor, _ = anchor_and_hole(torch.float64)
    got = run(sdedit(toy_model, anchor, s, t0, sampler=sampler, generator=torch.Generator().manual_seed(8)))
    g = torch.Generator().manual_seed(8)
    noise = lambda: torch.randn(SHAPE, generator=g, dtype=torch.float64)  # noqa: E731
    x = s.alpha_bar[t0].sqrt() * anchor + (1 - s.alpha_bar[t0]).sqrt() * noise()
    if sampler.kind == "ddpm":
        for t in range(t0, 0, -1):
            beta, alpha, abar, abar_prev = s.betas[t], s.alphas[t], s.alpha_bar[t], s.alpha_bar[t - 1]
            eps = toy_model(x, torch.full((SHAPE[0],), t))
            x = (x - beta / (1 - abar).sqrt() * eps) / alpha.sqrt()
            var = beta if sampler.variance == "beta" else beta * (1 - abar_prev) / (1 - abar)
            if t > 1:
                x = x + var.sqrt() * noise()
    else:
        levels = [t0, 6, 3, 0]  # t0, then the trailing grid 12, 9, 6, 3 below it, then 0
        for t, t_prev in zip(levels, levels[1:]):
            a, a_prev = s.alpha_bar[t], s.alpha_bar[t_prev]
            eps = toy_model(x, torch.full((SHAPE[0],), t))
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            sigma = sampler.eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * eps + (sigma * noise() if sigma > 0 else 0)
    torch.testing.assert_close(got, x, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Pixels to pixels with a tiny real VAE
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vae():
    torch.manual_seed(0)
    cfg = VAEConfig(in_channels=1, latent_channels=3, base_channels=4, channel_mult=(1, 1, 2, 2), blocks_per_level=1,
                    se=True, se_reduction=2, decoder_kernel=3, upsample="nearest")
    return VAE(cfg).eval()


def _images(n=2, size=16, seed=0):
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("method", ["clamp_mean", "replace_noised", "repaint"])
def test_all_keep_mask_returns_the_vae_reconstruction_exactly(tiny_vae, method):
    x = _images()
    hole = torch.zeros(2, 16, 16, dtype=torch.bool)
    s = NoiseSchedule.from_kind("linear", 8)
    out = inpaint_images(method, x, hole, encode=lambda im: tiny_vae.encode(im)[0], decode=tiny_vae.decode,
                         denoise_fn=toy_model, schedule=s, scale_factor=0.7, jump_length=2, resample=2,
                         generator=torch.Generator().manual_seed(0))
    recon = reconstruct(x, lambda im: tiny_vae.encode(im)[0], tiny_vae.decode)
    assert torch.equal(out, recon)
    with torch.no_grad():  # the same up to the kernel choice for a non-contiguous latent (see reconstruct)
        torch.testing.assert_close(out, tiny_vae.decode(tiny_vae.encode(x)[0]), rtol=0, atol=1e-5)


def test_inpaint_images_keeps_kept_tiles_and_pastes_back_only_on_request(tiny_vae):
    x = _images(seed=1)
    hole = torch.zeros(2, 16, 16, dtype=torch.bool)
    hole[:, 3:11, 2:9] = True  # misaligned: nearest holes tile (0, 0) only ... (centre pixel (4, 4))
    s = NoiseSchedule.from_kind("linear", 8)
    last = []
    kw = dict(encode=lambda im: tiny_vae.encode(im)[0], decode=tiny_vae.decode, denoise_fn=toy_model, schedule=s,
              scale_factor=0.7)
    out = inpaint_images("clamp_mean", x, hole, generator=torch.Generator().manual_seed(0), callback=last.append, **kw)
    pasted = inpaint_images("clamp_mean", x, hole, generator=torch.Generator().manual_seed(0), paste=True, **kw)
    with torch.no_grad():
        anchor = tiny_vae.encode(x)[0] * 0.7
    tiles = latent_hole(hole)
    assert tiles[:, 0].tolist() == [[[True, False], [False, False]]] * 2
    assert torch.equal(last[-1].x[:, :, 0, 1:], anchor[:, :, 0, 1:]) and torch.equal(last[-1].x[:, :, 1], anchor[:, :, 1])
    assert not torch.equal(out, pasted)
    keep = ~hole[:, None]
    assert torch.equal(pasted[keep], x[keep]) and torch.equal(pasted[~keep], out[~keep])
    assert torch.equal(paste_back(out, x, hole), pasted)


def test_inpaint_images_rejects_unknown_methods_and_sdedit_without_t0(tiny_vae):
    x, hole = _images(), torch.zeros(2, 16, 16, dtype=torch.bool)
    kw = dict(encode=lambda im: tiny_vae.encode(im)[0], decode=tiny_vae.decode, denoise_fn=toy_model,
              schedule=NoiseSchedule.from_kind("linear", 4), scale_factor=1.0)
    with pytest.raises(ValueError, match="clamp_mean"):
        inpaint_images("blend", x, hole, **kw)
    with pytest.raises(ValueError, match="sdedit_t0"):
        inpaint_images("sdedit", x, hole, **kw)
    out = inpaint_images("sdedit", x, hole, sdedit_t0=2, generator=torch.Generator().manual_seed(9), **kw)
    with torch.no_grad():
        anchor = tiny_vae.encode(x)[0].contiguous()  # scale_factor 1.0
        expected = tiny_vae.decode(run(sdedit(toy_model, anchor, kw["schedule"], 2,
                                              generator=torch.Generator().manual_seed(9))))
    assert torch.equal(out, expected), "sdedit: the whole latent edited and decoded, no mask, no paste"
    everywhere = inpaint_images("sdedit", x, ~hole, sdedit_t0=2, generator=torch.Generator().manual_seed(9), **kw)
    assert torch.equal(everywhere, out), "sdedit ignores the hole mask"
    with pytest.raises(ValueError, match="sampler kind"):
        Sampler("euler")
    with pytest.raises(ValueError, match="a DDPM step goes from t to t - 1, got t=5, t_prev=3"):
        Sampler("ddpm").step(toy_model, torch.zeros(SHAPE), NoiseSchedule.from_kind("linear", 10), 5, 3, None)


def test_latent_hole_and_upsample_tiles_follow_the_stride_they_are_given():
    """A stride-4 VAE on 12x12 masks: tiles of 4 px, not the default 8 (which 12 is not a multiple of)."""
    tiles = torch.zeros(2, 1, 3, 3, dtype=torch.bool)
    tiles[0, 0, 1, 2] = tiles[1, 0, 0, 0] = True
    hole = upsample_tiles(tiles, grid=4)
    assert hole.shape == (2, 1, 12, 12) and int(hole.sum()) == 2 * 16
    assert hole[0, 0, 4:8, 8:12].all() and hole[1, 0, :4, :4].all()
    for policy in ("nearest", "conservative"):
        assert torch.equal(latent_hole(hole, policy, grid=4), tiles), policy
    with pytest.raises(ValueError, match="not a multiple of 8"):
        latent_hole(hole)
