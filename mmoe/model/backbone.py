"""The Multiway Transformer backbone (BEiT-3 layout with optional MH-MoE FFNs).

Dimension legend: B batch, G vision tokens (CLS + patches), L text tokens, N = G + L, M keys (cached + new), D width.

Sequence layout ([B3] sec. 2.1): vision tokens first ([CLS, patches...]), then text. The number
of vision tokens is passed explicitly to every block. Returns features plus the routing records and the
summed auxiliary loss of every MoE layer ([MH1] sec. 3.3). Offers timm's backbone contract
(`forward_features`, `no_weight_decay`, `group_matcher`, `set_grad_checkpointing`) and its classifier contract
(`num_classes`, `reset_classifier`, `get_classifier`, `forward_head`, `pretrained_cfg`), so timm's data helpers
(`timm.data.resolve_data_config(model=...)`) and training scripts that only rely on those can use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmoe.model.attention import KVCache, build_attention_mask, causal_mask, rescale_
from mmoe.model.block import MultiwayBlock
from mmoe.model.config import MultiwayConfig
from mmoe.model.embed import TextEmbed, VisionEmbed, sincos_2d
from mmoe.model.multiway import DenseFFN, Multiway, MultiwayFFN, Shared


@dataclass
class BackboneOutput:
    """What `MultiwayTransformer.forward` returns (docs/interfaces.md section 2)."""

    features: torch.Tensor
    num_vision_tokens: int
    grid_size: tuple[int, int] | None
    routing: dict[str, Any] = field(default_factory=dict)
    aux_loss: torch.Tensor | None = None
    # The tokens that entered the first block (vision first: CLS, patches), i.e. the stem's output plus positions.
    embeddings: torch.Tensor | None = None


class MultiwayTransformer(nn.Module):
    """BEiT-3-style Multiway Transformer ([B3] sec. 2.1) with MH-MoE layers every `moe.every` blocks ([MH1])."""

    def __init__(self, config: MultiwayConfig) -> None:
        super().__init__()
        if not isinstance(config, MultiwayConfig):
            raise TypeError(f"MultiwayTransformer: expected a MultiwayConfig, got {type(config).__name__}")
        self.config = config
        self.embed_dim = self.num_features = config.dim
        self.grad_checkpointing = config.grad_checkpointing
        self.vision_embed = VisionEmbed(
            img_size=config.img_size,
            patch_size=config.patch_size,
            in_chans=config.in_chans,
            dim=config.dim,
            kind=config.patch_embed,
            stem_blocks=config.stem_blocks,
            stem_width=config.stem_width,
            stem_shortcut=config.stem_shortcut,
        )
        self.text_embed: TextEmbed | None = TextEmbed(
            vocab_size=config.vocab_size, max_len=config.max_text_len, dim=config.dim
        )
        self.embed_drop = nn.Dropout(config.dropout)
        # Stochastic depth grows linearly with depth (BEiT-3 / torchscale np.linspace(0, rate, depth)).
        drop_rates = [config.drop_path * i / max(config.depth - 1, 1) for i in range(config.depth)]
        self.blocks = nn.ModuleList(
            MultiwayBlock(
                dim=config.dim,
                num_heads=config.num_heads,
                ffn_dim=config.ffn_dim,
                multiway_attention=config.attention == "decoupled",
                subln=config.subln,
                eps=config.layernorm_eps,
                qkv_bias=config.qkv_bias,
                dropout=config.dropout,
                attn_dropout=config.attn_dropout,
                drop_path=drop_rates[i],
                attn_impl=config.attn_impl,
                qk_norm=config.qk_norm,
                vlffn=config.has_vlffn(i) and config.vlffn_layers > 0,
                moe=config.moe if config.is_moe_layer(i) else None,
            )
            for i in range(config.depth)
        )
        self.norm = (
            Multiway(
                nn.LayerNorm(config.dim, eps=config.layernorm_eps), nn.LayerNorm(config.dim, eps=config.layernorm_eps)
            )
            if config.final_norm
            else None
        )
        self.init_weights()
        if not config.has_text:
            self._remove_text_branch()
        # Built after init_weights so that the random stream of the backbone does not depend on the head.
        self.head: nn.Module = self._new_head(config.num_classes)

    def _remove_text_branch(self) -> None:
        """Vision-only backbone (`MultiwayConfig.modalities`): drop the text embedding and every text copy.

        Removed: the text embedding, the text half of each multiway norm / attention projection / FFN, the VL-FFN
        (it only runs on image-text sequences) and the text pool of per-modality MoE layers. Done after building and
        initialising the full model, so the random stream is the one of the full model: with the same seed the
        vision-only backbone equals the full one minus its text branch, and from-scratch vision runs keep their
        numbers. The vision parameters keep their names, so full checkpoints load by name.
        """
        self.text_embed = None
        for module in self.modules():
            if isinstance(module, Multiway):
                module.text = None
            elif isinstance(module, MultiwayFFN):
                module.text = module.vl = None
            elif isinstance(module, MultiwayBlock) and isinstance(module.moe, nn.ModuleDict):
                del module.moe["text"]

    # ------------------------------------------------------------------ init ([B3] released code, [BEiT])
    def init_weights(self) -> None:
        """Normal(std) Linear/embeddings, unit LayerNorms, output projections of layer l divided by sqrt(2l).

        BEiT-3 uses timm's `trunc_normal_(std=0.02)` whose bounds are the absolute values +-2, i.e. 100 std: that
        is a plain normal in practice, and `normal_` is 5x faster on the large text embedding. MoE layers keep
        the initialization `mmoe.moe` gives them ([MH1] sec. 3, official MH-MoE code).
        """
        std = self.config.init_std
        init = nn.init.normal_
        moe_modules = {id(m) for blk in self.blocks if blk.moe is not None for m in blk.moe.modules()}
        for module in self.modules():
            if id(module) in moe_modules:
                continue
            if isinstance(module, nn.Linear):
                init(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                init(module.weight, std=std)
        for param in (self.vision_embed.cls_token, self.vision_embed.mask_token, self.vision_embed.pos_embed):
            init(param, std=std)
        if self.config.pos_embed_init == "sincos":
            with torch.no_grad():
                table = sincos_2d(self.vision_embed.grid_size, self.config.dim) * self.config.pos_embed_scale
                self.vision_embed.pos_embed[0, 1:].copy_(table)
        if self.text_embed is not None:
            init(self.text_embed.pos_embed, std=std)
        for layer_id, blk in enumerate(self.blocks, start=1):
            for proj in _branches(blk.attn.out_proj):
                rescale_(proj, layer_id)
            if blk.ffn is not None:
                for ffn in blk.ffn.modules():
                    if isinstance(ffn, DenseFFN):
                        rescale_(ffn.fc2, layer_id)

    def freeze_mask_token_(self) -> MultiwayTransformer:
        """Stop training the BEiT mask token; returns self.

        Only masked image modeling ([B3] sec. 2.2) replaces patches with it, so in fine-tuning it never gets a
        gradient, and DDP refuses a trainable parameter without one (unless it searches the autograd graph
        for unused parameters on every step). The token stays in the state dict, so checkpoints keep their keys.
        """
        self.vision_embed.mask_token.requires_grad_(False)
        return self

    def freeze_unpaired_ffns_(self) -> MultiwayTransformer:
        """Freeze the V-FFN and L-FFN of the VL-FFN blocks (`vlffn_layers`); returns self.

        In those top blocks a sequence holding both modalities runs only the VL-FFN ([B3] sec. 2.1), so a task
        whose every training sequence is image + text (VQA, NLVR2, captioning) never reaches their V-FFN and
        L-FFN: frozen, they are not trainable parameters without a gradient (which plain DDP refuses). What
        they hold (e.g. from pretraining) stays and is still used on single-modality input.
        """
        for blk in self.blocks:
            ffn = blk.ffn
            if isinstance(ffn, MultiwayFFN) and ffn.vl is not None:
                for branch in (ffn.vision, ffn.text):
                    if branch is not None:
                        branch.requires_grad_(False)
        return self

    # ------------------------------------------------------------------ weights as users share them
    def save_pretrained(self, path: str | Path, *, extra: dict[str, Any] | None = None) -> Path:
        """Write `config.json` + `model.safetensors` into the folder `path` (`mmoe.model.io.save_pretrained`)."""
        from mmoe.model.io import save_pretrained

        return save_pretrained(self, path, extra=extra)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, strict: bool = True, **overrides: Any) -> MultiwayTransformer:
        """The backbone of a `save_pretrained` folder (`mmoe.model.from_pretrained`)."""
        from mmoe.model.registry import from_pretrained

        return from_pretrained(path, strict=strict, **overrides)

    # ------------------------------------------------------------------ properties
    @property
    def tokenizer_spec(self) -> dict[str, Any]:
        """The tokenizer the text ids are meant for (docs/interfaces.md sections 2 and 3)."""
        cfg = self.config
        return {
            "name": cfg.tokenizer,
            "path": cfg.tokenizer_path,
            "vocab_size": cfg.vocab_size,
            "pad_id": cfg.pad_id,
            "mask_id": cfg.mask_id,
            "max_len": cfg.max_text_len,
        }

    def new_cache(self) -> KVCache:
        """An empty key/value cache for incremental decoding (docs/interfaces.md section 8)."""
        return KVCache(len(self.blocks))

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        image: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
        text_padding_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        text_start: int = 0,
        update_cache: bool = True,
    ) -> BackboneOutput:
        """Encode an image, a text, or both (vision tokens first).

        `attn_mask` (N, N) or (B, N, N) bool, True = may attend. With a non-empty `cache`, the new (text)
        tokens attend to every cached key plus the new tokens up to themselves (or per an `attn_mask` of
        shape (N_new, cached + N_new)); `text_start` is the position of the first new text token.
        """
        if image is None and text is None:
            raise ValueError("MultiwayTransformer.forward: pass `image`, `text` or both")
        past = 0 if cache is None else cache.length
        if past and image is not None:
            raise ValueError("MultiwayTransformer.forward: an image can only be given in the first call with a cache")
        if past and text is None:
            raise ValueError("MultiwayTransformer.forward: a call on a non-empty cache needs `text`")
        x_BND, num_vision, grid, padding_BN = self._embed(image, image_mask, text, text_padding_mask, text_start)
        embeddings_BND = x_BND
        batch, num_new = x_BND.shape[:2]
        key_padding_BM = padding_BN
        if past:
            if cache.batch_size != batch:  # type: ignore[union-attr]
                raise ValueError(f"cache: holds batch {cache.batch_size}, got inputs of batch {batch}")  # type: ignore[union-attr]
            key_padding_BM = _concat_padding(cache.padding, padding_BN, batch, past, num_new, x_BND.device)  # type: ignore[union-attr]
            if attn_mask is None:
                attn_mask = causal_mask(num_new, past, x_BND.device)
        mask_B1NM = build_attention_mask(
            batch=batch,
            num_queries=num_new,
            num_keys=past + num_new,
            key_padding_BM=key_padding_BM,
            attn_mask=attn_mask,
            device=x_BND.device,
        )

        use_ckpt = self.grad_checkpointing and cache is None and torch.is_grad_enabled()
        routing: dict[str, Any] = {}
        aux_loss = x_BND.new_zeros((), dtype=torch.float32)
        for i, blk in enumerate(self.blocks):
            if use_ckpt:
                x_BND, aux, records = checkpoint(
                    blk, x_BND, num_vision, mask_B1NM, padding_BN, None, i, True, use_reentrant=False
                )
            else:
                x_BND, aux, records = blk(x_BND, num_vision, mask_B1NM, padding_BN, cache, i, update_cache)
            if aux is not None:
                aux_loss = aux_loss + aux
            for suffix, record in records.items():
                routing[f"layer{i}{suffix}"] = record
        if self.norm is not None:
            x_BND = self.norm(x_BND, num_vision)
        if cache is not None and update_cache and key_padding_BM is not None:
            cache.padding = key_padding_BM  # covers every cached key (old padding + the new tokens')
        return BackboneOutput(
            features=x_BND,
            num_vision_tokens=num_vision,
            grid_size=grid,
            routing=routing,
            aux_loss=aux_loss,
            embeddings=embeddings_BND,
        )

    def _embed(
        self,
        image: torch.Tensor | None,
        image_mask: torch.Tensor | None,
        text: torch.Tensor | None,
        text_padding_mask: torch.Tensor | None,
        text_start: int,
    ) -> tuple[torch.Tensor, int, tuple[int, int] | None, torch.Tensor | None]:
        """Embed and concatenate [vision, text]; returns (x, num_vision, grid, padding over the sequence or None)."""
        parts: list[torch.Tensor] = []
        num_vision, grid = 0, None
        if image is not None:
            x_BGD, grid = self.vision_embed(image, image_mask)
            num_vision = x_BGD.shape[1]
            parts.append(x_BGD)
        elif image_mask is not None:
            raise ValueError("MultiwayTransformer.forward: `image_mask` given without `image`")
        padding_BN: torch.Tensor | None = None
        if text is not None:
            if self.text_embed is None:
                raise ValueError(
                    "MultiwayTransformer.forward: this backbone is vision-only (modalities=['vision']); it has no "
                    "text branch to encode `text`"
                )
            x_BLD = self.text_embed(text, start=text_start)
            if text_padding_mask is not None:
                if text_padding_mask.shape != text.shape or text_padding_mask.dtype != torch.bool:
                    raise ValueError(
                        f"text_padding_mask: expected a bool tensor of shape {tuple(text.shape)} (True = pad), got "
                        f"{text_padding_mask.dtype} {tuple(text_padding_mask.shape)}"
                    )
                # Pad embeddings are zeroed as in torchscale's Encoder, so pad ids never matter.
                x_BLD = x_BLD.masked_fill(text_padding_mask.unsqueeze(-1), 0.0)
                padding_BN = text_padding_mask
                if num_vision:
                    vision_pad = text_padding_mask.new_zeros(text.shape[0], num_vision)
                    padding_BN = torch.cat([vision_pad, text_padding_mask], dim=1)
            parts.append(x_BLD)
        elif text_padding_mask is not None:
            raise ValueError("MultiwayTransformer.forward: `text_padding_mask` given without `text`")
        x_BND = self.embed_drop(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])
        return x_BND, num_vision, grid, padding_BN

    # ------------------------------------------------------------------ timm classifier contract
    def _new_head(self, num_classes: int) -> nn.Module:
        """A fresh image classifier (timm's `head`): Linear(D, num_classes) initialised like the backbone, or
        an identity for ``num_classes=0`` (no parameters, so headless state dicts are unchanged)."""
        if not num_classes:
            return nn.Identity()
        ref = self.vision_embed.cls_token
        head = nn.Linear(self.config.dim, num_classes, device=ref.device, dtype=ref.dtype)
        nn.init.normal_(head.weight, std=self.config.init_std)
        nn.init.zeros_(head.bias)
        return head

    @property
    def num_classes(self) -> int:
        """Classes of the image classifier (`get_classifier`); 0 = none, `forward_head` returns features."""
        return self.config.num_classes

    @property
    def global_pool(self) -> str:
        """How `forward_head` pools the image tokens: "token" (CLS feature) or "avg" (mean patch feature)."""
        return self.config.global_pool

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier by a fresh one of `num_classes` outputs (0 removes it), as timm's models do.

        The change is recorded in `config` (`num_classes`, `global_pool`), so `save_pretrained` / `save_model`
        and `from_pretrained` keep it.
        """
        changes: dict[str, Any] = {"num_classes": num_classes}
        if global_pool is not None:
            changes["global_pool"] = global_pool
        self.config = self.config.replace(**changes)
        self.head = self._new_head(self.config.num_classes)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Logits (B, num_classes) from `forward_features` output (B, 1 + P, D), as timm's ViT `forward_head`.

        Pools the CLS token ("token") or the mean of the patch tokens ("avg"); `pre_logits` returns the pooled
        (B, D) features. With `num_classes=0` the head is an identity, so the pooled features come back.
        """
        if x.ndim != 3:
            raise ValueError(f"forward_head: expected features of shape (B, 1 + P, D), got {tuple(x.shape)}")
        pooled = x[:, 1:].mean(dim=1) if self.config.global_pool == "avg" else x[:, 0]
        return pooled if pre_logits else self.head(pooled)

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """timm's `pretrained_cfg`: what `timm.data.resolve_data_config(model=...)` reads (input size, mean, std).

        Mean and std are the config's (`image_mean` / `image_std`, the normalisation the weights were trained
        with); bicubic resizing and timm's 0.875 centre crop are what `mmoe.data.transforms.build_transform`
        does for `eval_resize="center_crop"`.
        """
        cfg = self.config
        return {
            "architecture": "mmoe.MultiwayTransformer",
            "input_size": (cfg.in_chans, cfg.img_size, cfg.img_size),
            "fixed_input_size": False,
            "interpolation": "bicubic",
            "crop_pct": 0.875,
            "crop_mode": "center",
            "mean": tuple(cfg.image_mean),
            "std": tuple(cfg.image_std),
            "num_classes": cfg.num_classes,
            "first_conv": "vision_embed.patch_embed." + ("proj" if cfg.patch_embed == "linear" else "net.0"),
            "classifier": "head",
        }

    @property
    def default_cfg(self) -> dict[str, Any]:
        """Older timm's name for `pretrained_cfg`."""
        return self.pretrained_cfg

    # ------------------------------------------------------------------ timm backbone contract
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image-only features (B, 1 + P, D), as timm's `VisionTransformer.forward_features`."""
        return self(image=x).features

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"vision_embed.cls_token", "vision_embed.mask_token", "vision_embed.pos_embed", "text_embed.pos_embed"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Layer groups for layer-wise lr decay (timm's `group_matcher` contract): embeddings id 0, block i -> i + 1.

        The final norm carries timm's `(99999,)` tag, i.e. it joins the last block. Heads outside the backbone sit
        one level above (scale 1), so `mmoe.train.optim.param_groups` gives BEiT's lr * decay^(L + 1 - id)
        ([BEiT], [B3]); timm's own `param_groups_layer_decay` (no heads) gives the last block scale 1 instead.
        """
        return dict(
            stem=r"^(?:vision_embed|text_embed)",
            blocks=r"^blocks\.(\d+)" if coarse else [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable


def _branches(module: nn.Module) -> list[nn.Linear]:
    if isinstance(module, Multiway):
        return [m for m in (module.vision, module.text) if m is not None]  # type: ignore[misc]
    if isinstance(module, Shared):
        return [module.shared]  # type: ignore[list-item]
    return [module]  # type: ignore[list-item]


def _concat_padding(
    cached_BM: torch.Tensor | None,
    new_BN: torch.Tensor | None,
    batch: int,
    past: int,
    num_new: int,
    device: torch.device,
) -> torch.Tensor | None:
    """Key padding over [cached, new] keys (True = pad), or None when nothing is padded."""
    if cached_BM is None and new_BN is None:
        return None
    old = cached_BM.to(device) if cached_BM is not None else torch.zeros(batch, past, dtype=torch.bool, device=device)
    new = new_BN if new_BN is not None else torch.zeros(batch, num_new, dtype=torch.bool, device=device)
    return torch.cat([old, new], dim=1)
