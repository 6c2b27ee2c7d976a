"""VQAv2 data module: the official question/annotation files and COCO image folders ([B3] sec. 3.1).

Batches (docs/interfaces.md section 4): ``image`` (B,3,H,W), ``text`` (B,L), ``text_padding_mask`` (B,L),
``labels`` (B, num_answers) soft scores (absent for unannotated test files), ``question_id`` (B,) int64; with
``tag_words``, training batches also carry ``tags`` (B, T): the image tags mined from the training questions
(``mmoe.data.vqa.answer_tags``), the target of ``ClassificationTask(tag_weight)``.

Training reads with ``on_missing="skip"`` (a question whose image is missing or unreadable is reported with its
id and dropped); validation, test and predict read with ``eval_on_missing="error"`` by default, so no question
silently leaves a score. BEiT-3 fine-tunes with a random resized crop (scale 0.5-1), flips and RandAugment; flips
are off by default here because they turn "left"/"right" questions false (set ``hflip`` to follow BEiT-3).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from mmoe.data.grounded import resolve_grounded_words
from mmoe.data.vqa import VQADataset, VQAFiles, holdout_image_keys, load_answer_vocab
from mmoe.train.data.base import STAGES, ImageTextCollate, ImageTextDataModule

__all__ = ["OnMissing", "VQACollate", "VQADataModule"]

OnMissing = Literal["skip", "error"]


class VQACollate(ImageTextCollate):
    """``VQADataset`` items -> a vqa batch (module docstring); ``None`` items (unreadable images) are dropped."""

    text_field = "question"
    id_field = "question_id"

    def __call__(self, items: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
        batch = super().__call__(items)
        kept = [it for it in items if it is not None]
        if batch and all("tags" in it for it in kept):
            batch["tags"] = torch.stack([it["tags"] for it in kept])
        return batch


def _as_list(value: str | Sequence[str | None] | None) -> list[str | None]:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def vqa_files(
    stage: str,
    questions: str | Sequence[str] | None,
    annotations: str | Sequence[str | None] | None,
    images: str | Sequence[str] | None,
) -> list[VQAFiles] | None:
    """The ``VQAFiles`` of one stage from its ``{stage}_questions/annotations/images`` (one or several sources)."""
    q, a, i = _as_list(questions), _as_list(annotations), _as_list(images)
    if not q:
        if a or i:
            raise ValueError(f"VQADataModule: {stage}_annotations/{stage}_images given without {stage}_questions")
        return None
    a = a or [None] * len(q)
    if len(a) != len(q) or len(i) != len(q):
        raise ValueError(
            f"VQADataModule: {stage}_questions has {len(q)} files, {stage}_annotations {len(a)} and "
            f"{stage}_images {len(i)}; give one annotation file (or none) and one image folder per questions file"
        )
    return [VQAFiles(questions=str(qq), annotations=aa, image_dir=str(ii)) for qq, aa, ii in zip(q, a, i)]


class VQADataModule(ImageTextDataModule):
    """VQAv2 from the official files (``mmoe.data.vqa``).

    Args:
        train_questions, train_annotations, train_images (and ``val_``, ``test_``, ``predict_``): questions
            JSON, annotations JSON (none for test files) and COCO image folder of a stage; each a path or a
            list of paths (several sources, e.g. train2014 + Visual Genome). ``predict_*`` default to ``test_*``
            (the files of the official submission, e.g. test-dev).
        answer_vocab: the answer vocabulary file (``mmoe-vqa-vocab``); the same file as the model's.
        split: ``"standard"`` (train on ``train``, validate on ``val``) or ``"vilt"``: the ViLT/BEiT-3 split,
            train on ``train`` + ``val`` minus ``holdout_images`` val images, validate on those images.
        holdout_images, holdout_seed: size and choice of the held-out val images (``holdout_image_keys``).
        eval_on_missing: behaviour for missing images outside training (default ``"error"``).
        tag_words: tag words (``pair_mask_words`` syntax: a list, ``"world.json#shapes"``,
            ``"default#coco_categories"``) whose presence is mined from the training questions
            (``mmoe.data.vqa.answer_tags``) into the training batches' ``tags``; the same words as the model's
            ``tag_words``. None (default): no tags.
        kwargs: tokenizer, transforms and loaders (``tokenizer``, ``max_text_len``, ``image_size``, ``image_mean``,
            ``train_scale``, ``batch_size``, ``seed``, ...): ``mmoe.train.data.base.ImageTextDataModule``.
            ``seed`` fixes the training order (a permutation per (seed, epoch)) and the per-sample augmentation
            seeds; with these a run resumed mid-epoch sees the batches of the uninterrupted run.
    """

    def __init__(
        self,
        *,
        train_questions: str | list[str] | None = None,
        train_annotations: str | list[str | None] | None = None,
        train_images: str | list[str] | None = None,
        val_questions: str | list[str] | None = None,
        val_annotations: str | list[str | None] | None = None,
        val_images: str | list[str] | None = None,
        test_questions: str | list[str] | None = None,
        test_annotations: str | list[str | None] | None = None,
        test_images: str | list[str] | None = None,
        predict_questions: str | list[str] | None = None,
        predict_annotations: str | list[str | None] | None = None,
        predict_images: str | list[str] | None = None,
        answer_vocab: str | None = None,
        split: Literal["standard", "vilt"] = "standard",
        holdout_images: int = 1000,
        holdout_seed: int | None = None,
        eval_on_missing: OnMissing = "error",
        tag_words: str | list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        given = {
            "train": (train_questions, train_annotations, train_images),
            "val": (val_questions, val_annotations, val_images),
            "test": (test_questions, test_annotations, test_images),
            "predict": (predict_questions, predict_annotations, predict_images),
        }
        self.files = {stage: vqa_files(stage, *given[stage]) for stage in STAGES}
        self.files["predict"] = self.files["predict"] or self.files["test"]
        train, val = self.files["train"], self.files["val"]
        if split not in ("standard", "vilt"):
            raise ValueError(f"VQADataModule: split={split!r}; expected 'standard' or 'vilt'")
        if split == "vilt" and not (train and val):
            raise ValueError("VQADataModule(split='vilt'): needs train and val files (val gives the held-out images)")
        self.eval_on_missing: OnMissing = eval_on_missing
        self.split, self.holdout_images, self.holdout_seed = split, holdout_images, holdout_seed
        self.label_names: list[str] | None = load_answer_vocab(answer_vocab) if answer_vocab else None
        if (train or val) and self.label_names is None:
            raise ValueError("VQADataModule: answer_vocab is required to train or validate (soft-score targets)")
        self.tag_words: list[str] | None = resolve_grounded_words(tag_words, key="data.tag_words") or None

    def collate(self, stage: str) -> VQACollate:
        return VQACollate(self.tokenizer)

    def setup(self, stage: str | None = None) -> None:
        holdout = None
        if self.split == "vilt" and stage in (None, "fit", "validate"):
            holdout = holdout_image_keys(self.files["val"], self.holdout_images, self.holdout_seed)
        want = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}
        for name in want.get(stage or "", STAGES):
            if name in self.datasets or not self.files.get(name):
                continue
            if name == "train":
                files = list(self.files["train"]) + (list(self.files["val"]) if holdout is not None else [])
                self.datasets[name] = VQADataset(
                    files,
                    answer_vocab=self.label_names,
                    transform=self.train_transform,
                    exclude_images=holdout,
                    on_missing="skip",
                    tag_words=self.tag_words,
                )
            else:
                self.datasets[name] = VQADataset(
                    self.files[name],
                    answer_vocab=self.label_names,
                    transform=self.eval_transform,
                    include_images=holdout if name == "val" else None,
                    on_missing=self.eval_on_missing,
                )
