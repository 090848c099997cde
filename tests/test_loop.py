"""The training loop on a toy regression: resume equals a straight run, loss.tsv, hooks, --stop-after,
progress lines, MLflow metrics, and the code deps the resume fingerprint reads from dvc.yaml."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
from torch import nn

from diffmodels.core.checkpoint import load_checkpoint
from diffmodels.core.config import load_params
from diffmodels.core.errors import DiffmodelsError
from diffmodels.training.distributed import World
from diffmodels.training.ema import EMA
from diffmodels.training.loop import (
    Every,
    Finished,
    LoopSettings,
    Outputs,
    Trainer,
    write_table,
)
from diffmodels.training.precision import Precision
from diffmodels.training.state import EpochSampler, code_files
from tests.conftest import ROOT

STEPS = 9
X = torch.randn(32, 3, generator=torch.Generator().manual_seed(1))
Y = X @ torch.tensor([[0.5], [-1.0], [2.0]])


@pytest.fixture
def project(tmp_path):
    """A project whose dvc.yaml lists the toy stage's code (and a data dep, which is not code)."""
    (tmp_path / "toy.py").write_text("# the toy stage\n")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  toy:\n    cmd: python toy.py\n    deps:\n      - data\n      - toy.py\n")
    return tmp_path


class Toy:
    """A linear model trained through :class:`Trainer`, recording what the callbacks saw."""

    def __init__(self, project: Path, name: str, stop_after: int | None = None):
        torch.manual_seed(0)
        self.model = nn.Linear(3, 1)
        self.settings = LoopSettings(stage="toy", project=project, steps=STEPS, lr=0.05, weight_decay=0.0,
                                     warmup_steps=2, grad_clip=1.0, checkpoint_every=3, log_every=2,
                                     checkpoints=project / name / "ckpt", reports=project / name / "reports",
                                     losses=("loss", "abs"), stop_after=stop_after)
        self.trainer = Trainer(self.settings, World(), self.model, params=load_params(ROOT / "params.yaml"),
                               groups=("seed",), identity={"data": "toy"}, config={"arch": "linear"},
                               sampler=EpochSampler(len(X), 4, seed=0), generator=torch.Generator().manual_seed(0),
                               precision=Precision.from_mode(torch.device("cpu"), "off"), ema=EMA(self.model, 0.9))
        self.hook_steps: list[int] = []
        self.finished: Finished | None = None

    def loss_step(self, forward: nn.Module, rows: slice) -> dict[str, torch.Tensor]:
        idx = self.trainer.state.sampler.next_batch()[rows]
        x = X[idx] + 0.01 * torch.randn(X[idx].shape, generator=self.trainer.state.generator)
        error = forward(x) - Y[idx]
        return {"loss": error.pow(2).mean(), "abs": error.abs().mean()}

    def outputs(self, done: Finished) -> Outputs:
        self.finished = done
        return Outputs([], f"loss {done.tail_mean('loss', 3):.4f}")

    def fit(self) -> None:
        self.trainer.fit(self.loss_step, self.outputs, hooks=[Every(3, self.hook_steps.append)],
                         run_params={"toy.size": 4})


def test_k_steps_resume_and_the_rest_equal_a_straight_run(project, mlflow_store, capsys, monkeypatch):
    monkeypatch.setattr("diffmodels.core.progress.MIN_INTERVAL_S", 0.0)  # a line per step, however fast
    straight = Toy(project, "a")
    straight.fit()
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == "toy: no checkpoint: starting from step 0"
    assert out.splitlines()[-1].startswith("toy: 9 steps (0 resumed) on cpu float32, loss ")
    assert straight.hook_steps == [3, 6], "every 3 steps, not after the last (the outputs cover it)"
    assert not straight.settings.checkpoint.exists(), "finished: the checkpoint is removed"
    # not a terminal: one plain progress line per step here (9 steps: 5 % is less than one)
    lines = err.splitlines()
    assert [line.split(" step (")[0] for line in lines] == [f"toy: {i}/9" for i in range(1, 10)]
    assert lines[-1].startswith("toy: 9/9 step (100%") and "loss=" in lines[-1]

    # loss.tsv: a header, then one row per step, the step as an integer and %.6g values
    history = straight.finished.history
    rows = (project / "a/reports/loss.tsv").read_text().splitlines()
    assert rows[0] == "step\tloss\tabs\tlr\tgrad_norm"
    assert rows[1:] == ["\t".join([str(i + 1)] + [f"{v:.6g}" for v in h[1:]]) for i, h in enumerate(history)]
    assert [h[3] for h in history[:3]] == pytest.approx([0.025, 0.05, 0.05])  # warm-up, then the cosine

    # stopped after step 4 (between periodic checkpoints), then resumed to the end
    stopped = Toy(project, "b", stop_after=4)
    stopped.fit()
    assert "toy: stopped after step 4 as asked; rerun to resume" in capsys.readouterr().out
    assert load_checkpoint(stopped.settings.checkpoint).meta["step"] == 4
    assert stopped.finished is None and not (project / "b/reports/loss.tsv").exists()
    resumed = Toy(project, "b")
    resumed.fit()
    out, err = capsys.readouterr()
    assert f"toy: resumed from {resumed.settings.checkpoint} at step 4" in out
    assert err.splitlines()[0].startswith("toy: 5/9 step")
    assert resumed.hook_steps == [6] and resumed.finished.start_step == 4
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    ema_a, ema_b = straight.trainer.state.ema.state_dict(), resumed.trainer.state.ema.state_dict()
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    assert (project / "b/reports/loss.tsv").read_text() == (project / "a/reports/loss.tsv").read_text()

    # MLflow: step metrics every log_every steps, the loop's tags, loss.tsv as an artifact
    mlflow.set_tracking_uri(mlflow_store)
    runs = mlflow.search_runs(experiment_names=["diffmodels"], order_by=["attributes.start_time ASC"],
                              output_format="list")
    assert [r.data.tags["resumed_from_step"] for r in runs] == ["0", "0", "4"]
    client = mlflow.MlflowClient()
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "abs")] == [2, 4, 6, 8]
    assert runs[0].data.params["toy.size"] == "4" and "distributed.nproc_per_node" in runs[0].data.params
    assert {a.path for a in client.list_artifacts(runs[0].info.run_id)} == {"loss.tsv"}


def test_a_loss_step_with_other_losses_than_declared_is_a_bug(project, mlflow_store):
    toy = Toy(project, "c")
    with pytest.raises(ValueError, match=r"returned \('loss',\); LoopSettings.losses says \('loss', 'abs'\)"):
        toy.trainer.fit(lambda forward, rows: {"loss": forward(X[rows]).mean()}, toy.outputs)


def test_code_files_are_the_py_deps_of_the_stage_and_must_exist(project):
    assert code_files("toy", project) == [project / "toy.py"]
    (project / "toy.py").unlink()
    with pytest.raises(DiffmodelsError, match=r"dvc.yaml: stage toy lists missing code deps toy.py; fix its deps"):
        code_files("toy", project)
    with pytest.raises(DiffmodelsError, match="cannot read the deps of stage other"):
        code_files("other", project)


def test_the_training_stages_fingerprint_the_code_dvc_reruns_them_for():
    for stage in ("train_vae", "train_ddpm"):
        files = {str(f.relative_to(ROOT)) for f in code_files(stage, ROOT)}
        assert {f"stages/{stage}.py", "diffmodels/training/loop.py", "diffmodels/training/optim.py"} <= files


def test_write_table_formats_like_the_plots_expect(tmp_path):
    write_table(tmp_path / "t.tsv", ("step", "a", "b"), [[1.0, 0.123456789, 2e-9], [2, 3.0, float("nan")]])
    assert (tmp_path / "t.tsv").read_text() == "step\ta\tb\n1\t0.123457\t2e-09\n2\t3\tnan\n"
