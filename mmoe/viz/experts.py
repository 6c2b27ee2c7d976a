"""Matplotlib figures of MoE routing: per-patch expert maps, diversity maps, load heat maps, activation bars.

The pictures echo [MH1] (arXiv 2404.15045): Fig. 1a (activation per expert, SMoE vs MH-MoE), Fig. 5
(activation heat maps per layer) and Fig. 1b / Fig. 8 (per-patch maps of the experts a patch's
sub-tokens reach). Inputs are plain numpy arrays from `mmoe.viz.records`; every function returns a
`matplotlib.figure.Figure` made without pyplot (no global state, no window, any backend; PNGs are
rendered by Agg) so that callers can save it (`save_figure`) or turn it into
an image array for TensorBoard (`figure_to_array`).

The patch maps are drawn as exact RGB arrays (`overlay_grid`) shown with nearest-neighbour
interpolation, so the colour at a patch's centre in the saved PNG is the blend of the image pixel
and that patch's expert colour; the tests rely on that.
"""

from __future__ import annotations

import colorsys
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from PIL import Image

from mmoe.files import atomic_write

PAD_COLOR = np.array([0.85, 0.85, 0.85])
DEFAULT_ALPHA = 0.6
_MAX_COLS = 6


def new_figure(figsize: tuple[float, float]) -> Figure:
    """A constrained-layout figure on its own Agg canvas: no pyplot, so no global figure registry to leak
    into and no interactive backend to switch (safe inside notebooks, training loops and threads)."""
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _tab(name: str, order: Sequence[int]) -> list[np.ndarray]:
    cmap = matplotlib.colormaps[name]
    return [np.array(cmap.colors[i][:3]) for i in order]


def expert_colors(num_experts: int) -> np.ndarray:
    """(E, 3) distinct RGB colours in [0, 1], one per expert; scales to any E.

    Qualitative palettes first (tab10; then tab20 dark shades before light ones so that neighbouring
    expert ids differ in hue; then tab20b and tab20c), then golden-ratio hues at alternating
    saturation/value for E > 60.
    """
    if num_experts <= 0:
        raise ValueError(f"expert_colors: num_experts must be positive, got {num_experts}")
    if num_experts <= 10:
        return np.stack(_tab("tab10", range(num_experts)))
    colors = _tab("tab20", [*range(0, 20, 2), *range(1, 20, 2)])
    for name in ("tab20b", "tab20c"):
        colors += _tab(name, [i + j for j in range(4) for i in range(0, 20, 4)])
    n = len(colors)
    while len(colors) < num_experts:
        i = len(colors) - n
        hue = (i * 0.618033988749895) % 1.0
        sat, val = ((0.75, 0.9), (0.5, 0.7), (0.95, 0.55))[i % 3]
        colors.append(np.array(colorsys.hsv_to_rgb(hue, sat, val)))
    return np.stack(colors[:num_experts])


def expert_cmap(num_experts: int) -> tuple[ListedColormap, BoundaryNorm]:
    """Discrete colormap + norm so that integer expert e maps to `expert_colors(E)[e]`."""
    cmap = ListedColormap(expert_colors(num_experts), name=f"experts{num_experts}")
    return cmap, BoundaryNorm(np.arange(num_experts + 1) - 0.5, num_experts)


def upsample_grid(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """(gh, gw) -> (height, width) by nearest neighbour, patch (r, c) covering its own pixel block."""
    gh, gw = grid.shape[:2]
    rows = (np.arange(height) * gh) // height
    cols = (np.arange(width) * gw) // width
    return grid[rows][:, cols]


def overlay_grid(image: np.ndarray, colors_grid: np.ndarray, alpha: float = DEFAULT_ALPHA) -> np.ndarray:
    """Blend a (gh, gw, 3) grid of colours over an (H, W, 3) image in [0, 1]: (1-a)*image + a*colour."""
    h, w = image.shape[:2]
    up = upsample_grid(colors_grid, h, w)
    return np.clip((1.0 - alpha) * image[..., :3] + alpha * up, 0.0, 1.0)


def color_experts(assign: np.ndarray, num_experts: int) -> np.ndarray:
    """(...) expert ids -> (..., 3) RGB; -1 (padding) is light grey."""
    palette = np.concatenate([expert_colors(num_experts), PAD_COLOR[None]], 0)
    idx = np.where(assign < 0, num_experts, assign)
    if idx.max(initial=0) > num_experts:
        raise ValueError(f"color_experts: expert id {int(assign.max())} >= num_experts {num_experts}")
    return palette[idx]


def diversity_colors(div: np.ndarray, num_heads: int, cmap_name: str = "viridis") -> tuple[np.ndarray, ListedColormap]:
    """(...) distinct-expert counts in 1..h -> (..., 3) RGB from `num_heads` steps of a sequential map."""
    cmap = matplotlib.colormaps[cmap_name].resampled(max(num_heads, 2))
    table = np.array([cmap(i)[:3] for i in range(cmap.N)])[:num_heads] if num_heads > 1 else np.array([cmap(0)[:3]])
    idx = np.clip(div - 1, 0, num_heads - 1)
    return table[idx], ListedColormap(table)


def _grid_shape(n: int, max_cols: int = _MAX_COLS) -> tuple[int, int]:
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


def expert_colorbar(fig: Figure, axes: object, num_experts: int, label: str = "expert") -> None:
    cmap, norm = expert_cmap(num_experts)
    cb = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes, fraction=0.04, pad=0.02)
    step = max(1, math.ceil(num_experts / 16))
    cb.set_ticks(np.arange(0, num_experts, step))
    cb.set_ticklabels([f"e{e}" for e in range(0, num_experts, step)])
    cb.set_label(label)


def _image_axis(ax: Axes, array: np.ndarray, title: str) -> None:
    ax.imshow(array, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def draw_assignment(
    image: np.ndarray,
    first: np.ndarray,
    majority: np.ndarray,
    num_experts: int,
    *,
    title: str = "",
    alpha: float = DEFAULT_ALPHA,
) -> tuple[Figure, dict[str, np.ndarray]]:
    """(a) The image with every patch coloured by the expert its sub-tokens chose ([MH1] Fig. 1b).

    One panel per MoE head (the first-choice expert of that head's sub-token of each patch) plus the
    majority-expert panel. Returns the figure and the exact RGB arrays drawn, keyed by panel name
    ("input", "head0", ..., "majority").

    Args:
        image: (H, W, 3) in [0, 1], the model's input resized, de-normalized.
        first: (gh, gw, h) first-choice expert per patch and head.
        majority: (gh, gw) majority expert per patch.
    """
    h = first.shape[-1]
    panels = {"input": image[..., :3]}
    for j in range(h):
        panels[f"head{j}"] = overlay_grid(image, color_experts(first[..., j], num_experts), alpha)
    panels["majority"] = overlay_grid(image, color_experts(majority, num_experts), alpha)
    rows, cols = _grid_shape(len(panels))
    fig = new_figure((2.3 * cols + 1.2, 2.4 * rows + 0.5))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, (name, arr) in zip(axes.flat, panels.items()):
        label = {"input": "input", "majority": "majority expert"}.get(name, name.replace("head", "head "))
        _image_axis(ax, arr, label)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    expert_colorbar(fig, axes, num_experts)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig, panels


def _diversity_colorbar(fig: Figure, axes: Any, cmap: Any, num_heads: int, *, fraction: float = 0.04) -> None:
    """The 1..h colour bar of the distinct-experts maps."""
    norm = BoundaryNorm(np.arange(num_heads + 1) + 0.5, cmap.N)
    cb = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes, fraction=fraction, pad=0.02)
    cb.set_ticks(np.arange(1, num_heads + 1))
    cb.set_label("distinct experts per patch")


def draw_diversity(
    image: np.ndarray, div: np.ndarray, num_heads: int, *, title: str = "", alpha: float = DEFAULT_ALPHA
) -> tuple[Figure, dict[str, np.ndarray]]:
    """(b) Distinct experts among each patch's h sub-tokens, overlaid on the image ([MH1] Fig. 8)."""
    rgb, cmap = diversity_colors(div, num_heads)
    panels = {"input": image[..., :3], "diversity": overlay_grid(image, rgb, alpha)}
    fig = new_figure((5.8, 2.9))
    axes = fig.subplots(1, 2, squeeze=False)
    _image_axis(axes[0, 0], panels["input"], "input")
    _image_axis(axes[0, 1], panels["diversity"], f"distinct experts (mean {float(np.mean(div)):.2f} of {num_heads})")
    _diversity_colorbar(fig, axes, cmap, num_heads, fraction=0.05)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig, panels


def load_matrix(loads: Mapping[str, np.ndarray]) -> np.ndarray:
    """Routing key -> (E,) shares, stacked to (max E, layers); NaN where a layer has fewer experts."""
    num_e = max((len(v) for v in loads.values()), default=0)
    mat = np.full((num_e, len(loads)), np.nan)
    for j, v in enumerate(loads.values()):
        mat[: len(v), j] = v
    return mat


def draw_load_heatmaps(models: Mapping[str, Mapping[str, np.ndarray]], *, title: str = "") -> tuple[Figure, dict]:
    """(c) Heat map of expert load per layer (experts x layers), one panel per model ([MH1] Fig. 5).

    Colour is the share of the layer's routed sub-token assignments that went to the expert, on one
    scale for all panels so that two models can be compared. Returns the figure and the matrices.
    """
    mats = {label: load_matrix(loads) for label, loads in models.items()}
    vmax = max([float(np.nanmax(m)) for m in mats.values() if m.size and not np.all(np.isnan(m))], default=1.0)
    n = len(mats)
    num_e = max((m.shape[0] for m in mats.values()), default=1)
    width = sum(max(2.0, 0.55 * m.shape[1] + 1.2) for m in mats.values()) + 1.5
    fig = new_figure((width, max(3.0, 0.22 * num_e + 1.6)))
    axes = fig.subplots(1, n, squeeze=False)
    im = None
    for ax, (label, mat) in zip(axes.flat, mats.items()):
        keys = list(models[label].keys())
        im = ax.imshow(np.ma.masked_invalid(mat), aspect="auto", cmap="magma", vmin=0.0, vmax=vmax)
        ax.set_xticks(range(len(keys)), keys, rotation=45, ha="right", fontsize=8)
        step = max(1, math.ceil(mat.shape[0] / 16))
        ax.set_yticks(range(0, mat.shape[0], step))
        ax.set_xlabel("MoE layer")
        ax.set_ylabel("expert")
        ax.set_title(label, fontsize=10)
        if mat.size <= 96:
            for (e, j), v in np.ndenumerate(mat):
                if not np.isnan(v):
                    ax.text(
                        j, e, f"{100 * v:.0f}", ha="center", va="center", fontsize=6, color="w" if v < vmax / 2 else "k"
                    )
    if im is not None:
        fig.colorbar(im, ax=axes, fraction=0.04, pad=0.02).set_label("share of routed sub-tokens")
    fig.suptitle(title or "expert load per layer", fontsize=10)
    return fig, mats


def draw_activation_bars(
    models: Mapping[str, Mapping[str, np.ndarray]], *, threshold: float, title: str = ""
) -> tuple[Figure, dict]:
    """(d) Per-expert load share per layer as bars, with the activation threshold ([MH1] Fig. 1a).

    Rows are layers, columns models. An expert is activated when its share is at least `threshold`;
    each panel's title gives the activation ratio (activated experts / E).
    """
    labels = list(models)
    keys: list[str] = []
    for loads in models.values():
        keys += [k for k in loads if k not in keys]
    fig = new_figure((4.2 * len(labels) + 0.6, 1.7 * len(keys) + 0.9))
    axes = fig.subplots(max(len(keys), 1), len(labels), squeeze=False, sharey=True)
    ratios: dict[str, dict[str, float]] = {label: {} for label in labels}
    for c, label in enumerate(labels):
        for r, key in enumerate(keys):
            ax = axes[r, c]
            share = models[label].get(key)
            if share is None:
                ax.axis("off")
                continue
            num_e = len(share)
            active = (share >= threshold) & (share > 0)
            ratios[label][key] = float(active.mean()) if num_e else 0.0
            ax.bar(np.arange(num_e), share, color=expert_colors(num_e), edgecolor="k", linewidth=0.3)
            ax.axhline(threshold, color="k", linestyle="--", linewidth=0.8, label=f"threshold {threshold:g}")
            ax.set_title(
                f"{label} {key}: {int(active.sum())}/{num_e} active ({100 * ratios[label][key]:.1f}%)", fontsize=8
            )
            ax.set_xlim(-0.6, num_e - 0.4)
            step = max(1, math.ceil(num_e / 16))
            ax.set_xticks(range(0, num_e, step))
            ax.tick_params(labelsize=7)
            if r == len(keys) - 1:
                ax.set_xlabel("expert")
            if c == 0:
                ax.set_ylabel("load share")
            if r == 0 and c == 0:
                ax.legend(fontsize=7, loc="upper right")
    fig.suptitle(title or "expert activation per layer", fontsize=10)
    return fig, ratios


def draw_activation_summary(ratios: Mapping[str, Mapping[str, float]], *, threshold: float) -> Figure:
    """Activation ratio per layer, one bar group per layer and one bar per model ([MH1] Fig. 1a's headline:
    the share of experts activated, e.g. SMoE 8.33% vs MH-MoE 90.71%)."""
    labels = list(ratios)
    keys: list[str] = []
    for r in ratios.values():
        keys += [k for k in r if k not in keys]
    fig = new_figure((max(4.0, 0.8 * len(keys) * max(1, len(labels)) + 1.5), 3.2))
    ax = fig.subplots()
    width = 0.8 / max(1, len(labels))
    palette = matplotlib.colormaps["Set2"].colors
    for m, label in enumerate(labels):
        xs = np.arange(len(keys)) + (m - (len(labels) - 1) / 2) * width
        vals = [100 * ratios[label].get(k, np.nan) for k in keys]
        bars = ax.bar(xs, vals, width, label=label, color=palette[m % len(palette)], edgecolor="k", linewidth=0.4)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(keys)), keys, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 110)
    ax.set_ylabel("activated experts (%)")
    ax.set_xlabel("MoE layer")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never hides a bar
    ax.set_title(f"activation ratio (expert share >= {threshold:g})", fontsize=10)
    return fig


def draw_map_grid(
    images: Sequence[np.ndarray],
    maps: Sequence[Sequence[np.ndarray]],
    *,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    kind: str,
    num_classes: int,
    title: str = "",
    alpha: float = DEFAULT_ALPHA,
) -> tuple[Figure, list[list[np.ndarray]]]:
    """A grid of patch maps: rows (inputs or models) x columns (layers), the input image in column 0.

    `kind` "expert": maps are expert ids and `num_classes` = E; "diversity": maps are distinct-expert
    counts and `num_classes` = h. Used for the TensorBoard image and the side-by-side comparison.
    """
    if kind not in ("expert", "diversity"):
        raise ValueError(f"draw_map_grid: kind must be 'expert' or 'diversity', got {kind!r}")
    rows, cols = len(maps), 1 + max((len(r) for r in maps), default=0)
    fig = new_figure((2.0 * cols + 1.0, 2.0 * rows + 0.6))
    axes = fig.subplots(rows, cols, squeeze=False)
    drawn: list[list[np.ndarray]] = []
    for r, (img, row) in enumerate(zip(images, maps)):
        _image_axis(axes[r, 0], img[..., :3], "input" if r == 0 else "")
        axes[r, 0].set_ylabel(row_labels[r], fontsize=8)
        drawn_row = []
        for c, grid in enumerate(row):
            rgb = color_experts(grid, num_classes) if kind == "expert" else diversity_colors(grid, num_classes)[0]
            arr = overlay_grid(img, rgb, alpha)
            drawn_row.append(arr)
            _image_axis(axes[r, c + 1], arr, col_labels[c] if r == 0 else "")
        for c in range(len(row) + 1, cols):
            axes[r, c].axis("off")
        drawn.append(drawn_row)
    if kind == "expert":
        expert_colorbar(fig, axes, num_classes, "majority expert")
    else:
        _diversity_colorbar(fig, axes, diversity_colors(np.ones(1, dtype=np.int64), num_classes)[1], num_classes)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig, drawn


def axes_pixel_box(fig: Figure, ax: Axes) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of an axes in the saved PNG's pixel coordinates (origin top-left).

    Valid for `save_figure` output, which saves at the figure's dpi without tight cropping.
    """
    fig.canvas.draw()  # runs the constrained layout so the axes are where the PNG will have them
    bbox = ax.get_window_extent()
    height = fig.get_size_inches()[1] * fig.dpi
    return bbox.x0, height - bbox.y1, bbox.x1, height - bbox.y0


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write `fig` as a PNG atomically (`mmoe.files.atomic_write`: a killed run leaves no half picture)."""
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=fig.dpi))


def figure_to_array(fig: Figure) -> np.ndarray:
    """Render a figure to an (H, W, 3) uint8 array (for TensorBoard `add_image(..., dataformats="HWC")`)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))
