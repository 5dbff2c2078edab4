"""PhaseGPT Phase B: the preregistered criteria, each answered yes / no from the committed runs.

    python -m phaselm.evaluation.phase_b_criteria results/phasegpt/runs/phase_b [--out results/phasegpt/phase_b.md]

For every arm other than ``baseline`` (each ``ARM/seed-S/`` made by ``run_report``):

1. perplexity: mean final val PPL ≤ 1.05 × the baseline's mean;
2. synchrony: the final logged R of every phase layer (mean over seeds) lies in [0.35, 0.55];
3. stability: the variance of the final val PPL over seeds is lower than the baseline's.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from phaselm.evaluation.grid_report import collect

PPL_FACTOR = 1.05
R_BAND = (0.35, 0.55)


def final_r(run_dir: Path) -> dict[str, float]:
    """The last logged ``layer{L}.R_mean`` of each phase layer in ``run_dir/metrics.jsonl``."""
    last: dict[str, float] = {}
    for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()):
        last.update({k: v for k, v in row.items() if k.startswith("layer") and k.endswith(".R_mean")})
    return last


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
        for seed_dir in sorted((root / arm).glob("seed-*")):
            for layer, r in final_r(seed_dir).items():
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    text = markdown(criteria(Path(args.runs)))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
