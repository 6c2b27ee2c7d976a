"""The image-text contrastive loss, its head and the ITM hard negatives (``mmoe.model.contrastive``).

The 2-process test runs the loss on two gloo ranks, each holding half of a batch, and checks that the gathered
negatives are the whole batch, that the mean of the rank losses is the single-process full-batch loss, and that
the gradients (of the rows, and of a shared projection after DDP's mean) are the full-batch gradients.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from mmoe.model.contrastive import ContrastiveHead, contrastive_loss, gather_with_grad, sample_hard_negatives


def test_loss_against_a_hand_computation() -> None:
    v = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    t = torch.tensor([[0.8, 0.6], [0.0, 1.0]])
    scale = torch.tensor(2.0)
    loss, logits, labels = contrastive_loss(v, t, scale)
    sim = [[0.8, 0.0], [0.48 + 0.48, 0.8]]  # <v_i, t_j>

    def ce(row: list[float], target: int) -> float:
        return -2.0 * row[target] + math.log(sum(math.exp(2.0 * x) for x in row))

    i2t = (ce(sim[0], 0) + ce(sim[1], 1)) / 2
    t2i = (ce([sim[0][0], sim[1][0]], 0) + ce([sim[0][1], sim[1][1]], 1)) / 2
    assert float(loss) == pytest.approx((i2t + t2i) / 2, rel=1e-6)
    assert torch.allclose(logits, 2.0 * torch.tensor(sim)) and labels.tolist() == [0, 1]


def test_head_normalises_and_clips_the_scale() -> None:
    torch.manual_seed(0)
    head = ContrastiveHead(8, 4)
    emb = head.embed_image(torch.randn(3, 8))
    assert emb.shape == (3, 4) and torch.allclose(emb.norm(dim=-1), torch.ones(3))
    assert float(head.scale().detach()) == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        head.logit_scale.fill_(10.0)
    scale = head.scale()
    scale.backward()
    assert float(scale.detach()) == pytest.approx(100.0, rel=1e-5) and float(head.logit_scale.grad) == 0.0
    same = ContrastiveHead(8).identity_()
    x = torch.randn(5, 8)
    assert torch.allclose(same.embed_text(x), torch.nn.functional.normalize(x, dim=-1), atol=1e-6)
    with pytest.raises(ValueError, match="embed_dim == dim"):
        head.identity_()
    with pytest.raises(ValueError, match="both be"):
        contrastive_loss(torch.zeros(2, 3), torch.zeros(3, 3), torch.tensor(1.0))


def test_hard_negatives_never_pick_the_positive_and_follow_the_similarity() -> None:
    g = torch.Generator().manual_seed(0)
    sim = torch.full((4, 4), -20.0)
    sim.fill_diagonal_(50.0)
    sim[0, 3] = sim[2, 1] = 20.0  # image 0 looks like text 3; text 1 like image 2
    draws = [sample_hard_negatives(sim, generator=g) for _ in range(50)]
    for neg_text, neg_image in draws:
        assert (neg_text != torch.arange(4)).all() and (neg_image != torch.arange(4)).all()
    assert all(int(nt[0]) == 3 and int(ni[1]) == 2 for nt, ni in draws)
    with pytest.raises(ValueError, match="B >= 2"):
        sample_hard_negatives(torch.zeros(1, 1))


# ---------------------------------------------------------------------------------------------------- 2 processes
B, E, D = 3, 4, 6  # rows per rank, embedding width, input width of the shared projection


def _full_batch(world: int) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Linear]:
    g = torch.Generator().manual_seed(1234)
    x_img = torch.randn(world * B, D, generator=g, dtype=torch.float64)
    x_txt = torch.randn(world * B, D, generator=g, dtype=torch.float64)
    proj = torch.nn.Linear(D, E, bias=False).double()
    with torch.no_grad():
        proj.weight.copy_(torch.randn(E, D, generator=g, dtype=torch.float64))
    return x_img, x_txt, proj


def _loss_of(x_img: torch.Tensor, x_txt: torch.Tensor, proj: torch.nn.Linear, *, gather: bool) -> torch.Tensor:
    img = torch.nn.functional.normalize(proj(x_img), dim=-1)
    txt = torch.nn.functional.normalize(x_txt @ torch.ones(D, E, dtype=x_txt.dtype) / D + proj(x_txt), dim=-1)
    return contrastive_loss(img, txt, torch.tensor(5.0, dtype=torch.float64), gather=gather)[0]


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x_img, x_txt, proj = _full_batch(world)
        rows = slice(rank * B, (rank + 1) * B)
        local_img = x_img[rows].clone().requires_grad_(True)
        local_txt = x_txt[rows].clone().requires_grad_(True)
        gathered, offset = gather_with_grad(local_img)
        loss = _loss_of(local_img, local_txt, proj, gather=True)
        loss.backward()
        grad_w = proj.weight.grad.clone()
        torch.distributed.all_reduce(grad_w)  # what DDP does: the mean over ranks
        grad_w /= world
        mean_loss = loss.detach().clone()
        torch.distributed.all_reduce(mean_loss)
        mean_loss /= world
        torch.save(
            {
                "gathered": gathered.detach(),
                "offset": offset,
                "loss": mean_loss,
                "grad_img": local_img.grad,
                "grad_txt": local_txt.grad,
                "grad_w": grad_w,
            },
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_equal_the_full_batch(tmp_path: Path) -> None:
    world = 2
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(
        _worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, start_method="spawn", join=True
    )
    x_img, x_txt, proj = _full_batch(world)
    x_img.requires_grad_(True)
    x_txt.requires_grad_(True)
    loss = _loss_of(x_img, x_txt, proj, gather=False)
    loss.backward()
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        rows = slice(rank * B, (rank + 1) * B)
        assert got["offset"] == rank * B
        assert torch.equal(got["gathered"], x_img.detach())  # every rank's negatives are the whole batch
        assert torch.allclose(got["loss"], loss.detach(), rtol=1e-12)
        # each rank's rows get the gradient of every rank's loss: world x that of the full-batch mean
        assert torch.allclose(got["grad_img"], world * x_img.grad[rows], rtol=1e-10, atol=1e-14)
        assert torch.allclose(got["grad_txt"], world * x_txt.grad[rows], rtol=1e-10, atol=1e-14)
        assert torch.allclose(got["grad_w"], proj.weight.grad, rtol=1e-10, atol=1e-14)
