"""Replicate-mode upcycling through the checkpoint converter: the MoE model computes the dense model's features."""

from __future__ import annotations

import dataclasses
import re
import warnings
from pathlib import Path

import pytest
import torch

from mmoe.cli.convert_checkpoint import main as convert_main
from mmoe.model import create_model, get_config, load_model, save_model
from mmoe.model.upcycling import replicate_settings, upcycle


def _perturbed_tiny_dense() -> torch.nn.Module:
    """tiny_dense with every weight moved off its initial value, so the V-FFN and L-FFN (and norms) all differ."""
    torch.manual_seed(0)
    dense = create_model("tiny_dense").eval()
    with torch.no_grad():
        for p in dense.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return dense


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    cfg = get_config("tiny_dense")
    image = torch.randn(2, 3, cfg.img_size, cfg.img_size, generator=g)
    text = torch.randint(0, cfg.vocab_size, (2, 7), generator=g)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 5:] = True
    return image, text, pad


def _features(model: torch.nn.Module, image, text, pad) -> torch.Tensor:
    with torch.no_grad():
        return model(image=image, text=text, text_padding_mask=pad).features


def test_cli_replicate_gives_the_dense_features(tmp_path: Path) -> None:
    dense = _perturbed_tiny_dense()
    ffn = dense.blocks[1].ffn
    assert (ffn.vision.fc1.weight - ffn.text.fc1.weight).abs().max() > 0.1  # the two FFNs differ
    src, out = tmp_path / "dense.pt", tmp_path / "smoe.pt"
    save_model(dense, src)
    # tiny_smoe's own block: one shared pool, raw top-1 gates; the converter sets what exactness needs
    assert get_config("tiny_smoe").moe.pool == "shared" and not get_config("tiny_smoe").moe.renormalize_gates
    with pytest.warns(UserWarning, match=r"pool='per_modality'.*renormalize_gates=True"):
        assert convert_main(["--upcycle", "tiny_smoe", str(src), str(out), "--mode", "replicate"]) == 0
    moe = load_model(out).eval()
    assert moe.config.moe.pool == "per_modality" and moe.config.moe.renormalize_gates
    assert moe.config.moe.num_experts == 8
    image, text, pad = _inputs()
    ref, got = _features(dense, image, text, pad), _features(moe, image, text, pad)
    real = torch.cat([torch.ones(2, got.shape[1] - text.shape[1], dtype=torch.bool), ~pad], 1)
    assert (got[real] - ref[real]).abs().max() <= 1e-5
    # each modality alone too (the single-modality paths)
    torch.testing.assert_close(
        _features(moe, image, None, None), _features(dense, image, None, None), atol=1e-5, rtol=0
    )
    t_ref, t_got = _features(dense, None, text, pad), _features(moe, None, text, pad)
    assert (t_got[~pad] - t_ref[~pad]).abs().max() <= 1e-5
    # the MoE layers do route (so the match is not a dense layer left in place)
    with torch.no_grad():
        routing = moe(image=image, text=text, text_padding_mask=pad).routing
    assert {"layer1.vision", "layer1.text"} <= set(routing)


def test_replicate_with_the_given_settings_is_not_the_dense_function() -> None:
    """exact=False keeps tiny_smoe's shared pool and raw gates: the features move, so the test above can fail."""
    dense = _perturbed_tiny_dense()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is changed, so nothing is reported
        moe = upcycle(dense, get_config("tiny_smoe").moe, mode="replicate", exact=False).eval()
    assert moe.config.moe.pool == "shared"
    image, text, pad = _inputs()
    ref, got = _features(dense, image, text, pad), _features(moe, image, text, pad)
    assert (got - ref).abs().max() > 1e-2


def test_replicate_to_top2_with_capacity_is_made_dropless() -> None:
    dense = _perturbed_tiny_dense()
    given = dict(num_experts=4, expert_hidden=512, top_k=2, capacity_factor=0.5, pool="per_modality")
    with pytest.warns(UserWarning, match=r"capacity_factor=None \(was 0.5") as caught:
        moe = upcycle(dense, given, mode="replicate").eval()
    assert "pool=" not in str(caught[0].message)  # only what differs is reported
    assert moe.config.moe.capacity_factor is None and moe.config.moe.top_k == 2
    image, text, pad = _inputs()
    ref, got = _features(dense, image, text, pad), _features(moe, image, text, pad)
    real = torch.cat([torch.ones(2, got.shape[1] - text.shape[1], dtype=torch.bool), ~pad], 1)
    assert (got[real] - ref[real]).abs().max() <= 1e-5


def test_cli_replicate_refuses_mhmoe_and_names_the_settings(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """MH-MoE experts see d/h features of a token: no copy of the dense FFN is exact, so replicate refuses."""
    src = tmp_path / "dense.pt"
    save_model(_perturbed_tiny_dense(), src)
    with pytest.raises(SystemExit) as exit_info:
        convert_main(["--upcycle", "tiny_mhmoe", str(src), str(tmp_path / "mh.pt"), "--mode", "replicate"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(r"num_heads=1 \(got 4.*mode='split'.*expert_hidden=512 \(the dense FFN", err)
    assert not (tmp_path / "mh.pt").exists()


def test_replicate_settings_refuse_unbiased_experts_and_leave_exact_configs_alone() -> None:
    moe = get_config("tiny_smoe").moe
    with pytest.raises(ValueError, match="experts with biases"):
        replicate_settings(dataclasses.replace(moe, extra={"expert_bias": False}), ffn_dim=512)
    fixed = replicate_settings(moe, ffn_dim=512, exact=False)
    assert fixed == moe
    with pytest.warns(UserWarning):
        fixed = replicate_settings(moe, ffn_dim=512)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert replicate_settings(fixed, ffn_dim=512) == fixed
