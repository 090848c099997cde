import gzip
import hashlib

import numpy as np
import pytest
from PIL import Image

from diffmodels.core.errors import DataError
from diffmodels.data import datasets
from tests.conftest import save_image


def test_folder_skips_exactly_the_broken_files(image_folder):
    collected = datasets.collect_folder(image_folder, labels=True, resolution=16, channels=3)
    assert collected.images.shape == (50, 16, 16, 3) and collected.images.dtype == np.uint8
    assert collected.class_names == ["cats", "dogs"]
    assert sorted((s.path, s.reason) for s in collected.skipped) == [
        ("cats/notes.png", "not_an_image"),
        ("cats/truncated.png", "truncated"),
        ("dogs/empty.jpg", "empty"),
    ]
    # labels follow the sub-folder: even indices were written to dogs/, odd to cats/
    assert np.bincount(collected.labels) .tolist() == [25, 25]


def test_folder_non_image_extensions_hidden_files_and_unlabelled_files(tmp_path):
    root = tmp_path / "src"
    save_image(root / "a" / "x.png")
    save_image(root / "top.png")
    (root / "a" / "readme.txt").write_text("hi")
    (root / ".DS_Store").write_bytes(b"junk")
    save_image(root / ".hidden" / "y.png")
    files, skipped = datasets.scan_folder(root, labels=True)
    assert [p.name for p, _ in files] == ["x.png"]
    assert {(s.path, s.reason) for s in skipped} == {("a/readme.txt", "unsupported_extension"), ("top.png", "no_label")}
    files, skipped = datasets.scan_folder(root, labels=False)
    assert sorted(p.name for p, _ in files) == ["top.png", "x.png"]


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="is not a folder"):
        datasets.scan_folder(tmp_path / "nope", labels=False)


def test_conversions_are_predictable(tmp_path):
    # RGBA composited onto white: a fully transparent image becomes white.
    Image.new("RGBA", (8, 8), (10, 20, 30, 0)).save(tmp_path / "clear.png")
    assert (datasets.load_image(tmp_path / "clear.png", 8, 3) == 255).all()
    # Opaque RGBA keeps its colour.
    Image.new("RGBA", (8, 8), (10, 20, 30, 255)).save(tmp_path / "opaque.png")
    assert (datasets.load_image(tmp_path / "opaque.png", 8, 3) == [10, 20, 30]).all()
    # 16-bit grayscale scaled 0..65535 -> 0..255.
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(tmp_path / "white16.png")
    Image.fromarray(np.full((8, 8), 32896, np.uint16)).save(tmp_path / "mid16.png")
    assert (datasets.load_image(tmp_path / "white16.png", 8, 1) == 255).all()
    assert (datasets.load_image(tmp_path / "mid16.png", 8, 1) == 128).all()
    # CMYK pure cyan -> RGB (0, 255, 255); grayscale -> 3 identical channels.
    Image.new("CMYK", (8, 8), (255, 0, 0, 0)).save(tmp_path / "cyan.jpg", quality=100)
    assert np.abs(datasets.load_image(tmp_path / "cyan.jpg", 8, 3).astype(int) - [0, 255, 255]).max() <= 2
    Image.new("L", (8, 8), 77).save(tmp_path / "gray.png")
    rgb = datasets.load_image(tmp_path / "gray.png", 8, 3)
    assert (rgb == 77).all() and rgb.shape == (8, 8, 3)
    # Palette with transparency -> composited; RGB -> L uses ITU-R 601 luma.
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([255, 0, 0] + [0, 0, 0] * 255)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pal.png", transparency=0)
    assert (datasets.load_image(tmp_path / "pal.png", 8, 3) == 255).all()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "red.png")
    assert (datasets.load_image(tmp_path / "red.png", 8, 1) == 76).all()  # 0.299 * 255


def test_exif_orientation_is_applied(tmp_path):
    # A 20x10 landscape image whose EXIF says "rotate 90": it must come out portrait.
    img = Image.new("L", (20, 10), 0)
    img.paste(255, (0, 0, 10, 10))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    img.save(tmp_path / "rot.jpg", exif=exif, quality=100)
    with Image.open(tmp_path / "rot.jpg") as raw:
        assert raw.size == (20, 10)
    out = datasets.load_image(tmp_path / "rot.jpg", 10, 1)[:, :, 0].astype(int)
    # displayed upright the image is 10 wide x 20 tall with the white half on top; the centre
    # crop to 10x10 keeps rows 5..15, so the top half of the crop is white.
    assert out[:4].mean() > 200 and out[-4:].mean() < 50


def test_resize_and_centre_crop():
    # 40x20 image: left quarter black, centre half white, right quarter black.
    arr = np.zeros((20, 40), np.uint8)
    arr[:, 6:34] = 255
    out = datasets.conform(Image.fromarray(arr), 10, 1)[:, :, 0]
    assert out.shape == (10, 10)
    assert (out >= 250).all(), "the centre crop keeps only the white middle"
    # Short side already at the resolution: no resampling, an exact copy of the centre.
    arr = np.random.default_rng(0).integers(0, 256, (20, 40), dtype=np.uint8)
    assert np.array_equal(datasets.conform(Image.fromarray(arr), 20, 1)[:, :, 0], arr[:, 10:30])


def test_split_is_deterministic_disjoint_and_complete():
    a = datasets.split_indices(1000, 0.1, 0.2, seed=3)
    b = datasets.split_indices(1000, 0.1, 0.2, seed=3)
    c = datasets.split_indices(1000, 0.1, 0.2, seed=4)
    for name in datasets.SPLITS:
        assert np.array_equal(a[name], b[name])
    assert not np.array_equal(a["val"], c["val"])
    assert [len(a[n]) for n in ("train", "val", "test")] == [700, 100, 200]
    assert np.array_equal(np.sort(np.concatenate(list(a.values()))), np.arange(1000))


def test_caps_take_a_seeded_subset():
    idx = np.arange(100)
    assert np.array_equal(datasets.cap(idx, None, 0), idx)
    capped = datasets.cap(idx, 10, 0)
    assert len(capped) == 10 and np.array_equal(capped, datasets.cap(idx, 10, 0))
    assert np.all(np.diff(capped) > 0)


def write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload))
    return hashlib.sha256(payload).hexdigest()


def test_read_idx_round_trip_and_errors():
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 8, 3]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    assert np.array_equal(datasets.read_idx(header + arr.tobytes()), arr)
    with pytest.raises(DataError, match="bad magic"):
        datasets.read_idx(b"\x01\x02\x03\x04")
    with pytest.raises(DataError, match="header says 24"):
        datasets.read_idx(header + arr.tobytes()[:-1])


@pytest.fixture
def fake_fashion(tmp_path, monkeypatch):
    """A tiny IDX dataset with its checksums swapped into FASHION_MNIST_FILES."""
    src = tmp_path / "mirror"
    src.mkdir()
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (30, 28, 28)),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, (30,)),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (12, 28, 28)),
        "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, (12,)),
    }
    sums = {name: write_idx(src / name, arr) for name, arr in arrays.items()}
    monkeypatch.setattr(datasets, "FASHION_MNIST_FILES", sums)
    return src, arrays


def test_fashion_mnist_from_system_dir_then_cache_then_download(tmp_path, fake_fashion):
    src, arrays = fake_fashion
    collected = datasets.collect_fashion_mnist(tmp_path / "cache", True, 16, 1, system_dir=src)
    assert collected.images.shape == (30, 28, 28) and collected.test.images.shape == (12, 28, 28)
    assert np.array_equal(collected.labels, arrays["train-labels-idx1-ubyte.gz"])

    fetched = []

    def fake_fetch(url, dest):
        fetched.append(url.rsplit("/", 1)[1])
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes((src / dest.name).read_bytes())

    cache = tmp_path / "cache"
    payloads = datasets.fashion_mnist_payloads(cache, system_dir=tmp_path / "absent", fetch=fake_fetch)
    assert sorted(fetched) == sorted(datasets.FASHION_MNIST_FILES) and len(payloads) == 4
    fetched.clear()
    datasets.fashion_mnist_payloads(cache, system_dir=tmp_path / "absent", fetch=fake_fetch)
    assert fetched == [], "second call reads the verified cache"


def test_fashion_mnist_checksum_mismatch_and_no_source(tmp_path, fake_fashion):
    src, _ = fake_fashion
    write_idx(src / "train-labels-idx1-ubyte.gz", np.zeros(30))
    with pytest.raises(DataError, match="checksum mismatch"):
        datasets.fashion_mnist_payloads(tmp_path / "cache", system_dir=src)

    def offline(url, dest):
        raise OSError("network is unreachable")

    with pytest.raises(DataError) as info:
        datasets.fashion_mnist_payloads(tmp_path / "cache", system_dir=tmp_path / "absent", fetch=offline)
    assert "apt-get install dataset-fashion-mnist" in str(info.value) and "*-ubyte.gz" in str(info.value)


def test_make_splits_and_storage_round_trip(tmp_path, fake_fashion):
    from diffmodels.core.config import parse_params
    from tests.conftest import params_with

    src, arrays = fake_fashion
    p = parse_params(params_with({"data.resolution": 16, "data.max_train": 20, "data.max_test": 5})).data
    collected = datasets.collect_fashion_mnist(tmp_path / "cache", True, 16, 1, system_dir=src)
    splits = datasets.make_splits(collected, p, seed=0)
    assert {k: len(v.images) for k, v in splits.items()} == {"train": 20, "val": 2, "test": 5, "fid_test": 12}
    assert splits["train"].images.shape[1:] == (16, 16, 1)
    again = datasets.make_splits(collected, p, seed=0)
    assert np.array_equal(again["train"].images, splits["train"].images)

    manifest = datasets.write_prepared(tmp_path / "prep", splits, collected.class_names, {"source": "test"})
    assert manifest["counts"] == {"train": 20, "val": 2, "test": 5, "fid_test": 12}  # fid_test: the whole test pool, uncapped
    assert manifest["sha256"]["train_images.npy"] == datasets.sha256_file(tmp_path / "prep" / "train_images.npy")
    loaded = datasets.load_split(tmp_path / "prep", "test")
    assert np.array_equal(loaded.images, splits["test"].images)
    assert np.array_equal(loaded.labels, splits["test"].labels)
    with pytest.raises(DataError, match="dvc repro prepare"):
        datasets.load_split(tmp_path / "missing", "train")
