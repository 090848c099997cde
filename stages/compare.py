"""Compare DVC experiments side by side -> reports/compare.html (not a DVC stage: run it by hand).

    python3 -m stages.compare --out reports/compare.html --dvc-yaml dvc.yaml   # the baseline, all its experiments
    python3 -m stages.compare mixer-attention nomixer --out /tmp/ablation.html --dvc-yaml dvc.yaml

Experiments are named as in ``dvc exp show`` (or by a rev prefix; the baseline by its branch
name). Params and metrics come from DVC (``dvc.api``); curves and images from the workspace
for stages it holds for that experiment, otherwise from the experiment's MLflow runs. What the
page shows: :mod:`diffmodels.reporting.compare`.
"""

from __future__ import annotations

from pathlib import Path

from diffmodels.core import tracking
from diffmodels.core.config import load_params
from diffmodels.core.errors import DiffmodelsError
from diffmodels.core.io import write_text
from diffmodels.reporting import compare, report
from stages._cli import base_parser, stage_main

parser = base_parser(
    __doc__.splitlines()[0],
    "out",
    "dvc-yaml",
    out="the page to write (reports/compare.html)",
    dvc_yaml="the pipeline whose stages are compared (dvc.yaml)",
)
parser.add_argument("experiments", nargs="*", metavar="EXP", help="experiments to compare (default: all)")


def run(args) -> None:
    params = load_params(args.params)
    root = Path.cwd()
    uri = tracking.tracking_uri(tracking.project_root())
    stages = report.read_pipeline(root / args.dvc_yaml)
    workspace, exps, skipped = compare.dvc_experiments(root, stages)
    exps = compare.select(exps, args.experiments)
    if not exps:
        raise DiffmodelsError("no finished experiments to compare: run `dvc repro` and `dvc exp run` first")
    try:
        by_stage = report.stage_runs(params.tracking.experiment, uri)
    except DiffmodelsError as exc:
        print(f"compare: {exc}; images of experiments outside the workspace will be missing")
        by_stage = {}
    files = compare.Files(root, stages, workspace, uri, by_stage)
    write_text(args.out, compare.render_compare(exps, stages, files, skipped, uri))
    local = sum(bool(e.local) for e in exps)
    print(f"compare: {len(exps)} experiments ({', '.join(e.name for e in exps)}; {local} with workspace files) "
          f"-> {args.out}" + (f"; left out: {', '.join(n for n, _ in skipped)}" if skipped else ""))


main = stage_main(run, parser)

if __name__ == "__main__":
    main()
