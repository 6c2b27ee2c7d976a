"""Typed, keyword-only configuration of the Multiway Transformer backbone.

`MultiwayConfig` describes a BEiT-3-style Multiway Transformer ([B3] sec. 2.1);
`MoEConfig` (optional, nested) turns every `every`-th FFN into a (multi-head) mixture-of-experts
layer ([MH1] sec. 3, [MH2] sec. 2). Dense, SMoE, X-MoE and MH-MoE are therefore config choices,
not separate classes. Both dataclasses check themselves in `__post_init__` and round-trip through
plain dicts / YAML (`to_dict`, `from_dict`, `to_yaml`, `from_yaml`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from mmoe.files import atomic_write_text

AttentionKind = Literal["decoupled", "shared"]
AttnImpl = Literal["sdpa", "manual"]
PatchEmbedKind = Literal["linear", "conv"]
PosEmbedInit = Literal["normal", "sincos"]
RouterKind = Literal["linear", "xmoe"]
ExpertActivation = Literal["gelu", "swiglu"]
PoolKind = Literal["shared", "per_modality"]
TokenizerKind = Literal["openclip", "sentencepiece"]
GlobalPool = Literal["token", "avg"]
MODALITY_SETS: tuple[tuple[str, ...], ...] = (("vision", "text"), ("vision",))


def _check_literal(owner: str, name: str, value: Any, kind: Any) -> None:
    allowed = get_args(kind)
    if value not in allowed:
        raise ValueError(f"{owner}.{name}: expected one of {list(allowed)}, got {value!r}")


def _check_positive(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{owner}.{name}: expected a positive int, got {value!r}")


def _check_fraction(owner: str, name: str, value: float) -> None:
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{owner}.{name}: expected a value in [0, 1), got {value!r}")


def check_vit_sizes(owner: str, cfg: Any) -> None:
    """Checks every ViT-like config shares (this backbone's, the VQ-KD tokenizer's); normalizes mean/std to tuples.

    Positive `img_size`, `patch_size`, `in_chans`, `dim`, `depth`, `num_heads`, `ffn_dim`; `dim` divisible by
    `num_heads`, `img_size` by `patch_size`; `image_mean`/`image_std` one float per input channel.
    """
    for name in ("img_size", "patch_size", "in_chans", "dim", "depth", "num_heads", "ffn_dim"):
        _check_positive(owner, name, getattr(cfg, name))
    if cfg.dim % cfg.num_heads:
        raise ValueError(f"{owner}.num_heads: dim {cfg.dim} is not divisible by num_heads {cfg.num_heads}")
    if cfg.img_size % cfg.patch_size:
        raise ValueError(f"{owner}.img_size: {cfg.img_size} is not divisible by patch_size {cfg.patch_size}")
    cfg.image_mean = tuple(float(v) for v in cfg.image_mean)
    cfg.image_std = tuple(float(v) for v in cfg.image_std)
    if len(cfg.image_mean) != cfg.in_chans or len(cfg.image_std) != cfg.in_chans:
        raise ValueError(
            f"{owner}.image_mean/image_std: expected {cfg.in_chans} values each, got "
            f"{len(cfg.image_mean)} and {len(cfg.image_std)}"
        )


@dataclass(kw_only=True)
class MoEConfig:
    """Mixture-of-experts settings of the FFN in every `every`-th block.

    Mirrors the constructor of `mmoe.moe.MHMoE` (docs/interfaces.md section 1). `num_heads=1` with
    `head_layers=merge_layers=0` is a plain sparse MoE (SMoE); `router="xmoe"` gives X-MoE [XM];
    `num_heads>1` with head/merge layers is MH-MoE ([MH1] sec. 3.2). `pool="shared"` routes vision
    and text tokens to one expert pool; `"per_modality"` keeps one pool per modality (multiway).
    `expert_inner_norm` gives every expert BEiT-3's FFN sub-LN (set by sparse upcycling so expert copies
    equal the dense FFN). `extra` is forwarded verbatim to `MHMoE` for options this dataclass does not name
    (e.g. `xmoe_dim`, `split`, `expert_impl`).
    """

    num_experts: int
    expert_hidden: int
    top_k: int = 1
    num_heads: int = 1
    every: int = 2
    router: RouterKind = "linear"
    activation: ExpertActivation = "gelu"
    capacity_factor: float | None = None
    head_layers: int = 0
    merge_layers: int = 0
    renormalize_gates: bool = False
    expert_inner_norm: bool = False
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.0
    pool: PoolKind = "shared"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("num_experts", "expert_hidden", "top_k", "num_heads", "every"):
            _check_positive("MoEConfig", name, getattr(self, name))
        if self.top_k > self.num_experts:
            raise ValueError(f"MoEConfig.top_k: expected <= num_experts ({self.num_experts}), got {self.top_k}")
        _check_literal("MoEConfig", "router", self.router, RouterKind)
        _check_literal("MoEConfig", "activation", self.activation, ExpertActivation)
        _check_literal("MoEConfig", "pool", self.pool, PoolKind)
        for name in ("head_layers", "merge_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"MoEConfig.{name}: expected an int >= 0, got {value!r}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"MoEConfig.capacity_factor: expected None or > 0, got {self.capacity_factor!r}")
        if not isinstance(self.extra, dict):
            raise ValueError(f"MoEConfig.extra: expected a dict, got {type(self.extra).__name__}")

    def is_moe_layer(self, index: int) -> bool:
        """Layer `index` (0-based) is MoE when (index + 1) % every == 0, as torchscale's `moe_freq`."""
        return (index + 1) % self.every == 0


@dataclass(kw_only=True)
class MultiwayConfig:
    """Architecture of the Multiway Transformer backbone ([B3] sec. 2.1 and its released code).

    Sizes: `dim`, `depth`, `num_heads` (attention heads), `ffn_dim`. Vision: `img_size`, `patch_size`,
    `patch_embed` ("linear": BEiT-3's patchify; "conv": the convolutional stem of Xiao et al. 2021, mmoe.model.embed);
    `stem_blocks` extra 3x3 stride-1 conv blocks at the patch resolution at the end of the conv stem (each widens
    a token's view by 2p pixels: 2 blocks let a 64-px world's token see its whole object); `stem_width` the first
    conv's channels (doubling up to `dim`; default dim / 2^(log2(p) - 1)); `stem_shortcut` adds a linear p x p
    patchify to the conv stem's tokens, so each token's colour reaches the blocks even where the conv path has
    learned to ignore it; `pos_embed_init` starts the learned
    patch positions as BEiT-3 does ("normal", std `init_std`) or at a 2-D sine-cosine table times
    `pos_embed_scale` ("sincos", as MAE's fixed table; here still learned): at std 0.02 the positions are ~20x
    weaker than a conv stem's patch features, and "where is" questions stay at their prior for thousands of steps
    (docs/results/learning.md);
    text: `vocab_size`, `max_text_len` (usable text positions; BEiT-3's fairseq tables have two more
    unused rows, dropped on import). `attention="decoupled"` gives per-modality q/k/v/out and norms as in
    the released BEiT-3; `"shared"` shares the attention sublayer as in the paper. `subln` is Magneto's
    sub-LN. `qk_norm` normalises each head's queries and keys (ViT-22B; off in BEiT-3): a small model trained
    from scratch learns where to attend much sooner (docs/results/learning.md). `vlffn_layers` adds the
    paper's vision-language FFN to the top layers of a dense model.
    Tokenizer fields describe what the text ids mean (docs/interfaces.md section 3). `num_classes` (0 = none)
    and `global_pool` ("token": the CLS feature, "avg": the mean patch feature) describe the optional image
    classifier of timm's backbone contract (`reset_classifier`, `forward_head`); the task modules keep their
    own heads and leave it at 0.

    `modalities=("vision",)` builds a vision-only backbone: no text embedding, no text halves of the multiway
    norms/attention/FFNs (nor the VL-FFN, which only runs on image-text sequences), only the vision expert of
    per-modality MoE pools. A vision-only task (ImageNet, detection) then has no parameter that never gets a
    gradient, which plain DDP refuses; the vision parameters keep their names, so a full checkpoint loads
    into it with its text tensors skipped (`mmoe.model.io.load_backbone_weights`).
    """

    img_size: int = 224
    patch_size: int = 16
    patch_embed: PatchEmbedKind = "linear"
    stem_blocks: int = 0
    stem_width: int | None = None
    stem_shortcut: bool = False
    pos_embed_init: PosEmbedInit = "normal"
    pos_embed_scale: float = 1.0
    in_chans: int = 3
    dim: int = 768
    depth: int = 12
    num_heads: int = 12
    ffn_dim: int = 3072
    vocab_size: int = 49410
    max_text_len: int = 64
    attention: AttentionKind = "decoupled"
    attn_impl: AttnImpl = "sdpa"
    subln: bool = True
    qkv_bias: bool = True
    qk_norm: bool = False
    layernorm_eps: float = 1e-5
    final_norm: bool = True
    drop_path: float = 0.0
    dropout: float = 0.0
    attn_dropout: float = 0.0
    vlffn_layers: int = 0
    init_std: float = 0.02
    grad_checkpointing: bool = False
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    tokenizer: TokenizerKind = "openclip"
    tokenizer_path: str | None = None
    pad_id: int = 49408
    mask_id: int = 49409
    modalities: tuple[str, ...] = ("vision", "text")
    num_classes: int = 0
    global_pool: GlobalPool = "token"
    moe: MoEConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        check_vit_sizes("MultiwayConfig", self)
        _check_positive("MultiwayConfig", "vocab_size", self.vocab_size)
        _check_positive("MultiwayConfig", "max_text_len", self.max_text_len)
        _check_literal("MultiwayConfig", "attention", self.attention, AttentionKind)
        _check_literal("MultiwayConfig", "attn_impl", self.attn_impl, AttnImpl)
        _check_literal("MultiwayConfig", "patch_embed", self.patch_embed, PatchEmbedKind)
        _check_literal("MultiwayConfig", "pos_embed_init", self.pos_embed_init, PosEmbedInit)
        if not isinstance(self.pos_embed_scale, (int, float)) or not self.pos_embed_scale > 0:
            raise ValueError(f"MultiwayConfig.pos_embed_scale: expected a number > 0, got {self.pos_embed_scale!r}")
        if self.pos_embed_scale != 1.0 and self.pos_embed_init != "sincos":
            raise ValueError("MultiwayConfig.pos_embed_scale: scales the 'sincos' table; set pos_embed_init: sincos")
        if self.patch_embed == "conv" and (self.patch_size < 2 or self.patch_size & (self.patch_size - 1)):
            raise ValueError(
                f"MultiwayConfig.patch_size: patch_embed='conv' needs a power of 2 >= 2, got {self.patch_size}"
            )
        if not isinstance(self.stem_blocks, int) or self.stem_blocks < 0:
            raise ValueError(f"MultiwayConfig.stem_blocks: expected an int >= 0, got {self.stem_blocks!r}")
        if self.stem_width is not None and (not isinstance(self.stem_width, int) or self.stem_width < 1):
            raise ValueError(f"MultiwayConfig.stem_width: expected a positive int or null, got {self.stem_width!r}")
        if (self.stem_blocks or self.stem_width is not None or self.stem_shortcut) and self.patch_embed != "conv":
            raise ValueError(
                "MultiwayConfig.stem_blocks/stem_width/stem_shortcut: a stem setting needs patch_embed='conv'"
            )
        _check_literal("MultiwayConfig", "tokenizer", self.tokenizer, TokenizerKind)
        _check_literal("MultiwayConfig", "global_pool", self.global_pool, GlobalPool)
        if not isinstance(self.num_classes, int) or isinstance(self.num_classes, bool) or self.num_classes < 0:
            raise ValueError(
                f"MultiwayConfig.num_classes: expected an int >= 0 (0 = no classifier), got {self.num_classes!r}"
            )
        _check_fraction("MultiwayConfig", "drop_path", self.drop_path)
        _check_fraction("MultiwayConfig", "dropout", self.dropout)
        _check_fraction("MultiwayConfig", "attn_dropout", self.attn_dropout)
        if not isinstance(self.vlffn_layers, int) or not 0 <= self.vlffn_layers <= self.depth:
            raise ValueError(
                f"MultiwayConfig.vlffn_layers: expected an int in [0, depth={self.depth}], got {self.vlffn_layers!r}"
            )
        if self.vlffn_layers and self.moe is not None:
            raise ValueError("MultiwayConfig.vlffn_layers: the VL-FFN is for dense models; set it to 0 when moe is set")
        for name in ("pad_id", "mask_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ValueError(
                    f"MultiwayConfig.{name}: expected an id in [0, vocab_size={self.vocab_size}), got {value!r}"
                )
        if isinstance(self.modalities, str):
            self.modalities = (self.modalities,)
        self.modalities = tuple(str(m) for m in self.modalities)
        if self.modalities not in MODALITY_SETS:
            raise ValueError(
                f"MultiwayConfig.modalities: expected one of {[list(m) for m in MODALITY_SETS]}, got "
                f"{list(self.modalities)}"
            )
        if self.tokenizer == "sentencepiece" and not self.tokenizer_path:
            raise ValueError("MultiwayConfig.tokenizer_path: required when tokenizer='sentencepiece'")
        if self.moe is not None and not isinstance(self.moe, MoEConfig):
            raise ValueError(f"MultiwayConfig.moe: expected None, a dict or a MoEConfig, got {type(self.moe).__name__}")
        if self.moe is not None and self.dim % self.moe.num_heads:
            raise ValueError(f"MoEConfig.num_heads: dim {self.dim} is not divisible by MoE heads {self.moe.num_heads}")

    # ------------------------------------------------------------------ derived values
    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid of the configured (square) image size."""
        return self.img_size // self.patch_size, self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid_size
        return gh * gw

    @property
    def has_text(self) -> bool:
        """Whether the text branch (embedding, text halves of the multiway modules) is built."""
        return "text" in self.modalities

    def is_moe_layer(self, index: int) -> bool:
        return self.moe is not None and self.moe.is_moe_layer(index)

    def has_vlffn(self, index: int) -> bool:
        """The paper's VL-FFN sits in the top `vlffn_layers` blocks ([B3] sec. 2.1)."""
        return index >= self.depth - self.vlffn_layers

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["image_mean"] = list(self.image_mean)
        out["image_std"] = list(self.image_std)
        out["modalities"] = list(self.modalities)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> MultiwayConfig:
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a mapping of MultiwayConfig fields, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown MultiwayConfig keys {unknown}; expected a subset of {sorted(known)}")
        data = dict(data)
        moe = data.get("moe")
        if isinstance(moe, dict):
            moe_known = {f.name for f in dataclasses.fields(MoEConfig)}
            bad = sorted(set(moe) - moe_known)
            if bad:
                raise ValueError(f"{source}: unknown MoEConfig keys {bad}; expected a subset of {sorted(moe_known)}")
            data["moe"] = MoEConfig(**moe)
        return cls(**data)

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            atomic_write_text(path, text)
        return text

    @classmethod
    def from_yaml(cls, path: str | Path) -> MultiwayConfig:
        path = Path(path)
        data = yaml.safe_load(path.read_text())
        return cls.from_dict(data or {}, source=str(path))

    def replace(self, **overrides: Any) -> MultiwayConfig:
        """A copy with `overrides` applied; `moe={...}` merges into the current MoE settings, `moe=None` drops them."""
        data = self.to_dict()
        for key, value in overrides.items():
            if key == "moe" and isinstance(value, dict) and data.get("moe") is not None:
                merged = dict(data["moe"])
                merged.update(value)
                data["moe"] = merged
            elif key == "moe" and isinstance(value, MoEConfig):
                data["moe"] = dataclasses.asdict(value)
            else:
                data[key] = value
        return MultiwayConfig.from_dict(data, source="overrides")
