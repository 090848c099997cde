"""Stage prepare: dataset -> data/prepared (split arrays), data/masks (evaluation masks), reports.

    python3 -m stages.prepare --prepared data/prepared --masks data/masks --reports reports/prepare
"""

from __future__ import annotations

import csv
import io
import time
from collections import Counter
from pathlib import Path

import numpy as np

from diffmodels.core import tracking
from diffmodels.core.config import load_params
from diffmodels.core.errors import DataError
from diffmodels.core.io import atomic_dir, write_json, write_text
from diffmodels.core.progress import progress
from diffmodels.data import datasets
from diffmodels.data.images import make_grid, save_png
from diffmodels.data.masks import write_mask_sets
from stages._cli import base_parser, stage_main

GROUPS = ("seed", "data")

parser = base_parser(__doc__.splitlines()[0], "prepared", "masks", "reports", "raw", raw="download cache")


def skipped_csv(rows: list[datasets.Skipped]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "reason", "detail"])
    writer.writerows([r.path, r.reason, r.detail] for r in rows)
    return buf.getvalue()


def run(args) -> None:
    params = load_params(args.params)
    p, seed = params.data, params.seed
    started = time.perf_counter()
    with tracking.stage_run("prepare", params, GROUPS):
        def bar(items, total):  # a bar on a terminal, a line every 5 % in logs
            return progress(items, total=total, desc="decode", unit="img")

        if p.dataset == "fashion_mnist":
            collected = datasets.collect_fashion_mnist(args.raw, p.labels, p.resolution, p.channels, progress=bar)
        else:
            collected = datasets.collect_folder(Path(p.source), p.labels, p.resolution, p.channels, progress=bar)

        # The skip report is written even when too few images remain: it says why.
        write_text(args.reports / "skipped.csv", skipped_csv(collected.skipped))
        usable = len(collected.images) + (len(collected.test.images) if collected.test else 0)
        if usable < p.min_images:
            raise DataError(
                f"only {usable} usable images in {collected.description} ({len(collected.skipped)} skipped, "
                f"see {args.reports / 'skipped.csv'}); data.min_images is {p.min_images}"
            )

        splits = datasets.make_splits(collected, p, seed)
        for name, split in splits.items():
            if len(split.images) == 0:
                raise DataError(
                    f"the {name} split is empty ({usable} usable images); lower data.{name}_fraction caps or add images"
                )
        info = {"source": collected.description, "skipped": len(collected.skipped), "seed": seed}
        with atomic_dir(args.prepared) as tmp:
            manifest = datasets.write_prepared(tmp, splits, collected.class_names, info)
        n_masks = min(p.masks_per_set, len(splits["test"].images))
        with atomic_dir(args.masks) as tmp:
            mask_manifest = write_mask_sets(tmp, p.mask_sets, n_masks, p.resolution, seed)

        preview = splits["train"].images[: p.preview_images]
        save_png(args.reports / "preview.png", make_grid(np.asarray(preview)))

        reasons = Counter(s.reason for s in collected.skipped)
        metrics = {
            **{f"num_{name}": count for name, count in manifest["counts"].items()},
            "num_classes": len(collected.class_names),
            "num_skipped": len(collected.skipped),
            "skipped_by_reason": dict(sorted(reasons.items())),
            "train_pixel_mean": float(np.asarray(splits["train"].images).mean() / 255.0),
            "mask_hole_fraction": {k: round(v["mean_hole_fraction"], 6) for k, v in mask_manifest["sets"].items()},
            "seconds": round(time.perf_counter() - started, 3),
        }
        write_json(args.reports / "metrics.json", metrics)

        tracking.log_metrics(metrics)
        for path in (args.reports / "metrics.json", args.reports / "skipped.csv", args.prepared / "manifest.json"):
            tracking.log_artifact(path)
        if params.tracking.log_images:
            tracking.log_artifact(args.reports / "preview.png")

    counts = manifest["counts"]
    print(
        f"prepare: {counts['train']} train / {counts['val']} val / {counts['test']} test images at "
        f"{p.resolution}px x{p.channels}, {len(collected.class_names)} classes, {len(collected.skipped)} skipped, "
        f"{len(p.mask_sets)} mask sets x {n_masks} ({metrics['seconds']:.1f}s)"
    )


main = stage_main(run, parser)

if __name__ == "__main__":
    main()
