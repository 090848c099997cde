"""Datasets: Fashion-MNIST or a folder of images -> fixed-size uint8 arrays split train/val/test.

Sources
    ``fashion_mnist``: read offline from the Debian package ``dataset-fashion-mnist``
    (``/usr/share/datasets/fashion-mnist/*-ubyte.gz``); else from ``data/raw/fashion-mnist``;
    else downloaded there. Every file is verified by the SHA-256 of its *decompressed* bytes,
    so a re-compressed copy (Debian's) and the original both pass and a damaged one fails.
    ``folder``: every jpg/jpeg/png/webp/bmp below the source, recursively; optional labels from
    the first sub-folder name. Hidden files and folders (``.DS_Store``, ``.git``) are ignored.

Image conversion (predictable for every PIL mode)
    EXIF orientation applied; 16-bit and 32-bit integer images scaled from 0..65535 to 0..255;
    palette and alpha images composited onto white; CMYK, YCbCr, LAB converted to RGB; then to
    ``L`` (ITU-R 601 luma) for 1 channel or ``RGB`` for 3. Resize the shorter side to the
    resolution (bicubic, antialiased when shrinking) and centre-crop.

Stored layout (``write_prepared``): ``<split>_images.npy`` (N, H, W, C) uint8,
``<split>_labels.npy`` (N,) int16 (-1 when unlabelled), ``manifest.json`` with counts, class
names, resolution and each array file's SHA-256.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import urllib.request
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from diffmodels.core.errors import DataError
from diffmodels.core.io import atomic_path, write_json

SPLITS = ("train", "val", "test")
# The whole test pool in a seeded order, ignoring data.max_test: the FID reference (stage fid_reference)
FID_SPLIT = "fid_test"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# SHA-256 of the decompressed IDX payloads (identical in the official files and Debian's).
FASHION_MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}


@dataclass
class Skipped:
    """A file that could not be used, and why (one row of ``skipped.csv``)."""

    path: str
    reason: str  # empty | not_an_image | truncated | corrupt | too_large | unsupported_extension | no_label
    detail: str = ""


@dataclass
class Split:
    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray  # (N,) int16, -1 = no label


@dataclass
class Collected:
    """Every usable image of a source, before the train/val/test split."""

    images: np.ndarray  # (N, H, W, C) uint8, or source-sized when ``transform`` is set
    labels: np.ndarray  # (N,) int16
    class_names: list[str]
    skipped: list[Skipped] = field(default_factory=list)
    # Optional fixed test set (Fashion-MNIST's official split); None -> carved out by fraction.
    test: Split | None = None
    description: str = ""
    # Applied to each split's images after selection (None: ``images`` are already conformed).
    transform: Callable[[np.ndarray], np.ndarray] | None = None


# --------------------------------------------------------------------------------------------
# Fashion-MNIST
# --------------------------------------------------------------------------------------------


def read_idx(payload: bytes) -> np.ndarray:
    """Parse an IDX file (the MNIST format): big-endian header, then uint8 data."""
    if len(payload) < 4 or payload[0] != 0 or payload[1] != 0 or payload[2] != 0x08:
        raise DataError("not an IDX uint8 file (bad magic number)")
    ndim = payload[3]
    header_end = 4 + 4 * ndim
    shape = tuple(int.from_bytes(payload[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape))
    if len(payload) - header_end != expected:
        raise DataError(f"IDX payload has {len(payload) - header_end} bytes, header says {expected}")
    return np.frombuffer(payload, dtype=np.uint8, offset=header_end).reshape(shape)


def _verified_payload(path: Path, sha256: str) -> bytes:
    try:
        payload = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: unreadable gzip ({exc}); delete it and rerun") from None
    digest = hashlib.sha256(payload).hexdigest()
    if digest != sha256:
        raise DataError(f"{path}: checksum mismatch (sha256 {digest[:12]}..., expected {sha256[:12]}...); delete it and rerun")
    return payload


def _fetch(url: str, dest: Path) -> None:
    with atomic_path(dest) as tmp, urllib.request.urlopen(url, timeout=60) as resp:  # noqa: S310
        tmp.write_bytes(resp.read())


def fashion_mnist_payloads(
    cache_dir: Path,
    system_dir: Path = FASHION_MNIST_SYSTEM_DIR,
    fetch: Callable[[str, Path], None] = _fetch,
) -> dict[str, bytes]:
    """The four verified IDX payloads: from ``system_dir``, else ``cache_dir``, else downloaded."""
    payloads = {}
    for name, sha in FASHION_MNIST_FILES.items():
        for folder in (system_dir, cache_dir):
            if (folder / name).is_file():
                payloads[name] = _verified_payload(folder / name, sha)
                break
        else:
            try:
                fetch(FASHION_MNIST_URL + name, cache_dir / name)
            except OSError as exc:
                raise DataError(
                    f"Fashion-MNIST not found in {system_dir} and download failed ({exc}): "
                    "install it with `apt-get install dataset-fashion-mnist`, or place the four "
                    f"*-ubyte.gz files in {cache_dir}"
                ) from None
            payloads[name] = _verified_payload(cache_dir / name, sha)
    return payloads


def collect_fashion_mnist(
    cache_dir: Path,
    labels: bool,
    resolution: int,
    channels: int,
    system_dir: Path = FASHION_MNIST_SYSTEM_DIR,
    progress: Callable[[Iterable, int], Iterable] = lambda it, total: it,
) -> Collected:
    raw = fashion_mnist_payloads(cache_dir, system_dir)
    arrays = {name: read_idx(payload) for name, payload in raw.items()}

    def conform_all(images: np.ndarray) -> np.ndarray:
        return np.stack([conform(Image.fromarray(im), resolution, channels) for im in progress(images, len(images))])

    def label_ids(name: str) -> np.ndarray:
        ids = arrays[name].astype(np.int16)
        return ids if labels else np.full_like(ids, -1)

    # Kept at 28x28 and conformed after the split, so capped runs resize only what they keep.
    return Collected(
        images=arrays["train-images-idx3-ubyte.gz"],
        labels=label_ids("train-labels-idx1-ubyte.gz"),
        class_names=list(FASHION_MNIST_CLASSES) if labels else [],
        test=Split(arrays["t10k-images-idx3-ubyte.gz"], label_ids("t10k-labels-idx1-ubyte.gz")),
        transform=conform_all,
        description="Fashion-MNIST (official test split kept)",
    )


# --------------------------------------------------------------------------------------------
# Image files
# --------------------------------------------------------------------------------------------


class BadImage(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _to_8bit(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img).astype(np.float64)
        return Image.fromarray(np.clip(np.round(arr * (255.0 / 65535.0)), 0, 255).astype(np.uint8))
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8))
    if img.mode == "1":
        return img.convert("L")
    return img


def _flatten_alpha(img: Image.Image) -> Image.Image:
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "PA", "La"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "RGBa"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img


def conform(img: Image.Image, resolution: int, channels: int) -> np.ndarray:
    """Any PIL image -> (resolution, resolution, channels) uint8, by the module's rules."""
    img = _flatten_alpha(_to_8bit(img))
    img = img.convert("L" if channels == 1 else "RGB")
    w, h = img.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def load_image(path: Path, resolution: int, channels: int) -> np.ndarray:
    """Decode, orient and conform one file; :class:`BadImage` names why it cannot be used."""
    if path.stat().st_size == 0:
        raise BadImage("empty", "zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.draft("RGB" if channels == 3 else "L", (resolution, resolution))  # JPEG: decode small
                img.load()
                img = ImageOps.exif_transpose(img)
                return conform(img, resolution, channels)
    except UnidentifiedImageError:
        raise BadImage("not_an_image", "no image format recognised") from None
    except Image.DecompressionBombError as exc:
        raise BadImage("too_large", str(exc).split(".")[0]) from None
    except OSError as exc:
        reason = "truncated" if "truncated" in str(exc).lower() else "corrupt"
        raise BadImage(reason, str(exc)) from None
    except (SyntaxError, ValueError, EOFError, TypeError, KeyError, IndexError, ZeroDivisionError) as exc:
        raise BadImage("corrupt", f"{type(exc).__name__}: {exc}") from None


def scan_folder(source: Path, labels: bool) -> tuple[list[tuple[Path, str | None]], list[Skipped]]:
    """Image files below ``source`` (sorted, so results do not depend on the filesystem), with
    their label names, and the files that are not candidates."""
    if not source.is_dir():
        raise DataError(f"data.source: {source} is not a folder (set data.source to a folder of images)")
    files: list[tuple[Path, str | None]] = []
    skipped: list[Skipped] = []
    for dirpath, dirnames, filenames in os.walk(source):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            rel = path.relative_to(source)
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                skipped.append(Skipped(str(rel), "unsupported_extension", f"not one of {', '.join(IMAGE_SUFFIXES)}"))
            elif labels and len(rel.parts) < 2:
                skipped.append(Skipped(str(rel), "no_label", "data.labels is true but the file is not in a class sub-folder"))
            else:
                files.append((path, rel.parts[0] if labels else None))
    files.sort(key=lambda item: str(item[0].relative_to(source)))
    return files, skipped


def collect_folder(
    source: Path, labels: bool, resolution: int, channels: int, progress: Callable[[Iterable, int], Iterable] = lambda it, total: it
) -> Collected:
    candidates, skipped = scan_folder(source, labels)
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is skipped, never half-read

    def attempt(path: Path) -> np.ndarray | BadImage:
        try:
            return load_image(path, resolution, channels)
        except BadImage as bad:
            return bad

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # PIL decodes without the GIL
        results = list(progress(pool.map(attempt, [p for p, _ in candidates]), len(candidates)))

    class_names = sorted({name for _, name in candidates if name is not None})
    class_index = {name: i for i, name in enumerate(class_names)}
    images, label_ids = [], []
    for (path, name), result in zip(candidates, results):
        if isinstance(result, BadImage):
            skipped.append(Skipped(str(path.relative_to(source)), result.reason, result.detail))
            continue
        images.append(result)
        label_ids.append(class_index[name] if name is not None else -1)
    skipped.sort(key=lambda s: s.path)
    stack = np.stack(images) if images else np.zeros((0, resolution, resolution, channels), np.uint8)
    return Collected(
        images=stack,
        labels=np.asarray(label_ids, dtype=np.int16),
        class_names=class_names,
        skipped=skipped,
        description=f"folder {source}",
    )


# --------------------------------------------------------------------------------------------
# Splits and storage
# --------------------------------------------------------------------------------------------


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Seeded, disjoint train/val/test index sets covering ``range(n)``, each sorted."""
    order = np.random.default_rng(seed).permutation(n)
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    parts = {"val": order[:n_val], "test": order[n_val:n_val + n_test], "train": order[n_val + n_test:]}
    return {name: np.sort(idx) for name, idx in parts.items()}


def cap(indices: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """A seeded subset of at most ``limit`` indices (all of them when ``limit`` is None), sorted."""
    if limit is None or len(indices) <= limit:
        return indices
    return np.sort(np.random.default_rng(seed).choice(indices, size=limit, replace=False))


def make_splits(collected: Collected, data: Any, seed: int) -> dict[str, Split]:
    """Apply the split fractions and caps of the ``data`` params to collected images."""
    test_fraction = 0.0 if collected.test is not None else data.test_fraction
    idx = split_indices(len(collected.images), data.val_fraction, test_fraction, seed)
    limits = {"train": data.max_train, "val": data.max_val, "test": data.max_test}
    splits = {}
    for i, name in enumerate(SPLITS):
        if name == "test" and collected.test is not None:
            pool_images, pool_labels = collected.test.images, collected.test.labels
            chosen = cap(np.arange(len(pool_images)), limits[name], seed + 1 + i)
        else:
            pool_images, pool_labels = collected.images, collected.labels
            chosen = cap(idx[name], limits[name], seed + 1 + i)
        images = pool_images[chosen]
        if collected.transform is not None:
            images = collected.transform(images)
        splits[name] = Split(images, pool_labels[chosen])
    # the FID reference may use the entire test pool (10,000 images for Fashion-MNIST), so it is
    # written uncapped, in a seeded order: its first k images are a random k-subset
    if collected.test is not None:
        pool_images, pool_labels = collected.test.images, collected.test.labels
        pool = np.arange(len(pool_images))
    else:
        pool_images, pool_labels, pool = collected.images, collected.labels, idx["test"]
    order = np.random.default_rng(seed + 17).permutation(pool)
    images = pool_images[order]
    splits[FID_SPLIT] = Split(collected.transform(images) if collected.transform is not None else images,
                              pool_labels[order])
    return splits


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_prepared(out_dir: Path, splits: dict[str, Split], class_names: list[str], info: dict[str, Any]) -> dict[str, Any]:
    """Write the split arrays and ``manifest.json`` into ``out_dir`` (which must be empty/new)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, split in splits.items():
        for kind, array in (("images", split.images), ("labels", split.labels)):
            path = out_dir / f"{name}_{kind}.npy"
            np.save(path, np.ascontiguousarray(array))
            files[path.name] = sha256_file(path)
    first = next(iter(splits.values())).images
    manifest = {
        "format": "diffmodels-prepared/1",
        "counts": {name: int(len(split.images)) for name, split in splits.items()},
        "class_names": class_names,
        "resolution": int(first.shape[1]),
        "channels": int(first.shape[3]),
        "layout": "images (N, H, W, C) uint8; labels (N,) int16, -1 = no label",
        "sha256": files,
        **info,
    }
    write_json(out_dir / "manifest.json", manifest)
    return manifest


def fid_split(prepared_dir: str | Path) -> str:
    """The split the FID reference is drawn from: ``fid_test`` (the whole test pool, whatever
    ``data.max_test``), or ``test`` in a folder prepared before that split existed."""
    return FID_SPLIT if (Path(prepared_dir) / f"{FID_SPLIT}_images.npy").is_file() else "test"


def load_split(prepared_dir: str | Path, split: str, mmap: bool = True) -> Split:
    """Read one split of a prepared dataset (memory-mapped by default)."""
    prepared_dir = Path(prepared_dir)
    if split not in (*SPLITS, FID_SPLIT):
        raise ValueError(f"split must be one of {(*SPLITS, FID_SPLIT)}, got {split!r}")
    try:
        mode = "r" if mmap else None
        images = np.load(prepared_dir / f"{split}_images.npy", mmap_mode=mode, allow_pickle=False)
        labels = np.load(prepared_dir / f"{split}_labels.npy", mmap_mode=mode, allow_pickle=False)
    except FileNotFoundError as exc:
        raise DataError(f"{exc.filename}: prepared data missing; run `dvc repro prepare`") from None
    return Split(images, labels)
