import os
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from diffmodels.core import tracking
from diffmodels.core.config import parse_params
from diffmodels.core.errors import TrackingError
from tests.conftest import ROOT, params_with


def test_project_root_from_queued_experiment_copy(tmp_path, monkeypatch):
    monkeypatch.delenv("DVC_ROOT", raising=False)
    (tmp_path / ".dvc").mkdir()
    exp_copy = tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc123"
    (exp_copy / ".dvc").mkdir(parents=True)
    assert tracking.project_root(exp_copy) == tmp_path
    (tmp_path / "sub").mkdir()
    assert tracking.project_root(tmp_path / "sub") == tmp_path
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "main"))
    assert tracking.project_root() == tmp_path / "main"


def test_default_store_is_sqlite_at_project_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri(tmp_path) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example.invalid:5000")
    assert tracking.tracking_uri(tmp_path) == "http://example.invalid:5000"


def test_stage_run_records_tags_params_and_artifacts(mlflow_store, tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "lucky-lark")
    monkeypatch.setenv("DIFFMODELS_PIPELINE_ID", "pipe123")
    params = parse_params(params_with({"data.resolution": 32}))
    (tmp_path / "note.txt").write_text("hello")
    with tracking.stage_run("prepare", params, ("seed", "data")) as run:
        mlflow.log_metrics({"loss": 0.5}, step=3)
        mlflow.log_artifact(str(tmp_path / "note.txt"))
    stored = mlflow.get_run(run.info.run_id)
    assert stored.info.status == "FINISHED"
    tags = stored.data.tags
    assert tags["stage"] == "prepare" and tags["mlflow.runName"] == "prepare"
    assert tags["dvc_exp_name"] == "lucky-lark" and tags["pipeline_id"] == "pipe123"
    assert "git_commit" in tags and tags["mlflow.source.git.commit"] == tags["git_commit"]
    # what the seed's determinism depends on
    assert tags["determinism.torch"] == torch.__version__
    assert tags["determinism.threads"] == str(torch.get_num_threads())
    assert tags["determinism.cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert tags["determinism.accelerator"] == ("none" if not torch.cuda.is_available() else tags["determinism.accelerator"])
    assert tags["determinism.deterministic_algorithms"] in ("true", "false")
    assert stored.data.params["data.resolution"] == "32"
    assert stored.data.params["seed"] == str(params.seed)
    assert not any(k.startswith(("tracking.", "vae.")) for k in stored.data.params)
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(3, 0.5)]
    # Artifacts go beside the database, not into ./mlruns.
    artifact_dir = Path(mlflow.get_experiment(stored.info.experiment_id).artifact_location.removeprefix("file://"))
    assert artifact_dir == tmp_path / "mlartifacts"
    assert list(artifact_dir.rglob("note.txt")), "artifact stored under mlartifacts/"
    assert not (Path.cwd() / "mlruns").exists()


def test_exception_marks_run_failed(mlflow_store):
    params = parse_params(params_with())
    with pytest.raises(RuntimeError):
        with tracking.stage_run("prepare", params, ("data",)) as run:
            raise RuntimeError("boom")
    assert mlflow.get_run(run.info.run_id).info.status == "FAILED"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    params = parse_params(params_with())
    with pytest.raises(TrackingError, match="cannot reach the MLflow server"):
        with tracking.stage_run("prepare", params, ("data",)):
            pass


@pytest.mark.parametrize("uri, message", [("file:///tmp/mlruns", "plain file store"), ("./mlruns", "plain file store")])
def test_file_store_is_refused(monkeypatch, uri, message):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(TrackingError, match=message):
        with tracking.stage_run("prepare", parse_params(params_with()), ("data",)):
            pass


def test_unwritable_sqlite_location(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'missing' / 'mlflow.db'}")
    with pytest.raises(TrackingError, match="missing or read-only"):
        with tracking.stage_run("prepare", parse_params(params_with()), ("data",)):
            pass


def test_pipeline_id_is_shared_by_the_children_of_one_dvc_process(tmp_path, monkeypatch):
    """Stages launched by one `dvc` process share an id; another launch gets another id."""
    monkeypatch.delenv("DIFFMODELS_PIPELINE_ID", raising=False)
    fake_dvc = tmp_path / "dvc"
    probe = f"{sys.executable} -c 'from diffmodels.core.tracking import pipeline_id; print(pipeline_id())'"
    fake_dvc.write_text(f"#!/bin/sh\n{probe}\n{probe}\n")
    fake_dvc.chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.run([str(fake_dvc)], capture_output=True, text=True, env=env, check=True).stdout.split()
    second = subprocess.run([str(fake_dvc)], capture_output=True, text=True, env=env, check=True).stdout.split()
    assert len(first) == 2 and first[0] == first[1]
    assert second[0] == second[1] and second[0] != first[0]


def test_metric_values_is_one_rule_for_every_stage():
    """Finite numbers only, nested keys dotted, '/' -> '.'; bools, None, strings, NaN stay out."""
    metrics = {"psnr": 25, "sub": {"a/b": 0.5, "flag": True, "nan": float("nan"), "inf": float("inf")},
               "name": "x", "none": None, "ok": False}
    assert tracking.metric_values(metrics) == {"psnr": 25.0, "sub.a.b": 0.5}
    assert tracking.metric_values({}) == {}


def test_experiment_opens_on_runs_in_the_mlflow_ui(mlflow_store):
    """MLflow 3's UI shows a GenAI traces overview unless the experiment says it is model training;
    an experiment made before (or by hand) gets the tag on the next stage run."""
    params = parse_params(params_with())
    with tracking.stage_run("prepare", params, ("data",)) as run:
        pass
    experiment = mlflow.get_experiment(run.info.experiment_id)
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    other = parse_params(params_with({"tracking.experiment": "made-by-hand"}))
    eid = mlflow.create_experiment("made-by-hand")
    assert tracking.EXPERIMENT_KIND_TAG not in mlflow.get_experiment(eid).tags
    with tracking.stage_run("prepare", other, ("data",)) as run:
        pass
    assert run.info.experiment_id == eid
    assert mlflow.get_experiment(eid).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_child_run_nests_under_the_stage_run(mlflow_store):
    params = parse_params(params_with())
    with tracking.stage_run("eval_inpaint", params, ("data",)) as parent:
        with tracking.child_run("clamp", tags={"method": "clamp", "stage": "eval_inpaint/clamp"}) as child:
            tracking.log_metrics({"fid": 12.5})
        assert mlflow.active_run().info.run_id == parent.info.run_id, "the stage's run is active again"
        tracking.log_metrics({"seconds": 3.0})
        with pytest.raises(ValueError):
            with tracking.child_run("repaint") as failing:
                raise ValueError("boom")
    stored = mlflow.get_run(child.info.run_id)
    assert stored.info.status == "FINISHED" and stored.info.run_name == "clamp"
    assert stored.info.experiment_id == parent.info.experiment_id
    tags = stored.data.tags
    assert tags["mlflow.parentRunId"] == parent.info.run_id
    assert tags["method"] == "clamp" and tags["stage"] == "eval_inpaint/clamp"
    assert tags["pipeline_id"] == mlflow.get_run(parent.info.run_id).data.tags["pipeline_id"]
    assert stored.data.metrics == {"fid": 12.5}
    assert mlflow.get_run(parent.info.run_id).data.metrics == {"seconds": 3.0}
    assert mlflow.get_run(failing.info.run_id).info.status == "FAILED"
    assert mlflow.get_run(failing.info.run_id).data.tags["stage"] == "eval_inpaint"  # inherited
    assert mlflow.get_run(parent.info.run_id).info.status == "FINISHED"
    with pytest.raises(TrackingError, match="needs an active stage run"):
        with tracking.child_run("orphan"):
            pass


def test_stage_failure_inside_a_child_run_fails_both(mlflow_store):
    params = parse_params(params_with())
    with pytest.raises(RuntimeError):
        with tracking.stage_run("eval_inpaint", params, ("data",)) as parent:
            with tracking.child_run("clamp") as child:
                raise RuntimeError("boom")
    assert mlflow.active_run() is None
    assert mlflow.get_run(child.info.run_id).info.status == "FAILED"
    assert mlflow.get_run(parent.info.run_id).info.status == "FAILED"
