"""VQA accuracy: a port of the official VQA evaluator ([VQAv2]; GT-Vision-Lab ``vqaEval.py``).

Written here from the published algorithm of the VQA challenge evaluator (Antol et al. 2015,
Goyal et al. 2017), keeping its quirks so that numbers match the official tool:

* The predicted answer is cleaned (newlines/tabs to spaces, stripped) and then always normalized:
  punctuation, then digits/articles/contractions.
* The 10 ground-truth answers of a question are normalized (punctuation only, as the official code
  does) **only when they disagree**; if all 10 are identical they are compared verbatim.
* Punctuation: each mark of ``PUNCT`` is deleted if it touches a space in the *original* text (or
  the text contains a comma between two digits, e.g. ``"1,000"``), otherwise it becomes a space.
  Then periods not followed by a digit are deleted (the official lookbehind is written ``(?!<=\\d)``,
  which is really a lookahead for the two characters ``<=``, so a period after a digit is deleted as
  well, e.g. ``"5."`` -> ``"5"`` but ``"2.5"`` is kept). The official call passes ``re.UNICODE`` as
  the positional ``count`` argument of ``sub``, so at most 32 periods are deleted; kept here.
* Digits/articles: lower-case, split on whitespace, number words ``none``/``zero``..``ten`` become
  digits, the articles ``a``/``an``/``the`` are dropped, apostrophe-less contractions are restored
  (``dont`` -> ``don't``), words joined by single spaces.
* Score of a question: for each of the 10 answers, ``min(1, matches among the other 9 / 3)``,
  averaged over the 10 (leave-one-out). Accuracies are in percent, rounded with Python's ``round``
  to ``n = 2`` digits (per question, per answer type, per question type and overall), as the
  official ``setAccuracy``/``setEvalQA`` do.

CLI: ``python -m mmoe.metrics.vqa --questions Q --annotations A --results R`` prints the summary as JSON
(``overall``, ``perAnswerType``, ``perQuestionType``); ``--per-question FILE`` writes every question's score to
FILE as JSON (``{question_id: score}``), which the official evaluator also keeps apart from the summary
(``evalQA`` beside ``accuracy``): one stdout line per question buries the summary. ``--baseline-from TRAIN_A``
instead of ``--results`` scores the blind majority-answer baseline (``--baseline-by question_type`` for
the per-question-type prior).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mmoe.files import atomic_write_json
from mmoe.metrics import add_scored_input

__all__ = [
    "CONTRACTIONS",
    "MANUAL_MAP",
    "ARTICLES",
    "PUNCT",
    "process_punctuation",
    "process_digit_article",
    "normalize_answer",
    "question_accuracy",
    "evaluate_vqa",
    "prior_baseline",
    "load_vqa_json",
    "main",
]

# Apostrophe-less spellings annotators type, mapped back to the contraction (official table, incl. its
# oddities such as "somebody'd" -> "somebodyd" and keys that keep the apostrophe).
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip

MANUAL_MAP: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES: tuple[str, ...] = ("a", "an", "the")
PUNCT: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)  # fmt: skip

# Kept exactly as published: "(?!<=\d)" is a negative *lookahead* for "<=" + digit, not a lookbehind.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
# The official code calls periodStrip.sub("", text, re.UNICODE): re.UNICODE (= 32) lands in ``count``.
_PERIOD_SUB_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """Official ``processPunctuation``: delete or space out punctuation, then strip periods."""
    out = text
    has_digit_comma = _COMMA_STRIP.search(text) is not None
    for p in PUNCT:
        # The test reads the *input* text, while replacements accumulate on ``out`` (as published).
        if (p + " " in text or " " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_SUB_COUNT)


def process_digit_article(text: str) -> str:
    """Official ``processDigitArticle``: lower-case, number words to digits, drop articles, fix contractions."""
    words = []
    for word in text.lower().split():
        word = MANUAL_MAP.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
    """Full normalization the evaluator applies to a predicted answer (also used to build the vocabulary)."""
    return process_digit_article(process_punctuation(_clean(text)))


def question_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """Leave-one-out accuracy of one question in [0, 1] (before the official rounding).

    ``gt_answers`` are the raw human answers (10 in VQAv2). They are punctuation-normalized only when
    they are not all identical, exactly as the official evaluator does.
    """
    if not gt_answers:
        raise ValueError("question_accuracy: gt_answers is empty; expected the human answers of the question")
    res = normalize_answer(prediction)
    gts = list(gt_answers)
    if len(set(gts)) > 1:
        gts = [process_punctuation(a) for a in gts]
    accs = []
    for i in range(len(gts)):
        matches = sum(1 for j, a in enumerate(gts) if j != i and a == res)
        accs.append(min(1.0, matches / 3.0))
    return sum(accs) / len(accs)


def _index_by_qid(items: Iterable[Mapping[str, Any]], what: str) -> dict[int, Mapping[str, Any]]:
    out: dict[int, Mapping[str, Any]] = {}
    for k, item in enumerate(items):
        if "question_id" not in item:
            raise ValueError(f"{what}: entry {k} has no 'question_id' key")
        qid = int(item["question_id"])
        if qid in out:
            raise ValueError(f"{what}: question_id {qid} appears more than once")
        out[qid] = item
    return out


def _ids_preview(ids: Iterable[int], limit: int = 10) -> str:
    ids = sorted(ids)
    more = f" ... ({len(ids)} in all)" if len(ids) > limit else ""
    return ", ".join(str(i) for i in ids[:limit]) + more


def evaluate_vqa(
    annotations: Sequence[Mapping[str, Any]] | Mapping[str, Any],
    results: Sequence[Mapping[str, Any]],
    *,
    questions: Sequence[Mapping[str, Any]] | Mapping[str, Any] | None = None,
    n: int = 2,
) -> dict[str, Any]:
    """Score ``results`` (``[{"question_id", "answer"}]``) against official VQA annotations.

    Args:
        annotations: the ``annotations`` list, or the whole official annotations dict.
        results: the submission list. Like the official ``loadRes``, it must answer exactly the
            annotated questions: missing or unknown question ids raise a ``ValueError`` naming them.
        questions: optional questions list/dict; when given every annotated question must be in it.
        n: digits of the percent rounding (official default 2).

    Returns:
        ``{"overall": float, "perAnswerType": {type: float}, "perQuestionType": {type: float},
        "perQuestion": {question_id (int): float}}``, all in percent.
    """
    if isinstance(annotations, Mapping):
        annotations = annotations["annotations"]
    if isinstance(questions, Mapping):
        questions = questions["questions"]
    gts = _index_by_qid(annotations, "annotations")
    res = _index_by_qid(results, "results")
    if questions is not None:
        qs = _index_by_qid(questions, "questions")
        not_asked = set(gts) - set(qs)
        if not_asked:
            raise ValueError(f"annotations: question ids not in the questions file: {_ids_preview(not_asked)}")
    missing, extra = set(gts) - set(res), set(res) - set(gts)
    if missing or extra:
        msg = ["results do not correspond to the annotated questions"]
        if missing:
            msg.append(f"missing answers for question ids: {_ids_preview(missing)}")
        if extra:
            msg.append(f"question ids not in the annotations: {_ids_preview(extra)}")
        raise ValueError("; ".join(msg))

    acc_all: list[float] = []
    by_qtype: dict[str, list[float]] = {}
    by_atype: dict[str, list[float]] = {}
    per_question: dict[int, float] = {}
    for qid, gt in gts.items():
        answer = res[qid].get("answer")
        if not isinstance(answer, str):
            raise ValueError(f"results: question_id {qid} has answer {answer!r}; expected a string")
        acc = question_accuracy(answer, [str(a["answer"]) for a in gt["answers"]])
        acc_all.append(acc)
        by_qtype.setdefault(str(gt.get("question_type", "")), []).append(acc)
        by_atype.setdefault(str(gt.get("answer_type", "")), []).append(acc)
        per_question[qid] = round(100 * acc, n)

    def pct(xs: list[float]) -> float:
        return round(100 * float(sum(xs)) / len(xs), n)

    return {
        "overall": pct(acc_all) if acc_all else 0.0,
        "perAnswerType": {k: pct(v) for k, v in by_atype.items()},
        "perQuestionType": {k: pct(v) for k, v in by_qtype.items()},
        "perQuestion": per_question,
    }


def load_vqa_json(path: str | Path, key: str | None = None) -> Any:
    """Read an official VQA JSON file; with ``key`` return that list (e.g. ``"annotations"``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with path.open("r", encoding="utf-8") as f:
        data = json.load(f)
    if key is not None:
        if not isinstance(data, dict) or key not in data:
            raise ValueError(f"{path}: expected a JSON object with a {key!r} list (official VQA format)")
        return data[key]
    return data


def prior_baseline(
    train_annotations: Sequence[Mapping[str, Any]], eval_annotations: Sequence[Mapping[str, Any]], by: str = "none"
) -> list[dict[str, Any]]:
    """Blind baselines as a results list: the most frequent normalized training answer for every question
    (``by="none"``, the majority-answer baseline) or per ``question_type`` / ``answer_type`` (``by=...``)."""
    counts: dict[str, Counter[str]] = {}
    for ann in train_annotations:
        key = str(ann.get(by, "")) if by != "none" else ""
        counts.setdefault(key, Counter()).update(normalize_answer(str(a["answer"])) for a in ann["answers"])
    overall = sum(counts.values(), Counter()).most_common(1)[0][0]
    best = {k: c.most_common(1)[0][0] for k, c in counts.items()}
    out = []
    for ann in eval_annotations:
        key = str(ann.get(by, "")) if by != "none" else ""
        out.append({"question_id": int(ann["question_id"]), "answer": best.get(key, overall)})
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: print the summary as JSON; ``--per-question`` writes the per-question scores to a file."""
    parser = argparse.ArgumentParser(prog="python -m mmoe.metrics.vqa", description=__doc__.splitlines()[0])
    parser.add_argument("--questions", required=True, help="v2_OpenEnded_mscoco_*_questions.json")
    parser.add_argument("--annotations", required=True, help="v2_mscoco_*_annotations.json")
    add_scored_input(
        parser,
        results='results JSON: [{"question_id": int, "answer": str}]',
        baseline="score a blind prior baseline built from these training annotations instead of a results file",
    )
    parser.add_argument(
        "--baseline-by",
        choices=["none", "question_type", "answer_type"],
        default="none",
        help="baseline prior: one majority answer ('none') or the majority answer per question/answer type",
    )
    parser.add_argument("--digits", type=int, default=2, help="rounding digits of the percentages (official: 2)")
    parser.add_argument(
        "--per-question",
        metavar="FILE",
        type=Path,
        help="also write every question's score to FILE as JSON {question_id: score} (kept off stdout)",
    )
    args = parser.parse_args(argv)
    annotations = load_vqa_json(args.annotations, "annotations")
    if args.results:
        results = load_vqa_json(args.results)
        if not isinstance(results, list):
            raise ValueError(f"{args.results}: expected a JSON list of {{question_id, answer}} objects")
    else:
        results = prior_baseline(load_vqa_json(args.baseline_from, "annotations"), annotations, args.baseline_by)
    out = evaluate_vqa(
        annotations,
        results,
        questions=load_vqa_json(args.questions, "questions"),
        n=args.digits,
    )
    per_question = out.pop("perQuestion")
    if args.per_question is not None:
        # JSON object keys are strings: question ids as str(int), in the order of the annotations
        atomic_write_json(args.per_question, {str(k): v for k, v in per_question.items()}, indent=None)
    json.dump(out, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
