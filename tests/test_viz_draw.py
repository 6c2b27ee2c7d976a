"""The drawn maps carry exactly the assignment they were given (pixel colours of the saved PNGs)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mmoe.viz.experts import (
    DEFAULT_ALPHA,
    axes_pixel_box,
    color_experts,
    diversity_colors,
    draw_activation_bars,
    draw_activation_summary,
    draw_assignment,
    draw_diversity,
    draw_load_heatmaps,
    draw_map_grid,
    expert_colors,
    figure_to_array,
    save_figure,
)
from mmoe.viz.records import majority_expert


def _png(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(np.float64) / 255.0


def _patch_centres(fig, ax, grid):
    left, top, right, bottom = axes_pixel_box(fig, ax)
    gh, gw = grid
    ys = top + (np.arange(gh) + 0.5) * (bottom - top) / gh
    xs = left + (np.arange(gw) + 0.5) * (right - left) / gw
    return ys.round().astype(int), xs.round().astype(int)


@pytest.mark.parametrize("n", [1, 4, 8, 10, 16, 20, 32, 64, 100])
def test_expert_colors_distinct(n):
    c = expert_colors(n)
    assert c.shape == (n, 3) and c.min() >= 0 and c.max() <= 1
    assert len({tuple(np.round(x, 3)) for x in c}) == n
    # the first colours stay the same when E grows (an expert keeps its colour in comparisons)
    if n >= 10:
        np.testing.assert_allclose(expert_colors(100)[:10], c[:10])


def test_assignment_png_pixels_match_assignment(tmp_path):
    gh, gw, h, e = 3, 4, 3, 8
    rng = np.random.default_rng(0)
    first = rng.integers(0, e, size=(gh, gw, h))
    first[0, 0] = -1  # a padding patch is grey
    gates = rng.random((gh, gw, h))
    maj = majority_expert(first, gates)
    grey = 0.5
    image = np.full((gh * 8, gw * 8, 3), grey)
    fig, panels = draw_assignment(image, first, maj, e, title="t")
    ax_by_panel = dict(zip(panels, fig.axes))
    boxes = {name: _patch_centres(fig, ax, (gh, gw)) for name, ax in ax_by_panel.items()}
    path = save_figure(fig, tmp_path / "a.png")
    png = _png(path)
    w, hgt = Image.open(path).size
    assert (w, hgt) == (round(fig.get_size_inches()[0] * fig.dpi), round(fig.get_size_inches()[1] * fig.dpi))
    for name, grid in [(f"head{j}", first[..., j]) for j in range(h)] + [("majority", maj)]:
        expect = (1 - DEFAULT_ALPHA) * grey + DEFAULT_ALPHA * color_experts(grid, e)  # (gh, gw, 3)
        np.testing.assert_allclose(panels[name][4::8, 4::8], expect, atol=1e-9)
        ys, xs = boxes[name]
        got = png[ys][:, xs]
        np.testing.assert_allclose(got, expect, atol=2.5 / 255, err_msg=name)
    # the input panel shows the plain image
    ys, xs = boxes["input"]
    np.testing.assert_allclose(png[ys][:, xs], grey, atol=2.5 / 255)


def test_diversity_png_pixels(tmp_path):
    h = 4
    div = np.array([[1, 2], [3, 4]])
    image = np.zeros((32, 32, 3))
    fig, panels = draw_diversity(image, div, h)
    ys, xs = _patch_centres(fig, fig.axes[1], div.shape)
    path = save_figure(fig, tmp_path / "d.png")
    expect = DEFAULT_ALPHA * diversity_colors(div, h)[0]
    np.testing.assert_allclose(_png(path)[ys][:, xs], expect, atol=2.5 / 255)
    # four different counts -> four different colours
    assert len({tuple(np.round(c, 3)) for c in expect.reshape(-1, 3)}) == 4


def test_load_heatmap_and_activation(tmp_path):
    loads = {"layer1": np.array([0.7, 0.3, 0.0, 0.0]), "layer3": np.array([0.25, 0.25, 0.25, 0.25])}
    fig, mats = draw_load_heatmaps({"m": loads})
    np.testing.assert_allclose(mats["m"], np.stack(list(loads.values()), 1))
    path = save_figure(fig, tmp_path / "c.png")
    png = _png(path)
    assert png.std() > 0.05  # not blank
    fig, ratios = draw_activation_bars({"a": loads, "b": {"layer1": np.array([0.5, 0.5, 0, 0])}}, threshold=0.01)
    assert ratios == {"a": {"layer1": 0.5, "layer3": 1.0}, "b": {"layer1": 0.5}}
    summary = draw_activation_summary(ratios, threshold=0.01)
    heights = [round(b.get_height(), 6) for b in summary.axes[0].patches]
    assert heights[:2] == [50.0, 100.0] and heights[2] == 50.0 and np.isnan(heights[3])  # model a, then b
    figure_to_array(summary)
    arr = figure_to_array(fig)
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3 and arr.std() > 5


def test_heatmap_layers_with_different_expert_counts():
    fig, mats = draw_load_heatmaps({"m": {"layer1.vision": np.ones(4) / 4, "layer1.text": np.ones(2) / 2}})
    mat = mats["m"]
    assert mat.shape == (4, 2) and np.isnan(mat[2:, 1]).all()
    figure_to_array(fig)


def test_map_grid_rows_models(tmp_path):
    image = np.full((16, 16, 3), 0.2)
    maps = [[np.array([[0, 1], [2, 3]]), np.array([[3, 3], [3, 3]])], [np.array([[1, 1], [1, 1]])]]
    fig, drawn = draw_map_grid(
        [image, image],
        maps,
        row_labels=["smoe", "mhmoe"],
        col_labels=["layer1", "layer3"],
        kind="expert",
        num_classes=4,
    )
    assert len(drawn) == 2 and len(drawn[0]) == 2 and len(drawn[1]) == 1
    np.testing.assert_allclose(drawn[0][1][0, 0], (1 - DEFAULT_ALPHA) * 0.2 + DEFAULT_ALPHA * expert_colors(4)[3])
    np.testing.assert_allclose(drawn[0][0][12, 12], (1 - DEFAULT_ALPHA) * 0.2 + DEFAULT_ALPHA * expert_colors(4)[3])
    np.testing.assert_allclose(drawn[0][0][0, 12], (1 - DEFAULT_ALPHA) * 0.2 + DEFAULT_ALPHA * expert_colors(4)[1])
    save_figure(fig, tmp_path / "g.png")
    with pytest.raises(ValueError, match="kind"):
        draw_map_grid([image], [[maps[1][0]]], row_labels=["x"], col_labels=["l"], kind="bogus", num_classes=2)
