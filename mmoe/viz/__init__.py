"""Pictures of MoE routing: which experts each patch's and word's sub-tokens reach ([MH1] Fig. 1, 5, 8).

`mmoe.viz.records` turns routing records into per-patch / per-token arrays and load statistics,
`mmoe.viz.experts` and `mmoe.viz.text` draw them (matplotlib, Agg), `mmoe.viz.run` runs a model over
inputs and writes PNG + JSON (used by `mmoe-viz` and the pretraining callback).
A leaf package: it never imports Lightning.
"""

from mmoe.viz.experts import (
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
from mmoe.viz.records import (
    LayerView,
    RoutingAccumulator,
    TokenRouting,
    activation_ratio,
    diversity,
    load_share,
    majority_expert,
    patch_grid,
    record_to_tokens,
    split_routing,
)
from mmoe.viz.run import collect_routing, load_inputs, visualize, write_comparison, write_report

__all__ = [
    "LayerView",
    "RoutingAccumulator",
    "TokenRouting",
    "activation_ratio",
    "collect_routing",
    "load_inputs",
    "visualize",
    "write_comparison",
    "write_report",
    "diversity",
    "draw_activation_bars",
    "draw_activation_summary",
    "draw_assignment",
    "draw_diversity",
    "draw_load_heatmaps",
    "draw_map_grid",
    "expert_colors",
    "figure_to_array",
    "load_share",
    "majority_expert",
    "patch_grid",
    "record_to_tokens",
    "save_figure",
    "split_routing",
]
