"""mmoe.moe: the Multi-Head Mixture-of-Experts layer ([MH1] 2404.15045, [MH2] 2411.16205).

Tensors in, tensors out: no Lightning, webdataset or open_clip here (docs/interfaces.md section 1).
"""

from mmoe.moe.dispatch import DispatchPlan, plan_dispatch
from mmoe.moe.experts import GroupedExperts
from mmoe.moe.layer import MHMoE, MoEOutput, RoutingRecord
from mmoe.moe.router import LinearRouter, XMoERouter

__all__ = [
    "MHMoE",
    "MoEOutput",
    "RoutingRecord",
    "GroupedExperts",
    "LinearRouter",
    "XMoERouter",
    "DispatchPlan",
    "plan_dispatch",
]
