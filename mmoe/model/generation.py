"""Caption generation for BEiT-3-style masked captioning: greedy and beam search, with or without a key/value cache.

BEiT-3 fine-tunes captioning as masked language modeling under a causal text mask ([B3] sec. 3.1, unilm ``beit3``): the
text attends causally to text and fully to the image, the image never attends to text. At inference the model
predicts token t by putting a [MASK] query at text position t after the real prefix ``[BOS, y_1 .. y_{t-1}]`` and
reading the prediction at the mask (unilm ``beit3`` captioning does the same).

Two interchangeable steppers produce the log-probabilities of the next token:

* :class:`CachedStepper` uses the backbone's incremental decoding cache (docs/interfaces.md section 8): the image and
  BOS are encoded once; each step appends one real token's keys/values (``update_cache=True``) and runs one [MASK]
  query that is not kept (``update_cache=False``). Each new token costs one position, not the whole sequence.
* :class:`RecomputeStepper` re-encodes image + prefix + [MASK] every step under the full captioning mask. It is the
  reference the cache must match token for token (tests/test_caption_generation.py).

Search follows the usual conventions (unilm ``beit3`` uses a Hugging Face style beam search): beam 3, length penalty
0.6 applied as ``sum log p / length ** 0.6`` with the length counting generated tokens including EOS, at most 32 text
positions including BOS. Dimension legend: B batch, K beams, V vocabulary, Nv vision tokens, T text positions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import nn

__all__ = [
    "GenerationConfig",
    "SpecialIds",
    "GenerationOutput",
    "caption_attention_mask",
    "num_vision_tokens",
    "CachedStepper",
    "RecomputeStepper",
    "greedy_search",
    "beam_search",
    "generate",
]


@dataclass(kw_only=True)
class GenerationConfig:
    """Decoding settings ([B3] captioning: beam 3, length penalty 0.6, max 32 tokens, k/v cache)."""

    strategy: Literal["beam", "greedy"] = "beam"
    num_beams: int = 3
    length_penalty: float = 0.6
    max_length: int = 32
    use_cache: bool = True

    def __post_init__(self) -> None:
        if self.strategy not in ("beam", "greedy"):
            raise ValueError(f"GenerationConfig.strategy: expected 'beam' or 'greedy', got {self.strategy!r}")
        if not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise ValueError(f"GenerationConfig.num_beams: expected an int >= 1, got {self.num_beams!r}")
        if not isinstance(self.max_length, int) or self.max_length < 2:
            raise ValueError(
                f"GenerationConfig.max_length: expected an int >= 2 (BOS + one token), got {self.max_length!r}"
            )


@dataclass(frozen=True, kw_only=True)
class SpecialIds:
    """Token ids the decoder needs; ``banned`` ids (pad, mask, bos) are never generated."""

    bos_id: int
    eos_id: int
    mask_id: int
    pad_id: int

    @classmethod
    def from_tokenizer(cls, tok: Any) -> SpecialIds:
        return cls(bos_id=tok.bos_id, eos_id=tok.eos_id, mask_id=tok.mask_id, pad_id=tok.pad_id)

    @property
    def banned(self) -> tuple[int, ...]:
        return (self.pad_id, self.mask_id, self.bos_id)


@dataclass
class GenerationOutput:
    """``tokens[b]``: generated ids of item b without BOS/EOS; ``scores[b]``: its (length-normalized) log-prob."""

    tokens: list[list[int]]
    scores: list[float]


class Backbone(Protocol):
    """What generation needs from the backbone (docs/interfaces.md sections 2 and 8)."""

    def new_cache(self) -> Any: ...

    def __call__(self, **kwargs: Any) -> Any: ...


def caption_attention_mask(num_vision: int, num_text: int, device: torch.device | None = None) -> torch.Tensor:
    """``(Nv + T, Nv + T)`` bool, True = may attend: image <-> image, text -> image, text -> earlier text (causal).

    The image does not attend to text ([B3] sec. 3.1), so image features do not depend on the caption and can be cached.
    """
    n = num_vision + num_text
    mask = torch.zeros(n, n, dtype=torch.bool, device=device)
    mask[:num_vision, :num_vision] = True
    mask[num_vision:, :num_vision] = True
    mask[num_vision:, num_vision:] = torch.ones(num_text, num_text, dtype=torch.bool, device=device).tril()
    return mask


def num_vision_tokens(backbone: nn.Module, image: torch.Tensor) -> int:
    """``1 + grid_h * grid_w`` for ``image`` (B, 3, H, W): CLS plus one token per patch (docs/interfaces.md 2)."""
    patch = int(backbone.config.patch_size)
    h, w = image.shape[-2:]
    if h % patch or w % patch:
        raise ValueError(f"generation: image size {h}x{w} is not divisible by the backbone's patch_size {patch}")
    return 1 + (h // patch) * (w // patch)


class _Stepper:
    """Produces next-token logits for a batch of running sequences; rows can be reordered (beam search)."""

    def __init__(self, backbone: nn.Module, head: Callable[[torch.Tensor], torch.Tensor], special: SpecialIds) -> None:
        self.backbone = backbone
        self.head = head
        self.special = special
        self.length = 0  # text positions filled so far (BOS included)

    def _logprobs(self, features_BD: torch.Tensor) -> torch.Tensor:
        logits_BV = self.head(features_BD)
        logits_BV = logits_BV.to(torch.promote_types(logits_BV.dtype, torch.float32))  # fp32 at least
        logits_BV[:, list(self.special.banned)] = float("-inf")
        return torch.log_softmax(logits_BV, dim=-1)

    def _column(self, value: int, batch: int, device: torch.device) -> torch.Tensor:
        return torch.full((batch, 1), value, dtype=torch.long, device=device)


class CachedStepper(_Stepper):
    """Incremental decoding with the backbone's key/value cache (docs/interfaces.md section 8)."""

    def start(self, image: torch.Tensor) -> torch.Tensor:
        """Encode image + BOS into the cache; return log p(y_1) (B, V)."""
        b, device = image.shape[0], image.device
        nv = num_vision_tokens(self.backbone, image)
        self.cache = self.backbone.new_cache()
        self.backbone(
            image=image,
            text=self._column(self.special.bos_id, b, device),
            attn_mask=caption_attention_mask(nv, 1, device),
            cache=self.cache,
        )
        self.length = 1
        self.batch, self.device = b, device
        return self._query()

    def _query(self) -> torch.Tensor:
        out = self.backbone(
            text=self._column(self.special.mask_id, self.batch, self.device),
            cache=self.cache,
            text_start=self.length,
            update_cache=False,
        )
        return self._logprobs(out.features[:, -1])

    def advance(self, tokens_B: torch.Tensor) -> torch.Tensor:
        """Append one real token per row to the cache; return log p of the next one."""
        self.backbone(text=tokens_B[:, None], cache=self.cache, text_start=self.length, update_cache=True)
        self.length += 1
        return self._query()

    def reorder(self, index: torch.Tensor) -> None:
        self.cache.reorder(index)
        self.batch = int(index.numel())


class RecomputeStepper(_Stepper):
    """Reference decoder: re-encodes image + prefix + [MASK] under the full captioning mask at every step."""

    def start(self, image: torch.Tensor) -> torch.Tensor:
        self.image = image
        self.prefix = self._column(self.special.bos_id, image.shape[0], image.device)
        self.length = 1
        return self._query()

    def _query(self) -> torch.Tensor:
        nv = num_vision_tokens(self.backbone, self.image)
        mask_col = self._column(self.special.mask_id, self.prefix.shape[0], self.prefix.device)
        text = torch.cat([self.prefix, mask_col], dim=1)
        out = self.backbone(
            image=self.image, text=text, attn_mask=caption_attention_mask(nv, text.shape[1], text.device)
        )
        return self._logprobs(out.features[:, -1])

    def advance(self, tokens_B: torch.Tensor) -> torch.Tensor:
        self.prefix = torch.cat([self.prefix, tokens_B[:, None]], dim=1)
        self.length += 1
        return self._query()

    def reorder(self, index: torch.Tensor) -> None:
        self.image = self.image.index_select(0, index)
        self.prefix = self.prefix.index_select(0, index)


def _make_stepper(backbone: nn.Module, head: Callable, special: SpecialIds, use_cache: bool) -> _Stepper:
    return (CachedStepper if use_cache else RecomputeStepper)(backbone, head, special)


@torch.no_grad()
def greedy_search(
    backbone: nn.Module,
    head: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    *,
    special: SpecialIds,
    max_length: int = 32,
    use_cache: bool = True,
) -> GenerationOutput:
    """Pick the most likely token at every step until EOS or ``max_length`` text positions (BOS included)."""
    b = image.shape[0]
    stepper = _make_stepper(backbone, head, special, use_cache)
    logp = stepper.start(image)
    tokens: list[list[int]] = [[] for _ in range(b)]
    scores = torch.zeros(b, dtype=torch.float64)
    done = torch.zeros(b, dtype=torch.bool)
    for step in range(1, max_length):
        best_lp, best = logp.max(dim=-1)
        best = best.cpu()
        for i in range(b):
            if done[i]:
                continue
            scores[i] += float(best_lp[i])
            if int(best[i]) == special.eos_id:
                done[i] = True
            else:
                tokens[i].append(int(best[i]))
        if bool(done.all()) or step == max_length - 1:
            break
        feed = torch.where(done, torch.full_like(best, special.eos_id), best).to(image.device)
        logp = stepper.advance(feed)
    return GenerationOutput(tokens=tokens, scores=scores.tolist())


@torch.no_grad()
def beam_search(
    backbone: nn.Module,
    head: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    *,
    special: SpecialIds,
    num_beams: int = 3,
    length_penalty: float = 0.6,
    max_length: int = 32,
    use_cache: bool = True,
) -> GenerationOutput:
    """Batched beam search; a finished hypothesis scores ``sum log p / (generated tokens incl. EOS) ** length_penalty``.

    Each item keeps ``num_beams`` running beams; of the ``2 * num_beams`` best extensions, EOS extensions ranked
    within the first ``num_beams`` become finished hypotheses and the rest fill the running beams. An item is done
    when it has ``num_beams`` finished hypotheses and its best running beam cannot beat the worst of them at the
    current length (the Hugging Face rule unilm ``beit3`` relies on); at ``max_length`` running beams are finished.
    """
    b, k = image.shape[0], num_beams
    device = image.device
    stepper = _make_stepper(backbone, head, special, use_cache)
    logp = stepper.start(image)  # (B, V)
    v = logp.shape[-1]
    # Every item starts with k copies of its single prefix; only the first may expand at step 1 (scores -inf).
    stepper.reorder(torch.arange(b, device=device).repeat_interleave(k))
    logp = logp.repeat_interleave(k, dim=0)
    beam_scores = torch.zeros(b, k, dtype=torch.float64)
    beam_scores[:, 1:] = float("-inf")
    beam_tokens: list[list[list[int]]] = [[[] for _ in range(k)] for _ in range(b)]
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(b)]
    done = [False] * b

    def penalized(total: float, length: int) -> float:
        return total / (length**length_penalty)

    for step in range(1, max_length):
        cand = beam_scores[:, :, None] + logp.double().cpu().view(b, k, v)  # (B, K, V)
        top_scores, top_idx = cand.view(b, k * v).topk(2 * k, dim=-1)
        next_scores = torch.zeros(b, k, dtype=torch.float64)
        next_tokens = torch.full((b, k), special.eos_id, dtype=torch.long)
        next_parent = torch.zeros(b, k, dtype=torch.long)
        new_beam_tokens: list[list[list[int]]] = []
        for i in range(b):
            if done[i]:
                next_scores[i] = beam_scores[i]
                new_beam_tokens.append(beam_tokens[i])
                next_parent[i] = torch.arange(k)
                continue
            filled = 0
            rows: list[list[int]] = []
            for rank in range(2 * k):
                score = float(top_scores[i, rank])
                if score == float("-inf"):
                    break
                parent, token = divmod(int(top_idx[i, rank]), v)
                if token == special.eos_id:
                    if rank < k:
                        hyp = list(beam_tokens[i][parent])
                        finished[i].append((penalized(score, len(hyp) + 1), hyp))
                    continue
                next_scores[i, filled] = score
                next_tokens[i, filled] = token
                next_parent[i, filled] = parent
                rows.append([*beam_tokens[i][parent], token])
                filled += 1
                if filled == k:
                    break
            while filled < k:  # fewer than k live extensions (tiny vocabularies): pad with dead beams
                next_scores[i, filled] = float("-inf")
                next_parent[i, filled] = 0
                rows.append(list(beam_tokens[i][0]))
                filled += 1
            new_beam_tokens.append(rows)
            finished[i].sort(key=lambda h: -h[0])
            del finished[i][k:]
            best_running = float(next_scores[i].max())
            if len(finished[i]) == k and (
                best_running == float("-inf") or finished[i][-1][0] >= penalized(best_running, step + 1)
            ):
                done[i] = True
        beam_scores, beam_tokens = next_scores, new_beam_tokens
        if all(done) or step == max_length - 1:
            break
        index = (torch.arange(b)[:, None] * k + next_parent).view(-1).to(device)
        stepper.reorder(index)
        logp = stepper.advance(next_tokens.view(-1).to(device))

    out_tokens: list[list[int]] = []
    out_scores: list[float] = []
    for i in range(b):
        hyps = list(finished[i])
        if not done[i]:  # ran out of length: running beams count as finished (no EOS)
            for j in range(k):
                if beam_scores[i, j] > float("-inf"):
                    hyps.append(
                        (penalized(float(beam_scores[i, j]), max(len(beam_tokens[i][j]), 1)), beam_tokens[i][j])
                    )
        best_score, best_tokens = max(hyps, key=lambda h: h[0]) if hyps else (float("-inf"), [])
        out_tokens.append(list(best_tokens))
        out_scores.append(float(best_score))
    return GenerationOutput(tokens=out_tokens, scores=out_scores)


def generate(
    backbone: nn.Module,
    head: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    *,
    special: SpecialIds,
    config: GenerationConfig | None = None,
) -> GenerationOutput:
    """Caption a batch of images (B, 3, H, W) with the strategy in ``config`` (default: beam 3, lp 0.6, max 32)."""
    config = config or GenerationConfig()
    if config.strategy == "greedy" or config.num_beams == 1:
        return greedy_search(
            backbone, head, image, special=special, max_length=config.max_length, use_cache=config.use_cache
        )
    return beam_search(
        backbone,
        head,
        image,
        special=special,
        num_beams=config.num_beams,
        length_penalty=config.length_penalty,
        max_length=config.max_length,
        use_cache=config.use_cache,
    )
