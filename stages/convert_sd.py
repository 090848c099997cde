"""Stage convert_sd: a local Stable Diffusion v1.x checkpoint -> our modules, verified and saved.

    python3 -m stages.convert_sd --out data/models/sd --reports reports/convert_sd

Reads ``sd.checkpoint`` (an original single file or a diffusers folder), converts it
strictly (diffmodels/sd/convert.py), checks parameter counts and one finite forward of each
network, and writes ``<out>/sd.safetensors`` (our module names, configs embedded) with
``<out>/status.json``. With no checkpoint configured, or one that does not exist, it writes only
the status (what is missing and how to provide it) and exits 0, so the rest of the pipeline
runs; sd_baselines then skips too. A file that is not an SD v1 checkpoint stops with one line.
"""

from __future__ import annotations

import time
from pathlib import Path

from diffmodels.core import tracking
from diffmodels.core.config import load_params
from diffmodels.core.io import write_json
from diffmodels.sd.weights import (
    HOW_TO,
    checkpoint_status,
    convert_source,
    save_models,
    verify,
)
from stages._cli import base_parser, stage_main

GROUPS = ("sd",)
WEIGHTS = "sd.safetensors"

parser = base_parser(__doc__.splitlines()[0], "out", "reports", out="folder for sd.safetensors and status.json")


def run(args) -> None:
    params = load_params(args.params)
    p = params.sd
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / WEIGHTS).unlink(missing_ok=True)  # never leave weights of an earlier checkpoint behind
    reason = checkpoint_status(p.checkpoint)
    with tracking.stage_run("convert_sd", params, GROUPS):
        if reason is not None:
            status = {"status": "skipped", "reason": reason, "how_to": HOW_TO}
            write_json(args.out / "status.json", status)
            write_json(args.reports / "metrics.json", {"converted": False, **status})
            tracking.set_tags({"sd_status": "skipped"})
            tracking.log_artifact(args.out / "status.json")
            print(f"convert_sd: skipped, {reason}. To run the SD baselines, {HOW_TO}")
            return
        started = time.perf_counter()
        models = convert_source(p.checkpoint, p.architecture, p.use_ema)
        report = verify(models)
        source = str(Path(p.checkpoint).resolve())
        save_models(args.out / WEIGHTS, models, p.architecture, {"source": source, "notes": models.notes})
        seconds = round(time.perf_counter() - started, 2)
        status = {"status": "converted", "source": source, "architecture": p.architecture, "weights": WEIGHTS,
                  "used_ema": models.used_ema, "notes": models.notes}  # fmt: skip
        metrics = {"converted": True, "used_ema": models.used_ema, **report, "seconds": seconds}
        write_json(args.out / "status.json", status)
        write_json(args.reports / "metrics.json", metrics)
        tracking.set_tags({"sd_status": "converted"})
        tracking.log_metrics(metrics)
        tracking.log_artifact(args.reports / "metrics.json")
    total = sum(v for k, v in report.items() if k.startswith("params_"))
    print(f"convert_sd: {p.checkpoint} -> {args.out / WEIGHTS} ({total:,} parameters, "
          f"{'EMA' if models.used_ema else 'raw'} UNet weights, {seconds:.0f}s)")


main = stage_main(run, parser)

if __name__ == "__main__":
    main()
