"""convert_sd and sd_baselines as DVC runs them: status-only without weights (exit 0), and end to
end from a tiny random checkpoint in the ORIGINAL single-file layout (in-process, one thread)."""

from __future__ import annotations

import json

import mlflow
import pytest
import torch
import yaml
from safetensors.torch import save_file

from diffmodels.core.config import parse_params
from diffmodels.core.errors import ParamsError
from diffmodels.data.masks import write_mask_sets
from diffmodels.sd.weights import load_models
from stages import convert_sd, sd_baselines
from tests.conftest import params_with
from tests.vae_support import tiny_prepared


@pytest.fixture(scope="module", autouse=True)
def store(tmp_path_factory):
    """One private sqlite MLflow store for the module (creating its schema takes seconds); each
    test logs to its own experiment."""
    mp = pytest.MonkeyPatch()
    for var in ("DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_STAGE", "DIFFMODELS_PIPELINE_ID"):
        mp.delenv(var, raising=False)
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}")
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mp.undo()

TINY_SD = {"data.mask_sets": ["centre_aligned"], "leakage.num_images": 2, "sd.architecture": "tiny", "sd.steps": 2,
           "sd.height": 16, "sd.width": 16, "sd.num_test_images": 2,
           "sd.prompts": ["a photo of a cat", "a red door"], "sd.batch_size": 2, "sd.device": "cpu"}  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """16 px prepared data and the centre_aligned mask set, as the prepare stage writes them."""
    root = tmp_path_factory.mktemp("sd_stage_data")
    tiny_prepared(root / "prepared")
    write_mask_sets(root / "masks", ("centre_aligned",), count=4, size=16, seed=0)
    return root


def write(tmp_path, overrides: dict):
    path = tmp_path / "params.yaml"
    raw = params_with({**TINY_SD, "tracking.experiment": tmp_path.name, **overrides})
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_both(tmp_path, data, params):
    convert_sd.main(["--params", str(params), "--out", str(tmp_path / "models/sd"),
                     "--reports", str(tmp_path / "reports/convert_sd")])
    sd_baselines.main(["--params", str(params), "--models", str(tmp_path / "models/sd"), "--prepared", str(data / "prepared"),
                       "--masks", str(data / "masks"), "--reports", str(tmp_path / "reports/sd_baselines")])  # fmt: skip


def read(path):
    return json.loads(path.read_text())


def stage_runs(tmp_path):
    return {r.data.tags["stage"]: r for r in mlflow.search_runs(experiment_names=[tmp_path.name], output_format="list")}


@pytest.mark.parametrize("checkpoint", [None, "does/not/exist.safetensors"])
def test_without_weights_both_stages_write_a_status_and_exit_0(tmp_path, data, checkpoint, capsys):
    run_both(tmp_path, data, write(tmp_path, {"sd.checkpoint": checkpoint}))
    status = read(tmp_path / "models/sd/status.json")
    assert status["status"] == "skipped" and "sd.checkpoint" in status["reason"]
    assert "dvc exp run -S sd.checkpoint=" in status["how_to"]
    assert not (tmp_path / "models/sd/sd.safetensors").exists()
    assert read(tmp_path / "reports/convert_sd/metrics.json")["converted"] is False
    metrics = read(tmp_path / "reports/sd_baselines/metrics.json")
    assert metrics["status"] == "skipped" and metrics["reason"] == status["reason"]
    assert [p.name for p in (tmp_path / "reports/sd_baselines/figures").iterdir()] == ["status.png"]
    assert "convert_sd: skipped" in capsys.readouterr().out
    runs = stage_runs(tmp_path)
    assert {s: r.data.tags["sd_status"] for s, r in runs.items()} == {"convert_sd": "skipped", "sd_baselines": "skipped"}
    assert runs["convert_sd"].data.params["sd.checkpoint"] == str(checkpoint)


@pytest.fixture(scope="module")
def tiny_checkpoint(sd_ref, tmp_path_factory):
    """The tiny diffusers/transformers reference saved as an original single-file checkpoint."""
    sd_reference = pytest.importorskip("sd_reference")
    path = tmp_path_factory.mktemp("sd_ckpt") / "tiny-v1.safetensors"
    save_file(sd_reference.original_state_dict(sd_ref), str(path))
    return path


def test_with_a_checkpoint_converts_once_and_runs_every_baseline(tmp_path, data, tiny_checkpoint, sd_ref, capsys):
    run_both(tmp_path, data, write(tmp_path, {"sd.checkpoint": str(tiny_checkpoint)}))
    assert "convert_sd: " in capsys.readouterr().out
    status = read(tmp_path / "models/sd/status.json")
    assert status["status"] == "converted" and status["architecture"] == "tiny" and status["used_ema"] is False
    converted = read(tmp_path / "reports/convert_sd/metrics.json")
    assert converted["converted"] and converted["finite_unet"] and converted["finite_vae"] and converted["finite_text_encoder"]
    assert converted["params_unet"] == sum(p.numel() for p in sd_ref.unet.parameters())

    # the saved file rebuilds our modules with the reference's weights (configs embedded)
    models, meta = load_models(tmp_path / "models/sd/sd.safetensors")
    assert meta["architecture"] == "tiny" and meta["source"] == str(tiny_checkpoint.resolve())
    assert torch.equal(models.unet.state_dict()["out.2.weight"], sd_ref.unet.state_dict()["conv_out.weight"])

    metrics = read(tmp_path / "reports/sd_baselines/metrics.json")
    assert metrics["status"] == "ran" and metrics["device"] == "cpu" and metrics["dtype"] == "float32"
    for key in ("txt2img", "img2img", "inpaint", "anagram"):
        assert metrics[f"{key}_seconds_per_image"] > 0
    assert metrics["img2img_psnr_to_input"] > 0 and metrics["inpaint_known_psnr"] > 0 and 0 < metrics["inpaint_hole_fraction"] < 1
    assert metrics["sd_vae_images"] == 8 and 0 < metrics["sd_vae_ssim"] <= 1
    # the SD VAE under our leakage metrics (stride 2 for the tiny VAE, 8 for v1-5)
    assert 0 < metrics["sd_vae_leakage/aligned/leak_mean"] < 1 and metrics["sd_vae_leakage/aligned/enc_leak_mean"] > 0
    assert 1 <= metrics["sd_vae_leakage/aligned/leak_radius_px"] <= 32, "GroupNorm and attention spread any change"
    table = (tmp_path / "reports/sd_baselines/decoder_leakage.tsv").read_text().splitlines()
    assert table[0] == "distance_px\taligned" and len(table) > 2
    figures = sorted(p.name for p in (tmp_path / "reports/sd_baselines/figures").iterdir())
    assert figures == ["anagram.png", "img2img.png", "inpaint.png", "txt2img.png", "vae_reconstruction.png"]
    runs = stage_runs(tmp_path)
    assert runs["sd_baselines"].data.tags["sd_status"] == "ran" and runs["sd_baselines"].data.metrics["img2img_psnr_to_input"] > 0
    assert runs["sd_baselines"].info.status == "FINISHED"


def test_not_a_checkpoint_is_one_line_and_exit_2(tmp_path, data, capsys):
    bogus = tmp_path / "weights.safetensors"
    save_file({"linear.weight": torch.zeros(2, 2)}, str(bogus))
    params = write(tmp_path, {"sd.checkpoint": str(bogus)})
    with pytest.raises(SystemExit) as exit_info:
        convert_sd.main(["--params", str(params), "--out", str(tmp_path / "sd"), "--reports", str(tmp_path / "reports")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a Stable Diffusion v1 checkpoint" in err


def test_sd_params_are_validated():
    with pytest.raises(ParamsError, match="sd.anagram_prompts needs exactly 2"):
        parse_params(params_with({"sd.anagram_prompts": ["only one"]}))
    with pytest.raises(ParamsError, match="float16 needs a GPU"):
        parse_params(params_with({"sd.device": "cpu", "sd.dtype": "float16"}))
    with pytest.raises(ParamsError, match="sd.height must be .*a multiple of 8"):
        parse_params(params_with({"sd.height": 100}))
    with pytest.raises(ParamsError, match="did you mean 'sd.guidance'"):
        parse_params(params_with({"sd.guidence": 3.0}))
