import pytest
import torch
from torch import nn

from diffmodels.diffusion.objectives import diffusion_loss
from diffmodels.diffusion.schedule import NoiseSchedule
from diffmodels.models.unet import UNet, UNetConfig
from diffmodels.training.ema import EMA


def test_ema_update_formula():
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(0.0)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model)
    assert torch.allclose(ema.shadow["weight"], torch.full((1, 2), 0.9 * 1.0 + 0.1 * 3.0))
    ema.update(model)
    assert torch.allclose(ema.shadow["weight"], torch.full((1, 2), 0.9 * 1.2 + 0.1 * 3.0))
    target = nn.Linear(2, 1)
    ema.copy_to(target)
    assert torch.allclose(target.weight, torch.full((1, 2), 1.38))
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.0)


class Recorder(nn.Module):
    """Returns zeros and remembers what it was called with."""

    def forward(self, zt, t, labels):
        self.seen = (zt, t, labels)
        return torch.zeros_like(zt)


def test_loss_with_zero_output_is_the_target_power_and_is_seeded():
    s = NoiseSchedule.from_kind("linear", 1000)
    z0 = torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    model = Recorder()
    loss_eps = diffusion_loss(model, s, z0, None, torch.Generator().manual_seed(1))
    assert loss_eps.item() == pytest.approx(1.0, rel=0.05), "E[eps^2] = 1"
    again = diffusion_loss(model, s, z0, None, torch.Generator().manual_seed(1))
    assert loss_eps == again
    t = model.seen[1]
    assert t.min() >= 1 and t.max() <= 1000
    loss_x0 = diffusion_loss(model, s, z0, None, torch.Generator().manual_seed(1), prediction="x0")
    assert loss_x0.item() == pytest.approx(z0.pow(2).mean().item(), rel=1e-6)


def test_label_dropout_uses_the_null_label():
    s = NoiseSchedule.from_kind("linear", 100)
    model = Recorder()
    labels = torch.zeros(1000, dtype=torch.long)
    diffusion_loss(model, s, torch.randn(1000, 1, 2, 2), labels, torch.Generator().manual_seed(0),
                   cond_dropout=0.3, null_label=7)
    dropped = (model.seen[2] == 7).float().mean().item()
    assert dropped == pytest.approx(0.3, abs=0.05)
    assert set(model.seen[2].tolist()) == {0, 7}


def test_a_tiny_unet_overfits_a_tiny_latent_set():
    torch.manual_seed(0)
    cfg = UNetConfig(in_channels=2, latent_size=4, base_channels=16, channel_mult=(1, 2), blocks_per_level=1,
                     mixer="serpentine", mixer_downsample=(1, 2), num_classes=0, norm_groups=4)
    model = UNet(cfg)
    s = NoiseSchedule.from_kind("linear", 100)
    z0 = torch.randn(8, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(250):
        loss = diffusion_loss(model, s, z0, None, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < first / 2.5, (first, last)
