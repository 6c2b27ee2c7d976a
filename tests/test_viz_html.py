"""The interactive routing viewer (`mmoe-viz --html`): its data, that it is self-contained, and the page itself as a
browser runs it (headless Chromium; skipped with the reason when no Chromium is installed)."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image
from test_viz_helpers import StandInBackbone, red_expert

from mmoe.viz.capture import collect_routing
from mmoe.viz.experts import DEFAULT_ALPHA, expert_colors
from mmoe.viz.html import viewer_data, write_html
from mmoe.viz.inputs import VizInput

GRID = 4  # 32 px images in 8 px patches


def _painted(reds: np.ndarray) -> Image.Image:
    arr = np.zeros((GRID * 8, GRID * 8, 3), dtype=np.uint8)
    arr[..., 0] = np.kron(np.round(reds * 255).astype(np.uint8), np.ones((8, 8), dtype=np.uint8))
    return Image.fromarray(arr)


REDS = np.linspace(0, 1, GRID * GRID).reshape(GRID, GRID)
INPUTS = [
    VizInput("painted.png", _painted(REDS), "a red square"),
    VizInput("flipped.png", _painted(REDS[::-1]), "two shapes"),
]


def _results(compare: bool = False):
    """One stand-in model (E=4, h=2, top-2), or two with different E, h and k side by side."""
    models = [("mhmoe", StandInBackbone(heads=2, experts=4, top_k=2))]
    if compare:
        models.append(("smoe", StandInBackbone(heads=1, experts=8, top_k=1, layers=("layer1", "layer2", "layer3"))))
    return [collect_routing(m, INPUTS, label=label, batch_size=1) for label, m in models]


def _palette(num_experts: int) -> list[str]:
    """The PNGs' expert colours as CSS hex strings."""
    return ["#" + "".join(f"{round(255 * v):02x}" for v in rgb) for rgb in expert_colors(num_experts)]


def _expected_routes(model: StandInBackbone, reds: np.ndarray, r: int, c: int) -> list[list[int]]:
    """The stand-in's top-k experts of patch (r, c)'s sub-tokens: head j's first choice is `red_expert`, then +1."""
    first = [red_expert(float(reds[r, c]), j, model.e) for j in range(model.h)]
    return [[(e + kk) % model.e for kk in range(model.k)] for e in first]


def test_viewer_data_carries_every_sub_tokens_top_k():
    (result,) = _results()
    data = viewer_data([result], threshold=0.01)
    model = data["models"][0]
    assert model["keys"] == ["layer1", "layer3"] and model["grid"] == [GRID, GRID]
    for i, reds in enumerate([REDS, REDS[::-1]]):
        entry = model["layers"]["layer3"]["images"][i]
        assert entry["input"] == i
        for r, c in [(0, 0), (1, 2), (3, 3)]:
            assert entry["experts"][r][c] == _expected_routes(StandInBackbone(heads=2, experts=4, top_k=2), reds, r, c)
            assert entry["gates"][r][c] == [[0.9, 0.5]] * 2  # make_record's gates
    # the numbers the PNGs and experts.json show travel unchanged
    assert model["layers"]["layer1"]["load"] == result.accumulator.to_json(0.01)["layer1"]["load"]
    assert [t["token"] for t in model["layers"]["layer1"]["text"][0]["tokens"]][0] == "<bos>"
    # both images are embedded once, as PNG data URIs
    assert len(data["images"]) == 2 and all(u.startswith("data:image/png;base64,") for u in data["images"])
    assert data["colors"]["4"] == _palette(4)


def test_viewer_data_refuses_equal_labels():
    a, b = _results(compare=True)
    b.label = a.label
    with pytest.raises(ValueError, match="labels must differ"):
        viewer_data([a, b], threshold=0.01)


def test_page_is_self_contained(tmp_path):
    path = write_html(_results(compare=True), tmp_path, threshold=0.01, files=["load_heatmap.png"])
    page = path.read_text()
    assert path == tmp_path / "index.html"
    assert not re.search(r"<(script|img|link|iframe)[^>]+(src|href)=\"(?!data:)", page), "an asset is not inlined"
    assert "http://" not in page and "https://" not in page
    assert page.count("<script") == 2  # the routing data and the inlined viewer script
    data = json.loads(re.search(r'<script type="application/json" id="routing-data">(.*?)</script>', page, re.S)[1])
    assert [m["label"] for m in data["models"]] == ["mhmoe", "smoe"]
    assert '<a href="load_heatmap.png">' in page


def test_embedded_json_cannot_end_the_script_early(tmp_path):
    (result,) = _results()
    result.inputs[0] = VizInput("</script><b>x</b>", result.inputs[0].image, result.inputs[0].text)
    page = write_html([result], tmp_path, threshold=0.01).read_text()
    block = re.search(r'id="routing-data">(.*?)</script>', page, re.S)[1]
    assert json.loads(block)["inputs"][0]["source"] == "</script><b>x</b>"


def _chromium() -> str:
    for name in (os.environ.get("MMOE_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    pytest.skip(
        "no Chromium found (chromium, chromium-browser, google-chrome or $MMOE_CHROMIUM): the routing viewer's page "
        "test needs a headless browser; `apt-get install chromium` (Debian; .ci/run installs it)"
    )


def _run_page(tmp_path, page, *extra: str, url_suffix: str = "?selftest") -> subprocess.CompletedProcess:
    cmd = [
        _chromium(),
        "--headless",
        "--no-sandbox",  # CI containers run as root, where Chromium's sandbox refuses to start
        "--disable-gpu",
        f"--user-data-dir={tmp_path / 'profile'}",
        *extra,
        page.as_uri() + url_suffix,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def _self_test(tmp_path, page) -> dict:
    """Open the page with ?selftest and read what its script wrote into <pre id="selftest-result">."""
    proc = _run_page(tmp_path, page, "--dump-dom")
    m = re.search(r'<pre id="selftest-result">(.*?)</pre>', proc.stdout, re.S)
    assert m and m[1], f"no self-test result in the DOM (rc {proc.returncode}): {proc.stderr[-2000:]}"
    result = json.loads(html.unescape(m[1]))
    assert result.get("ok"), result
    return result


def _rgba(hex_color: str, alpha: float) -> str:
    n = int(hex_color[1:], 16)
    return f"rgba({(n >> 16) & 255}, {(n >> 8) & 255}, {n & 255}, {alpha})"


def test_page_in_headless_chromium(tmp_path):
    results = _results(compare=True)
    page = write_html(results, tmp_path, threshold=0.01)
    out = _self_test(tmp_path, page)
    assert out["layer_options"] == ["layer1", "layer3", "layer2"]  # every key of either model, first seen first
    assert out["view_options"] == ["majority", "head0", "head1", "diversity"]
    assert out["models"] == 2 and out["images"] == 2 and out["input"] == 0
    models = {"mhmoe": StandInBackbone(heads=2, experts=4, top_k=2), "smoe": StandInBackbone(heads=1, experts=8)}
    models["smoe"].k = 1
    for rec in out["layers"]:
        for info, res in zip(rec["models"], results):
            model = models[res.label]
            assert info["heat_cells"] == model.e * len(res.first)  # experts x this model's layers
            if rec["key"] not in res.first:  # layer2: only the second model has it
                assert res.label == "mhmoe" and info["cells"] == 0 and info["tokens"] == 0
                continue
            assert info["cells"] == GRID * GRID
            hover = info["hover"]
            assert (hover["r"], hover["c"]) == (GRID - 1, 1)
            want = _expected_routes(model, REDS, GRID - 1, 1)
            assert [row["experts"] for row in hover["routes"]] == want, (res.label, rec["key"])
            assert [row["gates"] for row in hover["routes"]] == [[0.9, 0.5][: model.k]] * model.h
            # the patch is painted in its majority expert's colour, as the PNGs do
            major = int(res.majority(rec["key"], 0)[GRID - 1, 1])
            assert hover["color"] == _rgba(_palette(model.e)[major], DEFAULT_ALPHA)
            assert info["hint_after_mouseout"]
            assert info["pinned"]["marked"] and [row["experts"] for row in info["pinned"]["routes"]] == (
                _expected_routes(model, REDS, 0, 0)
            )
            tokens = [row["token"] for row in res.texts[0].rows[rec["key"]]]
            assert info["tokens"] == len(tokens) and info["words"][0] == "<bos>" and info["words"][-1] == "<eos>"


@pytest.mark.slow
def test_mmoe_viz_html_and_screenshot(tmp_path):
    """The command end to end on a fresh tiny model, and a screenshot of its page (what docs/ shows)."""
    from helpers import sample

    from mmoe.cli.visualize_experts import main

    image = sample("000000000139.jpg")
    out = tmp_path / "viz"
    argv = ["--model", "tiny_mhmoe", "--compare", "tiny_smoe", "--image", str(image), "--text", "a living room"]
    assert main([*argv, "--out", str(out), "--html"]) == 0
    page = out / "index.html"
    text = page.read_text()
    for f in ("tiny_mhmoe/load_heatmap.png", "compare/load_heatmap.png", "tiny_smoe/text/routing.md"):
        assert f'href="{f}"' in text and (out / f).is_file()
    result = _self_test(tmp_path, page)
    assert [m["label"] for m in result["layers"][0]["models"]] == ["tiny_mhmoe", "tiny_smoe"]
    assert all(m["cells"] == 64 for m in result["layers"][0]["models"])  # 64 px images in 8 px patches
    shot = tmp_path / "shot.png"
    _run_page(tmp_path, page, "--hide-scrollbars", "--window-size=1200,900", f"--screenshot={shot}", url_suffix="")
    img = np.asarray(Image.open(shot).convert("L"))
    assert img.shape == (900, 1200) and img.std() > 10, "blank screenshot"
