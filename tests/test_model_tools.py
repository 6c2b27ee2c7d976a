"""tools/bench_model.py measures a real training step (numbers are produced, not asserted for speed)."""

from __future__ import annotations

import importlib.util

import torch
from helpers import REPO


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_worker_reports_a_step():
    bench = _load("bench_model")
    before = torch.get_num_threads()
    try:
        (res,) = bench.worker(
            [("tiny_mhmoe", "fp32")], batch=2, img=32, text_len=8, steps=1, warmup=0, device="cpu", threads=1
        )
    finally:
        torch.set_num_threads(before)
    assert res["model"] == "tiny_mhmoe" and res["seq_len"] == 1 + 16 + 8
    assert res["step_s_median"] > 0 and res["tokens_per_s"] > 0 and res["params_m"] > 1
    assert res["moe"].startswith("E=8 h=4 k=2 F=192")
