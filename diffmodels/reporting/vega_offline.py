"""An HTML template for ``dvc plots show/diff`` that renders without a network.

DVC's page loads vega, vega-lite and vega-embed from a CDN (dvc-render's ``VegaRenderer.SCRIPTS``,
substituted for ``{scripts}`` in its template) and stays blank offline. ``dvc plots show
--html-template T`` replaces that page with ``T``: a template that has ``{plot_divs}`` but no
``{scripts}`` gets no CDN tags, so inlining the libraries in ``T`` makes the page self-contained.

The libraries come from the ``vl-convert-python`` wheel (BSD-3; vega, vega-lite and vega-embed
are BSD-3 too): its ``javascript_bundle()`` returns one script that defines ``window.vegaEmbed``,
``window.vega`` and ``window.vegaLite``, about 0.9 MB, built in a few seconds. Nothing is vendored
in this repository; the template is built on demand and cached per vl-convert version.

Each plot DVC writes is ``<script>var spec = {...}; vegaEmbed('#id', spec);</script>``, run while
the page is parsed, so the bundle goes in ``<head>`` as a classic script (not a module, which
would run after the plots' scripts). It is wrapped in a function so that its own top-level names
cannot collide with DVC's ``var spec``.
"""

from __future__ import annotations

from pathlib import Path

from diffmodels.core.errors import DiffmodelsError
from diffmodels.core.io import write_text

# DVC fills {refresh_tag} (for --refresh) and {plot_divs}; there is deliberately no {scripts}.
PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
{refresh_tag}
<title>DVC plots</title>
<!-- vega {vega}, vega-lite {vega_lite}, vega-embed {vega_embed}, inlined from vl-convert-python {vl_convert} -->
<script>
(function () {
__BUNDLE__
})();
</script>
<style>
  body { font-family: system-ui, sans-serif; margin: 1.5em; color: #1a202c; }
  table { border-spacing: 15px; }
  div[id] { margin-bottom: 1.5em; }
  img { max-width: 100%; image-rendering: pixelated; }
</style>
</head>
<body>
{plot_divs}
</body>
</html>
"""

PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")
DEFAULT_PATH = Path(".dvc/tmp/vega_offline_template.html")  # git-ignored by DVC's own .dvc/.gitignore


def _vl_convert():
    try:
        import vl_convert
    except ImportError:
        raise DiffmodelsError(
            "offline plots need vl-convert-python, which ships vega/vega-lite/vega-embed: "
            "pip install -c constraints.txt vl-convert-python (it is a dependency of diffmodels)"
        ) from None
    return vl_convert


def versions() -> dict[str, str]:
    vlc = _vl_convert()
    available = vlc.get_vegalite_versions()  # e.g. ['5.8', ..., '5.21', '6.1', '6.4']
    # DVC's plot templates are Vega-Lite v5 specs: the newest v5 avoids vega-embed's version warning.
    v5 = [v for v in available if v.startswith("5.")]
    return {
        "vl_convert": getattr(vlc, "__version__", "unknown"),
        "vega": vlc.get_vega_version(),
        "vega_lite": max(v5 or available, key=lambda v: tuple(int(x) for x in v.split("."))),
        "vega_embed": vlc.get_vega_embed_version(),
    }


def render_template(bundle: str, info: dict[str, str]) -> str:
    """The template text around a JavaScript ``bundle`` (one classic script)."""
    # An inline script ends at the first "</script" whatever the JS means by it.
    bundle = bundle.replace("</script", "<\\/script")
    clash = [p for p in PLACEHOLDERS if p in bundle]
    if clash:  # DVC's plain str.replace would rewrite the library's code
        raise DiffmodelsError(f"the vega bundle contains DVC's placeholder {clash[0]}; cannot build the template")
    page = PAGE
    for key, value in info.items():
        page = page.replace("{" + key + "}", value)
    return page.replace("__BUNDLE__", bundle)


def build_template(path: str | Path = DEFAULT_PATH) -> Path:
    """Write the offline template to ``path`` (reused while the vl-convert version is unchanged)."""
    path = Path(path)
    info = versions()
    stamp = (
        f"vega-lite {info['vega_lite']}, vega-embed {info['vega_embed']}, "
        f"inlined from vl-convert-python {info['vl_convert']} -->"
    )
    if path.is_file() and stamp in path.read_text(encoding="utf-8", errors="replace")[:2000]:
        return path
    write_text(path, render_template(_vl_convert().javascript_bundle(vl_version=info["vega_lite"]), info))
    return path
