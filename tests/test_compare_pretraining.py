"""mmoe.cli.compare_pretraining: resumable stages, model specs, recipe path rewriting, the run summary and table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from mmoe.cli import compare_pretraining as cmp
from mmoe.resources import recipe_path


def _stage(
    key: str, calls: list[str], deps: list[str] | None = None, fail: bool = False, writes: str | None = None
) -> cmp.Stage:
    """A stage that counts its runs; with ``writes`` it leaves that file in its folder and is ``present`` when
    the file is there (a pretraining's checkpoint)."""

    def run(folder: Path) -> dict:
        calls.append(key)
        if fail:
            raise RuntimeError("boom")
        if writes:
            (folder / writes).write_text("w")
        return {"value": len(calls), "folder": folder.name}

    present = (lambda folder: (folder / writes).is_file()) if writes else None
    return cmp.Stage(key, run, deps or [], present=present)


def test_finished_stages_are_skipped_and_results_appended(tmp_path: Path) -> None:
    calls: list[str] = []
    stages = [_stage("world", calls), _stage("pre/a/s0", calls, ["world"]), _stage("vqa/a/s0", calls, ["pre/a/s0"])]
    cmp.run_stages(stages, tmp_path, jobs=2, log=lambda _: None)
    assert calls == ["world", "pre/a/s0", "vqa/a/s0"]  # each after its dependency
    assert cmp.stage_result(tmp_path, "vqa/a/s0")["value"] == 3
    # started again: nothing reruns; a stage whose result file vanished (interrupted) runs again
    (tmp_path / "vqa/a/s0/result.json").unlink()
    cmp.run_stages(stages, tmp_path, jobs=2, log=lambda _: None)
    assert calls == ["world", "pre/a/s0", "vqa/a/s0", "vqa/a/s0"]
    lines = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [x["key"] for x in lines] == ["world", "pre/a/s0", "vqa/a/s0", "vqa/a/s0"]
    assert cmp.load_results(tmp_path)["vqa/a/s0"]["value"] == 4  # the latest result of a stage wins


def test_a_records_file_outlives_the_run_folder(tmp_path: Path) -> None:
    """A comparison spread over machines whose disks do not persist: the committed records say what is done;
    a recorded stage runs again only when a stage still to run needs its files."""
    records = tmp_path / "records.jsonl"
    calls: list[str] = []

    def stages() -> list[cmp.Stage]:
        return [
            _stage("pre/a/s0", calls, writes="ckpt"),
            _stage("vqa/a/pretrained/s0", calls, ["pre/a/s0"]),
            _stage("nlvr2/a/pretrained/s0", calls, ["pre/a/s0"]),
        ]

    first = tmp_path / "machine1"
    seen: list[int] = []
    cmp.run_stages(stages()[:2], first, jobs=1, log=lambda _: None, records=records,
                   on_done=lambda: seen.append(len(records.read_text().splitlines())))  # fmt: skip
    assert calls == ["pre/a/s0", "vqa/a/pretrained/s0"] and seen == [1, 2]  # called after each stage's record
    assert [json.loads(x)["key"] for x in records.read_text().splitlines()] == calls
    # a fresh folder, everything recorded: nothing runs, even though the checkpoint is not there
    cmp.run_stages(stages()[:2], tmp_path / "machine2", jobs=1, log=lambda _: None, records=records)
    assert calls == ["pre/a/s0", "vqa/a/pretrained/s0"]
    assert cmp.stage_result(tmp_path / "machine2", "vqa/a/pretrained/s0", records)["value"] == 2
    # a new stage needs the pretraining's checkpoint: the pretraining runs again first, the recorded VQA does not
    logs: list[str] = []
    cmp.run_stages(stages(), tmp_path / "machine3", jobs=2, log=logs.append, records=records)
    assert calls == ["pre/a/s0", "vqa/a/pretrained/s0", "pre/a/s0", "nlvr2/a/pretrained/s0"]
    assert any("pre/a/s0: recorded, but nlvr2/a/pretrained/s0 needs its files" in m for m in logs)
    assert set(cmp.load_results(tmp_path / "machine3", records)) == {
        "pre/a/s0", "vqa/a/pretrained/s0", "nlvr2/a/pretrained/s0"
    }  # fmt: skip
    (tmp_path / "bad.jsonl").write_text('{"key": "x"}\nnot json\n')
    with pytest.raises(SystemExit, match="bad.jsonl line 2 is not JSON"):
        cmp.load_results(tmp_path, tmp_path / "bad.jsonl")


def test_a_failed_stage_stops_its_dependents_only(tmp_path: Path) -> None:
    calls: list[str] = []
    stages = [_stage("a", calls, fail=True), _stage("b", calls, ["a"]), _stage("c", calls)]
    with pytest.raises(SystemExit, match=r"2 stage\(s\) failed or were skipped: \['a', 'b'\]"):
        cmp.run_stages(stages, tmp_path, jobs=1, log=lambda _: None)
    assert sorted(calls) == ["a", "c"] and cmp.stage_result(tmp_path, "c") is not None
    with pytest.raises(ValueError, match="needs 'zzz'"):
        cmp.run_stages([_stage("d", calls, ["zzz"])], tmp_path, log=lambda _: None)


def test_model_specs() -> None:
    m = cmp.Model.parse("mh_nohead=tiny_mhmoe:moe.head_layers=0,moe.merge_layers=0,stem_blocks=2")
    assert (m.label, m.recipe) == ("mh_nohead", "tiny_mhmoe")
    assert m.backbone_overrides({"drop_path": 0.0}) == {
        "drop_path": 0.0,
        "moe": {"head_layers": 0, "merge_layers": 0},
        "stem_blocks": 2,
    }
    plain = cmp.Model.parse("tiny_dense")
    assert (plain.label, plain.recipe, plain.overrides) == ("tiny_dense", "tiny_dense", {})
    assert cmp.Model.parse("tiny_smoe:moe.num_experts=16").label == "tiny_smoe"
    with pytest.raises(SystemExit, match="not key=value"):
        cmp.Model.parse("tiny_smoe:oops")


def test_world_overrides_point_every_data_path_at_the_world(tmp_path: Path) -> None:
    recipe = yaml.safe_load(Path(recipe_path("finetune/vqav2_synthetic")).read_text())
    flags = cmp.world_overrides(recipe, tmp_path)
    assert f"--data.init_args.train_images={tmp_path}/coco/train2014" in flags
    assert f"--model.init_args.label_vocab={tmp_path}/vqa/answer_vocab.json" in flags
    assert not any("data/shapes" in f for f in flags)
    pre = yaml.safe_load(Path(recipe_path("pretrain/tiny_mhmoe")).read_text())
    assert f"--data.init_args.pair_shards=[{tmp_path}/shards/pair/train-*.tar]" in cmp.world_overrides(pre, tmp_path)


def test_summary_and_table(tmp_path: Path) -> None:
    run = tmp_path / "pretrain" / "tiny_mhmoe" / "s0"
    (run / "version_0").mkdir(parents=True)
    (run / "version_0" / "metrics.csv").write_text(
        "step,train/loss,train/step_time,val/loss,val/loss_mlm_text,val/ppl_mlm_text,val/ppl_mim_image,"
        "val/grounding_gain,val/moe/layer1/activation_ratio,val/moe/layer3/activation_ratio\n"
        "0,9.0,0.5,,,,,,,\n"
        "1,8.0,0.7,,,,,,,\n"
        "0,,,8.5,3.5,30.0,6.0,1.1,1.0,1.0\n"
        "1,,,7.5,3.0,20.1,5.5,1.3,1.0,0.5\n"
    )
    r = cmp.summarize_run(run)
    assert r["step"] == 2 and r["ppl_mlm_text"] == pytest.approx(20.1) and r["grounding_gain"] == pytest.approx(1.3)
    assert r["activation_ratio"] == pytest.approx(0.75) and r["step_time"] == pytest.approx(0.6)
    assert math.isnan(r["ppl_mlm_pair"]) and r["curves"]["ppl_mlm_text"] == [(0, 30.0), (1, 20.1)]
    vqa = {"overall": 50.0, "perQuestionType": {"how many": 60.0, "is there a": 40.0}}
    results = {
        "world": {"key": "world", "variant": "alt", "splits": {"train": {"questions": 10}}},
        "prior": {"key": "prior", "vqa": {"overall": 30.0, "perQuestionType": {"how many": 50.0, "is there a": 10.0}}},
        "pretrain/tiny_mhmoe/s0": {
            "key": "pretrain/tiny_mhmoe/s0",
            "pretrain": json.loads(json.dumps(r)),
            "fit_seconds": 60.0,
        },  # fmt: skip
    }
    for seed, score in ((0, 50.0), (1, 54.0)):
        results[f"vqa/tiny_mhmoe/scratch/s{seed}"] = {
            "key": f"vqa/tiny_mhmoe/scratch/s{seed}", "task": "vqa", "model": "tiny_mhmoe", "init": "scratch",
            "seed": seed, "steps": 10, "fit_seconds": 5.0, "test": {"test/vqa_score": score}, "vqa": vqa,
        }  # fmt: skip
    table = tmp_path / "t.md"
    cmp.write_table(table, results, {"command": "python tools/compare_pretraining.py --x", "notes": ["n1"]})
    text = table.read_text()
    assert "| question-type prior (blind) | 0 | 30.00 | 50.0 | 10.0 |" in text
    assert "| tiny_mhmoe | scratch | 2 | 52.00 ± 2.83 |" in text
    assert "| tiny_mhmoe | 1 | 20.10 |" in text and "- pretrain/tiny_mhmoe/s0: 1: 30.0, 2: 20.1" in text
    assert "python tools/compare_pretraining.py --x" in text and "- n1" in text
