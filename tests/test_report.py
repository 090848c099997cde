"""Report stage, experiment comparison and offline dvc plots, on hand-built reports and a private
MLflow store (the real pipeline runs them in test_pipeline.py)."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import yaml
from PIL import Image

from diffmodels.core.errors import DiffmodelsError
from diffmodels.reporting import compare, report
from tests import browser
from tests.conftest import ROOT, params_with

PIPELINE = """
stages:
  train_vae:
    cmd: x
    outs: [reports/train_vae/val.tsv]
    metrics: [{reports/train_vae/metrics.json: {cache: false}}]
    plots:
      - reports/train_vae/loss.tsv: {x: step, y: loss, title: VAE loss}
      - reports/train_vae/reconstructions.png
  sample:
    cmd: x
    metrics: [{reports/sample/metrics.json: {cache: false}}]
    plots: [reports/sample/figures]
  eval_leakage:
    cmd: x
    outs: [reports/eval_leakage/decoder_leakage.tsv]
    metrics: [{reports/eval_leakage/metrics.json: {cache: false}}]
  report:
    cmd: x
    outs: [reports/index.html]
plots:
  - decoder_leakage:
      x: distance_px
      y: {reports/eval_leakage/decoder_leakage.tsv: [aligned, offset]}
      title: Decoder leakage
  - vae_val:
      x: step
      y: {reports/train_vae/val.tsv: val_psnr}
"""


def png(color: int, size=(24, 16)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0]), color, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
    return path


def fake_reports(root: Path, scale: float, color: int) -> dict[str, dict]:
    """One experiment's reports: metrics, loss / val / leakage tables and images (colour-coded)."""
    metrics = {
        "reports/train_vae/metrics.json": {"val_psnr": round(20 + scale, 4), "val_ssim": 0.8, "steps": 40,
                                           "seconds_this_run": 3.5 * scale},
        "reports/sample/metrics.json": {"fid_ddpm": 100.0 / scale, "fid_ddim": 120.0 / scale, "kid_ddpm": 0.1,
                                        "kid_ddim": 0.12, "fid_extractor": "inception-v3 test"},
        "reports/eval_leakage/metrics.json": {"leakage": {"aligned": {"leak_mean": 0.01 * scale, "leak_radius_px": 3},
                                                          "offset": {"leak_mean": 0.02 * scale, "leak_radius_px": 5}}},
    }
    for rel, data in metrics.items():
        write(root / rel, json.dumps(data))
    write(root / "reports/train_vae/loss.tsv",
          "step\tloss\tlr\n" + "".join(f"{s}\t{1.0 / (s * scale)}\t0.001\n" for s in range(1, 101)))
    write(root / "reports/train_vae/val.tsv", f"step\tval_psnr\tval_ssim\n20\t{18 + scale}\t0.7\n40\t{20 + scale}\t0.8\n")
    write(root / "reports/eval_leakage/decoder_leakage.tsv",
          "distance_px\taligned\toffset\n" + "".join(f"{d}\t{0.1 * scale / (d + 1)}\t{0.2 / (d + 1)}\n" for d in range(8))
          + "8\t\t0.01\n")
    write(root / "reports/train_vae/reconstructions.png", png(color))
    write(root / "reports/sample/figures/ddim_samples.png", png(color + 1))
    write(root / "reports/sample/figures/anagram.png", png(7))  # the same in every experiment
    return metrics


def log_runs(root: Path, metrics: dict[str, dict], exp_name: str | None) -> None:
    """Stage runs as the stages log them: flattened metrics, metrics.json and plot files as artifacts."""
    experiment = mlflow.get_experiment_by_name("diffmodels")
    # an explicit artifact location, as tracking.stage_run gives it: else artifacts land in ./mlruns
    eid = experiment.experiment_id if experiment else mlflow.create_experiment(
        "diffmodels", artifact_location=(root.parent / "mlartifacts").as_uri())
    for stage in ("train_vae", "sample", "eval_leakage"):
        tags = {"stage": stage, "pipeline_id": "p", **({"dvc_exp_name": exp_name} if exp_name else {})}
        with mlflow.start_run(experiment_id=eid, run_name=stage, tags=tags):
            data = metrics[f"reports/{stage}/metrics.json"]
            flat = report.flatten_metrics(data)
            mlflow.log_metrics({k.replace("/", "."): float(v) for k, v in flat.items() if report.is_number(v)})
            folder = root / "reports" / stage
            for f in folder.iterdir():
                if f.is_file() and f.suffix != ".png":
                    mlflow.log_artifact(str(f))
            if stage == "train_vae":
                mlflow.log_artifact(str(folder / "reconstructions.png"))
            if stage == "sample":
                for f in (folder / "figures").iterdir():
                    mlflow.log_artifact(str(f), artifact_path="figures")


def exp_show_rows(workspace: dict, baseline: dict, experiments: dict[str, dict], queued: str = "q1"):
    """``dvc.api.exp_show()`` rows as DVC 3 returns them (workspace, HEAD, its experiments, an older
    commit) and the matching ``read(rev)`` of params and metrics files (see compare.parse_exp_show)."""
    def row(rev, typ, name=None, state=None):
        return {"Experiment": name, "rev": rev, "typ": typ, "Created": None, "parent": None, "State": state,
                "Executor": None}

    def params(x):
        return {"vae.decoder_kernel": x, "vae.se": True, "seed": 0}

    data = {None: (params(3), workspace), "main": (params(3), baseline), "bbbbbbb": (params(3), baseline),
            "fffffff": (params(5), {})}
    rows = [row("workspace", "baseline"), row("main", "baseline")]
    for i, (name, metrics) in enumerate(experiments.items()):
        rev = f"{i + 1:07x}"
        rows.append(row(rev, "branch_commit", name))
        data[rev] = (params(7), metrics)
    rows += [row("fffffff", "branch_base", queued, "Queued"), row("bbbbbbb", "baseline")]
    return rows, lambda rev: (*data[rev], ())


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Workspace = baseline; experiment 'k7' exists only in MLflow (its files logged from elsewhere).
    Then the report stage and the comparison, once for the module's tests."""
    tmp_path = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        for var in ("DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_STAGE", "DIFFMODELS_PIPELINE_ID"):
            mp.delenv(var, raising=False)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)  # an earlier test's stage may have pointed mlflow elsewhere
        root = tmp_path / "project"
        write(root / "dvc.yaml", PIPELINE)
        write(root / "params.yaml", yaml.safe_dump(params_with()))
        elsewhere = tmp_path / "k7"
        k7 = fake_reports(elsewhere, 2.0, 200)
        log_runs(elsewhere, k7, "k7")
        base = fake_reports(root, 1.0, 60)
        log_runs(root, base, None)

        from stages import report as report_stage

        mp.chdir(root)
        out = io.StringIO()
        with __import__("contextlib").redirect_stdout(out):
            report_stage.main(["--html", "reports/index.html", "--metrics", "reports/metrics.json", "--fid", "reports/fid.tsv",
                              "--dvc-yaml", "dvc.yaml"])
        workspace, exps, skipped = compare.parse_exp_show(*exp_show_rows(base, base, {"k7": k7}))
        stages = report.read_pipeline(root / "dvc.yaml")
        files = compare.Files(root, stages, workspace, uri, report.stage_runs("diffmodels", uri))
        (root / "reports/compare.html").write_text(compare.render_compare(exps, stages, files, skipped, uri))
        yield SimpleNamespace(root=root, base=base, k7=k7, uri=uri, report_out=out.getvalue(), exps=exps)
        while mlflow.active_run() is not None:
            mlflow.end_run()


def b64_of(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ------------------------------------------------------------------------------------------------

def test_read_pipeline_attaches_top_level_plots_to_their_stage(tmp_path):
    stages = {s.name: s for s in report.read_pipeline(write(tmp_path / "dvc.yaml", PIPELINE))}
    leak = [p for p in stages["eval_leakage"].plots if p.name == "decoder_leakage"]
    assert len(leak) == 1 and leak[0].y == {"reports/eval_leakage/decoder_leakage.tsv": ["aligned", "offset"]}
    names = ["reports/train_vae/loss.tsv", "reports/train_vae/reconstructions.png", "vae_val"]
    assert [p.name for p in stages["train_vae"].plots] == names
    assert [p.is_image for p in stages["train_vae"].plots] == [False, True, False]
    assert stages["sample"].plots[0].is_image and stages["sample"].report_dir == "reports/sample"


def test_report_stage_depends_on_every_metrics_and_plots_path():
    """dvc.yaml's report stage must list each stage's metrics and plot files, or it would not rerun."""
    stages = report.read_pipeline(ROOT / "dvc.yaml")
    deps = set(next(s for s in stages if s.name == "report").deps)
    needed = {f for s in stages if s.name != "report" for f in [*s.metrics, *(f for p in s.plots for f in p.files)]}
    assert needed - deps == set(), f"add to the report stage's deps in dvc.yaml: {sorted(needed - deps)}"


def test_metric_tables_pivot_by_key_depth():
    page = report.metric_tables({"seconds": 3.0, "fid": {"clamp": 10.0, "repaint": 12.0}, "kid": {"clamp": 0.1, "repaint": 0.2},
                                 "clamp": {"centre": {"psnr": 30.0, "ssim": 0.9}, "half": {"psnr": 20.0, "ssim": 0.7}}})
    tables = re.findall(r"<table>.*?</table>", page, re.S)
    assert len(tables) == 3  # scalars; fid + kid share one (same columns); clamp: mask set x metric
    assert tables[1].count("<tr>") == 3 and ">repaint<" in tables[1]
    assert "<h3>clamp</h3>" in page and ">centre<" in tables[2] and ">ssim<" in tables[2]


def test_read_table_and_plot_series_drop_blank_cells():
    plot = report.Plot("d", ["f.tsv"], x="distance_px", y={"f.tsv": ["aligned", "offset"]})
    series = report.plot_series(plot, {"f.tsv": report.read_table("distance_px\taligned\toffset\n0\t0.5\t0.6\n1\t\t0.3\n")})
    assert series == {"aligned": ("distance_px", [0.0], [0.5]), "offset": ("distance_px", [0.0, 1.0], [0.6, 0.3])}
    default = report.Plot("l", ["l.tsv"], y={"l.tsv": []})  # no y: DVC's default, the last column
    assert list(report.plot_series(default, {"l.tsv": report.read_table("step\tloss\tlr\n1\t2\t3\n")})) == ["lr"]


def run_stub(metrics: dict, start: int, exp: str | None = None):
    return SimpleNamespace(data=SimpleNamespace(metrics=metrics, tags={"dvc_exp_name": exp} if exp else {}),
                           info=SimpleNamespace(run_id=f"r{start}", experiment_id="1", artifact_uri="file:///a",
                                                start_time=start))


def test_pick_run_prefers_the_run_that_produced_the_metrics():
    metrics = {"val_psnr": 25.2808, "nested": {"a": 1}, "precision": "float32"}
    old = run_stub({"val_psnr": 25.280780792, "nested.a": 1.0}, 1)  # logged unrounded, nested with '.'
    newer = run_stub({"val_psnr": 24.1, "nested.a": 1.0}, 2)
    assert report.pick_run([old, newer], metrics).run_id == "r1"
    assert report.pick_run([old, newer], metrics).matched
    fallback = report.pick_run([newer], metrics)
    assert fallback.run_id == "r2" and not fallback.matched
    twin = run_stub({"val_psnr": 25.2808}, 0, exp="k7")  # same numbers: the experiment's own run wins
    assert report.pick_run([old, twin], metrics, exp_name="k7").run_id == "r0"
    assert report.pick_run([], metrics) is None


def test_direction_and_best():
    assert [compare.direction(k) for k in ("fid_ddim", "fid/repaint", "kid_std_ddpm", "val_psnr", "clamp/centre/ssim_image",
                                           "leakage/aligned/leak_radius_px", "latents_per_second", "seconds_per_image_ddim",
                                           "clamp/centre/seam", "num_parameters", "loss_last100")] == \
        ["min", "min", None, "max", "max", "min", "max", "min", "one", None, "min"]
    assert compare.best_index([3.0, 1.0, 2.0], "min") == {1}
    assert compare.best_index([0.7, 1.2, 1.05], "one") == {2}
    assert compare.best_index([1.0, 1.0], "max") == set()  # a tie everywhere marks nothing
    assert compare.best_index([1.0, None, "x"], "max") == set()


def test_parse_exp_show_keeps_the_baseline_and_finished_experiments():
    m = {"reports/sample/metrics.json": {"fid_ddim": 1.0}}
    workspace, exps, skipped = compare.parse_exp_show(*exp_show_rows(m, m, {"k7": m, "empty": {}}))
    assert workspace.kind == "workspace" and workspace.params["vae.decoder_kernel"] == 3
    assert [(e.name, e.kind) for e in exps] == [("main", "baseline"), ("k7", "experiment")]
    assert exps[1].params["vae.decoder_kernel"] == 7 and exps[1].metrics == m
    assert skipped == [("empty", "no metrics"), ("q1", "queued")]
    assert [e.name for e in compare.select(exps, ["k7"])] == ["k7"]
    assert compare.select(exps, ["0000001"])[0].name == "k7"
    with pytest.raises(DiffmodelsError, match="no finished experiment named 'nope'.*main, k7"):
        compare.select(exps, ["nope"])


def test_report_page_and_metrics(project):
    assert "3 stages, 3 linked to their MLflow runs" in project.report_out
    page = (project.root / "reports/index.html").read_text()
    for data in (png(60), png(61), png(7)):  # every image, embedded
        assert b64_of(data) in page
    # 3 images + charts: FID bars, VAE loss, VAE val PSNR, leakage (aligned and offset in one)
    assert page.count("<img") == 3 + 4
    assert "http" not in re.sub(r'href="http[^"]*"', "", page).replace("http://127.0.0.1:5000", "")  # nothing remote
    assert "VAE loss" in page and "Decoder leakage" in page and ">leak_radius_px<" in page
    assert "Skipped" not in page and "decoder leak radius (px) (aligned)" in page
    everything = json.loads((project.root / "reports/metrics.json").read_text())
    assert everything["stages"]["sample"]["fid_ddim"] == 120.0
    assert everything["fid"] == {"sample: ddim": {"fid": 120.0, "kid": 0.12}, "sample: ddpm": {"fid": 100.0, "kid": 0.1}}
    assert all(r["matched_metrics"] for r in everything["mlflow_runs"].values())
    assert everything["params"]["vae"]["decoder_kernel"] == 3
    expected = ("sampler\tfid\tkid\tfid_low\tfid_high\tfid_floor\nsample: ddpm\t100\t0.1\t\t\t\n"
                "sample: ddim\t120\t0.12\t\t\t\n")
    assert (project.root / "reports/fid.tsv").read_text() == expected
    mlflow.set_tracking_uri(project.uri)
    runs = mlflow.search_runs(experiment_names=["diffmodels"], filter_string="tags.stage = 'report'", output_format="list")
    assert len(runs) == 1 and runs[0].data.metrics["fid.sample.ddim"] == 120.0


def test_compare_page_takes_files_from_workspace_and_mlflow(project):
    page = (project.root / "reports/compare.html").read_text()
    exps = project.exps
    main, k7 = exps
    assert main.local == {"train_vae", "sample", "eval_leakage"} and k7.local == set()
    assert all(ref.matched for ref in k7.runs.values()) and k7.runs["sample"].tags["dvc_exp_name"] == "k7"
    for data in (png(60), png(61), png(200), png(201)):  # both experiments' images, k7's from MLflow artifacts
        assert b64_of(data) in page
    assert page.count(b64_of(png(7))) == 1 and "the same in all" in page
    # params that differ: only vae.decoder_kernel; best FID marked in k7's row
    summary = re.search(r'id="summary".*?</section>', page, re.S).group(0)
    assert ">vae.decoder_kernel<" in summary and ">vae.se<" not in summary
    best = re.findall(r'<td class="best">([^<]*)</td>', summary)
    assert "50" in best and "22" in best  # fid_ddpm of k7 (100 / 2), val_psnr of k7 (20 + 2)
    assert "q1 (queued)" in page
    curves = re.search(r'id="curves".*?</section>', page, re.S).group(0)
    assert curves.count("<img") == 4  # loss, val psnr, leakage aligned, leakage offset; two lines each


@pytest.mark.skipif(browser.unavailable() is not None, reason=f"browser check: {browser.unavailable()}")
def test_pages_render_in_chromium(project, tmp_path):
    for name in ("index", "compare"):
        check = browser.check_page(project.root / f"reports/{name}.html", tmp_path / f"{name}.png")
        assert check.images and not check.broken_images, check.broken_images
        assert not check.errors, check.errors
        assert Image.open(tmp_path / f"{name}.png").size[0] == 1400


@pytest.fixture(scope="module")
def offline_template(tmp_path_factory):
    pytest.importorskip("vl_convert")
    from diffmodels.reporting import vega_offline

    return vega_offline.build_template(tmp_path_factory.mktemp("vega") / "t.html")


def test_offline_plots_template(offline_template):
    from diffmodels.reporting import vega_offline

    page = vega_offline.render_template("var x = '</script>';", {"vega": "6", "vega_lite": "5.21", "vega_embed": "7",
                                                                 "vl_convert": "1"})
    assert "{plot_divs}" in page and "{refresh_tag}" in page and "{scripts}" not in page  # no CDN tags from DVC
    assert "<\\/script>" in page and "cdn" not in page
    with pytest.raises(DiffmodelsError, match="placeholder"):
        vega_offline.render_template("'{plot_divs}'", {})
    text = offline_template.read_text()
    assert len(text) > 300_000 and "window.vegaEmbed" in text and "{plot_divs}" in text
    stamp = offline_template.stat().st_mtime_ns
    assert vega_offline.build_template(offline_template).stat().st_mtime_ns == stamp  # cached while the version holds


@pytest.mark.skipif(browser.unavailable() is not None, reason=f"browser check: {browser.unavailable()}")
def test_dvc_plots_render_offline(offline_template, tmp_path):
    """`python3 -m stages.plots show` in a tiny DVC repo: the vega chart draws with no network."""
    import os
    import subprocess
    import sys

    from diffmodels.reporting import vega_offline

    repo = tmp_path / "repo"
    write(repo / "dvc.yaml", "plots:\n  - loss.tsv:\n      x: step\n      y: loss\n")
    write(repo / "loss.tsv", "step\tloss\n1\t1.0\n2\t0.5\n3\t0.25\n")
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=repo, check=True, capture_output=True)
    write(repo / vega_offline.DEFAULT_PATH, offline_template.read_bytes())  # built once per module
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "stages.plots", "show", "-o", "plots"], cwd=repo, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    page = repo / "plots/index.html"
    assert "cdn.jsdelivr" not in page.read_text()
    check = browser.check_page(page, tmp_path / "plots.png")
    assert not check.errors, check.errors
    assert check.graphics >= 1  # vega-embed drew its chart
    drawn = np.asarray(Image.open(tmp_path / "plots.png").convert("L"))
    assert drawn.min() < 100  # dark pixels: axes and a line were drawn, not a blank page


def test_compare_falls_back_to_mlflow_when_workspace_files_are_gone(project, tmp_path):
    """A fresh clone has the metrics (git) but not the figures (DVC cache): MLflow has them."""
    workspace, exps, _ = compare.parse_exp_show(*exp_show_rows(project.base, project.base, {"k7": project.k7}))
    stages = {s.name: s for s in report.read_pipeline(project.root / "dvc.yaml")}
    files = compare.Files(tmp_path, list(stages.values()), workspace, project.uri, report.stage_runs("diffmodels", project.uri))
    main = exps[0]
    files.attach(main)
    assert "train_vae" in main.local  # its metrics equal the workspace's ...
    recon = next(p for p in stages["train_vae"].plots if p.is_image)
    assert files.listing(main, stages["train_vae"], recon) == {"reconstructions.png": png(60)}  # ... files from MLflow


def test_pages_escape_what_they_show_and_ship_their_templates():
    """Names and values reach the page as text, never as markup; the templates are package data."""
    from importlib import resources

    from diffmodels.reporting import htmlpage as hp

    names = {p.name for p in resources.files("diffmodels.reporting").joinpath("templates").iterdir()}
    assert {"page.html.j2", "components.html.j2", "report.html.j2", "compare.html.j2", "page.css"} <= names
    page = report.metric_tables({"<b>x": 1.5, "g": {"a&b": "<i>", "c": None}})  # '/' would nest the key
    assert "&lt;b&gt;x" in page and "<b>" not in page and "a&amp;b" in page and "&lt;i&gt;" in page
    assert '<span class="muted">-</span>' in page  # None
    cell = hp.table(["h"], [[hp.Markup("<em>kept</em>")], ["<em>escaped</em>"]])
    assert "<em>kept</em>" in cell and "&lt;em&gt;escaped&lt;/em&gt;" in cell


def test_markdown_tables_in_benchmark_text():
    text = "speed\n\n| method | s/img |\n|---|--:|\n| a \\| b | 0.5 |\n| <c> | 1 |\n\ndone\n"
    assert report.markdown_tables(text) == [("pre", "speed"), ("table", ["method", "s/img"], [["a | b", "0.5"],
                                                                                              ["<c>", "1"]]),
                                            ("pre", "done")]
    page = report.text_with_tables(text)
    assert "<pre>speed</pre>" in page and "<td class=\"l\">a | b</td>" in page and "&lt;c&gt;" in page


def test_dvc_experiments_through_dvc_api(tmp_path):
    """A real DVC project: the baseline and a finished experiment with their params and metrics
    files as written; a queued one is left out; a stage the experiment did not rerun for its new
    params (``leak``: ``dvc exp run sample``) is stale, its older metrics left out."""
    import subprocess
    import sys

    repo = tmp_path / "repo"
    write(repo / "make.py", "import json, yaml\np = yaml.safe_load(open('params.yaml'))\n"
          "json.dump({'fid_ddim': p['vae']['decoder_kernel'] * 1.123456789, 'fid_extractor': 'x', 'n': {'b': 2}},"
          " open('reports/sample/metrics.json', 'w'))\n")
    write(repo / "leak.py", "import json, yaml\np = yaml.safe_load(open('params.yaml'))\n"
          "json.dump({'leak_mean': p['vae']['decoder_kernel'] / 100}, open('reports/leak/metrics.json', 'w'))\n")
    write(repo / "dvc.yaml", "stages:\n  sample:\n    cmd: python make.py\n    deps: [make.py]\n"
          "    params: [vae.decoder_kernel]\n    metrics: [{reports/sample/metrics.json: {cache: false}}]\n"
          "  leak:\n    cmd: python leak.py\n    deps: [leak.py]\n"
          "    params: [vae]\n    metrics: [{reports/leak/metrics.json: {cache: false}}]\n")
    write(repo / "params.yaml", "vae:\n  decoder_kernel: 3\nseed: 0\n")
    (repo / "reports/sample").mkdir(parents=True)
    (repo / "reports/leak").mkdir(parents=True)
    dvc = [sys.executable, "-m", "dvc"]
    for cmd in (["git", "init", "-q", "-b", "main"], [*dvc, "init", "-q"], [*dvc, "repro", "-q"],
                ["git", "add", "-A"], ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "base"],
                [*dvc, "exp", "run", "-q", "-S", "vae.decoder_kernel=7", "-n", "k7", "sample"],
                [*dvc, "exp", "run", "-q", "--queue", "-S", "vae.decoder_kernel=5", "-n", "q5"]):
        subprocess.run(cmd, cwd=repo, check=True, capture_output=True)
    stages = report.read_pipeline(repo / "dvc.yaml")
    workspace, exps, skipped = compare.dvc_experiments(repo, stages)
    assert [(e.name, e.kind) for e in exps] == [("main", "baseline"), ("k7", "experiment")]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert exps[0].rev == head and len(exps[1].rev) == 40
    assert exps[0].params == {"vae.decoder_kernel": 3, "seed": 0} and exps[1].params["vae.decoder_kernel"] == 7
    assert exps[0].stale == () and exps[0].metrics["reports/leak/metrics.json"] == {"leak_mean": 0.03}
    assert exps[1].stale == ("leak",)
    assert exps[1].metrics == {"reports/sample/metrics.json": {"fid_ddim": 7 * 1.123456789, "fid_extractor": "x",
                                                               "n": {"b": 2}}}
    assert workspace.metrics == exps[1].metrics  # dvc exp run leaves the experiment in the workspace
    assert skipped == [("q5", "queued")]
    assert [e.name for e in compare.select(exps, [exps[1].rev[:8]])] == ["k7"]


def test_stale_stages_from_params_and_dependency_hashes():
    """A stage is stale when a param it ran with changed, when an input's hash is not the one its
    producer last wrote, or when its producer is stale; fresh stages and unlocked ones are not."""
    lock = {"schema": "2.0", "stages": {
        "train": {"params": {"params.yaml": {"vae": {"steps": 800}, "seed": 0}},
                  "outs": [{"path": "data/vae.st", "md5": "new"}]},
        "cache": {"deps": [{"path": "data/vae.st", "md5": "new"}], "outs": [{"path": "data/lat", "md5": "l1.dir"}]},
        "leak": {"deps": [{"path": "data/vae.st", "md5": "old"}]},  # ran on an earlier VAE
        "ddpm": {"deps": [{"path": "data/lat", "md5": "l1.dir"}], "params": {"params.yaml": {"ddpm.steps": 10}}},
    }}
    params = {"vae": {"steps": 800}, "seed": 0, "ddpm": {"steps": 10}}
    assert compare.stale_stages(lock, params) == ("leak",)
    assert compare.stale_stages(lock, {**params, "ddpm": {"steps": 20}}) == ("leak", "ddpm")
    # the VAE's params changed: it and everything downstream of it are stale, in pipeline order
    assert compare.stale_stages(lock, {**params, "vae": {"steps": 4000}}) == ("train", "cache", "leak", "ddpm")
    assert compare.stale_stages(lock, {**params, "seed": 1}) == ("train", "cache", "leak", "ddpm")
    assert compare.stale_stages({}, params) == ()


# ------------------------------------------------------------------------------------------------
# Seed studies: groups of experiments that differ only in seed
# ------------------------------------------------------------------------------------------------

class StubFiles:
    """compare.Files for synthetic experiments: each one's loss table, nothing from MLflow."""

    def __init__(self, losses: dict[str, str]):
        self.losses = losses

    def attach(self, exp) -> None:
        exp.runs = {}

    def listing(self, exp, stage, plot):
        if plot.files == ["reports/train_vae/loss.tsv"] and exp.name in self.losses:
            return {"loss.tsv": self.losses[exp.name].encode()}
        return {}


def seed_study():
    """Kernel 3 and kernel 7, seeds 0-2 each, plus the baseline (kernel 3, seed 0) and a lone kernel 5."""
    fids = {3: [100.0, 101.0, 102.0], 7: [50.0, 51.0, 52.0]}
    psnrs = {3: [20.0, 21.0, 22.0], 7: [20.5, 21.5, 19.5]}

    def exp(name, kernel, seed, fid, psnr, kind="experiment"):
        metrics = {"reports/sample/metrics.json": {"fid_ddpm": fid, "fid_extractor": "x"},
                   "reports/train_vae/metrics.json": {"val_psnr": psnr, "steps": 40}}
        return compare.Experiment(name, f"{abs(hash(name)):040x}"[:40], {"vae.decoder_kernel": kernel, "seed": seed},
                                  metrics, kind=kind)

    exps = [exp("main", 3, 0, fids[3][0], psnrs[3][0], kind="baseline")]
    for kernel in (3, 7):
        exps += [exp(f"k{kernel}-s{s}", kernel, s, fids[kernel][s], psnrs[kernel][s]) for s in range(3)]
    exps.append(exp("k5", 5, 0, 70.0, 21.0))
    # loss = (1 + seed) / step for every experiment: mean over seeds 0-2 is 2 / step, band 1 / step .. 3 / step
    losses = {e.name: "step\tloss\n" + "".join(f"{t}\t{(1 + e.params['seed']) / t}\n" for t in (1, 2, 4)) for e in exps}
    return exps, StubFiles(losses), fids, psnrs


def test_group_experiments_by_params_except_seed():
    exps, _, _, _ = seed_study()
    groups = compare.group_experiments(exps)
    assert [g.label for g in groups] == ["vae.decoder_kernel=3", "vae.decoder_kernel=7", "vae.decoder_kernel=5"]
    assert [[e.name for e in g.members] for g in groups] == [["main", "k3-s1", "k3-s2"], ["k7-s0", "k7-s1", "k7-s2"],
                                                             ["k5"]]
    assert groups[0].duplicates == [("k3-s0", 0)] and groups[0].seeds == [0, 1, 2]  # seed 0 counted once
    stage = report.Stage("sample", metrics=["reports/sample/metrics.json"])
    assert compare.group_values(groups[1], stage, "fid_ddpm") == [50.0, 51.0, 52.0]
    rows = compare.significance_rows(groups, stage, "fid_ddpm")
    # kernels 3 and 7 ran seeds 0-2 both: paired, and every seed's difference is exactly 50
    assert rows[0][:5] == ["sample: fid_ddpm", "vae.decoder_kernel=3", "vae.decoder_kernel=7", 50.0, "paired"]
    assert rows[0][7] == 0.0 and rows[0][8] == "significant"
    assert rows[1][8] == "n=1: no test" and rows[1][5] is None  # the lone kernel 5
    # seed 2 of kernel 7 missing: the seeds differ, so Welch's test on what there is
    groups[1].members.pop()
    ref = __import__("scipy").stats.ttest_ind([100, 101, 102], [50, 51], equal_var=False)
    welch_row = compare.significance_rows(groups, stage, "fid_ddpm")[0]
    assert welch_row[4] == "Welch" and welch_row[7] == pytest.approx(ref.pvalue)
    groups = compare.group_experiments(exps)
    assert compare.significance_rows(groups, stage, "fid_ddpm", only_significant=True) == rows[:1]
    assert compare.interval_text(None) == "-"
    assert compare.interval_text(__import__("diffmodels.metrics.seeds").metrics.seeds.summarize([4.0])) == "4 (n=1)"


def test_group_curve_is_the_mean_over_seeds_with_a_min_max_band():
    exps, _, _, _ = seed_study()
    group = compare.group_experiments(exps)[1]
    per_exp = {e.name: {"loss": ("step", [1.0, 2.0, 4.0], [(1 + e.params["seed"]) / t for t in (1, 2, 4)])}
               for e in group.members}
    per_exp["k7-s2"]["loss"] = ("step", [1.0, 2.0], [3.0, 1.5])  # shorter run: only the shared steps
    line = compare.group_curve(group, per_exp, "loss")
    assert list(line.x) == [1.0, 2.0] and line.label == "vae.decoder_kernel=7 (n=3)"
    assert line.y == pytest.approx([2.0, 1.0]) and line.low == pytest.approx([1.0, 0.5])
    assert line.high == pytest.approx([3.0, 1.5])
    assert compare.group_curve(group, per_exp, "missing") is None


def test_compare_page_of_a_seed_study(tmp_path):
    exps, files, fids, psnrs = seed_study()
    stages = report.read_pipeline(write(tmp_path / "dvc.yaml", PIPELINE))
    page = compare.render_compare(exps, stages, files)
    seeds_html = re.search(r'id="seeds".*?</section>', page, re.S).group(0)
    # 95% t interval of 3 seeds 1 apart: half-width t_{0.975,2} / sqrt(3) = 2.484
    assert "101 \u00b1 2.484 (n=3)" in seeds_html and "51 \u00b1 2.484 (n=3)" in seeds_html
    assert "70 (n=1)" in seeds_html and "paired over shared seeds, else Welch&#39;s" in seeds_html
    assert "little power" in seeds_html and "k3-s0 (seed 0, vae.decoder_kernel=3)" in seeds_html
    best = re.findall(r'<td class="best">([^<]*)</td>', seeds_html)
    assert "51 \u00b1 2.484 (n=3)" in best  # lowest mean FID
    tests = re.findall(r"<tr><td class=\"l\">(sample: fid_ddpm|train_vae: val_psnr)</td>(.*?)</tr>", seeds_html)
    verdicts = [re.findall(r"<td[^>]*>([^<]*)</td>", cells)[-1] for _, cells in tests]
    assert [t for t, _ in tests] == ["train_vae: val_psnr"] * 3 + ["sample: fid_ddpm"] * 3  # headline order
    assert verdicts == ["not significant", "n=1: no test", "n=1: no test", "significant", "n=1: no test",
                        "n=1: no test"]
    curves = re.search(r'id="curves".*?</section>', page, re.S).group(0)
    assert "mean over seeds, band min-max" in curves and curves.count("<img") == 1


def test_compare_names_an_unknown_experiment_in_one_line(tmp_path, monkeypatch, capsys):
    from stages import compare as compare_stage

    write(tmp_path / "dvc.yaml", PIPELINE)
    write(tmp_path / "params.yaml", yaml.safe_dump(params_with()))
    m = {"reports/sample/metrics.json": {"fid_ddim": 1.0}}
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(compare_stage.compare, "dvc_experiments",
                        lambda root, stages: compare.parse_exp_show(*exp_show_rows(m, m, {"k7": m})))
    with pytest.raises(SystemExit) as exit_info:
        compare_stage.main(["--out", "c.html", "--dvc-yaml", "dvc.yaml", "k7", "mixer-none"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert "'mixer-none'" in err and "main, k7" in err and not (tmp_path / "c.html").exists()


# ------------------------------------------------------------------------------------------------
# FID / KID results with intervals and floors (and older metrics files without them)
# ------------------------------------------------------------------------------------------------

def fid_result(fid, low, high, floor, n_fake, sets=True):
    out = {"fid": fid, "fid_low": low, "fid_high": high, "fid_floor": floor, "fid_floor_std": 0.3, "kid_mean": 0.02,
           "kid_std": 0.004, "kid_low": 0.015, "kid_high": 0.025, "num_real": 1000, "num_fake": n_fake,
           "extractor": "inception-v3 test"}
    return {**out, **({"precision": 0.7, "recall": 0.6, "density": 0.9, "coverage": 0.8} if sets else {})}


NEW_METRICS = {  # the stages' layout: result dicts under scores/<sampler or method>
    "sample": {"num_images": 500, "scores": {"ddpm": fid_result(40.0, 38.0, 42.5, 2.5, 500),
                                             "ddim": fid_result(45.0, 43.0, 47.0, 2.5, 500)},
               "seconds_per_image_ddim": 0.1},
    "eval_inpaint": {"scores": {"repaint": fid_result(12.0, 11.0, 13.5, 1.5, 64, sets=False)},
                     "clamp": {"centre": {"psnr": 30.0}}},
}
OLD_METRICS = {"sample": {"fid_ddpm": 100.0, "kid_ddpm": 0.1, "kid_std_ddpm": 0.01, "fid_extractor": "x"},
               "eval_inpaint": {"fid": {"repaint": 12.0}, "kid": {"repaint": 0.2}}}


def report_inputs(tmp_path, metrics):
    stages = [report.Stage("sample", metrics=["reports/sample/metrics.json"]),
              report.Stage("eval_inpaint", metrics=["reports/eval_inpaint/metrics.json"])]
    return report.ReportInputs(root=tmp_path, stages=stages, params={"seed": 0}, metrics=metrics,
                               runs={"sample": None, "eval_inpaint": None}, tracking_uri="sqlite:///x.db")


def test_fid_results_carry_interval_floor_and_sizes(tmp_path, monkeypatch):
    rows = report.fid_rows(NEW_METRICS)
    assert [r.name for r in rows] == ["sample: ddpm", "sample: ddim", "eval_inpaint: repaint"]
    assert (rows[0].fid, rows[0].kid, rows[0].interval("fid_low", "fid_high")) == (40.0, 0.02, (38.0, 42.5))
    assert rows[2].get("precision") is None and rows[2].get("num_fake") == 64
    table = report.fid_table(rows)
    assert table["header"] == ["result", "FID", "FID 95% interval", "FID floor (real vs real) \u00b1 std",
                               "KID \u00b1 std", "KID 95% interval", "n generated / real", "precision", "recall",
                               "density", "coverage", "extractor"]
    assert table["rows"][0] == ["sample: ddpm", 40.0, "[38, 42.5]", "2.5 \u00b1 0.3", "0.02 \u00b1 0.004",
                                "[0.015, 0.025]", "500 / 1000", 0.7, 0.6, 0.9, 0.8, "inception-v3 test"]
    assert table["rows"][2][7:11] == [None] * 4  # inpainting fills: no precision / recall
    assert report.fid_tsv(rows).splitlines()[1:] == ["sample: ddpm\t40\t0.02\t38\t42.5\t2.5",
                                                     "sample: ddim\t45\t0.02\t43\t47\t2.5",
                                                     "eval_inpaint: repaint\t12\t0.02\t11\t13.5\t1.5"]
    drawn = {}
    real_bars = report.hp.bar_chart

    def bars(labels, values, title, xlabel, colors=None, intervals=None):
        drawn.update(labels=labels, values=values, intervals=intervals, title=title)
        return real_bars(labels, values, title, xlabel, colors, intervals)

    monkeypatch.setattr(report.hp, "bar_chart", bars)
    inputs = report_inputs(tmp_path, NEW_METRICS)
    page = report.render_index(inputs)
    assert drawn["intervals"] == [(38.0, 42.5), (43.0, 47.0), (11.0, 13.5)] and "95% interval" in drawn["title"]
    summary = re.search(r'id="summary".*?</section>', page, re.S).group(0)
    assert "95% [38, 42.5], n=500, floor 2.5" in summary and "FID, eval_inpaint: repaint" in summary
    assert "fid_low" not in summary and ">[11, 13.5]<" in summary and ">500 / 1000<" in summary
    everything = report.report_metrics(inputs)["fid"]
    assert everything["sample: ddpm"] == {"fid": 40.0, "kid": 0.02, **{k: v for k, v in fid_result(
        40.0, 38.0, 42.5, 2.5, 500).items() if k not in ("fid", "kid_mean")}}


def test_bar_chart_error_bars_are_drawn():
    plain = report.hp.bar_chart(["a", "b"], [10.0, 20.0], "t", "FID")
    assert report.hp.bar_chart(["a", "b"], [10.0, 20.0], "t", "FID", intervals=[None, None]) == plain
    with_bars = report.hp.bar_chart(["a", "b"], [10.0, 20.0], "t", "FID", intervals=[(8.0, 12.0), None])
    a, b = (np.asarray(Image.open(io.BytesIO(x)).convert("L"), dtype=int) for x in (plain, with_bars))
    assert a.shape == b.shape and ((b < 60) & (a > 200)).sum() > 20  # dark error-bar pixels where there were none


def test_report_degrades_on_older_metrics_files(tmp_path):
    """FID and KID without interval, floor or sizes: their columns are left out, nothing breaks."""
    rows = report.fid_rows(OLD_METRICS)
    assert [(r.name, r.fid, r.kid) for r in rows] == [("sample: ddpm", 100.0, 0.1), ("eval_inpaint: repaint", 12.0, 0.2)]
    table = report.fid_table(rows)
    assert table == {"header": ["result", "FID", "KID \u00b1 std"],
                     "rows": [["sample: ddpm", 100.0, "0.1 \u00b1 0.01"], ["eval_inpaint: repaint", 12.0, "0.2"]]}
    half = {"sample": {"ddpm": {"fid": 30.0, "fid_low": 28.0, "num_real": 10}}}  # a partial result dict
    partial = report.fid_table(report.fid_rows(half))
    assert partial["header"] == ["result", "FID", "n generated / real"] and partial["rows"][0][2] == "? / 10"
    page = report.render_index(report_inputs(tmp_path, OLD_METRICS))
    summary = re.search(r'id="summary".*?</section>', page, re.S).group(0)
    assert "FID, DDPM sampler" in summary and "95% [" not in summary and "bars: 95% interval" not in page
    assert report.fid_table([]) is None
