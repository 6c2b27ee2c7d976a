"""``mmoe-convert``: convert checkpoints into shareable mmoe weights, or upcycle a dense mmoe model into an MoE one.

    # one of our Lightning checkpoints (or an mmoe model file) -> a folder: config.json + model.safetensors
    mmoe-convert --from mmoe runs/pretrain/tiny_mhmoe/checkpoints/last.ckpt out/tiny_mhmoe
    # released BEiT-3 (torchscale BEiT3 state dict, bare or under "model", optionally "beit3."-prefixed)
    mmoe-convert --from beit3 beit3_base_patch16_224.pth out/beit3.pt --tokenizer beit3.spm
    # timm ViT into the vision side of a dense config (use subln: false, layernorm_eps: 1e-6 for exactness);
    # IN may be a .pth, timm's model.safetensors, or a downloaded timm folder holding model.safetensors
    mmoe-convert --from timm vit/model.safetensors out/vit --model my_vit.yaml [--copy-to-text]
    # sparse upcycling: experts start from the dense FFNs; CONFIG's `moe:` block is used
    mmoe-convert --upcycle tiny_mhmoe dense.pt out/upcycled.pt --mode split

OUT ending in .pt or .pth is an mmoe model file; any other OUT is a `save_pretrained` folder (config.json with the
MultiwayConfig and the tokenizer spec, model.safetensors). Both are read back by `mmoe.model.from_pretrained(OUT)`
/ `load_model(OUT)` and by every `init_from`. Without `--model`, BEiT-3 sizes are inferred from the state dict
(heads: BEiT-3's head width 64, or --num-heads). Inputs are read with `torch.load(weights_only=True)` or, for
.safetensors, with safetensors (no pickle); `--trust-pickle` allows full unpickling for checkpoints that also pickle
Python objects (only for trusted files).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from mmoe.cli.progress import ToolProgress, add_progress_flag
from mmoe.model import create_model, get_config, load_backbone_weights, load_model, save_model, save_pretrained
from mmoe.model.backbone import MultiwayTransformer
from mmoe.model.convert import (
    beit3_config_from_state_dict,
    convert_beit3_state_dict,
    convert_timm_vit_state_dict,
    unwrap_state_dict,
)
from mmoe.model.upcycling import upcycle

MODEL_FILE_SUFFIXES = (".pt", ".pth")


def read_state(path: str, trust_pickle: bool) -> dict[str, torch.Tensor]:
    """The state dict of a foreign checkpoint: a torch file, a ``.safetensors`` file or a folder holding
    ``model.safetensors`` (how timm models are published on the Hugging Face hub)."""
    source = Path(path)
    if source.is_dir() and (source / "model.safetensors").is_file():
        source = source / "model.safetensors"
    if not source.is_file():
        raise SystemExit(f"mmoe-convert: input {path} does not exist")
    if source.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(source, device="cpu")
        except (SafetensorError, OSError) as err:
            raise SystemExit(f"mmoe-convert: cannot read {source} as safetensors ({err})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as err:  # noqa: BLE001 - report why the safe loader refused the file
        raise SystemExit(
            f"mmoe-convert: torch.load(weights_only=True) cannot read {path} ({type(err).__name__}: "
            f"{str(err).splitlines()[0]}); if you trust the file, pass --trust-pickle"
        ) from None
    return unwrap_state_dict(obj, source=path)


def convert_beit3(args: argparse.Namespace) -> tuple[MultiwayTransformer, dict[str, Any]]:
    state = read_state(args.input, args.trust_pickle)
    ids = {"pad_id": args.pad_id, "mask_id": args.mask_id}
    config = beit3_config_from_state_dict(
        state, model=args.model, num_heads=args.num_heads, tokenizer_path=args.tokenizer, **ids
    )
    converted, unused = convert_beit3_state_dict(state)
    model = MultiwayTransformer(config)
    load_backbone_weights(model, converted, strict=True)
    return model, {"converted_from": "beit3", "source": str(args.input), "unused_keys": unused}


def convert_timm(args: argparse.Namespace) -> tuple[MultiwayTransformer, dict[str, Any]]:
    if args.model is None:
        raise SystemExit("mmoe-convert --from timm: --model NAME_OR_YAML (the target dense config) is required")
    state = read_state(args.input, args.trust_pickle)
    model = create_model(args.model)
    converted = convert_timm_vit_state_dict(state, model.config, copy_to_text=args.copy_to_text)
    missing, unexpected = load_backbone_weights(model, converted, strict=False)
    if unexpected:
        raise SystemExit(f"mmoe-convert --from timm: keys not in the target model: {unexpected[:10]}")
    return model, {"converted_from": "timm", "source": str(args.input), "not_loaded": missing}


def convert_mmoe(args: argparse.Namespace) -> tuple[MultiwayTransformer, dict[str, Any]]:
    """One of our Lightning checkpoints, an mmoe model file or a pretrained folder: its backbone, as it is."""
    if not Path(args.input).exists():
        raise SystemExit(f"mmoe-convert: input {args.input} does not exist")
    return load_model(args.input), {"converted_from": "mmoe", "source": str(args.input)}


def run_upcycle(args: argparse.Namespace) -> tuple[MultiwayTransformer, dict[str, Any]]:
    moe = get_config(args.upcycle).moe
    if moe is None:
        raise SystemExit(f"mmoe-convert --upcycle: config {args.upcycle!r} has no `moe:` block")
    model = upcycle(args.input, moe, mode=args.mode, source=args.source)
    return model, {"upcycled_from": str(args.input), "mode": args.mode, "source": args.source}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmoe-convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--from",
        dest="source_format",
        choices=["mmoe", "beit3", "timm"],
        help="input format: mmoe (our Lightning checkpoint, model file or folder), beit3 or timm",
    )
    what.add_argument("--upcycle", metavar="CONFIG", help="model name or YAML whose `moe:` block to upcycle into")
    p.add_argument("input", help="input checkpoint")
    p.add_argument("output", help="output: a save_pretrained folder, or an mmoe model file when it ends in .pt/.pth")
    p.add_argument("--model", help="registered model name or YAML (BEiT-3: architecture to check against)")
    p.add_argument("--num-heads", type=int, help="attention heads when --model is absent (default dim // 64)")
    p.add_argument("--tokenizer", help="sentencepiece model of the checkpoint's vocabulary (e.g. beit3.spm)")
    p.add_argument("--pad-id", type=int, help="pad id of that tokenizer (default 1, XLM-R layout)")
    p.add_argument("--mask-id", type=int, help="mask id (default: number of sentencepiece pieces + 1)")
    p.add_argument("--copy-to-text", action="store_true", help="timm: also initialize the language branches")
    p.add_argument("--mode", choices=["replicate", "split"], default="replicate", help="upcycling of experts")
    p.add_argument(
        "--source",
        choices=["alternate", "vision", "text"],
        default="alternate",
        help="upcycling with a shared pool: which dense FFN seeds each expert",
    )
    p.add_argument("--trust-pickle", action="store_true", help="allow torch.load(weights_only=False)")
    add_progress_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mmoe-convert`` console script; exit status 0 when the model file is written."""
    parser = build_parser()
    args = parser.parse_args(argv)
    converters = {"mmoe": convert_mmoe, "beit3": convert_beit3, "timm": convert_timm}
    convert = run_upcycle if args.upcycle else converters[args.source_format]
    with ToolProgress.from_args("mmoe-convert", args) as progress:
        what = f"upcycling {args.input}" if args.upcycle else f"reading and converting {args.input}"
        try:
            with progress.step(what):
                model, extra = convert(args)
        except ValueError as err:  # a refused conversion is a usage error: one line, exit status 2, nothing written
            parser.error(str(err))
        with progress.step(f"writing {args.output}"):
            if Path(args.output).suffix in MODEL_FILE_SUFFIXES:
                save_model(model, args.output, extra=extra)
            else:
                save_pretrained(model, args.output, extra=extra)
    n_params = sum(p.numel() for p in model.parameters())
    cfg = model.config
    print(
        f"wrote {args.output}: depth {cfg.depth}, dim {cfg.dim}, heads {cfg.num_heads}, img {cfg.img_size}, "
        f"vocab {cfg.vocab_size} ({cfg.tokenizer}), moe {'none' if cfg.moe is None else cfg.moe.num_experts}, "
        f"{n_params / 1e6:.1f}M parameters"
    )
    for key in ("unused_keys", "not_loaded"):
        if extra.get(key):
            print(f"{key} ({len(extra[key])}): {extra[key][:8]}{' ...' if len(extra[key]) > 8 else ''}")
    progress.summary(f"{args.input} -> {args.output}, {n_params / 1e6:.1f}M parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
