"""End to end: `dvc repro`, `dvc exp run` and the queue in a temporary git copy of the project."""

import json
import os
import shutil
import subprocess
import sys
import time

import mlflow
import pytest
import yaml

from tests.conftest import ROOT, save_image

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def sh(cwd, *args, check=True, timeout=300):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_", "DIFFMODELS_"))}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def dvc(cwd, *args, **kwargs):
    return sh(cwd, sys.executable, "-m", "dvc", *args, **kwargs)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A git repo holding the project's tracked files, on a small folder dataset."""
    root = tmp_path_factory.mktemp("project")
    tracked = sh(ROOT, "git", "ls-files", "--cached", "--others", "--exclude-standard").stdout.split()
    for rel in tracked:
        if rel.startswith("tests/") or rel in ("dvc.lock",) or rel.endswith("metrics.json"):
            continue
        if (ROOT / rel).is_file():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, root / rel)
    images = tmp_path_factory.mktemp("images")
    for i in range(60):
        save_image(images / ("a" if i % 3 else "b") / f"{i}.png", size=(24, 20), seed=i)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"].update(dataset="folder", source=str(images), resolution=16, channels=1,
                          min_images=20, masks_per_set=4, preview_images=4)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(root, "git", "init", "-q")
    sh(root, "git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A")
    sh(root, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    return root


def runs(root):
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["diffmodels"], output_format="list")


def test_repro_then_nothing_reruns(project):
    out = dvc(project, "repro")
    assert "Running stage 'prepare'" in out.stdout
    assert (project / "data/prepared/manifest.json").exists()
    (run,) = runs(project)
    assert run.data.tags["stage"] == "prepare" and run.info.status == "FINISHED"
    assert run.data.params["data.resolution"] == "16"
    assert run.info.artifact_uri.startswith((project / "mlartifacts").as_uri())

    again = dvc(project, "repro")
    assert "Running stage" not in again.stdout
    assert "didn't change, skipping" in again.stdout or "up to date" in again.stdout
    sh(project, "git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A")
    sh(project, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "repro")


def test_exp_run_with_set_param_shows_in_exp_show(project):
    dvc(project, "exp", "run", "-n", "res32", "-S", "data.resolution=32")
    shown = json.loads(dvc(project, "exp", "show", "--json").stdout)
    flat = json.dumps(shown)
    assert '"res32"' in flat
    tags = {r.data.tags.get("dvc_exp_name") for r in runs(project)}
    assert "res32" in tags


def test_typo_in_set_param_fails(project):
    # DVC itself refuses to add an unknown key through -S (its overrides are struct-checked) ...
    plain = dvc(project, "exp", "run", "-S", "data.resolutoin=32", check=False)
    assert plain.returncode != 0 and "data.resolutoin" in plain.stderr
    # ... and a key forced in with +key=value reaches our validation, which names the fix.
    forced = dvc(project, "exp", "run", "-S", "+data.resolutoin=32", check=False)
    assert forced.returncode != 0
    assert "unknown key 'data.resolutoin' (did you mean 'data.resolution'?)" in forced.stdout + forced.stderr
    assert "Traceback" not in forced.stdout + forced.stderr
    sh(project, "git", "checkout", "--", "params.yaml")


def test_queued_experiment_records_into_the_main_store(project):
    dvc(project, "exp", "run", "--queue", "-n", "queued24", "-S", "data.resolution=24")
    dvc(project, "queue", "start")
    deadline = time.time() + 240
    while time.time() < deadline:
        status = dvc(project, "queue", "status").stdout
        if "queued24" in status and not any(s in status for s in ("Queued", "Running")):
            break
        time.sleep(2)
    assert "Success" in status, status
    (run,) = [r for r in runs(project) if r.data.tags.get("dvc_exp_name") == "queued24"]
    assert run.data.params["data.resolution"] == "24" and run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith((project / "mlartifacts").as_uri())
    assert not list((project / ".dvc" / "tmp").rglob("mlflow.db")), "no store inside the temporary copy"
