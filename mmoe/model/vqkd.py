"""The BEiT v2 VQ-KD visual tokenizer: BEiT-3's masked-image-modeling targets ([B3] sec. 2.2, [BEiT2] sec. 2.2).

BEiT-3 predicts, for every masked patch, the discrete code the VQ-KD tokenizer of [BEiT2] gives that patch (8192
codes). The tokenizer is a ViT-B/16 encoder, a small projection (``encode_task_layer``: Linear, tanh, Linear down to
the 32-dimensional code space) and a factorized codebook: the projected patch feature and the 8192 x 32 codebook
vectors are l2-normalized and the code is the nearest vector ([BEiT2] sec. 2.2, eq. 1; a normalized,
low-dimensional codebook as in ViT-VQGAN, which [BEiT2] builds on). Only the encoder side is needed to produce targets;
the decoder that reconstructed the CLIP teacher's features during tokenizer training is not built here.

:class:`VQKDTokenizer` keeps the released checkpoint's own parameter names (``encoder.*``, ``encode_task_layer.*``,
``quantize.*``), so :func:`load_vqkd` loads ``vqkd_encoder_base_decoder_3x768x12_clip`` as it is: strict for every
encoder and quantizer tensor, the decoder-side tensors (``decoder.``, ``decode_task_layer.``, and the teacher /
scaling / loss tensors the released loader also drops) skipped by name and counted. A file of another layout is
refused, naming the first key that does not fit and its shape. The tokenizer is frozen and stays in eval mode.

Facts from the released BEiT v2 code (``beit2/modeling_vqkd.py``, ``norm_ema_quantizer.py``,
``modeling_finetune.py``), checked against it: pre-norm ViT blocks, LayerNorm eps 1e-6, q and v biases (no k bias),
no layer scale, learned absolute positions for ``[CLS]`` + 196 patches, no final norm but a ``fc_norm`` over the
patch tokens (mean-pooling layout, returned per patch), exact GELU; the tokenizer's input is the [0, 1] image mapped
to [-1, 1] (mean = std = 0.5 per channel: its ``pre_process``), at 224 x 224 px. The CLIP mean/std of that code
normalize the *teacher's* input during tokenizer training only.

Dimension legend: B batch, C channels, H/W image height/width, P patches (= grid_h * grid_w), D encoder width,
Hd attention heads, Dh head width, E code dimension, K codebook size, N = B * P.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import pickle
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from mmoe.model.config import _check_positive, check_vit_sizes
from mmoe.model.convert import unwrap_state_dict

__all__ = [
    "RELEASED_TOKENIZER",
    "SKIPPED_PREFIXES",
    "VQKDConfig",
    "VQKDTokenizer",
    "load_vqkd",
    "load_vqkd_state_dict",
]

log = logging.getLogger(__name__)

#: The released tokenizer BEiT-3 uses ([B3] sec. 2.2), as named in the BEiT v2 model zoo.
RELEASED_TOKENIZER = "vqkd_encoder_base_decoder_3x768x12_clip"

#: Key prefixes of a released tokenizer file that producing codes does not use: the decoder and its projection
#: (tokenizer training reconstructs the teacher's features through them) and the teacher, its input scaling and
#: loss modules, which the released loader drops by these same prefixes.
SKIPPED_PREFIXES: tuple[str, ...] = ("decoder.", "decode_task_layer.", "teacher_model.", "scaling_layer.", "loss")


#: Patch features looked up at once: bounds the (rows, K) distance matrix (4096 x 8192 float32 = 128 MiB).
_LOOKUP_ROWS = 4096


@dataclass(kw_only=True)
class VQKDConfig:
    """Sizes of a VQ-KD tokenizer's encoder side; the defaults are the released base tokenizer's.

    The state-dict layout follows from these fields (``encoder.pos_embed`` is (1, 1 + P, dim), ``encoder.blocks.*``
    has ``depth`` entries, ``quantize.embedding.weight`` is (codebook_size, codebook_dim), ...); ``num_heads`` does
    not show in any shape and must be known (12 for the released base). ``image_mean``/``image_std`` are the
    normalization the encoder expects its [0, 1] input in.
    """

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    dim: int = 768
    depth: int = 12
    num_heads: int = 12
    ffn_dim: int = 3072
    codebook_size: int = 8192
    codebook_dim: int = 32
    layernorm_eps: float = 1e-6
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        check_vit_sizes("VQKDConfig", self)
        _check_positive("VQKDConfig", "codebook_size", self.codebook_size)
        _check_positive("VQKDConfig", "codebook_dim", self.codebook_dim)
        if any(s <= 0 for s in self.image_std):
            raise ValueError(f"VQKDConfig.image_std: every value must be > 0, got {list(self.image_std)}")

    @property
    def grid_size(self) -> tuple[int, int]:
        """Codes per image side: one code per patch of the tokenizer's input."""
        side = self.img_size // self.patch_size
        return side, side

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, *, source: str = "vqkd_config") -> VQKDConfig:
        """The released base config with the fields of ``data`` replaced; an unknown field is refused by name."""
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: expected a mapping of VQKDConfig fields, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown VQKDConfig keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**dict(data))


# ---------------------------------------------------------------------------------------------------------- encoder
class _Attention(nn.Module):
    """Multi-head self-attention with q and v biases and no k bias (the released layout: ``qkv.weight``,
    ``q_bias``, ``v_bias``, ``proj``)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x_BND, self.qkv.weight, bias)
        q, k, v = rearrange(qkv, "b n (three h dh) -> three b h n dh", three=3, h=self.num_heads)
        out_BHND = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(out_BHND, "b h n dh -> b n (h dh)"))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    """Pre-norm Transformer block without layer scale (``init_values=0`` in the released tokenizer)."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = _Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = _Mlp(dim, ffn_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, in_chans: int, dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return rearrange(self.proj(x_BCHW), "b d h w -> b (h w) d")


class _Encoder(nn.Module):
    """The tokenizer's ViT encoder; returns the ``fc_norm``-ed patch tokens (B, P, D), ``[CLS]`` dropped."""

    def __init__(self, cfg: VQKDConfig) -> None:
        super().__init__()
        num_patches = cfg.grid_size[0] * cfg.grid_size[1]
        self.patch_embed = _PatchEmbed(cfg.in_chans, cfg.dim, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, cfg.dim))
        self.blocks = nn.ModuleList(
            _Block(cfg.dim, cfg.num_heads, cfg.ffn_dim, cfg.layernorm_eps) for _ in range(cfg.depth)
        )
        self.fc_norm = nn.LayerNorm(cfg.dim, eps=cfg.layernorm_eps)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        x_BPD = self.patch_embed(x_BCHW)
        x = torch.cat([self.cls_token.expand(x_BPD.shape[0], -1, -1), x_BPD], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.fc_norm(x[:, 1:])


class _Codebook(nn.Module):
    """The quantizer's tensors under their released names (``quantize.embedding.weight`` is the codebook).

    ``cluster_size``, ``embed_avg`` and ``initted`` are the EMA statistics of tokenizer training; they are kept so
    that the released file loads strictly and a file missing them is not silently read as a tokenizer.
    """

    def __init__(self, num_codes: int, code_dim: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.zeros(num_codes, code_dim))
        self.register_buffer("cluster_size", torch.zeros(num_codes))
        self.register_buffer("embed_avg", torch.zeros(num_codes, code_dim))
        self.register_buffer("initted", torch.zeros(1))


class _Quantizer(nn.Module):
    def __init__(self, num_codes: int, code_dim: int) -> None:
        super().__init__()
        self.embedding = _Codebook(num_codes, code_dim)
        self.register_buffer("cluster_size", torch.zeros(num_codes))


# ---------------------------------------------------------------------------------------------------------- tokenizer
class VQKDTokenizer(nn.Module):
    """VQ-KD encoder + factorized, l2-normalized codebook lookup -> one code per patch ([BEiT2] sec. 2.2).

    Frozen (no parameter requires a gradient) and always in eval mode: ``train()`` leaves it in eval, so a
    LightningModule holding it as a target model can switch its own mode freely.
    """

    def __init__(self, config: VQKDConfig | None = None) -> None:
        super().__init__()
        self.config = config or VQKDConfig()
        cfg = self.config
        self.encoder = _Encoder(cfg)
        self.encode_task_layer = nn.Sequential(
            nn.Linear(cfg.dim, cfg.dim), nn.Tanh(), nn.Linear(cfg.dim, cfg.codebook_dim)
        )
        self.quantize = _Quantizer(cfg.codebook_size, cfg.codebook_dim)
        self.register_buffer("mean", torch.tensor(cfg.image_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.image_std).view(1, -1, 1, 1), persistent=False)
        self.skipped_keys: dict[str, int] = {}  # set by load_vqkd: released-file keys skipped, per prefix
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> VQKDTokenizer:  # noqa: ARG002 - the argument is ignored on purpose
        """Stay in eval mode whatever ``mode`` is: the tokenizer is a fixed target model."""
        return super().train(False)

    @property
    def num_codes(self) -> int:
        return self.config.codebook_size

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.config.grid_size

    def _check_input(self, x_BCHW: torch.Tensor) -> None:
        cfg = self.config
        if x_BCHW.ndim != 4 or x_BCHW.shape[1] != cfg.in_chans or tuple(x_BCHW.shape[-2:]) != (cfg.img_size,) * 2:
            raise ValueError(
                f"VQKDTokenizer: expected images (B, {cfg.in_chans}, {cfg.img_size}, {cfg.img_size}), got "
                f"{tuple(x_BCHW.shape)}; use codes_from() to resize and renormalize a batch of another size"
            )

    @torch.no_grad()
    def features(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """l2-normalized code-space features (B, P, E) of images normalized with the tokenizer's mean/std."""
        self._check_input(x_BCHW)
        # float32 whatever the trainer's autocast: codes are argmins over near-equal distances, and bf16 would
        # move some of them; under a true-half-precision trainer the weights' dtype is used.
        with torch.autocast(device_type=x_BCHW.device.type, enabled=False):
            x = x_BCHW.to(self.encoder.cls_token.dtype)
            z_BPE = self.encode_task_layer(self.encoder(x))
            return F.normalize(z_BPE.float(), p=2, dim=-1)

    @torch.no_grad()
    def codes(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """Code ids (B, P) int64 in [0, K), patches in row-major grid order, of tokenizer-normalized images.

        Nearest codebook vector by squared L2 distance between the l2-normalized feature and the stored vectors
        (the released quantizer's rule; its vectors are kept l2-normalized by the normalized EMA).
        """
        z_BPE = self.features(x_BCHW)
        z_NE = rearrange(z_BPE, "b p e -> (b p) e")
        book_KE = self.quantize.embedding.weight.float()
        book_sq_K = (book_KE * book_KE).sum(-1)
        codes_N = torch.empty(z_NE.shape[0], dtype=torch.long, device=z_NE.device)
        for i in range(0, z_NE.shape[0], _LOOKUP_ROWS):  # (rows, K) distances at a time: 8192 codes per row
            z = z_NE[i : i + _LOOKUP_ROWS]
            dist = (z * z).sum(-1, keepdim=True) + book_sq_K[None, :] - 2.0 * z @ book_KE.t()
            codes_N[i : i + _LOOKUP_ROWS] = dist.argmin(dim=-1)
        return codes_N.view(z_BPE.shape[0], z_BPE.shape[1])

    @torch.no_grad()
    def to_tokenizer_input(
        self, image_BCHW: torch.Tensor, *, mean: Iterable[float], std: Iterable[float]
    ) -> torch.Tensor:
        """A batch normalized with another model's ``mean``/``std``, at any size, as this tokenizer's input.

        The batch is mapped back to [0, 1] pixels, resized to the tokenizer's input size when it differs (bicubic
        with antialiasing, clamped to [0, 1]; BEiT v2 resized the tokenizer's copy of each crop on its own) and
        normalized with the tokenizer's own mean/std. Float32, on the batch's device.
        """
        x = image_BCHW.float()
        other_mean = torch.tensor(list(mean), dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        other_std = torch.tensor(list(std), dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        pixels = x * other_std + other_mean
        size = self.config.img_size
        if tuple(pixels.shape[-2:]) != (size, size):
            pixels = F.interpolate(pixels, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
            pixels = pixels.clamp(0.0, 1.0)
        return (pixels - self.mean.float()) / self.std.float()

    @torch.no_grad()
    def codes_from(self, image_BCHW: torch.Tensor, *, mean: Iterable[float], std: Iterable[float]) -> torch.Tensor:
        """:meth:`codes` of a batch in another model's normalization and size (:meth:`to_tokenizer_input`)."""
        return self.codes(self.to_tokenizer_input(image_BCHW, mean=mean, std=std))

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """:meth:`codes`."""
        return self.codes(x_BCHW)


# ---------------------------------------------------------------------------------------------------------- loading
def _shape(t: Any) -> tuple[int, ...] | str:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def load_vqkd_state_dict(
    tokenizer: VQKDTokenizer, state: Mapping[str, Any], *, source: str = "vqkd checkpoint"
) -> dict[str, int]:
    """Load a state dict of the released layout into ``tokenizer``; returns the skipped keys per prefix.

    Keys under :data:`SKIPPED_PREFIXES` are skipped by name. Every other key must be one of the tokenizer's, with
    its shape, and every tokenizer key must be present; otherwise ``ValueError`` names the first key that does not
    fit (in the tokenizer's order, then unexpected keys in the file's order) with its shape.
    """
    skipped: dict[str, int] = {}
    kept: dict[str, Any] = {}
    for key, value in state.items():
        prefix = next((p for p in SKIPPED_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            kept[key] = value
        else:
            skipped[prefix] = skipped.get(prefix, 0) + 1
    expected = tokenizer.state_dict()
    cfg = tokenizer.config
    where = (
        f"{source} does not have the VQ-KD tokenizer layout of VQKDConfig(img_size={cfg.img_size}, "
        f"patch_size={cfg.patch_size}, dim={cfg.dim}, depth={cfg.depth}, ffn_dim={cfg.ffn_dim}, "
        f"codebook_size={cfg.codebook_size}, codebook_dim={cfg.codebook_dim}) (the released {RELEASED_TOKENIZER} "
        "by default; other sizes: vqkd_config)"
    )
    for key, ref in expected.items():
        if key not in kept:
            first = next(iter(kept), None)
            seen = f"; its first key is {first!r} {_shape(kept[first])}" if first is not None else ""
            raise ValueError(f"{where}: key {key!r} (expected shape {tuple(ref.shape)}) is missing{seen}")
        if not isinstance(kept[key], torch.Tensor) or tuple(kept[key].shape) != tuple(ref.shape):
            raise ValueError(f"{where}: key {key!r} has shape {_shape(kept[key])}, expected {tuple(ref.shape)}")
    extra = [k for k in kept if k not in expected]
    if extra:
        raise ValueError(
            f"{where}: unexpected key {extra[0]!r} with shape {_shape(kept[extra[0]])} "
            f"({len(extra)} unexpected key(s) in all)"
        )
    tokenizer.load_state_dict(kept, strict=True)
    return skipped


def _read_tokenizer_file(path: Path, map_location: str | torch.device) -> Any:
    """``torch.load(weights_only=True)``, also accepting the ``argparse.Namespace`` of training arguments that the
    BEiT v2 training script stores next to ``"model"`` in its checkpoints; any other object is refused by name."""
    allow = getattr(torch.serialization, "safe_globals", None)
    try:
        with allow([argparse.Namespace]) if allow is not None else contextlib.nullcontext():
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"VQ-KD tokenizer file {path}: cannot be read with torch.load(weights_only=True) ({first}); keep only its "
            "state dict, e.g. torch.save({'model': torch.load(path, weights_only=False)['model']}, new_path) for a "
            "file you trust"
        ) from e


def load_vqkd(
    path: str | os.PathLike[str],
    config: VQKDConfig | Mapping[str, Any] | None = None,
    *,
    map_location: str | torch.device = "cpu",
) -> VQKDTokenizer:
    """Build a :class:`VQKDTokenizer` of ``config`` (default: the released base) and load a tokenizer file into it.

    The file is the released checkpoint, read with ``torch.load(weights_only=True)`` (training arguments stored
    beside the weights are allowed); its state dict may be bare or under ``"model"`` as in the released files
    (``mmoe.model.convert.unwrap_state_dict``). What must match: :func:`load_vqkd_state_dict`. The skipped keys
    per prefix are logged and kept in ``tokenizer.skipped_keys``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"VQ-KD tokenizer file {path} does not exist (the released {RELEASED_TOKENIZER} checkpoint; "
            "datasets/vqkd/README.md says where to get it)"
        )
    cfg = config if isinstance(config, VQKDConfig) else VQKDConfig.from_dict(config)
    source = f"VQ-KD tokenizer file {path}"
    state = unwrap_state_dict(_read_tokenizer_file(path, map_location), source=source)
    tokenizer = VQKDTokenizer(cfg)
    skipped = load_vqkd_state_dict(tokenizer, state, source=source)
    tokenizer.skipped_keys = skipped
    log.info(
        "VQ-KD tokenizer %s: %d tensors loaded; skipped by name: %s",
        path,
        len(tokenizer.state_dict()),
        ", ".join(f"{p}* {n}" for p, n in skipped.items()) or "none",
    )
    return tokenizer
