"""Active FLOPs of one backbone forward, from the config and the input shapes alone.

Why a formula: an MoE layer's work depends on routing only through which experts run, not how much (dropless
top-k: every sub-token reaches k experts), so the count is known before the forward; and data-dependent routing
(sort, bincount) cannot run on the meta device, where `torch.utils.flop_counter` would otherwise measure it.
Counted, as multiply-adds (MACs) then doubled to FLOPs, the matrix products `torch.utils.flop_counter` counts
(tests/test_model_flops.py checks the two agree):

- patch embedding: linear patchify ``P * C * p^2 * D``; conv stem (`mmoe.model.embed.ConvStem`) its 3x3
  stride-2 convolutions, its `stem_blocks` 3x3 stride-1 ones and the closing 1x1;
- attention per block: q, k, v, out projections ``4 N D^2``, scores and weighted values ``2 N^2 D``
  (N = 1 + P vision tokens + L text tokens; padding counted, as the kernels compute it);
- FFN per dense block ``2 N D F`` (V-FFN, L-FFN or VL-FFN: one of them per token);
- MoE layer per token ([MH2] sec. 2, `mmoe.moe.parity.moe_cost`): head and merge layers ``(n_head + n_merge) D^2``,
  experts ``m D F k`` (m = 2 GELU, 3 SwiGLU; h sub-tokens of width D/h each to k experts), router
  ``D E`` (linear) or ``D r + h r E`` (X-MoE, r the projection width); with capacity limits, dropped assignments
  are counted as computed (an upper bound).

Not counted: norms, activations, softmax, embeddings lookups and biases (all O(N D)), and task heads. A training
step is about 3x the forward (backward twice the forward, [Kaplan et al. 2020]); recomputation under gradient
checkpointing is not model FLOPs and is left out, as in the MFU convention.
"""

from __future__ import annotations

from mmoe.model.config import MultiwayConfig
from mmoe.model.embed import conv_stem_widths
from mmoe.moe.parity import moe_cost

__all__ = ["forward_flops", "patch_embed_macs"]


def patch_embed_macs(config: MultiwayConfig, height: int, width: int) -> int:
    """MACs of the patch embedding of one (C, height, width) image."""
    p, dim, chans = config.patch_size, config.dim, config.in_chans
    patches = (height // p) * (width // p)
    if config.patch_embed == "linear":
        return patches * chans * p * p * dim
    macs, prev, h, w = 0, chans, height, width  # ConvStem: stride-2 3x3 convs, extra blocks, a 1x1 conv
    for width_i in conv_stem_widths(p, dim, config.stem_width):
        h, w = (h + 1) // 2, (w + 1) // 2
        macs += h * w * width_i * prev * 9
        prev = width_i
    macs += config.stem_blocks * h * w * prev * prev * 9  # stride-1 3x3 blocks at the patch resolution
    shortcut = patches * chans * p * p * dim if config.stem_shortcut else 0  # the linear patchify beside it
    return macs + patches * prev * dim + shortcut


def _moe_macs_per_token(config: MultiwayConfig) -> int:
    moe = config.moe
    assert moe is not None
    cost = moe_cost(
        config.dim,
        moe.num_experts,
        moe.top_k,
        moe.expert_hidden,
        num_heads=moe.num_heads,
        activation=moe.activation,
        head_layers=moe.head_layers,
        merge_layers=moe.merge_layers,
    )
    if moe.router == "xmoe":
        r = int(moe.extra.get("xmoe_dim", 16))
        router = config.dim * r + moe.num_heads * r * moe.num_experts
    else:
        router = cost.router_flops_per_token
    return cost.flops_per_token + router


def forward_flops(
    config: MultiwayConfig,
    *,
    batch: int = 1,
    image_size: int | tuple[int, int] | None = None,
    text_len: int = 0,
) -> int:
    """FLOPs (2 x MACs) of one forward of `batch` sequences of an image of `image_size` and/or `text_len` tokens.

    `image_size` None means no image (text only); an int is a square image. See the module docstring for what is
    counted.
    """
    if image_size is None and not text_len:
        raise ValueError("forward_flops: give image_size, text_len or both")
    if text_len < 0 or batch < 0:
        raise ValueError(f"forward_flops: batch={batch} and text_len={text_len} must be >= 0")
    dim, macs, vision = config.dim, 0, 0
    if image_size is not None:
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        macs += patch_embed_macs(config, h, w)
        vision = 1 + (h // config.patch_size) * (w // config.patch_size)
    n = vision + text_len
    moe_token = _moe_macs_per_token(config) if config.moe is not None else 0
    for i in range(config.depth):
        macs += 4 * n * dim * dim + 2 * n * n * dim
        macs += n * moe_token if config.is_moe_layer(i) else 2 * n * dim * config.ffn_dim
    return 2 * macs * batch
