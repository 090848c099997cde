"""Self-contained HTML pages for people: tables, embedded images and matplotlib charts.

Everything a page shows is inside the one file (images as base64 ``data:`` URIs, CSS inline, no
script), so it opens from disk, from an MLflow artifact or an e-mail attachment alike. Used by
the report stage (``diffmodels.reporting.report``) and ``python3 -m stages.compare``
(``diffmodels.reporting.compare``).

The markup lives in Jinja templates shipped with the package (``templates/*.html.j2``, the CSS
in ``templates/page.css``), rendered with autoescape on: every value is escaped unless it is
:class:`~markupsafe.Markup` (what the building blocks below return), so a metric name or a
path with ``<`` or ``&`` cannot break a page.
"""

from __future__ import annotations

import base64
import functools
import io
import math
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import jinja2
import matplotlib
from markupsafe import Markup

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402  (no pyplot: no global figure state)
from PIL import Image  # noqa: E402

IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
               ".svg": "image/svg+xml", ".webp": "image/webp"}
# One colour per experiment / series, the same in charts and in the tables' legend chips.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")


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


def _fmt_filter(value: object) -> object:
    return value if isinstance(value, Markup) else fmt(value)


@functools.cache
def environment() -> jinja2.Environment:
    """The templates of this package, autoescaped, undefined names an error."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("diffmodels.reporting", "templates"),
        autoescape=True, undefined=jinja2.StrictUndefined, extensions=["jinja2.ext.do"],
        trim_blocks=True, keep_trailing_newline=True,
    )
    env.filters["fmt"] = _fmt_filter
    env.tests["markup"] = lambda value: isinstance(value, Markup)
    return env


def render(template: str, **context: Any) -> str:
    """A whole page from ``templates/<template>``."""
    return environment().get_template(template).render(**context)


def component(name: str) -> Any:
    """A macro of ``templates/components.html.j2``, callable from Python; it returns Markup."""
    return getattr(environment().get_template("components.html.j2").module, name)


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def img(data: bytes, alt: str, mime: str = "image/png", css: str = "", width: int | None = None) -> Markup:
    return component("img")(data_uri(data, mime), alt, css, width)


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


def scaled_img(data: bytes, alt: str, mime: str = "image/png", min_width: int = 240) -> Markup:
    width = upscaled(data, mime, min_width)
    return img(data, alt, mime, "pixel" if width else "", width)


def figure(data: bytes, caption: str, mime: str = "image/png", min_width: int = 240) -> Markup:
    """An image with its caption; tiny images are scaled up, pixelated."""
    return component("figure")(scaled_img(data, caption, mime, min_width), caption)


def table(header: Sequence[object], rows: Iterable[Sequence[object]], left_cols: int = 1,
          best: Iterable[tuple[int, int]] = ()) -> Markup:
    """An HTML table of values (numbers formatted by :func:`fmt`, ``None`` as a muted dash);
    cells that are already markup (:class:`~markupsafe.Markup`) are inserted as they are, ``best``
    (row, column) cells are highlighted."""
    return component("table")(list(header), [list(r) for r in rows], left_cols, set(best))


def chip(color: str) -> Markup:
    return component("chip")(color)


# ------------------------------------------------------------------------------------------------
# Charts
# ------------------------------------------------------------------------------------------------

@dataclass
class Series:
    label: str
    x: Sequence[float]
    y: Sequence[float]
    color: str | None = None
    low: Sequence[float] | None = None  # a band drawn around y (e.g. min / max over seeds), same length
    high: Sequence[float] | None = None


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
    the y axis is logarithmic when positive data spans more than 20x (training losses). A series
    with ``low`` / ``high`` gets a shaded band between them (each smoothed alike when long)."""
    fig = Figure(figsize=size, dpi=100)  # 640 px: two charts side by side on a laptop screen
    ax = fig.add_subplot()
    values = [v for s in series for v in s.y if math.isfinite(v)]
    for i, s in enumerate(series):
        color = s.color or PALETTE[i % len(PALETTE)]
        long = len(s.y) > 60 if smooth is None else smooth
        if s.low is not None and s.high is not None:
            span = max(5, len(s.y) // 40)
            low, high = (ema(s.low, span), ema(s.high, span)) if long else (s.low, s.high)
            ax.fill_between(s.x, low, high, color=color, alpha=0.18, linewidth=0)
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
              colors: Sequence[str] | None = None,
              intervals: Sequence[tuple[float, float] | None] | None = None) -> bytes:
    """Horizontal bars, one per label (e.g. FID per sampler / method); ``intervals`` (low, high)
    per bar, or None for a bar without one, are drawn as error bars."""
    fig = Figure(figsize=(6.4, 0.45 * len(labels) + 1.0), dpi=110)
    ax = fig.add_subplot()
    ax.barh(range(len(labels)), values, color=colors or PALETTE[0])
    ax.set_yticks(range(len(labels)), labels, fontsize=9)
    ax.invert_yaxis()
    ends = list(values)
    for i, (v, iv) in enumerate(zip(values, intervals or [None] * len(values))):
        if iv is not None:
            low, high = iv
            ax.errorbar([v], [i], xerr=[[max(0.0, v - low)], [max(0.0, high - v)]], fmt="none", ecolor="#111827",
                        elinewidth=1.2, capsize=4)
            ends[i] = max(v, high)
    for i, (v, end) in enumerate(zip(values, ends)):
        ax.text(end, i, f" {fmt(float(v))}", va="center", fontsize=8)
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
