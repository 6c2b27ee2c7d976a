"""Paths and small builders that several test modules share (the shared fixtures are in ``conftest.py``).

Real sample data is read from the repository only: ``datasets/samples`` (sources and licences in its
``SOURCES.md``). A test whose sample is missing skips with the file's name.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "datasets" / "samples"
CONFIGS = REPO / "configs"

# The console scripts pyproject.toml declares and an installed wheel must provide: command -> module:function.
CONSOLE_SCRIPTS = {
    "mmoe": "mmoe.train.cli:main",
    "mmoe-recipes": "mmoe.cli.recipes:main",
    "mmoe-shards": "mmoe.cli.make_shards:main",
    "mmoe-synthetic": "mmoe.cli.make_synthetic:main",
    "mmoe-convert": "mmoe.cli.convert_checkpoint:main",
    "mmoe-viz": "mmoe.cli.visualize_experts:main",
    "mmoe-vqa-vocab": "mmoe.cli.build_vqa_vocab:main",
    "mmoe-codebook": "mmoe.cli.build_visual_codebook:main",
    "mmoe-migrate": "mmoe.train.compat:main",
}


def find_sample(name: str) -> Path | None:
    """The first file called ``name`` under ``datasets/samples``; None if there is none."""
    hits = sorted(SAMPLES.rglob(name)) if SAMPLES.is_dir() else []
    return hits[0] if hits else None


def sample(name: str) -> Path:
    """The sample file called ``name`` (see :func:`find_sample`); skips the calling test when it is missing."""
    path = find_sample(name)
    if path is None:
        pytest.skip(f"datasets/samples has no {name}")
    return path


STREAMS = ("image", "text", "pair")


def shard_world(tmp_path_factory: pytest.TempPathFactory, **world: object) -> Path:
    """A synthetic shapes world with pretraining shards in a fresh temporary folder (``make_world`` arguments).

    The defaults are the tiny world the data and resume tests share: 24 training scenes of 32 px, 6 samples a shard.
    """
    from mmoe.data.synthetic import make_world

    out = tmp_path_factory.mktemp("world")
    make_world(out, **{"num_train": 24, "image_size": 32, "seed": 0, "shards": True, "shard_maxcount": 6, **world})
    return out


def shard_lists(world: Path) -> dict[str, list[str]]:
    """``PretrainDataModule`` keyword arguments for the training shards of every stream of a shard world."""
    return {f"{k}_shards": [str(world / "shards" / k / "train-*.tar")] for k in STREAMS}


def pretrain_data_args(world: Path, **overrides: object) -> dict[str, object]:
    """``PretrainDataModule`` arguments for a shard world at the tests' tiny size: the training shards of every
    stream, batches of 6, 32-px images in 8-px patches, 16 text tokens, no workers; ``overrides`` add or replace."""
    tiny = {"batch_size": 6, "image_size": 32, "patch_size": 8, "max_text_len": 16, "num_workers": 0}
    return {**shard_lists(world), **tiny, **overrides}


def shard_args(world: Path, *, val: bool) -> list[str]:
    """The six ``--data.init_args.*_shards`` options for a shard world: training shards of every stream, and the
    validation shards (``val=True``) or none (each ``val_*_shards`` set to null)."""
    s = world / "shards"
    train = [f"--data.init_args.{k}_shards=[{s}/{k}/train-*.tar]" for k in STREAMS]
    return train + [f"--data.init_args.val_{k}_shards=" + (f"[{s}/{k}/val-*.tar]" if val else "null") for k in STREAMS]


# A VQ-KD tokenizer small enough for CPU tests (mmoe.model.vqkd.VQKDConfig fields): a 4 x 4 code grid, 64 codes.
TINY_VQKD = {
    "img_size": 16,
    "patch_size": 4,
    "dim": 32,
    "depth": 2,
    "num_heads": 2,
    "ffn_dim": 64,
    "codebook_size": 64,
    "codebook_dim": 8,
}


def vqkd_release_layout(
    *,
    img_size: int = 224,
    patch_size: int = 16,
    dim: int = 768,
    depth: int = 12,
    ffn_dim: int = 3072,
    codebook_size: int = 8192,
    codebook_dim: int = 32,
    decoder_depth: int = 3,
    decoder_out: int = 512,
    **_: object,
) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a released BEiT v2 VQ-KD tokenizer file, written out from the BEiT v2 code (unilm ``beit2``).

    The defaults are ``vqkd_encoder_base_decoder_3x768x12_clip``: a ViT-B/16 encoder (pre-norm blocks with q/v biases,
    ``fc_norm``, no final norm or head), ``encode_task_layer`` (Linear, Tanh, Linear to the code dimension), the EMA
    quantizer (codebook ``quantize.embedding.weight`` (8192, 32) and its statistics), the decoder (a ViT over the
    14 x 14 code map: patch 1, input channels = code dimension) with ``decode_task_layer`` to the 512-d CLIP space,
    and the scaling layer of the CLIP teacher's input; in the order of the released model's ``state_dict``.
    Independent of ``mmoe.model.vqkd`` so that the tests check that module against it.
    """
    grid = img_size // patch_size
    layout: dict[str, tuple[int, ...]] = {}

    def vit(prefix: str, in_chans: int, patch: int, blocks: int) -> None:
        layout[f"{prefix}.cls_token"] = (1, 1, dim)
        layout[f"{prefix}.pos_embed"] = (1, 1 + grid * grid, dim)
        layout[f"{prefix}.patch_embed.proj.weight"] = (dim, in_chans, patch, patch)
        layout[f"{prefix}.patch_embed.proj.bias"] = (dim,)
        for i in range(blocks):
            b = f"{prefix}.blocks.{i}"
            layout.update({f"{b}.norm1.weight": (dim,), f"{b}.norm1.bias": (dim,)})
            layout.update(
                {f"{b}.attn.q_bias": (dim,), f"{b}.attn.v_bias": (dim,), f"{b}.attn.qkv.weight": (3 * dim, dim)}
            )
            layout.update({f"{b}.attn.proj.weight": (dim, dim), f"{b}.attn.proj.bias": (dim,)})
            layout.update({f"{b}.norm2.weight": (dim,), f"{b}.norm2.bias": (dim,)})
            layout.update({f"{b}.mlp.fc1.weight": (ffn_dim, dim), f"{b}.mlp.fc1.bias": (ffn_dim,)})
            layout.update({f"{b}.mlp.fc2.weight": (dim, ffn_dim), f"{b}.mlp.fc2.bias": (dim,)})
        layout.update({f"{prefix}.fc_norm.weight": (dim,), f"{prefix}.fc_norm.bias": (dim,)})

    vit("encoder", 3, patch_size, depth)
    vit("decoder", codebook_dim, 1, decoder_depth)
    layout["quantize.cluster_size"] = (codebook_size,)
    layout["quantize.embedding.weight"] = (codebook_size, codebook_dim)
    layout["quantize.embedding.cluster_size"] = (codebook_size,)
    layout["quantize.embedding.embed_avg"] = (codebook_size, codebook_dim)
    layout["quantize.embedding.initted"] = (1,)
    layout["scaling_layer.shift"] = (1, 3, 1, 1)
    layout["scaling_layer.scale"] = (1, 3, 1, 1)
    for name, out in (("encode_task_layer", codebook_dim), ("decode_task_layer", decoder_out)):
        layout.update({f"{name}.0.weight": (dim, dim), f"{name}.0.bias": (dim,)})
        layout.update({f"{name}.2.weight": (out, dim), f"{name}.2.bias": (out,)})
    return layout


def random_vqkd_state(layout: dict[str, tuple[int, ...]], *, seed: int = 0) -> dict[str, object]:
    """Random tensors for a :func:`vqkd_release_layout`: norms near 1, l2-normalized codebook, weights ~N(0, 0.2)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    state: dict[str, object] = {}
    for key, shape in layout.items():
        if key.endswith(("norm1.weight", "norm2.weight", "fc_norm.weight")):
            value = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif key.startswith("quantize.embedding.") and len(shape) == 2:
            value = torch.nn.functional.normalize(torch.randn(shape, generator=g), dim=-1)
        elif key.endswith("initted"):
            value = torch.ones(shape)
        elif "cluster_size" in key:
            value = torch.rand(shape, generator=g)
        else:
            value = 0.2 * torch.randn(shape, generator=g)
        state[key] = value
    return state


def write_vqkd_file(path: Path, *, seed: int = 0, **sizes: int) -> Path:
    """A random tokenizer file in the released layout (``{"model": state_dict}``, as released); sizes as
    :func:`vqkd_release_layout` (default :data:`TINY_VQKD` with a 1-block decoder)."""
    import torch

    sizes = {**TINY_VQKD, "decoder_depth": 1, "decoder_out": 16, **sizes}
    torch.save({"model": random_vqkd_state(vqkd_release_layout(**sizes), seed=seed)}, path)
    return path


def random_timm_vit():
    """A small timm ViT (64 px, 8-px patches, d=128, 2 blocks, no classifier) with every weight perturbed, in eval
    mode: the source model of the timm import tests. Skips the calling test without timm."""
    import torch

    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    sizes = dict(img_size=64, patch_size=8, embed_dim=128, depth=2, num_heads=4, num_classes=0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, **sizes).eval()
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vit
