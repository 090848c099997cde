"""Bad inputs through the stage entry points (issue 10): one clear line on stderr, exit code 2, and
no half-written outputs. Cases covered elsewhere are listed here so the suite reads as one list:

- unknown params key (stage, subprocess): test_prepare_stage.test_bad_param_is_one_line_and_nonzero_exit
- every params rule (library): test_config; ddpm.batch_size > data: test_ddpm_stage
- too few usable images: test_prepare_stage.test_too_few_images_fails_clearly_and_reports_why
- each PIL mode's conversion and EXIF (library): test_data; mask rules (library): test_masks
- damaged / foreign / pickled diffmodels checkpoints (library): test_io; SD checkpoints: test_sd_convert,
  test_sd_stages; a damaged resume checkpoint starts fresh: test_train
- a write failing mid-save, SIGKILL, SIGTERM: test_faults; unreachable MLflow server: test_tracking
"""

from __future__ import annotations

import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from diffmodels.core.checkpoint import load_checkpoint, save_checkpoint
from diffmodels.models.vae import VAE, VAEConfig
from stages import cache_latents, eval_inpaint, prepare, train_ddpm, train_vae
from tests.conftest import params_with, save_image
from tests.fault_support import ddpm_args, shared_store, tiny_workdir


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tiny_workdir(tmp_path_factory.mktemp("bad_inputs"))


@pytest.fixture(scope="module", autouse=True)
def store(tmp_path_factory):
    yield from shared_store(tmp_path_factory)


def one_line_exit_2(main, argv, capsys) -> str:
    """Run a stage's ``main``; assert exit 2 and a single ``error: ...`` line; return the message."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.split("\r")[-1]  # drop a progress bar, if any
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err[len("error: "):-1]


def write_yaml(path: Path, overrides: dict) -> Path:
    path.write_text(yaml.safe_dump(params_with(overrides), sort_keys=False))
    return path


# --------------------------------------------------------------------------------------------
# params
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stage, overrides, message",
    [
        ("prepare", {"data.resolution": "sixty-four"},
         "data.resolution must be an integer (>= 16, <= 1024, a multiple of 8) (got 'sixty-four')"),
        ("prepare", {"data.max_train": 0}, "data.max_train must be >= 1 (got 0: not >= 1)"),
        ("train_vae", {"vae.upsample": "bilinear"}, "vae.upsample must be one of 'nearest', 'pixel_shuffle'; got 'bilinear'"),
        ("train_ddpm", {"ddpm.mixer": "atention"},
         "ddpm.mixer must be one of 'serpentine', 'attention', 'none'; got 'atention' (did you mean 'attention'?)"),
        ("train_ddpm", {"ddpm.lr": -1.0e-3}, "ddpm.lr must be > 0, <= 1 (got -0.001: not > 0)"),
        ("train_ddpm", {"ddpm.btach_size": 8}, "unknown key 'ddpm.btach_size' (did you mean 'ddpm.batch_size'?)"),
    ],
)
def test_bad_params_stop_the_stage_before_it_writes(tmp_path, capsys, stage, overrides, message):
    params = write_yaml(tmp_path / "params.yaml", overrides)
    main = {"prepare": prepare.main, "train_vae": train_vae.main, "train_ddpm": train_ddpm.main}[stage]
    argv = {"prepare": ["--prepared", "p", "--masks", "m", "--reports", "r", "--raw", "w"],
            "train_vae": ["--prepared", "p", "--out", "o/vae.safetensors", "--reports", "r", "--checkpoints", "c"],
            "train_ddpm": ["--latents", "l", "--vae", "v", "--prepared", "p", "--out", "o/ddpm.safetensors",
                           "--reports", "r", "--checkpoints", "c"]}[stage]
    argv = ["--params", str(params), *(str(tmp_path / a) if i % 2 else a for i, a in enumerate(argv))]
    assert one_line_exit_2(main, argv, capsys) == f"{params}: {message}"
    assert [p.name for p in tmp_path.iterdir()] == ["params.yaml"], "nothing written"


def test_vae_batch_larger_than_the_data(work, tmp_path, capsys):
    raw = yaml.safe_load((work / "params.yaml").read_text())
    raw["vae"]["batch_size"] = 500
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    msg = one_line_exit_2(train_vae.main, ["--params", str(params), "--prepared", str(work / "prepared"),
                                           "--out", str(tmp_path / "vae.safetensors"), "--reports", str(tmp_path / "r"),
                                           "--checkpoints", str(tmp_path / "c")], capsys)
    assert msg == "vae.batch_size 500 is larger than the training set (48 images)"
    assert not (tmp_path / "vae.safetensors").exists() and not (tmp_path / "c").exists()


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------

FOLDER = {"data.dataset": "folder", "data.labels": False, "data.resolution": 16, "data.channels": 3, "data.val_fraction": 0.2,
          "data.test_fraction": 0.2, "data.min_images": 5, "data.masks_per_set": 2, "data.preview_images": 4}


def run_prepare(tmp_path, source: Path, capsys, expect_error: bool = True):
    params = write_yaml(tmp_path / "params.yaml", {**FOLDER, "data.source": str(source)})
    argv = ["--params", str(params), "--prepared", str(tmp_path / "out/prepared"), "--masks", str(tmp_path / "out/masks"),
            "--reports", str(tmp_path / "out/reports"), "--raw", str(tmp_path / "out/raw")]
    if expect_error:
        return one_line_exit_2(prepare.main, argv, capsys)
    prepare.main(argv)
    return capsys.readouterr().out


def assert_only_the_skip_report(tmp_path):
    """A failed prepare leaves the skip report (it says why) and nothing else."""
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*")) == [
        "reports", "reports/skipped.csv"]


def test_missing_folder(tmp_path, capsys):
    msg = run_prepare(tmp_path, tmp_path / "nowhere", capsys)
    assert msg == f"data.source: {tmp_path / 'nowhere'} is not a folder (set data.source to a folder of images)"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", ["empty", "all_corrupt", "no_images"])
def test_folders_without_a_usable_image(tmp_path, capsys, content):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    if content == "all_corrupt":
        for i in range(3):
            good = save_image(tmp_path / f"good{i}.png", seed=i).read_bytes()
            (src / "a" / f"img{i}.png").write_bytes(good[: len(good) // 3])  # truncated
        (src / "a" / "zero.jpg").write_bytes(b"")
        (src / "a" / "text.png").write_text("not a picture")
    elif content == "no_images":
        (src / "a" / "notes.txt").write_text("hello")
        (src / "a" / "table.csv").write_text("a,b\n1,2\n")
    skipped = {"empty": 0, "all_corrupt": 5, "no_images": 2}[content]
    msg = run_prepare(tmp_path, src, capsys)
    assert msg == (f"only 0 usable images in folder {src} ({skipped} skipped, see {tmp_path / 'out/reports/skipped.csv'}); "
                   "data.min_images is 5")
    assert_only_the_skip_report(tmp_path)


def huge_png(path: Path, side: int = 40_000) -> Path:
    """A 300-byte PNG whose header declares side x side pixels (1.6 gigapixels): a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (side + 1) * 4)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def test_odd_image_modes_are_used_and_a_huge_image_is_skipped(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        save_image(src / f"rgb{i}.jpg", seed=i)
    save_image(src / "gray.png", mode="L")
    save_image(src / "rgba.png", mode="RGBA")
    save_image(src / "deep.png", mode="I;16")
    save_image(src / "cmyk.jpg", mode="CMYK")
    Image.new("P", (20, 20), 3).save(src / "palette.bmp")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 to display
    Image.new("RGB", (30, 12), (200, 10, 10)).save(src / "rotated.jpg", exif=exif)
    huge_png(src / "huge.png")
    out = run_prepare(tmp_path, src, capsys, expect_error=False)
    assert out.startswith("prepare: 6 train / 2 val / 2 test images at 16px x3, 0 classes, 1 skipped,"), out
    skipped = (tmp_path / "out/reports/skipped.csv").read_text().splitlines()
    assert len(skipped) == 2 and skipped[1].startswith("huge.png,too_large,")
    counts = [len(np.load(tmp_path / f"out/prepared/{s}_images.npy")) for s in ("train", "val", "test")]
    assert sum(counts) == 10, "every odd-mode image was used"


# --------------------------------------------------------------------------------------------
# masks (eval_inpaint reads them)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("defect", ["wrong_size", "not_binary", "not_a_png"])
def test_bad_mask_files(work, tmp_path, capsys, defect):
    import shutil

    masks = tmp_path / "masks"
    shutil.copytree(work / "masks", masks)
    bad = masks / "centre_aligned" / "00001.png"
    if defect == "wrong_size":
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(bad)
        expected = f"{bad}: mask is 32x32, images are 16x16"
    elif defect == "not_binary":
        Image.fromarray(np.full((16, 16), 128, np.uint8)).save(bad)
        expected = f"{bad}: mask is not binary (values other than 0 and 255)"
    else:
        bad.write_bytes(b"GIF89a garbage")
        expected = f"{bad}: not a readable PNG mask (cannot identify image file '{bad}'); rerun `dvc repro prepare`"
    msg = one_line_exit_2(eval_inpaint.main, [
        "--params", str(work / "params.yaml"), "--ddpm", str(work / "ddpm.safetensors"), "--vae", str(work / "vae.safetensors"),
        "--prepared", str(work / "prepared"), "--masks", str(masks), "--reports", str(tmp_path / "reports"),
        "--fid-reference", str(work / "fid.safetensors")], capsys)  # never read: the masks fail first
    assert msg == expected
    assert not (tmp_path / "reports").exists()


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this runs code: it creates ``marker``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def bad_vae(work: Path, tmp_path: Path, defect: str) -> tuple[Path, str]:
    path = tmp_path / "vae.safetensors"
    good = (work / "vae.safetensors").read_bytes()
    if defect == "truncated":
        path.write_bytes(good[: len(good) // 2])
        return path, f"{path}: not a readable safetensors checkpoint ("
    if defect == "pickle":
        with open(path, "wb") as fh:
            pickle.dump({"state_dict": {}, "payload": _Payload(str(tmp_path / "pwned"))}, fh)
        return path, f"{path}: not a readable safetensors checkpoint ("
    if defect == "denoiser":
        path.write_bytes((work / "ddpm.safetensors").read_bytes())
        return path, f"{path}: not VAE weights (kind 'ddpm'); run `dvc repro train_vae`"
    # other architecture: the header says one VAE, the tensors are another's
    ckpt = load_checkpoint(work / "vae.safetensors")
    other = VAEConfig.from_dict({**ckpt.meta["config"], "base_channels": 8})
    save_checkpoint(path, VAE(other).state_dict(), ckpt.meta)
    return path, f"{path}: weights do not fit VAE: "


@pytest.mark.parametrize("defect", ["truncated", "pickle", "denoiser", "architecture"])
def test_bad_vae_weights(work, tmp_path, capsys, defect):
    path, expected = bad_vae(work, tmp_path, defect)
    msg = one_line_exit_2(cache_latents.main, [
        "--params", str(work / "params.yaml"), "--prepared", str(work / "prepared"), "--vae", str(path),
        "--out", str(tmp_path / "latents"), "--reports", str(tmp_path / "reports")], capsys)
    assert msg.startswith(expected), msg
    if defect == "architecture":
        assert "wrong shape" in msg and msg.endswith("(was it written with other model params?)")
    assert not (tmp_path / "pwned").exists(), "the pickle's code never ran"
    assert not (tmp_path / "latents").exists() and not (tmp_path / "reports").exists()


def test_bad_latent_cache(work, tmp_path, capsys):
    import shutil

    shutil.copytree(work / "latents", tmp_path / "latents")
    data = (tmp_path / "latents/train.safetensors").read_bytes()
    (tmp_path / "latents/train.safetensors").write_bytes(data[:100])
    args = ddpm_args(work, tmp_path / "run")
    args[args.index("--latents") + 1] = str(tmp_path / "latents")
    msg = one_line_exit_2(train_ddpm.main, args, capsys)
    assert msg.startswith(f"{tmp_path / 'latents/train.safetensors'}: not a readable safetensors checkpoint (")
    assert not (tmp_path / "run").exists()


def test_damaged_mlflow_store(work, tmp_path, capsys, monkeypatch):
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"\x13" * 4096)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    msg = one_line_exit_2(cache_latents.main, [
        "--params", str(work / "params.yaml"), "--prepared", str(work / "prepared"), "--vae", str(work / "vae.safetensors"),
        "--out", str(tmp_path / "latents"), "--reports", str(tmp_path / "reports")], capsys)
    assert msg == f"cannot open an MLflow run in sqlite:///{db}: (sqlite3.DatabaseError) file is not a database"
    assert not (tmp_path / "latents").exists()
