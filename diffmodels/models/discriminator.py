"""Adversarial and frequency terms for VAE training (docs/maths.md#vae), as LDM trains its autoencoders.

PatchGAN discriminator (:class:`PatchDiscriminator`, Isola et al. 2017, pix2pix)
    conv 4x4 / stride 2 -> LeakyReLU(0.2), then ``layers - 1`` times conv 4x4 / stride 2 ->
    GroupNorm -> LeakyReLU, then conv 4x4 / stride 1 -> GroupNorm -> LeakyReLU, and a final
    conv 4x4 / stride 1 to one channel: a grid of real/fake logits, each judging one patch
    (receptive field 70 px for ``layers = 3``), so it scores local texture and sharpness, not
    global layout. Widths ``channels * min(2^i, 8)``. GroupNorm instead of the BatchNorm of
    taming-transformers: no batch statistics, so real and fake can share one forward pass and a
    resumed run is exact.

Hinge loss (:func:`hinge_d_loss`, :func:`generator_loss`)
    L_D = 1/2 (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)));   L_G = -mean D(x_hat).

Adaptive weight (:func:`adaptive_weight`, Esser et al. 2021, taming-transformers)
    lambda = ||grad_w L_rec|| / (||grad_w L_G|| + 1e-4), clamped to [0, 1e4], detached, where w is
    the decoder's last layer: the adversarial gradient reaching the output is scaled to the size
    of the reconstruction gradient there, whatever the loss scales. The generator loss is then
    L_rec + beta KL + disc_weight * lambda * L_G.

Frequency term (:func:`frequency_loss`)
    mean | |FFT2(x_hat)| - |FFT2(x)| | with orthonormal FFTs over each image channel: an L1 on
    the amplitude spectrum, which an L1 / MSE in pixel space under-weights at high frequencies
    (blur loses little pixel error but much high-frequency amplitude). No learned features.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffmodels.core.checkpoint import load_checkpoint, load_module_state
from diffmodels.core.errors import CheckpointError

ADAPTIVE_EPS = 1e-4
ADAPTIVE_MAX = 1e4


@dataclass(frozen=True)
class DiscriminatorConfig:
    in_channels: int
    channels: int  # width of the first conv
    layers: int  # stride-2 convs

    def __post_init__(self) -> None:
        if self.layers < 1 or self.channels < 1:
            raise ValueError(f"discriminator needs layers >= 1 and channels >= 1, got {self}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DiscriminatorConfig:
        return cls(**d)


def _groups(channels: int) -> int:
    """GroupNorm groups for a width: 8 where it divides it, else 1 (one group over all channels)."""
    return 8 if channels % 8 == 0 else 1


class PatchDiscriminator(nn.Module):
    """(B, C, H, W) images in [-1, 1] -> (B, 1, h, w) patch logits (real > 0 > fake once trained)."""

    def __init__(self, cfg: DiscriminatorConfig):
        super().__init__()
        self.config = cfg
        c = cfg.channels
        layers: list[nn.Module] = [nn.Conv2d(cfg.in_channels, c, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        for i in range(1, cfg.layers + 1):
            stride = 2 if i < cfg.layers else 1
            c_out = cfg.channels * min(2**i, 8)
            layers += [nn.Conv2d(c, c_out, 4, stride=stride, padding=1, bias=False),
                       nn.GroupNorm(_groups(c_out), c_out), nn.LeakyReLU(0.2)]
            c = c_out
        layers.append(nn.Conv2d(c, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():  # pix2pix initialisation: N(0, 0.02) convs, N(1, 0.02) norm scales
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.GroupNorm):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """1/2 (mean relu(1 - real) + mean relu(1 + fake)): zero once real >= 1 and fake <= -1."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """-mean D(x_hat): the generator raises the discriminator's score of its output."""
    return -logits_fake.mean()


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """lambda = ||d rec / d w|| / (||d g / d w|| + 1e-4), clamped to [0, 1e4], detached (w =
    ``last_layer``). Keeps both graphs (``retain_graph``) for the backward of the total loss."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = g_rec.norm() / (g_adv.norm() + ADAPTIVE_EPS)
    return weight.clamp(0.0, ADAPTIVE_MAX).detach()


def frequency_loss(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """mean | |FFT2(x_hat)| - |FFT2(x)| | over (B, C, H, W) frequencies, orthonormal FFT (float32)."""
    spec = lambda t: torch.fft.fft2(t.float(), norm="ortho").abs()  # noqa: E731
    return (spec(x_hat) - spec(x)).abs().mean()


def detached_call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` with its parameters detached: gradients reach ``x`` only (the generator's
    pass through the discriminator leaves the discriminator's gradients alone)."""
    params = {k: v.detach() for k, v in module.named_parameters()}
    return torch.func.functional_call(module, params, (x,))


def load_discriminator(path: str | Path) -> PatchDiscriminator:
    """The discriminator stored beside a VAE by :func:`diffmodels.models.vae.save_vae` (eval mode)."""
    from diffmodels.models.vae import DISCRIMINATOR_PREFIX

    ckpt = load_checkpoint(path)
    if "discriminator" not in ckpt.meta:
        raise CheckpointError(f"{path}: holds no discriminator (trained with vae.disc_weight 0)")
    model = PatchDiscriminator(DiscriminatorConfig.from_dict(ckpt.meta["discriminator"]))
    n = len(DISCRIMINATOR_PREFIX)
    load_module_state(model, {k[n:]: v for k, v in ckpt.tensors.items() if k.startswith(DISCRIMINATOR_PREFIX)}, path)
    return model.eval()


class Adversary:
    """A discriminator, its Adam optimizer and the two halves of a GAN step for VAE training.

    Per training step, once ``active`` (``step >= start``): :meth:`discriminator_step` trains D
    on the real batch and the detached reconstructions (one forward over both, hinge loss, one
    Adam step), then :meth:`generator_term` scores the reconstructions with the *updated* D,
    detached, so the VAE's backward reaches x_hat but not D. ``wrap`` puts D in DDP when several
    processes train (``World.wrap``); ``model`` stays the bare module (checkpoints, weights file).
    ``state_dict`` / ``load_state_dict`` make it one resumable part of the training state."""

    def __init__(self, cfg: DiscriminatorConfig, *, lr: float, start: int, weight: float,
                 device: torch.device | str = "cpu", wrap=lambda m: m):
        self.model = PatchDiscriminator(cfg).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr, betas=(0.5, 0.9))
        self.forward = wrap(self.model)
        self.start, self.weight = start, weight

    def active(self, step: int) -> bool:
        """Whether the GAN terms apply at the step after ``step`` completed ones."""
        return step >= self.start

    def discriminator_step(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        """One Adam step of D on real ``x`` and fake ``x_hat`` (detached); returns L_D before it."""
        logits = self.forward(torch.cat([x.float(), x_hat.detach().float()]))  # (2B, 1, h, w)
        real, fake = logits.chunk(2)
        loss = hinge_d_loss(real, fake)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def generator_term(self, x_hat: torch.Tensor, rec_loss: torch.Tensor,
                       last_layer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_G, disc_weight * lambda): the generator adds their product to its loss."""
        g_loss = generator_loss(detached_call(self.model, x_hat.float()))
        return g_loss, self.weight * adaptive_weight(rec_loss, g_loss, last_layer)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
