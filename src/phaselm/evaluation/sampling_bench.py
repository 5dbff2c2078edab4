"""``phaselm bench sampling``: does Phase-Slip beat standard sampling at matched diversity?

Every method generates ``rounds`` continuations of each prompt with the seed
``prompt_index·1000 + round`` (the published protocol's seeds; the same seeds for every method, so
comparisons are paired). Methods are points; a standard-sampling temperature sweep makes a curve of
diversity against perplexity, and the verdict compares perplexity at *matched diversity*: a
method's perplexity against the standard curve interpolated (in log perplexity) at the method's
diversity. Diversity is measured four ways (:data:`DIVERSITY_MEASURES`); the primary one, declared
before any powered run, is the mean next-token entropy of the distribution each token is drawn
from (:data:`PRIMARY_DIVERSITY`). Confidence intervals come from a bootstrap stratified by prompt
(resample prompts, then rounds within each drawn prompt; the same draws for every method), and
each comparison carries its minimum detectable effect (2.8 × bootstrap SE: 80% power at α = 0.05,
two-sided).

Results are written per method as each finishes (``OUT/parts/NAME.json``); ``resume=True`` skips
the methods whose part matches the configuration. Under ``torchrun`` (``torch.distributed``
initialised, gloo on CPU) the generation batches are dealt round-robin to the ranks, each with its
own model copy, and gathered; batches are formed the same way for any number of ranks, so the
numbers do not depend on the world size. Metric definitions: :mod:`phaselm.evaluation.text_metrics`,
:mod:`phaselm.evaluation.scoring` and ``docs/sampling_benchmark.md``.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from phaselm.evaluation import text_metrics as tm
from phaselm.evaluation.scoring import continuation_nll, last_token_features, perplexities, text_perplexities
from phaselm.sampling import PhaseSlipSampler, Sampler
from phaselm.utils import all_gather, atomic_write, batches_for_rank, dist_info, provenance

PUBLISHED_PROMPTS = [
    "The scientific method is a process that",
    "Once upon a time in a land where magic and science",
    "The meaning of the void is",
    "To fix the engine, you must first",
    "The system detected a failure in the",
]
PUBLISHED_ROUNDS, PUBLISHED_TOKENS = 40, 200
# published table (GPT-2 small): diversity (unique-word ratio), perplexity, tok/s
PUBLISHED_TABLE = {"greedy": (0.09, 1.29, 20.4), "standard_published": (0.37, 4.49, 18.6), "phase_slip": (0.32, 3.66, 6.8)}

PROMPT_FILE = Path(__file__).parent / "data" / "sampling_prompts.jsonl"
"""The powered run's 64 natural prompts (12 genres), fixed before any powered run."""

METRICS = ["unique_word_ratio", "distinct_1", "distinct_2", "distinct_3", "distinct_4", "self_bleu", "entropy",
           "repetition_rate", "perplexity", "judge_perplexity", "human_ppl_distance", "mauve", "tokens_per_second"]

DIVERSITY_MEASURES = {
    # name: (per generation or per prompt, description)
    "entropy": ("generation", "mean next-token entropy (nats) of the distribution each token is drawn from"),
    "distinct_2": ("prompt", "distinct-2 across the generations of one prompt"),
    "self_bleu": ("prompt", "self-BLEU across the generations of one prompt (lower = more diverse)"),
    "unique_word_ratio": ("generation", "unique-word ratio of prompt + continuation (the published measure)"),
}
PRIMARY_DIVERSITY = "entropy"
"""Declared before the powered run (docs/sampling_benchmark.md gives the reasons): it is defined at
every token, moves strongly with temperature, and is measured on the same generation as its
perplexity, so the bootstrap pairs the two."""

MDE_FACTOR = 2.8  # (z_{0.975} + z_{0.80}) = 1.96 + 0.84: 80% power at α = 0.05, two-sided


@dataclass(frozen=True)
class MethodSpec:
    """One sampling configuration. ``sampler``: greedy | standard | phase_slip. ``processor``: an
    optional logits processor (:data:`PROCESSORS`: dry | xtc | top_nsigma) run before the knobs."""

    sampler: str
    temperature: float = 0.65
    top_k: int | None = 40
    top_p: float | None = None
    min_p: float | None = None
    noise_scale: float = 0.03
    fusion: str = "gate"
    processor: str | None = None

    def describe(self) -> str:
        if self.sampler == "greedy":
            return "greedy"
        knobs = [f"T={self.temperature:g}"] + [f"{k}={v:g}" for k, v in
                                                (("top-k", self.top_k), ("top-p", self.top_p), ("min-p", self.min_p)) if v]
        if self.processor:
            knobs.append(PROCESSORS[self.processor][0])
        if self.sampler == "phase_slip":
            knobs += [f"noise={self.noise_scale:g} rad"] + (["contrast"] if self.fusion == "contrast" else [])
        return f"{self.sampler} ({', '.join(knobs)})"


def _processor(name: str, tokenizer, seed: int):
    from phaselm.sampling import logits_processors as lp

    if name == "dry":
        return lp.DRYLogitsProcessor(multiplier=0.8, base=1.75, allowed_length=2,
                                     sequence_breakers=lp.sequence_breaker_ids(tokenizer))
    if name == "xtc":
        return lp.XTCLogitsProcessor(threshold=0.1, probability=0.5, seed=seed)
    return lp.TopNSigmaLogitsProcessor(n=1.0)


PROCESSORS = {
    "dry": ("DRY 0.8/1.75/2", _processor),
    "xtc": ("XTC 0.1/0.5", _processor),
    "top_nsigma": ("top-nσ 1.0", _processor),
}

MAIN_METHODS = {
    "greedy": MethodSpec("greedy", temperature=1.0, top_k=None),
    "standard_published": MethodSpec("standard", temperature=0.8, top_k=40, top_p=0.92),
    "standard_matched": MethodSpec("standard", temperature=0.65, top_k=40),
    "min_p": MethodSpec("standard", temperature=1.0, top_k=None, min_p=0.1),
    "phase_slip": MethodSpec("phase_slip", temperature=0.65, top_k=40, noise_scale=0.03),
    "phase_slip_noise0": MethodSpec("phase_slip", temperature=0.65, top_k=40, noise_scale=0.0),
    # llama.cpp-style samplers (phaselm.sampling.logits_processors), llama.cpp's suggested settings
    "dry": MethodSpec("standard", temperature=0.65, top_k=40, processor="dry"),
    "xtc": MethodSpec("standard", temperature=0.65, top_k=40, processor="xtc"),
    "top_nsigma": MethodSpec("standard", temperature=1.0, top_k=None, processor="top_nsigma"),
}
DEFAULT_METHODS = list(MAIN_METHODS)
SWEEPS = ["standard_T", "phase_slip_T", "phase_slip_noise", "contrast_noise"]

# The powered protocol (docs/sampling_benchmark.md): the 64 prompts of PROMPT_FILE, the headline
# methods only. POWERED_BEST_NOISE was chosen on the pilot (the 5 published prompts, disjoint from
# PROMPT_FILE) by the rule declared before it ran: the gate-fusion noise scale at T 0.65 with the
# lowest matched-entropy perplexity difference; results/sampling-pilot holds that run.
POWERED_BEST_NOISE = 1.0
# The curve brackets the pilot's headline entropies (standard T 0.65: 1.03 nats, Phase-Slip 1 rad: 1.06,
# 0.03 rad: = T 0.65); rounds sized on the pilot's bootstrap SE (docs/sampling_benchmark.md).
POWERED = dict(rounds=4, max_new_tokens=64, methods=["standard_matched", "phase_slip"], sweeps=["standard_T", "phase_slip_noise"],
               temperatures=[0.6, 0.65, 0.7, 0.75], noise_scales=[POWERED_BEST_NOISE], human_passages=0,
               headline=[f"phase_slip_noise{POWERED_BEST_NOISE:g}", "phase_slip"])


def load_prompts(path) -> list[str]:
    """Prompts from a text file (one per line) or a ``.jsonl`` file (a ``"prompt"`` field per line)."""
    path = Path(path)
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as err:
        raise ValueError(f"--prompts: cannot read {path}: {err.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"--prompts: {path} is not UTF-8 text; write one prompt per line") from None
    if path.suffix == ".jsonl":
        prompts = []
        for k, line in enumerate(lines, 1):
            try:
                prompts.append(str(json.loads(line)["prompt"]).strip())
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"--prompts: {path} line {k} is not a JSON object with a \"prompt\" field") from None
    else:
        prompts = [line.strip() for line in lines]
    if not prompts:
        raise ValueError(f"--prompts: {path} has no prompts; write one prompt per line")
    return prompts


@dataclass
class BenchConfig:
    prompts: list[str] = field(default_factory=lambda: list(PUBLISHED_PROMPTS))
    rounds: int = 8
    max_new_tokens: int = 64
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    metrics: list[str] = field(default_factory=lambda: list(METRICS))
    sweep: bool = True
    sweeps: list[str] = field(default_factory=lambda: list(SWEEPS))
    temperatures: list[float] = field(default_factory=lambda: [0.5, 0.65, 0.8, 1.0, 1.2])
    noise_scales: list[float] = field(default_factory=lambda: [0.0, 0.03, 0.3, 1.0, 2.0])
    sweep_noise: float = 1.0
    human_passages: int = 20  # per source (Shakespeare test split, Paradise Lost); 0 disables
    human_prompt_tokens: int = 32
    batch_size: int = 8
    protocol: str = "phaselm"
    headline: list[str] = field(default_factory=lambda: ["phase_slip"])
    primary_diversity: str = PRIMARY_DIVERSITY
    n_boot: int = 2000

    def validate(self):
        unknown = [m for m in self.methods if m not in MAIN_METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {list(MAIN_METHODS)}")
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; choose from {METRICS}")
        unknown = [s for s in self.sweeps if s not in SWEEPS]
        if unknown:
            raise ValueError(f"unknown sweep(s) {unknown}; choose from {SWEEPS}")
        if not self.prompts or not all(p.strip() for p in self.prompts):
            raise ValueError("the prompt set is empty (or has an empty prompt); give at least one non-empty prompt")
        if not (isinstance(self.rounds, int) and self.rounds >= 1):
            raise ValueError(f"rounds must be an integer >= 1, got {self.rounds}")
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1 or self.human_passages < 0:
            raise ValueError("batch_size must be >= 1 and human_passages >= 0")
        if self.primary_diversity not in DIVERSITY_MEASURES:
            raise ValueError(f"primary_diversity must be one of {list(DIVERSITY_MEASURES)}, got {self.primary_diversity!r}")
        if any(not (0 < t < math.inf) for t in self.temperatures):
            raise ValueError(f"sweep temperatures must be finite and > 0, got {self.temperatures}")
        if any(not (0 <= n <= math.pi) for n in self.noise_scales):
            raise ValueError(f"sweep noise scales must be in [0, π] radians, got {self.noise_scales}")


def sweep_methods(cfg: BenchConfig) -> tuple[dict[str, MethodSpec], dict[str, list[str]]]:
    """The sweep points and the curves they form (curve label -> point names, in sweep order)."""
    points, curves = {}, {}
    if "standard_T" in cfg.sweeps:
        curves[STANDARD_CURVE] = []
        for t in cfg.temperatures:
            points[f"standard_T{t:g}"] = MethodSpec("standard", temperature=t, top_k=40)
            curves[STANDARD_CURVE].append(f"standard_T{t:g}")
    if "phase_slip_T" in cfg.sweeps:
        label = f"phase-slip (T sweep, noise {cfg.sweep_noise:g} rad)"
        curves[label] = []
        for t in cfg.temperatures:
            points[f"phase_slip_T{t:g}"] = MethodSpec("phase_slip", temperature=t, top_k=40, noise_scale=cfg.sweep_noise)
            curves[label].append(f"phase_slip_T{t:g}")
    for kind, label, fusion in (("phase_slip_noise", "phase-slip (noise sweep, T 0.65)", "gate"),
                                ("contrast_noise", "contrast (noise sweep, T 0.65)", "contrast")):
        if kind not in cfg.sweeps:
            continue
        curves[label] = []
        for n in cfg.noise_scales:
            if fusion == "contrast" and n == 0:
                continue
            name = f"{'phase_slip' if fusion == 'gate' else 'contrast'}_noise{n:g}"
            points[name] = MethodSpec("phase_slip", temperature=0.65, top_k=40, noise_scale=n, fusion=fusion)
            curves[label].append(name)
    return points, curves


STANDARD_CURVE = "standard (T sweep, top-k 40)"


def human_reference_set(tokenizer, per_source: int, prompt_tokens: int, continuation_tokens: int) -> list[dict]:
    """Passages from the held-out (test) split of the Shakespeare plays and from *Paradise Lost*,
    at evenly spaced line starts: the first ``prompt_tokens`` tokens are the prompt, the next
    ``continuation_tokens`` the human continuation (cut by the tokenizer's character offsets)."""
    from phaselm.data.corpora import paradise_lost, shakespeare

    items = []
    for source, text in (("shakespeare-test", shakespeare("test")), ("paradise-lost", paradise_lost())):
        need_chars = (prompt_tokens + continuation_tokens) * 8
        span = max(1, len(text) - need_chars)
        for k in range(per_source):
            start = text.find("\n", int(span * (k + 0.5) / per_source)) + 1
            chunk = text[start: start + need_chars]
            enc = tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True)
            offsets = enc["offset_mapping"]
            if len(offsets) < prompt_tokens + continuation_tokens:
                continue
            cut = offsets[prompt_tokens - 1][1]
            end = offsets[prompt_tokens + continuation_tokens - 1][1]
            items.append({"source": source, "prompt": chunk[:cut], "human": chunk[cut:end]})
    return items


# ---------------------------------------------------------------------- torch.distributed
# ---------------------------------------------------------------------- statistics
def stratified_indices(n_prompts: int, rounds: int, n_boot: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap draws stratified by prompt: ``prompts [B, P]`` (prompts drawn with replacement) and
    ``rounds [B, P, R]`` (rounds drawn with replacement within each drawn prompt). Every method is
    resampled with the same draws, so comparisons stay paired."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_prompts, (n_boot, n_prompts)), rng.integers(0, rounds, (n_boot, n_prompts, rounds))


def _interp_log(x: float, xs, ys) -> float:
    """exp of log(ys) interpolated linearly at x over the points sorted by xs; NaN outside."""
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    order = np.argsort(xs)
    xs, ys = xs[order], np.log(ys[order])
    if not (xs[0] <= x <= xs[-1]) or not np.all(np.isfinite(ys)):
        return float("nan")
    return float(np.exp(np.interp(x, xs, ys)))


def _interval(point: float, boots: np.ndarray, n_boot: int) -> dict:
    boots = boots[np.isfinite(boots)]
    ok = len(boots) >= 0.9 * n_boot
    se = float(boots.std(ddof=1)) if ok else None
    lo, hi = (np.quantile(boots, [0.025, 0.975]).tolist() if ok else [None, None])
    return {"difference": point, "ci95": [lo, hi], "se": se, "mde": None if se is None else MDE_FACTOR * se,
            "bootstrap_in_range": int(len(boots)),
            "significant": None if lo is None else bool(lo > 0 or hi < 0)}


class MethodArrays:
    """One method's numbers shaped ``[P, R]`` (per generation) and ``[P]`` (per prompt)."""

    def __init__(self, gens: list[dict], n_prompts: int, rounds: int):
        def grid(key):
            a = np.full((n_prompts, rounds), np.nan)
            for g in gens:
                a[g["prompt_index"], g["round"]] = g.get(key, np.nan)
            return a

        self.gen = {k: grid(k) for k in ("perplexity", "entropy", "unique_word_ratio")}
        texts = [[None] * rounds for _ in range(n_prompts)]
        for g in gens:
            texts[g["prompt_index"]][g["round"]] = g["text"]
        self.prompt = {"distinct_2": np.array([tm.distinct_n(t, 2) for t in texts]),
                       "self_bleu": np.array([tm.self_bleu(t) if rounds > 1 else np.nan for t in texts])}

    def mean(self, key: str) -> float:
        a = self.gen.get(key, self.prompt.get(key))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # self-BLEU with one round: all NaN
            return float(np.nanmean(a))

    def boot_means(self, key: str, prompts: np.ndarray, rounds: np.ndarray) -> np.ndarray:
        """``[B]``: the key's mean over each bootstrap draw (two-stage for per-generation values; the
        drawn prompts' values for per-prompt ones, which are statistics of the whole set of rounds)."""
        if key in self.gen:
            a = self.gen[key]
            return np.nanmean(a[prompts[..., None], rounds], axis=(1, 2))
        return np.nanmean(self.prompt[key][prompts], axis=1)


def compare(arrays: dict[str, MethodArrays], curve: list[str], candidates: list[str], same_t: dict[str, str],
            measures: list[str], n_boot: int, seed: int = 0) -> list[dict]:
    """Matched-diversity and same-temperature comparisons with stratified-bootstrap CIs and MDEs.

    For each candidate and diversity measure X: d = PPL / PPL_std(X) − 1, with PPL_std(X) the
    standard curve's mean perplexity interpolated (log-linear) at the candidate's mean X; and, when
    the candidate has a standard point at the same temperature (``same_t``), PPL / PPL_std(T) − 1.
    The bootstrap recomputes every mean (curve included) on each draw of :func:`stratified_indices`.
    """
    any_arr = next(iter(arrays.values()))
    n_prompts, rounds = any_arr.gen["perplexity"].shape
    prompts, rounds_idx = stratified_indices(n_prompts, rounds, n_boot, seed)
    cache: dict = {}

    def boots(name, key):
        if (name, key) not in cache:
            cache[name, key] = arrays[name].boot_means(key, prompts, rounds_idx)
        return cache[name, key]

    rows = []
    for cand in candidates:
        a = arrays[cand]
        ppl = a.mean("perplexity")
        row = {"method": cand, "perplexity": ppl, "matched": {}, "same_temperature": None}
        for key in measures:
            x = a.mean(key)
            if not np.isfinite(x) or len(curve) < 2:
                continue
            ref = _interp_log(x, [arrays[n].mean(key) for n in curve], [arrays[n].mean("perplexity") for n in curve])
            point = ppl / ref - 1 if np.isfinite(ref) else None
            entry = {"diversity": x, "standard_perplexity_at_same_diversity": ref if np.isfinite(ref) else None}
            if point is None:
                entry.update(difference=None, ci95=[None, None], se=None, mde=None, significant=None,
                             bootstrap_in_range=0, outside_curve=True)
            else:
                xs = np.stack([boots(n, key) for n in curve], 1)
                ys = np.stack([boots(n, "perplexity") for n in curve], 1)
                bx, bp = boots(cand, key), boots(cand, "perplexity")
                b = np.array([bp[i] / _interp_log(bx[i], xs[i], ys[i]) - 1 for i in range(n_boot)])
                entry.update(_interval(point, b, n_boot), outside_curve=False)
            row["matched"][key] = entry
        if cand in same_t:
            ref_name = same_t[cand]
            ref = arrays[ref_name].mean("perplexity")
            b = boots(cand, "perplexity") / boots(ref_name, "perplexity") - 1
            row["same_temperature"] = dict(reference=ref_name, reference_perplexity=ref, **_interval(ppl / ref - 1, b, n_boot))
            row["same_temperature"]["diversity_differences"] = {
                key: arrays[cand].mean(key) - arrays[ref_name].mean(key) for key in measures}
        rows.append(row)
    return rows


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class SamplingBench:
    """Runs the benchmark; see the module doc. ``judge``: optional ``(model, tokenizer)``."""

    def __init__(self, model, tokenizer, cfg: BenchConfig, judge=None, model_name: str = "embedded SmolLM2-135M",
                 judge_name: str | None = None, progress: bool = True):
        cfg.validate()
        self.model, self.tokenizer, self.cfg, self.judge = model, tokenizer, cfg, judge
        self.model_name, self.judge_name = model_name, judge_name
        self.rank, self.world = dist_info()
        self.progress = progress and self.rank == 0
        self.points = {m: MAIN_METHODS[m] for m in cfg.methods}
        self.curves: dict[str, list[str]] = {}
        if cfg.sweep:
            sweep_points, self.curves = sweep_methods(cfg)
            self.points.update(sweep_points)
        self.heads = None
        self._runs: dict[MethodSpec, dict] = {}

    # ------------------------------------------------------------------ generation
    def _sampler(self, spec: MethodSpec):
        if spec.sampler == "phase_slip":
            sampler = PhaseSlipSampler(self.model, self.tokenizer, noise_scale=spec.noise_scale, fusion=spec.fusion,
                                       heads=self.heads)
        else:
            sampler = Sampler(self.model, self.tokenizer)
        sampler.record_sampling_entropy = True
        return sampler

    def _generate(self, spec: MethodSpec, prompts: list[str], rounds: int, seed_base: int, bar) -> dict:
        """Generate and score; this rank runs its batches (:func:`batches_for_rank`), the results of
        every rank are gathered and returned on every rank, in (prompt, round) order."""
        sampler = self._sampler(spec)
        kw = dict(max_new_tokens=self.cfg.max_new_tokens, return_details=True)
        if spec.sampler != "greedy":
            kw.update(temperature=spec.temperature, top_k=spec.top_k, top_p=spec.top_p, min_p=spec.min_p)
        # greedy is deterministic: one generation per prompt, copied to every round
        n_rounds = 1 if spec.sampler == "greedy" else rounds
        jobs = [(i, r) for i in range(len(prompts)) for r in range(n_rounds)]
        gens, seconds, tokens = [], 0.0, 0
        # batches may mix prompts: each row has its own seed; batches are cut the same way for any
        # world size, so a generation never depends on the number of ranks
        for cut in batches_for_rank(len(jobs), self.cfg.batch_size):
            batch = [jobs[k] for k in cut]
            seeds = [seed_base + i * 1000 + r for i, r in batch]
            sampler.logits_processor = ([PROCESSORS[spec.processor][1](spec.processor, self.tokenizer, seeds[0])]
                                        if spec.processor else [])
            out = sampler.generate([prompts[i] for i, _ in batch], seed=seeds, do_sample=spec.sampler != "greedy", **kw)
            seconds += out.seconds
            tokens += out.new_tokens
            ent = out.diagnostics.get("sampling_entropy")
            new = []
            for b, ((i, r), ids, text) in enumerate(zip(batch, out.token_ids, out.texts)):
                h = float(ent[b, : len(ids)].mean()) if ent is not None and ids else 0.0
                new.append({"prompt_index": i, "round": r, "token_ids": ids, "text": text, "entropy": h})
            self._score(new, prompts)
            gens += new
            if bar is not None:
                bar.update(len(batch) * (rounds if spec.sampler == "greedy" else 1))
        own = len(gens)
        parts = all_gather({"gens": gens, "seconds": seconds, "tokens": tokens})
        gens = sorted((g for p in parts for g in p["gens"]), key=lambda g: (g["prompt_index"], g["round"]))
        if bar is not None:  # the other ranks' generations
            bar.update((len(gens) - own) * (rounds if spec.sampler == "greedy" else 1))
        if spec.sampler == "greedy":
            gens = [dict(g, round=r) for g in gens for r in range(rounds)]
        return {"generations": gens, "seconds": sum(p["seconds"] for p in parts),
                "new_tokens": sum(p["tokens"] for p in parts)}

    # ------------------------------------------------------------------ metrics
    def _score(self, gens: list[dict], prompts: list[str]) -> None:
        p_ids = [self.tokenizer(prompts[g["prompt_index"]])["input_ids"] for g in gens]
        nll = continuation_nll(self.model, p_ids, [g["token_ids"] for g in gens], self.tokenizer.pad_token_id,
                               self.cfg.batch_size)
        for g, ppl in zip(gens, perplexities(nll)):
            g["perplexity"] = ppl
            g["unique_word_ratio"] = tm.unique_word_ratio(prompts[g["prompt_index"]] + g["text"])
            g["repetition_rate"] = tm.repetition_rate(g["text"])
        if self.judge is not None and "judge_perplexity" in self.cfg.metrics:
            jm, jt = self.judge
            judged = text_perplexities(jm, jt, [prompts[g["prompt_index"]] for g in gens], [g["text"] for g in gens],
                                       self.cfg.batch_size)
            for g, ppl in zip(gens, judged):
                g["judge_perplexity"] = ppl

    def _summary(self, run: dict, n_prompts: int) -> dict:
        """Means with 95% CIs from the prompt-stratified bootstrap (per-prompt measures: prompts)."""
        gens, want, rounds = run["generations"], set(self.cfg.metrics), self.cfg.rounds
        out: dict = {}
        prompts, rounds_idx = stratified_indices(n_prompts, rounds, self.cfg.n_boot, seed=1)
        for key in ("unique_word_ratio", "perplexity", "entropy", "repetition_rate", "judge_perplexity"):
            if key in want and key in gens[0]:
                a = np.full((n_prompts, rounds), np.nan)
                for g in gens:
                    a[g["prompt_index"], g["round"]] = g[key]
                out[key] = tm.stratified_summary(a, prompts, rounds_idx)
        by_prompt = [[g["text"] for g in gens if g["prompt_index"] == i] for i in range(n_prompts)]
        for n in range(1, 5):
            if f"distinct_{n}" in want:
                out[f"distinct_{n}"] = tm.summarize([tm.distinct_n(texts, n) for texts in by_prompt])
        if "self_bleu" in want:
            out["self_bleu"] = tm.summarize([tm.self_bleu(texts) for texts in by_prompt])
        if "tokens_per_second" in want:
            out["tokens_per_second"] = run["new_tokens"] / run["seconds"] if run["seconds"] else None
        return out

    # ------------------------------------------------------------------ verdict
    def comparisons(self) -> list[dict]:
        """Every sampled method off the standard curve against it (:func:`compare`)."""
        curve = self.curves.get(STANDARD_CURVE, [])
        if "perplexity" not in self.cfg.metrics:
            return []
        names = list(dict.fromkeys({self.points[n]: n for n in reversed(list(self.points))}.values()))[::-1]
        arrays = {n: MethodArrays(self._runs[self.points[n]]["generations"], len(self.cfg.prompts), self.cfg.rounds)
                  for n in names}
        on_curve = {self.points[n] for n in curve}
        candidates = [n for n in names if self.points[n].sampler != "greedy" and self.points[n] not in on_curve
                      and not (self.points[n].sampler == "phase_slip" and self.points[n].noise_scale == 0)]
        same_t = {}
        for n in candidates:
            s = self.points[n]
            for c in curve:
                t = self.points[c]
                if (t.temperature, t.top_k, t.top_p, t.min_p) == (s.temperature, s.top_k, s.top_p, s.min_p):
                    same_t[n] = c
        curve_arrays = {n: arrays.get(n) or MethodArrays(self._runs[self.points[n]]["generations"],
                                                         len(self.cfg.prompts), self.cfg.rounds) for n in curve}
        measures = [m for m in DIVERSITY_MEASURES if m == "entropy" or m in self.cfg.metrics]
        rows = compare({**arrays, **curve_arrays}, curve, candidates, same_t, measures, self.cfg.n_boot)
        for r in rows:
            r["describe"] = self.points[r["method"]].describe()
            r["headline"] = r["method"] in self.cfg.headline
        return rows

    # ------------------------------------------------------------------ human reference
    def _human(self, bar) -> dict:
        cfg = self.cfg
        items = human_reference_set(self.tokenizer, cfg.human_passages, cfg.human_prompt_tokens, cfg.max_new_tokens)
        prompts = [it["prompt"] for it in items]
        human_ppl = text_perplexities(self.model, self.tokenizer, prompts, [it["human"] for it in items], cfg.batch_size)
        out = {"passages": len(items), "sources": sorted({it["source"] for it in items}),
               "human_perplexity": tm.summarize(human_ppl), "methods": {}}
        human_feats = None
        if "mauve" in cfg.metrics:
            human_feats = last_token_features(self.model, self.tokenizer, [it["human"] for it in items], cfg.batch_size)
        for name in cfg.methods:
            spec = self.points[name]
            run = self._generate(spec, prompts, 1, 10**6, bar)
            ppl = [g["perplexity"] for g in run["generations"]]
            entry = {"perplexity": tm.summarize(ppl)}
            ratio = np.nanmean(ppl) / np.nanmean(human_ppl)
            entry["ppl_ratio_to_human"] = float(ratio)
            if "human_ppl_distance" in cfg.metrics:
                entry["human_ppl_distance"] = float(abs(math.log(ratio)))
            if human_feats is not None:
                entry["mauve"] = self._mauve(human_feats, [g["text"] for g in run["generations"]])
            out["methods"][name] = entry
        return out

    def _mauve(self, human_feats: torch.Tensor, texts: list[str]) -> float | None:
        try:
            import mauve
        except ImportError:
            return None
        feats = last_token_features(self.model, self.tokenizer, texts, self.cfg.batch_size)
        result = mauve.compute_mauve(p_features=human_feats.numpy(), q_features=feats.numpy(), verbose=False, seed=25,
                                     num_buckets=max(2, min(len(texts), len(human_feats)) // 10))
        return float(result.mauve)

    # ------------------------------------------------------------------ parts (per-method results)
    def _part_key(self, spec: MethodSpec | str) -> dict:
        cfg = self.cfg
        return {"spec": asdict(spec) if isinstance(spec, MethodSpec) else spec, "model": self.model_name,
                "prompts": cfg.prompts, "rounds": cfg.rounds, "max_new_tokens": cfg.max_new_tokens,
                "batch_size": cfg.batch_size, "metrics": cfg.metrics, "judge": self.judge_name,
                "heads": [list(h) for h in self.heads] if self.heads is not None else None,
                "human": [cfg.human_passages, cfg.human_prompt_tokens, cfg.methods] if spec == "human" else None}

    @staticmethod
    def _part_path(out_dir: Path, name: str) -> Path:
        return out_dir / "parts" / f"{name}.json"

    def _load_part(self, out_dir: Path | None, name: str, key: dict):
        if out_dir is None:
            return None
        path = self._part_path(out_dir, name)
        if not path.exists():
            return None
        try:
            part = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None  # a part cut short is redone
        if part.get("fingerprint") != fingerprint(key):
            raise ValueError(f"--resume: {path} was made with a different configuration (model, prompts, rounds, "
                             f"tokens, batch size, heads or method); rerun without --resume into a new --out")
        return part["data"]

    def _save_part(self, out_dir: Path | None, name: str, key: dict, data) -> None:
        if out_dir is None or self.rank != 0:
            return
        path = self._part_path(out_dir, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps({"fingerprint": fingerprint(key), "key": key, "data": data}, default=float))

    # ------------------------------------------------------------------ main
    def run(self, out_dir: str | Path | None = None, resume: bool = False) -> dict:
        """Run every method (writing ``out_dir/parts/NAME.json`` as each finishes) and return the
        results dict; ``resume``: load the parts already there instead of re-running them."""
        cfg = self.cfg
        out_dir = None if out_dir is None else Path(out_dir)
        if out_dir is not None and not resume and self.rank == 0 and (out_dir / "parts").is_dir() \
                and any((out_dir / "parts").glob("*.json")):
            raise ValueError(f"{out_dir / 'parts'} holds results of an earlier run; pass --resume to continue it, "
                             f"or choose another --out")
        all_gather(None)  # every rank waits for rank 0's check
        t0 = time.perf_counter()
        prov = provenance()  # the code that runs, recorded before it runs
        calib = PhaseSlipSampler(self.model, self.tokenizer)
        cal = calib.calibrate_heads(search_layers=min(6, self.model.config.num_hidden_layers))
        self.heads = cal.selected
        unique = {}
        # run order: the headline and its references first, so that a run cut short still has them
        first = ["standard_matched", *cfg.headline[:1], *self.curves.get(STANDARD_CURVE, []), *cfg.headline[1:]]
        for name in [n for n in first if n in self.points] + list(self.points):
            unique.setdefault(self.points[name], name)
        human_methods = cfg.methods if cfg.human_passages > 0 else []
        total = len(unique) * len(cfg.prompts) * cfg.rounds + len(human_methods) * 2 * cfg.human_passages
        resumed, timings = [], {}
        # parts read (and a mismatched one refused) before anything runs
        done = {spec: self._load_part(out_dir, name, self._part_key(spec)) if resume else None
                for spec, name in unique.items()}
        with tqdm(total=total, desc="bench sampling", unit="gen", disable=not self.progress) as bar:
            for spec, name in unique.items():
                key = self._part_key(spec)
                part = done[spec]
                if part is not None:
                    resumed.append(name)
                    bar.update(len(cfg.prompts) * cfg.rounds)
                else:
                    bar.set_postfix_str(spec.describe())
                    t1 = time.perf_counter()
                    part = self._generate(spec, cfg.prompts, cfg.rounds, 0, bar)
                    part["wall_seconds"] = time.perf_counter() - t1
                    self._save_part(out_dir, name, key, part)
                self._runs[spec] = part
                timings[name] = part.get("wall_seconds")
            human = None
            if human_methods:
                key = self._part_key("human")
                human = self._load_part(out_dir, "_human", key) if resume else None
                if human is None:
                    human = self._human(bar)
                    self._save_part(out_dir, "_human", key, human)
                else:
                    resumed.append("_human")
        results = {name: dict(describe=spec.describe(), **self._summary(self._runs[spec], len(cfg.prompts)))
                   for name, spec in self.points.items()}
        sanity = None
        if "phase_slip_noise0" in self.points and "standard_matched" in self.points:
            a = [g["token_ids"] for g in self._runs[self.points["phase_slip_noise0"]]["generations"]]
            b = [g["token_ids"] for g in self._runs[self.points["standard_matched"]]["generations"]]
            sanity = {"noise0_equals_standard_matched": a == b, "generations_compared": len(a)}
        changed = None
        if "phase_slip" in self.points and "standard_matched" in self.points:
            a = [g["token_ids"] for g in self._runs[self.points["phase_slip"]]["generations"]]
            b = [g["token_ids"] for g in self._runs[self.points["standard_matched"]]["generations"]]
            changed = {"generations_differing": sum(x != y for x, y in zip(a, b)), "generations_compared": len(a)}
        tps = {n: r.get("tokens_per_second") for n, r in results.items()}
        speed = {"phase_slip_over_standard_matched": (tps["phase_slip"] / tps["standard_matched"])
                 if tps.get("phase_slip") and tps.get("standard_matched") else None,
                 "batch_size": cfg.batch_size}
        return {
            "config": asdict(cfg),
            "model": self.model_name, "judge": self.judge_name,
            "heads": [list(h) for h in self.heads], "calibration": cal.rows,
            "methods": {n: asdict(s) for n, s in self.points.items()},
            "curves": self.curves,
            "results": results,
            "diversity_measures": {k: v[1] for k, v in DIVERSITY_MEASURES.items()},
            "primary_diversity": cfg.primary_diversity, "mde_factor": MDE_FACTOR,
            "comparisons": self.comparisons(),
            "human_reference": human,
            "sanity": sanity, "default_changed_tokens": changed, "speed": speed,
            "published_table": PUBLISHED_TABLE,
            "generations": {n: [{k: v for k, v in g.items() if k != "token_ids"} for g in self._runs[s]["generations"][: 2]]
                            for n, s in self.points.items()},
            "method_wall_seconds": timings, "resumed": resumed, "world_size": self.world,
            "provenance": prov, "wall_seconds": time.perf_counter() - t0,
        }
