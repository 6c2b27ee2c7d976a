"""The interactive routing viewer: one self-contained ``index.html`` beside the PNGs of `mmoe-viz --html`.

The PNGs show one layer and one summary at a time; the page lets a reader move through inputs and layers and ask a
single patch what its h sub-tokens did ([MH1] sec. 3: every token is split into h sub-tokens routed top-k on their
own). Per input image and MoE layer it draws the patch grid over the image, coloured by the majority expert, one
head's first choice or the number of distinct experts ([MH1] Fig. 1b, Fig. 8); hovering or clicking a patch lists
every sub-token's top-k experts and gates; the per-word text routing and the experts x layers load heat map
([MH1] Fig. 5) follow; several models (``--compare``) are drawn side by side on the same inputs.

Self-contained means it opens from disk with no network: the images are ``data:`` URIs, the script and the style
sheet (``viewer.js``, ``viewer.css``, package data next to this module) are inlined, and the routing is embedded
as JSON. The numbers are those of `mmoe.viz.report.report_json` (the same as ``experts.json``) plus the top-k
experts and gates of every patch sub-token.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from PIL import Image

from mmoe.files import atomic_write_text
from mmoe.viz.capture import ModelRouting
from mmoe.viz.experts import DEFAULT_ALPHA, PAD_COLOR, diversity_colors, expert_colors
from mmoe.viz.report import report_json

__all__ = ["viewer_data", "write_html"]

_GATE_DIGITS = 4


def _hex(rgb: Sequence[float]) -> str:
    return "#" + "".join(f"{int(round(255 * float(v))):02x}" for v in rgb[:3])


def _png_uri(image: np.ndarray) -> str:
    """(H, W, 3) float image in [0, 1] -> a ``data:image/png;base64`` URI."""
    arr = np.clip(np.round(np.asarray(image)[..., :3] * 255), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _model_data(result: ModelRouting, threshold: float, uris: dict[str, int], images: list[str]) -> dict[str, Any]:
    """One model's part of the page data: `report_json`'s layers with the top-k routing of every patch added."""
    layers = report_json(result, threshold)["layers"]
    for key, st in layers.items():
        for entry in st["images"]:
            i = entry["input"]
            entry["experts"] = result.topk_experts[key][i].tolist()
            entry["gates"] = np.round(result.topk_gates[key][i].astype(np.float64), _GATE_DIGITS).tolist()
    refs: list[int | None] = []
    for i in range(len(result.inputs)):
        if i not in result.images:
            refs.append(None)
            continue
        uri = _png_uri(result.images[i])
        if uri not in uris:  # the models of a comparison usually see the same pixels: embed them once
            uris[uri] = len(images)
            images.append(uri)
        refs.append(uris[uri])
    size = max((int(img.shape[0]) for img in result.images.values()), default=0)
    return {
        "label": result.label,
        "source": result.source,
        "grid": list(result.grid_size) if result.grid_size else None,
        "image_size": size,
        "images": refs,
        "keys": list(layers),
        "layers": layers,
    }


def viewer_data(
    results: Sequence[ModelRouting], *, threshold: float, files: Sequence[str] = (), title: str | None = None
) -> dict[str, Any]:
    """Everything the page draws, as plain JSON types (the ``routing-data`` block of ``index.html``).

    `files` are the PNGs and tables written beside the page (paths relative to it), listed as links.
    """
    if not results:
        raise ValueError("viewer_data: no model results to show")
    labels = [r.label for r in results]
    if len(set(labels)) != len(labels):
        raise ValueError(f"viewer_data: model labels must differ, got {labels}")
    uris: dict[str, int] = {}
    images: list[str] = []
    models = [_model_data(r, threshold, uris, images) for r in results]
    # the PNGs' colours: the palette of E experts and the diversity scale of h heads depend on E and h
    num_e = sorted({int(st["num_experts"]) for m in models for st in m["layers"].values()})
    num_h = sorted({int(st["num_heads"]) for m in models for st in m["layers"].values()})
    heat = matplotlib.colormaps["magma"].resampled(256)
    return {
        "title": title or "mmoe routing: " + " vs ".join(labels),
        "threshold": threshold,
        "alpha": DEFAULT_ALPHA,
        "colors": {str(e): [_hex(c) for c in expert_colors(e)] for e in num_e},
        "pad_color": _hex(PAD_COLOR),
        "diversity_colors": {str(h): [_hex(c) for c in diversity_colors(np.arange(1, h + 1), h)[0]] for h in num_h},
        "heat": [_hex(heat(i)) for i in range(heat.N)],
        "inputs": [
            {"index": i, "source": x.source, "name": x.source.replace("\\", "/").rsplit("/", 1)[-1], "text": x.text}
            for i, x in enumerate(results[0].inputs)
        ],
        "images": images,
        "models": models,
        "files": list(files),
    }


def _asset(name: str) -> str:
    return resources.files("mmoe.viz").joinpath(name).read_text(encoding="utf-8")


def _script_json(data: dict[str, Any]) -> str:
    """JSON safe inside a ``<script>`` element: no ``</script>`` or ``<!--`` can end or change it early."""
    text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_html(data: dict[str, Any]) -> str:
    """The page for `viewer_data`'s output: markup, the inlined style sheet and script, the embedded data."""
    title = html.escape(data["title"])
    links = "".join(f'<li><a href="{html.escape(f)}">{html.escape(f)}</a></li>' for f in data["files"])
    sub = (
        f"{len(data['inputs'])} input(s); activation threshold {data['threshold']:g} "
        "(an expert is active when its share of a layer's routed sub-tokens is at least this)"
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
{_asset("viewer.css")}
</style>
</head>
<body>
<h1>{title}</h1>
<div class="subtitle">{html.escape(sub)}</div>
<div class="controls">
<label>image <select id="image-select"></select></label>
<label>layer <select id="layer-select"></select></label>
<label>colour by <select id="view-select"></select></label>
</div>
<h2>Patches: the experts of each patch's sub-tokens</h2>
<div id="models" class="models"></div>
<section id="text-section">
<h2>Text: the experts of each word's sub-tokens</h2>
<div id="text-routing"></div>
</section>
<h2>Expert load per layer (% of routed sub-tokens, all inputs)</h2>
<div id="load-heatmap" class="heatmaps"></div>
<h2>Files beside this page</h2>
<ul class="files">{links}</ul>
<pre id="selftest-result"></pre>
<script type="application/json" id="routing-data">{_script_json(data)}</script>
<script>
{_asset("viewer.js")}
</script>
</body>
</html>
"""


def write_html(
    results: Sequence[ModelRouting],
    out: str | Path,
    *,
    threshold: float,
    files: Sequence[str] = (),
    title: str | None = None,
) -> Path:
    """Write ``out/index.html`` for one model or several side by side (atomically); returns its path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    page = render_html(viewer_data(results, threshold=threshold, files=files, title=title))
    return atomic_write_text(out / "index.html", page)
