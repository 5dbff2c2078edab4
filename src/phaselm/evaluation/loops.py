"""``phaselm bench loops``: does Phase-Slip's deterministic mode escape repetition loops?

**Loop metric** (token ids of one generation, EOS excluded; defaults n = 8, k = 3, justified in
``docs/loops.md``):

* :func:`has_loop`: the last half of the generation (``ids[len // 2:]``) contains an n-gram that
  occurs there >= k times (overlapping occurrences count) — the text is *still* repeating at the end;
* :func:`tokens_to_loop`: the 0-based index of the first token that completes the k-th occurrence
  of some n-gram (``None`` if none does); ``index + 1`` tokens were generated when the loop was
  detected. Generations that never loop are censored at their length (survival analysis).

**Benchmark** (:class:`LoopBench`): every method continues every prompt of the committed prompt set
(``data/loop_prompts.jsonl``: narrative, expository, list, code) for ``max_new_tokens`` tokens through
``model.generate`` (Phase-Slip through :func:`phaselm.sampling.phase_slip_generate`, the same
``PhaseSlipStep``), in left-padded batches. Per method it reports the loop rate (Wilson 95% CI),
tokens-to-loop (Kaplan-Meier median and restricted mean up to ``max_new_tokens``, bootstrap CIs over
prompts), perplexity of the generations under the model, the distance to human text
|log(mean PPL / human PPL)| on the sampling benchmark's human reference set, tokens/s, a
per-kind breakdown, and paired comparisons with greedy (exact McNemar test, paired bootstrap CI of
the loop-rate difference and its minimum detectable effect).
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from phaselm.utils import atomic_write, provenance, pyplot, save_figure

LOOP_N, LOOP_K = 8, 3
PROMPT_FILE = "loop_prompts.jsonl"


# ---------------------------------------------------------------------------- the metric
def _check(n: int, k: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1 (the n-gram length, e.g. {LOOP_N}), got {n!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"k must be an integer >= 2 (occurrences that make a loop, e.g. {LOOP_K}), got {k!r}")


def tokens_to_loop(token_ids, n: int = LOOP_N, k: int = LOOP_K) -> int | None:
    """0-based index of the first token completing the k-th occurrence of some n-gram, else ``None``."""
    _check(n, k)
    ids = list(token_ids)
    seen: dict[tuple, int] = {}
    for end in range(n - 1, len(ids)):
        gram = tuple(ids[end - n + 1: end + 1])
        seen[gram] = seen.get(gram, 0) + 1
        if seen[gram] >= k:
            return end
    return None


def has_loop(token_ids, n: int = LOOP_N, k: int = LOOP_K) -> bool:
    """The last half of ``token_ids`` (``ids[len // 2:]``) contains an n-gram occurring >= k times."""
    ids = list(token_ids)
    return tokens_to_loop(ids[len(ids) // 2:], n, k) is not None


# ---------------------------------------------------------------------------- statistics
def wilson(successes: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score 95% interval of a proportion."""
    if total == 0:
        return (float("nan"), float("nan"))
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return (max(0.0, centre - half), min(1.0, centre + half))


def kaplan_meier(times, events) -> list[tuple[float, float]]:
    """``[(t, S(t))]`` at each event time: S(t) = Π_{t_i <= t} (1 − d_i / n_i) (``events[i]``: looped
    at ``times[i]``; else censored there)."""
    times, events = np.asarray(times, float), np.asarray(events, bool)
    out, s = [], 1.0
    for t in np.unique(times[events]):
        at_risk = int((times >= t).sum())
        deaths = int(((times == t) & events).sum())
        s *= 1 - deaths / at_risk
        out.append((float(t), s))
    return out


def km_median(times, events) -> float:
    """Smallest t with S(t) <= 0.5, ``inf`` if the curve stays above 0.5."""
    return next((t for t, s in kaplan_meier(times, events) if s <= 0.5), math.inf)


def rmst(times, events, horizon: float) -> float:
    """Restricted mean time without a loop: ∫_0^horizon S(t) dt of the Kaplan-Meier curve."""
    area, last_t, last_s = 0.0, 0.0, 1.0
    for t, s in kaplan_meier(times, events):
        if t > horizon:
            break
        area += last_s * (t - last_t)
        last_t, last_s = t, s
    return area + last_s * (horizon - last_t)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (b: only A loops, c: only B)."""
    m = b + c
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(0, min(b, c) + 1)) / 2 ** m
    return min(1.0, 2 * tail)


def bootstrap_ci(stat, n: int, reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile 95% CI of ``stat(indices)`` over ``reps`` resamples of ``n`` prompts."""
    rng = np.random.default_rng(seed)
    vals = np.array([stat(rng.integers(0, n, n)) for _ in range(reps)], float)
    vals = vals[np.isfinite(vals)]
    if len(vals) < reps // 2:
        return (float("nan"), float("nan"))
    lo, hi = np.quantile(vals, [0.025, 0.975])
    return (float(lo), float(hi))


# ---------------------------------------------------------------------------- prompts and methods
def load_prompts(limit: int | None = None, path: str | None = None) -> list[dict]:
    """The committed prompt set (``{"id", "kind", "prompt"}`` rows), the first ``limit`` of each kind
    in turn when ``limit`` is given (so a small run still covers every kind)."""
    text = Path(path).read_text(encoding="utf-8") if path else \
        resources.files("phaselm.evaluation").joinpath("data", PROMPT_FILE).read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    if limit is None:
        return rows
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"--prompts must be an integer >= 1 (how many prompts to use), got {limit!r}")
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    by_kind = {kd: [r for r in rows if r["kind"] == kd] for kd in kinds}
    order = [r for i in range(max(map(len, by_kind.values()))) for kd in kinds if i < len(by_kind[kd])
             for r in [by_kind[kd][i]]]
    return sorted(order[:limit], key=rows.index)


@dataclass(frozen=True)
class LoopMethod:
    """One decoding configuration run through ``model.generate``. ``kind``: greedy | phase_slip |
    sample; ``generate``: extra ``generate`` keywords; ``dry``: add llama.cpp's DRY processor."""

    kind: str
    noise_scale: float = 0.0
    generate: tuple = ()
    dry: bool = False

    def describe(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.generate)
        if self.kind == "phase_slip":
            return f"Phase-Slip deterministic (noise {self.noise_scale:g} rad)"
        base = "greedy" if self.kind == "greedy" else "sampling"
        return base + (" + DRY (0.8, 1.75, 2)" if self.dry else "") + (f" ({extra})" if extra else "")


METHODS = {
    "greedy": LoopMethod("greedy"),
    "phase_slip_1": LoopMethod("phase_slip", 1.0),
    "dry": LoopMethod("greedy", dry=True),
    "repetition_penalty_1.3": LoopMethod("greedy", generate=(("repetition_penalty", 1.3),)),
    "no_repeat_ngram_3": LoopMethod("greedy", generate=(("no_repeat_ngram_size", 3),)),
    "phase_slip_0.3": LoopMethod("phase_slip", 0.3),
    "phase_slip_2": LoopMethod("phase_slip", 2.0),
    "repetition_penalty_1.1": LoopMethod("greedy", generate=(("repetition_penalty", 1.1),)),
    "temperature_0.3": LoopMethod("sample", generate=(("temperature", 0.3), ("top_k", 0), ("top_p", 1.0))),
    "min_p_0.1": LoopMethod("sample", generate=(("temperature", 1.0), ("min_p", 0.1), ("top_k", 0), ("top_p", 1.0))),
    "phase_slip_0.03": LoopMethod("phase_slip", 0.03),
}
"""Run in this order (most informative first), so an interrupted run still answers the question."""


@dataclass
class LoopConfig:
    max_new_tokens: int = 256
    prompts: int | None = None  # None: all
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    batch_size: int = 16
    seed: int = 0
    n: int = LOOP_N
    k: int = LOOP_K
    human_passages: int = 10  # per source; 0 disables the human-distance column
    human_prompt_tokens: int = 32

    def validate(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
        if "greedy" not in self.methods:
            raise ValueError("the methods must include greedy (every comparison is paired with it)")
        for name in ("max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.human_passages, int) or self.human_passages < 0:
            raise ValueError(f"human_passages must be an integer >= 0, got {self.human_passages!r}")
        _check(self.n, self.k)


# ---------------------------------------------------------------------------- the runner
class LoopBench:
    """Generates per method (one JSON file each under ``out/methods``, skipped on resume) and
    analyses them (:func:`analyse`)."""

    def __init__(self, model, tokenizer, cfg: LoopConfig, out: str, progress: bool = True,
                 model_name: str = "embedded SmolLM2-135M-Instruct"):
        cfg.validate()
        self.model, self.tok, self.cfg, self.out = model, tokenizer, cfg, Path(out)
        self.progress, self.model_name = progress, model_name
        self.items = load_prompts(cfg.prompts)
        self.heads = None
        self._breakers = None

    def _fingerprint(self) -> dict:
        c = self.cfg
        return {"max_new_tokens": c.max_new_tokens, "prompt_ids": [r["id"] for r in self.items], "seed": c.seed,
                "batch_size": c.batch_size, "human_passages": c.human_passages, "model": self.model_name}

    def _generate(self, spec: LoopMethod, prompts: list[str], seed: int, bar) -> dict:
        from transformers import LogitsProcessorList

        from phaselm.sampling import phase_slip_generate
        from phaselm.sampling.logits_processors import DRYLogitsProcessor, sequence_breaker_ids

        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        gens, seconds = [], 0.0
        bs = self.cfg.batch_size
        for start in range(0, len(prompts), bs):
            batch = prompts[start: start + bs]
            enc = self.tok(batch, return_tensors="pt", padding=True, padding_side="left").to(self.model.device)
            kw = dict(max_new_tokens=self.cfg.max_new_tokens, pad_token_id=pad, do_sample=spec.kind == "sample",
                      **dict(spec.generate))
            if spec.dry:
                if self._breakers is None:
                    self._breakers = sequence_breaker_ids(self.tok)
                kw["logits_processor"] = LogitsProcessorList([DRYLogitsProcessor(
                    0.8, 1.75, 2, sequence_breakers=self._breakers)])
            torch.manual_seed(seed * 1_000_003 + start)  # the draws of sampling methods (per batch)
            t0 = time.perf_counter()
            if spec.kind == "phase_slip":
                rows = list(range(start, start + len(batch)))
                out = phase_slip_generate(self.model, **enc, noise_scale=spec.noise_scale, heads=self.heads,
                                          rotation_seed=[seed * 1_000_003 + r for r in rows], **kw)
                nll = None
            else:  # the raw logits of generate are the model's own: the generation's NLL comes for free
                res = self.model.generate(**enc, **kw, return_dict_in_generate=True, output_logits=True)
                out = res.sequences
            seconds += time.perf_counter() - t0
            new = out[:, enc["input_ids"].shape[1]:]
            if spec.kind != "phase_slip":
                logp = torch.stack([z.float().log_softmax(-1).gather(-1, new[:, t, None])[:, 0]
                                    for t, z in enumerate(res.logits)], dim=1)  # [B, steps]
                nll = (-logp).tolist()
                del res
            for b, row in enumerate(new.tolist()):
                cut = next((i for i, t in enumerate(row) if t in eos), len(row))
                gen = {"token_ids": row[:cut], "eos": cut < len(row)}
                if nll is not None:
                    gen["perplexity"] = math.exp(sum(nll[b][:cut]) / cut) if cut else float("nan")
                gens.append(gen)
            bar.update(len(batch))
        return {"generations": gens, "seconds": seconds, "new_tokens": sum(len(g["token_ids"]) + g["eos"] for g in gens)}

    def _score(self, prompts: list[str], gens: list[dict]) -> None:
        """Perplexity of each generation under the model (teacher-forced; ``_generate`` already set it
        from the decode-time logits for every method but Phase-Slip, whose logits are fused)."""
        from phaselm.evaluation.scoring import continuation_nll, perplexities

        todo = [i for i, g in enumerate(gens) if "perplexity" not in g]
        if not todo:
            return
        p_ids = [self.tok(prompts[i])["input_ids"] for i in todo]
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        ppl = perplexities(continuation_nll(self.model, p_ids, [gens[i]["token_ids"] for i in todo], pad, 8))
        for i, value in zip(todo, ppl):
            gens[i]["perplexity"] = value

    def _human_items(self) -> list[dict]:
        from phaselm.evaluation.sampling_bench import human_reference_set

        if self.cfg.human_passages == 0:
            return []
        return human_reference_set(self.tok, self.cfg.human_passages, self.cfg.human_prompt_tokens,
                                   self.cfg.max_new_tokens)

    def run(self, command: str = "", resume: bool = False) -> dict:
        from phaselm.sampling import PhaseSlipSampler

        cfg, methods_dir = self.cfg, self.out / "methods"
        methods_dir.mkdir(parents=True, exist_ok=True)
        prov = dict(provenance(), command=command, seed=cfg.seed, host=platform.node())
        human = self._human_items()
        prompts = [r["prompt"] for r in self.items]
        human_path = self.out / "human.json"
        if human and not human_path.exists():
            from phaselm.evaluation.scoring import text_perplexities

            ppl = text_perplexities(self.model, self.tok, [h["prompt"] for h in human], [h["human"] for h in human], 8)
            ids = [self.tok(h["human"], add_special_tokens=False)["input_ids"] for h in human]
            atomic_write(human_path, json.dumps({"items": [dict(h, perplexity=p, has_loop=has_loop(i, cfg.n, cfg.k))
                                                            for h, p, i in zip(human, ppl, ids)],
                                                 "fingerprint": self._fingerprint()}, indent=1))
        todo = []
        for name in cfg.methods:
            path = methods_dir / f"{name}.json"
            if path.exists():
                if not resume:
                    raise ValueError(f"{path} exists; pass --resume to keep finished methods, or use another --out")
                done = json.loads(path.read_text())
                if done.get("fingerprint") != self._fingerprint():
                    raise ValueError(f"{path} was written with other settings (prompts, tokens, seed or batch); "
                                     f"use another --out or delete it")
                continue
            todo.append(name)
        if any(METHODS[m].kind == "phase_slip" for m in todo):
            cal = PhaseSlipSampler(self.model, self.tok).calibrate_heads(
                search_layers=min(6, self.model.config.num_hidden_layers))
            self.heads = cal.selected
        per_method = len(prompts) + len(human)
        with tqdm(total=per_method * len(todo), desc="bench loops", unit="gen", disable=not self.progress) as bar:
            for name in todo:
                spec = METHODS[name]
                bar.set_postfix_str(name)
                run = self._generate(spec, prompts, cfg.seed, bar)
                self._score(prompts, run["generations"])
                hrun = self._generate(spec, [h["prompt"] for h in human], cfg.seed + 1, bar) if human else None
                if hrun:
                    self._score([h["prompt"] for h in human], hrun["generations"])
                for g, item in zip(run["generations"], self.items):
                    g.update(id=item["id"], kind=item["kind"], text=self.tok.decode(g["token_ids"]))
                record = {"method": name, "describe": spec.describe(), "spec": asdict(spec),
                          "heads": [list(h) for h in self.heads] if spec.kind == "phase_slip" else None,
                          "fingerprint": self._fingerprint(), "provenance": prov, **run,
                          "human_prompts": hrun}
                atomic_write(methods_dir / f"{name}.json", json.dumps(record))
        return analyse(self.out, cfg.n, cfg.k, cfg.max_new_tokens, command=command)


# ---------------------------------------------------------------------------- analysis
def _loop_arrays(gens: list[dict], n: int, k: int, horizon: int):
    loops = np.array([has_loop(g["token_ids"], n, k) for g in gens])
    ttl = [tokens_to_loop(g["token_ids"], n, k) for g in gens]
    events = np.array([t is not None for t in ttl])
    times = np.array([t + 1 if t is not None else min(len(g["token_ids"]), horizon) for t, g in zip(ttl, gens)], float)
    return loops, times, events


def analyse(out: str | Path, n: int = LOOP_N, k: int = LOOP_K, horizon: int = 256, command: str = "") -> dict:
    """Read ``out/methods/*.json`` (and ``out/human.json``), write ``results.json``, ``report.md``
    and ``loops.png`` under ``out``; returns the results."""
    out = Path(out)
    runs = {p.stem: json.loads(p.read_text()) for p in sorted((out / "methods").glob("*.json"))}
    if "greedy" not in runs:
        raise ValueError(f"{out}/methods has no greedy.json; run the benchmark first")
    order = [m for m in METHODS if m in runs] + [m for m in runs if m not in METHODS]
    human = json.loads((out / "human.json").read_text())["items"] if (out / "human.json").exists() else []
    human_ppl = float(np.nanmean([h["perplexity"] for h in human])) if human else None
    base_loops, base_times, base_events = _loop_arrays(runs["greedy"]["generations"], n, k, horizon)
    size = len(base_loops)
    results = {}
    for name in order:
        run = runs[name]
        gens = run["generations"]
        loops, times, events = _loop_arrays(gens, n, k, horizon)
        ppl = np.array([g["perplexity"] for g in gens], float)
        entry = {
            "describe": run["describe"], "prompts": size,
            "loop_rate": float(loops.mean()), "loop_rate_ci95": wilson(int(loops.sum()), size),
            "looped_ever": float(events.mean()),
            "tokens_to_loop_median": km_median(times, events),
            "tokens_to_loop_median_ci95": bootstrap_ci(lambda i: km_median(times[i], events[i]), size),
            "rmst": rmst(times, events, horizon),
            "rmst_ci95": bootstrap_ci(lambda i: rmst(times[i], events[i], horizon), size),
            "survival_at_horizon": kaplan_meier(times, events)[-1][1] if events.any() else 1.0,
            "mean_length": float(np.mean([len(g["token_ids"]) for g in gens])),
            "eos_rate": float(np.mean([g["eos"] for g in gens])),
            "perplexity_mean": float(np.nanmean(ppl)),
            "perplexity_ci95": bootstrap_ci(lambda i: float(np.nanmean(ppl[i])), size),
            "tokens_per_second": run["new_tokens"] / run["seconds"] if run["seconds"] else None,
            "seconds": run["seconds"],
            "by_kind": {},
            "km": kaplan_meier(times, events),
        }
        for kind in dict.fromkeys(g["kind"] for g in gens):
            sel = np.array([g["kind"] == kind for g in gens])
            entry["by_kind"][kind] = {"loop_rate": float(loops[sel].mean()), "n": int(sel.sum()),
                                      "ci95": wilson(int(loops[sel].sum()), int(sel.sum())),
                                      "perplexity_mean": float(np.nanmean(ppl[sel]))}
        hp = run.get("human_prompts")
        if hp and human_ppl:
            hppl = np.array([g["perplexity"] for g in hp["generations"]], float)
            entry["human_ppl_ratio"] = float(np.nanmean(hppl) / human_ppl)
            entry["human_ppl_distance"] = abs(math.log(entry["human_ppl_ratio"]))
            entry["human_ppl_distance_ci95"] = bootstrap_ci(
                lambda i: abs(math.log(np.nanmean(hppl[i]) / human_ppl)), len(hppl))
        if name != "greedy":
            only_base = int((base_loops & ~loops).sum())  # greedy loops, this method does not
            only_this = int((~base_loops & loops).sum())
            diff = loops.astype(float) - base_loops.astype(float)
            sd = math.sqrt(max(diff.var(), 1.0 / size) / size)  # at least one discordant pair
            entry["vs_greedy"] = {
                "loop_rate_difference": float(diff.mean()),
                "difference_ci95": bootstrap_ci(lambda i: float(diff[i].mean()), size),
                "escaped": only_base, "new_loops": only_this,
                "mcnemar_p": mcnemar_exact(only_base, only_this),
                "mde_80pct_power": 2.8 * sd,
                "rmst_difference": entry["rmst"] - rmst(base_times, base_events, horizon),
                "rmst_difference_ci95": bootstrap_ci(
                    lambda i: rmst(times[i], events[i], horizon) - rmst(base_times[i], base_events[i], horizon), size),
            }
        results[name] = entry
    human_summary = None
    if human:
        hl = [h["has_loop"] for h in human]
        human_summary = {"passages": len(human), "perplexity_mean": human_ppl, "loop_rate": float(np.mean(hl)),
                         "loop_rate_ci95": wilson(int(sum(hl)), len(hl))}
    prov = runs["greedy"]["provenance"]
    res = {"metric": {"n": n, "k": k, "horizon": horizon}, "results": results, "human": human_summary,
           "provenance": prov, "analysis_command": command, "analysis_commit": _commit(),
           "heads": next((r["heads"] for r in runs.values() if r.get("heads")), None),
           "runs": {m: {k: runs[m]["provenance"].get(k) for k in ("commit", "dirty", "command", "machine")}
                    for m in order},
           "examples": {m: [g["text"][:300] for g in runs[m]["generations"][:3]] for m in order}}
    res["comparisons"] = _head_to_head(runs, order, n, k)
    atomic_write(out / "results.json", json.dumps(res, indent=1, default=float))
    _plot(res, out / "loops.png")
    text = report(res)
    if (out / "notes.md").exists():  # hand-written reading of the numbers, kept next to the data
        text += "\n" + (out / "notes.md").read_text(encoding="utf-8")
    atomic_write(out / "report.md", text)
    return res


def _commit() -> str | None:
    return provenance()["commit"]


BASELINES = ("repetition_penalty_1.1", "repetition_penalty_1.3", "no_repeat_ngram_3", "dry")


def _head_to_head(runs: dict, order: list[str], n: int, k: int) -> list[dict]:
    """Each Phase-Slip method against each cheap baseline, paired over prompts: the loop-rate
    difference (Phase-Slip − baseline) with a bootstrap CI and the exact McNemar p-value."""
    loops = {m: np.array([has_loop(g["token_ids"], n, k) for g in runs[m]["generations"]]) for m in order}
    rows = []
    for ps in (m for m in order if m.startswith("phase_slip")):
        for base in (m for m in BASELINES if m in loops):
            a, b = loops[ps], loops[base]
            diff = a.astype(float) - b.astype(float)
            rows.append({"phase_slip": ps, "baseline": base, "loop_rate_difference": float(diff.mean()),
                         "difference_ci95": bootstrap_ci(lambda i: float(diff[i].mean()), len(diff)),
                         "only_phase_slip_loops": int((a & ~b).sum()), "only_baseline_loops": int((~a & b).sum()),
                         "mcnemar_p": mcnemar_exact(int((a & ~b).sum()), int((~a & b).sum()))})
    return rows


def verdict(res: dict) -> str:
    """The verdict paragraph, computed from the results (Bonferroni over the comparisons with greedy)."""
    r = res["results"]
    g = r["greedy"]
    ps = [m for m in r if m.startswith("phase_slip")]
    base = [m for m in BASELINES if m in r]
    alpha = 0.05 / max(1, len(r) - 1)

    def line(m):
        e, v = r[m], r[m]["vs_greedy"]
        hd = f", human-PPL distance {e['human_ppl_distance']:.2f}" if "human_ppl_distance" in e else ""
        return (f"`{m}` {e['loop_rate']:.0%} {_fmt_ci(e['loop_rate_ci95'], True)} (Δ vs greedy "
                f"{v['loop_rate_difference']:+.0%} {_fmt_ci(v['difference_ci95'], True)}, {v['escaped']} escaped / "
                f"{v['new_loops']} new, McNemar p = {v['mcnemar_p']:.2g}; PPL {e['perplexity_mean']:.2f}{hd})")

    hd = f", human-PPL distance {g['human_ppl_distance']:.2f}" if "human_ppl_distance" in g else ""
    out = [f"Greedy loops on {g['loop_rate']:.0%} {_fmt_ci(g['loop_rate_ci95'], True)} of the "
           f"{g['prompts']} prompts (PPL {g['perplexity_mean']:.2f}{hd})."]
    if ps:
        sig = [m for m in ps if r[m]["vs_greedy"]["mcnemar_p"] < alpha and r[m]["vs_greedy"]["loop_rate_difference"] < 0]
        out.append("Phase-Slip deterministic: " + "; ".join(line(m) for m in ps) + ".")
        out.append(f"Fewer loops than greedy at Bonferroni α = {alpha:.4f}: "
                   + (", ".join(f"`{m}`" for m in sig) if sig else "none of the Phase-Slip settings") + ".")
    if base:
        best = min(base, key=lambda m: r[m]["loop_rate"])
        out.append("Cheap baselines: " + "; ".join(line(m) for m in base) + f". Best: `{best}`.")
        if ps:
            best_ps = min(ps, key=lambda m: r[m]["loop_rate"])
            h2h = next(c for c in res.get("comparisons", []) if c["phase_slip"] == best_ps and c["baseline"] == best)
            out.append(f"Best Phase-Slip (`{best_ps}`) minus best baseline (`{best}`), paired: "
                       f"{h2h['loop_rate_difference']:+.0%} {_fmt_ci(h2h['difference_ci95'], True)} "
                       f"(McNemar p = {h2h['mcnemar_p']:.2g}).")
    return " ".join(out)


def _fmt_ci(ci, pct=False) -> str:
    lo, hi = ci
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "[–]"
    return f"[{lo:.0%}, {hi:.0%}]" if pct else f"[{lo:.3g}, {hi:.3g}]"


def report(res: dict) -> str:
    """The markdown report of :func:`analyse`'s results."""
    r, m, prov = res["results"], res["metric"], res["provenance"]
    lines = [f"# Loop benchmark: {len(r)} methods × {r['greedy']['prompts']} prompts × {m['horizon']} new tokens", "",
             "**Verdict (computed).** " + verdict(res), "",
             f"Loop = an {m['n']}-gram occurring >= {m['k']} times in the last half of the generation "
             f"(`phaselm.evaluation.loops.has_loop`); tokens-to-loop = tokens generated when some {m['n']}-gram first "
             f"occurs for the k = {m['k']}-th time (censored at the generation's length). 95% CIs: Wilson (rates), "
             "bootstrap over prompts (2000 resamples) otherwise; RMST = restricted mean tokens without a loop, up to "
             f"{m['horizon']}.", "",
             "| method | loop rate [95% CI] | KM median tokens-to-loop [CI] | RMST [CI] | PPL [CI] | "
             "human-PPL distance [CI] | EOS | mean length | tok/s |", "|---|---|---|---|---|---|---|---|---|"]
    for name, e in r.items():
        med = "not reached" if not math.isfinite(e["tokens_to_loop_median"]) else f"{e['tokens_to_loop_median']:.0f}"
        hd = f"{e['human_ppl_distance']:.2f} {_fmt_ci(e['human_ppl_distance_ci95'])}" if "human_ppl_distance" in e else "–"
        lines.append(f"| {name}: {e['describe']} | {e['loop_rate']:.0%} {_fmt_ci(e['loop_rate_ci95'], True)} | {med} "
                     f"{_fmt_ci(e['tokens_to_loop_median_ci95'])} | {e['rmst']:.0f} {_fmt_ci(e['rmst_ci95'])} | "
                     f"{e['perplexity_mean']:.2f} {_fmt_ci(e['perplexity_ci95'])} | {hd} | {e['eos_rate']:.0%} | "
                     f"{e['mean_length']:.0f} | "
                     f"{e['tokens_per_second']:.0f} |")
    lines += ["", "## Paired with greedy (same prompts)", "",
              "| method | Δ loop rate [95% CI] | escaped / new loops | McNemar p | MDE (80% power) | Δ RMST [CI] |",
              "|---|---|---|---|---|---|"]
    for name, e in r.items():
        if "vs_greedy" in e:
            v = e["vs_greedy"]
            lines.append(f"| {name} | {v['loop_rate_difference']:+.0%} {_fmt_ci(v['difference_ci95'], True)} | "
                         f"{v['escaped']} / {v['new_loops']} | {v['mcnemar_p']:.2g} | {v['mde_80pct_power']:.0%} | "
                         f"{v['rmst_difference']:+.0f} {_fmt_ci(v['rmst_difference_ci95'])} |")
    kinds = list(r["greedy"]["by_kind"])
    lines += ["", "## Loop rate by prompt kind", "", "| method | " + " | ".join(kinds) + " |",
              "|---|" + "---|" * len(kinds)]
    for name, e in r.items():
        lines.append(f"| {name} | " + " | ".join(
            f"{e['by_kind'][kd]['loop_rate']:.0%} (n={e['by_kind'][kd]['n']})" for kd in kinds) + " |")
    if res["human"]:
        h = res["human"]
        lines += ["", f"Human reference ({h['passages']} passages, Shakespeare test split + Paradise Lost): mean PPL "
                  f"{h['perplexity_mean']:.2f}; loop rate of the metric on human text (false positives) "
                  f"{h['loop_rate']:.0%} {_fmt_ci(h['loop_rate_ci95'], True)}."]
    lines += ["", "![loop rate and survival](loops.png)", "",
              f"Phase-Slip heads (calibrated): {res['heads']}.", "",
              f"Provenance: commit {prov.get('commit')} (dirty: {prov.get('dirty')}), machine {prov.get('machine')}, "
              f"device {prov.get('device')}, torch {prov.get('torch')}, transformers {prov.get('transformers')}, "
              f"seed {prov.get('seed')}.", ""]
    groups: dict = {}
    for name, run in res.get("runs", {}).items():
        groups.setdefault((run["commit"], run["dirty"], run["command"]), []).append(name)
    for (commit, dirty, command), names in groups.items():
        lines.append(f"* `{command}` at commit {commit} (dirty: {dirty}): {', '.join(names)}")
    lines += ["", f"Analysed at commit {res.get('analysis_commit')} with "
              f"`{res.get('analysis_command') or prov.get('command')}`.", ""]
    return "\n".join(lines)


def _plot(res: dict, path: Path) -> None:
    plt = pyplot()
    r = res["results"]
    names = list(r)
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5))
    rates = [r[n]["loop_rate"] for n in names]
    err = [[rates[i] - r[n]["loop_rate_ci95"][0] for i, n in enumerate(names)],
           [r[n]["loop_rate_ci95"][1] - rates[i] for i, n in enumerate(names)]]
    colors = ["tab:purple" if n.startswith("phase_slip") else "tab:gray" if n == "greedy" else "tab:blue" for n in names]
    a.bar(range(len(names)), rates, yerr=err, color=colors, capsize=3)
    a.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    a.set_ylabel("loop rate (95% Wilson CI)")
    a.set_title(f"loops: {res['metric']['n']}-gram ×{res['metric']['k']} in the last half")
    horizon = res["metric"]["horizon"]
    for n in names:
        pts = [(0.0, 1.0)] + [tuple(p) for p in r[n]["km"]] + [(float(horizon), None)]
        xs, ys, s = [], [], 1.0
        for t, v in pts:
            xs += [t, t]
            ys += [s, v if v is not None else s]
            s = v if v is not None else s
        b.plot(xs, ys, label=n, lw=2 if n == "greedy" or n.startswith("phase_slip") else 1,
               color="black" if n == "greedy" else None,
               ls="-" if n.startswith("phase_slip") or n == "greedy" else "--")
    b.set_xlabel("tokens generated")
    b.set_ylabel("fraction without a loop yet (Kaplan-Meier)")
    b.set_xlim(0, horizon)
    b.set_ylim(0, 1.02)
    b.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
