"""MLflow tracking: one run per stage execution (SPEC 8).

Store
    ``MLFLOW_TRACKING_URI`` when set; otherwise ``sqlite:///<project root>/mlflow.db`` with
    artifacts in ``<project root>/mlartifacts`` (the experiment is created with that explicit
    artifact location: logging straight to sqlite would otherwise put artifacts in ``./mlruns``).
    The project root is DVC's ``DVC_ROOT``, which DVC points at the *main* repository even for
    queued experiments that run in temporary copies under ``.dvc/tmp/exps/``; outside DVC it is
    found by walking up to the directory holding ``.dvc/``.

Tags on every run
    ``stage``, ``git_commit`` (also MLflow's ``mlflow.source.git.commit``), ``dvc_exp_name``
    under ``dvc exp run``, and ``pipeline_id``: shared by every stage of one ``dvc repro`` /
    ``dvc exp run``, derived from the DVC process that launched the stage (``DIFFMODELS_PIPELINE_ID``
    overrides it).

Params are logged flat with the dotted names of params.yaml (``data.resolution``). A store
that cannot be reached is a :class:`~diffmodels.errors.TrackingError`, never a silent skip.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from diffmodels.config import Params, flatten
from diffmodels.errors import TrackingError

DB_NAME = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"


def project_root(start: str | Path | None = None) -> Path:
    """The main project's root, also from inside a DVC experiment's temporary copy."""
    env_root = os.environ.get("DVC_ROOT")
    if env_root and start is None:
        return Path(env_root).resolve()
    here = Path(start or os.getcwd()).resolve()
    # A queued experiment runs in <root>/.dvc/tmp/exps/...: its own .dvc/ is not the project's.
    parts = here.parts
    if ".dvc" in parts:
        return Path(*parts[: parts.index(".dvc")])
    for candidate in (here, *here.parents):
        if (candidate / ".dvc").is_dir():
            return candidate
    return here


def tracking_uri(root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / DB_NAME}"


def pipeline_id() -> str:
    """An id shared by every stage that one ``dvc repro`` / ``dvc exp run`` process launched.

    DVC runs each stage command as a child of its own process, so the nearest ancestor running
    DVC identifies the pipeline run; its pid and start time (from /proc) make the id unique
    across reboots of pid numbering. Without DVC (or /proc), each stage gets a fresh id.
    """
    explicit = os.environ.get("DIFFMODELS_PIPELINE_ID")
    if explicit:
        return explicit
    launcher = _dvc_ancestor()
    if launcher is None:
        return uuid.uuid4().hex[:12]
    return hashlib.sha1(launcher.encode()).hexdigest()[:12]


def _dvc_ancestor() -> str | None:
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    boot = _read(proc / "sys/kernel/random/boot_id").strip()
    pid = os.getppid()
    for _ in range(32):  # bounded walk up the process tree
        if pid <= 1:
            return None
        stat = _read(proc / str(pid) / "stat")
        cmdline = _read(proc / str(pid) / "cmdline").split("\0")
        if not stat:
            return None
        if any(Path(arg).name == "dvc" for arg in cmdline[:3]) or cmdline[1:3] == ["-m", "dvc"]:
            fields = stat.rsplit(")", 1)[1].split()
            start_time = fields[19]  # field 22 of /proc/PID/stat, counted after "(comm)"
            return f"{boot}:{pid}:{start_time}"
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # field 4: ppid
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def git_commit(root: Path) -> str:
    baseline = os.environ.get("DVC_EXP_BASELINE_REV")
    if baseline:
        return baseline
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_tags(stage: str, root: Path) -> dict[str, str]:
    commit = git_commit(root)
    tags = {
        "stage": stage,
        "git_commit": commit,
        "mlflow.source.git.commit": commit,
        "pipeline_id": pipeline_id(),
    }
    exp_name = os.environ.get("DVC_EXP_NAME")
    if exp_name:
        tags["dvc_exp_name"] = exp_name
    return tags


def _check_reachable(uri: str) -> None:
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 (user-configured URI)
                if resp.status != 200:
                    raise TrackingError(f"MLflow server at {uri} answered {resp.status} on /health")
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingError(
                f"cannot reach the MLflow server at {uri} ({reason}); start it, fix MLFLOW_TRACKING_URI, "
                "or unset it to use the local sqlite store"
            ) from None
    elif uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if not db.parent.is_dir() or not os.access(db.parent, os.W_OK):
            raise TrackingError(f"cannot write the MLflow store {uri}: folder {db.parent} is missing or read-only")
    elif uri.startswith("file:") or ("://" not in uri and not uri.startswith("databricks")):
        raise TrackingError(
            f"MLFLOW_TRACKING_URI={uri!r}: the plain file store is deprecated in MLflow 3; "
            "use sqlite:///path/mlflow.db or an http(s) server"
        )


def _experiment_id(name: str, uri: str, root: Path) -> str:
    import mlflow

    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        # Artifacts beside the database, never the cwd-relative ./mlruns default.
        location = (Path(uri[len("sqlite:///"):]).parent / ARTIFACTS_DIR).resolve().as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another stage: fetch it
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


@contextlib.contextmanager
def stage_run(stage: str, params: Params, groups: Iterable[str]) -> Iterator[Any]:
    """Open the MLflow run of one stage execution, log its tags and params, and yield it.

    Inside the block use ``mlflow.log_metrics(..., step=)`` and ``mlflow.log_artifact``; an
    exception marks the run FAILED (MLflow's own context manager) and propagates.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    for noisy in ("alembic", "mlflow.store.db.utils"):  # schema-creation chatter on a new store
        logging.getLogger(noisy).setLevel(logging.WARNING)
    root = project_root()
    uri = tracking_uri(root)
    _check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    try:
        experiment_id = _experiment_id(params.tracking.experiment, uri, root)
        run = mlflow.start_run(experiment_id=experiment_id, run_name=stage, tags=run_tags(stage, root))
    except (MlflowException, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrackingError(f"cannot open an MLflow run in {uri}: {first}") from None
    with run:
        mlflow.log_params(flatten(params, groups))
        yield run
