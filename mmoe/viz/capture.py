"""Run a model over the inputs and keep its routing: the forward half of `mmoe-viz` and the callback.

`resolve_model` turns a path or a name into a model (one of our Lightning checkpoints, an mmoe model file,
a registered name or model YAML for a freshly initialized model), `forward_routing` runs the backbone once
with routing records (docs/interfaces.md sec. 2) and splits them per modality, and `collect_routing` does
that over all inputs in batches, keeping per input what the pictures need (`ModelRouting`). The numbers
are reduced by `mmoe.viz.records` (that is, by `mmoe.moe.stats`); `mmoe.viz.report` draws and writes them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmoe.viz.inputs import VizInput
from mmoe.viz.records import (
    LayerView,
    RoutingAccumulator,
    diversity,
    majority_expert,
    patch_routing,
    split_routing,
)
from mmoe.viz.text import TokenPieces, split_words, text_rows

__all__ = [
    "ModelRouting",
    "RoutedBatch",
    "TextResult",
    "collect_routing",
    "forward_routing",
    "image_transform",
    "model_tokenizer",
    "resolve_model",
    "to_display",
]


def resolve_model(spec: str, *, seed: int = 0) -> tuple[torch.nn.Module, str]:
    """A model from a path (mmoe model file, `save_pretrained` folder, one of our Lightning checkpoints) or a name.

    Both go through `mmoe.model.create_model`, the one backbone builder: a file rebuilds its own configuration
    (`init_from`), a registered name (or a model YAML) gives a freshly initialized model seeded with `seed`.
    Returns the model in eval mode and a short label for titles and folder names.
    """
    from mmoe.model import create_model, list_models

    p = Path(spec)
    if p.is_dir() and (p / "config.json").is_file():  # a save_pretrained folder
        model, label = create_model(None, init_from=str(p)), p.name
    elif p.is_file() and p.suffix not in (".yaml", ".yml"):
        model = create_model(None, init_from=str(p))  # the checkpoint's own configuration
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
        return tokenizer_from_spec(dict(spec), max_len=max_len)
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


@dataclass
class TextResult:
    """One input's text: its real tokens and, per routing key, their first choices, gates and table rows."""

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
    topk_experts: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)  # key -> input -> (gh, gw, h, K)
    topk_gates: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)
    texts: list[TextResult] = field(default_factory=list)
    num_experts: dict[str, int] = field(default_factory=dict)
    num_heads: dict[str, int] = field(default_factory=dict)

    def majority(self, key: str, i: int) -> np.ndarray:
        return majority_expert(self.first[key][i], self.gates[key][i])

    def diversity(self, key: str, i: int) -> np.ndarray:
        return diversity(self.first[key][i])


def collect_routing(
    model: torch.nn.Module,
    inputs: Sequence[VizInput],
    *,
    label: str,
    source: str = "",
    batch_size: int = 8,
    progress: Callable[[int], object] | None = None,
) -> ModelRouting:
    """Run `model` over `inputs` in batches (inputs with and without text never share a batch).

    `progress`, when given, is called with the number of inputs each finished batch covered (a progress bar's
    advance; the library itself prints nothing).
    """
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
                ids, gates = patch_routing(v.vision, routed.grid_size)
                for b, i in enumerate(idx):
                    result.first.setdefault(v.key, {})[i] = ids[b, ..., 0]
                    result.gates.setdefault(v.key, {})[i] = gates[b, ..., 0]
                    result.topk_experts.setdefault(v.key, {})[i] = ids[b]
                    result.topk_gates.setdefault(v.key, {})[i] = gates[b]
            if v.text is not None:
                for b, tr in enumerate(texts):
                    n = len(tr.pieces.pieces)
                    tr.first[v.key] = v.text.first_choice()[b, :n]
                    tr.gates[v.key] = v.text.gates[b, :n, :, 0]
                    tr.rows[v.key] = text_rows(v.text.slice(0, n), b, tr.pieces)
        result.texts += texts
        if progress is not None:
            progress(len(idx))
    return result


def _sig(x: VizInput) -> tuple[bool, bool]:
    return (x.image is not None, bool(x.text))
