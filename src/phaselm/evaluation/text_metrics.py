"""Diversity and repetition metrics of generated text, and bootstrap confidence intervals.

Definitions (``docs/sampling_benchmark.md`` has the long form):

* ``unique_word_ratio(text)``: the published Phase-Slip "diversity": lower-case the text, delete
  '.' and ',', split on whitespace; unique words / words. Computed on prompt + continuation.
* ``words(text)``: lower-cased word and punctuation tokens (regex ``\\w+|[^\\w\\s]``), used by
  the metrics below on the continuation only.
* ``distinct_n(texts, n)``: unique n-grams / n-grams, pooled over all samples of one prompt.
* ``self_bleu(texts)``: mean over samples of BLEU-4 of the sample against the other samples of
  the same prompt (uniform weights, brevity penalty with the closest reference length, add-one
  smoothing of the n > 1 precisions); 1 = all samples alike.
* ``repetition_rate(text, n=4)``: 1 − unique 4-grams / 4-grams within one continuation.
* ``stratified_summary(values [P, R], ...)``: mean and a 95% CI from the bootstrap stratified by
  prompt (prompts drawn with replacement, then rounds within each drawn prompt).
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter

import numpy as np

_WORD = re.compile(r"\w+|[^\w\s]")


def unique_word_ratio(text: str) -> float:
    w = text.lower().replace(".", "").replace(",", "").split()
    return len(set(w)) / len(w) if w else 0.0


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i: i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: list[str], n: int) -> float:
    grams = [g for t in texts for g in ngrams(words(t), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(text: str, n: int = 4) -> float:
    grams = ngrams(words(text), n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def bleu(hypothesis: list[str], references: list[list[str]], max_n: int = 4) -> float:
    """Sentence BLEU of a token list against reference token lists (see the module doc)."""
    if not hypothesis or not references:
        return 0.0
    log_p = 0.0
    for n in range(1, max_n + 1):
        hyp = Counter(ngrams(hypothesis, n))
        max_ref: Counter = Counter()
        for ref in references:
            max_ref |= Counter(ngrams(ref, n))
        clipped = sum(min(c, max_ref[g]) for g, c in hyp.items())
        total = sum(hyp.values())
        if n > 1:
            clipped, total = clipped + 1, total + 1
        if clipped == 0 or total == 0:
            return 0.0
        log_p += math.log(clipped / total) / max_n
    ref_len = min((len(r) for r in references), key=lambda r: (abs(r - len(hypothesis)), r))
    brevity = 1.0 if len(hypothesis) > ref_len else math.exp(1 - ref_len / len(hypothesis))
    return brevity * math.exp(log_p)


def self_bleu(texts: list[str]) -> float:
    toks = [words(t) for t in texts]
    if len(toks) < 2:
        return float("nan")
    return float(np.mean([bleu(toks[i], toks[:i] + toks[i + 1:]) for i in range(len(toks))]))


def bootstrap_ci(values, n_boot: int = 2000, level: float = 0.95, seed: int = 0, stat=np.mean) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of ``stat`` (default: the mean) of ``values``."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan")
    if len(v) == 1:
        return float(v[0]), float(v[0])
    rng = np.random.default_rng(seed)
    stats = stat(v[rng.integers(0, len(v), size=(n_boot, len(v)))], axis=1)
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def summarize(values) -> dict:
    """``{mean, std, ci95: [lo, hi], n}`` of the finite values."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return {"mean": None, "std": None, "ci95": [None, None], "n": 0}
    lo, hi = bootstrap_ci(v)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "ci95": [lo, hi], "n": int(len(v))}


def stratified_summary(values, prompts, rounds) -> dict:
    """``{mean, std, ci95, n}`` of per-generation ``values [P, R]`` (prompt × round), the 95% CI from
    the bootstrap stratified by prompt: each draw takes P prompts with replacement (``prompts
    [B, P]``), then R rounds with replacement within each drawn prompt (``rounds [B, P, R]``;
    :func:`phaselm.evaluation.sampling_bench.stratified_indices`). Non-finite values are left out."""
    a = np.asarray(values, dtype=float)
    v = a[np.isfinite(a)]
    if len(v) == 0:
        return {"mean": None, "std": None, "ci95": [None, None], "n": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a draw of prompts whose values are all NaN
        boots = np.nanmean(a[np.asarray(prompts)[..., None], np.asarray(rounds)], axis=(1, 2))
    boots = boots[np.isfinite(boots)]
    lo, hi = np.quantile(boots, [0.025, 0.975]).tolist() if len(boots) else (float("nan"), float("nan"))
    return {"mean": float(np.nanmean(a)), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "ci95": [lo, hi],
            "n": int(len(v)), "ci": "prompt-stratified bootstrap"}
