"""Weights as users share them: `save_pretrained` / `from_pretrained` folders, `mmoe-convert` into them, and timm's
classifier contract on the backbone (docs/interfaces.md section 2)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import random_timm_vit

from mmoe.model import create_model, from_pretrained, load_model, save_model
from mmoe.model.io import CONFIG_NAME, TOKENIZER_NAME, WEIGHTS_NAME, load_checkpoint_file

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SMALL = dict(depth=2)  # one dense and one MoE block


def _perturbed(name: str, **overrides):
    """A model whose every parameter is random (LayerNorms, biases, positions too), so a lost tensor shows."""
    torch.manual_seed(0)
    model = create_model(name, **{**SMALL, **overrides}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _inputs(size: int = 64, vocab: int = 49408):
    g = torch.Generator().manual_seed(1)
    image = torch.randn(2, 3, size, size, generator=g)
    text = torch.randint(0, vocab, (2, 6), generator=g)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 3:] = True
    return image, text, pad


def _forward(model):
    image, text, pad = _inputs(vocab=min(49408, model.config.vocab_size))
    with torch.no_grad():
        out = model(image=image, text=text, text_padding_mask=pad)
    return out.features, {k: r.expert_ids for k, r in out.routing.items()}


@pytest.mark.parametrize("name", ["tiny", "tiny_mhmoe", "tiny_xmoe"])
def test_save_pretrained_round_trip_is_bit_exact_without_pickle(tmp_path, monkeypatch, name):
    model = _perturbed(name)
    folder = model.save_pretrained(tmp_path / "out")
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]  # no temp files left
    meta = json.loads((folder / CONFIG_NAME).read_text())
    assert meta["format"] == "mmoe" and meta["config"] == model.config.to_dict()
    assert meta["tokenizer"] == model.tokenizer_spec and meta["pretrained_cfg"]["input_size"] == [3, 64, 64]

    def no_pickle(*args, **kwargs):
        raise AssertionError("from_pretrained must not call torch.load")

    monkeypatch.setattr(torch, "load", no_pickle)
    again = from_pretrained(folder).eval()
    assert again.config == model.config
    mine, theirs = model.state_dict(), again.state_dict()
    assert list(mine) == list(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)
    (f1, r1), (f2, r2) = _forward(model), _forward(again)
    assert torch.equal(f1, f2) and r1.keys() == r2.keys() and all(torch.equal(r1[k], r2[k]) for k in r1)
    # the same folder through the one builder: a new image size resamples the positions, the rest loads as is
    bigger = create_model(name, init_from=folder, **{**SMALL, "img_size": 96})
    assert bigger.vision_embed.pos_embed.shape == (1, 145, 128)
    assert torch.equal(bigger.blocks[1].norm1.vision.weight, model.blocks[1].norm1.vision.weight)


def test_a_task_module_starts_from_a_folder(tmp_path):
    from mmoe.train.pretraining import MaskedPretraining

    model = _perturbed("tiny_mhmoe")
    folder = model.save_pretrained(tmp_path / "pre")
    assert load_checkpoint_file(folder)["format"] == "mmoe"
    task = MaskedPretraining(backbone=None, init_from=str(folder), eval_grounding=False)
    mine, theirs = model.state_dict(), task.backbone.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_from_pretrained_names_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_pretrained(tmp_path / "nowhere")
    folder = tmp_path / "f"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match=f"no {CONFIG_NAME}"):
        from_pretrained(folder)
    _perturbed("tiny").save_pretrained(folder)
    (folder / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        from_pretrained(folder)
    (folder / CONFIG_NAME).write_text(json.dumps({"architecture": "vit"}))
    with pytest.raises(ValueError, match="not an mmoe config"):
        from_pretrained(folder)
    (folder / CONFIG_NAME).write_text(json.dumps({"format": "mmoe", "config": {"dim": 128, "depthh": 2}}))
    with pytest.raises(ValueError, match="depthh"):
        from_pretrained(folder)
    (folder / WEIGHTS_NAME).write_bytes(b"\x00" * 16)
    (folder / CONFIG_NAME).write_text(json.dumps({"format": "mmoe", "config": {}}))
    with pytest.raises(ValueError, match="cannot read"):
        from_pretrained(folder)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        _perturbed("tiny").save_pretrained(tmp_path / "file")


def test_sentencepiece_tokenizer_travels_with_the_folder(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["a red circle next to a blue square", "the green triangle is above a star"] * 20))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "tok"), vocab_size=24, minloglevel=2)
    tok_file = tmp_path / "tok.model"
    spec = dict(tokenizer="sentencepiece", tokenizer_path=str(tok_file), vocab_size=100, pad_id=1, mask_id=25)
    model = _perturbed("tiny", **spec)
    model.save_pretrained(tmp_path / "a")
    assert (tmp_path / "a" / TOKENIZER_NAME).read_bytes() == tok_file.read_bytes()
    assert json.loads((tmp_path / "a" / CONFIG_NAME).read_text())["tokenizer"]["path"] == TOKENIZER_NAME
    shutil.move(tmp_path / "a", tmp_path / "moved")  # another machine: the original file is not there
    tok_file.unlink()
    again = from_pretrained(tmp_path / "moved")
    assert again.tokenizer_spec["path"] == str((tmp_path / "moved" / TOKENIZER_NAME).resolve())
    from mmoe.data.tokenizer import tokenizer_from_spec

    tok = tokenizer_from_spec(again.tokenizer_spec)
    assert (tok.pad_id, tok.mask_id) == (1, 25)
    assert torch.equal(_forward(model)[0], _forward(again)[0])


# ---------------------------------------------------------------------- timm's classifier contract
def test_timm_classifier_contract(tmp_path):
    timm_data = pytest.importorskip("timm.data")
    model = _perturbed("tiny_mhmoe", image_mean=[0.4, 0.45, 0.5], image_std=[0.2, 0.25, 0.3])
    assert model.num_classes == 0 and isinstance(model.get_classifier(), torch.nn.Identity)
    image = _inputs()[0]
    with torch.no_grad():
        feats = model.forward_features(image)
        assert torch.equal(model.forward_head(feats), feats[:, 0])  # no classifier: the pooled CLS feature
        model.reset_classifier(7, global_pool="avg")
        assert model.num_classes == 7 and model.config.num_classes == 7 and model.global_pool == "avg"
        logits = model.forward_head(feats)
        pooled = feats[:, 1:].mean(1)
        torch.testing.assert_close(logits, pooled @ model.head.weight.T + model.head.bias, atol=1e-6, rtol=0)
        assert torch.equal(model.forward_head(feats, pre_logits=True), pooled)
    cfg = timm_data.resolve_data_config(model=model)
    assert cfg["input_size"] == (3, 64, 64) and cfg["mean"] == (0.4, 0.45, 0.5) and cfg["std"] == (0.2, 0.25, 0.3)
    assert cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 0.875
    assert dict(model.named_modules())[model.pretrained_cfg["first_conv"]].__class__ is torch.nn.Conv2d
    transform = timm_data.create_transform(**cfg)  # timm's eval pipeline built from it runs
    from PIL import Image

    assert transform(Image.new("RGB", (80, 70))).shape == (3, 64, 64)
    # the classifier is part of the saved model, and a fresh or resized head never blocks loading the backbone
    folder = model.save_pretrained(tmp_path / "cls")
    again = from_pretrained(folder)
    assert again.num_classes == 7 and torch.equal(again.head.weight, model.head.weight)
    other = create_model("tiny_mhmoe", init_from=folder, **SMALL, num_classes=3)
    assert other.head.weight.shape == (3, 128)
    assert torch.equal(other.blocks[1].norm1.vision.weight, model.blocks[1].norm1.vision.weight)
    headless = create_model("tiny_mhmoe", init_from=folder, **SMALL)
    assert headless.num_classes == 0
    model.reset_classifier(0)
    assert isinstance(model.head, torch.nn.Identity) and not any(k.startswith("head.") for k in model.state_dict())


def test_a_headless_backbone_is_unchanged_by_the_classifier_contract():
    """The head is built after the backbone's initialisation: with the same seed the backbones are equal."""
    torch.manual_seed(3)
    plain = create_model("tiny", **SMALL)
    torch.manual_seed(3)
    with_head = create_model("tiny", **SMALL, num_classes=5)
    own = plain.state_dict()
    assert all(torch.equal(v, own[k]) for k, v in with_head.state_dict().items() if not k.startswith("head."))
    with pytest.raises(ValueError, match="num_classes"):
        create_model("tiny", num_classes=-1)
    with pytest.raises(ValueError, match="global_pool"):
        create_model("tiny", global_pool="max")


# ---------------------------------------------------------------------- mmoe-convert
def _convert(argv: list[str]) -> int:
    from mmoe.cli import convert_checkpoint

    return convert_checkpoint.main(argv)


def test_convert_lightning_checkpoint_into_a_folder(tmp_path):
    model = _perturbed("tiny_mhmoe")
    ckpt = {
        "state_dict": {**{f"backbone.{k}": v for k, v in model.state_dict().items()}, "mlm_head.weight": torch.ones(2)},
        "mmoe_config": model.config.to_dict(),
        "epoch": 3,
    }
    torch.save(ckpt, tmp_path / "last.ckpt")
    assert _convert(["--from", "mmoe", str(tmp_path / "last.ckpt"), str(tmp_path / "shared")]) == 0
    meta = json.loads((tmp_path / "shared" / CONFIG_NAME).read_text())
    assert meta["extra"]["converted_from"] == "mmoe"
    again = from_pretrained(tmp_path / "shared").eval()
    assert torch.equal(_forward(model)[0], _forward(again)[0])
    assert _convert(["--from", "mmoe", str(tmp_path / "shared"), str(tmp_path / "file.pt")]) == 0  # folder -> file
    assert torch.equal(_forward(load_model(tmp_path / "file.pt").eval())[0], _forward(model)[0])
    with pytest.raises(SystemExit, match="does not exist"):
        _convert(["--from", "mmoe", str(tmp_path / "nope.ckpt"), str(tmp_path / "x")])


def test_convert_timm_safetensors_folder(tmp_path):
    from safetensors.torch import save_file

    vit = random_timm_vit()
    hub = tmp_path / "hub"  # the layout of a timm model downloaded from the Hugging Face hub
    hub.mkdir()
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, hub / "model.safetensors")
    (hub / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224"}))
    target = tmp_path / "vit_target.yaml"
    create_model("tiny", depth=2, subln=False, layernorm_eps=1e-6).config.to_yaml(target)
    out = tmp_path / "vit_mmoe"
    assert _convert(["--from", "timm", str(hub), str(out), "--model", str(target), "--copy-to-text"]) == 0
    model = from_pretrained(out).eval()
    image = _inputs()[0]
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(image), vit.forward_features(image), atol=1e-5, rtol=0)
    # --copy-to-text seeded the language branch with the vision weights
    assert torch.equal(model.blocks[0].attn.q_proj.text.weight, model.blocks[0].attn.q_proj.vision.weight)
    # the bare file works too, and a file that is not safetensors is named
    assert (
        _convert(["--from", "timm", str(hub / "model.safetensors"), str(tmp_path / "v.pt"), "--model", str(target)])
        == 0
    )
    (tmp_path / "bad.safetensors").write_bytes(b"\x01" * 20)
    with pytest.raises(SystemExit, match="bad.safetensors"):
        _convert(["--from", "timm", str(tmp_path / "bad.safetensors"), str(out), "--model", str(target)])


def test_model_file_and_folder_hold_the_same_model(tmp_path):
    model = _perturbed("tiny_smoe")
    save_model(model, tmp_path / "m.pt")
    model.save_pretrained(tmp_path / "m")
    a, b = load_model(tmp_path / "m.pt"), load_model(tmp_path / "m")
    assert a.config == b.config and all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values())
    )
    from mmoe.viz.capture import resolve_model  # mmoe-viz --checkpoint FOLDER

    viz_model, label = resolve_model(str(tmp_path / "m"))
    assert label == "m" and viz_model.config == a.config and not viz_model.training
