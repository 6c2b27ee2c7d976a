"""mmoe.metrics.vqa (port of the official VQA evaluator) and mmoe.metrics.nlvr2 on hand-made and real data."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from helpers import find_sample

from mmoe.metrics.nlvr2 import evaluate_nlvr2, read_jsonl, read_predictions_csv, sentence_key, write_predictions_csv
from mmoe.metrics.nlvr2 import main as nlvr2_main
from mmoe.metrics.vqa import (
    evaluate_vqa,
    normalize_answer,
    process_digit_article,
    process_punctuation,
    question_accuracy,
)
from mmoe.metrics.vqa import main as vqa_main


# ---------------------------------------------------------------- normalization rules
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hot-dog", "hot dog"),  # punctuation not touching a space becomes a space
        ("hi - there", "hi  there"),  # touching a space: deleted (double space is kept by this step)
        ("yes!", "yes "),  # "!" not touching a space -> space
        ("(approx)", " approx "),
        ("1,000", "1000"),  # comma between digits: every mark is deleted
        ("1,000 (approx)", "1000 approx"),
        ("st. louis", "st louis"),  # period not followed by a digit: deleted
        ("2.5", "2.5"),  # decimal point kept
        ("5.", "5"),  # the official "(?!<=\\d)" is a lookahead, so a period after a digit goes too
        ("a/b", "a b"),
        ("it's", "it's"),  # apostrophes are not in the official punctuation list
        ("x" + "." * 40, "x" + "." * 8),  # official re.UNICODE-as-count quirk: at most 32 periods removed
    ],
)
def test_process_punctuation(text: str, expected: str) -> None:
    assert process_punctuation(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Two Dogs", "2 dogs"),  # lower-case, number words -> digits
        ("none", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),  # only none/zero..ten are mapped
        ("a dog", "dog"),  # articles dropped
        ("The  An apple", "apple"),
        ("the", ""),
        ("dont", "don't"),  # contractions restored
        ("isnt it", "isn't it"),
        ("Im", "im"),  # the table's capitalised keys never match after lower-casing (official behaviour)
    ],
)
def test_process_digit_article(text: str, expected: str) -> None:
    assert process_digit_article(text) == expected


def test_normalize_answer_full_chain() -> None:
    assert normalize_answer("  Two\tdogs.\n") == "2 dogs"
    assert normalize_answer("hi - there") == "hi there"  # split/join collapses the double space
    assert normalize_answer("A hot-dog!") == "hot dog"


# ---------------------------------------------------------------- scoring rules
def test_identical_answers_are_not_normalized() -> None:
    # All 10 agree -> compared verbatim; the prediction is always normalized ("two" -> "2"), so it misses.
    assert question_accuracy("two", ["two"] * 10) == 0.0
    assert question_accuracy("Yes", ["yes"] * 10) == 1.0


def test_leave_one_out_average() -> None:
    # 2 "red", 8 "blue": each red answer sees 1 other red (1/3), each blue sees 2 reds (2/3) -> 0.6.
    assert question_accuracy("red", ["red"] * 2 + ["blue"] * 8) == pytest.approx(0.6)
    # 3 matches: answers that are "2" see 2 others (2/3), the 7 others see 3 (1) -> 0.9.
    assert question_accuracy("two", ["2"] * 3 + ["two"] * 7) == pytest.approx(0.9)
    assert question_accuracy("cat", ["dog"] * 10) == 0.0


def test_disagreeing_answers_get_punctuation_only() -> None:
    # The answers disagree, so "hot-dog" is punctuation-normalized to "hot dog" and all 10 match.
    assert question_accuracy("hot dog", ["hot-dog"] * 6 + ["hot dog"] * 4) == 1.0
    # Ground truth gets no digit/article step: "the dog" stays, while the prediction becomes "dog".
    assert question_accuracy("the dog", ["the dog"] * 9 + ["cat"]) == 0.0


def _toy_set() -> tuple[dict, dict, list]:
    def ann(qid: int, answers: list[str], atype: str, qtype: str) -> dict:
        return {
            "question_id": qid,
            "image_id": 1,
            "answer_type": atype,
            "question_type": qtype,
            "multiple_choice_answer": answers[0],
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)],
        }

    anns = {
        "annotations": [
            ann(1, ["yes"] * 10, "yes/no", "is the"),
            ann(2, ["2"] * 3 + ["two"] * 7, "number", "how many"),
            ann(3, ["red"] * 2 + ["blue"] * 8, "other", "what color"),
            ann(4, ["red"] * 1 + ["blue"] * 9, "other", "what color"),
        ]
    }
    qs = {"questions": [{"question_id": i, "image_id": 1, "question": "?"} for i in (1, 2, 3, 4)]}
    res = [
        {"question_id": 1, "answer": "yes"},
        {"question_id": 2, "answer": "two"},
        {"question_id": 3, "answer": "red"},
        {"question_id": 4, "answer": "red"},
    ]
    return qs, anns, res


def test_evaluate_per_type_and_rounding() -> None:
    qs, anns, res = _toy_set()
    out = evaluate_vqa(anns, res, questions=qs)
    # q4: the red answer sees 0 others, each blue sees 1 red -> 9 * (1/3) / 10 = 0.3.
    assert out["perQuestion"] == {1: 100.0, 2: 90.0, 3: 60.0, 4: 30.0}
    assert out["perAnswerType"] == {"yes/no": 100.0, "number": 90.0, "other": 45.0}
    assert out["perQuestionType"]["what color"] == 45.0
    assert out["overall"] == 70.0
    one_third = evaluate_vqa(anns["annotations"][2:3], [{"question_id": 3, "answer": "blue"}])
    # blue: each red answer sees 8 blue (1), each blue sees 7 (1) -> 100; and rounding to 2 digits:
    assert one_third["overall"] == 100.0
    q4 = evaluate_vqa(anns["annotations"][3:4], [{"question_id": 4, "answer": "red"}], n=2)
    assert q4["overall"] == 30.0


def test_results_must_cover_the_annotations() -> None:
    qs, anns, res = _toy_set()
    with pytest.raises(ValueError, match="missing answers for question ids: 4"):
        evaluate_vqa(anns, res[:3], questions=qs)
    with pytest.raises(ValueError, match="not in the annotations: 99"):
        evaluate_vqa(anns, res + [{"question_id": 99, "answer": "x"}])
    with pytest.raises(ValueError, match="appears more than once"):
        evaluate_vqa(anns, res + [res[0]])


def test_vqa_cli_prints_the_summary_and_writes_per_question_scores_on_request(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    qs, anns, res = _toy_set()
    for name, obj in (("q.json", qs), ("a.json", anns), ("r.json", res)):
        (tmp_path / name).write_text(json.dumps(obj))
    args = ["--questions", str(tmp_path / "q.json"), "--annotations", str(tmp_path / "a.json")]
    args += ["--results", str(tmp_path / "r.json")]
    assert vqa_main(args) == 0
    printed = capsys.readouterr().out
    out = json.loads(printed)
    assert set(out) == {"overall", "perAnswerType", "perQuestionType"}
    assert out["overall"] == 70.0 and out["perQuestionType"]["what color"] == 45.0
    assert '"perQuestion"' not in printed and not list(tmp_path.glob("*scores*"))
    # with --per-question: the same stdout, and the file has one score per question
    scores = tmp_path / "out" / "scores.json"
    assert vqa_main(args + ["--per-question", str(scores)]) == 0
    assert json.loads(capsys.readouterr().out) == out
    assert json.loads(scores.read_text()) == {"1": 100.0, "2": 90.0, "3": 60.0, "4": 30.0}


def test_vqa_cli_stdout_does_not_grow_with_the_questions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A val set of many questions prints as many lines as one of four: only the summary goes to stdout."""
    qs, anns, res = _toy_set()
    many_q, many_a, many_r = [], [], []
    for rep in range(300):
        for q, a, r in zip(qs["questions"], anns["annotations"], res):
            qid = rep * 100 + q["question_id"]
            many_q.append({**q, "question_id": qid})
            many_a.append({**a, "question_id": qid})
            many_r.append({**r, "question_id": qid})
    for name, obj in (("q.json", {**qs, "questions": many_q}), ("a.json", {**anns, "annotations": many_a})):
        (tmp_path / name).write_text(json.dumps(obj))
    (tmp_path / "r.json").write_text(json.dumps(many_r))
    args = ["--questions", str(tmp_path / "q.json"), "--annotations", str(tmp_path / "a.json")]
    vqa_main(args + ["--results", str(tmp_path / "r.json"), "--per-question", str(tmp_path / "s.json")])
    printed = capsys.readouterr().out
    assert len(printed.splitlines()) < 30 and json.loads(printed)["overall"] == 70.0
    assert len(json.loads((tmp_path / "s.json").read_text())) == 1200


# ---------------------------------------------------------------- real VQA samples
def test_real_vqa_sample_perfect_results_score_100(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    qpath = find_sample("vqa_v2_train2014_img458752_questions.json")
    apath = find_sample("vqa_v2_train2014_img458752_annotations.json")
    if qpath is None or apath is None:
        pytest.skip("real VQA sample files not found in datasets/samples")
    anns = json.loads(apath.read_text())["annotations"]
    res = [{"question_id": a["question_id"], "answer": a["multiple_choice_answer"]} for a in anns]
    (tmp_path / "r.json").write_text(json.dumps(res))
    scores = tmp_path / "scores.json"
    args = ["--questions", str(qpath), "--annotations", str(apath), "--results", str(tmp_path / "r.json")]
    vqa_main(args + ["--per-question", str(scores)])
    out = json.loads(capsys.readouterr().out)
    assert out["overall"] == 100.0
    assert json.loads(scores.read_text()) == {str(a["question_id"]): 100.0 for a in anns}
    wrong = [{"question_id": a["question_id"], "answer": "zebra"} for a in anns]
    assert evaluate_vqa(anns, wrong)["overall"] == 0.0


def test_real_vqa_first100_annotations() -> None:
    path = find_sample("v2_mscoco_val2014_annotations.first100.json")
    if path is None:
        pytest.skip("official first-100 VQA annotation samples not found")
    anns = json.loads(path.read_text())["annotations"]

    # Questions where >= 4 annotators agree on an answer that normalization leaves unchanged: the majority
    # answer must score exactly 100.
    def majority(a: dict) -> tuple[str, int]:
        return Counter(x["answer"] for x in a["answers"]).most_common(1)[0]

    agreed = [a for a in anns if majority(a)[1] >= 4 and normalize_answer(majority(a)[0]) == majority(a)[0]]
    assert len(agreed) > 50
    res = [{"question_id": a["question_id"], "answer": majority(a)[0]} for a in agreed]
    out = evaluate_vqa(agreed, res)
    assert out["overall"] == 100.0
    # Official quirk on real data: question 262162026 has 5 x "none"; the prediction "none" is normalized to "0"
    # but the human answers are not digit-normalized, so it scores 0 (as on the evaluation server).
    q = [a for a in anns if a["question_id"] == 262162026]
    assert evaluate_vqa(q, [{"question_id": 262162026, "answer": "none"}])["overall"] == 0.0
    assert set(out["perAnswerType"]) <= {"yes/no", "number", "other"}


# ---------------------------------------------------------------- NLVR2
def _nlvr2_examples() -> list[dict]:
    return [
        {"identifier": "dev-1-0-0", "label": "True"},
        {"identifier": "dev-1-1-0", "label": "False"},
        {"identifier": "dev-1-2-0", "label": "True"},
        {"identifier": "dev-1-0-1", "label": "False"},
        {"identifier": "dev-1-1-1", "label": "True"},
    ]


def test_nlvr2_accuracy_and_consistency() -> None:
    assert sentence_key("dev-850-2-0") == "dev-850--0"
    preds = {"dev-1-0-0": "True", "dev-1-1-0": "false", "dev-1-2-0": "True", "dev-1-0-1": "True", "dev-1-1-1": "True"}
    out = evaluate_nlvr2(_nlvr2_examples(), preds)
    assert out["accuracy"] == pytest.approx(80.0)  # 4 of 5 (labels compare case-insensitively)
    assert out["consistency"] == pytest.approx(50.0)  # sentence 0 all right, sentence 1 not
    assert out["num_sentences"] == 2
    with pytest.raises(ValueError, match="dev-1-1-1"):
        evaluate_nlvr2(_nlvr2_examples(), {k: v for k, v in preds.items() if k != "dev-1-1-1"})


def test_nlvr2_cli_on_real_dev(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dev = find_sample("tiny-dev.json")
    if dev is None:
        pytest.skip("datasets/samples/nlvr2/tiny-dev.json not found")
    examples = read_jsonl(dev)
    csv_path = tmp_path / "preds.csv"
    write_predictions_csv(csv_path, [(e["identifier"], e["label"] == "True") for e in examples])
    assert read_predictions_csv(csv_path) == {e["identifier"]: e["label"] for e in examples}
    nlvr2_main(["--annotations", str(dev), "--predictions", str(csv_path)])
    out = json.loads(capsys.readouterr().out)
    assert out["accuracy"] == 100.0 and out["consistency"] == 100.0
    # Flip one example: accuracy drops by one of 8 and its sentence becomes inconsistent.
    write_predictions_csv(
        csv_path, [(e["identifier"], (e["label"] == "True") != (i == 0)) for i, e in enumerate(examples)]
    )
    out = evaluate_nlvr2(examples, read_predictions_csv(csv_path))
    assert out["accuracy"] == pytest.approx(100.0 * 7 / 8)
    assert out["consistency"] < 100.0


def test_prior_baselines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mmoe.metrics.vqa import prior_baseline

    qs, anns, _ = _toy_set()
    train = anns["annotations"]
    # Normalized answer counts over all 40 human answers: blue 17, yes 10, "2" 10 ("two" -> "2"), red 3
    # -> majority "blue"; per answer type, the type's own majority.
    assert {r["answer"] for r in prior_baseline(train, train)} == {"blue"}
    by_type = {r["question_id"]: r["answer"] for r in prior_baseline(train, train, by="answer_type")}
    assert by_type == {1: "yes", 2: "2", 3: "blue", 4: "blue"}
    (tmp_path / "a.json").write_text(json.dumps(anns))
    (tmp_path / "q.json").write_text(json.dumps(qs))
    vqa_main(
        ["--questions", str(tmp_path / "q.json"), "--annotations", str(tmp_path / "a.json")]
        + [
            "--baseline-from",
            str(tmp_path / "a.json"),
            "--baseline-by",
            "answer_type",
        ]
    )
    out = json.loads(capsys.readouterr().out)
    assert out["perAnswerType"]["yes/no"] == 100.0
    lines = [json.dumps({"identifier": f"train-0-{i}-0", "label": "True" if i < 3 else "False"}) for i in range(4)]
    (tmp_path / "train.jsonl").write_text("\n".join(lines))
    nlvr2_main(["--annotations", str(tmp_path / "train.jsonl"), "--baseline-from", str(tmp_path / "train.jsonl")])
    assert json.loads(capsys.readouterr().out)["accuracy"] == 75.0
