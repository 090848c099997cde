"""Ablations side by side: DVC experiments -> one HTML page (``python3 -m stages.compare``).

Sources
    ``dvc.api.exp_show`` lists the baseline and its experiments with their state; each one's
    params come from ``dvc.api.params_show(rev=)`` and its metrics files (those of ``dvc.yaml``),
    as written, through ``dvc.api.DVCFileSystem(rev=)``. A stage that did not run for the rev's
    params and inputs (``dvc exp run sample`` leaves ``eval_leakage``'s older files in place) is
    *stale* (:func:`stale_stages`, from the rev's ``dvc.lock``): its metrics are left out and the page
    names it, so no experiment is credited with numbers measured on another. (``exp_show``'s own table cannot serve
    for the values: it flattens every metrics file into one row, names a key by its file only
    when two files share it, and turns numbers into formatted strings and back.) Files
    (loss curves, leakage profiles, sample grids) come from the workspace for the stages whose
    metrics there equal the experiment's (the experiment *is* the workspace for that stage), and
    otherwise from the MLflow run that produced them: the stage's finished run whose logged metrics
    match (:func:`diffmodels.reporting.report.pick_run`), preferring runs tagged with the experiment's name
    (``dvc_exp_name``), searching its child runs too (eval_inpaint logs panels per method).

Seeds
    Experiments whose params are equal except ``seed`` form a *group* (:func:`group_experiments`;
    two runs of one group with the same seed count once). Each metric of a group is shown as
    its mean +- the half-width of the 95% Student t interval over the group's seeds, with n (n = 1:
    one run, no interval), and each pair of groups is compared by a two-sided t-test, significant
    when p < 0.05: paired over the seeds when both groups ran the same ones, else Welch's
    (:mod:`diffmodels.metrics.seeds`; docs/metrics.md#seeds).

Page
    1. params that differ, with headline metrics, best per column marked;
    2. with seeds: groups (mean +- 95% interval, n) and which differences are significant;
    3. every numeric metric that differs, one row per metric, best marked;
    4. data plots of ``dvc.yaml`` (loss, validation, leakage) overlaid, one line per experiment
       or, with seeds, one per group: the mean over its seeds with a min-max band;
    5. image plots side by side, one column per experiment (images equal in all shown once).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffmodels.core.errors import DiffmodelsError
from diffmodels.metrics import seeds
from diffmodels.reporting import htmlpage as hp
from diffmodels.reporting import report

NOT_FINISHED = ("queued", "running", "failed")
SEED_KEY = "seed"  # the param that tells the runs of one group apart
# Headline columns: the report's headlines, then the samplers' KID and FID with their floor and
# precision / recall (the report shows those in its FID table instead; eval_inpaint's are in the
# all-metrics table, as the first stage with a match takes a pattern).
HEADLINE_KEYS = (*(pattern for pattern, _ in report.HEADLINES), "scores/*/kid_mean", "scores/*/fid",
                 "scores/*/fid_floor", "scores/*/precision", "scores/*/recall")


@dataclass
class Experiment:
    name: str
    rev: str
    params: dict[str, Any]  # flat, dotted (params.yaml)
    metrics: dict[str, dict]  # metrics file -> its content
    kind: str = "experiment"  # baseline | experiment | workspace
    color: str = ""
    runs: dict[str, report.RunRef | None] = field(default_factory=dict)  # stage -> run
    local: set[str] = field(default_factory=set)  # stages whose files in the workspace are this experiment's
    stale: tuple[str, ...] = ()  # stages whose files are not this experiment's results (left out of metrics)


# read(rev) -> (flat params, {metrics file: content}, stale stages)
RevData = Callable[[str | None], tuple[dict[str, Any], dict[str, dict], tuple[str, ...]]]


def parse_exp_show(rows: Sequence[Mapping], read: RevData
                   ) -> tuple[Experiment | None, list[Experiment], list[tuple[str, str]]]:
    """(workspace, [baseline, its experiments...], skipped (name, why)) from ``dvc.api.exp_show`` rows.

    ``read(rev)`` gives a rev's (flat params, {metrics file: content}, stale stages); ``rev=None``
    the workspace. The baseline is the first commit row (``HEAD``); experiments that are queued,
    running, failed, unreadable or have no metrics are skipped with the reason.
    """
    workspace, chosen, skipped = None, [], []
    for row in rows:
        rev, typ = str(row.get("rev") or ""), row.get("typ")
        if rev == "workspace":
            params, metrics, stale = read(None)
            workspace = Experiment("workspace", "workspace", params, metrics, kind="workspace", stale=stale)
            continue
        if typ == "baseline":
            if chosen:  # only the current baseline's experiments (exp_show lists HEAD first)
                break
            params, metrics, stale = read(rev)
            chosen.append(Experiment(rev, rev, params, metrics, kind="baseline", stale=stale))
            continue
        if not chosen:
            continue
        name = row.get("Experiment") or rev
        state = str(row.get("State") or "").lower()
        if state in NOT_FINISHED:
            skipped.append((name, state))
            continue
        try:
            params, metrics, stale = read(rev)
        except (OSError, ValueError, DiffmodelsError) as exc:  # ValueError: a metrics file that is not JSON
            skipped.append((name, f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"))
            continue
        if not metrics:
            skipped.append((name, "no metrics"))
        else:
            chosen.append(Experiment(name, rev, params, metrics, stale=stale))
    return workspace, chosen, skipped


_MISSING = object()  # a param a rev does not have: equal to no recorded value


def _lookup(params: Mapping[str, Any], dotted: str) -> Any:
    """params["a"]["b"] for "a.b", or _MISSING."""
    value: Any = params
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return _MISSING
        value = value[part]
    return value


def stale_stages(lock: Mapping[str, Any], params: Mapping[str, Any]) -> tuple[str, ...]:
    """Stages of a ``dvc.lock`` whose recorded run does not belong to the current ``params`` (nested,
    as ``params.yaml`` holds them) and the outputs of the other locked stages, in lock order:

    - a param it ran with differs from ``params`` (``dvc exp run -S vae.steps=800 sample`` leaves
      ``eval_leakage`` locked with the old ``vae`` group), or
    - a dependency's hash differs from the hash another stage's run recorded for that output, or
      that output comes from a stale stage (the staleness flows downstream).

    Code dependencies are not checked (an experiment changes params, not files); the lock entry
    of a stage that never ran is simply absent, and so are its metrics.
    """
    entries = lock.get("stages") or {}
    produced: dict[str, tuple[str, Any]] = {}  # output path -> (stage, hash)
    for name, entry in entries.items():
        for out in entry.get("outs") or []:
            produced[out["path"]] = (name, out.get("md5"))  # DVC 3: ``hash: md5`` names the algorithm
    stale: list[str] = []
    for name, entry in entries.items():  # dvc.lock lists stages in pipeline order
        recorded = {k: v for file_params in (entry.get("params") or {}).values() for k, v in file_params.items()}
        if any(_lookup(params, k) != v for k, v in recorded.items()):
            stale.append(name)
            continue
        for dep in entry.get("deps") or []:
            source = produced.get(dep["path"])
            if source and source[0] != name and (source[0] in stale or source[1] != dep.get("md5")):
                stale.append(name)
                break
    return tuple(stale)


def rev_reader(root: Path, stages: Sequence[report.Stage]) -> RevData:
    """``read(rev)`` for :func:`parse_exp_show`: params (dotted names), the metrics files of a rev
    (a commit, branch or experiment) through ``dvc.api``, and its stale stages (their metrics left
    out); ``None`` is the workspace."""
    import dvc.api
    import yaml

    files = {m: s.name for s in stages for m in s.metrics}

    def read(rev: str | None) -> tuple[dict[str, Any], dict[str, dict], tuple[str, ...]]:
        nested = dvc.api.params_show(repo=str(root), rev=rev)
        params = {k.replace("/", "."): v for k, v in report.flatten_metrics(nested).items()}
        fs = dvc.api.DVCFileSystem(str(root), rev=rev) if rev is not None else None

        def text(path: str) -> str:
            return fs.read_text(path) if fs is not None else (root / path).read_text()

        try:
            stale = stale_stages(yaml.safe_load(text("dvc.lock")) or {}, nested)
        except FileNotFoundError:  # nothing has run in that rev
            stale = ()
        metrics = {}
        for path, stage in files.items():
            if stage in stale:
                continue
            try:
                content = json.loads(text(path))
            except FileNotFoundError:  # the stage has not run in that rev
                continue
            if isinstance(content, Mapping):
                metrics[path] = content
        return params, metrics, tuple(s for s in stale if s in files.values())

    return read


def dvc_experiments(root: Path, stages: Sequence[report.Stage]
                    ) -> tuple[Experiment | None, list[Experiment], list[tuple[str, str]]]:
    """The workspace, the current baseline and its experiments in the DVC project at ``root``."""
    import dvc.api
    from dvc.exceptions import DvcException

    try:
        rows = dvc.api.exp_show(repo=str(root))
        workspace, exps, skipped = parse_exp_show(rows, rev_reader(root, stages))
    except (DvcException, ValueError) as exc:  # ValueError: a metrics file that is not JSON
        raise DiffmodelsError(f"cannot read the DVC experiments in {root}: {exc}") from None
    for exp in exps:  # full commit ids (exp_show gives 7 characters, or the branch name)
        exp.rev = _full_rev(root, exp.rev)
    return workspace, exps, skipped


def _full_rev(root: Path, rev: str) -> str:
    out = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], cwd=root,
                         capture_output=True, text=True)
    return out.stdout.strip() or rev


def select(experiments: list[Experiment], names: Sequence[str]) -> list[Experiment]:
    """The named experiments (by name, or a prefix of the rev) in the order given."""
    if not names:
        return experiments
    out = []
    for name in names:
        hit = [e for e in experiments if e.name == name or (len(name) >= 4 and e.rev.startswith(name))]
        if not hit:
            known = ", ".join(e.name for e in experiments) or "none"
            raise DiffmodelsError(f"no finished experiment named {name!r} in `dvc exp show` (have: {known})")
        out.append(hit[0])
    return out


# ------------------------------------------------------------------------------------------------
# Which metric is better
# ------------------------------------------------------------------------------------------------

def direction(key: str) -> str | None:
    """'max', 'min', 'one' (closest to 1 is best) or None (not a quality measure) for a metric key."""
    k = key.lower()
    tokens = set(re.split(r"[/._\-]", k))
    if "per_second" in k or tokens & {"psnr", "ssim", "precision", "recall", "coverage"}:
        return "max"
    if "seam" in tokens:
        return "one"
    if "std" in tokens:  # a spread, not a score (kid_std_ddpm)
        return None
    if tokens & {"fid", "kid", "loss", "leak", "mae", "seconds", "memory"}:
        return "min"
    return None


def best_index(values: Sequence[Any], how: str | None) -> set[int]:
    numbers = [(i, float(v)) for i, v in enumerate(values) if report.is_number(v)]
    if how is None or len(numbers) < 2 or len({v for _, v in numbers}) < 2:
        return set()
    score = {"max": lambda v: -v, "min": lambda v: v, "one": lambda v: abs(v - 1.0)}[how]
    top = min(score(v) for _, v in numbers)
    return {i for i, v in numbers if score(v) == top}


# ------------------------------------------------------------------------------------------------
# Groups of seeds
# ------------------------------------------------------------------------------------------------

@dataclass
class Group:
    """Experiments with the same params except ``seed``."""

    label: str  # the params that set it apart (``ddpm.mixer=attention``), or the experiment's name
    members: list[Experiment]
    duplicates: list[tuple[str, Any]] = field(default_factory=list)  # (experiment, seed) counted once already
    color: str = ""

    @property
    def seeds(self) -> list[Any]:
        return [e.params.get(SEED_KEY) for e in self.members]


def group_experiments(exps: Sequence[Experiment]) -> list[Group]:
    """Groups of ``exps`` by every param but ``seed``, in order of first appearance. A second run
    of a group with a seed it already has (the baseline and an experiment that repeats it) is left
    out of the group's numbers, so n counts distinct seeds."""
    keys = sorted({k for e in exps for k in e.params if k != SEED_KEY})
    diff = [k for k in keys if differing([e.params.get(k) for e in exps])]
    groups: dict[str, Group] = {}
    for e in exps:
        sig = json.dumps({k: e.params.get(k) for k in keys}, sort_keys=True, default=str)
        if sig not in groups:
            label = ", ".join(f"{k}={hp.fmt(e.params.get(k))}" for k in diff) or (e.name if len(exps) == 1 else "all")
            groups[sig] = Group(label, [])
        group = groups[sig]
        seed = e.params.get(SEED_KEY)
        if any(m.params.get(SEED_KEY) == seed for m in group.members):
            group.duplicates.append((e.name, seed))
        else:
            group.members.append(e)
    return list(groups.values())


def group_values(group: Group, stage: report.Stage, key: str) -> list[float]:
    """The numbers of metric ``key`` (of ``stage``) over the group's runs that have it."""
    return list(group_by_seed(group, stage, key).values())


def group_by_seed(group: Group, stage: report.Stage, key: str) -> dict[Any, float]:
    """{seed: number of metric ``key``} over the group's runs that have it."""
    values = {e.params.get(SEED_KEY): stage_metrics(e, stage).get(key) for e in group.members}
    return {seed: float(v) for seed, v in values.items() if report.is_number(v)}


def pair_test(a: Mapping[Any, float], b: Mapping[Any, float]) -> seeds.TTest | None:
    """The paired t-test when both groups have a number for exactly the same seeds (two or more),
    else Welch's (:mod:`diffmodels.metrics.seeds`); None when neither group varies over its seeds
    (a parameter count, a floor from the data alone: nothing to test)."""
    if len(set(a.values())) == 1 and len(set(b.values())) == 1:
        return None
    if len(a) >= 2 and a.keys() == b.keys():
        order = sorted(a, key=str)
        return seeds.paired([a[k] for k in order], [b[k] for k in order])
    return seeds.welch(list(a.values()), list(b.values()))


def interval_text(summary: seeds.Summary | None) -> str:
    """``mean +- half-width (n=3)``, or ``value (n=1)``; '-' without numbers."""
    if summary is None:
        return "-"
    if summary.n == 1:
        return f"{hp.fmt(summary.mean)} (n=1)"
    return f"{hp.fmt(summary.mean)} \u00b1 {hp.fmt(summary.half_width)} (n={summary.n})"


def significance_rows(groups: Sequence[Group], stage: report.Stage, key: str, only_significant: bool = False
                      ) -> list[list[Any]]:
    """[metric, group a, group b, mean a - mean b, test, t, df, p, verdict] for every pair of groups;
    the test is paired when the two groups ran the same seeds (:func:`pair_test`)."""
    rows = []
    for i, a in enumerate(groups):
        for b in groups[i + 1:]:
            xa, xb = group_by_seed(a, stage, key), group_by_seed(b, stage, key)
            if not xa or not xb:
                continue
            test = pair_test(xa, xb)
            diff = seeds.summarize(list(xa.values())).mean - seeds.summarize(list(xb.values())).mean
            if test is None:
                why = "n=1: no test" if min(len(xa), len(xb)) < 2 else "no spread: no test"
                if not only_significant:
                    rows.append([f"{stage.name}: {key}", a.label, b.label, diff, None, None, None, None, why])
                continue
            if only_significant and not test.significant:
                continue
            rows.append([f"{stage.name}: {key}", a.label, b.label, diff, test.kind, round(test.t, 3),
                         round(test.df, 2), test.p, "significant" if test.significant else "not significant"])
    return rows


def group_curve(group: Group, per_exp: Mapping[str, Mapping[str, tuple[str, list, list]]], column: str
                ) -> hp.Series | None:
    """The group's mean curve over its seeds with a min-max band, on the x values all its runs share."""
    curves = [per_exp[e.name][column] for e in group.members if column in per_exp.get(e.name, {})]
    if not curves:
        return None
    maps = [dict(zip(xs, ys)) for _, xs, ys in curves]
    shared = sorted(set.intersection(*(set(m) for m in maps)))
    if not shared:
        return None
    rows = [[m[x] for m in maps] for x in shared]
    label = f"{group.label} (n={len(curves)})"
    if len(curves) == 1:
        return hp.Series(label, shared, [r[0] for r in rows], color=group.color)
    return hp.Series(label, shared, [math.fsum(r) / len(r) for r in rows], color=group.color,
                     low=[min(r) for r in rows], high=[max(r) for r in rows])


# ------------------------------------------------------------------------------------------------
# Files of an experiment: workspace or MLflow artifacts
# ------------------------------------------------------------------------------------------------

class Files:
    """Reads a stage's report files for one experiment (bytes by path relative to the stage's dir)."""

    def __init__(self, root: Path, stages: Sequence[report.Stage], workspace: Experiment | None, tracking_uri: str,
                 by_stage: Mapping[str, list[Any]]):
        self.root, self.stages, self.uri = root, {s.name: s for s in stages}, tracking_uri
        self.workspace, self.by_stage = workspace, by_stage
        self._listing: dict[str, list[tuple[str, str]]] = {}
        self._tmp = Path(tempfile.mkdtemp(prefix="diffmodels-compare-"))

    def attach(self, exp: Experiment) -> None:
        """Decide, per stage, where ``exp``'s files are: the workspace or an MLflow run."""
        for stage in self.stages.values():
            if stage.name == "report":
                continue
            mine = {m: exp.metrics.get(m) for m in stage.metrics}
            if self.workspace and stage.metrics and all(
                    v is not None and self.workspace.metrics.get(m) == v for m, v in mine.items()):
                exp.local.add(stage.name)
            merged = {k: v for content in mine.values() if content for k, v in content.items()}
            exp.runs[stage.name] = report.pick_run(self.by_stage.get(stage.name, []), merged,
                                                   exp.name if exp.kind == "experiment" else None)

    def _artifacts(self, run_id: str) -> list[tuple[str, str]]:
        """(artifact path, run id) of a run and its child runs, recursively listed once."""
        if run_id in self._listing:
            return self._listing[run_id]
        import mlflow

        client = mlflow.MlflowClient(self.uri)
        out: list[tuple[str, str]] = []

        def walk(rid: str, path: str | None) -> None:
            for item in client.list_artifacts(rid, path):
                if item.is_dir:
                    walk(rid, item.path)
                else:
                    out.append((item.path, rid))

        walk(run_id, None)
        for child in mlflow.search_runs(search_all_experiments=True, output_format="list",
                                        filter_string=f"tags.mlflow.parentRunId = '{run_id}'"):
            walk(child.info.run_id, None)
        self._listing[run_id] = out
        return out

    def _download(self, run_id: str, path: str) -> bytes | None:
        import mlflow

        try:
            local = mlflow.MlflowClient(self.uri).download_artifacts(run_id, path, str(self._tmp))
            return Path(local).read_bytes()
        except Exception:  # a missing or unreadable artifact shows as "not available"
            return None

    def listing(self, exp: Experiment, stage: report.Stage, plot: report.Plot) -> dict[str, bytes | None]:
        """{path relative to the stage's report dir: bytes} of the files of ``plot`` for ``exp``."""
        base = stage.report_dir
        rels = [os.path.relpath(f, base) for f in plot.files]
        if stage.name in exp.local:
            out = {}
            for f in plot.files:
                path = self.root / f
                if path.is_dir():
                    for p in sorted(path.rglob("*")):
                        if p.is_file():
                            out[str(p.relative_to(self.root / base))] = p.read_bytes()
                elif path.is_file():
                    out[os.path.relpath(f, base)] = path.read_bytes()
            if out:
                return out
        ref = exp.runs.get(stage.name)
        if ref is None:
            return {}
        # A run whose metrics differ is only trusted when it is the experiment's own or when the
        # stage has no numbers to match on (e.g. sd_baselines' skip status).
        numeric = any(report.is_number(v) for v in stage_metrics(exp, stage).values())
        if not ref.matched and numeric and ref.tags.get("dvc_exp_name") != exp.name:
            return {}
        out = {}
        for art, rid in self._artifacts(ref.run_id):
            if any(art == r or art.startswith(r.rstrip("/") + "/") for r in rels):
                out[art] = self._download(rid, art)
        return out


# ------------------------------------------------------------------------------------------------
# The page
# ------------------------------------------------------------------------------------------------

def differing(values: Sequence[Any]) -> bool:
    return len({json.dumps(v, sort_keys=True, default=str) for v in values}) > 1


def stage_metrics(exp: Experiment, stage: report.Stage) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for m in stage.metrics:
        merged.update(report.flatten_metrics(exp.metrics.get(m) or {}))
    return merged


def render_compare(exps: list[Experiment], stages: Sequence[report.Stage], files: Files,
                   skipped: Sequence[tuple[str, str]] = (), tracking_uri: str = "") -> str:
    """The comparison page (``templates/compare.html.j2``) of ``exps``, files found by ``files``."""
    stages = [s for s in stages if s.name != "report"]
    for i, e in enumerate(exps):
        e.color = hp.PALETTE[i % len(hp.PALETTE)]
        files.attach(e)
    head = [hp.chip(e.color) + e.name for e in exps]  # Markup + str: the name is escaped
    nav = []

    # 1. params that differ + headline metrics
    keys = sorted({k for e in exps for k in e.params})
    diff_params = [k for k in keys if differing([e.params.get(k) for e in exps])]
    per_stage = {s.name: [stage_metrics(e, s) for e in exps] for s in stages}
    heads = []
    for pattern in HEADLINE_KEYS:
        for s in stages:
            hits = sorted({k for m in per_stage[s.name] for k, v in m.items()
                           if fnmatch.fnmatchcase(k, pattern) and report.is_number(v)})
            if hits:
                heads += [(s.name, k) for k in hits if (s.name, k) not in heads]
                break
    rows, best = [], set()
    for i, e in enumerate(exps):
        rows.append([head[i], *(e.params.get(k) for k in diff_params),
                     *(per_stage[s][i].get(k) for s, k in heads)])
    for j, (s, k) in enumerate(heads):
        for i in best_index([per_stage[s][r].get(k) for r in range(len(exps))], direction(k)):
            best.add((i, 1 + len(diff_params) + j))
    summary = {"header": ["experiment", *diff_params, *(k for _, k in heads)], "rows": rows, "best": best}

    # 2. groups of seeds: mean +- 95% interval, and a t-test between groups (paired over shared seeds)
    groups = group_experiments(exps)
    study = any(len(g.members) > 1 for g in groups)
    by_name = {s.name: s for s in stages}
    seed_view = None
    if study:
        for i, g in enumerate(groups):
            g.color = hp.PALETTE[i % len(hp.PALETTE)]
        g_rows, g_best = [], set()
        for g in groups:
            g_rows.append([hp.chip(g.color) + g.label, len(g.members), ", ".join(hp.fmt(v) for v in g.seeds),
                           *(interval_text(seeds.summarize(v)) if (v := group_values(g, by_name[s], k)) else None
                             for s, k in heads)])
        for j, (s, k) in enumerate(heads):
            means = [seeds.summarize(v).mean if (v := group_values(g, by_name[s], k)) else None for g in groups]
            g_best |= {(i, 3 + j) for i in best_index(means, direction(k))}
        head_keys = set(heads)
        tests = [r for s, k in heads for r in significance_rows(groups, by_name[s], k)]
        others = []
        for s in stages:
            for k in sorted({k for m in per_stage[s.name] for k, v in m.items() if report.is_number(v)}):
                if (s.name, k) not in head_keys:
                    others += significance_rows(groups, s, k, only_significant=True)
        seed_view = {
            "groups": {"header": ["group", "n", "seeds", *(k for _, k in heads)], "rows": g_rows, "best": g_best},
            "duplicates": [(name, seed, g.label) for g in groups for name, seed in g.duplicates],
            "tests": {"header": ["metric", "group a", "group b", "mean a - mean b", "test", "t", "df", "p",
                                 seeds.TEST_NAME], "rows": tests},
            "others": {"header": ["metric", "group a", "group b", "mean a - mean b", "test", "t", "df", "p", "verdict"],
                       "rows": others},
            "min_n": min(len(g.members) for g in groups), "test_name": seeds.TEST_NAME,
        }
        nav.append(("seeds", "seeds"))
    kinds = ", ".join(f"{e.name} ({e.kind}{', ' + e.rev[:7] if e.rev and e.kind != 'workspace' else ''})"
                      for e in exps)
    nav.append(("summary", "summary"))

    # 3. every numeric metric that differs
    metric_blocks = []
    for s in stages:
        ms = per_stage[s.name]
        mkeys = [k for k in dict.fromkeys(k for m in ms for k in m)
                 if any(report.is_number(m.get(k)) for m in ms) and differing([m.get(k) for m in ms])]
        if not mkeys:
            continue
        rows, best = [], set()
        for r, k in enumerate(mkeys):
            values = [m.get(k) for m in ms]
            rows.append([k, *values])
            best |= {(r, 1 + i) for i in best_index(values, direction(k))}
        metric_blocks.append({"stage": s.name, "header": ["metric", *head], "rows": rows, "best": best})
    if metric_blocks:
        nav.append(("metrics", "metrics"))

    # 4. curves overlaid
    charts = []
    for s in stages:
        for plot in s.plots:
            if plot.is_image:
                continue
            per_exp = {}
            for e in exps:
                got = files.listing(e, s, plot)
                tables = {f: report.read_table(got[os.path.relpath(f, s.report_dir)].decode(errors="replace"),
                                               "," if f.endswith(".csv") else "\t")
                          for f in plot.files if got.get(os.path.relpath(f, s.report_dir))}
                per_exp[e.name] = report.plot_series(plot, tables)
            columns = list(dict.fromkeys(c for series in per_exp.values() for c in series))
            for column in columns:
                if study:  # one line per group: the mean over its seeds, min-max band
                    lines = [line for g in groups if (line := group_curve(g, per_exp, column)) is not None]
                else:
                    lines = [hp.Series(e.name, *per_exp[e.name][column][1:], color=e.color)
                             for e in exps if column in per_exp[e.name]]
                if not lines:
                    continue
                if not study and len(lines) == len(exps) > 1 and all(
                        (list(line.x), list(line.y)) == (list(lines[0].x), list(lines[0].y)) for line in lines):
                    lines = [hp.Series(f"all {len(exps)} (identical)", lines[0].x, lines[0].y, color="#475569")]
                x_name = next(per_exp[e.name][column][0] for e in exps if column in per_exp[e.name])
                title = report.plot_title(plot) + ("" if len(columns) == 1 else f" - {column}") + (
                    "; mean over seeds, band min-max" if study else "")
                charts.append(hp.figure(hp.line_chart(lines, title, x_name, column), f"{s.name}: {title}"))
    if charts:
        nav.append(("curves", "curves"))

    # 5. images side by side
    image_blocks = []
    for s in stages:
        image_rows = []
        for plot in s.plots:
            if not plot.is_image:
                continue
            got = [files.listing(e, s, plot) for e in exps]
            for rel in sorted({r for g in got for r in g if os.path.splitext(r)[1].lower() in hp.IMAGE_TYPES},
                              key=report.figure_order):
                cells = [g.get(rel) for g in got]
                mime = hp.IMAGE_TYPES[os.path.splitext(rel)[1].lower()]
                digests = {hashlib.sha256(c).hexdigest() for c in cells if c is not None}
                if len(digests) == 1 and all(c is not None for c in cells) and len(exps) > 1:
                    image_rows.append({"rel": rel, "same": hp.scaled_img(cells[0], rel, mime)})
                    continue
                image_rows.append({"rel": rel, "same": None, "cells": [
                    (hp.scaled_img(c, f"{e.name}: {rel}", mime, 160) if c is not None else None, e)
                    for e, c in zip(exps, cells)]})
        if image_rows:
            image_blocks.append({"stage": s.name, "rows": image_rows})
    if image_blocks:
        nav.append(("images", "images"))

    # 6. where each column came from
    runs_rows = [[s.name, *((("workspace files; " if s.name in e.local else "")
                             + report.run_link(e.runs.get(s.name), tracking_uri)) for e in exps)] for s in stages]
    nav.append(("runs", "runs"))
    return hp.render(
        "compare.html.j2", title="diffmodels: experiment comparison", nav=nav, names=[e.name for e in exps],
        runs=exps, kinds=kinds, diff_params=diff_params, skipped=list(skipped), summary=summary, seed_view=seed_view,
        stale=[(e.name, ", ".join(e.stale)) for e in exps if e.stale],
        metric_blocks=metric_blocks, metric_rows=sum(len(b["rows"]) + 1 for b in metric_blocks),
        charts=charts, image_blocks=image_blocks, runs_table={"header": ["stage", *head], "rows": runs_rows})
