"""Stage eval_vae as DVC runs it, on a tiny prepared dataset, a random tiny VAE and the real FID network."""

import json

import mlflow
import pytest
import torch
import yaml

from diffmodels.models.vae import VAE, VAEConfig, save_vae
from stages import eval_vae, fid_reference
from tests.conftest import params_with
from tests.test_bad_inputs import one_line_exit_2
from tests.vae_support import TINY_VAE, tiny_prepared

pytestmark = pytest.mark.usefixtures("one_thread")


def write(path, overrides):
    path.write_text(yaml.safe_dump(params_with(overrides), sort_keys=False))
    return path


def test_eval_vae_writes_the_rows_and_logs_them(tmp_path, mlflow_store, capsys):
    tiny_prepared(tmp_path / "prepared")  # 16 px blobs: 12 val, 8 test images
    params = write(tmp_path / "params.yaml", {"eval.fid_real_images": 6, "eval.vae_images": 5, "eval.kid_subsets": 3,
                                               "latents.channels": 3, "latents.batch_size": 4})
    torch.manual_seed(0)
    cfg = VAEConfig.from_params(type("P", (), TINY_VAE), in_channels=1, latent_channels=3)
    save_vae(tmp_path / "vae.safetensors", VAE(cfg))
    fid_reference.main(["--params", str(params), "--prepared", str(tmp_path / "prepared"),
                        "--out", str(tmp_path / "fid.safetensors")])
    eval_vae.main(["--params", str(params), "--prepared", str(tmp_path / "prepared"), "--vae",
                   str(tmp_path / "vae.safetensors"), "--fid-reference", str(tmp_path / "fid.safetensors"),
                   "--reports", str(tmp_path / "reports")])
    out = capsys.readouterr().out
    assert "eval_vae: 5 val images vs 6 test images" in out
    metrics = json.loads((tmp_path / "reports/metrics.json").read_text())
    assert metrics["num_images"] == 5 and metrics["num_real"] == 6 and metrics["extractor"].startswith("inception-v3")
    for row in ("real", "blur3", "blur5", "vae"):
        assert metrics[f"{row}/n"] == 5 and metrics[f"{row}/rfid"] > 0, row
    assert metrics["real/psnr"] is None and metrics["real/ssim"] is None
    assert metrics["blur5/grad_ratio"] < metrics["blur3/grad_ratio"] < 1
    assert metrics["blur5/psnr"] < metrics["blur3/psnr"]
    assert metrics["vae/psnr"] < 20  # an untrained VAE reconstructs badly

    mlflow.set_tracking_uri(mlflow_store)
    (run,) = [r for r in mlflow.search_runs(experiment_names=["diffmodels"], output_format="list")
              if r.data.tags["stage"] == "eval_vae"]
    assert run.data.metrics["vae.rfid"] == pytest.approx(metrics["vae/rfid"], abs=1e-5)
    assert run.data.params["eval.vae_images"] == "5" and "real.psnr" not in run.data.metrics
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"metrics.json", "reconstruction_rows.tsv"} <= artifacts


@pytest.mark.parametrize(("value", "message"), [(0, "eval.vae_images must be >= 2 (got 0: not >= 2)"),
                                                ("many", "eval.vae_images must be an integer (>= 2) (got 'many')")])
def test_bad_vae_images_is_one_line_naming_the_key(tmp_path, capsys, value, message):
    params = write(tmp_path / "params.yaml", {"eval.vae_images": value})
    argv = ["--params", str(params), "--prepared", str(tmp_path / "p"), "--vae", str(tmp_path / "v"),
            "--fid-reference", str(tmp_path / "f"), "--reports", str(tmp_path / "r")]
    assert one_line_exit_2(eval_vae.main, argv, capsys) == f"{params}: {message}"
    assert [p.name for p in tmp_path.iterdir()] == ["params.yaml"], "nothing written"
