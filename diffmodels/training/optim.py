"""One optimisation step (backward, clip, step), the warmup-cosine LR schedule and the finite-loss guard."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from diffmodels.core.errors import TrainingError


def backward_and_step(
    loss: torch.Tensor,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    grad_clip: float,
    scaler: torch.amp.GradScaler | None,
) -> float:
    """Backward, unscale (fp16), clip the global grad norm, step optimizer and schedule.

    Returns the gradient norm before clipping.
    """
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    return float(grad_norm)


def check_finite(losses: dict[str, torch.Tensor], step: int, checkpoint: Path | None) -> None:
    """Stop with :class:`TrainingError` on a NaN/inf loss; the last good checkpoint stays."""
    bad = [k for k, v in losses.items() if not torch.isfinite(v).all()]
    if bad:
        if checkpoint and checkpoint.exists():
            kept = f"the last good checkpoint is kept at {checkpoint}"
        else:
            kept = "no checkpoint was written yet"
        raise TrainingError(
            f"non-finite {', '.join(bad)} at step {step}; {kept}. Lower the learning rate or disable amp"
        )


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier for the update after ``step`` updates: linear 1/w .. 1, then cosine to 0.

    ``warmup_cosine(s) = (s + 1) / w`` for ``s < w``; afterwards
    ``0.5 (1 + cos(pi (s - w) / (total - w)))``, reaching 0 at ``s = total``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, warmup_steps, total_steps))
