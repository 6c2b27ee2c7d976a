"""NLVR2 accuracy and consistency ([NLVR2]; the official ``lil-lab/nlvr`` ``nlvr2/eval/metrics.py``).

Algorithm of the official script, written here:

* Predictions are a CSV of ``identifier,prediction`` lines (no header; ``True``/``False``), compared
  with the JSONL ``label`` case-insensitively. Every labelled example needs a prediction (the official
  script lists the missing identifiers and stops; we raise an error that names them).
* Accuracy ("precision" in the official printout) = correct / examples.
* Consistency = share of unique sentences all of whose examples are right. An identifier is
  ``{split}-{set}-{pair}-{sentence}``; examples of one sentence share it up to the pair number, so the
  sentence key is the identifier with its third field blanked (``dev-850--0``).

Both are returned as fractions and in percent. CLI:
``python -m mmoe.metrics.nlvr2 --annotations dev.json --predictions preds.csv`` prints JSON
(``--baseline-from train.json`` instead of ``--predictions`` scores the majority-label baseline).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mmoe.files import atomic_write_text
from mmoe.metrics import add_scored_input

__all__ = ["sentence_key", "evaluate_nlvr2", "read_predictions_csv", "write_predictions_csv", "read_jsonl", "main"]


def sentence_key(identifier: str) -> str:
    """Identifier with the pair field blanked: the official grouping for consistency."""
    parts = identifier.split("-")
    if len(parts) < 4:
        raise ValueError(f"NLVR2 identifier {identifier!r}: expected '{{split}}-{{set}}-{{pair}}-{{sentence}}'")
    parts[2] = ""
    return "-".join(parts)


def evaluate_nlvr2(examples: Sequence[Mapping[str, Any]], predictions: Mapping[str, str | bool]) -> dict[str, Any]:
    """Accuracy and consistency of ``predictions`` (identifier -> "True"/"False" or bool) on ``examples``.

    Raises ``ValueError`` naming the identifiers that have no prediction.
    """
    missing = [str(ex["identifier"]) for ex in examples if str(ex["identifier"]) not in predictions]
    if missing:
        preview = ", ".join(missing[:10]) + (f" ... ({len(missing)} in all)" if len(missing) > 10 else "")
        raise ValueError(f"NLVR2 predictions: {len(missing)} of {len(examples)} examples have none: {preview}")
    if not examples:
        raise ValueError("NLVR2 evaluation: no labelled examples")
    correct = 0
    consistent: dict[str, bool] = {}
    for ex in examples:
        ident = str(ex["identifier"])
        key = sentence_key(ident)
        consistent.setdefault(key, True)
        if str(predictions[ident]).lower() == str(ex["label"]).lower():
            correct += 1
        else:
            consistent[key] = False
    accuracy = correct / len(examples)
    consistency = sum(consistent.values()) / len(consistent)
    return {
        "accuracy": 100.0 * accuracy,
        "consistency": 100.0 * consistency,
        "precision": accuracy,  # the official printout's names and scale
        "consistency_fraction": consistency,
        "num_examples": len(examples),
        "num_sentences": len(consistent),
    }


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read an official NLVR2 JSONL file (one example per line; blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such NLVR2 annotation file")
    out = []
    with path.open("r", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON object ({e})") from e
    return out


def read_predictions_csv(path: str | Path) -> dict[str, str]:
    """Read ``identifier,prediction`` lines; a leading ``identifier,prediction`` header line is ignored."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such predictions file")
    preds: dict[str, str] = {}
    with path.open("r", encoding="utf-8", newline="") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if not row or not row[0].strip():
                continue
            if n == 1 and row[0].strip().lower() == "identifier":
                continue
            if len(row) < 2:
                raise ValueError(f"{path}:{n}: expected 'identifier,prediction', got {','.join(row)!r}")
            preds[row[0].strip()] = row[1].strip()
    return preds


def write_predictions_csv(path: str | Path, predictions: Sequence[tuple[str, bool | str]]) -> None:
    """Write the official submission CSV (no header, ``True``/``False``), atomically."""
    lines = [
        f"{ident},{('True' if pred else 'False') if isinstance(pred, bool) else str(pred)}\n"
        for ident, pred in predictions
    ]
    atomic_write_text(path, "".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmoe.metrics.nlvr2", description=__doc__.splitlines()[0])
    parser.add_argument("--annotations", required=True, help="official NLVR2 JSONL, e.g. dev.json")
    add_scored_input(
        parser,
        flag="--predictions",
        results="CSV of identifier,prediction (True/False)",
        baseline="score the majority-label baseline of this training file instead",
        metavar="TRAIN_JSONL",
    )
    args = parser.parse_args(argv)
    examples = read_jsonl(args.annotations)
    if args.predictions:
        preds = read_predictions_csv(args.predictions)
    else:
        labels = [str(e["label"]).lower() == "true" for e in read_jsonl(args.baseline_from)]
        majority = "True" if 2 * sum(labels) >= len(labels) else "False"
        preds = {str(e["identifier"]): majority for e in examples}
    out = evaluate_nlvr2(examples, preds)
    json.dump(out, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
