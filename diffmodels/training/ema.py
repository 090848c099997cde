"""Exponential moving average of a model's weights, kept in float32 (sampling uses the average)."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class EMA:
    """Exponential moving average of a model's parameters: theta_ema <- d theta_ema + (1 - d) theta.

    Kept in float32 whatever the training precision; buffers (none in our models' normalisation
    layers, but any running statistics) are copied, not averaged.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
        self._params = {name for name, _ in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, value in model.state_dict().items():
            if name in self._params:
                self.shadow[name].lerp_(value.float(), 1.0 - self.decay)  # d * ema + (1 - d) * value
            else:
                self.shadow[name].copy_(value)

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:3]}")
        for name in self.shadow:
            self.shadow[name].copy_(state[name])

    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model`` (e.g. a copy used for sampling)."""
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in self.shadow.items()})

    def averaged(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` holding the averaged weights, in eval mode (for sampling); ``model``
        itself is left as it is."""
        copied = copy.deepcopy(model)
        self.copy_to(copied)
        return copied.eval()
