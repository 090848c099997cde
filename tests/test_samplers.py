"""Samplers against analytic cases and whole diffusers trajectories with the same noise."""


import pytest
import torch

from diffmodels.diffusion.samplers import (
    classifier_free_guidance,
    ddim_step,
    ddim_steps,
    ddim_timesteps,
    ddpm_step,
    ddpm_steps,
    run,
)
from diffmodels.diffusion.sampling import sample_batches, seeded_noise, why_iterate_path
from diffmodels.diffusion.schedule import NoiseSchedule


def toy_model(x, t):
    """A deterministic stand-in network: smooth in x, varies with t."""
    tf = t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return 0.3 * torch.tanh(x) + 0.1 * torch.sin(tf / 37.0) * x + 0.05


def gaussian_oracle(schedule, s2):
    """Exact eps-prediction for data z_0 ~ N(0, s2 I): E[eps | z_t] = sqrt(1-a) z_t / (a s2 + 1 - a)."""

    def fn(x, t):
        a = schedule.alpha_bar[t].to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return (1 - a).sqrt() * x / (a * s2 + 1 - a)

    return fn


def test_progressive_generator_yields_every_step():
    s = NoiseSchedule.from_kind("linear", 20)
    x = torch.randn(2, 3)
    steps = list(ddpm_steps(toy_model, x, s, generator=torch.Generator().manual_seed(0)))
    assert [st.t for st in steps] == list(range(20, 0, -1))
    assert [st.t_prev for st in steps] == list(range(19, -1, -1))
    assert all(st.x.shape == x.shape and st.x0.shape == x.shape for st in steps)
    again = run(ddpm_steps(toy_model, x, s, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(again, steps[-1].x), "same generator seed -> same sample"


def draws(generator: torch.Generator) -> torch.Tensor:
    """The generator's next draw: equal for two generators exactly when they consumed as much."""
    return torch.rand(4, generator=generator)


@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_ddpm_step_by_hand_is_eq_11_with_one_noise_draw_only_above_t_1(variance):
    s = NoiseSchedule.from_kind("linear", 20)
    x = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    g, ref = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    step = ddpm_step(toy_model, x, 7, s, variance=variance, generator=g)
    eps = toy_model(x, torch.full((2,), 7))
    sigma2 = s.betas[7] if variance == "beta" else s.posterior_var[7]
    mean = (x - s.betas[7] / (1 - s.alpha_bar[7]).sqrt() * eps) / s.alphas[7].sqrt()
    torch.testing.assert_close(step.x, mean + sigma2.sqrt() * torch.randn(2, 3, generator=ref, dtype=torch.float64))
    assert (step.t, step.t_prev) == (7, 6) and torch.equal(step.eps, eps)
    assert torch.equal(draws(g), draws(ref)), "one draw of x's shape"
    last = ddpm_step(toy_model, x, 1, s, variance=variance, generator=g)
    assert torch.equal(draws(g), draws(ref)), "no noise on the last step"
    torch.testing.assert_close(last.x, (x - s.betas[1] / (1 - s.alpha_bar[1]).sqrt() * toy_model(x, torch.ones(2)))
                               / s.alphas[1].sqrt())


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_single_steps_chained_are_the_sampler_bit_for_bit(eta):
    """The generators are loops over ddpm_step / ddim_step: chaining the steps by hand, with the
    same generator, gives the same trajectory exactly (what inpainting relies on)."""
    s = NoiseSchedule.from_kind("cosine", 30)
    x_T = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(4))
    ref = list(ddpm_steps(toy_model, x_T, s, variance="posterior", generator=torch.Generator().manual_seed(5)))
    g, x = torch.Generator().manual_seed(5), x_T
    for want in ref:
        x = ddpm_step(toy_model, x, want.t, s, variance="posterior", generator=g).x
        assert torch.equal(x, want.x)
    ts = [30, 22, 9, 4]
    ref = list(ddim_steps(toy_model, x_T, s, eta=eta, timesteps=ts, generator=torch.Generator().manual_seed(6)))
    g, x = torch.Generator().manual_seed(6), x_T
    for t, t_prev, want in zip(ts, ts[1:] + [0], ref):
        step = ddim_step(toy_model, x, t, t_prev, s, eta=eta, generator=g)
        assert (step.t, step.t_prev) == (want.t, want.t_prev) and torch.equal(step.x, want.x)
        x = step.x
    if eta == 0.0:
        assert torch.equal(draws(g), draws(torch.Generator().manual_seed(6))), "deterministic DDIM draws nothing"


def test_single_steps_reject_levels_outside_the_schedule():
    s = NoiseSchedule.from_kind("linear", 10)
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match=r"DDPM step t must be in 1\.\.10, got 0"):
        ddpm_step(toy_model, x, 0, s)
    with pytest.raises(ValueError, match="variance must be"):
        ddpm_step(toy_model, x, 3, s, variance="fixed")
    with pytest.raises(ValueError, match="0 <= t_prev <= t <= 10, got t=4, t_prev=5"):
        ddim_step(toy_model, x, 4, 5, s)
    with pytest.raises(ValueError, match="got t=11, t_prev=0"):
        ddim_step(toy_model, x, 11, 0, s)


@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_ddpm_with_a_point_mass_oracle_lands_exactly_on_it(variance):
    """If the data is one point c, the exact eps-predictor makes x0_hat = c and z_0 = c."""
    s = NoiseSchedule.from_kind("linear", 100)
    c = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)

    def oracle(x, t):
        a = s.alpha_bar[t].reshape(-1, 1)
        return (x - a.sqrt() * c) / (1 - a).sqrt()

    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = run(ddpm_steps(oracle, x, s, variance=variance, generator=torch.Generator().manual_seed(2)))
    assert torch.allclose(out, c.expand(4, 3), atol=1e-9)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_exact_score_for_gaussian_data_recovers_its_variance(sampler):
    s = NoiseSchedule.from_kind("linear", 1000)
    s2 = 0.25
    g = torch.Generator().manual_seed(3)
    x = torch.randn(20000, 1, dtype=torch.float64, generator=g)
    if sampler == "ddpm":
        out = run(ddpm_steps(gaussian_oracle(s, s2), x, s, variance="posterior", generator=g))
    else:
        out = run(ddim_steps(gaussian_oracle(s, s2), x, s, num_steps=100, eta=0.0))
    assert out.mean().abs() < 0.02
    assert out.var().item() == pytest.approx(s2, rel=0.05)


def test_ddim_timesteps_trailing():
    assert ddim_timesteps(5, 1000) == [1000, 800, 600, 400, 200]
    assert ddim_timesteps(1000, 1000) == list(range(1000, 0, -1))
    with pytest.raises(ValueError, match="1..1000"):
        ddim_timesteps(0, 1000)


def test_classifier_free_guidance_formula_and_single_batched_call():
    calls = []

    def model(x, t, y):
        calls.append(len(x))
        return x * 0 + y.to(x.dtype).reshape(-1, 1)  # output = the label, so guidance is visible

    x, t, y = torch.zeros(3, 2), torch.ones(3, dtype=torch.long), torch.tensor([2, 4, 6])
    guided = classifier_free_guidance(model, y, null_label=10, scale=3.0)(x, t)
    assert calls == [6], "conditional and unconditional halves in one call"
    assert torch.allclose(guided, (10 + 3.0 * (y - 10)).float().reshape(-1, 1).expand(3, 2))
    assert torch.allclose(classifier_free_guidance(model, y, 10, 0.0)(x, t), torch.full((3, 2), 10.0))
    assert torch.allclose(classifier_free_guidance(model, y, 10, 1.0)(x, t), y.float().reshape(-1, 1).expand(3, 2))


# ---- whole trajectories against diffusers -------------------------------------------------

diffusers = pytest.importorskip("diffusers")


def patch64(ref, schedule):
    """Run a diffusers scheduler on our float64 betas (its own arrays are float32)."""
    ref.betas = schedule.betas[1:].clone()
    ref.alphas = 1.0 - ref.betas
    ref.alphas_cumprod = torch.cumprod(ref.alphas, dim=0)
    if hasattr(ref, "final_alpha_cumprod"):  # DDIM's last alpha_bar_prev: 1, or alphas_cumprod[0]
        one = torch.tensor(1.0, dtype=torch.float64)
        ref.final_alpha_cumprod = one if ref.config.set_alpha_to_one else ref.alphas_cumprod[0]
    return ref


@pytest.mark.parametrize("variance, ref_variance", [("beta", "fixed_large"), ("posterior", "fixed_small")])
@pytest.mark.parametrize("prediction, ref_prediction", [("eps", "epsilon"), ("x0", "sample"), ("v", "v_prediction")])
def test_ddpm_trajectory_matches_diffusers(variance, ref_variance, prediction, ref_prediction):
    """ddpm_steps against DDPMScheduler.step at every step, both drawing their noise from one seeded
    generator in the same order (diffusers draws none at its k = 0, our t = 1, as we do)."""
    T = 50
    s = NoiseSchedule.from_kind("linear", T, 1e-3, 0.2)
    ref = patch64(
        diffusers.DDPMScheduler(num_train_timesteps=T, clip_sample=False, variance_type=ref_variance,
                                prediction_type=ref_prediction),
        s,
    )
    ref.set_timesteps(T)
    x_T = torch.randn(2, 4, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    ours = list(ddpm_steps(toy_model, x_T, s, prediction=prediction, variance=variance,
                           generator=torch.Generator().manual_seed(1)))
    assert [step.t for step in ours] == [k + 1 for k in ref.timesteps.tolist()] == list(range(T, 0, -1))
    g, x = torch.Generator().manual_seed(1), x_T
    for k, step in zip(ref.timesteps.tolist(), ours):
        out = ref.step(toy_model(x, torch.full((2,), k + 1)), k, x, generator=g)
        assert (step.x0 - out.pred_original_sample).abs().max() < 1e-10, f"t={step.t}"
        x = out.prev_sample
        assert (step.x - x).abs().max() < 1e-10, f"t={step.t}"


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_trajectory_matches_diffusers(eta):
    T, S = 1000, 20
    s = NoiseSchedule.from_kind("linear", T)
    ref = patch64(
        diffusers.DDIMScheduler(num_train_timesteps=T, clip_sample=False, set_alpha_to_one=True,
                                timestep_spacing="trailing", steps_offset=0),
        s,
    )
    ref.set_timesteps(S)
    assert [k + 1 for k in ref.timesteps.tolist()] == ddim_timesteps(S, T)
    x_T = torch.randn(2, 4, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    ours = list(ddim_steps(toy_model, x_T, s, num_steps=S, eta=eta, generator=torch.Generator().manual_seed(5)))
    g, x = torch.Generator().manual_seed(5), x_T
    for i, (k, step) in enumerate(zip(ref.timesteps.tolist(), ours)):
        last = i == S - 1
        noise = None if (eta == 0 or last) else torch.randn(x.shape, generator=g, dtype=x.dtype)
        out = ref.step(toy_model(x, torch.full((2,), k + 1)), k, x, eta=eta, variance_noise=noise)
        x = out.prev_sample if not last else out.pred_original_sample  # diffusers' last step lands on alpha_bar = 1
        assert (step.x - x).abs().max() < 1e-10, f"t={step.t}: {(step.x - x).abs().max()}"
    assert ours[-1].t_prev == 0 and torch.allclose(ours[-1].x, ours[-1].x0)


@pytest.mark.parametrize("spacing, offset", [("leading", 1), ("trailing", 0)])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_final_alpha_bar_first_matches_diffusers_without_alpha_to_one(spacing, offset, eta):
    """final_alpha_bar="first" lands the last step on alpha_bar_1, as diffusers' DDIM with
    set_alpha_to_one=False (final_alpha_cumprod = alphas_cumprod[0]; SD v1-5's config)."""
    T, S = 1000, 20
    s = NoiseSchedule.from_kind("scaled_linear", T, 0.00085, 0.012)
    ref = patch64(
        diffusers.DDIMScheduler(num_train_timesteps=T, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                clip_sample=False, set_alpha_to_one=False, timestep_spacing=spacing, steps_offset=offset),
        s,
    )  # fmt: skip
    ref.set_timesteps(S)
    ts = [k + 1 for k in ref.timesteps.tolist()]
    x_T = torch.randn(2, 4, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    ours = list(ddim_steps(toy_model, x_T, s, eta=eta, timesteps=ts, final_alpha_bar="first",
                           generator=torch.Generator().manual_seed(5)))  # fmt: skip
    g, x = torch.Generator().manual_seed(5), x_T
    for k, step in zip(ref.timesteps.tolist(), ours):
        noise = None if eta == 0 else torch.randn(x.shape, generator=g, dtype=x.dtype)  # the last step too: sigma > 0
        x = ref.step(toy_model(x, torch.full((2,), k + 1)), k, x, eta=eta, variance_noise=noise).prev_sample
        assert (step.x - x).abs().max() < 1e-10, f"t={step.t}: {(step.x - x).abs().max()}"
    assert ours[-1].t_prev == 1 and not torch.allclose(ours[-1].x, ours[-1].x0)


def test_ddim_final_alpha_bar_is_checked():
    s = NoiseSchedule.from_kind("linear", 10)
    with pytest.raises(ValueError, match="final_alpha_bar must be 'one' or 'first'"):
        run(ddim_steps(toy_model, torch.zeros(1, 2), s, num_steps=2, final_alpha_bar="zero"))


def test_visual_anagram_averages_upright_and_unflipped_predictions():
    flip = lambda x: x.flip(-2)  # noqa: E731
    up = lambda x, t: x * 2.0  # noqa: E731
    down = lambda x, t: x + t.reshape(-1, 1, 1, 1).to(x.dtype)  # noqa: E731
    from diffmodels.diffusion.samplers import visual_anagram

    x, t = torch.randn(2, 1, 4, 3), torch.tensor([3, 5])
    out = visual_anagram(up, down, flip)(x, t)
    expected = 0.5 * (2 * x + (x.flip(-2) + t.reshape(-1, 1, 1, 1)).flip(-2))
    assert torch.allclose(out, expected)
    # symmetric roles: swapping the conditions and viewing flipped gives the same function
    swapped = visual_anagram(down, up, flip)
    assert torch.allclose(flip(swapped(flip(x), t)), out)


# --------------------------------------------------------------------------------------------
# diffmodels.diffusion.sampling: the sample stage's recipes
# --------------------------------------------------------------------------------------------


def test_sample_batches_give_both_samplers_the_same_seeded_x_T():
    s = NoiseSchedule.from_kind("linear", 12)
    starts: dict[str, list[torch.Tensor]] = {"ddpm": [], "ddim": []}
    for kind in starts:
        def spy(x, t, kind=kind):
            if int(t[0]) == 12:  # the first call of each batch sees x_T
                starts[kind].append(x.clone())
            return toy_model(x, t)

        out = list(sample_batches(kind, spy, s, (3, 2, 2), num_images=5, batch_size=2, seed=9, device="cpu",
                                  prediction="eps", ddim_steps=4, ddim_eta=0.5))
        assert [len(z) for z in out] == [2, 2, 1]
        g = torch.Generator().manual_seed(9 + 1000 + 2)  # the sampler's own draws: seed + 1000 + i
        x_T = seeded_noise((2, 3, 2, 2), 9 + 2, "cpu")  # batch i = 2 starts from seed + i
        ref = run(ddpm_steps(toy_model, x_T, s, generator=g) if kind == "ddpm" else
                  ddim_steps(toy_model, x_T, s, num_steps=4, eta=0.5, generator=g))
        assert torch.equal(out[1], ref)
    for a, b, i in zip(starts["ddpm"], starts["ddim"], (0, 2, 4)):
        assert torch.equal(a, b) and torch.equal(a, seeded_noise((len(a), 3, 2, 2), 9 + i, "cpu"))


def test_why_iterate_path_spends_the_steps_a_full_run_spends_below_t():
    assert why_iterate_path(500, 10, 1000) == [500, 400, 300, 200, 100]
    assert why_iterate_path(800, 50, 1000) == list(range(800, 0, -20))
    assert why_iterate_path(3, 10, 1000) == [3], "at least one step"
