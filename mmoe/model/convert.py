"""Weight import: released BEiT-3 (torchscale `BEiT3`) and timm ViT checkpoints into `MultiwayTransformer`.

Converters and weight metadata live apart from the architecture (docs/interfaces.md section 2). Name mapping for BEiT-3
(docs/references.md [B3]; torchscale `BEiT3`, `Encoder`, `MultiheadAttention`, `FeedForwardNetwork`):

    text_embed.weight                                  -> text_embed.token_embed.weight
    vision_embed.proj.*                                -> vision_embed.patch_embed.proj.*
    vision_embed.{cls_token,mask_token}                -> vision_embed.{cls_token,mask_token}
    encoder.embed_positions.A.weight  (2 + 1 + P, D)   -> vision_embed.pos_embed (1, 1 + P, D)  (rows 0, 1 dropped)
    encoder.embed_positions.B.weight  (2 + T, D)       -> text_embed.pos_embed   (1, T, D)
    encoder.layers.i.self_attn.{q,k,v,out}_proj.{A,B}  -> blocks.i.attn.{q,k,v,out}_proj.{vision,text}
    encoder.layers.i.self_attn.inner_attn_ln.{A,B}     -> blocks.i.attn.inner_norm.{vision,text}
    encoder.layers.i.self_attn_layer_norm.{A,B}        -> blocks.i.norm1.{vision,text}
    encoder.layers.i.ffn.{A,B}.{fc1,fc2,ffn_layernorm} -> blocks.i.ffn.{vision,text}.{fc1,fc2,ffn_norm}
    encoder.layers.i.final_layer_norm.{A,B}            -> blocks.i.norm2.{vision,text}
    encoder.layer_norm.{A,B}                           -> norm.{vision,text}

The unilm fine-tuning wrappers keep the backbone under `beit3.` (and the state dict under "model"); both are
accepted, and weights outside the backbone (task heads) are reported, not loaded.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from mmoe.model.config import MultiwayConfig
from mmoe.model.registry import get_config

BEIT3_PREFIXES = ("beit3.", "module.beit3.", "module.", "backbone.")
_AB = {"A": "vision", "B": "text"}

_LAYER_RULES: list[tuple[str, str]] = [
    (r"self_attn\.(q|k|v|out)_proj\.(A|B)\.(weight|bias)", "attn.{0}_proj.{1}.{2}"),
    (r"self_attn\.inner_attn_ln\.(A|B)\.(weight|bias)", "attn.inner_norm.{0}.{1}"),
    (r"self_attn_layer_norm\.(A|B)\.(weight|bias)", "norm1.{0}.{1}"),
    (r"ffn\.(A|B)\.(fc1|fc2)\.(weight|bias)", "ffn.{0}.{1}.{2}"),
    (r"ffn\.(A|B)\.ffn_layernorm\.(weight|bias)", "ffn.{0}.ffn_norm.{1}"),
    (r"final_layer_norm\.(A|B)\.(weight|bias)", "norm2.{0}.{1}"),
]


def unwrap_state_dict(obj: Any, *, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The bare state dict of a checkpoint: under "model", "state_dict" or "module", or the dict itself."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "module"):
            if key in obj and isinstance(obj[key], dict):
                return unwrap_state_dict(obj[key], source=f"{source}[{key!r}]")
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise ValueError(f"{source}: expected a state dict (name -> tensor), bare or under 'model'/'state_dict'")


def strip_beit3_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep the backbone keys of a (possibly wrapped) BEiT-3 state dict without their wrapper prefix."""
    for prefix in BEIT3_PREFIXES:
        if any(k.startswith(prefix + "encoder.") for k in state):
            return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


def _map_beit3_key(key: str) -> str | None:
    if key == "text_embed.weight":
        return "text_embed.token_embed.weight"
    if key.startswith("vision_embed.proj."):
        return "vision_embed.patch_embed.proj." + key[len("vision_embed.proj.") :]
    if key in ("vision_embed.cls_token", "vision_embed.mask_token"):
        return key
    if key == "encoder.embed_positions.A.weight":
        return "vision_embed.pos_embed"
    if key == "encoder.embed_positions.B.weight":
        return "text_embed.pos_embed"
    m = re.fullmatch(r"encoder\.layer_norm\.(A|B)\.(weight|bias)", key)
    if m:
        return f"norm.{_AB[m.group(1)]}.{m.group(2)}"
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", key)
    if m:
        layer, rest = m.group(1), m.group(2)
        for pattern, template in _LAYER_RULES:
            mm = re.fullmatch(pattern, rest)
            if mm:
                groups = [_AB.get(g, g) for g in mm.groups()]
                return f"blocks.{layer}." + template.format(*groups)
    return None


def convert_beit3_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map a torchscale/unilm BEiT-3 state dict to ours; returns (converted, keys left unused)."""
    state = strip_beit3_prefix(unwrap_state_dict(state))
    out: dict[str, torch.Tensor] = {}
    unused: list[str] = []
    for key, value in state.items():
        new = _map_beit3_key(key)
        if new is None:
            unused.append(key)
            continue
        if new in ("vision_embed.pos_embed", "text_embed.pos_embed"):
            value = value[2:].unsqueeze(0)  # fairseq legacy: positions start at index 2
        out[new] = value
    return out, unused


def beit3_config_from_state_dict(
    state: dict[str, torch.Tensor],
    *,
    model: str | MultiwayConfig | None = None,
    num_heads: int | None = None,
    tokenizer_path: str | None = None,
    pad_id: int | None = None,
    mask_id: int | None = None,
) -> MultiwayConfig:
    """Infer a `MultiwayConfig` from BEiT-3 weights (bare torchscale names, prefix stripped).

    Sizes come from the tensors; the number of attention heads cannot, so it comes from `model` (a
    registered name or config) or `num_heads`, else BEiT-3's head width 64 is assumed (dim // 64).
    Vocabulary, text length and image size always follow the checkpoint. A vocabulary other than open_clip's
    49410 needs the sentencepiece file it was built with (`tokenizer_path`, e.g. `beit3.spm`); its pad id is 1
    and its mask id the first id after the pieces (fairseq/XLM-R layout, mmoe.data.tokenizer).
    """
    state = strip_beit3_prefix(unwrap_state_dict(state))
    try:
        vocab, dim = state["text_embed.weight"].shape
        patch_w = state["vision_embed.proj.weight"]
        vis_pos = state["encoder.embed_positions.A.weight"].shape[0]
        txt_pos = state["encoder.embed_positions.B.weight"].shape[0]
        ffn_dim = state["encoder.layers.0.ffn.A.fc1.weight"].shape[0]
    except KeyError as err:
        raise ValueError(
            f"BEiT-3 checkpoint: missing expected key {err}; is this a torchscale BEiT3 state dict?"
        ) from None
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.layers\.(\d+)\.", k)))
    patch, in_chans = int(patch_w.shape[-1]), int(patch_w.shape[1])
    num_patches = vis_pos - 3
    side = int(round(math.sqrt(num_patches)))
    if side * side != num_patches:
        raise ValueError(f"BEiT-3 checkpoint: {num_patches} vision positions do not form a square patch grid")
    fields: dict[str, Any] = dict(
        img_size=side * patch,
        patch_size=patch,
        in_chans=in_chans,
        dim=int(dim),
        depth=depth,
        ffn_dim=int(ffn_dim),
        vocab_size=int(vocab),
        max_text_len=int(txt_pos - 2),
        attention="decoupled",
        subln="encoder.layers.0.self_attn.inner_attn_ln.A.weight" in state,
        final_norm="encoder.layer_norm.A.weight" in state,
        patch_embed="linear",  # BEiT-3's patchify; a conv-stem target cannot take its weights
        moe=None,
    )
    if fields["subln"] != ("encoder.layers.0.ffn.A.ffn_layernorm.weight" in state):
        raise ValueError("BEiT-3 checkpoint: sub-LN present in attention but not in the FFN (or the reverse)")
    fields.update(_tokenizer_fields(int(vocab), tokenizer_path, pad_id, mask_id))
    if model is not None:
        base = get_config(model) if not isinstance(model, MultiwayConfig) else model
        for key in ("dim", "depth", "ffn_dim", "patch_size"):
            if getattr(base, key) != fields[key]:
                raise ValueError(
                    f"BEiT-3 checkpoint: {key}={fields[key]} but model {model!r} has {key}={getattr(base, key)}"
                )
        return base.replace(**fields)
    fields["num_heads"] = num_heads if num_heads is not None else max(1, int(dim) // 64)
    return MultiwayConfig(**fields)


def _tokenizer_fields(vocab: int, path: str | None, pad_id: int | None, mask_id: int | None) -> dict[str, Any]:
    if path is None:
        if vocab != 49410:
            raise ValueError(
                f"BEiT-3 checkpoint: vocabulary of {vocab} ids is not open_clip's 49410; pass the sentencepiece model "
                "it was trained with (tokenizer_path / --tokenizer, e.g. beit3.spm)"
            )
        return dict(tokenizer="openclip", tokenizer_path=None, pad_id=49408, mask_id=49409)
    if mask_id is None:
        if Path(path).is_file():
            import sentencepiece as spm

            mask_id = int(spm.SentencePieceProcessor(model_file=str(path)).get_piece_size()) + 1
        else:
            raise ValueError(f"tokenizer_path {path} does not exist; pass mask_id explicitly or a valid .spm file")
    return dict(
        tokenizer="sentencepiece", tokenizer_path=str(path), pad_id=1 if pad_id is None else pad_id, mask_id=mask_id
    )


def convert_timm_vit_state_dict(
    state: dict[str, torch.Tensor], config: MultiwayConfig, *, copy_to_text: bool = False
) -> dict[str, torch.Tensor]:
    """Map a timm `VisionTransformer` state dict into the vision side of a dense Multiway model.

    Fused `attn.qkv` is split into q/k/v; `mlp.fc1/fc2` become the V-FFN. The result is exact when the target
    config matches the ViT (`subln=False`, `layernorm_eps=1e-6` for timm's default norm, no MoE in those layers).
    `copy_to_text=True` also seeds the language branches with the vision weights (VLMo-style initialization).
    Returns a partial state dict: load it with `load_backbone_weights(..., strict=False)`.
    """
    state = unwrap_state_dict(state)
    if config.patch_embed != "linear":
        raise ValueError(
            f"timm checkpoint: the target config has patch_embed={config.patch_embed!r}; a ViT's patch "
            "projection only fits patch_embed='linear'"
        )
    dim = config.dim
    out: dict[str, torch.Tensor] = {}
    branches = ("vision", "text") if copy_to_text else ("vision",)

    def put(name: str, value: torch.Tensor) -> None:
        for b in branches:
            out[name.format(b=b)] = value

    for key, value in state.items():
        if key == "cls_token":
            out["vision_embed.cls_token"] = value
        elif key == "pos_embed":
            if value.shape[1] == config.num_patches:  # no class-token position (e.g. `class_token=False`)
                raise ValueError("timm checkpoint: pos_embed has no class-token row; expected (1, 1 + P, D)")
            out["vision_embed.pos_embed"] = value
        elif key.startswith("patch_embed.proj."):
            out["vision_embed." + key] = value
        elif key.startswith("norm.") and config.final_norm:
            put("norm.{b}." + key[len("norm.") :], value)
        elif m := re.fullmatch(r"blocks\.(\d+)\.(.+)", key):
            i, rest = int(m.group(1)), m.group(2)
            if i >= config.depth:
                raise ValueError(f"timm checkpoint: block {i} but the target model has depth {config.depth}")
            p = f"blocks.{i}."
            if rest.startswith("attn.qkv."):
                kind = rest.rsplit(".", 1)[1]
                if value.shape[0] != 3 * dim:
                    raise ValueError(f"timm checkpoint: {key} has {value.shape[0]} rows, expected 3 * dim = {3 * dim}")
                for name, part in zip(("q", "k", "v"), value.split(dim, dim=0)):
                    put(p + f"attn.{name}_proj.{{b}}.{kind}", part)
            elif rest.startswith("attn.proj."):
                put(p + "attn.out_proj.{b}." + rest.rsplit(".", 1)[1], value)
            elif rest.startswith(("norm1.", "norm2.")):
                put(p + rest[:5] + ".{b}." + rest[6:], value)
            elif rest.startswith(("mlp.fc1.", "mlp.fc2.")):
                if config.is_moe_layer(i):
                    raise ValueError(
                        f"timm checkpoint: block {i} is an MoE layer in the target; import into a dense "
                        "config and upcycle afterwards (mmoe.model.upcycle)"
                    )
                put(p + "ffn.{b}." + rest[4:], value)
        # heads, fc_norm, reg tokens etc. are not part of the backbone
    if config.attention == "shared":
        out = {
            k.replace(".vision.", ".shared.", 1) if ".attn." in k or ".norm1." in k else k: v for k, v in out.items()
        }
        out = {k: v for k, v in out.items() if ".text." not in k or not (".attn." in k or ".norm1." in k)}
    return out
