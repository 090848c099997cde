"""Stage report: every stage's metrics and figures -> reports/index.html and reports/metrics.json.

    python3 -m stages.report --html reports/index.html --metrics reports/metrics.json --fid reports/fid.tsv \\
        --dvc-yaml dvc.yaml

``index.html`` is one self-contained page (images embedded; open it from disk): headline numbers,
FID per sampler, each stage's metric tables, curves and figures as ``dvc.yaml`` declares them,
links to the stages' MLflow runs, benchmark tables (``reports/bench``) and the params.
``metrics.json`` holds the same numbers in one file; ``fid.tsv`` feeds the FID bar chart of
``dvc plots``. What is shown, and how: :mod:`diffmodels.reporting.report`.
"""

from __future__ import annotations

import os
from pathlib import Path

from diffmodels.core import tracking
from diffmodels.core.config import load_params
from diffmodels.core.io import write_json, write_text
from diffmodels.reporting import report
from stages._cli import base_parser, stage_main

GROUPS = ("seed", "data", "vae", "latents", "ddpm", "sample", "inpaint", "eval", "sd")

parser = base_parser(
    __doc__.splitlines()[0],
    "html",
    "metrics",
    "fid",
    "dvc-yaml",
    dvc_yaml="the pipeline whose stages are reported",
)


def run(args) -> None:
    params = load_params(args.params)
    root = Path.cwd()
    uri = tracking.tracking_uri(tracking.project_root())
    with tracking.stage_run("report", params, GROUPS) as run_:
        inputs = report.gather(root, Path(args.params), uri, params.tracking.experiment,
                               exp_name=os.environ.get("DVC_EXP_NAME"), dvc_yaml=args.dvc_yaml)
        tags = run_.data.tags
        inputs.context = {"commit": tags.get("git_commit", "")[:10], "experiment": tags.get("dvc_exp_name", ""),
                          "pipeline": tags.get("pipeline_id", "")}
        fids = report.fid_rows({s.name: inputs.metrics.get(s.name, {}) for s in inputs.stages if s.name != "report"})
        write_text(args.fid, report.fid_tsv(fids))
        write_json(args.metrics, report.report_metrics(inputs))
        write_text(args.html, report.render_index(inputs))
        tracking.log_metrics({r.name.replace(": ", "."): r.fid for r in fids}, prefix="fid.")
        for path in (args.html, args.metrics, args.fid):
            tracking.log_artifact(path)
    linked = sum(ref is not None and ref.matched for ref in inputs.runs.values())
    print(f"report: {args.html} ({args.html.stat().st_size / 1e6:.1f} MB, {len(inputs.runs)} stages, "
          f"{linked} linked to their MLflow runs), {args.metrics}")


main = stage_main(run, parser)

if __name__ == "__main__":
    main()
