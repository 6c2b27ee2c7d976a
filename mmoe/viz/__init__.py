"""Pictures of MoE routing: which experts each patch's and word's sub-tokens reach ([MH1] Fig. 1, 5, 8).

One module per job, in the order `mmoe-viz` runs them:

- `mmoe.viz.inputs`: images, folders of images and webdataset shards (read with webdataset's tar stage);
- `mmoe.viz.capture`: load a model, run it with routing records, keep the routing per input;
- `mmoe.viz.records`: records -> per-patch / per-token arrays and load statistics (`mmoe.moe.stats`);
- `mmoe.viz.experts`, `mmoe.viz.text`: draw them (matplotlib figures, no pyplot state);
- `mmoe.viz.report`: write experts.json, the text table and the PNGs, one model or several side by side.

The command line (`mmoe-viz`) is `mmoe.cli.visualize_experts`; the training callback is
`mmoe.train.viz_callback`. A leaf package: it never imports Lightning.
"""

from mmoe.viz.capture import ModelRouting, collect_routing, forward_routing, resolve_model
from mmoe.viz.inputs import VizInput, load_inputs
from mmoe.viz.report import report_json, write_comparison, write_report

__all__ = [
    "ModelRouting",
    "VizInput",
    "collect_routing",
    "forward_routing",
    "load_inputs",
    "report_json",
    "resolve_model",
    "write_comparison",
    "write_report",
]
