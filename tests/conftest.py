"""Shared fixtures: an isolated MLflow store, params files with overrides, image folders, tiny SD
reference models."""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

# dvc.yaml's stage commands run `python3` from PATH: make it this interpreter (the project's
# virtualenv) also when the tests are started as `.venv/bin/python -m pytest` without activating it.
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def shipped_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def params_with(overrides: dict | None = None) -> dict:
    """The shipped params.yaml as a dict, with dotted-key overrides applied."""
    raw = copy.deepcopy(shipped_params())
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return raw


@pytest.fixture
def write_params(tmp_path):
    def write(overrides: dict | None = None, name: str = "params.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(params_with(overrides), sort_keys=False))
        return path

    return write


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A private sqlite MLflow store; DVC's environment cleared so nothing leaks in."""
    for var in ("DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_STAGE", "DIFFMODELS_PIPELINE_ID"):
        monkeypatch.delenv(var, raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    yield uri
    import mlflow

    while mlflow.active_run() is not None:
        mlflow.end_run()


def save_image(path: Path, size=(40, 30), mode="RGB", seed=0, **save_kwargs) -> Path:
    """A random image file of the given PIL mode."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    if mode in ("I;16",):
        arr = rng.integers(0, 65536, size=(h, w), dtype=np.uint16)
        Image.fromarray(arr).save(path, **save_kwargs)
        return path
    bands = len(Image.new(mode, (1, 1)).getbands())
    arr = rng.integers(0, 256, size=(h, w, bands), dtype=np.uint8)
    img = Image.fromarray(arr[:, :, 0] if bands == 1 else arr, mode={3: "RGB", 4: "RGBA"}.get(bands, "L"))
    if mode not in ("RGB", "RGBA", "L"):
        img = img.convert(mode)
    img.save(path, **save_kwargs)
    return path


@pytest.fixture
def image_folder(tmp_path):
    """50 good images in two class folders, plus 3 broken files."""
    root = tmp_path / "images"
    for i in range(50):
        cls = "cats" if i % 2 else "dogs"
        save_image(root / cls / f"img_{i:03d}.png", size=(20 + i % 7, 18 + i % 5), seed=i)
    (root / "dogs" / "empty.jpg").write_bytes(b"")
    (root / "cats" / "notes.png").write_text("this is not an image")
    good = (root / "cats" / "img_001.png").read_bytes()
    (root / "cats" / "truncated.png").write_bytes(good[: len(good) // 2])
    return root


@contextmanager
def single_thread() -> Iterator[None]:
    """Run tiny models on one thread: on a shared, loaded CPU, OpenMP's worker hand-offs cost far
    more than these few-kilobyte convolutions (measured 20-100x slower with 2 threads here);
    results are compared within one thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def sd_ref():
    """Tiny random diffusers / transformers SD v1 components (tests/sd_reference.py), with torch on
    one thread while the module's tests run. Imported lazily: diffusers is slow to import."""
    sd_reference = pytest.importorskip("sd_reference")
    with single_thread():
        yield sd_reference.build_reference()


@pytest.fixture(autouse=True)
def _autograd_stays_on():
    """Fail the test that leaves autograd switched off (a stage run in-process that disables it
    for itself must hand it back), instead of every later test that needs gradients."""
    yield
    leaked = not torch.is_grad_enabled()
    torch.set_grad_enabled(True)
    assert not leaked, "this test left autograd switched off (torch.set_grad_enabled(False) not undone)"
