"""Training helpers: LR schedule, data order, resumable state, non-finite losses."""

import math

import pytest
import torch

from diffmodels.core.checkpoint import save_checkpoint
from diffmodels.core.device import select_device
from diffmodels.core.errors import CheckpointError, TrainingError
from diffmodels.training.optim import check_finite, make_scheduler, warmup_cosine
from diffmodels.training.precision import Precision
from diffmodels.training.state import EpochSampler, TrainState, resume


def test_warmup_then_cosine_to_zero():
    factors = [warmup_cosine(s, 4, 20) for s in range(21)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0 and factors[20] == pytest.approx(0.0, abs=1e-12)
    assert factors[12] == pytest.approx(0.5)  # half-way through the cosine
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))  # non-increasing after warm-up
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = make_scheduler(opt, 4, 20)
    lrs = []
    for _ in range(6):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.1 * f for f in factors[:6]])


def test_sampler_covers_each_epoch_and_resumes_in_order():
    sampler = EpochSampler(10, 3, seed=5)
    epoch0 = torch.cat([sampler.next_batch() for _ in range(3)])
    assert sorted(epoch0.tolist()) == sorted(set(epoch0.tolist())) and len(epoch0) == 9  # short batch dropped
    state = sampler.state_dict()
    ahead = [sampler.next_batch() for _ in range(5)]
    again = EpochSampler(10, 3, seed=5)
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(ahead, [again.next_batch() for _ in range(5)]))
    with pytest.raises(CheckpointError, match="another dataset size"):
        EpochSampler(11, 3, seed=5).load_state_dict(state)


def make_state(seed: int = 0) -> TrainState:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.SiLU(), torch.nn.Linear(8, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return TrainState(model, opt, make_scheduler(opt, 2, 20), EpochSampler(32, 4, seed),
                      torch.Generator().manual_seed(seed), extra={"history": []})


def train(state: TrainState, data: torch.Tensor, until: int) -> None:
    while state.step < until:
        x = data[state.sampler.next_batch()]
        x = x + 0.1 * torch.randn(x.shape, generator=state.generator)
        loss = (state.model(x) - x).pow(2).mean()
        state.optimizer.zero_grad()
        loss.backward()
        state.optimizer.step()
        state.scheduler.step()
        state.step += 1
        state.extra["history"].append(loss.item())


def test_k_steps_plus_resume_equal_n_steps_straight(tmp_path):
    data = torch.randn(32, 3, generator=torch.Generator().manual_seed(1))
    straight = make_state()
    train(straight, data, 15)

    first = make_state()
    train(first, data, 6)
    first.save(tmp_path / "ckpt.safetensors", "fp", {"arch": "mlp"})
    resumed = make_state(seed=0)
    assert resume(resumed, tmp_path / "ckpt.safetensors", "fp") == f"resumed from {tmp_path / 'ckpt.safetensors'} at step 6"
    train(resumed, data, 15)
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    assert resumed.extra["history"] == straight.extra["history"]
    assert resumed.scheduler.get_last_lr() == straight.scheduler.get_last_lr()


def test_resume_starts_fresh_on_other_inputs_missing_or_damaged_files(tmp_path):
    state = make_state()
    path = tmp_path / "ckpt.safetensors"
    assert "no checkpoint" in resume(state, path, "fp")
    state.step = 3
    state.save(path, "fp-old", {})
    fresh = make_state()
    assert "other params, data or code: starting fresh" in resume(fresh, path, "fp-new")
    assert fresh.step == 0
    path.write_bytes(path.read_bytes()[:100])
    assert "starting fresh" in resume(fresh, path, "fp-old") and fresh.step == 0
    save_checkpoint(path, {"model/0.weight": torch.zeros(1)}, {"kind": "train_state", "fingerprint": "fp"})
    with pytest.raises(CheckpointError, match="cannot restore training state"):
        resume(fresh, path, "fp")


def test_non_finite_loss_is_a_clear_error(tmp_path):
    with pytest.raises(TrainingError, match="non-finite recon at step 7; no checkpoint was written yet"):
        check_finite({"loss": torch.tensor(1.0), "recon": torch.tensor(math.nan)}, 7, tmp_path / "none")
    check_finite({"loss": torch.tensor(1.0)}, 7, None)


def test_cpu_precision_is_float32():
    precision = Precision.from_mode(select_device("cpu"), "auto")
    assert precision.name == "float32" and precision.scaler is None
    with precision.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
