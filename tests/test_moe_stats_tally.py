"""Validation routing reduced per batch (RoutingTally) against the full-record computation it replaces."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mmoe.moe import MHMoE
from mmoe.moe import stats as S
from mmoe.moe.stats import RoutingTally
from mmoe.train.pretraining import MaskedPretraining, routing_metrics, routing_tally_metrics, tally_routing


def _full_record_metrics(records_by_layer: dict, threshold: float) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """The computation validation used while it kept every record: pool all of them at the end."""
    out: dict[str, float] = {}
    all_counts: dict[str, torch.Tensor] = {}
    for layer, records in records_by_layer.items():
        counts = sum(r.counts.detach().cpu().long() for r in records)
        all_counts[layer] = counts
        out[f"{layer}/activation_ratio"] = float(S.activation_ratio(counts, threshold))
        load = S.expert_load(counts)
        out[f"{layer}/load_max"] = float(load.max())
        out.update({f"{layer}/load/e{e}": float(v) for e, v in enumerate(load.tolist())})
        div_sum, div_n, dropped, assigned = 0.0, 0, 0.0, 0.0
        for r in records:
            div_BL = S.token_diversity(r).float()
            valid = (r.expert_ids[:, 0].view(-1, r.num_heads) >= 0).all(dim=-1).view(div_BL.shape)
            div_sum += float(div_BL[valid].sum())
            div_n += int(valid.sum())
            dropped += float(r.dropped)
            assigned += float(r.counts.sum()) + float(r.dropped)
        out[f"{layer}/diversity"] = div_sum / max(1, div_n)
        out[f"{layer}/dropped_share"] = dropped / assigned if assigned > 0 else 0.0
    return out, all_counts


def _random_records(seed: int, batches: int = 6) -> dict[str, list]:
    """Records of two layers over several random batches: padding, MH-MoE sub-tokens, capacity drops."""
    torch.manual_seed(seed)
    layers = {
        "layer1": MHMoE(32, 6, top_k=2, num_heads=4, expert_hidden=16),
        "layer3.text": MHMoE(32, 5, top_k=1, num_heads=1, head_layers=0, merge_layers=0, capacity_factor=0.6),
    }
    g = torch.Generator().manual_seed(seed)
    out: dict[str, list] = {k: [] for k in layers}
    with torch.no_grad():
        for b in range(batches):
            length = 3 + b  # batches of different shapes, as the last batch of an epoch
            x = torch.randn(2, length, 32, generator=g)
            pad = torch.rand(2, length, generator=g) < 0.3
            pad[:, 0] = False
            for key, layer in layers.items():
                out[key].append(layer(x, pad).routing)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tally_equals_the_full_record_computation(seed: int) -> None:
    records = _random_records(seed)
    assert sum(int(r.dropped) for r in records["layer3.text"]) > 0  # the capacity layer does drop
    ref, ref_counts = _full_record_metrics(records, threshold=0.05)
    tallies = tally_routing(records)
    for layer, tally in tallies.items():
        assert torch.equal(tally.counts.cpu(), ref_counts[layer])  # counts: exact
        assert tally.records == len(records[layer])
    got = routing_tally_metrics(tallies, threshold=0.05, per_expert=True)
    assert got.keys() == ref.keys()
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
    # one batch at a time into the same tallies (as validation_step does) gives the same totals
    step_by_step: dict = {}
    for b in range(len(records["layer1"])):
        tally_routing({k: [v[b]] for k, v in records.items()}, into=step_by_step)
    assert routing_tally_metrics(step_by_step, threshold=0.05, per_expert=True) == got
    assert routing_metrics(records, threshold=0.05, per_expert=True) == got


def test_tally_memory_does_not_grow_with_batches() -> None:
    records = _random_records(0, batches=12)
    tally = RoutingTally()
    for r in records["layer1"]:
        tally.add(r)
    held = [t for t in (tally.counts, tally.diversity_sum, tally.diversity_tokens, tally.dropped)]
    assert sum(t.numel() for t in held) == 6 + 3  # E counts and three scalars, whatever the number of batches
    assert all(t.dtype == torch.int64 for t in held)


def test_tally_refuses_mixed_layers_and_empty_metrics() -> None:
    records = _random_records(0, batches=1)
    tally = RoutingTally()
    with pytest.raises(ValueError, match="no record"):
        tally.metrics()
    tally.add(records["layer1"][0])
    with pytest.raises(ValueError, match="5 experts after 6"):
        tally.add(records["layer3.text"][0])


def _batch(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1000, (2, 8), generator=g)
    pad = torch.zeros(2, 8, dtype=torch.bool)
    pad[1, -3:] = True
    labels = torch.where((torch.rand(2, 8, generator=g) < 0.3) & ~pad, ids, -100)
    labels[0, 0] = ids[0, 0]
    mask = torch.rand(2, 64, generator=g) < 0.4
    mask[:, 0] = True
    image = {"image": torch.randn(2, 3, 64, 64, generator=g), "image_mask": mask}
    return {"image": image, "text": {"text": ids, "text_padding_mask": pad, "text_labels": labels}}


def test_validation_keeps_tallies_and_logs_the_full_record_values(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    m = MaskedPretraining(backbone="tiny_mhmoe", optim={"lr": 1e-3, "total_steps": 10}, eval_grounding=False).eval()
    logged: dict[str, float] = {}
    monkeypatch.setattr(m, "log", lambda name, value, **kw: logged.__setitem__(name, float(value)))
    m._trainer = SimpleNamespace(strategy=SimpleNamespace(reduce=lambda t, reduce_op: t))
    batches = [_batch(s) for s in range(3)]
    m.on_validation_epoch_start()
    with torch.no_grad():
        for i, batch in enumerate(batches):
            m.validation_step(batch, i)
        records: dict[str, list] = {}
        for batch in batches:  # the same forward passes again, keeping the records this time
            for key, recs in m.stream_losses(batch)[2].items():
                records.setdefault(key, []).extend(recs)
    assert set(m._val_routing) == set(records) == {"layer1", "layer3"}
    assert all(isinstance(t, RoutingTally) and t.records == 6 for t in m._val_routing.values())  # 3 batches x 2
    m.on_validation_epoch_end()
    threshold = S.DEFAULT_ACTIVATION_THRESHOLD if m.activation_threshold is None else m.activation_threshold
    ref, _ = _full_record_metrics(records, threshold=threshold)
    got = {k.removeprefix("val/moe/"): v for k, v in logged.items() if k.startswith("val/moe/")}
    assert got.keys() == ref.keys()
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
    assert m._val_routing == {}
