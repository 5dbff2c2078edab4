"""PhaseGPT Phase B: the preregistered criteria, each answered yes / no from the committed runs.

    phaselm report criteria results/phasegpt/runs/phase_b [--out results/phasegpt/phase_b.md]

For every arm other than ``baseline`` (each ``ARM/seed-S/summary.json`` made by ``phaselm report run``):

1. perplexity: mean final val PPL ≤ 1.05 × the baseline's mean;
2. synchrony: the final logged R of every phase layer (mean over seeds) lies in [0.35, 0.55];
3. stability: the variance of the final val PPL over seeds is lower than the baseline's.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from phaselm.evaluation.grid_report import collect

PPL_FACTOR = 1.05
R_BAND = (0.35, 0.55)


def final_r(summary: dict) -> dict[str, float]:
    """The last logged R of each phase layer (``layer{L}``) in a run's ``summary.json`` curves."""
    return {layer: points[-1][1] for layer, points in summary.get("curves", {}).get("R", {}).items() if points}


def criteria(root: Path) -> dict[str, dict]:
    arms = collect(root)
    if "baseline" not in arms:
        raise ValueError(f"{root} has no baseline arm (expected {root}/baseline/seed-*/summary.json)")
    base = [r["final_val_ppl"] for r in arms["baseline"]]
    base_var = statistics.variance(base) if len(base) > 1 else None
    out = {}
    for arm, runs in sorted(arms.items()):
        if arm == "baseline":
            continue
        ppl = [r["final_val_ppl"] for r in runs]
        rs: dict[str, list[float]] = {}
        for run in runs:
            for layer, r in final_r(run).items():
                rs.setdefault(layer, []).append(r)
        r_mean = {k: sum(v) / len(v) for k, v in rs.items()}
        var = statistics.variance(ppl) if len(ppl) > 1 else None
        out[arm] = {
            "seeds": len(ppl), "val_ppl_mean": sum(ppl) / len(ppl), "baseline_val_ppl_mean": sum(base) / len(base),
            "ppl_ok": sum(ppl) / len(ppl) <= PPL_FACTOR * sum(base) / len(base),
            "final_R": r_mean, "R_ok": bool(r_mean) and all(R_BAND[0] <= r <= R_BAND[1] for r in r_mean.values()),
            "val_ppl_variance": var, "baseline_val_ppl_variance": base_var,
            "variance_ok": None if var is None or base_var is None else var < base_var,
        }
    return out


def markdown(result: dict[str, dict]) -> str:
    def yn(v):
        return "n/a (needs ≥ 2 seeds)" if v is None else ("**yes**" if v else "**no**")

    lines = [f"| arm | seeds | val PPL ≤ {PPL_FACTOR} × baseline | R in [{R_BAND[0]}, {R_BAND[1]}] | lower variance |",
             "|---|---:|---|---|---|"]
    for arm, c in result.items():
        r = ", ".join(f"{k.split('.')[0]} {v:.2f}" for k, v in c["final_R"].items()) or "no phase layer"
        var = "–" if c["val_ppl_variance"] is None else f"{c['val_ppl_variance']:.2e} vs {c['baseline_val_ppl_variance']:.2e}"
        lines.append(f"| {arm} | {c['seeds']} | {yn(c['ppl_ok'])} ({c['val_ppl_mean']:.3f} vs "
                     f"{c['baseline_val_ppl_mean']:.3f}) | {yn(c['R_ok'])} ({r}) | {yn(c['variance_ok'])} ({var}) |")
    return "\n".join(lines) + "\n"
