"""Optimizer and learning-rate schedule shared by every mmoe LightningModule (docs/interfaces.md section 7).

Why one module: pretraining ([B3] sec. 2.3) and every fine-tuning recipe ([B3] sec. 3, unilm beit3) use the
same recipe shape, AdamW with

- no weight decay on norms, biases and embeddings (1-D parameters, the backbone's ``no_weight_decay()``
  names and every ``nn.Embedding`` weight),
- layer-wise learning-rate decay ``lr * decay^(L + 1 - id)`` with id 0 for the embeddings, ``i + 1`` for
  block ``i`` and ``L + 1`` for the heads ([BEiT] layer decay, as [B3] fine-tunes). Layer ids come from
  ``backbone.group_matcher`` through timm's ``group_parameters`` (the rule timm's ``param_groups_layer_decay``
  uses), so the grouping rule lives in one place, the backbone. Heads sit outside the backbone here, so the
  top level (scale 1) is added for them explicitly,
- a larger learning rate for the task heads (``head_lr_mult``, e.g. x20 for the VQAv2 head, [B3] sec. 3.1),
- linear warm-up then cosine decay, stepped per optimizer step (``cosine_with_warmup``).

Every parameter group carries its absolute ``lr`` (already scaled) plus ``lr_scale`` and ``name`` (the
LearningRateMonitor label); a ``LambdaLR`` multiplies each group's initial lr by the same schedule factor.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from timm.models import group_parameters
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

_MERGE_WITH_PREVIOUS = 99999.0  # timm's MATCH_PREV_GROUP suffix

__all__ = [
    "OptimConfig",
    "param_groups",
    "build_optimizer",
    "cosine_with_warmup",
    "lr_factor",
    "no_decay_names",
    "numbered_layer_ids",
    "configure_optimizers",
]


def no_decay_names(backbone: nn.Module) -> set[str]:
    """Names (relative to ``backbone``) that get no weight decay besides 1-D tensors.

    The backbone's own ``no_weight_decay()`` (position embeddings, CLS token, mask token) plus the weight of every
    ``nn.Embedding`` (text token embedding), as in BEiT-3 pretraining: no decay on norms, biases and embeddings.
    """
    names: set[str] = set()
    nwd = getattr(backbone, "no_weight_decay", None)
    if callable(nwd):
        names.update(str(n) for n in nwd())
    for mod_name, mod in backbone.named_modules():
        if isinstance(mod, nn.Embedding):
            names.add(f"{mod_name}.weight" if mod_name else "weight")
    return names


def backbone_layer_ids(backbone: nn.Module) -> dict[str, int]:
    """Layer id per parameter name from ``backbone.group_matcher(coarse=False)``, with timm's grouping rules.

    Id 0 is the embeddings, ``i + 1`` block ``i`` ([BEiT] layer decay). As in timm's ``group_with_matcher``: groups are
    ordered by (group ordinal, numbers captured by the regex, suffix), a group tagged with the suffix ``(99999,)``
    (the final norm) joins the group before it, and unmatched parameters come last. Unlike timm, captured groups
    that are not numbers (``^(vision_embed|text_embed)``) are ignored instead of crashing the float conversion.
    A non-dict ``group_matcher`` goes through timm's public ``group_parameters``; a backbone without one is
    grouped by :func:`numbered_layer_ids`.
    """
    matcher = backbone.group_matcher(coarse=False) if hasattr(backbone, "group_matcher") else None
    if matcher is None:
        return numbered_layer_ids(backbone)
    if not isinstance(matcher, dict):
        return group_parameters(backbone, matcher, reverse=True)
    compiled: list[tuple[re.Pattern[str], int, tuple[float, ...]]] = []
    for ordinal, spec in enumerate(matcher.values()):
        if spec is None:
            continue
        for regex, suffix in spec if isinstance(spec, list | tuple) else [(spec, None)]:
            compiled.append((re.compile(regex), ordinal, tuple(float(x) for x in (suffix or ()))))
    keys: dict[str, tuple[float, ...]] = {}
    for name, _ in backbone.named_parameters():
        key: tuple[float, ...] = (math.inf,)
        for regex, ordinal, suffix in compiled:
            m = regex.match(name)
            if m:
                nums = tuple(float(g) for g in m.groups() if g is not None and g.isdigit())
                key = (float(ordinal), *nums, *suffix)
                break
        keys[name] = key
    ids: dict[tuple[float, ...], int] = {}
    lid = -1
    for k in sorted(set(keys.values())):
        if lid < 0 or k[-1] != _MERGE_WITH_PREVIOUS:
            lid += 1
        ids[k] = lid
    return {name: ids[k] for name, k in keys.items()}


_NUMBERED = re.compile(r"(?:^|\.)(\d+)\.")


def numbered_layer_ids(backbone: nn.Module) -> dict[str, int]:
    """Layer ids for a backbone without ``group_matcher``, from the first numbered module in each name.

    The same layout as our own matcher: a parameter under ``<...>.<i>.`` (block ``i`` of a ModuleList or
    Sequential) gets id ``i + 1``; parameters named before the first numbered one (embeddings) get 0, those
    after it that carry no number (a final norm) join the highest block. A backbone with no numbered modules is
    one group (id 0): layer decay then only separates it from the heads.
    """
    ids: dict[str, int] = {}
    unnumbered_after: list[str] = []
    top = None
    for name, _ in backbone.named_parameters():
        m = _NUMBERED.search(name)
        if m:
            ids[name] = int(m.group(1)) + 1
            top = max(top or 0, ids[name])
        elif top is None:
            ids[name] = 0
        else:
            unnumbered_after.append(name)
    ids.update(dict.fromkeys(unnumbered_after, top or 0))
    return ids


def _check_positive(name: str, value: float, *, allow_zero: bool = True) -> None:
    if not (value > 0 or (allow_zero and value == 0)) or not math.isfinite(value):
        raise ValueError(f"mmoe.train.optim: argument {name}={value!r} must be a finite number >= 0")


def param_groups(
    module: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    layer_decay: float = 1.0,
    head_lr_mult: float = 1.0,
    backbone_attr: str = "backbone",
    stem_lr_mult: float = 1.0,
) -> list[dict[str, Any]]:
    """Split ``module``'s trainable parameters into AdamW groups (docs/interfaces.md section 7).

    The backbone (``getattr(module, backbone_attr)``) is grouped by layer id from ``backbone.group_matcher``
    (layer-wise lr decay ``decay^(top - id)``; ``layer_decay=1`` disables it). Everything else in
    ``module`` (heads, MIM/MLM predictors) is a head: lr ``lr * head_lr_mult``, decay on >= 2-D weights only.
    Parameters shared between the backbone and a head (tied embeddings) are optimized once, as backbone
    parameters. ``stem_lr_mult`` scales the lr of the conv patch stem (``vision_embed.patch_embed``), a
    BatchNorm CNN whose best lr need not be the Transformer's (docs/results/learning.md). Returns a list of
    dicts with ``params``, ``lr``, ``weight_decay``, ``lr_scale`` and ``name`` (the LearningRateMonitor label).
    """
    _check_positive("lr", lr)
    _check_positive("weight_decay", weight_decay)
    _check_positive("layer_decay", layer_decay, allow_zero=False)
    _check_positive("head_lr_mult", head_lr_mult)
    _check_positive("stem_lr_mult", stem_lr_mult, allow_zero=False)
    if layer_decay > 1.0:
        raise ValueError(f"mmoe.train.optim: argument layer_decay={layer_decay} must be in (0, 1]")
    backbone = getattr(module, backbone_attr, None)
    groups: list[dict[str, Any]] = []
    seen: set[int] = set()
    if isinstance(backbone, nn.Module):
        layer_id = backbone_layer_ids(backbone)
        top = max(layer_id.values(), default=0) + 1  # the heads' level: scale 1
        nwd = no_decay_names(backbone)
        by_key: dict[tuple[int, bool, bool], list[nn.Parameter]] = {}
        for name, p in backbone.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            decay = p.ndim > 1 and not any(fnmatch.fnmatch(name, pat) for pat in nwd)
            stem = stem_lr_mult != 1.0 and name.startswith("vision_embed.patch_embed.")
            by_key.setdefault((layer_id.get(name, top - 1), decay, stem), []).append(p)
        for (lid, decay, stem), params in sorted(by_key.items()):
            scale = layer_decay ** (top - lid) * (stem_lr_mult if stem else 1.0)
            label = f"{backbone_attr}.{'stem' if stem else f'layer{lid}'}_{'decay' if decay else 'no_decay'}"
            groups.append(
                {
                    "params": params,
                    "lr": lr * scale,
                    "weight_decay": weight_decay if decay else 0.0,
                    "lr_scale": scale,
                    "name": label,
                }
            )
    elif backbone is not None:
        raise TypeError(
            f"mmoe.train.optim: {type(module).__name__}.{backbone_attr} is a {type(backbone).__name__}, expected an "
            "nn.Module (the MultiwayTransformer backbone)"
        )
    head_decay: list[nn.Parameter] = []
    head_no_decay: list[nn.Parameter] = []
    prefix = f"{backbone_attr}."
    for name, p in module.named_parameters():
        if not p.requires_grad or id(p) in seen or name.startswith(prefix):
            continue
        seen.add(id(p))
        (head_no_decay if p.ndim <= 1 else head_decay).append(p)
    head_lr = lr * head_lr_mult
    if head_decay:
        groups.append(
            {
                "params": head_decay,
                "lr": head_lr,
                "weight_decay": weight_decay,
                "lr_scale": head_lr_mult,
                "name": "head_decay",
            }
        )
    if head_no_decay:
        groups.append(
            {
                "params": head_no_decay,
                "lr": head_lr,
                "weight_decay": 0.0,
                "lr_scale": head_lr_mult,
                "name": "head_no_decay",
            }
        )
    if not groups:
        raise ValueError(f"mmoe.train.optim: {type(module).__name__} has no trainable parameters to optimize")
    return groups


def build_optimizer(
    module: nn.Module,
    *,
    lr: float,
    weight_decay: float = 0.05,
    betas: Iterable[float] = (0.9, 0.98),
    eps: float = 1e-6,
    layer_decay: float = 1.0,
    head_lr_mult: float = 1.0,
    backbone_attr: str = "backbone",
    stem_lr_mult: float = 1.0,
    fused: bool = False,
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; defaults are the [B3]/[MH1] pretraining betas and eps ([B3] sec. 2.3).

    ``fused=True`` takes torch's one-kernel AdamW (CPU and CUDA): the same update, without a pass over memory per
    element-wise op. On the tiny model, whose 6.3M-row word embedding is most of its parameters, the optimizer is
    ~15% of a CPU step and the fused kernel saves most of it (docs/results/learning.md).
    """
    b = tuple(float(x) for x in betas)
    if len(b) != 2 or not all(0.0 <= x < 1.0 for x in b):
        raise ValueError(f"mmoe.train.optim: argument betas={tuple(betas)!r} must be two numbers in [0, 1)")
    _check_positive("eps", eps, allow_zero=False)
    groups = param_groups(
        module,
        lr=lr,
        weight_decay=weight_decay,
        layer_decay=layer_decay,
        head_lr_mult=head_lr_mult,
        backbone_attr=backbone_attr,
        stem_lr_mult=stem_lr_mult,
    )
    return torch.optim.AdamW(
        groups, lr=lr, betas=(b[0], b[1]), eps=eps, weight_decay=weight_decay, fused=True if fused else None
    )


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Schedule factor at optimizer step ``step`` (0-based): linear warm-up to 1, then cosine to ``min_lr_ratio``.

    Warm-up reaches the peak at step ``warmup_steps - 1`` (the first step already trains at ``1/warmup``
    of the peak rather than at 0); after ``total_steps`` the factor stays at ``min_lr_ratio``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> LambdaLR:
    """``LambdaLR`` applying :func:`lr_factor`; call ``scheduler.step()`` once per optimizer step ([B3] recipe)."""
    if warmup_steps < 0:
        raise ValueError(f"mmoe.train.optim: argument warmup_steps={warmup_steps} must be >= 0")
    if total_steps < 1:
        raise ValueError(f"mmoe.train.optim: argument total_steps={total_steps} must be >= 1")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"mmoe.train.optim: argument min_lr_ratio={min_lr_ratio} must be in [0, 1]")

    def factor(step: int) -> float:
        return lr_factor(step, warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=min_lr_ratio)

    return LambdaLR(optimizer, factor)


@dataclass(kw_only=True)
class OptimConfig:
    """The optimizer + schedule keys of a recipe (``model.init_args.optim`` in YAML).

    Defaults are the BEiT-3 pretraining recipe ([B3] sec. 2.3: AdamW (0.9, 0.98), eps 1e-6, peak lr 1e-3, weight
    decay 0.05). ``total_steps=None`` takes ``trainer.estimated_stepping_batches`` (i.e. ``max_steps``).
    ``grad_clip`` is not here: gradient clipping is the Trainer's ``gradient_clip_val``.
    """

    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    layer_decay: float = 1.0
    head_lr_mult: float = 1.0
    stem_lr_mult: float = 1.0
    fused: bool = False
    warmup_steps: int = 0
    total_steps: int | None = None
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        _check_positive("optim.lr", self.lr)
        _check_positive("optim.weight_decay", self.weight_decay)
        if not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"optim.layer_decay={self.layer_decay} must be in (0, 1]")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        if self.total_steps is not None and self.total_steps < 1:
            raise ValueError(f"optim.total_steps={self.total_steps} must be >= 1 or null")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")


def configure_optimizers(
    module: nn.Module, cfg: OptimConfig | dict[str, Any], *, backbone_attr: str = "backbone"
) -> dict[str, Any]:
    """What a LightningModule's ``configure_optimizers`` returns: AdamW + per-step warm-up/cosine schedule.

    ``cfg`` may be an :class:`OptimConfig` or a plain dict of its keys. The schedule length is ``cfg.total_steps``
    or, when that is ``None``, ``module.trainer.estimated_stepping_batches`` (``max_steps`` for our iterable
    pretraining data).
    """
    if isinstance(cfg, dict):
        cfg = OptimConfig(**cfg)
    total = cfg.total_steps
    if total is None:
        trainer = getattr(module, "_trainer", None)
        est = getattr(trainer, "estimated_stepping_batches", None) if trainer is not None else None
        if est is None or not math.isfinite(float(est)) or est < 1:
            raise ValueError(
                "mmoe.train.optim: optim.total_steps is null and the trainer's length is unknown "
                f"(estimated_stepping_batches={est!r}); set trainer.max_steps or optim.total_steps"
            )
        total = int(est)
    optimizer = build_optimizer(
        module,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        betas=cfg.betas,
        eps=cfg.eps,
        layer_decay=cfg.layer_decay,
        head_lr_mult=cfg.head_lr_mult,
        backbone_attr=backbone_attr,
        stem_lr_mult=cfg.stem_lr_mult,
        fused=cfg.fused,
    )
    scheduler = cosine_with_warmup(
        optimizer, warmup_steps=cfg.warmup_steps, total_steps=total, min_lr_ratio=cfg.min_lr_ratio
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}
