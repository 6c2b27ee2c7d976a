"""ClassificationTask through the real ``mmoe`` CLI on a tiny synthetic shapes world (VQA and NLVR2 heads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import CONFIGS

from mmoe.data.vqa import build_answer_vocab, save_answer_vocab
from mmoe.metrics.nlvr2 import evaluate_nlvr2, read_jsonl, read_predictions_csv
from mmoe.metrics.vqa import evaluate_vqa

FINETUNE = CONFIGS / "finetune"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mmoe.data.synthetic import make_world

    root = tmp_path_factory.mktemp("shapes")
    make_world(root, num_train=8, num_val=4, image_size=32, nlvr2_sets=(2, 1))
    anns = json.loads((root / "vqa" / "v2_mscoco_train2014_annotations.json").read_text())["annotations"]
    save_answer_vocab(root / "vqa" / "answer_vocab.json", build_answer_vocab([anns], min_count=1))
    return root


def _cli(args: list[str]) -> None:
    import sys

    from mmoe.train.cli import main

    argv, sys.argv = sys.argv, ["mmoe"]  # LightningCLI warns when pytest's own argv is present
    try:
        main(args)
    finally:
        sys.argv = argv


def _override(tmp: Path, world: Path, task: str) -> Path:
    """A second --config with tiny sizes and this test's paths (the recipe YAML stays the one we ship)."""
    vqa, coco = world / "vqa", world / "coco"
    common_trainer = {
        "max_steps": 1,
        "limit_val_batches": 1,
        "limit_test_batches": 1,
        "default_root_dir": str(tmp / "run"),
        "logger": False,
        "enable_progress_bar": False,
        "num_sanity_val_steps": 0,
    }
    model = {"init_args": {"backbone_overrides": {"img_size": 32, "drop_path": 0.0}}}
    if task == "vqa":

        def files(stage: str, split: str) -> dict[str, str]:
            return {
                f"{stage}_questions": str(vqa / f"v2_OpenEnded_mscoco_{split}2014_questions.json"),
                f"{stage}_annotations": str(vqa / f"v2_mscoco_{split}2014_annotations.json"),
                f"{stage}_images": str(coco / f"{split}2014"),
            }

        model["init_args"]["label_vocab"] = str(vqa / "answer_vocab.json")
        data = {
            "init_args": {
                **files("train", "train"),
                **files("val", "val"),
                **files("test", "val"),
                "answer_vocab": str(vqa / "answer_vocab.json"),
                "image_size": 32,
                "batch_size": 4,
                "eval_batch_size": 64,
            }
        }
    else:
        n = world / "nlvr2"
        splits = {"train": "train", "val": "val", "test": "val"}  # stage -> split of the world
        data = {
            "init_args": {
                **{f"{stage}_annotations": str(n / f"{split}.json") for stage, split in splits.items()},
                **{f"{stage}_images": str(n / "images" / split) for stage, split in splits.items()},
                "image_size": 32,
                "batch_size": 4,
                "eval_batch_size": 64,
            }
        }
    path = tmp / "override.yaml"
    cfg = {"trainer": common_trainer, "checkpoint": {"every_n_train_steps": 1}, "model": model, "data": data}
    path.write_text(yaml.safe_dump(cfg))
    return path


def _check_checkpoint(ckpt: Path) -> dict:
    from mmoe.model import load_model

    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert "mmoe_config" in state
    backbone = load_model(ckpt)
    assert backbone.config.img_size == 32
    return state


def _fit(tmp_path_factory: pytest.TempPathFactory, world: Path, task: str, recipe: str) -> tuple[Path, Path]:
    """One training step of the shipped ``recipe`` through ``mmoe fit``: returns (run folder, override YAML)."""
    tmp = tmp_path_factory.mktemp(f"{task}_run")
    override = _override(tmp, world, task)
    _cli(["fit", "--config", str(FINETUNE / recipe), "--config", str(override)])
    return tmp / "run", override


@pytest.fixture(scope="module")
def vqa_run(tmp_path_factory: pytest.TempPathFactory, world: Path) -> tuple[Path, Path]:
    return _fit(tmp_path_factory, world, "vqa", "vqav2_synthetic.yaml")


@pytest.fixture(scope="module")
def nlvr2_run(tmp_path_factory: pytest.TempPathFactory, world: Path) -> tuple[Path, Path]:
    return _fit(tmp_path_factory, world, "nlvr2", "nlvr2_synthetic.yaml")


def test_vqa_one_training_step(vqa_run: tuple[Path, Path], world: Path) -> None:
    ckpt = vqa_run[0] / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    state = _check_checkpoint(ckpt)
    vocab = json.loads((world / "vqa" / "answer_vocab.json").read_text())["answers"]
    assert state["label_names"] == vocab  # the answer vocabulary travels with the checkpoint
    assert state["hyper_parameters"]["loss"] == "soft_bce"
    assert state["global_step"] == 1


def test_nlvr2_one_training_step(nlvr2_run: tuple[Path, Path]) -> None:
    state = _check_checkpoint(nlvr2_run[0] / "checkpoints" / "last.ckpt")
    assert state["hyper_parameters"]["pooling"] == "pair"
    assert state["global_step"] == 1


@pytest.mark.slow
def test_vqa_predict_writes_official_results(vqa_run: tuple[Path, Path], world: Path) -> None:
    run, override = vqa_run
    ckpt = run / "checkpoints" / "last.ckpt"
    cfg = str(FINETUNE / "vqav2_synthetic.yaml")
    _cli(["predict", "--config", cfg, "--config", str(override), "--ckpt_path", str(ckpt)])
    vocab = json.loads((world / "vqa" / "answer_vocab.json").read_text())["answers"]
    results = json.loads((run / "results" / "vqa_results.json").read_text())
    questions = json.loads((world / "vqa" / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())["questions"]
    assert sorted(r["question_id"] for r in results) == sorted(q["question_id"] for q in questions)
    assert all(r["answer"] in vocab for r in results)
    assert json.loads((run / "results" / "answer_vocab.json").read_text())["answers"] == vocab
    anns = json.loads((world / "vqa" / "v2_mscoco_val2014_annotations.json").read_text())
    score = evaluate_vqa(anns, results, questions=questions)["overall"]
    assert 0.0 <= score <= 100.0


@pytest.mark.slow
def test_nlvr2_test_writes_predictions(nlvr2_run: tuple[Path, Path], world: Path) -> None:
    run, override = nlvr2_run
    cfg = str(FINETUNE / "nlvr2_synthetic.yaml")
    _cli(["test", "--config", cfg, "--config", str(override), "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    preds = read_predictions_csv(run / "results" / "nlvr2_predictions.csv")
    examples = read_jsonl(world / "nlvr2" / "val.json")
    # limit_test_batches=1 with eval_batch_size 64 covers the whole tiny val file.
    assert set(preds) == {e["identifier"] for e in examples}
    assert set(preds.values()) <= {"True", "False"}
    out = evaluate_nlvr2(examples, preds)
    assert 0.0 <= out["accuracy"] <= 100.0


@pytest.mark.parametrize("name", ["vqav2.yaml", "vqav2_synthetic.yaml", "nlvr2.yaml", "nlvr2_synthetic.yaml"])
def test_shipped_recipes_parse(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Every shipped recipe parses against the constructors' signatures (no typo'd keys)."""
    with pytest.raises(SystemExit) as exc:
        _cli(["fit", "--config", str(FINETUNE / name), "--print_config"])
    assert exc.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == "mmoe.train.classification.ClassificationTask"
    assert printed["data"]["class_path"].startswith("mmoe.train.data.")


def test_task_loss_rows_checkpoint_and_init_from(tmp_path: Path) -> None:
    """ClassificationTask pieces without a Trainer: soft-BCE scale, result rows, checkpoint keys, init_from."""
    import torch.nn.functional as F

    from mmoe.model import save_model
    from mmoe.train.classification import ClassificationTask

    vocab = tmp_path / "answers.json"
    save_answer_vocab(vocab, ["yes", "no", "2"])
    kw = {"backbone": "tiny_mhmoe", "backbone_overrides": {"img_size": 32}, "label_vocab": str(vocab)}
    task = ClassificationTask(**kw, loss="soft_bce", id_key="question_id", predict_format="vqa")
    torch.manual_seed(0)
    batch = {
        "image": torch.randn(2, 3, 32, 32),
        "text": torch.randint(0, 49408, (2, 6)),
        "text_padding_mask": torch.zeros(2, 6, dtype=torch.bool),
        "labels": torch.tensor([[1.0, 0.0, 0.3], [0.0, 0.6, 0.0]]),
        "question_id": torch.tensor([7, 8]),
    }
    logits = task(batch)
    assert logits.shape == (2, 3)
    expected = F.binary_cross_entropy_with_logits(logits, batch["labels"]) * 3
    assert torch.allclose(task._loss(logits, batch["labels"]), expected)
    rows = task._rows(batch, logits)
    assert [r["question_id"] for r in rows] == [7, 8] and all(r["answer"] in ("yes", "no", "2") for r in rows)

    ckpt: dict = {}
    task.on_save_checkpoint(ckpt)
    assert ckpt["label_names"] == ["yes", "no", "2"] and ckpt["mmoe_config"]["img_size"] == 32
    with pytest.raises(ValueError, match="label names"):
        task.on_load_checkpoint({"label_names": ["a", "b"]})

    # init_from: a saved backbone is loaded into the new task's backbone.
    save_model(task.backbone, tmp_path / "backbone.pt")
    task2 = ClassificationTask(**kw, init_from=str(tmp_path / "backbone.pt"), loss="soft_bce")
    for (name, p1), p2 in zip(task.backbone.state_dict().items(), task2.backbone.state_dict().values()):
        assert torch.equal(p1, p2), name

    pair = ClassificationTask(
        backbone="tiny_mhmoe", backbone_overrides={"img_size": 32}, num_classes=2, pooling="pair", image2_key="image2"
    )
    batch["image2"] = torch.randn(2, 3, 32, 32)
    assert pair(batch).shape == (2, 2)
    with pytest.raises(ValueError, match="image2_key"):
        ClassificationTask(backbone="tiny_mhmoe", num_classes=2, pooling="pair")


def _tag_batch() -> dict[str, torch.Tensor]:
    """Two 32-px images with random questions and the tags of two words (the first in both, the second in one)."""
    return {
        "image": torch.randn(2, 3, 32, 32),
        "text": torch.randint(0, 49408, (2, 6)),
        "text_padding_mask": torch.zeros(2, 6, dtype=torch.bool),
        "tags": torch.tensor([[1.0, 0.0], [1.0, 1.0]]),
    }


def test_tag_loss_reads_the_stem_only(tmp_path: Path) -> None:
    """The image-tag loss is a max over patches of per-token logits on the stem's tokens: its gradient reaches
    the conv stem and the tag head, never the blocks or the text embedding; bad settings are refused."""
    import torch.nn.functional as F

    from mmoe.train.classification import ClassificationTask

    vocab = tmp_path / "answers.json"
    save_answer_vocab(vocab, ["yes", "no"])
    kw = {"backbone": "tiny_mhmoe", "backbone_overrides": {"img_size": 32}, "label_vocab": str(vocab)}
    task = ClassificationTask(**kw, loss="soft_bce", tag_weight=2.0, tag_words=["Disc", "wedge"])
    assert task.tag_words == ["disc", "wedge"]
    torch.manual_seed(0)
    batch = _tag_batch()
    _, out = task._logits_and_output(batch)
    loss = task._tag_loss(out, batch["tags"])
    assert out.embeddings is not None
    per_token = task.tag_head(out.embeddings[:, 1 : out.num_vision_tokens])  # type: ignore[misc]
    assert torch.allclose(loss, F.binary_cross_entropy_with_logits(per_token.amax(dim=1), batch["tags"]))
    loss.backward()
    grads = {n: p.grad for n, p in task.named_parameters()}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "patch_embed" in n)
    other = {n: g for n, g in grads.items() if n.startswith("backbone.blocks.") or "text_embed" in n}
    leaked = [n for n, g in other.items() if g is not None and g.abs().sum() > 0]
    assert other and not leaked, leaked
    with pytest.raises(ValueError, match="no 'tags'"):
        task._tag_loss(out, None)
    with pytest.raises(ValueError, match="3 tags per sample"):
        task._tag_loss(out, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="needs tag_words"):
        ClassificationTask(**kw, loss="soft_bce", tag_weight=1.0)
    with pytest.raises(ValueError, match="pooling='pair'"):
        ClassificationTask(**kw, tag_weight=1.0, tag_words=["disc"], pooling="pair", image2_key="image2")

    # tag_channels: the head reads the first channels only, so the rest get no gradient from it.
    sliced = ClassificationTask(**kw, loss="soft_bce", tag_weight=1.0, tag_words=["disc", "wedge"], tag_channels=16)
    _, out = sliced._logits_and_output(batch)
    embeddings = out.embeddings
    assert embeddings is not None
    embeddings.retain_grad()
    sliced._tag_loss(out, batch["tags"]).backward()
    assert embeddings.grad is not None
    assert embeddings.grad[..., 16:].abs().sum() == 0 and embeddings.grad[:, 1:, :16].abs().sum() > 0
    with pytest.raises(ValueError, match="tag_channels"):
        ClassificationTask(**kw, tag_weight=1.0, tag_words=["disc"], tag_channels=0)
    with pytest.raises(ValueError, match="without tag_weight"):
        ClassificationTask(**kw, tag_channels=16)
    # tag_decay_steps: the weight falls linearly to 0 at that step and stays there; a constant weight without it.
    assert [task.tag_weight_at(s) for s in (0, 10_000)] == [2.0, 2.0]
    decaying = ClassificationTask(**kw, loss="soft_bce", tag_weight=4.0, tag_words=["disc"], tag_decay_steps=100)
    assert [decaying.tag_weight_at(s) for s in (0, 25, 100, 400)] == [4.0, 3.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="tag_decay_steps"):
        ClassificationTask(**kw, tag_weight=1.0, tag_words=["disc"], tag_decay_steps=0)
    with pytest.raises(ValueError, match="tag_decay_steps"):
        ClassificationTask(**kw, tag_decay_steps=100)
    # task_start_step: the task loss has weight 0 before that step, 1 from it; only with the tags on.
    assert [task.task_weight_at(s) for s in (0, 5)] == [1.0, 1.0]
    late = ClassificationTask(**kw, loss="soft_bce", tag_weight=1.0, tag_words=["disc", "wedge"], task_start_step=50)
    assert [late.task_weight_at(s) for s in (0, 49, 50, 900)] == [0.0, 0.0, 1.0, 1.0]
    for bad in ({"tag_weight": 1.0, "tag_words": ["disc"], "task_start_step": -1}, {"task_start_step": 10}):
        with pytest.raises(ValueError, match="task_start_step"):
            ClassificationTask(**kw, **bad)
    # ... and in a training step before it, the answer head gets no gradient, the stem does.
    batch_l = {**batch, "labels": torch.tensor([[1.0, 0.0], [0.0, 1.0]])}
    late.zero_grad()
    late.training_step(batch_l, 0).backward()  # type: ignore[union-attr]
    head = [p.grad for p in late.head.parameters()]
    assert all(g is None or g.abs().sum() == 0 for g in head)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in late.named_parameters() if "patch_embed" in n)


def test_tied_tag_head_scores_tokens_against_the_words_embeddings(tmp_path: Path) -> None:
    """`tag_tied`: logit = scale * <LN(token), e_word / |e_word|> + bias with e_word the mean of the word's BPE
    rows; the tag loss then reaches those rows of the text embedding and no other."""
    import torch.nn.functional as F

    from mmoe.data.tokenizer import build_tokenizer
    from mmoe.train.classification import ClassificationTask

    vocab = tmp_path / "answers.json"
    save_answer_vocab(vocab, ["yes", "no"])
    kw = {"backbone": "tiny_mhmoe", "backbone_overrides": {"img_size": 32}, "label_vocab": str(vocab)}
    task = ClassificationTask(**kw, loss="soft_bce", tag_weight=1.0, tag_words=["disc", "hexagon"], tag_tied=True)
    torch.manual_seed(0)
    with torch.no_grad():
        task.tag_head.scale.fill_(1.7)  # type: ignore[union-attr]
        task.tag_head.bias.copy_(torch.tensor([0.3, -0.2]))  # type: ignore[union-attr]
    tokens = torch.randn(2, 5, task.backbone.config.dim)
    table = task.backbone.text_embed.token_embed.weight  # type: ignore[union-attr]
    tok = build_tokenizer("openclip", max_len=16)
    ids = [tok.encode_one(w) for w in ("disc", "hexagon")]
    assert len(ids[1]) > 1  # a word of two BPE pieces: their mean
    words = torch.stack([table[i].mean(dim=0) for i in ids])
    normed = F.layer_norm(tokens, (tokens.shape[-1],))
    expected = 1.7 * normed @ F.normalize(words, dim=-1).T + torch.tensor([0.3, -0.2])
    assert torch.allclose(task.tag_head(tokens), expected, atol=1e-5)  # type: ignore[misc]
    batch = _tag_batch()
    _, out = task._logits_and_output(batch)
    task.backbone.zero_grad()
    task._tag_loss(out, batch["tags"]).backward()
    grad = table.grad
    assert grad is not None
    touched = sorted({i for row in ids for i in row})
    assert all(grad[i].abs().sum() > 0 for i in touched)
    others = torch.ones(table.shape[0], dtype=torch.bool)
    others[touched] = False
    assert grad[others].abs().sum() == 0
    with pytest.raises(ValueError, match="tag_tied"):
        ClassificationTask(**kw, loss="soft_bce", tag_tied=True)
    with pytest.raises(ValueError, match="tag_tied"):
        ClassificationTask(**kw, tag_weight=1.0, tag_words=["disc"], tag_tied=True, tag_channels=16)


def test_vqa_fit_with_mined_tags(tmp_path_factory: pytest.TempPathFactory, world: Path) -> None:
    """`mmoe fit` with the tag loss: the data mines the tags, the model checks the words before the first step."""
    shapes = json.loads((world / "world.json").read_text())["shapes"]
    tmp = tmp_path_factory.mktemp("vqa_tags")
    override = _override(tmp, world, "vqa")
    cfg = yaml.safe_load(override.read_text())
    cfg["model"]["init_args"].update(tag_weight=1.0, tag_words=shapes)
    cfg["data"]["init_args"]["tag_words"] = f"{world / 'world.json'}#shapes"
    override.write_text(yaml.safe_dump(cfg))
    _cli(["fit", "--config", str(FINETUNE / "vqav2_synthetic.yaml"), "--config", str(override)])
    state = torch.load(tmp / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 1 and any(k.startswith("tag_head.") for k in state["state_dict"])

    cfg["data"]["init_args"]["tag_words"] = shapes[:-1]
    override.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match="same words"):
        _cli(["fit", "--config", str(FINETUNE / "vqav2_synthetic.yaml"), "--config", str(override)])
