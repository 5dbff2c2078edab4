"""Summarise a grid of runs (``RUNS/ARM/seed-S/summary.json``, made by ``run_report``) into a table:
final val (and test) perplexity per arm, mean ± 95% t-interval over seeds, and the difference to the
reference arm (``--baseline``, default ``baseline``).

    python -m phaselm.evaluation.grid_report results/phasegpt/runs [--out results/phasegpt/table.md]
    python -m phaselm.evaluation.grid_report results/pma/runs --baseline tiny
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

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


def collect(root: Path) -> dict[str, list[dict]]:
    arms: dict[str, list[dict]] = {}
    for summary in sorted(root.glob("**/seed-*/summary.json")):
        arm = str(summary.parent.parent.relative_to(root))
        arms.setdefault(arm, []).append(json.loads(summary.read_text()))
    return arms


def table(root: Path, baseline: str = "baseline") -> str:
    arms = collect(root)
    base = [r["final_val_ppl"] for r in arms.get(baseline, [])]
    base_mean = sum(base) / len(base) if base else None
    lines = [f"| arm | seeds | final val PPL (mean ± 95% CI) | Δ vs {baseline} | test PPL (mean ± 95% CI) | per seed (val) |",
             "|---|---:|---|---|---|---|"]
    for arm, runs in sorted(arms.items(), key=lambda kv: (kv[0] != baseline, kv[0])):
        ppl = [r["final_val_ppl"] for r in runs]
        mean, half = mean_ci(ppl)
        ci = f"{mean:.3f} ± {half:.3f}" if half is not None else f"{mean:.3f} (1 seed)"
        delta = f"{mean / base_mean - 1:+.1%}" if base_mean and arm != baseline else "–"
        tests = [r["final_test_ppl"] for r in runs if "final_test_ppl" in r]
        test = "–"
        if len(tests) == len(runs):
            t_mean, t_half = mean_ci(tests)
            test = f"{t_mean:.3f} ± {t_half:.3f}" if t_half is not None else f"{t_mean:.3f} (1 seed)"
        lines.append(f"| {arm} | {len(runs)} | {ci} | {delta} | {test} | {', '.join(f'{p:.3f}' for p in ppl)} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs")
    ap.add_argument("--out", default=None)
    ap.add_argument("--baseline", default="baseline", help="the arm the Δ column compares with")
    args = ap.parse_args()
    text = table(Path(args.runs), args.baseline)
    if args.out:
        Path(args.out).write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
