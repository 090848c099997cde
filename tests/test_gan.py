"""GAN and frequency terms of VAE training: hinge loss, adaptive weight, FFT amplitudes, the
discriminator's shapes, detached scoring and its resumable state, all with known answers."""

import copy

import pytest
import torch

from diffmodels.models.discriminator import (
    ADAPTIVE_MAX,
    Adversary,
    DiscriminatorConfig,
    PatchDiscriminator,
    adaptive_weight,
    detached_call,
    frequency_loss,
    generator_loss,
    hinge_d_loss,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_hinge_loss_known_values():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - real) = 0, 0.5, 2    -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 1.5])  # relu(1 + fake) = 0, 1, 2.5    -> mean 7/6
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 7 / 6), abs=1e-7)  # = 1
    # saturated: a confident, correct discriminator has zero loss, whatever the margin beyond 1
    assert hinge_d_loss(torch.full((4,), 3.0), torch.full((4,), -7.0)).item() == 0.0
    assert generator_loss(fake).item() == pytest.approx(-(-2.0 + 0.0 + 1.5) / 3, abs=1e-7)


def test_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_last_layer():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    rec = (w * torch.tensor([3.0, 4.0])).sum()  # d rec / dw = (3, 4): norm 5
    g = (w * torch.tensor([6.0, 8.0])).sum() ** 1  # d g / dw = (6, 8): norm 10
    lam = adaptive_weight(rec, g, w)
    assert lam.item() == pytest.approx(5.0 / (10.0 + 1e-4), rel=1e-6)
    assert not lam.requires_grad  # a constant factor for the backward of the total loss
    (rec + lam * g).backward()  # the graphs were kept
    torch.testing.assert_close(w.grad, torch.tensor([3.0, 4.0]) + lam * torch.tensor([6.0, 8.0]))


def test_adaptive_weight_is_clamped_when_the_adversarial_gradient_vanishes():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    rec = (w * torch.tensor([3.0, 4.0])).sum()
    g = (w * 0.0).sum()  # zero gradient: 5 / 1e-4 = 5e4 -> clamped
    assert adaptive_weight(rec, g, w).item() == ADAPTIVE_MAX


def test_frequency_loss_known_values_and_shift_invariance():
    # orthonormal 2x2 FFT of ones: DC = 4 / sqrt(4) = 2, the other three 0; of zeros: all 0
    assert frequency_loss(torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)).item() == pytest.approx(2.0 / 4)
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    shifted = x.roll((3, 5), dims=(2, 3))  # a circular shift changes phases only
    assert frequency_loss(x, shifted).item() < 1e-6 < (x - shifted).abs().mean().item()
    blurred = (x + x.roll(1, 3)) / 2  # a blur lowers the high-frequency amplitudes
    assert frequency_loss(x, blurred).item() > 1e-2


@pytest.mark.parametrize("layers,size,out", [(3, 64, 6), (2, 16, 2), (1, 16, 6)])
def test_patch_discriminator_shapes(layers, size, out):
    # 4x4 convs with padding 1: stride 2 halves the side, stride 1 takes one off (twice at the end)
    d = PatchDiscriminator(DiscriminatorConfig(1, 4, layers))
    assert d(torch.zeros(2, 1, size, size)).shape == (2, 1, out, out)


def test_detached_call_passes_gradients_to_the_input_only():
    torch.manual_seed(0)
    d = PatchDiscriminator(DiscriminatorConfig(1, 4, 2))
    x = torch.randn(2, 1, 16, 16, requires_grad=True)
    y = detached_call(d, x)
    torch.testing.assert_close(y, d(x))
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in d.parameters())


def test_discriminator_step_lowers_its_loss_and_its_state_round_trips():
    torch.manual_seed(0)
    cfg = DiscriminatorConfig(1, 4, 2)
    adv = Adversary(cfg, lr=1e-2, start=3, weight=0.5)
    assert not adv.active(2) and adv.active(3)
    real = torch.rand(4, 1, 16, 16) * 0.2 + 0.7  # bright
    fake = torch.rand(4, 1, 16, 16) * 0.2 - 0.9  # dark: easy to tell apart
    losses = [adv.discriminator_step(real, fake).item() for _ in range(20)]
    assert 0.5 < losses[0] < 1.5  # |logits| < 1 at first: L_D = 1 - (mean real - mean fake) / 2
    assert losses[-1] < 0.5 * losses[0]
    other = Adversary(cfg, lr=1e-2, start=3, weight=0.5)
    other.load_state_dict(copy.deepcopy(adv.state_dict()))  # as from a file: no shared moment tensors
    a, b = adv.discriminator_step(real, fake), other.discriminator_step(real, fake)  # same Adam moments
    assert a.item() == b.item()
    for p, q in zip(adv.model.parameters(), other.model.parameters()):
        assert torch.equal(p, q)


def test_generator_term_pushes_the_fake_towards_real():
    torch.manual_seed(0)
    adv = Adversary(DiscriminatorConfig(1, 4, 2), lr=1e-2, start=0, weight=2.0)
    real, fake = torch.full((4, 1, 16, 16), 0.8), torch.full((4, 1, 16, 16), -0.8)
    for _ in range(30):
        adv.discriminator_step(real, fake)
    w = torch.zeros(1, requires_grad=True)  # stand-in "last layer": x_hat = fake + w
    x_hat = fake + w
    rec = (x_hat - real).abs().mean()
    g_loss, weight = adv.generator_term(x_hat, rec, w)
    g_rec = torch.autograd.grad(rec, w, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g_loss, w, retain_graph=True)[0]
    assert weight.item() == pytest.approx(2.0 * g_rec.norm().item() / (g_adv.norm().item() + 1e-4), rel=1e-5)
    assert g_adv.item() < 0  # raising the fake (towards the bright real images) lowers L_G
