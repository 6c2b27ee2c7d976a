"""Expert parallelism: 2 processes over gloo on loopback equal the single-process layer."""

from __future__ import annotations

import os
import socket
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from mmoe.moe import MHMoE

D = 16
WORLD = 2
CFG = dict(num_experts=4, top_k=2, num_heads=2, expert_hidden=8, z_loss_weight=1e-3, aux_loss_weight=0.1)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference_and_data(dtype: torch.dtype) -> tuple[MHMoE, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    ref = MHMoE(D, **CFG).to(dtype)
    with torch.no_grad():
        ref.router.weight.normal_(0, 1.0)  # spread the routing so every rank sends and receives rows
    x = torch.randn(WORLD * 2, 5, D, dtype=dtype)
    pad = torch.zeros(WORLD * 2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    pad[3, 1:] = True
    w = torch.randn(WORLD * 2, 5, D, dtype=dtype)
    return ref, x, pad, w


class _Wrapper(nn.Module):
    """A tiny 'model' holding an EP layer, the way DDP (or Lightning) would wrap it."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.moe = layer

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.moe(x, pad)
        return out.output, out.aux_loss


def _worker(rank: int, port: int, tmp: str, dtype_name: str) -> None:
    try:
        from mmoe.moe.parallel import (
            ExpertParallelMHMoE,
            expert_parallel_param_names,
            ignore_expert_params_in_ddp,
            to_expert_parallel,
        )

        dtype = getattr(torch, dtype_name)
        tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
        torch.set_num_threads(1)
        ref, x, pad, w = _reference_and_data(dtype)
        # Single-process reference over all ranks' tokens; DDP semantics = mean of per-rank task losses.
        xr = x.clone().requires_grad_(True)
        out_ref = ref(xr, pad)
        (((out_ref.output * w).sum()) / WORLD + out_ref.aux_loss).backward()

        # Convert a built model: every rank holds the full reference weights, keeps its shard.
        full = MHMoE(D, **CFG).to(dtype)
        full.load_state_dict(ref.state_dict())
        model = _Wrapper(full)
        assert to_expert_parallel(model) == ["moe"]
        ep = model.moe
        assert isinstance(ep, ExpertParallelMHMoE) and ep.experts.w1.shape[0] == CFG["num_experts"] // WORLD
        lo, hi = ep.local_expert_range
        assert torch.equal(ep.experts.w1.detach(), ref.experts.w1.detach()[lo:hi])
        names = ignore_expert_params_in_ddp(model)  # idempotent; to_expert_parallel already did it
        assert names == expert_parallel_param_names(model) and "moe.experts.w1" in names
        assert model._ddp_params_and_buffers_to_ignore.count("moe.experts.w1") == 1
        ddp = nn.parallel.DistributedDataParallel(model)
        sl = slice(rank * 2, rank * 2 + 2)
        x_local = x[sl].clone().requires_grad_(True)
        y, aux = ddp(x_local, pad[sl])
        ((y * w[sl]).sum() + aux).backward()

        torch.testing.assert_close(y, out_ref.output[sl].detach(), **tol)
        torch.testing.assert_close(aux, out_ref.aux_loss.detach(), **tol)
        # Input gradient: rank-local task part plus WORLD x this rank's share of the global aux loss.
        torch.testing.assert_close(x_local.grad, WORLD * xr.grad[sl], **tol)
        ref_grads = dict(ref.named_parameters())
        for n, p in ep.named_parameters():
            g_ref = ref_grads[n].grad
            if n.startswith("experts."):
                g_ref = g_ref[lo:hi]  # not averaged by DDP: this rank's experts, 1/world scaled
            torch.testing.assert_close(p.grad, g_ref, **tol, msg=lambda m, n=n: f"rank {rank} {n}: {m}")

        # Records: this rank's tokens only, counts over them, global expert ids.
        rec = ep(x[sl], pad[sl]).routing
        assert int(rec.counts.sum()) == int((~pad[sl]).sum()) * CFG["num_heads"] * CFG["top_k"]

        # Checkpoints: the EP state dict is the single-process one (collective gather on every rank).
        sd = ep.state_dict()
        ref_sd = ref.state_dict()
        assert sd.keys() == ref_sd.keys()
        for k in sd:
            assert torch.equal(sd[k], ref_sd[k]), k
        if rank == 0:
            torch.save(sd, os.path.join(tmp, "ep.pt"))
        dist.barrier()
        again = ExpertParallelMHMoE(D, **CFG).to(dtype)
        again.load_state_dict(torch.load(os.path.join(tmp, "ep.pt"), weights_only=True))
        assert torch.equal(again.experts.w2.detach(), ref.experts.w2.detach()[lo:hi])
        # A shard loads as is; a wrong shape is reported by name.
        again.load_state_dict({k: v for k, v in ep.state_dict().items()})
        bad = dict(ref_sd)
        bad["experts.w1"] = bad["experts.w1"][:3]
        try:
            again.load_state_dict(bad)
        except RuntimeError as e:
            assert "experts.w1" in str(e)
        else:
            raise AssertionError("a 3-expert tensor loaded into a 4-expert EP layer")
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        Path(tmp, f"error{rank}.txt").write_text(traceback.format_exc())
        raise


def _spawn(tmp_path: Path, dtype: str) -> None:
    try:
        mp.spawn(_worker, args=(_free_port(), str(tmp_path), dtype), nprocs=WORLD, join=True)
    except Exception as e:
        errors = "\n".join(p.read_text() for p in sorted(tmp_path.glob("error*.txt")))
        raise AssertionError(f"worker failed:\n{errors or e}") from None


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_expert_parallel_matches_single_process_float64(tmp_path: Path) -> None:
    _spawn(tmp_path, "float64")


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_expert_parallel_matches_single_process_float32_grouped_mm(tmp_path: Path) -> None:
    _spawn(tmp_path, "float32")


def test_single_process_checkpoint_loads_into_plain_layer_after_ep_save(tmp_path: Path) -> None:
    """World size 1 needs no process group for MHMoE; the EP state dict layout is MHMoE's own."""
    ref, x, pad, _ = _reference_and_data(torch.float64)
    path = tmp_path / "single.pt"
    torch.save(ref.state_dict(), path)
    plain = MHMoE(D, **CFG).double()
    plain.load_state_dict(torch.load(path, weights_only=True))
    torch.testing.assert_close(plain(x, pad).output, ref(x, pad).output, rtol=0, atol=0)


def test_ep_layer_needs_a_process_group() -> None:
    from mmoe.moe.parallel import ExpertParallelMHMoE

    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    with pytest.raises(RuntimeError, match="init_process_group"):
        ExpertParallelMHMoE(D, **CFG)
