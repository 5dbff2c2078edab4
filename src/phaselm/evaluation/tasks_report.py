"""Report of a ``phaselm bench tasks`` run: ``report.md``, ``accuracy_vs_difficulty.png``,
``accuracy_vs_width.png``, ``accuracy_by_seed.png`` (every run, with the pairs a comparison uses) and,
for runs that record it, ``val_by_step.png`` (val accuracy during training),
rendered from ``OUT/runs/*.json`` only (``phaselm report tasks OUT`` re-renders them byte for byte).

Statistics. Accuracy is the fraction of the test set's answer tokens predicted right (argmax); each
run carries its Wilson 95% interval (answer tokens of one example are not independent, so it is a
lower bound on that run's test-set uncertainty). Across seeds a cell shows the mean and the 95%
t-interval. A model is compared with its baseline (``BASELINE``) *paired by seed* in every cell it
shares with it (same difficulty, width and seed, so the same data order): the mean paired
difference, a percentile bootstrap 95% CI over the pairs (seeded, so re-rendering is identical) and
the minimum detectable effect at 80% power and α = 0.05, (t₀.₉₇₅ + t₀.₈₀)·sd/√n of the differences.
The unit of a pair is one trained model (a width and a seed): each difficulty gets its own
comparison, and the overall one pairs each model's mean accuracy over the difficulties, so a
mixture run, one model tested on every difficulty, counts once, not once per difficulty. With a few
pairs the percentile bootstrap is too narrow (three pairs give about the range of the three), so
each comparison also carries the paired t-interval, and a verdict ("helps", "hurts") needs both to
exclude zero: at three seeds the t-interval decides, as it does for the MDE.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np

from phaselm.evaluation.grid_report import _T95, mean_ci
from phaselm.evaluation.tasks_bench import BASELINE, DIFFICULTIES, MIX, MODELS, choose_lr, protocol_of, read_run, split_record
from phaselm.evaluation.text_metrics import bootstrap_ci
from phaselm.utils import atomic_write, pyplot, save_figure

CEILING = 0.99
"""A baseline at or above this mean accuracy leaves under 1 point of room: a comparison against it can
show a loss, not a gain, and its verdict says so."""

ERROR_AXIS = 0.90
"""Where every run is at or above this accuracy, ``accuracy_by_seed.png`` plots the error rate on a
symlog axis, so runs with a few errors in 10⁴ and runs with a few in 10² are both told apart."""

_T80 = {1: 1.376, 2: 1.061, 3: 0.978, 4: 0.941, 5: 0.920, 6: 0.906, 7: 0.896, 8: 0.889, 9: 0.883, 10: 0.879}
"""One-sided 80% Student t quantiles by degrees of freedom (beyond 10: the normal 0.842)."""


def load(out: str | Path) -> tuple[list[dict], list[dict]]:
    """``(main runs, sweep runs)`` of a bench folder, in a fixed order."""
    paths = sorted((Path(out) / "runs").glob("*.json"))
    runs = [read_run(p) for p in paths]
    if not runs:
        raise ValueError(f"{out}/runs holds no run results; pass the --out folder of phaselm bench tasks")
    settings = [{**protocol_of(r), "lrs": None} for r in runs]  # a sweep may gain rates
    for path, saved in zip(paths, settings):
        if key := next((k for k in {*saved, *settings[0]} if saved.get(k) != settings[0].get(k)), None):
            raise ValueError(f"{out}/runs mixes runs of different settings ({paths[0].name}: {key}="
                             f"{settings[0].get(key)!r}, {path.name}: {saved.get(key)!r}); keep one bench's runs per folder")
    key = lambda r: (r["difficulty"], r["model"], r["width"], r["seed"], r["lr"])  # noqa: E731
    main = [r for r in runs if not r["sweep"] and r["difficulty"] != MIX]  # MIX: split per difficulty
    have = {key(r) for r in main}  # a mixture run without its per-difficulty files (an experiment's): split here
    main = sorted(main + [s for r in runs if r["difficulty"] == MIX and not r["sweep"]
                          for s in split_record(r) if key(s) not in have], key=key)
    sweep = sorted((r for r in runs if r["sweep"]), key=key)
    if not main and not sweep:
        raise ValueError(f"{out}/runs holds mixture runs without their per-difficulty test files "
                         "(<difficulty>__<model>__w<width>__seed<s>.json); phaselm bench tasks --mixture writes both")
    return main, sweep


def mde(diffs: list[float]) -> float | None:
    """Minimum detectable mean difference (80% power, two-sided α = 0.05) for paired ``diffs``."""
    n = len(diffs)
    if n < 2:
        return None
    sd = float(np.std(diffs, ddof=1))
    return (_T95.get(n - 1, 1.96) + _T80.get(n - 1, 0.842)) * sd / math.sqrt(n)


def accuracies(main: list[dict], model: str) -> dict[tuple[str, int, int], float]:
    """Test accuracy of ``model`` keyed by (difficulty, width, seed)."""
    return {(r["difficulty"], r["width"], r["seed"]): r["test"]["accuracy"] for r in main if r["model"] == model}


def paired(main: list[dict], model: str, base: str) -> dict[tuple[str, int, int], float]:
    """Test-accuracy differences ``model − base`` keyed by the (difficulty, width, seed) both ran."""
    ref = accuracies(main, base)
    return {k: acc - ref[k] for k, acc in accuracies(main, model).items() if k in ref}


def pooled(diffs: dict[tuple[str, int, int], float], difficulties: list[str]) -> list[float]:
    """One difference per trained model (width, seed) that has every difficulty in ``difficulties``:
    the mean over the difficulties (the overall comparison's pairs)."""
    units = sorted({(w, s) for _, w, s in diffs})
    return [float(np.mean([diffs[d, w, s] for d in difficulties])) for w, s in units
            if all((d, w, s) in diffs for d in difficulties)]


def comparison(diffs: list[float], base: list[float] | None = None) -> dict:
    """Mean paired difference, its percentile bootstrap 95% CI (``ci95``), its 95% t-interval
    (``t95``; None below two pairs) and the MDE; with ``base`` (the baseline's accuracies in the same
    pairs) also the baseline's mean accuracy (``baseline``): 1 − baseline bounds any gain."""
    if not diffs:
        return {"n": 0}
    lo, hi = bootstrap_ci(diffs, seed=0)
    mean, half = mean_ci(diffs)
    out = {"n": len(diffs), "mean": float(mean), "ci95": [lo, hi],
           "t95": None if half is None else [float(mean - half), float(mean + half)], "mde": mde(diffs)}
    return out if base is None else {**out, "baseline": float(np.mean(base))}


def _digits(scale: float | None) -> int:
    """Decimals (1 to 3) that give a percentage-point ``scale`` (a fraction: an MDE, an interval's half
    width, the room left below 100%) two significant figures: near the ceiling a 0.06-point effect must
    not print as +0.1 [+0.0, +0.1]."""
    if scale is None or not math.isfinite(scale) or scale <= 0:
        return 1
    return min(3, max(1, 1 - math.floor(math.log10(scale * 100))))


def _pct(x: float | None, sign: bool = False, digits: int = 1) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x * 100:{'+' if sign else ''}.{digits}f}"


def _cell(runs: list[dict]) -> str:
    accs = [r["test"]["accuracy"] for r in runs]
    mean, half = mean_ci(accs)
    k = _digits(max(half or 0.0, 1 - max(accs)))
    text = _pct(mean, digits=k) + ("" if half is None else f" ± {half * 100:.{k}f}")
    return text + (" ⚠" if any(r.get("diverged") for r in runs) else "")


def _verdict(c: dict) -> str:
    if c["n"] < 2:
        return "too few pairs"
    (lo, hi), (t_lo, t_hi) = c["ci95"], c["t95"]
    if min(lo, t_lo) > 0:
        return "helps"
    if max(hi, t_hi) < 0:
        return "hurts"
    text = f"no difference detected (could detect ≥ {_pct(c['mde'], digits=_digits(c['mde']))} pts)"
    if c.get("baseline", 0.0) >= CEILING:  # a gain of more than 1 − baseline is impossible
        text += f"; the baseline is at the ceiling ({c['baseline'] * 100:.2f}%), so only a loss could show"
    return text


def markdown(main: list[dict], sweep: list[dict]) -> tuple[str, dict]:
    """The report's text and the paired comparisons by model."""
    first = (main or sweep)[0]
    task, proto = first["task"], first["protocol"]
    models = sorted({r["model"] for r in main}, key=MODELS.index)
    widths = sorted({r["width"] for r in main})
    order = [d for d, _ in DIFFICULTIES[task]]
    difficulties = sorted({r["difficulty"] for r in main}, key=order.index)
    lines = [f"# Synthetic task: {task}", "",
             f"Test accuracy (% of answer tokens, argmax) on {proto['num_test']} held-out examples per difficulty; "
             f"{proto['steps']} steps of batch {proto['batch_size']} "
             + (f"on the {proto['training']} (Zoology: {proto['num_train']:,} training examples of the first, a fifth "
                "of that of each other; one model per seed, tested on every difficulty). "
                if proto.get("training", "per difficulty") != "per difficulty"
                else f"from {proto['num_train']} training examples per difficulty. ") +
             "Cells: mean ± 95% t-interval over seeds (⚠: a seed diverged).", ""]
    for d in difficulties:
        lines += [f"## {d}", "", "| model | " + " | ".join(f"width {w}" for w in widths) + " | params (widest) |",
                  "|---|" + "---|" * (len(widths) + 1)]
        for m in models:
            cells = [[r for r in main if r["difficulty"] == d and r["model"] == m and r["width"] == w] for w in widths]
            if not any(cells):
                continue
            widest = next((c[0]["params"] for c in reversed(cells) if c), None)
            lines.append(f"| {m} | " + " | ".join(_cell(c) if c else "–" for c in cells) + f" | {widest:,} |")
        lines.append("")
    lines += ["## Paired differences (test accuracy, percentage points)", "",
              "Each model against its baseline, paired by seed (one pair per trained model: a width and a seed), per "
              "difficulty and over all of them (each model's mean over the difficulties); percentile bootstrap and "
              "paired t 95% intervals over the pairs (a verdict needs both to exclude 0); MDE: the smallest mean "
              "difference these pairs detect with 80% power; baseline %: the baseline's mean accuracy in these pairs "
              "(at ≥ 99% only a loss could show).", "",
              "| model | baseline | difficulty | pairs | baseline % | mean Δ | bootstrap 95% | t 95% | MDE | verdict |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    summary = {}
    for m in models:
        base = BASELINE.get(m)
        if base is None or base not in models:
            continue
        diffs = paired(main, m, base)
        ref = {k: v for k, v in accuracies(main, base).items() if k in diffs}  # the baseline in the pairs only
        rows = {d: comparison([v for (dd, _, _), v in diffs.items() if dd == d],
                              [v for (dd, _, _), v in ref.items() if dd == d]) for d in difficulties}
        if len(difficulties) > 1:
            rows["all"] = comparison(pooled(diffs, difficulties), pooled(ref, difficulties))
        summary[m] = {"baseline": base, "by_difficulty": {d: c for d, c in rows.items() if d != "all"},
                      "overall": rows.get("all", rows[difficulties[0]])}
        for d, c in rows.items():
            if c["n"]:
                k = _digits(c["mde"])
                t95 = "–" if c["t95"] is None else f"[{_pct(c['t95'][0], True, k)}, {_pct(c['t95'][1], True, k)}]"
                lines.append(f"| {m} | {base} | {d} | {c['n']} | {c['baseline'] * 100:.2f} | {_pct(c['mean'], True, k)} | "
                             f"[{_pct(c['ci95'][0], True, k)}, {_pct(c['ci95'][1], True, k)}] | {t95} | "
                             f"{_pct(c['mde'], digits=k)} | {_verdict(c)} |")
    if not summary:  # no model here has its baseline here
        lines[-2:] = [f"None: no model in this folder has its baseline here ({', '.join(models)})."]
    if sweep:
        lrs = sorted({r["lr"] for r in sweep})
        lines += ["", f"## Learning-rate sweep ({sweep[0]['difficulty']}, seed 1; val accuracy %)",
                  "", "Per model and width. The rule, fixed in advance: the highest val accuracy, then the lower val "
                  "loss, then the smaller learning rate.", "",
                  "| model | width | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | chosen |",
                  "|---|---|" + "---|" * (len(lrs) + 1)]
        for m, w in sorted({(r["model"], r["width"]) for r in sweep}, key=lambda c: (MODELS.index(c[0]), c[1])):
            rs = [r for r in sweep if r["model"] == m and r["width"] == w]
            by_lr = {r["lr"]: r for r in rs}
            lines.append(f"| {m} | {w} | " + " | ".join(_pct(a := by_lr[lr]["val"]["accuracy"], digits=_digits(1 - a))
                                                      if lr in by_lr else "–"
                                                      for lr in lrs) + f" | {choose_lr(rs):g} |")
    made: dict[str, dict] = {}  # one record per training: a mixture run's per-difficulty records share one
    for r in main + sweep:
        made.setdefault(r.get("trained_on") or r["run"], r)
    trained = [r for r in made.values() if not r.get("reused")]
    commits = sorted({r["commit"] or "?" for r in made.values()})
    resumed = sum(1 for r in trained if r.get("started_at_step", r.get("resumed"))  # older runs: the --resume flag
                  and any(p["seconds"] is None for p in r.get("parts") or [{"seconds": None}]))  # time before unknown
    commands = Counter(re.sub(r" --shard \S+| --no-wait", "", r["command"]) for r in made.values())  # in order of first use
    machines = Counter(f"{r['machine']} ({r['cpu']}), torch {r['torch']}" for r in made.values())
    lines += ["", "## Provenance", "", "- commands (runs each; `--shard` and `--no-wait` left out):",
              *(f"  - `{c}` ({n})" for c, n in commands.items()), f"- commits: {', '.join(commits)}",
              "- machines (runs each): " + "; ".join(f"{m} ({n})" for m, n in machines.items()),
              f"- training time: {sum(r['train_seconds'] for r in trained) / 3600:.2f} h over {len(trained)} trained "
              f"runs ({len(sweep)} in the sweep; seed-1 runs that reused a sweep run: {len(made) - len(trained)})"
              + (f"; {resumed} runs resumed from a checkpoint (or, recorded before `started_at_step`, ran "
                 "with --resume) count only their time after resuming" if resumed else ""), ""]
    return "\n".join(lines), summary


def _plot(main: list[dict], across: str, panels: str, path: Path) -> None:
    plt = pyplot()
    task = main[0]["task"]
    order = [d for d, _ in DIFFICULTIES[task]]
    panel_values = sorted({r[panels] for r in main}, key=order.index if panels == "difficulty" else None)
    xs = sorted({r[across] for r in main}, key=order.index if across == "difficulty" else None)
    models = sorted({r["model"] for r in main}, key=MODELS.index)
    fig, axes = plt.subplots(1, len(panel_values), figsize=(4.2 * len(panel_values), 3.6), squeeze=False, sharey=True)
    for ax, pv in zip(axes[0], panel_values):
        for m in models:
            pts = []
            for i, x in enumerate(xs):
                accs = [r["test"]["accuracy"] for r in main if r["model"] == m and r[across] == x and r[panels] == pv]
                if accs:
                    mean, half = mean_ci(accs)
                    pts.append((i, mean, half or 0.0))
            if pts:
                i, mean, half = zip(*pts)
                style = "--" if m in ("gpt", "mamba") else "-"
                ax.errorbar(i, mean, yerr=half, label=m, marker="o", ms=3, capsize=2, linestyle=style)
        ax.set_xticks(range(len(xs)), [str(x) for x in xs])
        ax.set_title(f"{panels} {pv}")
        ax.set_xlabel(across)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (mean ± 95% CI over seeds)")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: never over a run
    fig.suptitle(f"{task}: accuracy against {across}")
    fig.tight_layout()
    save_figure(fig, path)


def _symlog(ax, smallest: float) -> None:
    """An error-rate axis: symlog, linear below the decade of ``smallest`` (> 0), so 0 errors sits at 0."""
    ax.set_yscale("symlog", linthresh=10 ** math.floor(math.log10(smallest)))


def _plot_seeds(main: list[dict], path: Path) -> None:
    """One panel per difficulty, one column per (width, model): each run's test accuracy with its
    Wilson 95% interval, coloured by seed, and the runs of one seed and width joined, as the paired
    comparisons pair them. Where seeds disagree (one left on a plateau) this shows what a mean hides.
    Near the top (every run ≥ ``ERROR_AXIS``, 90%) a 0–1 accuracy axis cannot show a difference of a few
    errors in 10⁴, so the panels show the error rate 1 − a instead, on a symlog axis (linear below the
    decade of the smallest upper error bound, so a run with no error sits at 0), with the interval [1 − hi, 1 − lo]."""
    plt = pyplot()
    task = main[0]["task"]
    order = [d for d, _ in DIFFICULTIES[task]]
    difficulties = sorted({r["difficulty"] for r in main}, key=order.index)
    columns = sorted({(r["width"], r["model"]) for r in main}, key=lambda c: (c[0], MODELS.index(c[1])))
    seeds = sorted({r["seed"] for r in main})
    errors = min(r["test"]["accuracy"] for r in main) >= ERROR_AXIS  # plot 1 − accuracy (see above)
    fig, axes = plt.subplots(1, len(difficulties), figsize=(max(5.4, 0.8 * len(columns) + 1.6) * len(difficulties), 3.8),
                             squeeze=False, sharey=True)
    for ax, d in zip(axes[0], difficulties):
        for k, s in enumerate(seeds):
            for w in sorted({c[0] for c in columns}):
                pts = [(columns.index((w, r["model"])) + 0.08 * (k - (len(seeds) - 1) / 2), r["test"])
                       for r in main if r["difficulty"] == d and r["seed"] == s and r["width"] == w]
                pts.sort(key=lambda p: p[0])
                if not pts:
                    continue
                x, tests = zip(*pts)
                acc = [t["accuracy"] for t in tests]
                lo, hi = [t["wilson95"][0] for t in tests], [t["wilson95"][1] for t in tests]
                if errors:
                    acc, lo, hi = [1 - a for a in acc], [1 - h for h in hi], [1 - l for l in lo]
                err = [[max(0.0, a - l) for a, l in zip(acc, lo)],  # ≥ 0: float rounding at 0 and 1
                       [max(0.0, h - a) for a, h in zip(acc, hi)]]
                ax.errorbar(x, acc, yerr=err, color=f"C{k}", marker="o", ms=4, capsize=2, lw=0.8, alpha=0.8,
                            label=f"seed {s}" if w == columns[0][0] else None)
        ax.set_xticks(range(len(columns)), [f"{m}\nw{w}" for w, m in columns], fontsize=7)
        ax.set_xlim(-0.5, len(columns) - 0.5)
        ax.set_title(f"difficulty {d}")
        if errors:
            upper = min(1 - r["test"]["wilson95"][0] for r in main)  # > 0: the Wilson interval never reaches 1
            _symlog(ax, upper)
            ax.set_ylim(0, 2 * max(1 - r["test"]["wilson95"][0] for r in main))  # shared y: room above every run
        else:
            ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"test {'error rate, 1 − accuracy' if errors else 'accuracy'} (each run, Wilson 95%)")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: never over a run
    fig.suptitle(f"{task}: every run (a line joins one seed's runs at one width)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def _plot_curves(trained: list[dict], path: Path) -> None:
    """Val accuracy against training step of every trained model that records it (``val_curve``),
    one panel per training set (a difficulty, or the mixture), a colour per model: whether a run left
    a plateau, and when, which the final accuracies alone do not show. Where every run ends at or
    above ``ERROR_AXIS`` the panels show the val error rate 100 − accuracy (%) on a symlog axis (linear
    below the decade of the smallest error > 0, so a run with none sits at 0): on an accuracy axis the
    last steps, where the runs differ by a few errors in 10⁴, are one line."""
    plt = pyplot()
    labels = sorted({r["difficulty"] for r in trained})
    models = sorted({r["model"] for r in trained}, key=MODELS.index)
    errors = min(r["val_curve"][-1][1] for r in trained) >= ERROR_AXIS
    fig, axes = plt.subplots(1, len(labels), figsize=(5.4 * len(labels), 3.8), squeeze=False, sharey=True)
    for ax, label in zip(axes[0], labels):
        for r in sorted((r for r in trained if r["difficulty"] == label), key=lambda r: (r["model"], r["width"], r["seed"])):
            steps, acc = zip(*r["val_curve"])
            y = [100 * (1 - a) if errors else 100 * a for a in acc]
            ax.plot(steps, y, color=f"C{models.index(r['model'])}", lw=0.9, alpha=0.75, marker=".", ms=3)
        ax.set_title(f"trained on {label}")
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    if errors:
        smallest = min((100 * (1 - a) for r in trained for _, a in r["val_curve"] if a < 1), default=1.0)
        _symlog(axes[0][0], smallest)
        axes[0][0].set_ylim(0, 100)
    for c, m in enumerate(models):
        axes[0][0].plot([], [], color=f"C{c}", label=m)
    axes[0][0].set_ylabel(f"val {'error rate, 100 − accuracy' if errors else 'accuracy'} % (each run)")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: never over a run
    fig.suptitle(f"{trained[0]['task']}: val {'error rate' if errors else 'accuracy'} during training, "
                 f"{len(trained)} runs", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def _ranges(values: list[int]) -> str:
    """[1, 2, 3, 5] -> "1-3, 5"."""
    spans: list[list[int]] = []
    for v in values:
        if spans and v == spans[-1][1] + 1:
            spans[-1][1] = v
        else:
            spans.append([v, v])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans)


def parse_seeds(text: str) -> range:
    """``"4-13"`` -> seeds 4..13 (a confirmatory analysis on seeds fixed in advance, docs/tasks.md)."""
    lo, sep, hi = text.partition("-")
    if not (lo.isdigit() and hi.isdigit() and sep) or not 1 <= int(lo) <= int(hi):
        raise ValueError(f"--seeds must be a range of seeds like 4-13, got {text!r}")
    return range(int(lo), int(hi) + 1)


def render(out: str | Path, seeds: range | None = None) -> list[Path]:
    """Write ``report.md``, ``summary.json`` and the plots of the bench folder ``out``. With
    ``seeds``, only those seeds' runs (the sweep table stays whole): ``report_seeds<A>-<B>.md`` and
    ``summary_seeds<A>-<B>.json``, the folder's own report untouched."""
    out = Path(out)
    main, sweep = load(out)
    tag, note = "", {}
    if seeds is not None:
        have = sorted({r["seed"] for r in main})
        main = [r for r in main if r["seed"] in seeds]
        if not main:
            raise ValueError(f"{out}/runs holds no test results of seeds {seeds.start}-{seeds.stop - 1}")
        if absent := [s for s in seeds if s not in have]:
            raise ValueError(f"--seeds {seeds.start}-{seeds.stop - 1}: {out}/runs has no test results of seed "
                             f"{absent[0]} (seeds there: {_ranges(have)}); pass a range of seeds it holds")
        tag, note = f"_seeds{seeds.start}-{seeds.stop - 1}", {"seeds": list(seeds)}
    text, summary = markdown(main, sweep)
    if note:
        text = text.replace("\n## ", f"\n(Seeds {seeds.start}–{seeds.stop - 1} only.)\n\n## ", 1)
    paths = [out / f"report{tag}.md", out / f"summary{tag}.json"]
    atomic_write(paths[0], text)
    atomic_write(paths[1], json.dumps({"task": (main or sweep)[0]["task"], **note, "comparisons": summary}, indent=1) + "\n")
    if main and not note:  # the plots belong to the folder's own report
        for across, panels, name in (("difficulty", "width", "accuracy_vs_difficulty.png"),
                                     ("width", "difficulty", "accuracy_vs_width.png")):
            _plot(main, across, panels, out / name)
            paths.append(out / name)
        _plot_seeds(main, out / "accuracy_by_seed.png")
        paths.append(out / "accuracy_by_seed.png")
        trained = {r.get("trained_on") or r["run"]: r for r in main if r.get("val_curve")}  # a mixture run once
        if trained:
            _plot_curves([{**r, "difficulty": r["trained_on"].split("/")[0] if r.get("trained_on") else r["difficulty"]}
                          for r in trained.values()], out / "val_by_step.png")
            paths.append(out / "val_by_step.png")
    return paths
