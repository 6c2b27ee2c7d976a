"""Run a model over images (and text) and write the expert-assignment pictures and numbers.

This is the engine behind `mmoe-viz` and the pretraining callback: load a model
(one of our checkpoints, an mmoe model file, or a registered name for a freshly initialized model),
read inputs (an image, a folder of images, or a webdataset shard), run the backbone with routing
records (docs/interfaces.md sec. 2), and write for every MoE layer the pictures of [MH1] Fig. 1, 5
and 8 plus a JSON of the numbers. One model or two side by side (`write_comparison`).

Output layout of `write_report(result, out)`:
    experts.json                        every number drawn (loads, activation ratios, per-patch ids)
    load_heatmap.png                    (c) experts x layers load over all inputs
    activation.png                      (d) per-expert load bars per layer with the activation threshold
    activation_ratio.png                (d) share of experts activated per layer
    images/{i:03d}_{name}/{key}_experts.png     (a) per-head and majority expert per patch
    images/{i:03d}_{name}/{key}_diversity.png   (b) distinct experts per patch
    text/{i:03d}_routing.png, text/routing.md   text sub-tokens' experts, picture and table
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmoe.viz.experts import (
    draw_activation_bars,
    draw_activation_summary,
    draw_assignment,
    draw_diversity,
    draw_load_heatmaps,
    draw_map_grid,
    save_figure,
)
from mmoe.viz.records import (
    LayerView,
    RoutingAccumulator,
    activation_ratio,
    diversity,
    majority_expert,
    patch_gates,
    patch_grid,
    split_routing,
)
from mmoe.viz.text import TokenPieces, draw_text_routing, markdown_table, split_words, text_rows, word_rows

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TEXT_EXTS = ("txt", "text", "caption", "cap")
try:  # one default for the whole project: the training logs and these pictures agree
    from mmoe.moe.stats import DEFAULT_ACTIVATION_THRESHOLD as DEFAULT_THRESHOLD
except ImportError:  # pragma: no cover - mmoe.moe is part of the package
    DEFAULT_THRESHOLD = 0.01


@dataclass
class VizInput:
    """One input: an image (or None for text only) and an optional text; `source` names where it came from."""

    source: str
    image: Image.Image | None
    text: str | None = None


# --------------------------------------------------------------------------------------------- inputs
def _read_shard(path: Path) -> Iterator[VizInput]:
    """Samples of a webdataset tar: members grouped by key (the name up to the first dot of the basename)."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            dirname, base = os.path.split(member.name)
            if "." not in base:
                continue
            stem, ext = base.split(".", 1)
            f = tar.extractfile(member)
            if f is not None:
                samples.setdefault(os.path.join(dirname, stem), {})[ext.lower()] = f.read()
    for key, parts in samples.items():
        img_ext = next((e for e in parts if "." + e.rsplit(".", 1)[-1] in IMAGE_EXTS), None)
        if img_ext is None:
            continue
        try:
            image = Image.open(io.BytesIO(parts[img_ext])).convert("RGB")
        except Exception as exc:  # a broken sample should not stop the others
            print(f"visualize_experts: {path} sample {key}: image failed to decode ({exc}); skipped")
            continue
        yield VizInput(f"{path.name}:{key}", image, _shard_text(parts))


def _shard_text(parts: dict[str, bytes]) -> str | None:
    """A sample's caption: a `.txt`-like member, else the first caption of a `.json` member
    (`{"captions": [...]}` or `{"caption"|"text": ...}`, as mmoe.data.shards writes them)."""
    for ext in TEXT_EXTS:
        if ext in parts:
            return parts[ext].decode("utf-8").strip() or None
    if "json" in parts:
        try:
            meta = json.loads(parts["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
        if isinstance(meta, dict):
            caps = meta.get("captions") or [meta[k] for k in ("caption", "text") if k in meta]
            caps = [c.strip() for c in caps if isinstance(c, str) and c.strip()]
            return caps[0] if caps else None
    return None


def load_inputs(path: str | Path | None, *, text: str | None = None, limit: int | None = None) -> list[VizInput]:
    """Read an image file, a folder of images (sorted, not recursive) or a webdataset shard (.tar).

    `text`, when given, is paired with every image (a shard's own captions are used otherwise); with
    no `path`, `text` alone gives one text-only input.
    """
    items: list[VizInput] = []
    if path is None:
        if text is None:
            raise ValueError("load_inputs: give an image path (--image) or a text (--text)")
        return [VizInput("text", None, text)]
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise FileNotFoundError(f"--image {p}: folder has no images with extensions {IMAGE_EXTS}")
        items = [VizInput(str(f), Image.open(f).convert("RGB"), text) for f in files[: limit or None]]
    elif p.is_file() and (p.suffix == ".tar" or p.name.endswith((".tar.gz", ".tgz"))):
        for item in _read_shard(p):
            items.append(VizInput(item.source, item.image, text if text is not None else item.text))
            if limit and len(items) >= limit:
                break
        if not items:
            raise ValueError(f"--image {p}: shard holds no decodable image samples")
    elif p.is_file():
        items = [VizInput(str(p), Image.open(p).convert("RGB"), text)]
    else:
        raise FileNotFoundError(f"--image {p}: no such file or folder (expected an image, a folder or a .tar shard)")
    return items


# --------------------------------------------------------------------------------------------- models
def resolve_model(spec: str, *, seed: int = 0) -> tuple[torch.nn.Module, str]:
    """A model from a path (mmoe model file or one of our Lightning checkpoints) or a registered name.

    A registered name (or a model YAML) gives a freshly initialized model seeded with `seed`.
    Returns the model in eval mode and a short label for titles and folder names.
    """
    from mmoe.model import create_model, list_models, load_model

    p = Path(spec)
    if p.is_file() and p.suffix not in (".yaml", ".yml"):
        model = load_model(str(p))
        # Lightning keeps run/checkpoints/last.ckpt: name it after the run, "last" alone says little
        label = (
            f"{p.parent.parent.name}_{p.stem}" if p.parent.name == "checkpoints" and p.parent.parent.name else p.stem
        )
    elif spec in list_models() or (p.is_file() and p.suffix in (".yaml", ".yml")):
        torch.manual_seed(seed)
        model = create_model(spec)
        label = p.stem if p.is_file() else spec
    else:
        raise FileNotFoundError(
            f"--checkpoint {spec!r}: not a file and not a registered model; registered: {', '.join(list_models())}"
        )
    return model.eval(), label


def model_tokenizer(model: torch.nn.Module) -> Any:
    """The tokenizer the model expects (its `tokenizer_spec`, interfaces.md sec. 2-3)."""
    from mmoe.data.tokenizer import build_tokenizer, tokenizer_from_spec

    cfg = getattr(model, "config", None)
    max_len = int(getattr(cfg, "max_text_len", 32))
    spec = getattr(model, "tokenizer_spec", None)
    if spec:
        spec = dict(spec)
        if "name" not in spec and "kind" in spec:  # the model names the tokenizer "kind", the data side "name"
            spec["name"] = spec["kind"]
        return tokenizer_from_spec(spec, max_len=max_len)
    name = getattr(cfg, "tokenizer", "openclip")
    return build_tokenizer(name, max_len=max_len, path=getattr(cfg, "tokenizer_path", None))


def image_transform(model: torch.nn.Module) -> Any:
    """The evaluation transform for the model's image size and normalization (squash to a square)."""
    from mmoe.data.transforms import build_transform

    cfg = model.config
    return build_transform(int(cfg.img_size), train=False, mean=cfg.image_mean, std=cfg.image_std)


def to_display(image_B3HW: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> list[np.ndarray]:
    """Undo normalization: (B, 3, H, W) -> list of (H, W, 3) float arrays in [0, 1]."""
    m = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
    img = (image_B3HW.detach().float().cpu() * s + m).clamp(0, 1)
    return [a.permute(1, 2, 0).numpy() for a in img]


@dataclass
class RoutedBatch:
    """Routing of one forward pass split per modality (see `forward_routing`)."""

    views: list[LayerView]
    grid_size: tuple[int, int] | None
    num_vision_tokens: int
    num_text_tokens: int


@torch.no_grad()
def forward_routing(
    model: torch.nn.Module,
    *,
    image: torch.Tensor | None = None,
    text: torch.Tensor | None = None,
    text_padding_mask: torch.Tensor | None = None,
) -> RoutedBatch:
    """Run the backbone once and split its routing records into vision / text views (interfaces.md sec. 2)."""
    out = model(image=image, text=text, text_padding_mask=text_padding_mask)
    routing = getattr(out, "routing", None) or {}
    nv = int(getattr(out, "num_vision_tokens", 0) or 0)
    nt = int(out.features.shape[1]) - nv
    grid = getattr(out, "grid_size", None)
    views = split_routing(routing, num_vision_tokens=nv, num_text_tokens=nt)
    return RoutedBatch(views, tuple(grid) if grid is not None else None, nv, nt)


# --------------------------------------------------------------------------------------------- results
@dataclass
class TextResult:
    input_index: int
    text: str
    pieces: TokenPieces
    first: dict[str, np.ndarray] = field(default_factory=dict)  # key -> (T, h)
    gates: dict[str, np.ndarray] = field(default_factory=dict)  # key -> (T, h) first-choice gates
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


@dataclass
class ModelRouting:
    """Everything one model's routing over all inputs produced, ready to draw or dump to JSON."""

    label: str
    source: str
    inputs: list[VizInput]
    grid_size: tuple[int, int] | None = None
    accumulator: RoutingAccumulator = field(default_factory=RoutingAccumulator)
    images: dict[int, np.ndarray] = field(default_factory=dict)  # input index -> (H, W, 3) display image
    first: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)  # key -> input -> (gh, gw, h)
    gates: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)
    texts: list[TextResult] = field(default_factory=list)
    num_experts: dict[str, int] = field(default_factory=dict)
    num_heads: dict[str, int] = field(default_factory=dict)

    def majority(self, key: str, i: int) -> np.ndarray:
        return majority_expert(self.first[key][i], self.gates[key][i])

    def diversity(self, key: str, i: int) -> np.ndarray:
        return diversity(self.first[key][i])


def collect_routing(
    model: torch.nn.Module, inputs: Sequence[VizInput], *, label: str, source: str = "", batch_size: int = 8
) -> ModelRouting:
    """Run `model` over `inputs` in batches (inputs with and without text never share a batch)."""
    result = ModelRouting(label=label, source=source or label, inputs=list(inputs))
    cfg = model.config
    transform = image_transform(model) if any(x.image is not None for x in inputs) else None
    tok = model_tokenizer(model) if any(x.text for x in inputs) else None
    special = {}
    if tok is not None:
        special = {tok.bos_id: "<bos>", tok.eos_id: "<eos>", tok.mask_id: "<mask>"}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    groups: list[list[int]] = []
    for i, item in enumerate(inputs):
        if groups and len(groups[-1]) < batch_size and _sig(inputs[groups[-1][0]]) == _sig(item):
            groups[-1].append(i)
        else:
            groups.append([i])
    for idx in groups:
        batch = [inputs[i] for i in idx]
        image = text = pad = None
        if batch[0].image is not None:
            image = torch.stack([transform(x.image) for x in batch])
        if batch[0].text:
            text, pad = tok([x.text for x in batch])
        routed = forward_routing(
            model,
            image=None if image is None else image.to(device),
            text=None if text is None else text.to(device),
            text_padding_mask=None if pad is None else pad.to(device),
        )
        result.accumulator.add(routed.views, routed.grid_size)
        if image is not None:
            result.grid_size = routed.grid_size
            for i, disp in zip(idx, to_display(image, cfg.image_mean, cfg.image_std)):
                result.images[i] = disp
        texts = []
        if text is not None:
            for b, i in enumerate(idx):
                ids = text[b][~pad[b]].tolist()
                texts.append(TextResult(i, batch[b].text or "", split_words(ids, tok.decode, special)))
        for v in routed.views:
            result.num_experts[v.key] = v.num_experts
            result.num_heads[v.key] = v.num_heads
            if v.vision is not None and routed.grid_size is not None:
                first = patch_grid(v.vision, routed.grid_size)
                gates = patch_gates(v.vision, routed.grid_size)
                for b, i in enumerate(idx):
                    result.first.setdefault(v.key, {})[i] = first[b]
                    result.gates.setdefault(v.key, {})[i] = gates[b]
            if v.text is not None:
                for b, tr in enumerate(texts):
                    n = len(tr.pieces.pieces)
                    tr.first[v.key] = v.text.first_choice()[b, :n]
                    tr.gates[v.key] = v.text.gates[b, :n, :, 0]
                    tr.rows[v.key] = text_rows(v.text.slice(0, n), b, tr.pieces)
        result.texts += texts
    return result


def _sig(x: VizInput) -> tuple[bool, bool]:
    return (x.image is not None, bool(x.text))


def _safe_name(source: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(source.split(":")[-1]).stem)[:60] or "input"


def _write_json(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_text(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------- writing
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
            fig, _ = draw_assignment(result.images[i], result.first[key][i], result.majority(key, i), e, title=title)
            files.append(str(save_figure(fig, folder / f"{key}_experts.png")))
            fig, _ = draw_diversity(
                result.images[i], result.diversity(key, i), h, title=f"{result.label} {key}: sub-token diversity"
            )
            files.append(str(save_figure(fig, folder / f"{key}_diversity.png")))
    loads = result.accumulator.load()
    if loads:
        n = len(result.inputs)
        fig, _ = draw_load_heatmaps({result.label: loads}, title=f"expert load per layer over {n} input(s)")
        files.append(str(save_figure(fig, out / "load_heatmap.png")))
        fig, ratios = draw_activation_bars({result.label: loads}, threshold=threshold)
        files.append(str(save_figure(fig, out / "activation.png")))
        fig = draw_activation_summary(ratios, threshold=threshold)
        files.append(str(save_figure(fig, out / "activation_ratio.png")))
    if result.texts:
        md = [f"# Text routing: {result.label}", ""]
        for tr in result.texts:
            md += [f"## input {tr.input_index}: {tr.text!r}", ""]
            md += [markdown_table(key, rows) for key, rows in tr.rows.items()]
            if tr.first:
                e = max(result.num_experts[k] for k in tr.first)
                fig, _ = draw_text_routing(tr.first, tr.pieces, e, gates=tr.gates, title=f"{result.label}: {tr.text}")
                files.append(str(save_figure(fig, out / "text" / f"{tr.input_index:03d}_routing.png")))
        _write_text("\n".join(md), out / "text" / "routing.md")
        files.append(str(out / "text" / "routing.md"))
    data["files"] = [os.path.relpath(f, out) for f in files]
    _write_json(data, out / "experts.json")
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
    fig, _ = draw_load_heatmaps(loads, title="expert load per layer: " + " vs ".join(labels))
    files.append(save_figure(fig, out / "load_heatmap.png"))
    fig, ratios = draw_activation_bars(loads, threshold=threshold, title="expert activation: " + " vs ".join(labels))
    files.append(save_figure(fig, out / "activation.png"))
    files.append(save_figure(draw_activation_summary(ratios, threshold=threshold), out / "activation_ratio.png"))
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
            fig, _ = draw_map_grid(
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
            files.append(save_figure(fig, out / f"{name}_{'majority' if kind == 'expert' else 'diversity'}.png"))
    summary["files"] = [os.path.relpath(f, out) for f in files]
    _write_json(summary, out / "compare.json")
    return summary


def visualize(
    checkpoint: str,
    *,
    out: str | Path,
    image: str | Path | None = None,
    text: str | None = None,
    compare: str | None = None,
    labels: Sequence[str] | None = None,
    limit: int | None = 16,
    batch_size: int = 8,
    threshold: float = DEFAULT_THRESHOLD,
    seed: int = 0,
    layers: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The whole job of `mmoe-viz` as one call (also used by the demo).

    `checkpoint` (and `compare`) is one of our Lightning checkpoints, an mmoe model file, or a
    registered model name / YAML for a freshly initialized model. With `compare`, each model writes
    to `out/<label>/` and the side-by-side figures go to `out/compare/`; otherwise everything goes to
    `out/`. Returns {"reports": [experts.json per model], "compare": compare.json or None}.
    """
    specs = [checkpoint] + ([compare] if compare else [])
    if labels is not None and len(labels) != len(specs):
        raise ValueError(f"visualize: labels needs {len(specs)} names (one per model), got {list(labels)}")
    inputs = load_inputs(image, text=text, limit=limit)
    out = Path(out)
    results: list[ModelRouting] = []
    reports = []
    for n, spec in enumerate(specs):
        model, label = resolve_model(spec, seed=seed)
        if labels is not None:
            label = labels[n]
        elif n == 1 and label == results[0].label:
            label = f"{label}_2"
        result = collect_routing(model, inputs, label=label, source=spec, batch_size=batch_size)
        if not result.accumulator.layers:
            raise ValueError(f"visualize: {spec}: the model has no MoE layers (a dense model); nothing to draw")
        reports.append(write_report(result, out / label if compare else out, threshold=threshold, layers=layers))
        results.append(result)
    summary = write_comparison(results, out / "compare", threshold=threshold, layers=layers) if compare else None
    return {"reports": reports, "compare": summary}
