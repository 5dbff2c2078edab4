"""DRY, XTC and top-nσ as transformers ``LogitsProcessor`` objects.

Pass them to ``model.generate(logits_processor=LogitsProcessorList([...]))`` (also through
:func:`phaselm.sampling.phase_slip_generate`). ``generate`` runs a custom list after the processors
built from the generation config that are not warpers (repetition penalty, no-repeat n-gram, ...)
and *before* the warpers (temperature → top-k → top-p → min-p), so these three see the logits at
T = 1:

* top-nσ on raw logits, as the paper states (its kept set does not depend on T anyway: dividing
  by T divides both ``max − z`` and σ by T);
* XTC's probabilities are ``softmax(z)`` at T = 1, as in llama.cpp's default chain
  (``dry → top_k → typ_p → top_p → min_p → xtc → temperature``), except that there top-k/p and min-p
  run before XTC; here they run after it (they never bring back a removed token).

Every ``__call__`` takes ``input_ids [B, T]`` (long; the prompt and what has been generated) and
``scores [B, V]`` (float logits) and returns new ``[B, V]`` logits; removed tokens get ``-inf``.
Rows are processed independently (XTC draws one coin per row per step from its own generator).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import torch
from transformers import LogitsProcessor

DEFAULT_SEQUENCE_BREAKERS = ("\n", ":", '"', "*")
"""llama.cpp's default DRY sequence breakers (as text)."""

_FLOAT_MAX_LOG = 88.7228391  # log of float32's largest value: caps base**exponent


def _number(name: str, value, low: float, high: float = math.inf, hint: str = "") -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite real number{hint}, got {value!r}")
    if not (low <= float(value) <= high):
        raise ValueError(f"{name} must be in [{low:g}, {high:g}]{hint}, got {value!r}")
    return float(value)


def _integer(name: str, value, low: int, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}{hint}, got {value!r}")
    return int(value)


def sequence_breaker_ids(tokenizer, breakers: Iterable[str] = DEFAULT_SEQUENCE_BREAKERS) -> list[int]:
    """Token ids whose text contains any of ``breakers`` (llama.cpp's single-token breakers).

    llama.cpp also treats multi-token spellings of a breaker (a token ending in a prefix of it,
    followed by the rest) as breakers; this helper keeps the single-token case only.
    """
    breakers = [b for b in breakers]
    if not breakers or not all(isinstance(b, str) and b for b in breakers):
        raise ValueError(f"breakers must be non-empty strings, e.g. {DEFAULT_SEQUENCE_BREAKERS}, got {breakers!r}")
    ids = []
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        if any(b in text for b in breakers):
            ids.append(token_id)
    return ids


class DRYLogitsProcessor(LogitsProcessor):
    """DRY ("Don't Repeat Yourself", llama.cpp / koboldcpp): penalise the token that would extend a
    repetition of the context's suffix.

    Context c = the last ``penalty_last_n`` tokens of the row (all of ``input_ids`` when ``None``;
    the prompt included, left padding too). For every earlier position j, let m_j be the length of
    the longest common suffix of c[..j] and c (capped at the distance from the end to the last
    sequence breaker, so no match crosses a breaker). If m_j >= ``allowed_length``, the token
    c[j+1] would repeat a sequence of m_j + 1 tokens; with M(v) the largest such m_j over the j
    with c[j+1] = v:

        z'_v = z_v − multiplier · base^(M(v) − allowed_length)     (exponent capped so the power fits in float32)

    Tokens that are single-token sequence breakers are never penalised. Nothing happens when the
    context has <= ``allowed_length`` tokens, or when the suffix after the last breaker is shorter
    than ``allowed_length``.

    Args:
        multiplier: >= 0 (0 disables); llama.cpp's recommended 0.8.
        base: >= 1, growth of the penalty per extra repeated token (1.75).
        allowed_length: >= 1, the longest repeat left unpenalised (2).
        sequence_breakers: token ids that end a match (see :func:`sequence_breaker_ids`).
        penalty_last_n: how many most recent tokens are searched (``None``: all).

    Shapes: ``input_ids [B, T]``, ``scores [B, V]`` → ``[B, V]``.
    """

    def __init__(self, multiplier: float = 0.8, base: float = 1.75, allowed_length: int = 2,
                 sequence_breakers: Iterable[int] = (), penalty_last_n: int | None = None):
        self.multiplier = _number("multiplier", multiplier, 0.0, hint=" (0 disables DRY; llama.cpp suggests 0.8)")
        self.base = _number("base", base, 1.0, hint=" (penalty growth per repeated token; llama.cpp suggests 1.75)")
        self.allowed_length = _integer("allowed_length", allowed_length, 1, " (longest unpenalised repeat, e.g. 2)")
        if isinstance(sequence_breakers, (str, bytes)):
            raise ValueError("sequence_breakers must be token ids; convert text with sequence_breaker_ids(tokenizer)")
        breakers = list(sequence_breakers)
        for b in breakers:
            _integer("each sequence breaker", b, 0, " (a token id; use sequence_breaker_ids(tokenizer) for text)")
        self.sequence_breakers = sorted({int(b) for b in breakers})
        self.penalty_last_n = None if penalty_last_n is None else _integer(
            "penalty_last_n", penalty_last_n, 1, " (or None for the whole context)")
        self.max_exponent = math.floor(_FLOAT_MAX_LOG / math.log(self.base)) if self.base > 1.000001 else math.inf

    def penalties(self, context: torch.Tensor) -> dict[int, float]:
        """``{token: penalty}`` for one row's context ``[T]`` (the definition above)."""
        n = context.shape[0]
        if self.multiplier == 0 or n <= self.allowed_length:
            return {}
        rev = context.flip(0)  # rev[0] is the last token
        breakers = torch.tensor(self.sequence_breakers, dtype=rev.dtype, device=rev.device)
        is_breaker = torch.isin(rev, breakers)
        limit = int(is_breaker.int().argmax()) if bool(is_breaker.any()) else n
        if limit < self.allowed_length:
            return {}
        # m[k-1] = length of the common suffix of c and c shifted back by k (k = 1..n-1): rev[i] == rev[i+k]
        i = torch.arange(n, device=rev.device)
        k = torch.arange(1, n, device=rev.device)[:, None]
        j = i + k
        eq = (j < n) & (rev[i] == rev[j.clamp(max=n - 1)])
        m = eq.int().cumprod(1).sum(1).clamp(max=limit)  # [n-1]
        nxt = rev[:-1]  # the token after the earlier occurrence ending k back: rev[k-1]
        hit = m >= self.allowed_length
        if not bool(hit.any()):
            return {}
        out: dict[int, int] = {}
        for token, length in zip(nxt[hit].tolist(), m[hit].tolist()):
            out[token] = max(out.get(token, 0), length)
        skip = set(self.sequence_breakers)
        return {t: self.multiplier * self.base ** min(length - self.allowed_length, self.max_exponent)
                for t, length in out.items() if t not in skip}

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        out = scores.clone()
        window = input_ids if self.penalty_last_n is None else input_ids[:, -self.penalty_last_n:]
        for b in range(input_ids.shape[0]):
            pen = self.penalties(window[b])
            if pen:
                idx = torch.tensor(list(pen), device=scores.device)
                out[b, idx] -= torch.tensor(list(pen.values()), dtype=scores.dtype, device=scores.device)
        return out


class XTCLogitsProcessor(LogitsProcessor):
    """XTC ("Exclude Top Choices", llama.cpp): sometimes remove the most likely tokens.

    Per row and step, with probability ``probability`` (one uniform draw per row from the
    processor's own generator, seeded by ``seed``): with p = softmax(z) and
    A = {v : p_v >= threshold}, if |A| >= 2 every token of A except the least likely one gets −inf
    (ties: exactly one is kept). Nothing happens when |A| < 2 (in particular for threshold > 0.5),
    or when fewer than ``min_keep`` tokens would remain (counting tokens with finite logits).

    Args:
        threshold: in (0, 1]; llama.cpp suggests 0.1.
        probability: in [0, 1] (0 disables); 0.5 suggested.
        min_keep: >= 1, the fewest candidates XTC may leave.
        seed: seeds the processor's ``torch.Generator`` (the global RNG is not touched); the
            draws continue across calls, so reuse one processor per reproducible run.

    Shapes: ``input_ids [B, T]`` (unused), ``scores [B, V]`` → ``[B, V]``.
    """

    def __init__(self, threshold: float = 0.1, probability: float = 0.5, min_keep: int = 1, seed: int = 0):
        self.threshold = _number("threshold", threshold, 0.0, 1.0, " (a probability; llama.cpp suggests 0.1)")
        if self.threshold == 0:
            raise ValueError("threshold must be > 0 (0 would remove every token but one); use e.g. 0.1")
        self.probability = _number("probability", probability, 0.0, 1.0, " (chance XTC acts on a step; 0 disables)")
        self.min_keep = _integer("min_keep", min_keep, 1)
        self.seed = _integer("seed", seed, 0)
        self.generator = torch.Generator().manual_seed(self.seed)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.probability == 0:
            return scores
        coin = torch.rand(scores.shape[0], generator=self.generator).to(scores.device)  # one draw per row
        probs = scores.float().softmax(-1)
        above = probs >= self.threshold
        count = above.sum(-1)
        finite = torch.isfinite(scores).sum(-1)
        act = (coin < self.probability) & (count >= 2) & (finite - (count - 1) >= self.min_keep)
        if not bool(act.any()):
            return scores
        # remove the count-1 most likely tokens (sorted descending, stable: ties keep the later one)
        order = torch.sort(probs, dim=-1, descending=True, stable=True).indices
        positions = torch.arange(scores.shape[-1], device=scores.device).expand_as(order).contiguous()
        rank = torch.empty_like(order).scatter_(-1, order, positions)
        remove = act[:, None] & (rank < (count - 1)[:, None])
        return scores.masked_fill(remove, float("-inf"))


class TopNSigmaLogitsProcessor(LogitsProcessor):
    """Top-nσ (Tang et al. 2024, "Top-nσ: Not All Logits Are You Need"): keep the tokens whose
    logit is within n standard deviations of the maximum.

    With M = max_v z_v and σ the (population) standard deviation of the finite logits of the row:

        keep v  ⇔  z_v >= M − n·σ,     the others get −inf.

    Applied to raw logits, before temperature, as the paper states (``generate`` runs a custom
    processor before its temperature warper); the kept set is the same at any temperature since
    z/T scales both M − z_v and σ by 1/T. Logits already −inf (masked by an earlier processor)
    are left out of M and σ, as in llama.cpp.

    Args:
        n: >= 0 (the paper's default 1.0; larger keeps more).

    Shapes: ``input_ids [B, T]`` (unused), ``scores [B, V]`` → ``[B, V]``.
    """

    def __init__(self, n: float = 1.0):
        self.n = _number("n", n, 0.0, hint=" (standard deviations below the max logit; the paper uses 1.0)")

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        z = scores.float()
        finite = torch.isfinite(z)
        count = finite.sum(-1, keepdim=True).clamp(min=1)
        zf = z.masked_fill(~finite, 0.0)
        mean = zf.sum(-1, keepdim=True) / count
        var = ((zf - mean) ** 2).masked_fill(~finite, 0.0).sum(-1, keepdim=True) / count
        top = z.masked_fill(~finite, float("-inf")).max(-1, keepdim=True).values
        return scores.masked_fill(z < top - self.n * var.sqrt(), float("-inf"))
