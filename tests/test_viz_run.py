"""End to end: a model with a known assignment -> PNGs and experts.json that carry exactly that assignment."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from test_viz_helpers import StandInBackbone, red_expert

from mmoe.viz.capture import collect_routing
from mmoe.viz.inputs import VizInput, load_inputs
from mmoe.viz.report import report_json, write_comparison, write_report

GRID = 4  # 32 px image, 8 px patches


def _painted(reds: np.ndarray) -> Image.Image:
    """An image whose patch (r, c) has red value reds[r, c] (green/blue 0)."""
    arr = np.zeros((GRID * 8, GRID * 8, 3), dtype=np.uint8)
    arr[..., 0] = np.kron(np.round(reds * 255).astype(np.uint8), np.ones((8, 8), dtype=np.uint8))
    return Image.fromarray(arr)


def _assert_png(path, min_side=100):
    img = Image.open(path)
    assert img.size[0] >= min_side and img.size[1] >= min_side
    assert np.asarray(img.convert("L")).std() > 5, f"{path} looks blank"


def test_json_carries_known_patch_assignment(tmp_path):
    e, h = 4, 2
    reds = np.array([[0, 1 / 3, 2 / 3, 1]] * GRID)  # columns -> experts 0, 1, 2, 3 for head 0
    model = StandInBackbone(heads=h, experts=e, top_k=1)
    inputs = [VizInput("painted.png", _painted(reds)), VizInput("flipped.png", _painted(reds[:, ::-1]))]
    result = collect_routing(model, inputs, label="standin", batch_size=1)
    data = report_json(result, threshold=0.01)
    for i, r in enumerate([reds, reds[:, ::-1]]):
        expect = np.array([[[red_expert(v, j, e) for j in range(h)] for v in row] for row in r])
        for key in ("layer1", "layer3"):
            img = data["layers"][key]["images"][i]
            assert np.array_equal(np.array(img["first_choice"]), expect), (key, i)
            assert np.array_equal(np.array(img["diversity"]), np.full((GRID, GRID), 2))
            # one vote each, equal gates -> the lower expert id
            assert np.array_equal(np.array(img["majority"]), expect.min(-1))
    # counts: per image, 16 patches x 2 heads + CLS x 2 heads, each expert (v + j) % 4
    counts = np.zeros(e, dtype=int)
    for r in (reds, reds[:, ::-1]):
        for v in r.ravel():
            for j in range(h):
                counts[red_expert(v, j, e)] += 1
        counts[[0, 1]] += 1  # CLS: head j -> expert j
    layer = data["layers"]["layer1"]
    assert layer["counts"] == counts.tolist() == layer["counts_vision"]
    assert layer["activation_ratio"] == 1.0 and layer["mean_patch_diversity"] == 2.0


def test_report_files(tmp_path):
    model = StandInBackbone(heads=2, experts=4, top_k=1, layers=("layer1", "layer3"))
    reds = np.linspace(0, 1, GRID * GRID).reshape(GRID, GRID)
    result = collect_routing(model, [VizInput("painted.png", _painted(reds))], label="standin")
    data = write_report(result, tmp_path, layers=["layer1"])  # per-image maps of layer1 only
    assert set(data["layers"]) == {"layer1", "layer3"}  # the numbers cover every layer
    on_disk = json.loads((tmp_path / "experts.json").read_text())
    assert (
        on_disk["layers"]["layer1"]["images"][0]["first_choice"]
        == data["layers"]["layer1"]["images"][0]["first_choice"]
    )
    assert on_disk["grid_size"] == [GRID, GRID]
    expected = {
        "images/000_painted/layer1_experts.png",
        "images/000_painted/layer1_diversity.png",
        "load_heatmap.png",
        "activation.png",
        "activation_ratio.png",
    }
    assert set(on_disk["files"]) == expected
    for rel in expected:
        _assert_png(tmp_path / rel)


def test_text_table_and_picture(tmp_path):
    model = StandInBackbone(heads=2, experts=5, top_k=2, per_modality=True, layers=("layer1",))
    text = "a red circle"
    result = collect_routing(model, [VizInput("x", _painted(np.zeros((GRID, GRID))), text)], label="m")
    data = write_report(result, tmp_path)
    assert set(data["layers"]) == {"layer1.vision", "layer1.text"}
    rows = data["layers"]["layer1.text"]["text"][0]["tokens"]
    assert [r["token"] for r in rows] == ["<bos>", "a", "red", "circle", "<eos>"]
    from mmoe.data.tokenizer import build_tokenizer

    ids, pad = build_tokenizer("openclip", max_len=12)([text])
    for r, t in zip(rows, ids[0][~pad[0]].tolist()):
        assert r["experts"] == [[(t + j + kk) % 5 for kk in range(2)] for j in range(2)]
    words = data["layers"]["layer1.text"]["text"][0]["words"]
    assert [w["word"] for w in words] == ["<bos>", "a", "red", "circle", "<eos>"]
    md = (tmp_path / "text" / "routing.md").read_text()
    assert "| red | red |" in md and "### layer1.text" in md
    _assert_png(tmp_path / "text" / "000_routing.png")
    assert data["layers"]["layer1.vision"]["text"] == [] and data["layers"]["layer1.text"]["images"] == []


def test_load_inputs_folder_shard_file_text(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("b.png", "a.jpg"):
        _painted(np.zeros((GRID, GRID))).save(folder / name)
    (folder / "notes.txt").write_text("ignored")
    items = load_inputs(folder, text="hi")
    assert [i.source.rsplit("/", 1)[-1] for i in items] == ["a.jpg", "b.png"] and items[0].text == "hi"
    shard = tmp_path / "pair-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for key, caption in (("000001", "one"), ("000002", "two")):
            buf = io.BytesIO()
            _painted(np.ones((GRID, GRID))).save(buf, format="JPEG")
            for ext, payload in (("jpg", buf.getvalue()), ("txt", caption.encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    items = load_inputs(shard)
    assert [(i.source, i.text) for i in items] == [("pair-000000.tar:000001", "one"), ("pair-000000.tar:000002", "two")]
    assert load_inputs(shard, text="x", limit=1)[0].text == "x"
    coco = tmp_path / "coco-000000.tar"  # mmoe.data.shard_writer stores COCO captions as json
    with tarfile.open(coco, "w") as tar:
        buf = io.BytesIO()
        _painted(np.ones((GRID, GRID))).save(buf, format="PNG")
        meta = json.dumps({"captions": ["a red square", "red"], "image_id": 7}).encode()
        for ext, payload in (("png", buf.getvalue()), ("json", meta)):
            info = tarfile.TarInfo(f"000007.{ext}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    assert [(i.source, i.text) for i in load_inputs(coco)] == [("coco-000000.tar:000007", "a red square")]
    assert load_inputs(folder / "a.jpg")[0].image.size == (32, 32)
    only = load_inputs(None, text="words only")
    assert only[0].image is None
    with pytest.raises(FileNotFoundError, match="--image"):
        load_inputs(tmp_path / "missing.png")


def test_compare_two_models(tmp_path):
    inputs = [VizInput("p.png", _painted(np.full((GRID, GRID), 0.5)))]
    smoe = collect_routing(StandInBackbone(heads=1, experts=8, top_k=1), inputs, label="smoe")
    mhmoe = collect_routing(StandInBackbone(heads=4, experts=8, top_k=1), inputs, label="mhmoe")
    summary = write_comparison([smoe, mhmoe], tmp_path, threshold=0.01)
    # red 0.5 -> round(3.5) = 4: h=1 reaches expert 4 (+ CLS expert 0); h=4 reaches 4..7 (+ CLS 0..3)
    assert summary["layers"]["smoe"]["layer1"]["activation_ratio"] == 2 / 8
    assert summary["layers"]["mhmoe"]["layer1"]["activation_ratio"] == 8 / 8
    assert summary["layers"]["smoe"]["layer1"]["mean_patch_diversity"] == 1.0
    assert summary["layers"]["mhmoe"]["layer1"]["mean_patch_diversity"] == 4.0
    for rel in summary["files"]:
        _assert_png(tmp_path / rel)
    assert {
        "load_heatmap.png",
        "activation.png",
        "activation_ratio.png",
        "000_p_majority.png",
        "000_p_diversity.png",
    } == set(summary["files"])
    with pytest.raises(ValueError, match="labels"):
        write_comparison([smoe, smoe], tmp_path)


def _force_routing(model: torch.nn.Module, targets: dict[int, list[int]]) -> None:
    """Hand-set the MH-MoE head layer and router so head j of every token picks expert targets[block][j].

    The head layer's weight is zeroed and its bias makes sub-token j the unit vector e_j (of width d/h), so the
    router logits of sub-token j are column j of the router weight: a large entry at the target expert wins.
    """
    from mmoe.moe import MHMoE

    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MHMoE)]
    if not layers:
        pytest.skip("tiny_mhmoe has no MHMoE modules")
    for name, moe in layers:
        block = int(name.split(".")[1])
        linears = [m for m in moe.head.modules() if isinstance(m, torch.nn.Linear)]
        router_w = getattr(moe.router, "weight", None)
        if not linears or router_w is None:
            pytest.skip("MHMoE internals changed (expected .head Linear and .router.weight)")
        head = linears[-1]
        h, width = moe.num_heads, router_w.shape[1]
        with torch.no_grad():
            head.weight.zero_()
            head.bias.zero_()
            router_w.zero_()
            for j, e in enumerate(targets[block]):
                head.bias[j * width + j] = 1.0
                router_w[e, j] = 10.0
        assert h == len(targets[block])


def test_tool_end_to_end_on_tiny_model_with_hand_set_router(tmp_path):
    """mmoe-viz on the real tiny backbone, saved as a Lightning checkpoint with forced routing."""
    import dataclasses

    from mmoe.model import create_model

    torch.manual_seed(0)
    model = create_model("tiny_mhmoe").eval()
    # Two sub-tokens share an expert, so the majority wins on votes alone. With four distinct choices it would be
    # decided by summed gates, which are equal here up to the last float bits and so differ from CPU to CPU.
    targets = {1: [5, 3, 5, 7], 3: [6, 4, 2, 4]}
    majority = {1: 5, 3: 4}
    _force_routing(model, targets)
    ckpt = tmp_path / "last.ckpt"  # the layout of our Lightning checkpoints (interfaces.md sec. 7)
    torch.save(
        {
            "state_dict": {f"backbone.{k}": v for k, v in model.state_dict().items()},
            "mmoe_config": dataclasses.asdict(model.config),
        },
        ckpt,
    )
    img = tmp_path / "grey.png"
    Image.fromarray(np.full((50, 70, 3), 128, dtype=np.uint8)).save(img)
    from mmoe.cli import visualize_experts as mod

    out = tmp_path / "out"
    assert mod.main(["--checkpoint", str(ckpt), "--image", str(img), "--text", "a grey square", "--out", str(out)]) == 0
    data = json.loads((out / "experts.json").read_text())
    g = model.config.img_size // model.config.patch_size
    assert data["grid_size"] == [g, g]
    for block, tgt in targets.items():
        layer = data["layers"][f"layer{block}"]
        first = np.array(layer["images"][0]["first_choice"])
        assert first.shape == (g, g, 4)
        assert (first == np.array(tgt)).all()
        assert (np.array(layer["images"][0]["diversity"]) == len(set(tgt))).all()
        assert (np.array(layer["images"][0]["majority"]) == majority[block]).all()
        for row in layer["text"][0]["tokens"]:
            assert [e[0] for e in row["experts"]] == tgt
        assert set(tgt) <= set(layer["activated_experts"])
    # the drawn PNG: head j's panel shows target expert's colour blended over the grey image at every patch
    from mmoe.viz.experts import DEFAULT_ALPHA, expert_colors

    png = np.asarray(Image.open(out / "images" / "000_grey" / "layer1_experts.png").convert("RGB")) / 255.0
    colours = {tuple(np.round(c, 2)) for c in png.reshape(-1, 3)}
    grey = 128 / 255
    for e in targets[1]:
        want = (1 - DEFAULT_ALPHA) * grey + DEFAULT_ALPHA * expert_colors(8)[e]
        assert any(np.abs(np.array(c) - want).max() < 0.015 for c in colours), f"expert {e} colour not drawn"
    _assert_png(out / "load_heatmap.png")
    _assert_png(out / "activation.png")
    _assert_png(out / "text" / "000_routing.png")


@pytest.mark.slow
def test_tool_compare_fresh_models(tmp_path):
    """--model NAME (fresh) with --compare NAME2 on the real tiny SMoE and MH-MoE."""
    from helpers import SAMPLES

    from mmoe.model import list_models

    if not {"tiny_smoe", "tiny_mhmoe"} <= set(list_models()):
        pytest.skip("tiny_smoe / tiny_mhmoe not registered")
    img = SAMPLES / "coco" / "val2017"
    if not img.is_dir():  # real COCO samples when the repo has them, else a noise image
        img = tmp_path / "noise.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(img)
    from mmoe.cli import visualize_experts as mod

    args = ["--model", "tiny_smoe", "--compare", "tiny_mhmoe", "--image", str(img), "--out", str(tmp_path / "o")]
    args += ["--limit", "2"]
    assert mod.main(args + ["--text", "two models"]) == 0
    summary = json.loads((tmp_path / "o" / "compare" / "compare.json").read_text())
    assert summary["models"] == ["tiny_smoe", "tiny_mhmoe"]
    assert (tmp_path / "o" / "tiny_smoe" / "experts.json").is_file()
    for rel in summary["files"]:
        _assert_png(tmp_path / "o" / "compare" / rel)
