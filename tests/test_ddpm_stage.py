"""train_ddpm as DVC runs it, on latents of a tiny VAE (in-process, one thread)."""

import json

import mlflow
import pytest
import torch
import yaml

from diffmodels.core.checkpoint import load_checkpoint
from diffmodels.diffusion.denoiser import load_denoiser
from stages import cache_latents, train_ddpm, train_vae
from tests.vae_support import tiny_params, tiny_prepared

pytestmark = pytest.mark.usefixtures("one_thread", "mlflow_store")

TINY_DDPM = {
    "num_steps": 50, "base_channels": 8, "channel_mult": [1, 2], "blocks_per_level": 1, "norm_groups": 4,
    "mixer_downsample": [1, 2], "ssm_state": 4, "steps": 10, "warmup_steps": 2, "batch_size": 8,
    "checkpoint_every": 5, "log_every": 1, "sample_every": 4, "sample_steps": 3, "device": "cpu",
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """prepared data -> tiny VAE -> latent cache, built once for the module (16 px -> 2x2 latents)."""
    root = tmp_path_factory.mktemp("ddpm_stage")
    tiny_prepared(root / "prepared")
    params = tiny_params(root / "params.yaml")
    raw = yaml.safe_load(params.read_text())
    raw["ddpm"] = {**raw["ddpm"], **TINY_DDPM}
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_vae.main(["--params", str(params), "--prepared", str(root / "prepared"),
                        "--out", str(root / "vae.safetensors"), "--reports", str(root / "vae_reports"),
                        "--checkpoints", str(root / "vae_ckpt")])
        cache_latents.main(["--params", str(params), "--prepared", str(root / "prepared"),
                            "--vae", str(root / "vae.safetensors"), "--out", str(root / "latents"),
                            "--reports", str(root / "latent_reports")])
    finally:
        torch.set_num_threads(before)
        mp.undo()
    return root


def ddpm_args(data, out, params, name):
    return ["--params", str(params), "--latents", str(data / "latents"), "--vae", str(data / "vae.safetensors"),
            "--prepared", str(data / "prepared"), "--out", str(out / name / "ddpm.safetensors"),
            "--reports", str(out / name / "reports"), "--checkpoints", str(out / name / "ckpt")]


def with_ddpm(workdir, tmp_path, **overrides):
    raw = yaml.safe_load((workdir / "params.yaml").read_text())
    raw["ddpm"].update(overrides)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_train_resume_equivalence_outputs_and_tracking(workdir, tmp_path, mlflow_store, capsys):
    params = with_ddpm(workdir, tmp_path)
    train_ddpm.main(ddpm_args(workdir, tmp_path, params, "a"))
    assert "train_ddpm: 10 steps (0 resumed)" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "a/reports/metrics.json").read_text())
    assert metrics["num_classes"] == 3 and metrics["steps"] == 10 and metrics["latents_per_second"] > 0
    assert len((tmp_path / "a/reports/loss.tsv").read_text().splitlines()) == 11
    assert not (tmp_path / "a/ckpt/last.safetensors").exists()

    # killed after step 7 (as SIGKILL would leave it), then resumed: same raw and EMA weights
    train_ddpm.main(ddpm_args(workdir, tmp_path, params, "b") + ["--stop-after", "7"])
    train_ddpm.main(ddpm_args(workdir, tmp_path, params, "b"))
    assert "resumed from" in capsys.readouterr().out
    a, b = load_checkpoint(tmp_path / "a/ddpm.safetensors"), load_checkpoint(tmp_path / "b/ddpm.safetensors")
    assert a.tensors.keys() == b.tensors.keys() and any(k.startswith("ema/") for k in a.tensors)
    assert max((a.tensors[k] - b.tensors[k]).abs().max().item() for k in a.tensors) == 0.0
    assert (tmp_path / "a/reports/loss.tsv").read_text() == (tmp_path / "b/reports/loss.tsv").read_text()

    # the weights file rebuilds the model alone; EMA weights differ from the raw ones
    model, schedule, meta = load_denoiser(tmp_path / "a/ddpm.safetensors")
    raw_model, _, _ = load_denoiser(tmp_path / "a/ddpm.safetensors", weights="model")
    assert schedule.num_steps == 50 and meta["class_names"] == ["a", "b", "c"] and meta["scale_factor"] > 0
    x, t = torch.randn(2, 3, 2, 2), torch.tensor([5, 40])
    with torch.no_grad():
        assert model(x, t).shape == x.shape
        assert not torch.equal(model(x, t), raw_model(x, t))

    mlflow.set_tracking_uri(mlflow_store)
    runs = mlflow.search_runs(experiment_names=["diffmodels"], filter_string="tags.stage = 'train_ddpm'",
                              output_format="list")
    # run "a": uninterrupted, so it logged the final metrics (the stopped run "b" did not)
    run = next(r for r in runs if r.data.tags["resumed_from_step"] == "0" and "steps_per_second" in r.data.metrics)
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == list(range(1, 11))
    samples = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "samples")}
    assert samples == {"samples/step_000004.png", "samples/step_000008.png"}


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(workdir, tmp_path, monkeypatch, capsys):
    params = with_ddpm(workdir, tmp_path)
    real_loss, calls = train_ddpm.diffusion_loss, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == 7 else loss

    monkeypatch.setattr(train_ddpm, "diffusion_loss", poisoned)
    with pytest.raises(SystemExit) as exit_info:
        train_ddpm.main(ddpm_args(workdir, tmp_path, params, "nan"))
    assert exit_info.value.code == 2
    *progress, err = capsys.readouterr().err.splitlines()
    assert "non-finite loss at step 7" in err and "last good checkpoint is kept" in err
    assert all(line.startswith("train_ddpm: ") and " step (" in line for line in progress)  # steps 1 to 6
    ckpt = load_checkpoint(tmp_path / "nan/ckpt/last.safetensors")
    assert ckpt.meta["step"] == 5
    assert not (tmp_path / "nan/ddpm.safetensors").exists()


def test_batch_larger_than_the_data_is_one_line(workdir, tmp_path, capsys):
    params = with_ddpm(workdir, tmp_path, batch_size=1000)
    with pytest.raises(SystemExit):
        train_ddpm.main(ddpm_args(workdir, tmp_path, params, "big"))
    assert "ddpm.batch_size 1000 is larger than the training set (48 latents)" in capsys.readouterr().err
