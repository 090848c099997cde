"""Self-contained HTML pages for people: tables, embedded images and matplotlib charts.

Everything a page shows is inside the one file (images as base64 ``data:`` URIs, CSS inline, no
script), so it opens from disk, from an MLflow artifact or an e-mail attachment alike. Used by
the report stage (``diffmodels.reporting.report``) and ``python -m stages.compare`` (``diffmodels.reporting.compare``).
"""

from __future__ import annotations

import base64
import html
import io
import math
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402  (no pyplot: no global figure state)
from PIL import Image  # noqa: E402

IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
               ".svg": "image/svg+xml", ".webp": "image/webp"}
# One colour per experiment / series, the same in charts and in the tables' legend chips.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")

CSS = """
:root { --fg: #1a202c; --muted: #64748b; --line: #e2e8f0; --accent: #2563eb; --best: #dcfce7; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       margin: 0; background: #f8fafc; }
header { background: #0f172a; color: #f8fafc; padding: 18px 32px; }
header h1 { margin: 0 0 4px; font-size: 22px; }
header .sub { color: #cbd5e1; font-size: 13px; }
header a { color: #93c5fd; }
nav { position: sticky; top: 0; z-index: 2; background: #fff; border-bottom: 1px solid var(--line);
      padding: 8px 32px; font-size: 13px; }
nav a { margin-right: 14px; color: var(--accent); text-decoration: none; }
main { padding: 8px 32px 48px; max-width: 1600px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 14px 20px;
          margin: 18px 0; }
h2 { margin: 4px 0 10px; font-size: 19px; }
h3 { margin: 16px 0 6px; font-size: 15px; }
.muted { color: var(--muted); }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px; min-width: 150px; background: #fff; }
.card .v { font-size: 22px; font-weight: 600; }
.card .k { color: var(--muted); font-size: 12px; }
table { border-collapse: collapse; margin: 6px 0 12px; font-size: 13px; }
th, td { border: 1px solid var(--line); padding: 3px 8px; text-align: right; vertical-align: top; }
th { background: #f1f5f9; font-weight: 600; }
td.l, th.l { text-align: left; }
td.text { text-align: left; max-width: 60em; white-space: pre-wrap; }
td.best { background: var(--best); font-weight: 600; }
.kv { columns: 3 22em; column-gap: 24px; }
.kv table, .kv > div { width: 100%; break-inside: avoid; }
figure { display: inline-block; margin: 6px 14px 10px 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid var(--line); background: #fff; }
figcaption { font-size: 12px; color: var(--muted); }
img.pixel { image-rendering: pixelated; }
.grid { display: grid; gap: 10px; align-items: start; }
.grid .cell { text-align: center; font-size: 12px; }
.grid .cell img { max-width: 100%; }
.chip { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 5px; }
.note { border-left: 4px solid #f59e0b; background: #fffbeb; padding: 8px 12px; margin: 8px 0; }
.badge { display: inline-block; font-size: 11px; padding: 1px 7px; border-radius: 9px; background: #e2e8f0;
         margin-left: 6px; vertical-align: middle; }
pre { background: #f1f5f9; padding: 10px; overflow-x: auto; font-size: 12px; }
details > summary { cursor: pointer; color: var(--accent); margin: 6px 0; }
"""


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: object) -> str:
    """A number as a person reads it: ints with separators, floats to 4 significant digits."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10000 else str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value == 0 or 1e-5 <= abs(value) < 1e5:
            return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.1f}"
        return f"{value:.3e}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(fmt(v) for v in value) + "]"
    return str(value)


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def img(data: bytes, alt: str, mime: str = "image/png", css: str = "", width: int | None = None) -> str:
    style = f' style="width:{width}px"' if width else ""
    klass = f' class="{css}"' if css else ""
    return f'<img src="{data_uri(data, mime)}" alt="{esc(alt)}"{klass}{style}>'


def upscaled(data: bytes, mime: str, min_width: int = 240) -> int | None:
    """A display width for tiny images (toy runs, 16 px previews): an integer multiple >= min_width."""
    if mime not in ("image/png", "image/jpeg", "image/gif", "image/webp"):
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:
            w = im.size[0]
    except OSError:  # not decodable here: the browser shows it as it is
        return None
    return w * math.ceil(min_width / w) if 0 < w < min_width else None


def scaled_img(data: bytes, alt: str, mime: str = "image/png", min_width: int = 240) -> str:
    width = upscaled(data, mime, min_width)
    return img(data, alt, mime, "pixel" if width else "", width)


def figure(data: bytes, caption: str, mime: str = "image/png", min_width: int = 240) -> str:
    """An image with its caption; tiny images are scaled up, pixelated."""
    return f"<figure>{scaled_img(data, caption, mime, min_width)}<figcaption>{esc(caption)}</figcaption></figure>"


def table(header: Sequence[str], rows: Iterable[Sequence[object]], left_cols: int = 1,
          best: Iterable[tuple[int, int]] = ()) -> str:
    """An HTML table; cells already containing markup are passed as :class:`Raw`."""
    best = set(best)
    out = ["<table><tr>" + "".join(f'<th class="l">{cell(h)}</th>' if i < left_cols else f"<th>{cell(h)}</th>"
                                   for i, h in enumerate(header)) + "</tr>"]
    for r, row in enumerate(rows):
        tds = []
        for c, value in enumerate(row):
            classes = []
            if c < left_cols:
                classes.append("l")
            elif isinstance(value, str) and not isinstance(value, Raw) and len(value) > 24:
                classes.append("text")
            if (r, c) in best:
                classes.append("best")
            attr = f' class="{" ".join(classes)}"' if classes else ""
            tds.append(f"<td{attr}>{cell(value)}</td>")
        out.append("<tr>" + "".join(tds) + "</tr>")
    return "\n".join(out) + "</table>"


class Raw(str):
    """Markup that :func:`table` inserts as is."""


def cell(value: object) -> str:
    if isinstance(value, Raw):
        return str(value)
    if value is None:
        return '<span class="muted">-</span>'
    return esc(fmt(value))


def chip(color: str) -> str:
    return f'<span class="chip" style="background:{color}"></span>'


def page(title: str, subtitle: str, body: str, nav: Sequence[tuple[str, str]] = ()) -> str:
    links = "".join(f'<a href="#{esc(anchor)}">{esc(label)}</a>' for anchor, label in nav)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
            f"<header><h1>{esc(title)}</h1><div class=\"sub\">{subtitle}</div></header>"
            + (f"<nav>{links}</nav>" if links else "")
            + f"<main>{body}</main></body></html>\n")


# ------------------------------------------------------------------------------------------------
# Charts
# ------------------------------------------------------------------------------------------------

@dataclass
class Series:
    label: str
    x: Sequence[float]
    y: Sequence[float]
    color: str | None = None


def ema(values: Sequence[float], span: int) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard-style smoothing of noisy losses)."""
    alpha, avg, weight, out = 2.0 / (span + 1), 0.0, 0.0, []
    for v in values:
        avg = (1 - alpha) * avg + alpha * v
        weight = (1 - alpha) * weight + alpha
        out.append(avg / weight)
    return out


def line_chart(series: Sequence[Series], title: str, xlabel: str, ylabel: str, *, smooth: bool | None = None,
               logy: bool | None = None, size: tuple[float, float] = (6.4, 3.6)) -> bytes:
    """A PNG line chart. Long noisy series (> 60 points) are drawn faint with an EMA line on top;
    the y axis is logarithmic when positive data spans more than 20x (training losses)."""
    fig = Figure(figsize=size, dpi=100)  # 640 px: two charts side by side on a laptop screen
    ax = fig.add_subplot()
    values = [v for s in series for v in s.y if math.isfinite(v)]
    for i, s in enumerate(series):
        color = s.color or PALETTE[i % len(PALETTE)]
        long = len(s.y) > 60 if smooth is None else smooth
        if long:
            ax.plot(s.x, s.y, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(s.x, ema(s.y, max(5, len(s.y) // 40)), color=color, linewidth=1.8, label=s.label)
        else:
            ax.plot(s.x, s.y, color=color, linewidth=1.8, marker="o" if len(s.y) <= 40 else None, markersize=3,
                    label=s.label)
    if logy is None:
        logy = bool(values) and min(values) > 0 and max(values) / min(values) > 20
    if logy:
        ax.set_yscale("log")
    ax.set_title(textwrap.fill(title, 70), fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if len(series) > 1 or any(s.label for s in series):
        ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return _png(fig)


def bar_chart(labels: Sequence[str], values: Sequence[float], title: str, xlabel: str,
              colors: Sequence[str] | None = None) -> bytes:
    """Horizontal bars, one per label (e.g. FID per sampler / method)."""
    fig = Figure(figsize=(6.4, 0.45 * len(labels) + 1.0), dpi=110)
    ax = fig.add_subplot()
    ax.barh(range(len(labels)), values, color=colors or PALETTE[0])
    ax.set_yticks(range(len(labels)), labels, fontsize=9)
    ax.invert_yaxis()
    for i, v in enumerate(values):
        ax.text(v, i, f" {fmt(float(v))}", va="center", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.margins(x=0.15)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
