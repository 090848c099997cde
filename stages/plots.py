"""`dvc plots` that render offline: DVC's plot commands with vega inlined in the page.

    python3 -m stages.plots show                          # dvc plots show, offline page
    python3 -m stages.plots diff workspace mixer-attention # dvc plots diff <rev|exp> ...
    python3 -m stages.plots template PATH                 # only write the template to PATH

Any further arguments go to DVC unchanged (``-o DIR``, ``--open``, targets). The page is
``dvc_plots/index.html`` unless ``-o`` says otherwise; ``show`` and ``diff`` keep the template in
DVC's own temporary folder (``.dvc/tmp/vega_offline_template.html``), where it can also be passed to
DVC by hand: ``dvc plots diff A B --html-template .dvc/tmp/vega_offline_template.html``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from diffmodels.core.errors import DiffmodelsError
from diffmodels.reporting.vega_offline import DEFAULT_PATH, build_template
from stages._cli import stage_main

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("command", choices=("show", "diff", "template"), help="dvc plots subcommand, or only the template")
parser.add_argument("args", nargs=argparse.REMAINDER, help="passed to dvc plots (template: the output path)")


def run(args) -> None:
    if args.command == "template":
        if len(args.args) != 1:
            raise DiffmodelsError("plots template: give the output path, e.g. `python3 -m stages.plots template t.html`")
        path = build_template(args.args[0])
        print(f"plots: offline template {path}; use it with `dvc plots show --html-template {path}`")
        return
    template = build_template(DEFAULT_PATH)
    cmd = [sys.executable, "-m", "dvc", "plots", args.command, *args.args, "--html-template", str(template)]
    sys.exit(subprocess.run(cmd).returncode)


main = stage_main(run, parser)

if __name__ == "__main__":
    main()
