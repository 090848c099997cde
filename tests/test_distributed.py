"""Data-parallel training (torch.distributed + DDP): two gloo processes take the one-process steps.

Each two-process run goes through the real stage entry point: ``main()`` reads
``distributed.nproc_per_node: 2`` and re-runs the stage under torchrun's launcher with two
workers on one thread each; rank 0 writes. Compared with one process and the same global batch,
the per-step losses and gradient norms agree to float summation order, and a checkpoint written
by two processes resumes in one.
"""

import json
import re

import mlflow
import pytest
import torch
import yaml

from diffmodels.core.checkpoint import load_checkpoint
from diffmodels.core.config import parse_params
from diffmodels.core.errors import DiffmodelsError, ParamsError
from diffmodels.diffusion.denoiser import load_denoiser
from diffmodels.diffusion.objectives import diffusion_loss
from diffmodels.diffusion.schedule import NoiseSchedule
from diffmodels.models.unet import UNet, UNetConfig
from diffmodels.models.vae import load_vae
from diffmodels.training.distributed import World, backend_for
from stages import cache_latents, train_ddpm, train_vae
from tests.conftest import params_with
from tests.test_ddpm_stage import TINY_DDPM, ddpm_args
from tests.vae_support import tiny_params, tiny_prepared

pytestmark = pytest.mark.usefixtures("one_thread")

# Relative tolerances per loss.tsv column. Two half-batch means and all-reduced gradients round
# differently from one process; Adam turns those 1e-7 differences into ~1e-5 on the loss over a
# few steps, more on the small KL term and on the gradient norm. lr is exact (same step count).
RTOL = {"loss": 1e-4, "recon": 1e-4, "kl": 1e-3, "grad_norm": 1e-3, "lr": 0.0}


@pytest.fixture(autouse=True)
def store(workdir, mlflow_store, monkeypatch):
    """The module's MLflow store (created once: a new sqlite store costs seconds of migrations),
    and one thread per worker process."""
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return uri


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """prepared data -> tiny VAE (one process) -> latent cache (16 px images, 2x2 latents)."""
    root = tmp_path_factory.mktemp("distributed")
    tiny_prepared(root / "prepared")
    params = tiny_params(root / "params.yaml")
    raw = yaml.safe_load(params.read_text())
    raw["ddpm"] = {**raw["ddpm"], **TINY_DDPM, "sample_every": 100}
    # MSE, not L1: L1's gradient is sign(error), so pixels whose error is ~0 flip sign under a
    # different summation order and move the gradient norm by ~1% in one step; a smooth loss
    # makes the comparison measure the data parallelism, not L1's kinks.
    raw["vae"]["loss"] = "mse"
    raw["tracking"]["log_images"] = False
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_vae.main(vae_args(root, root, params, "vae"))
        cache_latents.main(["--params", str(params), "--prepared", str(root / "prepared"),
                            "--vae", str(root / "vae/vae.safetensors"), "--out", str(root / "latents"),
                            "--reports", str(root / "latent_reports")])
    finally:
        torch.set_num_threads(before)
        mp.undo()
    (root / "vae.safetensors").symlink_to(root / "vae/vae.safetensors")  # where ddpm_args looks
    return root


def vae_args(data, out, params, name):
    return ["--params", str(params), "--prepared", str(data / "prepared"), "--out", str(out / name / "vae.safetensors"),
            "--reports", str(out / name / "reports"), "--checkpoints", str(out / name / "ckpt")]


def with_processes(workdir, tmp_path, nproc, name="params.yaml"):
    raw = yaml.safe_load((workdir / "params.yaml").read_text())
    raw["distributed"]["nproc_per_node"] = nproc
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def loss_table(path):
    lines = path.read_text().splitlines()
    return lines[0].split("\t"), torch.tensor([[float(v) for v in line.split("\t")] for line in lines[1:]], dtype=torch.float64)


def assert_same_trajectory(one, two):
    header, rows_one = loss_table(one)
    header_two, rows_two = loss_table(two)
    assert header == header_two and rows_one.shape == rows_two.shape
    assert torch.equal(rows_one[:, 0], rows_two[:, 0])  # the same steps
    for i, column in enumerate(header[1:], start=1):
        torch.testing.assert_close(
            rows_two[:, i], rows_one[:, i], rtol=RTOL[column], atol=1e-7, msg=lambda m, c=column: f"{c}: {m}"
        )


def runs_with_world_size(uri, stage, size):
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["diffmodels"], output_format="list",
                              filter_string=f"tags.stage = '{stage}' and tags.world_size = '{size}'")
    return runs


def test_vae_two_processes_follow_the_one_process_run(workdir, tmp_path, store, capfd):
    params = with_processes(workdir, tmp_path, 2)
    train_vae.main(vae_args(workdir, tmp_path, params, "two"))
    out = capfd.readouterr().out
    assert "train_vae: 12 steps (0 resumed) on cpu float32 x 2 processes" in out
    assert out.count("train_vae: 12 steps") == 1  # rank 0 alone reports

    # every step (loss, recon, kl, lr, grad norm) as in the one-process run with the same batch of 8
    assert_same_trajectory(workdir / "vae/reports/loss.tsv", tmp_path / "two/reports/loss.tsv")
    metrics = json.loads((tmp_path / "two/reports/metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 12
    one, _ = load_vae(workdir / "vae/vae.safetensors")
    two, _ = load_vae(tmp_path / "two/vae.safetensors")  # one process loads the two-process weights
    # Adam's steps of up to lr = 3e-3 per weight; the runs part by float rounding only (< 1e-4)
    for (name, a), (_, b) in zip(one.state_dict().items(), two.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")

    # one MLflow run (rank 0's), with the periodic validation only rank 0 runs
    [run] = runs_with_world_size(store, "train_vae", 2)
    assert run.data.params["distributed.nproc_per_node"] == "2"
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == list(range(1, 13))
    assert "val_psnr" in run.data.metrics


def test_ddpm_two_processes_then_resume_in_one(workdir, tmp_path, store, capfd):
    one_proc, two_procs = with_processes(workdir, tmp_path, 1, "one.yaml"), with_processes(workdir, tmp_path, 2, "two.yaml")
    train_ddpm.main(ddpm_args(workdir, tmp_path, one_proc, "one"))

    # two processes stop after step 6; the checkpoint is rank 0's, with plain (not DDP) names
    resumed = ddpm_args(workdir, tmp_path, two_procs, "resumed")
    train_ddpm.main(resumed + ["--stop-after", "6"])
    assert capfd.readouterr().out.count("stopped after step 6") == 1
    ckpt = load_checkpoint(tmp_path / "resumed/ckpt/last.safetensors")
    assert ckpt.meta["step"] == 6 and ckpt.meta["sampler"]["batch_size"] == 8
    assert not any(k.startswith(("model/module.", "ema/module.")) for k in ckpt.tensors)
    assert len(runs_with_world_size(store, "train_ddpm", 2)) == 1

    # one process continues from it: steps 1..6 (two processes) and 7..10 (one) match the straight run
    resumed[resumed.index(str(two_procs))] = str(one_proc)
    train_ddpm.main(resumed)
    assert "resumed from" in capfd.readouterr().out
    assert_same_trajectory(tmp_path / "one/reports/loss.tsv", tmp_path / "resumed/reports/loss.tsv")
    a, b = load_checkpoint(tmp_path / "one/ddpm.safetensors"), load_checkpoint(tmp_path / "resumed/ddpm.safetensors")
    assert a.tensors.keys() == b.tensors.keys()
    for name in a.tensors:
        torch.testing.assert_close(b.tensors[name], a.tensors[name], rtol=1e-3, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    model, _, _ = load_denoiser(tmp_path / "resumed/ddpm.safetensors")
    assert model(torch.randn(2, 3, 2, 2), torch.tensor([5, 40]), torch.tensor([0, 1])).shape == (2, 3, 2, 2)


def test_failed_workers_are_one_line(workdir, tmp_path, capfd):
    params = with_processes(workdir, tmp_path, 2)
    args = ddpm_args(workdir, tmp_path, params, "broken")
    args[args.index("--latents") + 1] = str(tmp_path / "missing")
    with pytest.raises(SystemExit) as exit_info:
        train_ddpm.main(args)
    assert exit_info.value.code == 2
    err = capfd.readouterr().err
    # Each worker prints its own line; the launcher may stop the second before it gets that far.
    assert err.count("latent cache missing") in (1, 2), err
    last = err.strip().splitlines()[-1]
    # ... and stop the other one (SIGTERM) before or after it fails: the order of ranks varies.
    assert re.fullmatch(r"error: stages\.train_ddpm: [12] of 2 training processes failed \([^)]*rank \d exit code 2[^)]*\); "
                        r"see their errors above", last), last


def test_shard_losses_and_gradients_average_to_the_global_batch():
    """What each DDP rank computes: its rows of the global batch, with the global batch's noise."""
    torch.manual_seed(0)
    model = UNet(UNetConfig(in_channels=3, latent_size=4, base_channels=8, channel_mult=(1, 2), blocks_per_level=1,
                            mixer="none", mixer_downsample=(), num_classes=3, norm_groups=4))
    schedule = NoiseSchedule.from_kind("linear", 50)
    z0, labels = torch.randn(8, 3, 4, 4), torch.arange(8) % 3

    def loss_and_grads(rows):
        model.zero_grad()
        loss = diffusion_loss(model, schedule, z0, labels, torch.Generator().manual_seed(1), prediction="v",
                              cond_dropout=0.5, null_label=model.null_label, rows=rows)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    full_loss, full_grads = loss_and_grads(None)
    shards = [loss_and_grads(World(rank=r, size=4).rows(8)) for r in range(4)]
    torch.testing.assert_close(torch.stack([loss for loss, _ in shards]).mean(), full_loss)
    for i, grad in enumerate(full_grads):  # DDP's average of the ranks' gradients
        torch.testing.assert_close(torch.stack([grads[i] for _, grads in shards]).mean(0), grad)
    assert not torch.allclose(shards[0][0], shards[1][0])  # the ranks did see different rows


def test_batches_must_split_evenly():
    with pytest.raises(ParamsError) as info:
        parse_params(params_with({"distributed.nproc_per_node": 3, "vae.batch_size": 32, "ddpm.batch_size": 64}))
    message = str(info.value)
    assert "vae.batch_size 32 must be a multiple of distributed.nproc_per_node 3" in message
    assert "ddpm.batch_size 64 must be a multiple" in message
    with pytest.raises(ParamsError, match="distributed.backend must be one of"):
        parse_params(params_with({"distributed.backend": "mpi"}))

    worlds = [World(rank=r, size=4) for r in range(4)]
    assert [w.rows(8) for w in worlds] == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    assert [w.main for w in worlds] == [True, False, False, False]
    with pytest.raises(DiffmodelsError, match="ddpm.batch_size 6 does not split over 4 training processes"):
        worlds[1].check_batch(6, "ddpm.batch_size")
    assert World().mean(torch.tensor([1.5])).item() == 1.5 and World().rows(5) == slice(0, 5)
    assert backend_for(torch.device("cpu"), "auto") == "gloo"
    with pytest.raises(DiffmodelsError, match="nccl needs CUDA"):
        backend_for(torch.device("cpu"), "nccl")
