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

from diffmodels.metrics.scores import KEYS
from tests.conftest import ROOT, save_image, shipped_params

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def sh(cwd, *args, check=True, timeout=600):
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
    params.update(TINY)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(root, "git", "init", "-q")
    sh(root, "git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A")
    sh(root, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    return root


SHIPPED = shipped_params()
# Every stage at toy size: the point is the wiring (deps, params, outs, tracking), not the numbers.
TINY = {
    "vae": {**SHIPPED["vae"],
            "base_channels": 4, "steps": 3, "batch_size": 8, "warmup_steps": 1, "checkpoint_every": 2,
            "log_every": 1, "val_every": 2, "num_val_images": 8, "grid_images": 4},
    "latents": {"channels": 4, "batch_size": 16},
    "ddpm": {**SHIPPED["ddpm"],
             "num_steps": 20, "base_channels": 8, "norm_groups": 4, "steps": 3, "batch_size": 8, "warmup_steps": 1,
             "checkpoint_every": 2, "log_every": 1, "sample_every": 2, "sample_steps": 2, "sample_images": 2},
    "sample": {**SHIPPED["sample"],
               "ddpm_images": 4, "ddim_images": 5, "batch_size": 4, "ddim_steps": 4, "strip_points": 3,
               "why_iterate_steps": [5, 15], "guidance_scales": [0.0, 2.0], "anagram_classes": [0, 1],
               "per_class_images": 6},
    "inpaint": {**SHIPPED["inpaint"],
                "num_images": 2, "ddim_steps": 3, "repaint_jump": 1, "repaint_resample": 2, "sdedit_t0": 10,
                "panel_images": 2, "methods": ["clamp_mean", "repaint", "sdedit"]},
    "leakage": {"num_images": 2, "samples": 2},
    "eval": {"fid_real_images": 6, "fid_batch_size": 8, "kid_subsets": 2, "kid_subset_size": None, "fid_bootstrap": 4,
             "floor_repeats": 2, "bootstrap": 50, "vae_images": 4},
}
STAGES = ("prepare", "train_vae", "cache_latents", "train_ddpm", "fid_reference", "eval_vae", "sample", "eval_leakage",
          "eval_inpaint", "convert_sd", "sd_baselines", "report")


def ran(output: str) -> set[str]:
    return {s for s in STAGES if f"Running stage '{s}'" in output}


def runs(root):
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["diffmodels"], output_format="list")


def test_repro_then_nothing_reruns(project):
    out = dvc(project, "repro", timeout=900)
    assert ran(out.stdout) == set(STAGES)
    assert (project / "data/prepared/manifest.json").exists()
    logged = {r.data.tags["stage"]: r for r in runs(project)}
    children = {k for k in logged if "/" in k}
    assert set(logged) - children == set(STAGES) and all(r.info.status == "FINISHED" for r in logged.values())
    parent = logged["eval_inpaint"].info.run_id
    assert children == {f"eval_inpaint/{m}" for m in TINY["inpaint"]["methods"]}
    assert all(logged[c].data.tags["mlflow.parentRunId"] == parent for c in children)
    leakage = json.loads((project / "reports/eval_leakage/metrics.json").read_text())
    assert 0 <= leakage["aligned/leak_radius_px"] <= 32 and 0 <= leakage["offset/leak_mean"] < 1
    metrics = json.loads((project / "reports/eval_inpaint/metrics.json").read_text())
    assert metrics["scores"]["repaint"]["fid"] > 0 and set(KEYS) <= set(metrics["scores"]["repaint"])
    assert metrics["scores"]["repaint"]["floor_note"]  # 6 reference images < 2 n: said, not hidden
    assert set(metrics["separated"]) == set(metrics["intervals"]) and all("repaint" in v for v in metrics["intervals"].values())
    assert 0 <= metrics["clamp_mean/centre_aligned/ssim_image"] <= 1
    assert (project / "reports/eval_inpaint/panels/sdedit.png").exists()
    per_class = json.loads((project / "reports/sample/metrics.json").read_text())["per_class"]
    assert set(per_class["classes"]) == {"a", "b"} and per_class["images_per_class"] == 6
    # 6 reference images over two classes: too few for k-NN radii, so the scores say None, not a number
    assert all(c["num_fake"] == 6 and c["num_real"] <= 5 and c["recall"] is None for c in per_class["classes"].values())
    everything = json.loads((project / "reports/metrics.json").read_text())
    assert everything["stages"]["eval_inpaint"] == metrics and everything["params"]["data"]["resolution"] == 16
    assert all(everything["mlflow_runs"][s]["matched_metrics"] for s in ("prepare", "sample", "eval_inpaint"))
    run = logged["prepare"]
    assert run.data.params["data.resolution"] == "16"
    assert run.info.artifact_uri.startswith((project / "mlartifacts").as_uri())

    again = dvc(project, "repro")
    assert "Running stage" not in again.stdout
    assert "didn't change, skipping" in again.stdout or "up to date" in again.stdout
    sh(project, "git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A")
    sh(project, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "repro")


def experiment(root, name: str) -> tuple[dict, dict]:
    """(params.yaml values, metrics by file) of experiment ``name`` from `dvc exp show --json`."""
    rows = [e for base in json.loads(dvc(root, "exp", "show", "--json").stdout) for e in base.get("experiments") or []]
    (exp,) = [e for e in rows if e.get("name") == name]
    data = exp["revs"][0]["data"]
    return data["params"]["params.yaml"]["data"], {path: m["data"] for path, m in data["metrics"].items()}


@pytest.mark.parametrize(("override", "reruns"), [
    ("sample.ddim_steps=3", {"sample", "report"}),
    ("ddpm.batch_size=4", {"train_ddpm", "sample", "eval_inpaint", "report"}),
    ("ddpm.mixer=attention", {"train_ddpm", "sample", "eval_inpaint", "report"}),
])
def test_experiment_reruns_only_downstream_and_shows_in_exp_show(project, override, reruns):
    name = override.split(".")[1].replace("=", "-").replace("_", "")
    out = dvc(project, "exp", "run", "-n", name, "-S", override, timeout=600)
    assert ran(out.stdout) == reruns, out.stdout
    params, metrics = experiment(project, name)
    key, value = override.split("=")
    group, leaf = key.split(".")
    assert str(params[group][leaf]) == value
    sample = metrics["reports/sample/metrics.json"]
    assert metrics["reports/train_ddpm/metrics.json"]["steps"] == 3
    assert sample["scores"]["ddim"]["fid"] > 0 and sample["fid_extractor"].startswith("inception-v3")
    tags = {r.data.tags.get("dvc_exp_name") for r in runs(project)}
    assert name in tags


def test_vae_ablation_runs_only_the_vae_and_its_leakage(project):
    """`dvc exp run -S vae.decoder_kernel=7 eval_leakage`: the VAE ablation without a denoiser."""
    baseline = json.loads((project / "reports/train_vae/metrics.json").read_text())
    out = dvc(project, "exp", "run", "-n", "k7", "-S", "vae.decoder_kernel=7", "eval_leakage", timeout=600)
    assert ran(out.stdout) == {"train_vae", "cache_latents", "eval_leakage"}, out.stdout
    params, metrics = experiment(project, "k7")
    assert params["vae"]["decoder_kernel"] == 7
    leakage = metrics["reports/eval_leakage/metrics.json"]
    assert leakage["decoder_halo_px"] > baseline["decoder_halo_px"]
    assert 0 <= leakage["offset/leak_radius_px"] <= 32 and leakage["offset/leak_mean"] >= 0


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
    # A new resolution reruns the whole pipeline, here with the convolution-only ablation too.
    dvc(project, "exp", "run", "--queue", "-n", "res32", "-S", "data.resolution=32", "-S", "ddpm.mixer=none")
    dvc(project, "queue", "start")
    deadline = time.time() + 900
    while time.time() < deadline:
        status = dvc(project, "queue", "status").stdout
        if "res32" in status and not any(s in status for s in ("Queued", "Running")):
            break
        time.sleep(2)
    assert "Success" in status, status
    logged = {r.data.tags["stage"]: r for r in runs(project) if r.data.tags.get("dvc_exp_name") == "res32"}
    assert set(STAGES) - {"convert_sd"} <= set(logged), "everything downstream of the data reruns"
    assert logged["prepare"].data.params["data.resolution"] == "32"
    run = logged["train_ddpm"]
    assert run.data.params["ddpm.mixer"] == "none" and run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith((project / "mlartifacts").as_uri())
    params, metrics = experiment(project, "res32")
    assert params["data"]["resolution"] == 32 and metrics["reports/sample/metrics.json"]["scores"]["ddim"]["fid"] > 0
    assert not list((project / ".dvc" / "tmp").rglob("mlflow.db")), "no store inside the temporary copy"


def test_compare_and_pages_in_a_browser(project, tmp_path):
    """After the experiments above: one comparison page with every finished experiment side by side,
    and both pages whole in headless Chromium (images loaded, no console errors)."""
    out = sh(project, sys.executable, "-m", "stages.compare", "--out", "reports/compare.html", "--dvc-yaml", "dvc.yaml")
    assert "compare: 6 experiments" in out.stdout, out.stdout
    page = (project / "reports/compare.html").read_text()
    for name in ("ddimsteps-3", "batchsize-4", "mixer-attention", "k7", "res32"):
        assert f"{name}</div>" in page, name  # a column of images per experiment
    assert "not available" not in page  # every experiment's images found (workspace or MLflow artifacts)
    assert ">ddpm.mixer<" in page and ">sample.ddim_steps<" in page  # params that differ
    from tests import browser

    reason = browser.unavailable()
    if reason:
        pytest.skip(f"browser check: {reason}")
    for name in ("index", "compare"):
        check = browser.check_page(project / f"reports/{name}.html", tmp_path / f"{name}.png")
        assert len(check.images) > 10 and not check.broken_images, check.broken_images
        assert not check.errors, check.errors
