"""Summarise a grid of runs (``RUNS/ARM/seed-S/summary.json``, made by ``phaselm report run``) into a table:
final val (and test) perplexity per arm, mean ± 95% t-interval over seeds, and the difference to the
reference arm (``--baseline``, default ``baseline``): of the means, and paired by seed (the same
seed draws the same training batches in every arm, so the paired difference removes the data-order
part of the seed noise), and the largest loss spike of any seed (the
rise of the logged train loss above the lowest value logged before it; a smoothly trained run has
a value near 0, a run that destabilises a large one).

    phaselm report grid results/phasegpt/runs --exclude phase_b [--out results/phasegpt/table.md]
    phaselm report grid results/pma/runs --baseline tiny --plots results/pma

``--plots DIR`` also draws ``DIR/val_curves.png`` (val loss against iteration, mean over seeds per
arm) and ``DIR/r_curves.png`` (the logged order parameter ``layer{L}.R_mean`` of every phase layer
against iteration, mean over seeds, one panel per arm that has one).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from phaselm.utils import atomic_write, pyplot, save_figure

# two-sided 95% Student t critical values by degrees of freedom
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def mean_ci(values: list[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95% t-interval (None for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, _T95.get(n - 1, 1.96) * sd / math.sqrt(n)


def collect(root: Path, exclude: tuple[str, ...] = ()) -> dict[str, list[dict]]:
    """The summaries of every ``ARM/seed-S/`` under ``root``, by arm; arms under an ``exclude`` prefix are left out."""
    arms: dict[str, list[dict]] = {}
    for summary in sorted(root.glob("**/seed-*/summary.json")):
        arm = summary.parent.parent.relative_to(root).as_posix()
        if any(arm == e or arm.startswith(e.rstrip("/") + "/") for e in exclude):
            continue
        arms.setdefault(arm, []).append({**json.loads(summary.read_text()), "run": summary.parent.name})
    return arms


def ci_text(values: list[float], spec: str = ".3f", half_spec: str | None = None, single: str = " (1 seed)") -> str:
    """``mean ± half-width`` of the 95% t-interval, or ``mean`` + ``single`` for one value."""
    mean, half = mean_ci(values)
    return f"{mean:{spec}}{single}" if half is None else f"{mean:{spec}} ± {half:{half_spec or spec}}"


def paired_deltas(runs: list[dict], base_runs: list[dict]) -> list[float]:
    """Relative differences in final val PPL to the baseline run of the *same seed* (the trainer draws
    the same batches for the same seed), one per seed both have."""
    base = {r["run"]: r["final_val_ppl"] for r in base_runs}
    return [r["final_val_ppl"] / base[r["run"]] - 1 for r in runs if r["run"] in base]


def table(root: Path, baseline: str = "baseline", exclude: tuple[str, ...] = ()) -> str:
    arms = collect(root, exclude)
    base = [r["final_val_ppl"] for r in arms.get(baseline, [])]
    base_mean = sum(base) / len(base) if base else None
    lines = [f"| arm | seeds | final val PPL (mean ± 95% CI) | Δ vs {baseline} | paired Δ (same seeds, 95% CI) | test PPL (mean ± 95% CI) | per seed (val) | largest loss spike |",
             "|---|---:|---|---|---|---|---|---:|"]
    for arm, runs in sorted(arms.items(), key=lambda kv: (kv[0] != baseline, kv[0])):
        ppl = [r["final_val_ppl"] for r in runs]
        mean = sum(ppl) / len(ppl)
        delta = f"{mean / base_mean - 1:+.1%}" if base_mean and arm != baseline else "–"
        diffs = paired_deltas(runs, arms.get(baseline, [])) if arm != baseline else []
        paired = f"{ci_text(diffs, '+.1%', '.1%', '')} (n={len(diffs)})" if diffs else "–"
        tests = [r["final_test_ppl"] for r in runs if "final_test_ppl" in r]
        test = ci_text(tests) if len(tests) == len(runs) else "–"
        spikes = [r["loss_spike"] for r in runs if "loss_spike" in r]
        spike = f"{max(spikes):.3f}" if spikes else "–"
        lines.append(f"| {arm} | {len(runs)} | {ci_text(ppl)} | {delta} | {paired} | {test} | {', '.join(f'{p:.3f}' for p in ppl)} | {spike} |")
    return "\n".join(lines) + "\n"


def _mean_curve(runs: list[dict], key: str, layer: str | None = None) -> dict[int, float]:
    """Mean over seeds, per iteration, of a curve in the runs' ``summary.json``: ``val_loss``, or
    ``R`` of ``layer``."""
    sums: dict[int, list[float]] = {}
    for run in runs:
        points = run.get("curves", {}).get(key, {} if layer else [])
        for it, value in (points.get(layer, []) if layer else points):
            sums.setdefault(it, []).append(value)
    return {it: sum(v) / len(v) for it, v in sorted(sums.items())}


def plots(root: Path, out: Path, exclude: tuple[str, ...] = ()) -> None:
    """``out/val_curves.png`` and (when any arm has phase layers) ``out/r_curves.png``."""
    plt = pyplot()
    arms = dict(sorted(collect(root, exclude).items()))
    fig, ax = plt.subplots(figsize=(8, 5))
    for arm, runs in arms.items():
        curve = _mean_curve(runs, "val_loss")
        ax.plot(list(curve), list(curve.values()), "o-", ms=3, label=arm)
    ax.set_xlabel("iteration")
    ax.set_ylabel("val loss (nats/token), mean over seeds")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / "val_curves.png")
    with_r = {arm: sorted(runs[0].get("curves", {}).get("R", {}), key=lambda k: int(k[5:]))
              for arm, runs in arms.items() if runs[0].get("curves", {}).get("R")}
    if not with_r:
        return
    cols = min(4, len(with_r))
    rows = -(-len(with_r) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(with_r):]:
        ax.set_visible(False)
    for ax, (arm, layers) in zip(axes.flat, with_r.items()):
        for layer in layers:
            curve = _mean_curve(arms[arm], "R", layer)
            ax.plot(list(curve), list(curve.values()), label=layer)
        ax.set_title(arm, fontsize=9)
        ax.set_ylim(0, 1)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for row in axes:
        row[0].set_ylabel("R (mean over heads, batch, tokens)")
    fig.tight_layout()
    save_figure(fig, out / "r_curves.png")


def report(runs: str | Path, out: str | Path | None = None, baseline: str = "baseline",
           plot_dir: str | Path | None = None, exclude: tuple[str, ...] = ()) -> str:
    """The markdown table (also written to ``out``), and the plots in ``plot_dir``."""
    runs = Path(runs)
    if not runs.is_dir() or not collect(runs, exclude):
        raise ValueError(f"{runs} holds no summarised runs (expected RUNS/ARM/seed-S/summary.json from phaselm report run)")
    text = table(runs, baseline, exclude)
    if plot_dir:
        Path(plot_dir).mkdir(parents=True, exist_ok=True)
        plots(runs, Path(plot_dir), exclude)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, text)
    return text
