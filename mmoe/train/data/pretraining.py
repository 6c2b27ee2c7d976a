"""Pretraining DataModule: three webdataset streams for BEiT-3 masked data modeling ([B3] sec. 2.3).

BEiT-3 pretrains on monomodal images (masked image modeling, 40% block-wise masks), monomodal text
(masked language modeling, 15%) and image-text pairs (50% of the text masked, plus the image mask),
in batches of equal parts. This module wires ``mmoe.data.shard_reader.ShardStream`` into Lightning:

* every argument is a plain type, so ``LightningCLI`` parses it from YAML (shard patterns are lists
  of strings, ratios are floats);
* the data-parallel rank and world size come from the attached trainer (explicit splitting, no
  sampler injection), workers split further inside the stream;
* an epoch is ``steps_per_epoch`` batches per rank (``len()`` works, so progress bars show totals);
* ``state_dict``/``load_state_dict`` (saved in Lightning checkpoints) hold the seed, the pass, the batches of
  it the fit loop consumed, the workers' raw-sample cursors, samples seen per stream and skip counts: a run
  resumed from a checkpoint at an epoch end starts the next pass, one resumed mid-epoch continues the pass with
  exactly the batches the uninterrupted run would have trained on (``mmoe.data.shard_reader.StreamLoader``);
* skipped samples are counted per reason, logged after every pass and exposed by ``data_stats()``
  (``MaskedPretraining`` or a callback can log them).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from lightning.pytorch import LightningDataModule

from mmoe.data.grounded import CaptionTags, GroundedTokens, resolve_grounded_words
from mmoe.data.masking import BlockMaskGenerator
from mmoe.data.resume import fit_progress
from mmoe.data.shard_reader import ShardStream, StreamConfig, StreamLoader
from mmoe.data.tokenizer import Tokenizer, build_tokenizer
from mmoe.data.transforms import build_transform

log = logging.getLogger(__name__)

__all__ = ["PretrainDataModule"]


class PretrainDataModule(LightningDataModule):
    """Image / text / pair shard streams mixed per batch or alternating (docs/interfaces.md section 4).

    Args:
        image_shards, text_shards, pair_shards: training shard patterns (brace/glob) per stream; a stream
            with no patterns is left out. Each pattern must match at least one file.
        val_image_shards, val_text_shards, val_pair_shards: validation patterns (read once, in order).
        mode: ``"mixed"`` (each batch holds every stream, split by the ratios) or ``"alternate"`` (each
            batch holds one stream; streams take turns in proportion to the ratios).
        image_ratio, text_ratio, pair_ratio: relative stream shares ([B3]: equal parts).
        batch_size: samples per batch per rank (all streams together in ``"mixed"`` mode).
        image_size, patch_size: input side and patch side; the mask grid is ``image_size // patch_size``.
        max_text_len: token sequence length including bos/eos.
        image_mask_ratio, min_mask_patches, mask_min_aspect: block-wise masking (0.4, 16, 0.3 in [B3]/BEiT).
        text_mask_ratio, pair_text_mask_ratio: BERT masking ratios for text-only (0.15) and pair (0.5) text.
        pair_mask_words: grounded-word masking of the *training* pair text (``mmoe.data.grounded``): null (uniform,
            [B3]), ``"default"`` (colour, number, position, size and COCO category words), a ``.json``/``.txt``
            word file (e.g. a synthetic world's ``world.json``) or a list of these and literal words. The chosen
            words' tokens are selected first among the same number of masked positions, so more of the pair loss
            needs the image. Validation pairs keep uniform masking, which is what ``val/grounding_gain`` and the
            pair perplexities are defined on, so runs with and without the option stay comparable.
        pair_grounded_share: share in (0, 1] of a caption's grounded tokens masked first (1: all, up to the
            mask count); the rest of the masked positions are uniform. Needs ``pair_mask_words``.
        pair_image_mask: block-mask the *training* pair images as well (True, [B3] sec. 2.2: masked image modeling
            on pairs too). False leaves them whole, so the pair stream trains only masked language modeling and
            every masked caption word can be read off the image; the image stream keeps MIM. Validation pairs keep
            their image masks either way, so ``val/grounding_gain`` means the same in every run.
        pair_tag_words: object words whose mentions in *all* of a pair's captions become its ``tags`` target
            (``mmoe.data.grounded.CaptionTags``; training and validation pairs), for ``MaskedPretraining``'s
            ``tag_weight`` loss, which must name the same words. The forms of ``pair_mask_words``, with one word
            group picked by ``#``: ``"default#coco_categories"``, ``"data/shapes/world.json#shapes"``.
        tokenizer, tokenizer_path: ``"openclip"`` or ``"sentencepiece"`` (with the ``.spm`` path).
        image_mean, image_std: image normalization (BEiT-3: 0.5/0.5).
        train_scale, hflip, color_jitter: training augmentation (random resized crop, flip, jitter). A flipped
            pair image gets "left" and "right" swapped in its caption.
        num_workers, pin_memory: DataLoader settings (per rank).
        seed: base seed of shard resampling, shuffling and masks.
        steps_per_epoch: training batches per epoch per rank.
        val_steps: cap on validation batches per rank (set it with several ranks so all ranks agree).
        shuffle_buffer: samples held per worker for shuffling.
    """

    def __init__(
        self,
        *,
        image_shards: list[str] | None = None,
        text_shards: list[str] | None = None,
        pair_shards: list[str] | None = None,
        val_image_shards: list[str] | None = None,
        val_text_shards: list[str] | None = None,
        val_pair_shards: list[str] | None = None,
        mode: Literal["mixed", "alternate"] = "mixed",
        image_ratio: float = 1.0,
        text_ratio: float = 1.0,
        pair_ratio: float = 1.0,
        batch_size: int = 48,
        image_size: int = 224,
        patch_size: int = 16,
        max_text_len: int = 64,
        image_mask_ratio: float = 0.4,
        min_mask_patches: int = 16,
        mask_min_aspect: float = 0.3,
        text_mask_ratio: float = 0.15,
        pair_text_mask_ratio: float = 0.5,
        pair_mask_words: str | list[str] | None = None,
        pair_grounded_share: float = 1.0,
        pair_image_mask: bool = True,
        pair_tag_words: str | list[str] | None = None,
        tokenizer: Literal["openclip", "sentencepiece"] = "openclip",
        tokenizer_path: str | None = None,
        image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        image_std: tuple[float, float, float] = (0.5, 0.5, 0.5),
        train_scale: tuple[float, float] = (0.2, 1.0),
        hflip: float = 0.5,
        color_jitter: float = 0.4,
        num_workers: int = 2,
        pin_memory: bool = False,
        seed: int = 0,
        steps_per_epoch: int = 1000,
        val_steps: int | None = None,
        shuffle_buffer: int = 1000,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not (image_shards or text_shards or pair_shards):
            raise ValueError("PretrainDataModule: give at least one of image_shards, text_shards, pair_shards")
        if image_size % patch_size:
            raise ValueError(
                f"PretrainDataModule: image_size={image_size} must be a multiple of patch_size={patch_size}"
            )
        if steps_per_epoch < 1 or batch_size < 1:
            raise ValueError(
                f"PretrainDataModule: steps_per_epoch={steps_per_epoch}, batch_size={batch_size} must be >= 1"
            )
        if not 0.0 < pair_grounded_share <= 1.0:
            raise ValueError(f"PretrainDataModule: pair_grounded_share must be in (0, 1], got {pair_grounded_share}")
        if pair_grounded_share != 1.0 and pair_mask_words is None:
            raise ValueError(
                f"PretrainDataModule: pair_grounded_share={pair_grounded_share} needs pair_mask_words (the words to "
                "mask first); without it pair text is masked uniformly"
            )
        self._grounded_words = resolve_grounded_words(pair_mask_words, key="PretrainDataModule: pair_mask_words")
        self._grounded: GroundedTokens | None = None
        tag_words = resolve_grounded_words(pair_tag_words, key="PretrainDataModule: pair_tag_words")
        self.caption_tags = CaptionTags(tag_words) if tag_words else None
        if self.caption_tags is not None and not pair_shards:
            raise ValueError("PretrainDataModule: pair_tag_words needs pair_shards: the tags come from pair captions")
        self._tokenizer: Tokenizer | None = None
        self._train_loader: StreamLoader | None = None
        self._val_loader: StreamLoader | None = None
        self._pending_state: dict[str, Any] | None = None

    # -- parts ----------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            hp = self.hparams
            self._tokenizer = build_tokenizer(hp.tokenizer, max_len=hp.max_text_len, path=hp.tokenizer_path)
        return self._tokenizer

    @property
    def tokenizer_spec(self) -> dict[str, Any]:
        return self.tokenizer.spec()

    @property
    def grounded_tokens(self) -> GroundedTokens | None:
        """Token sequences of ``pair_mask_words`` (None when the option is off), built once."""
        if self._grounded is None and self._grounded_words:
            self._grounded = GroundedTokens.from_words(self.tokenizer, self._grounded_words)
        return self._grounded

    def _streams(self, val: bool) -> dict[str, StreamConfig]:
        hp = self.hparams
        pre = "val_" if val else ""
        streams: dict[str, StreamConfig] = {}
        for name, ratio in (("image", 0.0), ("text", hp.text_mask_ratio), ("pair", hp.pair_text_mask_ratio)):
            patterns = hp[f"{pre}{name}_shards"]
            if patterns:
                if isinstance(patterns, str):
                    patterns = [patterns]
                # grounded words first in training pairs only: validation keeps the uniform masks of [B3]
                grounded = self.grounded_tokens if name == "pair" and not val else None
                streams[name] = StreamConfig(
                    name,  # type: ignore[arg-type]
                    list(patterns),
                    text_mask_ratio=ratio or 0.15,
                    grounded=grounded,
                    grounded_share=hp.pair_grounded_share,
                    image_mask=hp.pair_image_mask or name != "pair" or val,
                    tags=self.caption_tags if name == "pair" else None,
                )
        return streams

    def _rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def _dataset(self, val: bool) -> ShardStream | None:
        hp = self.hparams
        streams = self._streams(val)
        if not streams:
            return None
        rank, world = self._rank()
        transform = build_transform(
            hp.image_size,
            train=not val,
            mean=hp.image_mean,
            std=hp.image_std,
            scale=hp.train_scale,
            hflip=0.0,  # flipped by the stream instead, which also swaps left/right in pair captions
            color_jitter=hp.color_jitter,
        )
        grid = hp.image_size // hp.patch_size
        masks = BlockMaskGenerator(
            grid, mask_ratio=hp.image_mask_ratio, min_num_patches=hp.min_mask_patches, min_aspect=hp.mask_min_aspect
        )
        return ShardStream(
            streams,
            batch_size=hp.batch_size,
            image_transform=transform,
            tokenizer=self.tokenizer,
            mask_generator=masks,
            ratios={"image": hp.image_ratio, "text": hp.text_ratio, "pair": hp.pair_ratio},
            mode=hp.mode,
            train=not val,
            num_batches=hp.val_steps if val else hp.steps_per_epoch,
            rank=rank,
            world_size=world,
            seed=hp.seed,
            shuffle_buffer=hp.shuffle_buffer,
            hflip=0.0 if val else hp.hflip,
        )

    # -- Lightning hooks ------------------------------------------------------------------------
    def train_dataloader(self) -> StreamLoader:
        ds = self._dataset(val=False)
        assert ds is not None  # checked in __init__
        self._train_loader = StreamLoader(ds, num_workers=self.hparams.num_workers, pin_memory=self.hparams.pin_memory)
        # a checkpoint records the batches the fit loop consumed, not the ones prefetched (mid-epoch resume)
        self._train_loader.progress = lambda: fit_progress(getattr(self, "trainer", None))
        if self._pending_state is not None:
            self._train_loader.load_state_dict(self._pending_state)
            self._pending_state = None
        return self._train_loader

    def val_dataloader(self) -> StreamLoader | list:
        ds = self._dataset(val=True)
        if ds is None:
            return []
        self._val_loader = StreamLoader(
            ds, num_workers=self.hparams.num_workers, pin_memory=self.hparams.pin_memory, name="val"
        )
        return self._val_loader

    def state_dict(self) -> dict[str, Any]:
        """Seed, pass, consumed batches, cursors, samples seen and skip counts of the training stream (checkpoints)."""
        if self._train_loader is not None:
            return self._train_loader.state_dict()
        return dict(self._pending_state) if self._pending_state else {"seed": self.hparams.seed, "iteration": 0}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the training stream position; applied now or when the train loader is built."""
        if self._train_loader is not None:
            self._train_loader.load_state_dict(state_dict)
        else:
            self._pending_state = dict(state_dict)

    def data_stats(self) -> dict[str, float]:
        """Counters for logging: ``data/samples_seen/{stream}``, ``data/skipped/{reason}`` (cumulative)."""
        out: dict[str, float] = {}
        if self._train_loader is not None:
            for k, v in self._train_loader.samples_seen.items():
                out[f"data/samples_seen/{k}"] = float(v)
            for k, v in self._train_loader.skipped.items():
                out[f"data/skipped/{k}"] = float(v)
        return out
