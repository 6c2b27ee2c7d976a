"""Write what `collect_routing` kept: experts.json, the text table and the pictures ([MH1] Fig. 1, 5, 8).

Output layout of `write_report(result, out)`:
    experts.json                        every number drawn (loads, activation ratios, per-patch ids)
    load_heatmap.png                    (c) experts x layers load over all inputs
    activation.png                      (d) per-expert load bars per layer with the activation threshold
    activation_ratio.png                (d) share of experts activated per layer
    images/{i:03d}_{name}/{key}_experts.png     (a) per-head and majority expert per patch
    images/{i:03d}_{name}/{key}_diversity.png   (b) distinct experts per patch
    text/{i:03d}_routing.png, text/routing.md   text sub-tokens' experts, picture and table

`write_comparison` draws several models side by side on the same inputs (compare.json and its figures).
Every file is written atomically (`mmoe.files`): a killed run never leaves a truncated report.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmoe.files import atomic_write_json, atomic_write_text
from mmoe.moe.stats import DEFAULT_ACTIVATION_THRESHOLD as DEFAULT_THRESHOLD
from mmoe.viz import experts as figures
from mmoe.viz.capture import ModelRouting
from mmoe.viz.records import activation_ratio
from mmoe.viz.text import draw_text_routing, markdown_table, word_rows

__all__ = ["DEFAULT_THRESHOLD", "report_json", "write_comparison", "write_report"]


def _safe_name(source: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(source.split(":")[-1]).stem)[:60] or "input"


def report_json(result: ModelRouting, threshold: float) -> dict[str, Any]:
    """Every number the pictures show (interfaces: plain JSON types only)."""
    layers = result.accumulator.to_json(threshold)
    for key, st in layers.items():
        st["images"] = [
            {
                "input": i,
                "first_choice": result.first[key][i].tolist(),
                "majority": result.majority(key, i).tolist(),
                "diversity": result.diversity(key, i).tolist(),
            }
            for i in sorted(result.first.get(key, {}))
        ]
        st["text"] = [
            {"input": tr.input_index, "tokens": tr.rows[key], "words": word_rows(tr.rows[key])}
            for tr in result.texts
            if key in tr.rows
        ]
    return {
        "model": {"label": result.label, "source": result.source},
        "inputs": [{"index": i, "source": x.source, "text": x.text} for i, x in enumerate(result.inputs)],
        "grid_size": list(result.grid_size) if result.grid_size else None,
        "activation_threshold": threshold,
        "activation_threshold_meaning": "an expert is activated when its share of the layer's routed "
        "sub-token assignments is at least this value",
        "layers": layers,
    }


def _wanted(key: str, layers: Sequence[str] | None) -> bool:
    """A routing key is drawn per image when no filter is given or its key or layer name is in it."""
    return layers is None or key in layers or key.split(".")[0] in layers


def write_report(
    result: ModelRouting,
    out: str | Path,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    layers: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Write the PNGs (a)-(d), the text table and picture, and experts.json for one model; returns the JSON.

    `layers` ("layer3" or "layer3.vision") limits the per-image pictures (a) and (b) to those layers;
    the load heat map, activation charts and the JSON always cover every MoE layer.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = report_json(result, threshold)
    files: list[str] = []
    for i in sorted(result.images):
        folder = out / "images" / f"{i:03d}_{_safe_name(result.inputs[i].source)}"
        for key in result.first:
            if i not in result.first[key] or not _wanted(key, layers):
                continue
            e, h = result.num_experts[key], result.num_heads[key]
            title = f"{result.label} {key}: expert per patch (first choice), E={e}, h={h}"
            fig, _ = figures.draw_assignment(
                result.images[i], result.first[key][i], result.majority(key, i), e, title=title
            )
            files.append(str(figures.save_figure(fig, folder / f"{key}_experts.png")))
            fig, _ = figures.draw_diversity(
                result.images[i], result.diversity(key, i), h, title=f"{result.label} {key}: sub-token diversity"
            )
            files.append(str(figures.save_figure(fig, folder / f"{key}_diversity.png")))
    loads = result.accumulator.load()
    if loads:
        n = len(result.inputs)
        fig, _ = figures.draw_load_heatmaps({result.label: loads}, title=f"expert load per layer over {n} input(s)")
        files.append(str(figures.save_figure(fig, out / "load_heatmap.png")))
        fig, ratios = figures.draw_activation_bars({result.label: loads}, threshold=threshold)
        files.append(str(figures.save_figure(fig, out / "activation.png")))
        fig = figures.draw_activation_summary(ratios, threshold=threshold)
        files.append(str(figures.save_figure(fig, out / "activation_ratio.png")))
    if result.texts:
        md = [f"# Text routing: {result.label}", ""]
        for tr in result.texts:
            md += [f"## input {tr.input_index}: {tr.text!r}", ""]
            md += [markdown_table(key, rows) for key, rows in tr.rows.items()]
            if tr.first:
                e = max(result.num_experts[k] for k in tr.first)
                fig, _ = draw_text_routing(tr.first, tr.pieces, e, gates=tr.gates, title=f"{result.label}: {tr.text}")
                files.append(str(figures.save_figure(fig, out / "text" / f"{tr.input_index:03d}_routing.png")))
        atomic_write_text(out / "text" / "routing.md", "\n".join(md))
        files.append(str(out / "text" / "routing.md"))
    data["files"] = [os.path.relpath(f, out) for f in files]
    atomic_write_json(out / "experts.json", data, indent=1)
    return data


def write_comparison(
    results: Sequence[ModelRouting],
    out: str | Path,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    layers: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Draw several models side by side on the same inputs (e.g. SMoE vs MH-MoE, [MH1] Fig. 1).

    Writes load heat maps and activation bars with one panel per model, and per input image the
    majority-expert and diversity maps with one row per model and one column per layer.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = [r.label for r in results]
    if len(set(labels)) != len(labels):
        raise ValueError(f"write_comparison: model labels must differ, got {labels}")
    loads = {r.label: r.accumulator.load() for r in results}
    files = []
    fig, _ = figures.draw_load_heatmaps(loads, title="expert load per layer: " + " vs ".join(labels))
    files.append(figures.save_figure(fig, out / "load_heatmap.png"))
    fig, ratios = figures.draw_activation_bars(
        loads, threshold=threshold, title="expert activation: " + " vs ".join(labels)
    )
    files.append(figures.save_figure(fig, out / "activation.png"))
    files.append(
        figures.save_figure(figures.draw_activation_summary(ratios, threshold=threshold), out / "activation_ratio.png")
    )
    summary: dict[str, Any] = {"models": labels, "activation_threshold": threshold, "layers": {}}
    for r in results:
        summary["layers"][r.label] = {
            k: {
                "activation_ratio": activation_ratio(st.counts, threshold),
                "mean_patch_diversity": st.to_json(threshold)["mean_patch_diversity"],
                "num_experts": st.num_experts,
                "num_heads": st.num_heads,
            }
            for k, st in r.accumulator.layers.items()
        }
    for i in sorted(results[0].images):
        name = f"{i:03d}_{_safe_name(results[0].inputs[i].source)}"
        for kind in ("expert", "diversity"):
            maps, row_labels, keys_used = [], [], []
            for r in results:
                keys = [k for k in r.first if i in r.first[k] and _wanted(k, layers)]
                keys_used = keys if len(keys) > len(keys_used) else keys_used
                maps.append([r.majority(k, i) if kind == "expert" else r.diversity(k, i) for k in keys])
                row_labels.append(r.label)
            if not any(maps):
                continue
            if kind == "expert":
                classes = max(max(r.num_experts.values()) for r in results)
            else:
                classes = max(max(r.num_heads.values()) for r in results)
            fig, _ = figures.draw_map_grid(
                [results[0].images[i]] * len(results),
                maps,
                row_labels=row_labels,
                col_labels=keys_used,
                kind=kind,
                num_classes=classes,
                title=("majority expert per patch" if kind == "expert" else "distinct experts per patch")
                + ": "
                + " vs ".join(labels),
            )
            files.append(
                figures.save_figure(fig, out / f"{name}_{'majority' if kind == 'expert' else 'diversity'}.png")
            )
    summary["files"] = [os.path.relpath(f, out) for f in files]
    atomic_write_json(out / "compare.json", summary, indent=1)
    return summary
