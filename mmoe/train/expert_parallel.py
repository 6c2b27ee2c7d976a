"""Expert parallelism from the command line: a callback that shards every MH-MoE layer over the ranks.

::

    mmoe fit --config ... --trainer.strategy ddp --trainer.devices 8 \
        --trainer.callbacks+=mmoe.train.expert_parallel.ExpertParallel [--trainer.callbacks.ep_size 4]

The experts of each MoE layer ([MH1] sec. 3) are split over an expert-parallel group of ``ep_size`` consecutive
ranks (default: the whole world) with :func:`mmoe.moe.parallel.to_expert_parallel`; routing, head/merge layers
and everything else stay replicated and data parallel (docs/scaling.md section 2).

Why a callback: the conversion needs the process group, which Lightning creates before the ``setup`` hooks,
and it must happen before the strategy wraps the module in DDP (which reads the expert-shard ignore list that
:func:`to_expert_parallel` sets) and before the optimizer is built over the (now sharded) parameters. Callback
``setup`` runs exactly there, for any task with MH-MoE layers, without the task knowing about parallelism.
"""

from __future__ import annotations

import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from mmoe.moe.parallel import allreduce_expert_grads, new_expert_parallel_groups, to_expert_parallel

__all__ = ["ExpertParallel"]


class ExpertParallel(Callback):
    """Shard the experts of every MoE layer over ``ep_size`` ranks (see the module docstring).

    Args:
        ep_size: ranks per expert-parallel group; must divide the world size and every layer's number of
            experts. ``None`` = the whole world. With ``ep_size < world`` each shard has ``world / ep_size``
            replicas whose expert gradients are summed after backward (``allreduce_expert_grads``).
    """

    def __init__(self, ep_size: int | None = None) -> None:
        super().__init__()
        if ep_size is not None and ep_size < 1:
            raise ValueError(f"ExpertParallel: ep_size={ep_size}; expected None (the whole world) or >= 1")
        self.ep_size = ep_size
        self.converted: list[str] = []
        self._expert_dp_group: dist.ProcessGroup | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.converted:
            return  # fit then validate in one process: already sharded
        if not (dist.is_available() and dist.is_initialized()):
            if self.ep_size in (None, 1):
                return  # one process: nothing to shard
            raise RuntimeError(
                f"ExpertParallel(ep_size={self.ep_size}): torch.distributed is not initialised; run with a "
                "distributed strategy (e.g. --trainer.strategy ddp --trainer.devices N)"
            )
        world = dist.get_world_size()
        ep_size = world if self.ep_size is None else self.ep_size
        ep_group, self._expert_dp_group = new_expert_parallel_groups(ep_size)
        self.converted = to_expert_parallel(pl_module, group=ep_group)
        if not self.converted:
            raise ValueError(f"ExpertParallel: {type(pl_module).__name__} has no MH-MoE layer to shard")
        rank_zero_info(
            f"ExpertParallel: {len(self.converted)} MoE layers sharded over expert-parallel groups of {ep_size} "
            f"ranks (world {world}): {', '.join(self.converted)}"
        )

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        allreduce_expert_grads(pl_module, self._expert_dp_group)
