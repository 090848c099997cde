"""train_vae and cache_latents as DVC runs them, on a tiny prepared dataset (in-process)."""

import json

import mlflow
import pytest
import torch

from diffmodels.core.checkpoint import load_checkpoint
from diffmodels.data.latent_cache import SCALE_FACTOR_DEFINITION, load_split
from diffmodels.models.vae import load_vae
from stages import cache_latents, train_vae
from tests.vae_support import tiny_params, tiny_prepared

pytestmark = pytest.mark.usefixtures("one_thread")


def train_args(tmp_path, params, name):
    return ["--params", str(params), "--prepared", str(tmp_path / "prepared"),
            "--out", str(tmp_path / name / "vae.safetensors"), "--reports", str(tmp_path / name / "reports"),
            "--checkpoints", str(tmp_path / name / "ckpt")]


def test_train_cache_resume_and_tracking(tmp_path, mlflow_store, capsys):
    tiny_prepared(tmp_path / "prepared")
    params = tiny_params(tmp_path / "params.yaml")

    # 1. straight run of 12 steps
    train_vae.main(train_args(tmp_path, params, "a"))
    out = capsys.readouterr().out
    assert "no checkpoint: starting from step 0" in out and "train_vae: 12 steps (0 resumed)" in out
    assert not (tmp_path / "a/ckpt/last.safetensors").exists()  # removed once the outs exist
    metrics = json.loads((tmp_path / "a/reports/metrics.json").read_text())
    loss_rows = (tmp_path / "a/reports/loss.tsv").read_text().splitlines()
    assert loss_rows[0].split("\t") == ["step", "loss", "recon", "kl", "lr", "grad_norm"] and len(loss_rows) == 13
    assert (tmp_path / "a/reports/reconstructions.png").stat().st_size > 0
    val_rows = [r.split("\t") for r in (tmp_path / "a/reports/val.tsv").read_text().splitlines()]
    assert val_rows[0] == ["step", "val_psnr", "val_ssim"] and [r[0] for r in val_rows[1:]] == ["6", "12"]
    assert float(val_rows[-1][1]) == pytest.approx(metrics["val_psnr"], abs=1e-3)  # the final validation
    assert metrics["num_val_images"] == 12 and metrics["decoder_halo_px"] == 22

    # 2. killed after step 5 (a checkpoint is left), then resumed: the same weights
    train_vae.main(train_args(tmp_path, params, "b") + ["--stop-after", "5"])
    assert (tmp_path / "b/ckpt/last.safetensors").exists() and not (tmp_path / "b/vae.safetensors").exists()
    train_vae.main(train_args(tmp_path, params, "b"))
    assert "at step 5" in capsys.readouterr().out
    a, b = load_checkpoint(tmp_path / "a/vae.safetensors"), load_checkpoint(tmp_path / "b/vae.safetensors")
    assert a.tensors.keys() == b.tensors.keys()
    assert max((a.tensors[k] - b.tensors[k]).abs().max().item() for k in a.tensors) <= 1e-6
    assert (tmp_path / "b/reports/loss.tsv").read_text() == (tmp_path / "a/reports/loss.tsv").read_text()
    assert (tmp_path / "b/reports/val.tsv").read_text() == (tmp_path / "a/reports/val.tsv").read_text()

    # 3. the latent cache of run a
    cache_latents.main(["--params", str(params), "--prepared", str(tmp_path / "prepared"),
                        "--vae", str(tmp_path / "a/vae.safetensors"), "--out", str(tmp_path / "latents"),
                        "--reports", str(tmp_path / "cl"), "--device", "cpu"])
    manifest = json.loads((tmp_path / "latents/manifest.json").read_text())
    assert manifest["splits"] == {s: {"file": f"{s}.safetensors", "count": n} for s, n in
                                  (("train", 48), ("val", 12), ("test", 8))}
    assert manifest["scale_factor_definition"] == SCALE_FACTOR_DEFINITION
    train = load_split(tmp_path / "latents", "train")
    assert train["mean"].shape == train["logvar"].shape == (48, 3, 2, 2) and train["labels"].dtype == torch.int16
    assert manifest["scale_factor"] == pytest.approx(1.0 / train["mean"].double().std(correction=0).item(), rel=1e-12)
    vae, _ = load_vae(tmp_path / "a/vae.safetensors")
    with torch.no_grad():  # the cache holds the posterior means of the frozen VAE
        from tests.vae_support import (
            blob_images,  # same images as the prepared train split
        )
        x = torch.from_numpy(blob_images(48, 16, seed=0)).permute(0, 3, 1, 2).float() / 127.5 - 1
        torch.testing.assert_close(vae.encode(x)[0], train["mean"], rtol=1e-5, atol=1e-6)
    cache_metrics = json.loads((tmp_path / "cl/metrics.json").read_text())
    assert cache_metrics["val_psnr"] == pytest.approx(metrics["val_psnr"], abs=1e-3)  # through the cache
    assert cache_metrics["val_ssim"] == pytest.approx(metrics["val_ssim"], abs=1e-4)
    assert set(cache_metrics["channel_std"]) == {"c0", "c1", "c2"}

    # 4. MLflow: every stage run recorded, with per-step loss history
    mlflow.set_tracking_uri(mlflow_store)
    runs = mlflow.search_runs(experiment_names=["diffmodels"], output_format="list")
    by_stage = sorted((r.data.tags["stage"], r.data.tags["resumed_from_step"] if "resumed_from_step" in r.data.tags else "-")
                      for r in runs)
    assert by_stage == [("cache_latents", "-"), ("train_vae", "0"), ("train_vae", "0"), ("train_vae", "5")]
    first = next(r for r in runs if r.info.run_id == sorted(runs, key=lambda r: r.info.start_time)[0].info.run_id)
    client = mlflow.MlflowClient()
    assert [m.step for m in client.get_metric_history(first.info.run_id, "loss")] == list(range(1, 13))
    assert [m.step for m in client.get_metric_history(first.info.run_id, "val_psnr")] == [6, 12]
    assert first.data.params["vae.decoder_kernel"] == "3"
    artifacts = {a.path for a in client.list_artifacts(first.info.run_id)}
    assert {"metrics.json", "loss.tsv", "val.tsv", "reconstructions.png", "reconstructions"} <= artifacts


def test_changed_params_start_fresh(tmp_path, mlflow_store, capsys):
    tiny_prepared(tmp_path / "prepared")
    train_vae.main(train_args(tmp_path, tiny_params(tmp_path / "p1.yaml"), "run") + ["--stop-after", "3"])
    train_vae.main(train_args(tmp_path, tiny_params(tmp_path / "p2.yaml", {"lr": 1e-3}), "run"))
    out = capsys.readouterr().out
    assert "written with other params, data or code: starting fresh from step 0" in out
    assert "12 steps (0 resumed)" in out


def test_latent_channel_mismatch_is_one_line(tmp_path, mlflow_store, capsys):
    tiny_prepared(tmp_path / "prepared")
    train_vae.main(train_args(tmp_path, tiny_params(tmp_path / "p.yaml", {"steps": 3}), "run"))
    with pytest.raises(SystemExit) as exit_info:
        cache_latents.main(["--params", str(tiny_params(tmp_path / "q.yaml", latents={"channels": 4})),
                            "--prepared", str(tmp_path / "prepared"), "--vae", str(tmp_path / "run/vae.safetensors"),
                            "--out", str(tmp_path / "latents"), "--reports", str(tmp_path / "cl")])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]  # earlier lines: train_vae's MLflow chatter
    assert last.startswith("error: ")
    assert last.endswith("has 3 latent channels but latents.channels is 4; run `dvc repro train_vae`")


def test_gan_training_resumes_exactly_and_saves_the_discriminator(tmp_path, mlflow_store, capsys):
    """Conventional arch + PatchGAN + frequency term: killed after step 5 (the GAN on since step 3)
    and resumed, the VAE *and* the discriminator end bitwise equal to a straight run."""
    from diffmodels.models.discriminator import load_discriminator

    tiny_prepared(tmp_path / "prepared")
    params = tiny_params(tmp_path / "params.yaml", vae={
        "arch": "conventional", "norm_groups": 2, "disc_weight": 0.5, "disc_start": 3, "freq_weight": 0.1,
        "steps": 8, "val_every": 100})
    train_vae.main(train_args(tmp_path, params, "a"))
    train_vae.main(train_args(tmp_path, params, "b") + ["--stop-after", "5"])
    train_vae.main(train_args(tmp_path, params, "b"))
    assert "at step 5" in capsys.readouterr().out
    a, b = load_checkpoint(tmp_path / "a/vae.safetensors"), load_checkpoint(tmp_path / "b/vae.safetensors")
    assert a.tensors.keys() == b.tensors.keys() and any(k.startswith("discriminator/") for k in a.tensors)
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    rows = [r.split("\t") for r in (tmp_path / "a/reports/loss.tsv").read_text().splitlines()]
    assert rows[0] == ["step", "loss", "recon", "kl", "freq", "g_loss", "d_loss", "disc_lambda", "lr", "grad_norm"]
    d_loss = [float(r[6]) for r in rows[1:]]
    assert d_loss[:3] == [0.0, 0.0, 0.0] and all(v > 0 for v in d_loss[3:])  # off before disc_start
    assert (tmp_path / "b/reports/loss.tsv").read_text() == (tmp_path / "a/reports/loss.tsv").read_text()
    vae, meta = load_vae(tmp_path / "a/vae.safetensors")  # the discriminator is skipped
    assert vae.config.arch == "conventional" and meta["discriminator"]["layers"] == 2
    load_discriminator(tmp_path / "a/vae.safetensors")
    metrics = json.loads((tmp_path / "a/reports/metrics.json").read_text())
    assert metrics["receptive_field"] == "global" and metrics["decoder_halo_px"] is None
    assert metrics["disc_num_parameters"] > 0
