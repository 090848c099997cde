"""Diffusion maths against float64 closed forms and diffusers' DDPMScheduler."""

import pytest
import torch

from diffmodels.diffusion.schedule import NoiseSchedule, make_betas

KINDS = [("linear", 1e-4, 2e-2), ("scaled_linear", 0.00085, 0.012), ("cosine", 1e-4, 2e-2)]


@pytest.mark.parametrize("kind, start, end", KINDS)
def test_alpha_bar_strictly_decreasing_from_one(kind, start, end):
    s = NoiseSchedule.from_kind(kind, 1000, start, end)
    assert s.alpha_bar.dtype == torch.float64 and s.alpha_bar.shape == (1001,)
    assert s.alpha_bar[0] == 1.0 and s.betas[0] == 0.0
    assert (s.alpha_bar[1:] < s.alpha_bar[:-1]).all()
    assert (s.betas[1:] > 0).all() and (s.betas < 1).all()


def test_linear_endpoints_are_steps_1_and_T():
    s = NoiseSchedule.from_kind("linear", 1000)
    assert s.betas[1].item() == pytest.approx(1e-4, abs=1e-15)
    assert s.betas[1000].item() == pytest.approx(2e-2, abs=1e-15)
    assert s.alpha_bar[1].item() == pytest.approx(1 - 1e-4, abs=1e-15)


def test_bad_arguments():
    with pytest.raises(ValueError, match="schedule kind"):
        make_betas("quadratic", 10)
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        NoiseSchedule(torch.tensor([0.1, 1.5]))


def test_q_sample_closed_form_float64():
    s = NoiseSchedule.from_kind("linear", 50)
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(z0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 2, 25, 49, 50])
    zt = s.q_sample(z0, t, eps)
    for i, ti in enumerate(t.tolist()):
        abar = 1.0
        for k in range(1, ti + 1):
            abar *= 1.0 - (1e-4 + (2e-2 - 1e-4) * (k - 1) / 49)
        expected = abar**0.5 * z0[i] + (1 - abar) ** 0.5 * eps[i]
        assert torch.allclose(zt[i], expected, rtol=0, atol=1e-12)
    assert torch.equal(zt[0], z0[0]), "step 0 is the clean latent"


def test_posterior_is_the_product_of_gaussians():
    """mu_tilde and beta_tilde from Bayes' rule on q(z_{t-1}|z_0) and q(z_t|z_{t-1})."""
    s = NoiseSchedule.from_kind("linear", 100)
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(5, 8, generator=g, dtype=torch.float64)
    zt = torch.randn(5, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([2, 3, 10, 50, 100])
    mean, var = s.q_posterior_mean_var(z0, zt, t)
    for i, ti in enumerate(t.tolist()):
        prior_var = 1 - s.alpha_bar[ti - 1]
        beta, alpha = s.betas[ti], s.alphas[ti]
        post_var = 1 / (1 / prior_var + alpha / beta)
        post_mean = post_var * (s.alpha_bar[ti - 1].sqrt() * z0[i] / prior_var + alpha.sqrt() * zt[i] / beta)
        assert torch.allclose(mean[i], post_mean, atol=1e-12)
        assert torch.allclose(var[i].flatten()[0], post_var, atol=1e-15)
    # t = 1: z_0 is known exactly given itself.
    mean1, var1 = s.q_posterior_mean_var(z0, zt, torch.ones(5, dtype=torch.long))
    assert torch.allclose(mean1, z0, atol=1e-12) and (var1 == 0).all()


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_parameterisations_round_trip(prediction):
    s = NoiseSchedule.from_kind("cosine", 200)
    g = torch.Generator().manual_seed(2)
    z0 = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(z0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 50, 150, 200])
    zt = s.q_sample(z0, t, eps)
    target = s.training_target(z0, t, eps, prediction)
    eps_hat, x0_hat = s.to_eps_x0(zt, t, target, prediction)
    assert torch.allclose(eps_hat, eps, atol=1e-8) and torch.allclose(x0_hat, z0, atol=1e-8)


# ---- diffusers as an independent reference (test-only dependency) ---------------------------

diffusers = pytest.importorskip("diffusers")

DIFFUSERS_KIND = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}


def reference(kind, start, end, T, **kwargs):
    return diffusers.DDPMScheduler(
        num_train_timesteps=T, beta_schedule=DIFFUSERS_KIND[kind], beta_start=start, beta_end=end,
        clip_sample=False, **kwargs,
    )


def reference64(schedule, **kwargs):
    """diffusers' DDPMScheduler running on our float64 betas, so its formulas can be compared
    with ours to float64 precision (its own arrays are float32)."""
    ref = diffusers.DDPMScheduler(num_train_timesteps=schedule.num_steps, clip_sample=False, **kwargs)
    ref.betas = schedule.betas[1:].clone()
    ref.alphas = 1.0 - ref.betas
    ref.alphas_cumprod = torch.cumprod(ref.alphas, dim=0)
    return ref


@pytest.mark.parametrize("kind, start, end", KINDS)
def test_arrays_match_diffusers(kind, start, end):
    s = NoiseSchedule.from_kind(kind, 1000, start, end)
    ref = reference(kind, start, end, 1000)
    # diffusers' timestep k is our step t = k + 1; it keeps float32 arrays.
    assert torch.allclose(s.betas[1:].float(), ref.betas, rtol=1e-6, atol=1e-9)
    assert torch.allclose(s.alpha_bar[1:].float(), ref.alphas_cumprod, rtol=1e-5, atol=1e-9)
    # float32 cancellation in 1 - alpha_bar near t = 1 limits the agreement to ~1e-3 relative ...
    ref_var = torch.stack([ref._get_variance(k) for k in range(1000)])
    assert torch.allclose(s.posterior_var[1:].float().clamp(min=1e-20), ref_var, rtol=2e-3, atol=1e-12)
    # ... and on the same float64 betas the posterior variances agree to float64 precision.
    ref64 = reference64(s)
    ref_var64 = torch.stack([ref64._get_variance(k) for k in range(1000)])
    assert torch.allclose(s.posterior_var[1:].clamp(min=1e-20), ref_var64, rtol=1e-12, atol=0)


@pytest.mark.parametrize("kind, start, end", KINDS)
def test_add_noise_matches_diffusers(kind, start, end):
    s = NoiseSchedule.from_kind(kind, 1000, start, end)
    ref = reference(kind, start, end, 1000)
    g = torch.Generator().manual_seed(3)
    z0 = torch.randn(8, 4, 8, 8, generator=g)
    eps = torch.randn(z0.shape, generator=g)
    t = torch.tensor([1, 2, 10, 100, 500, 900, 999, 1000])
    assert torch.allclose(s.q_sample(z0, t, eps), ref.add_noise(z0, eps, t - 1), atol=1e-5)


@pytest.mark.parametrize("prediction, ref_type", [("eps", "epsilon"), ("x0", "sample"), ("v", "v_prediction")])
def test_posterior_mean_var_at_the_predicted_x0_is_a_diffusers_ddpm_step(prediction, ref_type):
    """q_posterior_mean_var at x0_hat plus sqrt(beta_tilde) * noise is one DDPMScheduler step
    (fixed_small). The sampler itself, ddpm_steps, is checked against diffusers step by step in
    test_samplers.py::test_ddpm_trajectory_matches_diffusers."""
    T = 1000
    s = NoiseSchedule.from_kind("linear", T)
    ref = reference64(s, prediction_type=ref_type, variance_type="fixed_small")
    g = torch.Generator().manual_seed(4)
    zt = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    output = torch.randn(zt.shape, generator=g, dtype=torch.float64)
    for t in (T, 500, 2, 1):
        tt = torch.full((2,), t)
        noise = torch.randn(zt.shape, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
        _, x0_hat = s.to_eps_x0(zt, tt, output, prediction)
        mean, var = s.q_posterior_mean_var(x0_hat, zt, tt)
        ours = mean + (var.sqrt() * noise if t > 1 else 0)
        theirs = ref.step(output, t - 1, zt, generator=torch.Generator().manual_seed(t)).prev_sample
        assert torch.allclose(ours, theirs, rtol=0, atol=1e-10), f"t={t}: {(ours - theirs).abs().max()}"
