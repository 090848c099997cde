"""The pipeline report: one self-contained page of every stage's metrics and figures.

What the page shows is read from ``dvc.yaml``, not listed here: for each stage, its ``metrics``
files become tables and its ``plots`` become figures (TSV/CSV data drawn with matplotlib using
the plot's ``x`` / ``y`` / ``title``; PNG files and folders of images embedded). Top-level plots
(several lines from one file, e.g. leakage profiles) go to the stage whose outputs hold their
file. A new stage, or a plot moving from one stage to another, needs no change here.

Metric tables are laid out from the keys: ``name`` -> a key/value list; ``group/column`` -> one
row per group; ``group/row/column`` -> one table per group (e.g. ``method/mask set/metric``).

Each stage is linked to its MLflow run: the newest finished run of that stage whose logged
metrics equal the ones in its ``metrics.json`` (so a stage that did not rerun links to the run
that produced its current outputs, not merely the latest one). Names are compared as the
stages log them (:func:`diffmodels.core.tracking.metric_values`).

The page's markup is ``templates/report.html.j2`` (:mod:`diffmodels.reporting.htmlpage`).
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from diffmodels.core import tracking
from diffmodels.core.errors import DiffmodelsError
from diffmodels.reporting import htmlpage as hp

DATA_TYPES = (".tsv", ".csv")
# Headline numbers, looked up in every stage (first stage in pipeline order that has the key wins):
# (key pattern, label). Missing ones are left out, so the list outlives stages moving around.
HEADLINES = (
    ("val_psnr", "VAE val PSNR (dB)"),
    ("val_ssim", "VAE val SSIM"),
    ("loss_last100", "DDPM loss (last 100 steps)"),
    ("fid_ddpm", "FID, DDPM sampler"),
    ("fid_ddim", "FID, DDIM sampler"),
    ("fid/*", "inpainting FID"),
    ("*/leak_radius_px", "decoder leak radius (px)"),
    ("*/leak_mean", "decoder leak mean"),
    ("latents_per_second", "DDPM training latents/s"),
    ("seconds_per_image_ddim", "DDIM s/image"),
)


# ------------------------------------------------------------------------------------------------
# The pipeline as dvc.yaml declares it
# ------------------------------------------------------------------------------------------------

@dataclass
class Plot:
    """One ``plots`` entry of dvc.yaml: data (``y`` maps file -> columns) or images (a file or folder)."""

    name: str
    files: list[str]
    title: str = ""
    x: str | None = None
    y: dict[str, list[str]] = field(default_factory=dict)
    template: str | None = None

    @property
    def is_image(self) -> bool:
        return not any(f.endswith(DATA_TYPES) for f in self.files)


@dataclass
class Stage:
    name: str
    metrics: list[str] = field(default_factory=list)
    plots: list[Plot] = field(default_factory=list)
    outs: list[str] = field(default_factory=list)
    deps: list[str] = field(default_factory=list)

    @property
    def report_dir(self) -> str:
        """Where the stage writes its reports (the folder of its first metrics file)."""
        if self.metrics:
            return os.path.dirname(self.metrics[0])
        return f"reports/{self.name}"


def _entries(items: Iterable[Any]) -> list[tuple[str, dict]]:
    """dvc.yaml list items: ``path`` or ``{path: {options}}``."""
    out = []
    for item in items or []:
        if isinstance(item, str):
            out.append((item, {}))
        elif isinstance(item, Mapping):
            for key, value in item.items():
                out.append((str(key), dict(value or {})))
    return out


def _owner(path: str, stages: Sequence[Stage]) -> Stage | None:
    for stage in stages:
        for produced in (*stage.outs, *stage.metrics, *(f for p in stage.plots for f in p.files)):
            if path == produced or path.startswith(produced.rstrip("/") + "/"):
                return stage
    return None


def read_pipeline(dvc_yaml: str | Path = "dvc.yaml") -> list[Stage]:
    """Stages in dvc.yaml order with their metrics, plots (top-level ones attached) and outs."""
    path = Path(dvc_yaml)
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise DiffmodelsError(f"{path}: cannot read the pipeline ({exc}); run from the project root") from None
    stages = []
    for name, spec in (doc.get("stages") or {}).items():
        stage = Stage(name=name, deps=[d for d, _ in _entries(spec.get("deps"))])
        stage.metrics = [m for m, _ in _entries(spec.get("metrics"))]
        stage.outs = [o for o, _ in _entries(spec.get("outs"))]
        for file, opts in _entries(spec.get("plots")):
            ys = opts.get("y")
            columns = [ys] if isinstance(ys, str) else list(ys or [])
            stage.plots.append(Plot(name=file, files=[file], title=opts.get("title", ""), x=opts.get("x"),
                                    y={file: columns} if file.endswith(DATA_TYPES) else {},
                                    template=opts.get("template")))
        stages.append(stage)
    for name, opts in _entries(doc.get("plots")):
        ys = opts.get("y")
        if isinstance(ys, Mapping):
            y = {f: ([c] if isinstance(c, str) else list(c)) for f, c in ys.items()}
        else:  # a bare path (or a path with options) is its own data
            y = {name: [ys] if isinstance(ys, str) else list(ys or [])} if name.endswith(DATA_TYPES) else {}
        files = list(y) or [name]
        plot = Plot(name=name, files=files, title=opts.get("title", ""), x=opts.get("x"), y=y,
                    template=opts.get("template"))
        owner = _owner(files[0], stages)
        if owner is None:
            owner = next((s for s in stages if files[0].startswith(s.report_dir + "/")), None)
        if owner is not None:
            owner.plots.append(plot)
    return stages


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------

def flatten_metrics(data: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested metrics as ``a/b/c`` keys (the separator eval_inpaint already uses)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, name + "/"))
        else:
            flat[name] = value
    return flat


def read_metrics(root: Path, stage: Stage) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for rel in stage.metrics:
        path = root / rel
        if path.is_file():
            try:
                merged.update(json.loads(path.read_text()))
            except json.JSONDecodeError as exc:
                raise DiffmodelsError(f"{path}: not valid JSON ({exc}); rerun `dvc repro -f {stage.name}`") from None
    return merged


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def metric_tables(metrics: Mapping[str, Any]) -> hp.Markup:
    """HTML tables of one stage's metrics, laid out by key depth (see the module docstring)."""
    flat = flatten_metrics(metrics)
    scalars = {k: v for k, v in flat.items() if "/" not in k}
    pairs: dict[str, dict[str, Any]] = {}
    triples: dict[str, dict[str, dict[str, Any]]] = {}
    for key, value in flat.items():
        parts = key.split("/")
        if len(parts) == 2:
            pairs.setdefault(parts[0], {})[parts[1]] = value
        elif len(parts) >= 3:
            triples.setdefault(parts[0], {}).setdefault("/".join(parts[1:-1]), {})[parts[-1]] = value
    kv_columns, texts = [], []
    if scalars:
        numbers = [(k, v) for k, v in scalars.items() if not isinstance(v, str) or len(v) <= 40]
        texts = [(k, v) for k, v in scalars.items() if isinstance(v, str) and len(v) > 40]
        per_col = max(1, math.ceil(len(numbers) / 3))
        kv_columns = [numbers[i:i + per_col] for i in range(0, len(numbers), per_col)]
    # 2-level keys: groups sharing the same columns share a table (e.g. fid/<method>, kid/<method>)
    by_columns: dict[tuple[str, ...], list[str]] = {}
    for group, row in pairs.items():
        by_columns.setdefault(tuple(row), []).append(group)
    pair_tables = [(["", *columns], [[g, *(pairs[g][c] for c in columns)] for g in groups])
                   for columns, groups in by_columns.items()]
    triple_tables = []
    for group, rows in triples.items():
        columns = list(dict.fromkeys(c for row in rows.values() for c in row))
        triple_tables.append((group, ["", *columns], [[r, *(row.get(c) for c in columns)] for r, row in rows.items()]))
    return hp.component("metric_tables")(kv_columns, texts, pair_tables, triple_tables)


def headlines(metrics_by_stage: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, str, str, Any]]:
    """(label, stage, key, value) of the headline numbers present, in HEADLINES order."""
    found, seen = [], set()
    for pattern, label in HEADLINES:
        for stage, metrics in metrics_by_stage.items():
            hits = [k for k, v in flatten_metrics(metrics).items() if fnmatch.fnmatchcase(k, pattern) and is_number(v)]
            for key in hits:
                if key in seen:
                    continue
                seen.add(key)
                suffix = "" if key == pattern else f" ({key.split('/')[1] if '*' in pattern else key})"
                found.append((label + suffix, stage, key, flatten_metrics(metrics)[key]))
            if hits:
                break
    return found


SKIP_KEYS = ("status", "reason", "how_to", "converted", "message", "how")


def skip_note(metrics: Mapping[str, Any]) -> dict[str, str] | None:
    """``{reason, how}`` when a stage ran without its inputs (SD without weights): its metrics say so."""
    if metrics.get("status") == "skipped" or metrics.get("converted") is False:
        return {"reason": str(metrics.get("reason") or metrics.get("message") or "skipped"),
                "how": str(metrics.get("how_to") or metrics.get("how") or "")}
    return None


# ------------------------------------------------------------------------------------------------
# Plot data and figures
# ------------------------------------------------------------------------------------------------

def read_table(text: str, delimiter: str = "\t") -> dict[str, list[float]]:
    """Columns of a TSV/CSV as floats (blank or non-numeric cells become NaN)."""
    rows = list(csv.reader(io.StringIO(text), delimiter=delimiter))
    if not rows:
        return {}
    header, body = rows[0], [r for r in rows[1:] if r]
    columns: dict[str, list[float]] = {h: [] for h in header}
    for row in body:
        for h, value in zip(header, row + [""] * (len(header) - len(row))):
            try:
                columns[h].append(float(value))
            except ValueError:
                columns[h].append(math.nan)
    return columns


def plot_series(plot: Plot, tables: Mapping[str, Mapping[str, list[float]]]) -> dict[str, tuple[str, list, list]]:
    """``{column: (x name, x values, y values)}`` of a data plot, from its files' tables.

    Columns follow dvc.yaml's ``y``; without one, DVC's default (the last column) is used, and
    without ``x`` the ``step`` column or the row number.
    """
    out = {}
    for file, columns in plot.y.items():
        table = tables.get(file)
        if not table:
            continue
        names = list(table)
        x_name = plot.x if plot.x in table else ("step" if "step" in table else None)
        xs = table[x_name] if x_name else list(range(len(next(iter(table.values())))))
        for column in columns or [names[-1]]:
            if column in table:
                keep = [i for i, v in enumerate(table[column]) if math.isfinite(v)]
                label = column if len(plot.y) == 1 else f"{os.path.basename(file)}: {column}"
                out[label] = (x_name or "row", [xs[i] for i in keep], [table[column][i] for i in keep])
    return out


def plot_title(plot: Plot) -> str:
    return plot.title or plot.name


def figure_order(name: str) -> tuple:
    """Sample grids first, then by name."""
    return (0 if "samples" in os.path.basename(name) else 1, name)


def image_files(root: Path, plot: Plot) -> list[Path]:
    """The images of an image plot: the file, or the folder's images (sample grids first)."""
    files = []
    for rel in plot.files:
        path = root / rel
        if path.is_dir():
            files += sorted((p for p in path.rglob("*") if p.suffix.lower() in hp.IMAGE_TYPES),
                            key=lambda p: figure_order(str(p)))
        elif path.is_file() and path.suffix.lower() in hp.IMAGE_TYPES:
            files.append(path)
    return files


def data_plot_html(plot: Plot, tables: Mapping[str, Mapping[str, list[float]]]) -> hp.Markup | None:
    """A data plot as a captioned chart (None when its files hold none of its columns)."""
    series = plot_series(plot, tables)
    if not series:
        return None
    x_name = next(iter(series.values()))[0]
    lines = [hp.Series(label, xs, ys) for label, (_, xs, ys) in series.items()]
    ylabel = next(iter(series)) if len(series) == 1 else ""
    png = hp.line_chart(lines, plot_title(plot), x_name, ylabel)
    return hp.figure(png, plot_title(plot))


# ------------------------------------------------------------------------------------------------
# MLflow runs
# ------------------------------------------------------------------------------------------------

@dataclass
class RunRef:
    run_id: str
    experiment_id: str
    artifact_uri: str
    start_time: int
    tags: dict[str, str]
    matched: bool  # its logged metrics equal the stage's metrics.json
    checked: bool = True  # there were numbers to match on (False: the newest run, unchecked)


def metrics_match(logged: Mapping[str, float], metrics: Mapping[str, Any]) -> bool:
    """True when every metric both sides have agrees (to the 4-5 digits metrics.json rounds to).

    ``metrics`` (a metrics.json, nested or with ``a/b`` keys) is named as the stages log it to
    MLflow: :func:`~diffmodels.core.tracking.metric_values`, the one rule they all use."""
    expected = tracking.metric_values(metrics)
    shared = [k for k in expected if k in logged]
    return bool(shared) and all(math.isclose(logged[k], expected[k], rel_tol=1e-4, abs_tol=1e-6) for k in shared)


def pick_run(runs: Sequence[Any], metrics: Mapping[str, Any], exp_name: str | None = None) -> RunRef | None:
    """The run (MLflow ``Run`` objects of one stage) that produced ``metrics``.

    Matching runs first, then runs tagged with ``exp_name`` (the DVC experiment), then the newest.
    With no match, the newest run is returned marked ``matched=False``.
    """
    if not runs:
        return None

    def rank(run) -> tuple:
        match = metrics_match(run.data.metrics, metrics) if metrics else False
        same_exp = exp_name is not None and run.data.tags.get("dvc_exp_name") == exp_name
        return (match, same_exp, run.info.start_time or 0)

    best = max(runs, key=rank)
    matched = rank(best)[0]
    checked = bool(tracking.metric_values(metrics or {}))
    return RunRef(best.info.run_id, best.info.experiment_id, best.info.artifact_uri, best.info.start_time or 0,
                  dict(best.data.tags), matched, checked)


def stage_runs(experiment: str, tracking_uri: str) -> dict[str, list[Any]]:
    """Finished top-level runs of the MLflow experiment, by ``stage`` tag ({} when there is none)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    try:
        runs = mlflow.search_runs(experiment_names=[experiment], filter_string="attributes.status = 'FINISHED'",
                                  output_format="list")
    except Exception as exc:  # an unreachable store is reported on the page, not fatal to the report
        raise DiffmodelsError(f"cannot read MLflow runs from {tracking_uri}: {str(exc).splitlines()[0]}") from None
    by_stage: dict[str, list[Any]] = {}
    for run in runs:
        if "mlflow.parentRunId" in run.data.tags:
            continue
        by_stage.setdefault(run.data.tags.get("stage", ""), []).append(run)
    return by_stage


def ui_base(tracking_uri: str) -> str:
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return "http://127.0.0.1:5000"


def ui_url(tracking_uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """A link into the MLflow UI, on the training-runs view (not MLflow 3's GenAI overview:
    :data:`~diffmodels.core.tracking.UI_RUNS_VIEW`)."""
    path = f"/#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{ui_base(tracking_uri)}{path}?{tracking.UI_RUNS_VIEW}"


def run_link(ref: RunRef | None, tracking_uri: str) -> hp.Markup:
    url = ui_url(tracking_uri, ref.experiment_id, ref.run_id) if ref is not None else ""
    return hp.component("run_link")(ref, url)


# ------------------------------------------------------------------------------------------------
# The page
# ------------------------------------------------------------------------------------------------

@dataclass
class ReportInputs:
    root: Path
    stages: list[Stage]
    params: dict  # params.yaml as loaded
    metrics: dict[str, dict]  # stage -> its metrics.json content
    runs: dict[str, RunRef | None]
    tracking_uri: str
    bench_dir: Path | None = None
    compare_page: str | None = None  # relative link to compare.html when it exists
    context: dict[str, str] = field(default_factory=dict)  # commit, experiment, pipeline id
    tracking_error: str | None = None


# The keys of one FID/KID result (diffmodels.metrics.fid, docs/metrics.md): FID with its bootstrap
# interval and its floor (real vs real at the same sizes), KID with its spread and interval, the
# sizes and the feature extractor; a set of samples also has precision / recall / density / coverage.
RESULT_KEYS = ("fid", "fid_low", "fid_high", "fid_floor", "fid_floor_std", "kid_mean", "kid_std", "kid_low",
               "kid_high", "num_real", "num_fake", "extractor")
SET_KEYS = ("precision", "recall", "density", "coverage")


@dataclass
class FidResult:
    """One FID the pipeline computed, with whatever of RESULT_KEYS / SET_KEYS its metrics file holds
    (an older file has the FID and KID only)."""

    name: str  # "<stage>: <sampler or method>"
    fid: float
    kid: float | None
    values: dict[str, Any] = field(default_factory=dict)  # RESULT_KEYS / SET_KEYS present, kid_mean as kid

    def get(self, key: str) -> Any:
        value = self.values.get(key)
        return value if is_number(value) or isinstance(value, str) else None

    def interval(self, low: str, high: str) -> tuple[float, float] | None:
        lo, hi = self.get(low), self.get(high)
        return (float(lo), float(hi)) if is_number(lo) and is_number(hi) else None


def is_result(value: Any) -> bool:
    """A FID/KID result dict: a mapping with a numeric ``fid``."""
    return isinstance(value, Mapping) and is_number(value.get("fid"))


def _results(metrics: Mapping[str, Any], path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Mapping]]:
    out = []
    for key, value in metrics.items():
        if is_result(value):
            out.append(((*path, str(key)), value))
        elif isinstance(value, Mapping):
            out += _results(value, (*path, str(key)))
    return out


def without_results(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """``metrics`` with its FID/KID result dicts taken out (they have their own table)."""
    return {k: without_results(v) if isinstance(v, Mapping) else v
            for k, v in metrics.items() if not is_result(v)}


def _result_name(path: Sequence[str]) -> str:
    parts = [p.removeprefix("fid_") for p in path if p not in ("fid", "fid_kid", "results", "scores")]
    return "/".join(parts) or "fid"


def fid_rows(metrics_by_stage: Mapping[str, Mapping[str, Any]]) -> list[FidResult]:
    """Every FID the pipeline computed. Result dicts (a mapping with ``fid`` and the RESULT_KEYS,
    anywhere in a stage's metrics: ``fid_ddpm: {...}``, ``fid: {repaint: {...}}``) are named by
    their path; older files' flat ``fid_<sampler>`` / ``fid/<method>`` numbers with
    ``kid_<sampler>`` / ``kid/<method>`` are read as FID and KID alone."""
    rows = []
    for stage, metrics in metrics_by_stage.items():
        for path, result in _results(metrics):
            values = {k: result[k] for k in (*RESULT_KEYS, *SET_KEYS) if k in result}
            kid = result.get("kid_mean", result.get("kid"))
            rows.append(FidResult(f"{stage}: {_result_name(path)}", float(result["fid"]),
                                  float(kid) if is_number(kid) else None, values))
        flat = flatten_metrics(without_results(metrics))
        for key, value in flat.items():
            name = key[4:] if key.startswith(("fid_", "fid/")) else None
            if name is None or name == "extractor" or not is_number(value):
                continue
            kid = flat.get(f"kid{key[3]}{name}")
            kid_std = flat.get(f"kid_std{key[3]}{name}")
            values = {"kid_std": kid_std} if is_number(kid_std) else {}
            rows.append(FidResult(f"{stage}: {name}", float(value), float(kid) if is_number(kid) else None, values))
    return rows


TSV_COLUMNS = ("fid_low", "fid_high", "fid_floor")


def fid_tsv(rows: Sequence[FidResult]) -> str:
    """``reports/fid.tsv`` (sampler, fid, kid, FID interval and floor; 6 significant digits; blank
    when a metrics file does not have it), drawn by ``dvc plots``."""
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="\t", lineterminator="\n")
    writer.writerow(["sampler", "fid", "kid", *TSV_COLUMNS])

    def g(v):
        return "" if not is_number(v) else f"{v:.6g}"

    writer.writerows([r.name, g(r.fid), g(r.kid), *(g(r.get(c)) for c in TSV_COLUMNS)] for r in rows)
    return buf.getvalue()


# Columns of the summary's FID table: (heading, how to show a FidResult), shown when any row has it.
def _interval_cell(r: FidResult, low: str, high: str) -> str | None:
    iv = r.interval(low, high)
    return None if iv is None else f"[{hp.fmt(iv[0])}, {hp.fmt(iv[1])}]"


def _pm_cell(r: FidResult, mean: Any, std: str) -> str | None:
    if not is_number(mean):
        return None
    spread = r.get(std)
    return hp.fmt(float(mean)) + ("" if not is_number(spread) else f" \u00b1 {hp.fmt(float(spread))}")


def _n_cell(r: FidResult) -> str | None:
    fake, real = r.get("num_fake"), r.get("num_real")
    if not is_number(fake) and not is_number(real):
        return None
    return f"{hp.fmt(fake) if is_number(fake) else '?'} / {hp.fmt(real) if is_number(real) else '?'}"


FID_COLUMNS = (
    ("FID", lambda r: r.fid),
    ("FID 95% interval", lambda r: _interval_cell(r, "fid_low", "fid_high")),
    ("FID floor (real vs real) \u00b1 std", lambda r: _pm_cell(r, r.get("fid_floor"), "fid_floor_std")),
    ("KID \u00b1 std", lambda r: _pm_cell(r, r.kid, "kid_std")),
    ("KID 95% interval", lambda r: _interval_cell(r, "kid_low", "kid_high")),
    ("n generated / real", _n_cell),
    *((k, lambda r, k=k: r.get(k)) for k in SET_KEYS),
    ("extractor", lambda r: r.get("extractor")),
)


def fid_table(rows: Sequence[FidResult]) -> dict[str, list] | None:
    """The summary's FID/KID table: one row per result, the columns any result has."""
    if not rows:
        return None
    cells = [[get(r) for _, get in FID_COLUMNS] for r in rows]
    keep = [j for j in range(len(FID_COLUMNS)) if any(c[j] is not None for c in cells)]
    return {"header": ["result", *(FID_COLUMNS[j][0] for j in keep)],
            "rows": [[r.name, *(c[j] for j in keep)] for r, c in zip(rows, cells)]}


def fid_card_note(r: FidResult) -> str:
    """``[low, high], n=1000, floor 2.1`` of a result (what it has), for its summary card."""
    parts = []
    if (iv := r.interval("fid_low", "fid_high")) is not None:
        parts.append(f"95% [{hp.fmt(iv[0])}, {hp.fmt(iv[1])}]")
    if is_number(r.get("num_fake")):
        parts.append(f"n={hp.fmt(r.get('num_fake'))}")
    if is_number(r.get("fid_floor")):
        parts.append(f"floor {hp.fmt(float(r.get('fid_floor')))}")
    return ", ".join(parts)


def _params_rows(params: Mapping[str, Any]) -> tuple[list, list]:
    """(top-level scalars, [(group, rows)]) of params.yaml for the page's parameter tables."""
    scalars = [(k, v) for k, v in params.items() if not isinstance(v, Mapping)]
    groups = [(group, [(k, v if not isinstance(v, (list, dict)) else json.dumps(v))
                       for k, v in flatten_metrics(values).items()])
              for group, values in params.items() if isinstance(values, Mapping)]
    return scalars, groups


def markdown_tables(text: str) -> list[tuple]:
    """Plain text and its Markdown tables (``| a | b |`` lines, ``|---|`` rules dropped) as blocks:
    ``("pre", text)`` or ``("table", header, rows)``. Cells are read with the csv module (``|``
    the delimiter; a ``\\|`` inside a cell stays a ``|``)."""
    blocks: list[tuple] = []
    plain: list[str] = []
    rows: list[str] = []

    def flush_plain():
        if plain and any(line.strip() for line in plain):
            blocks.append(("pre", "\n".join(plain).strip("\n")))
        plain.clear()

    def flush_rows():
        lines = [r.strip().removeprefix("|").removesuffix("|") for r in rows
                 if not set(r.replace("|", "").strip()) <= set("-: ")]
        cells = [[c.strip() for c in row] for row in csv.reader(lines, delimiter="|", escapechar="\\",
                                                                 quoting=csv.QUOTE_NONE)]
        if cells:
            blocks.append(("table", cells[0], cells[1:]))
        rows.clear()

    for line in text.splitlines():
        if line.lstrip().startswith("|"):
            flush_plain()
            rows.append(line)
        else:
            flush_rows()
            plain.append(line)
    flush_rows()
    flush_plain()
    return blocks


def text_with_tables(text: str) -> hp.Markup:
    """Plain text as <pre>, with its Markdown tables as HTML tables."""
    return hp.component("text_blocks")(markdown_tables(text))


def _bench_items(bench_dir: Path) -> list[dict]:
    """The benchmarks section: text reports (with their tables), figures, JSON without a text twin."""
    items = []
    files = sorted(bench_dir.iterdir()) if bench_dir.is_dir() else []
    stems_with_text = {f.stem for f in files if f.suffix == ".txt"}
    for f in files:
        if f.suffix == ".txt":
            items.append({"kind": "text", "name": f.name, "body": text_with_tables(f.read_text(errors="replace"))})
        elif f.suffix.lower() in hp.IMAGE_TYPES:
            items.append({"kind": "figure", "name": f.name,
                          "body": hp.figure(f.read_bytes(), f.name, hp.IMAGE_TYPES[f.suffix.lower()])})
        elif f.suffix == ".json" and f.stem not in stems_with_text:
            items.append({"kind": "json", "name": f.name, "body": f.read_text(errors="replace")})
    return items


def stage_view(inputs: ReportInputs, stage: Stage) -> dict[str, Any]:
    """What the page shows of one stage: run link, skip note, metric tables, charts, images."""
    root = inputs.root
    metrics = inputs.metrics.get(stage.name, {})
    note = skip_note(metrics)
    if note:
        metrics = {k: v for k, v in metrics.items() if k not in SKIP_KEYS}
    tables = {}
    for plot in stage.plots:
        for file in plot.y:
            path = root / file
            if path.is_file():
                tables[file] = read_table(path.read_text(), "," if file.endswith(".csv") else "\t")
    charts = [c for c in (data_plot_html(p, tables) for p in stage.plots if not p.is_image) if c]
    image_groups = []
    report_dir = root / stage.report_dir
    for plot in stage.plots:
        if plot.is_image:
            files = image_files(root, plot)
            if files:
                image_groups.append([hp.figure(f.read_bytes(),
                                               str(f.relative_to(report_dir)) if f.is_relative_to(report_dir) else f.name,
                                               hp.IMAGE_TYPES[f.suffix.lower()]) for f in files])
    return {"name": stage.name, "run_link": run_link(inputs.runs.get(stage.name), inputs.tracking_uri),
            "skip": note, "tables": metric_tables(metrics) if metrics else None,
            "expects_metrics": bool(stage.metrics), "charts": charts, "image_groups": image_groups}


def render_index(inputs: ReportInputs, skip: Iterable[str] = ("report",)) -> str:
    """The whole ``reports/index.html``."""
    skip = set(skip)
    stages = [s for s in inputs.stages if s.name not in skip]
    by_stage = {s.name: inputs.metrics.get(s.name, {}) for s in stages}
    rows = fid_rows(by_stage)
    # FID/KID result dicts are shown by the FID table and their own cards, not as loose headlines
    cards = [{"label": label, "stage": stage, "key": key, "value": value, "note": ""}
             for label, stage, key, value in headlines({n: without_results(m) for n, m in by_stage.items()})]
    cards += [{"label": f"FID, {r.name}", "stage": r.name.split(":")[0], "key": "fid", "value": r.fid,
               "note": fid_card_note(r)} for r in rows if r.values.get("fid_low") is not None
              or r.values.get("num_fake") is not None]
    fid_figure = None
    if rows:
        intervals = [r.interval("fid_low", "fid_high") for r in rows]
        fid_figure = hp.figure(hp.bar_chart([r.name for r in rows], [r.fid for r in rows],
                                            "FID per sampler / inpainting method (lower is better)"
                                            + ("\nerror bars: 95% interval" if any(intervals) else ""), "FID",
                                            intervals=intervals),
                               "FID per sampler")
    nav = [("summary", "summary")] + [(s.name, s.name) for s in stages]
    bench = _bench_items(inputs.bench_dir) if inputs.bench_dir is not None else []
    if bench:
        nav.append(("benchmarks", "benchmarks"))
    nav.append(("params", "params"))
    experiment_id = next((ref.experiment_id for ref in inputs.runs.values() if ref is not None), None)
    param_scalars, param_groups = _params_rows(inputs.params)
    return hp.render(
        "report.html.j2", title="diffmodels report", nav=nav, context=inputs.context, cards=cards,
        fid_figure=fid_figure, fid_table=fid_table(rows), compare_page=inputs.compare_page, tracking_error=inputs.tracking_error,
        tracking_uri=inputs.tracking_uri,
        experiment_url=ui_url(inputs.tracking_uri, experiment_id) if experiment_id else None,
        stages=[stage_view(inputs, s) for s in stages], bench=bench,
        param_scalars=param_scalars, param_groups=param_groups)


def report_metrics(inputs: ReportInputs) -> dict:
    """``reports/metrics.json``: params, every stage's metrics, FIDs and MLflow run ids in one place."""
    bench = {}
    if inputs.bench_dir is not None and inputs.bench_dir.is_dir():
        for f in sorted(inputs.bench_dir.glob("*.json")):
            try:
                bench[f.stem] = json.loads(f.read_text())
            except json.JSONDecodeError:
                continue
    stages = [s for s in inputs.stages if s.name != "report"]
    return {
        "params": inputs.params,
        "stages": {s.name: inputs.metrics.get(s.name, {}) for s in stages},
        "fid": {r.name: {"fid": r.fid, "kid": r.kid, **{k: v for k, v in r.values.items() if k != "kid_mean"}}
                for r in fid_rows({s.name: inputs.metrics.get(s.name, {}) for s in stages})},
        "mlflow_runs": {name: (None if ref is None else {"run_id": ref.run_id, "experiment_id": ref.experiment_id,
                                                          "matched_metrics": ref.matched})
                        for name, ref in inputs.runs.items()},
        "benchmarks": bench,
        "context": inputs.context,
    }


def gather(root: Path, params_path: Path, tracking_uri: str, experiment: str, exp_name: str | None = None,
           dvc_yaml: str = "dvc.yaml") -> ReportInputs:
    """Read everything the report shows from the project at ``root`` and the MLflow store."""
    stages = read_pipeline(root / dvc_yaml)
    params = yaml.safe_load(params_path.read_text()) or {}
    metrics = {s.name: read_metrics(root, s) for s in stages}
    runs: dict[str, RunRef | None] = {}
    error = None
    try:
        by_stage = stage_runs(experiment, tracking_uri)
    except DiffmodelsError as exc:
        by_stage, error = {}, str(exc)
    for s in stages:
        if s.name != "report":
            runs[s.name] = pick_run(by_stage.get(s.name, []), metrics[s.name], exp_name)
    bench = root / "reports" / "bench"
    compare = root / "reports" / "compare.html"
    return ReportInputs(root=root, stages=stages, params=params, metrics=metrics, runs=runs, tracking_uri=tracking_uri,
                        bench_dir=bench if bench.is_dir() else None,
                        compare_page="compare.html" if compare.is_file() else None, tracking_error=error)
