"""MLflow tracking: one run per stage execution.

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
that cannot be reached is a :class:`~diffmodels.core.errors.TrackingError`, never a silent skip.
A run stopped by Ctrl-C or SIGTERM is marked KILLED, by any other exception FAILED.

The experiment is a model-training one
    MLflow 3's UI opens an experiment on its GenAI overview (traces) unless told otherwise. The
    experiment carries ``mlflow.experimentKind = custom_model_development`` (read by the UI's
    experiment page in MLflow 3.0-3.x; set on an existing experiment that lacks it), and links
    into the UI add ``?workflowType=machine_learning`` (:data:`UI_RUNS_VIEW`): MLflow 3.17's UI
    decides by that global workflow type alone (default ``genai``, checked in headless Chromium).

Concurrent writers (``dvc queue start -j 2``, several shells)
    Several processes share one sqlite store. Two things go wrong without care, both measured
    here with 4 processes logging to a fresh store at once: (1) MLflow creates a new store's
    schema (``create_all`` + alembic migrations) without a lock, so the processes race and 3 of
    4 died with "table alembic_version already exists" / "duplicate column name: step"; the
    first store access (``MlflowClient(uri)``, which builds the store) is therefore serialised
    by an exclusive ``flock`` on ``<db>.lock``. (2) sqlite allows one writer at a time; MLflow
    sets ``PRAGMA busy_timeout = 20000`` on every session, and writes that still fail with
    "database is locked" (a lock held longer, or sqlite's deadlock avoidance, which returns at
    once) are retried with exponential backoff (:func:`retry_when_locked`). Stages therefore
    write through this module's wrappers of MLflow's public calls (:func:`log_metrics`,
    :func:`log_params`, :func:`set_tags`, :func:`log_artifact`, :func:`start_run`,
    :func:`end_run`, :func:`child_run`), never ``mlflow.log_*`` directly.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import os
import random
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from diffmodels.core.config import Params, flatten
from diffmodels.core.errors import TrackingError

DB_NAME = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
# What MLflow 3's UI reads to open an experiment on its runs, not on GenAI traces (module docstring).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
UI_RUNS_VIEW = "workflowType=machine_learning"


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


def determinism_tags() -> dict[str, str]:
    """What a seeded run's exact numbers depend on beyond the seed, as ``determinism.*`` tags.

    Same seed, same machine, same thread count -> the same numbers on CPU. Across machines the
    last digits may move: PyTorch picks CPU kernels by instruction set (``cpu_capability``) and
    splits reductions by thread count, and CUDA kernels are not all deterministic unless
    ``deterministic_algorithms`` is on. Recording these tells two runs' differences apart."""
    import platform

    import numpy
    import torch

    if torch.cuda.is_available():
        accelerator = f"cuda {torch.version.cuda}: {torch.cuda.get_device_name(0)}"
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        accelerator = "mps"
    else:
        accelerator = "none"
    return {
        "determinism.torch": torch.__version__,
        "determinism.numpy": numpy.__version__,
        "determinism.python": platform.python_version(),
        "determinism.threads": str(torch.get_num_threads()),
        "determinism.interop_threads": str(torch.get_num_interop_threads()),
        "determinism.cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "determinism.machine": f"{platform.machine()} {platform.processor() or platform.system()}",
        "determinism.accelerator": accelerator,
        "determinism.deterministic_algorithms": str(torch.are_deterministic_algorithms_enabled()).lower(),
    }


def run_tags(stage: str, root: Path) -> dict[str, str]:
    commit = git_commit(root)
    tags = {
        "stage": stage,
        "git_commit": commit,
        "mlflow.source.git.commit": commit,
        "pipeline_id": pipeline_id(),
        **determinism_tags(),
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
    """The id of experiment ``name``, created (artifacts beside a sqlite store) when missing, and
    marked as a model-training experiment (:data:`EXPERIMENT_KIND_TAG`) when it is not yet."""
    import mlflow

    experiment = retry_when_locked(mlflow.get_experiment_by_name)(name)
    if experiment is None:
        location = None
        if uri.startswith("sqlite:///"):
            # Artifacts beside the database, never the cwd-relative ./mlruns default.
            location = (Path(uri[len("sqlite:///"):]).parent / ARTIFACTS_DIR).resolve().as_uri()
        try:
            return retry_when_locked(mlflow.create_experiment)(
                name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except Exception:  # created concurrently by another stage: fetch it
            experiment = mlflow.get_experiment_by_name(name)
            if experiment is None:
                raise
    if EXPERIMENT_KIND_TAG not in experiment.tags:  # made by an older version, or by hand
        retry_when_locked(mlflow.MlflowClient(uri).set_experiment_tag)(
            experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


def retry_when_locked(fn: Callable, attempts: int = 8, first_wait_s: float = 0.25,
                      sleep: Callable[[float], None] = time.sleep) -> Callable:
    """``fn`` retried with exponential backoff (0.25 s doubling, +-50 % jitter: about 60 s over
    8 attempts, on top of sqlite's own 20 s busy wait per attempt) while MLflow reports
    "database is locked"; then a one-line :class:`TrackingError`. Other errors pass through."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import (
        OperationalError,  # raised unwrapped while MLflow opens a store
    )

    jitter = random.Random()  # private: the global RNG may be seeded by the caller

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        for attempt in range(attempts):
            try:
                return fn(*args, **kwargs)
            except (MlflowException, OperationalError) as exc:
                if "database is locked" not in str(exc):
                    raise
                if attempt == attempts - 1:
                    raise TrackingError(
                        f"MLflow store still locked after {attempts} attempts ({getattr(fn, '__name__', 'write')}); "
                        "another process holds the sqlite database: retry, or use an MLflow server for many writers"
                    ) from None
                sleep(first_wait_s * 2**attempt * jitter.uniform(0.5, 1.5))

    wrapper.retries_locked = True  # type: ignore[attr-defined]
    return wrapper


class _LockedNoise(logging.Filter):
    """MLflow logs every "database is locked" with a traceback before raising it; those are
    retried (and reported in one line when retries run out), so the traceback is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "database is locked" not in record.getMessage()


@contextlib.contextmanager
def _store_init_lock(uri: str) -> Iterator[None]:
    """Exclusive lock on ``<db>.lock`` beside a sqlite store (see "Concurrent writers")."""
    if not uri.startswith("sqlite:///") or os.name != "posix":
        yield
        return
    import fcntl

    lock_path = Path(uri[len("sqlite:///"):] + ".lock")
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _open_store(uri: str) -> None:
    """Create (or open) the tracking store, schema creation under the lock (module docstring).

    ``MlflowClient(uri)`` builds the store, which creates and migrates a new database; MLflow
    caches that store per URI, so every later call of this process (fluent or client) reuses it.
    """
    from mlflow import MlflowClient

    def open_locked() -> None:
        with _store_init_lock(uri):
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)

    if uri.startswith("sqlite:"):
        db_logger = logging.getLogger("mlflow.store.db.utils")
        if not any(isinstance(f, _LockedNoise) for f in db_logger.filters):
            db_logger.addFilter(_LockedNoise())
        retry_when_locked(open_locked)()
    else:
        open_locked()


def metric_values(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The one rule for what of a metrics dict goes to MLflow, and under which names.

    Nested mappings flatten to dotted names and ``/`` in a key becomes ``.`` (``{"a": {"b/c": 1}}``
    -> ``a.b.c``), the names params use. Only finite numbers are metrics: bools (flags), ``None``,
    strings and NaN/inf (a metric undefined at this n) are left to metrics.json.
    """
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = str(key).replace("/", ".")
        if isinstance(value, Mapping):
            out.update({f"{name}.{k}": v for k, v in metric_values(value).items()})
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


def log_metrics(metrics: Mapping[str, Any], step: int | None = None, prefix: str = "") -> dict[str, float]:
    """Log :func:`metric_values` of ``metrics`` (names prefixed by ``prefix``) to the active run."""
    import mlflow

    values = {f"{prefix}{k}": v for k, v in metric_values(metrics).items()}
    if values:
        retry_when_locked(mlflow.log_metrics)(values, step=step)
    return values


def log_params(params: Mapping[str, Any]) -> None:
    """``mlflow.log_params``, retried while the store is locked."""
    import mlflow

    if params:
        retry_when_locked(mlflow.log_params)(dict(params))


def set_tags(tags: Mapping[str, Any]) -> None:
    """``mlflow.set_tags`` on the active run, retried while the store is locked."""
    import mlflow

    if tags:
        retry_when_locked(mlflow.set_tags)(dict(tags))


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    """``mlflow.log_artifact`` of one file (into ``artifact_path``), retried while the store is locked."""
    import mlflow

    retry_when_locked(mlflow.log_artifact)(str(path), artifact_path=artifact_path)


def log_text(text: str, artifact_file: str) -> None:
    """``mlflow.log_text``: ``text`` as the artifact ``artifact_file``, retried while the store is locked."""
    import mlflow

    retry_when_locked(mlflow.log_text)(text, artifact_file)


def start_run(**kwargs: Any) -> Any:
    """``mlflow.start_run(**kwargs)``, retried while the store is locked; returns the ActiveRun.

    A failed attempt leaves nothing behind: MLflow makes the run active only after the store
    created it (one sqlite transaction)."""
    import mlflow

    return retry_when_locked(mlflow.start_run)(**kwargs)


def end_run(status: str = "FINISHED") -> None:
    """End the active run with ``status`` (FINISHED, FAILED, KILLED), retried while the store is locked.

    ``mlflow.end_run`` drops the run from the active stack *before* writing its status, so a
    retried ``end_run`` would end nothing: the status is written first (retried), then the run
    is ended (which writes the same status again; a lock there finds the run already ended)."""
    import mlflow

    run = mlflow.active_run()
    if run is None:
        return
    retry_when_locked(mlflow.MlflowClient().set_terminated)(run.info.run_id, status)
    retry_when_locked(mlflow.end_run)(status)


@contextlib.contextmanager
def child_run(name: str, tags: Mapping[str, str] | None = None) -> Iterator[Any]:
    """A nested MLflow run named ``name`` under the active run (e.g. one per inpainting method).

    Inside, :func:`log_metrics` and friends write to the child; on exit the parent is active
    again. It ends FINISHED, FAILED on an exception, KILLED on Ctrl-C / SIGTERM, and the
    exception propagates. The child is in the parent's experiment and inherits its tags
    (:func:`run_tags`: stage, commit, pipeline id, determinism), ``tags`` overriding them (e.g.
    ``{"stage": "eval_inpaint/clamp", "method": "clamp"}``); MLflow adds ``mlflow.parentRunId``,
    by which the report tells children from stage runs.
    """
    import mlflow

    parent = mlflow.active_run()
    if parent is None:
        raise TrackingError(f"child run {name!r} needs an active stage run: open it inside tracking.stage_run")
    inherited = {k: v for k, v in parent.data.tags.items()
                 if not k.startswith("mlflow.") or k == "mlflow.source.git.commit"}
    run = start_run(experiment_id=parent.info.experiment_id, run_name=name, nested=True,
                    tags={**inherited, **(tags or {})})
    try:
        yield run
    except KeyboardInterrupt:
        end_run("KILLED")
        raise
    except BaseException:
        end_run("FAILED")
        raise
    end_run("FINISHED")


@contextlib.contextmanager
def stage_run(stage: str, params: Params, groups: Iterable[str]) -> Iterator[Any]:
    """Open the MLflow run of one stage execution, log its tags and params, and yield it.

    Inside the block log with :func:`log_metrics` (``step=``), :func:`log_artifact`,
    :func:`set_tags` (retried while a shared sqlite store is locked). An exception marks the
    run FAILED, Ctrl-C or SIGTERM KILLED (tag ``interrupted``), and propagates.
    """
    import mlflow
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    for noisy in ("alembic", "mlflow.store.db.utils"):  # schema-creation chatter on a new store
        logging.getLogger(noisy).setLevel(logging.WARNING)
    root = project_root()
    uri = tracking_uri(root)
    _check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    try:
        _open_store(uri)
        experiment_id = _experiment_id(params.tracking.experiment, uri, root)
        run = start_run(experiment_id=experiment_id, run_name=stage, tags=run_tags(stage, root))
    except (MlflowException, SQLAlchemyError, OSError) as exc:  # SQLAlchemyError: e.g. "file is not a database"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrackingError(f"cannot open an MLflow run in {uri}: {first}") from None
    try:
        log_params(flatten(params, groups))
        yield run
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM (diffmodels.core.interrupt)
        with contextlib.suppress(MlflowException, TrackingError):
            set_tags({"interrupted": str(exc) or "KeyboardInterrupt"})
            _end_stage_run(run, "KILLED")
        raise
    except BaseException:
        with contextlib.suppress(MlflowException, TrackingError):  # the stage's own error matters more
            _end_stage_run(run, "FAILED")
        raise
    _end_stage_run(run, "FINISHED")


def _end_stage_run(run: Any, status: str) -> None:
    """End child runs left open by an exception, then the stage's run."""
    import mlflow

    while (active := mlflow.active_run()) is not None and active.info.run_id != run.info.run_id:
        end_run(status)
    end_run(status)
