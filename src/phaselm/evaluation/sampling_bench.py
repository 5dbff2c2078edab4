"""``phaselm bench sampling``: does Phase-Slip beat standard sampling at matched diversity?

Every method generates ``rounds`` continuations of each prompt with the seed
``prompt_index·1000 + round`` (the published protocol's seeds; the same seeds for every method, so
comparisons are paired). Methods are points; temperature and noise sweeps make curves of
diversity against perplexity, and the verdict compares perplexity at *matched diversity*:
Phase-Slip's perplexity against the standard-sampling curve interpolated (in log perplexity) at
Phase-Slip's diversity, with a bootstrap 95% CI over generations. Metric definitions:
:mod:`phaselm.evaluation.text_metrics`, :mod:`phaselm.evaluation.scoring` and
``docs/sampling_benchmark.md``.
"""

from __future__ import annotations

import json
import math
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from phaselm.evaluation import text_metrics as tm
from phaselm.evaluation.scoring import continuation_nll, last_token_features, perplexities, text_perplexities
from phaselm.sampling import PhaseSlipSampler, Sampler

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

METRICS = ["unique_word_ratio", "distinct_1", "distinct_2", "distinct_3", "distinct_4", "self_bleu",
           "repetition_rate", "perplexity", "judge_perplexity", "human_ppl_distance", "mauve", "tokens_per_second"]


@dataclass(frozen=True)
class MethodSpec:
    """One sampling configuration. ``sampler``: greedy | standard | phase_slip."""

    sampler: str
    temperature: float = 0.65
    top_k: int | None = 40
    top_p: float | None = None
    min_p: float | None = None
    noise_scale: float = 0.03
    fusion: str = "gate"

    def describe(self) -> str:
        if self.sampler == "greedy":
            return "greedy"
        knobs = [f"T={self.temperature:g}"] + [f"{k}={v:g}" for k, v in
                                                (("top-k", self.top_k), ("top-p", self.top_p), ("min-p", self.min_p)) if v]
        if self.sampler == "phase_slip":
            knobs += [f"noise={self.noise_scale:g} rad"] + (["contrast"] if self.fusion == "contrast" else [])
        return f"{self.sampler} ({', '.join(knobs)})"


MAIN_METHODS = {
    "greedy": MethodSpec("greedy", temperature=1.0, top_k=None),
    "standard_published": MethodSpec("standard", temperature=0.8, top_k=40, top_p=0.92),
    "standard_matched": MethodSpec("standard", temperature=0.65, top_k=40),
    "min_p": MethodSpec("standard", temperature=1.0, top_k=None, min_p=0.1),
    "phase_slip": MethodSpec("phase_slip", temperature=0.65, top_k=40, noise_scale=0.03),
    "phase_slip_noise0": MethodSpec("phase_slip", temperature=0.65, top_k=40, noise_scale=0.0),
}


@dataclass
class BenchConfig:
    prompts: list[str] = field(default_factory=lambda: list(PUBLISHED_PROMPTS))
    rounds: int = 8
    max_new_tokens: int = 64
    methods: list[str] = field(default_factory=lambda: list(MAIN_METHODS))
    metrics: list[str] = field(default_factory=lambda: list(METRICS))
    sweep: bool = True
    temperatures: list[float] = field(default_factory=lambda: [0.5, 0.65, 0.8, 1.0, 1.2])
    noise_scales: list[float] = field(default_factory=lambda: [0.0, 0.03, 0.3, 1.0, 2.0])
    sweep_noise: float = 1.0
    human_passages: int = 20  # per source (Shakespeare test split, Paradise Lost); 0 disables
    human_prompt_tokens: int = 32
    batch_size: int = 8
    protocol: str = "phaselm"

    def validate(self):
        unknown = [m for m in self.methods if m not in MAIN_METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {list(MAIN_METHODS)}")
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; choose from {METRICS}")
        if not self.prompts or not all(p.strip() for p in self.prompts):
            raise ValueError("the prompt set is empty (or has an empty prompt); give at least one non-empty prompt")
        if not (isinstance(self.rounds, int) and self.rounds >= 1):
            raise ValueError(f"rounds must be an integer >= 1, got {self.rounds}")
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1 or self.human_passages < 0:
            raise ValueError("batch_size must be >= 1 and human_passages >= 0")


def sweep_methods(cfg: BenchConfig) -> tuple[dict[str, MethodSpec], dict[str, list[str]]]:
    """The sweep points and the curves they form (curve label -> point names, in sweep order)."""
    points, curves = {}, {}
    curves["standard (T sweep, top-k 40)"] = []
    for t in cfg.temperatures:
        points[f"standard_T{t:g}"] = MethodSpec("standard", temperature=t, top_k=40)
        curves["standard (T sweep, top-k 40)"].append(f"standard_T{t:g}")
    label = f"phase-slip (T sweep, noise {cfg.sweep_noise:g} rad)"
    curves[label] = []
    for t in cfg.temperatures:
        points[f"phase_slip_T{t:g}"] = MethodSpec("phase_slip", temperature=t, top_k=40, noise_scale=cfg.sweep_noise)
        curves[label].append(f"phase_slip_T{t:g}")
    curves["phase-slip (noise sweep, T 0.65)"] = []
    curves["contrast (noise sweep, T 0.65)"] = []
    for n in cfg.noise_scales:
        points[f"phase_slip_noise{n:g}"] = MethodSpec("phase_slip", temperature=0.65, top_k=40, noise_scale=n)
        curves["phase-slip (noise sweep, T 0.65)"].append(f"phase_slip_noise{n:g}")
        if n > 0:
            points[f"contrast_noise{n:g}"] = MethodSpec("phase_slip", temperature=0.65, top_k=40, noise_scale=n,
                                                        fusion="contrast")
            curves["contrast (noise sweep, T 0.65)"].append(f"contrast_noise{n:g}")
    return points, curves


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


class SamplingBench:
    """Runs the benchmark; see the module doc. ``judge``: optional ``(model, tokenizer)``."""

    def __init__(self, model, tokenizer, cfg: BenchConfig, judge=None, model_name: str = "embedded SmolLM2-135M",
                 judge_name: str | None = None, progress: bool = True):
        cfg.validate()
        self.model, self.tokenizer, self.cfg, self.judge = model, tokenizer, cfg, judge
        self.model_name, self.judge_name, self.progress = model_name, judge_name, progress
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
            return PhaseSlipSampler(self.model, self.tokenizer, noise_scale=spec.noise_scale, fusion=spec.fusion,
                                    heads=self.heads)
        return Sampler(self.model, self.tokenizer)

    def _generate(self, spec: MethodSpec, prompts: list[str], rounds: int, seed_base: int, bar) -> dict:
        sampler = self._sampler(spec)
        kw = dict(max_new_tokens=self.cfg.max_new_tokens, return_details=True)
        if spec.sampler != "greedy":
            kw.update(temperature=spec.temperature, top_k=spec.top_k, top_p=spec.top_p, min_p=spec.min_p)
        # greedy is deterministic: one generation per prompt, copied to every round
        n_rounds = 1 if spec.sampler == "greedy" else rounds
        jobs = [(i, r) for i in range(len(prompts)) for r in range(n_rounds)]
        gens, seconds, tokens = [], 0.0, 0
        # batches may mix prompts: each row has its own seed, so a generation does not depend on its batch
        for start in range(0, len(jobs), self.cfg.batch_size):
            batch = jobs[start: start + self.cfg.batch_size]
            out = sampler.generate([prompts[i] for i, _ in batch], seed=[seed_base + i * 1000 + r for i, r in batch],
                                   do_sample=spec.sampler != "greedy", **kw)
            seconds += out.seconds
            tokens += out.new_tokens
            for (i, r), ids, text in zip(batch, out.token_ids, out.texts):
                gens.append({"prompt_index": i, "round": r, "token_ids": ids, "text": text})
            bar.update(len(batch) * (rounds if spec.sampler == "greedy" else 1))
        if spec.sampler == "greedy":
            gens = [dict(g, round=r) for g in gens for r in range(rounds)]
        return {"generations": gens, "seconds": seconds, "new_tokens": tokens}

    # ------------------------------------------------------------------ metrics
    def _score(self, run: dict, prompts: list[str]) -> None:
        gens = run["generations"]
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
        gens, want = run["generations"], set(self.cfg.metrics)
        out: dict = {}
        for key in ("unique_word_ratio", "perplexity", "repetition_rate", "judge_perplexity"):
            if key in want and key in gens[0]:
                out[key] = tm.summarize([g[key] for g in gens])
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
    def _matched_diversity(self, results: dict) -> list[dict]:
        """Phase-Slip perplexity vs the standard T-sweep curve at the same unique-word ratio."""
        std_names = self.curves.get("standard (T sweep, top-k 40)", [])
        if len(std_names) < 2 or "perplexity" not in self.cfg.metrics or "unique_word_ratio" not in self.cfg.metrics:
            return []
        rng = np.random.default_rng(0)

        def arrays(name):
            gens = self._runs[self.points[name]]["generations"]
            return np.array([g["unique_word_ratio"] for g in gens]), np.array([g["perplexity"] for g in gens])

        std = [arrays(n) for n in std_names]

        def interp(d, std_means):
            xs = np.array([m[0] for m in std_means])
            order = np.argsort(xs)
            xs, ys = xs[order], np.log(np.array([m[1] for m in std_means]))[order]
            if not (xs[0] <= d <= xs[-1]):
                return float("nan")
            return float(np.exp(np.interp(d, xs, ys)))

        rows = []
        candidates = list({self.points[n]: n for n in reversed(list(self.points))
                           if self.points[n].sampler == "phase_slip" and self.points[n].noise_scale > 0}.values())[::-1]
        for name in candidates:
            d, p = arrays(name)
            ref = interp(d.mean(), [(a.mean(), b.mean()) for a, b in std])
            boots = []
            for _ in range(1000):
                pick = lambda a, b: (lambda i: (a[i].mean(), b[i].mean()))(rng.integers(0, len(a), len(a)))
                dm, pm = pick(d, p)
                r = interp(dm, [pick(a, b) for a, b in std])
                if math.isfinite(r):
                    boots.append(pm / r - 1)
            lo, hi = (np.quantile(boots, [0.025, 0.975]).tolist() if len(boots) > 100 else [None, None])
            rows.append({
                "method": name, "describe": self.points[name].describe(), "diversity": float(d.mean()),
                "perplexity": float(p.mean()), "standard_perplexity_at_same_diversity": ref,
                "relative_difference": (float(p.mean()) / ref - 1) if math.isfinite(ref) else None,
                "ci95": [lo, hi], "bootstrap_in_range": len(boots),
            })
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
            self._score(run, prompts)
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

    # ------------------------------------------------------------------ main
    def run(self) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        prov = provenance()  # the code that runs, recorded before it runs
        calib = PhaseSlipSampler(self.model, self.tokenizer)
        cal = calib.calibrate_heads(search_layers=min(6, self.model.config.num_hidden_layers))
        self.heads = cal.selected
        unique = list(dict.fromkeys(self.points.values()))
        human_methods = cfg.methods if cfg.human_passages > 0 else []
        total = len(unique) * len(cfg.prompts) * cfg.rounds + len(human_methods) * 2 * cfg.human_passages
        with tqdm(total=total, desc="bench sampling", unit="gen", disable=not self.progress) as bar:
            for spec in unique:
                bar.set_postfix_str(spec.describe())
                run = self._generate(spec, cfg.prompts, cfg.rounds, 0, bar)
                self._score(run, cfg.prompts)
                self._runs[spec] = run
            human = self._human(bar) if human_methods else None
        results = {name: dict(describe=spec.describe(), **self._summary(self._runs[spec], len(cfg.prompts)))
                   for name, spec in self.points.items()}
        sanity = None
        if "phase_slip_noise0" in self.points and "standard_matched" in self.points:
            a = [g["token_ids"] for g in self._runs[self.points["phase_slip_noise0"]]["generations"]]
            b = [g["token_ids"] for g in self._runs[self.points["standard_matched"]]["generations"]]
            sanity = {"noise0_equals_standard_matched": a == b, "generations_compared": len(a)}
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
            "matched_diversity": self._matched_diversity(results),
            "human_reference": human,
            "sanity": sanity, "speed": speed,
            "published_table": PUBLISHED_TABLE,
            "generations": {n: [{k: v for k, v in g.items() if k != "token_ids"} for g in self._runs[s]["generations"][: 2]]
                            for n, s in self.points.items()},
            "provenance": prov, "wall_seconds": time.perf_counter() - t0,
        }


def provenance() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True).stdout.strip()

    import transformers

    return {"commit": git("rev-parse", "--short", "HEAD") or None, "dirty": bool(git("status", "--porcelain", "--", "src")),
            "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}
