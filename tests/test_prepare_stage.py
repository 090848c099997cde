"""The prepare stage as a user runs it: a subprocess with a params file."""

import csv
import json
import os
import subprocess
import sys

import mlflow
import numpy as np

from diffmodels.data.masks import load_mask_set
from tests.conftest import ROOT


def run_prepare(tmp_path, params_path, uri):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": uri}
    for var in ("DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        env.pop(var, None)
    cmd = [
        sys.executable, "-m", "stages.prepare", "--params", str(params_path),
        "--prepared", "out/prepared", "--masks", "out/masks", "--reports", "out/reports", "--raw", "out/raw",
    ]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


FOLDER_PARAMS = {
    "data.dataset": "folder",
    "data.resolution": 16,
    "data.channels": 3,
    "data.val_fraction": 0.1,
    "data.test_fraction": 0.2,
    "data.min_images": 10,
    "data.masks_per_set": 4,
    "data.preview_images": 8,
}


def test_folder_with_broken_files(tmp_path, image_folder, write_params, mlflow_store):
    params = write_params({**FOLDER_PARAMS, "data.source": str(image_folder)})
    result = run_prepare(tmp_path, params, mlflow_store)
    assert result.returncode == 0, result.stderr
    assert "prepare: 35 train / 5 val / 10 test images at 16px x3, 2 classes, 3 skipped" in result.stdout

    with open(tmp_path / "out/reports/skipped.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["path"] for r in rows) == ["cats/notes.png", "cats/truncated.png", "dogs/empty.jpg"]

    manifest = json.loads((tmp_path / "out/prepared/manifest.json").read_text())
    assert manifest["counts"] == {"train": 35, "val": 5, "test": 10, "fid_test": 10}
    assert manifest["class_names"] == ["cats", "dogs"]
    train = np.load(tmp_path / "out/prepared/train_images.npy")
    assert train.shape == (35, 16, 16, 3) and train.dtype == np.uint8
    assert load_mask_set(tmp_path / "out/masks", "half_offset", size=16).shape == (4, 16, 16)

    metrics = json.loads((tmp_path / "out/reports/metrics.json").read_text())
    assert metrics["num_skipped"] == 3
    assert metrics["skipped_by_reason"] == {"empty": 1, "not_an_image": 1, "truncated": 1}

    mlflow.set_tracking_uri(mlflow_store)
    (run,) = mlflow.search_runs(experiment_names=["diffmodels"], output_format="list")
    assert run.data.tags["stage"] == "prepare" and run.info.status == "FINISHED"
    assert run.data.params["data.resolution"] == "16"
    assert run.data.metrics["num_skipped"] == 3.0
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"preview.png", "skipped.csv", "metrics.json", "manifest.json"} <= artifacts

    # Same params, same seed -> the same split, byte for byte.
    first = (tmp_path / "out/prepared/test_images.npy").read_bytes()
    assert run_prepare(tmp_path, params, mlflow_store).returncode == 0
    assert (tmp_path / "out/prepared/test_images.npy").read_bytes() == first


def test_bad_param_is_one_line_and_nonzero_exit(tmp_path, write_params, mlflow_store):
    params = write_params({"data.resolutoin": 32})
    result = run_prepare(tmp_path, params, mlflow_store)
    assert result.returncode == 2
    assert result.stderr == f"error: {params}: unknown key 'data.resolutoin' (did you mean 'data.resolution'?)\n"
    assert not (tmp_path / "out").exists()


def test_too_few_images_fails_clearly_and_reports_why(tmp_path, image_folder, write_params, mlflow_store):
    params = write_params({**FOLDER_PARAMS, "data.source": str(image_folder), "data.min_images": 60})
    result = run_prepare(tmp_path, params, mlflow_store)
    assert result.returncode == 2
    # progress lines ("decode: 50/56 img ...") may come first; the error is one line, the last
    lines = result.stderr.splitlines()
    assert lines[-1].startswith("error: only 50 usable images in folder") and "Traceback" not in result.stderr
    assert [line for line in lines if not line.startswith("decode: ")] == lines[-1:]
    assert (tmp_path / "out/reports/skipped.csv").exists(), "the skip report explains the failure"
    assert not (tmp_path / "out/prepared").exists()
    mlflow.set_tracking_uri(mlflow_store)
    (run,) = mlflow.search_runs(experiment_names=["diffmodels"], output_format="list")
    assert run.info.status == "FAILED"
