"""torch.compile readiness: the routing and dispatch trace without graph breaks."""

from __future__ import annotations

import pytest
import torch

from mmoe.moe import MHMoE
from mmoe.moe.experts import grouped_mm_supported


@pytest.mark.skipif(
    not grouped_mm_supported(torch.bfloat16, torch.device("cpu"), (8, 16)), reason="no torch._grouped_mm"
)
def test_layer_traces_as_one_graph_in_bf16_grouped_mm() -> None:
    import torch._dynamo as dynamo

    dynamo.reset()
    layer = MHMoE(32, 4, top_k=2, num_heads=4, expert_hidden=16, expert_impl="grouped_mm", capacity_factor=1.0)
    layer = layer.bfloat16()
    x = torch.randn(2, 6, 32, dtype=torch.bfloat16)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[0, 4:] = True
    explanation = dynamo.explain(layer)(x, pad)
    reasons = [b.reason for b in explanation.break_reasons]
    assert explanation.graph_break_count == 0, reasons
    assert explanation.graph_count == 1
