"""Faults during a run: SIGKILL, SIGTERM, Ctrl-C, a disk that fills mid-save, and
several processes writing one MLflow store at once."""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from diffmodels.core import checkpoint as checkpoint_module
from diffmodels.core import interrupt, tracking
from diffmodels.core.checkpoint import load_checkpoint, save_checkpoint
from diffmodels.core.errors import CheckpointError, TrackingError
from stages import train_ddpm, train_vae
from tests.conftest import single_thread
from tests.fault_support import (
    ddpm_args,
    shared_store,
    stage_command,
    stage_env,
    tiny_workdir,
)
from tests.vae_support import ROOT, tiny_params, tiny_prepared

CKPT = "ckpt/last.safetensors"


@pytest.fixture(autouse=True)
def default_signal_handlers():
    """Every test here starts from Python's default SIGINT / SIGTERM handlers, as a stage process
    does: the stop helpers leave a handler that is not the default alone (an ignored signal stays
    ignored), so a handler left by anything that ran earlier in this pytest process would change
    what these tests see. Restored afterwards."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    for signum, handler in previous.items():
        signal.signal(signum, handler)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    yield from shared_store(tmp_path_factory)


@pytest.fixture(scope="module")
def work(tmp_path_factory, store):
    """Inputs of train_ddpm plus an uninterrupted run of it: the reference weights."""
    root = tiny_workdir(tmp_path_factory.mktemp("faults"))
    with single_thread():
        train_ddpm.main(ddpm_args(root, root / "straight"))
    return root


def after_progress(err: str) -> str:
    """stderr without the training loop's progress lines (``train_ddpm: 12/30 step (40%, ...)``,
    printed when stderr is not a terminal), which must all come first."""
    lines = err.splitlines(keepends=True)
    progress = [line for line in lines if re.match(r"train_\w+: \d+/\d+ step \(", line)]
    assert lines[:len(progress)] == progress, err
    return "".join(lines[len(progress):])


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_checkpoint(a).tensors, load_checkpoint(b).tensors
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def runs_of(stage: str, uri: str) -> list:
    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=["diffmodels"], filter_string=f"tags.stage = '{stage}'",
                              order_by=["attributes.start_time DESC"], output_format="list")


# --------------------------------------------------------------------------------------------
# SIGKILL: nothing can be caught; atomic writes and resume must carry the run
# --------------------------------------------------------------------------------------------


class Watcher:
    """Polls a stage subprocess; loads every new version of its checkpoint and out as it appears
    (each os.replace makes a new inode), so a half-written file would be seen."""

    def __init__(self, out: Path):
        self.ckpt, self.weights = out / CKPT, out / "ddpm.safetensors"
        self.seen: dict[Path, int] = {}
        self.steps: list[int] = []

    def check(self) -> None:
        for path in (self.ckpt, self.weights):
            try:
                inode = path.stat().st_ino
            except FileNotFoundError:
                continue
            if self.seen.get(path) != inode:
                self.seen[path] = inode
                ckpt = load_checkpoint(path)  # raises on a truncated or damaged file
                if path == self.ckpt:
                    self.steps.append(ckpt.meta["step"])

    def run_until(self, proc: subprocess.Popen, condition, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check()
            if condition():
                return
            assert proc.poll() is None, f"the stage ended (exit {proc.returncode}) before the kill: {proc.stderr.read()}"
            time.sleep(0.005)
        raise AssertionError("timed out waiting for the stage")


def test_sigkill_twice_then_resume_gives_the_uninterrupted_weights(work, store, tmp_path, capsys):
    out = tmp_path / "killed"
    watcher = Watcher(out)
    cmd = stage_command("train_ddpm", ddpm_args(work, out))

    # kill 1: mid-training, as soon as the step-10 checkpoint lands
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=stage_env(store), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watcher.run_until(proc, lambda: watcher.steps)
    proc.kill()
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert load_checkpoint(out / CKPT).meta["step"] in (10, 20)
    assert not (out / "ddpm.safetensors").exists()

    # kill 2: resumed, then killed while it writes its outs (the weights are there, the rest is not)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=stage_env(store), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watcher.run_until(proc, lambda: (out / "ddpm.safetensors").exists())
    proc.kill()
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert "train_ddpm: resumed from" in proc.stdout.read()
    assert load_checkpoint(out / CKPT).meta["step"] == 30, "the checkpoint outlives a kill during the outs"
    watcher.check()
    assert set(watcher.steps) <= {10, 20, 30} and watcher.steps == sorted(watcher.steps)

    # a save killed mid-write leaves a temporary file; the next run clears it
    (out / "ckpt/.last.safetensors.k1ll3d.tmp").write_bytes(b"half a checkpoint")
    with single_thread():
        train_ddpm.main(ddpm_args(work, out))
    assert "resumed from" in capsys.readouterr().out
    assert same_weights(out / "ddpm.safetensors", work / "straight/ddpm.safetensors")
    assert (out / "reports/loss.tsv").read_text() == (work / "straight/reports/loss.tsv").read_text()
    assert list((out / "ckpt").iterdir()) == [], "finished: no checkpoint, no temporary files"


# --------------------------------------------------------------------------------------------
# SIGTERM and Ctrl-C: checkpoint at the end of the step, run KILLED, exit 128 + signal
# --------------------------------------------------------------------------------------------


def signal_at_call(monkeypatch, module, name: str, call: int, signum: int) -> None:
    """Make the ``call``-th call of ``module.name`` (a loss function: once per step) send ``signum``
    to this process first, as ``kill`` or Ctrl-C would mid-step."""
    real, calls = getattr(module, name), []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


def test_sigterm_saves_the_step_marks_the_run_killed_and_resumes_exactly(work, store, tmp_path, monkeypatch, capsys, one_thread):
    out = tmp_path / "term"
    signal_at_call(monkeypatch, train_ddpm, "diffusion_loss", 13, signal.SIGTERM)
    with pytest.raises(SystemExit) as exit_info:
        train_ddpm.main(ddpm_args(work, out))
    assert exit_info.value.code == 143
    assert after_progress(capsys.readouterr().err) == (
        f"interrupted by SIGTERM at step 13: checkpoint saved to {out / CKPT}; rerun the stage to resume\n"
    )
    assert load_checkpoint(out / CKPT).meta["step"] == 13, "the step in flight finished, then was saved"
    assert not (out / "ddpm.safetensors").exists() and not (out / "reports").exists()
    run = runs_of("train_ddpm", store)[0]
    assert run.info.status == "KILLED"
    assert run.data.tags["interrupted"].startswith("interrupted by SIGTERM at step 13")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "handlers restored"

    monkeypatch.undo()
    train_ddpm.main(ddpm_args(work, out))
    assert f"resumed from {out / CKPT} at step 13" in capsys.readouterr().out
    assert same_weights(out / "ddpm.safetensors", work / "straight/ddpm.safetensors")
    assert runs_of("train_ddpm", store)[0].info.status == "FINISHED"


def test_ctrl_c_in_train_vae_saves_and_resumes(tmp_path, store, monkeypatch, capsys, one_thread):
    tiny_prepared(tmp_path / "prepared")
    params = tiny_params(tmp_path / "params.yaml", vae={"steps": 8, "val_every": 100})
    args = ["--params", str(params), "--prepared", str(tmp_path / "prepared"), "--out", str(tmp_path / "vae.safetensors"),
            "--reports", str(tmp_path / "reports"), "--checkpoints", str(tmp_path / "ckpt")]
    signal_at_call(monkeypatch, train_vae, "vae_loss", 6, signal.SIGINT)
    with pytest.raises(SystemExit) as exit_info:
        train_vae.main(args)
    assert exit_info.value.code == 130
    err = capsys.readouterr().err.split("\r")[-1].splitlines()[-1]  # after train_vae's progress bar
    assert err == f"interrupted by SIGINT at step 6: checkpoint saved to {tmp_path / CKPT}; rerun the stage to resume"
    assert load_checkpoint(tmp_path / CKPT).meta["step"] == 6
    assert not (tmp_path / "vae.safetensors").exists()
    assert runs_of("train_vae", store)[0].info.status == "KILLED"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    monkeypatch.undo()
    train_vae.main(args)
    assert f"resumed from {tmp_path / CKPT} at step 6" in capsys.readouterr().out
    assert json.loads((tmp_path / "reports/metrics.json").read_text())["resumed_from_step"] == 6


def test_stop_at_step_end_semantics():
    saved = []
    stop = interrupt.StopAtStepEnd(lambda: saved.append(1) or "at step 1: saved")
    with pytest.raises(interrupt.Interrupted) as info:
        with stop:
            os.kill(os.getpid(), signal.SIGTERM)  # only noted ...
            assert saved == [] and stop.signum == signal.SIGTERM
            stop.step_done()  # ... acted on at the step boundary
    assert saved == [1] and info.value.exit_code == 143 and str(info.value) == "interrupted by SIGTERM at step 1: saved"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

    # a second signal stops at once, without waiting for the step
    with pytest.raises(interrupt.Interrupted, match="SIGINT again: stopped at once"):
        with interrupt.StopAtStepEnd(lambda: "unused"):
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    # after loop_done() the final phase stops at once; an ignored signal stays ignored
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with interrupt.signals_raise(), interrupt.StopAtStepEnd(lambda: "unused") as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            stop.loop_done()
    finally:
        signal.signal(signal.SIGTERM, previous)
    with pytest.raises(interrupt.Interrupted, match="interrupted by SIGTERM$"):
        with interrupt.signals_raise(), interrupt.StopAtStepEnd(lambda: "unused") as stop:
            stop.loop_done()
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # never reached in full: the handler raises
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_sigterm_outside_a_training_loop_marks_the_run_killed(store, tmp_path, capsys):
    from diffmodels.core.config import load_params
    from stages._cli import base_parser, stage_main

    def stage(args):
        with tracking.stage_run("sleepy", load_params(ROOT / "params.yaml"), ("seed",)):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)

    with pytest.raises(SystemExit) as exit_info:
        stage_main(stage, base_parser("test"))([])
    assert exit_info.value.code == 143 and capsys.readouterr().err == "interrupted by SIGTERM\n"
    assert runs_of("sleepy", store)[0].info.status == "KILLED"


# --------------------------------------------------------------------------------------------
# A write that fails mid-save
# --------------------------------------------------------------------------------------------


def test_file_size_limit_mid_save_keeps_the_previous_checkpoint(tmp_path):
    """A real failing write: RLIMIT_FSIZE makes the kernel refuse bytes past 64 KiB (EFBIG), as a
    full disk refuses them (ENOSPC). Python ignores SIGXFSZ, so the write returns the error."""
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, {"w": torch.ones(1000)}, {"step": 1})
    before = path.read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        with pytest.raises(CheckpointError) as info:
            save_checkpoint(path, {"w": torch.ones(100_000)}, {"step": 2})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert str(info.value) == (
        f"{path}: cannot write (I/O error: File too large (os error 27)); the previous file, if any, "
        "is unchanged. Free disk space or fix permissions, then rerun"
    )
    assert path.read_bytes() == before and load_checkpoint(path).meta["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.safetensors"], "no temporary file left"


def test_disk_full_during_a_training_checkpoint(work, store, tmp_path, monkeypatch, capsys, one_thread):
    """The second checkpoint write runs out of space half-way: the stage stops with one line and the
    step-10 checkpoint is intact (resuming from it is the SIGKILL and SIGTERM tests' business)."""
    out = tmp_path / "full"
    real, calls = checkpoint_module.save_file, []

    def half_then_enospc(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            real(tensors, filename, metadata=metadata)
            data = Path(filename).read_bytes()
            Path(filename).write_bytes(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint_module, "save_file", half_then_enospc)
    with pytest.raises(SystemExit) as exit_info:
        train_ddpm.main(ddpm_args(work, out))
    assert exit_info.value.code == 2
    assert after_progress(capsys.readouterr().err) == (
        f"error: {out / CKPT}: cannot write (No space left on device); the previous file, if any, is unchanged. "
        "Free disk space or fix permissions, then rerun\n"
    )
    assert load_checkpoint(out / CKPT).meta["step"] == 10
    assert [p.name for p in (out / "ckpt").iterdir()] == ["last.safetensors"]
    assert runs_of("train_ddpm", store)[0].info.status == "FAILED"
    assert not (out / "ddpm.safetensors").exists()


# --------------------------------------------------------------------------------------------
# Concurrent MLflow writers (dvc queue start -j N)
# --------------------------------------------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from diffmodels.core import tracking
    from diffmodels.core.config import load_params

    name, go = sys.argv[1], Path(sys.argv[2])
    params = load_params(sys.argv[3])
    Path(name + ".ready").touch()
    while not go.exists():  # imports done everywhere: open the store together
        time.sleep(0.005)
    with tracking.stage_run(name, params, ("seed", "ddpm")):
        for step in range(1, 11):
            tracking.log_metrics({"loss": 1.0 / step, "lr": 0.1}, step=step)
        tracking.set_tags({"complete": "yes"})
    """
)


def test_concurrent_writers_on_a_fresh_store_all_land(tmp_path):
    """Three processes open a *new* sqlite store at once and log 10 steps each. Without the init lock,
    of 4 such processes 3 died here in MLflow's schema migrations ("table alembic_version already
    exists", "duplicate column name: step")."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    go = tmp_path / "go"
    names = [f"writer{i}" for i in range(3)]
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, name, str(go), str(ROOT / "params.yaml")], cwd=tmp_path,
                              env=stage_env(uri), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in names]
    deadline = time.monotonic() + 240
    while not all((tmp_path / f"{name}.ready").exists() for name in names) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()
    for proc in procs:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["diffmodels"], output_format="list")
    assert sorted(r.data.tags["stage"] for r in runs) == names
    client = mlflow.MlflowClient(uri)
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.tags["complete"] == "yes"
        assert run.data.params["ddpm.batch_size"] == str(yaml.safe_load((ROOT / "params.yaml").read_text())["ddpm"]["batch_size"])
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, 11))


def test_locked_database_is_retried_with_backoff_then_one_line():
    from mlflow.exceptions import MlflowException

    waits, attempts = [], []

    def flaky(x):
        attempts.append(x)
        if len(attempts) < 3:
            raise MlflowException("(sqlite3.OperationalError) database is locked")
        return x * 2

    assert tracking.retry_when_locked(flaky, sleep=waits.append)(21) == 42
    assert len(attempts) == 3 and len(waits) == 2
    assert 0.125 <= waits[0] <= 0.375 and 0.25 <= waits[1] <= 0.75, "0.25 s doubling, +-50 % jitter"

    def always_locked():
        raise MlflowException("database is locked")

    with pytest.raises(TrackingError, match=r"^MLflow store still locked after 4 attempts \(always_locked\)"):
        tracking.retry_when_locked(always_locked, attempts=4, sleep=waits.append)()

    def other_error():
        raise MlflowException("RESOURCE_DOES_NOT_EXIST")

    with pytest.raises(MlflowException, match="RESOURCE_DOES_NOT_EXIST"):
        tracking.retry_when_locked(other_error, sleep=waits.append)()


def test_stage_writes_retry_while_the_store_is_locked(store, tmp_path, monkeypatch):
    """Every write a stage makes through tracking (start, params, metrics, tags, artifacts, end)
    survives "database is locked" on its first attempt, and lands once."""
    from mlflow.exceptions import MlflowException

    from diffmodels.core.config import load_params

    failed = []

    def locked_once(fn, name):
        def flaky(*args, **kwargs):
            if name not in failed:
                failed.append(name)
                raise MlflowException("(sqlite3.OperationalError) database is locked")
            return fn(*args, **kwargs)
        return flaky

    for name in ("start_run", "log_params", "log_metrics", "set_tags", "log_artifact"):
        monkeypatch.setattr(mlflow, name, locked_once(getattr(mlflow, name), name))
    monkeypatch.setattr(mlflow.MlflowClient, "set_terminated",
                        locked_once(mlflow.MlflowClient.set_terminated, "set_terminated"))
    (tmp_path / "note.txt").write_text("x")
    with tracking.stage_run("locked", load_params(ROOT / "params.yaml"), ("seed",)) as run:
        tracking.log_metrics({"loss": 0.5}, step=1)
        tracking.set_tags({"complete": "yes"})
        tracking.log_artifact(tmp_path / "note.txt")
    assert sorted(failed) == ["log_artifact", "log_metrics", "log_params", "set_tags", "set_terminated", "start_run"]
    assert mlflow.active_run() is None
    stored = mlflow.get_run(run.info.run_id)
    assert stored.info.status == "FINISHED" and stored.data.tags["complete"] == "yes"
    assert stored.data.params["seed"] == str(load_params(ROOT / "params.yaml").seed)
    client = mlflow.MlflowClient()  # the store the run went to (an earlier test may have moved it)
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [(1, 0.5)]
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["note.txt"]
    assert len(runs_of("locked", mlflow.get_tracking_uri())) == 1, "a retried start creates one run"
