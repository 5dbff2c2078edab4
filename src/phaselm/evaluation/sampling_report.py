"""Markdown report and frontier plot for ``phaselm bench sampling`` results (the JSON dict)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def _fmt(s: dict | None, digits: int = 3) -> str:
    if not s or s.get("mean") is None:
        return "–"
    lo, hi = s["ci95"]
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _distinct_rows(res: dict) -> list[dict]:
    """Matched-diversity rows, one per distinct setting (a setting can appear under two names)."""
    return list({r["describe"]: r for r in reversed(res["matched_diversity"])}.values())[::-1]


def verdict(res: dict) -> str:
    rows = [r for r in _distinct_rows(res) if r["relative_difference"] is not None]
    sanity = res.get("sanity") or {}
    lines = []
    if not rows:
        lines.append("No Phase-Slip point fell inside the diversity range of the standard-sampling curve, "
                     "so no matched-diversity comparison could be made.")
    else:
        better = [r for r in rows if r["ci95"][1] is not None and r["ci95"][1] < 0]
        worse = [r for r in rows if r["ci95"][0] is not None and r["ci95"][0] > 0]
        lines.append(
            f"At matched diversity (unique-word ratio), {len(better)} of {len(rows)} distinct Phase-Slip settings have a "
            f"perplexity significantly below standard sampling's curve, {len(worse)} significantly above, and "
            f"{len(rows) - len(better) - len(worse)} are indistinguishable (95% bootstrap CI includes 0); with "
            f"{len(rows)} comparisons at 95% and no correction, about {len(rows) / 20:.1f} would fall outside by chance."
        )
        default = next((r for r in rows if r["method"] == "phase_slip"), None)
        if default:
            lo, hi = default["ci95"]
            ci = f" (95% CI {lo:+.1%} to {hi:+.1%})" if lo is not None else ""
            lines.append(f"The published default (noise 0.03 rad, T 0.65) differs by "
                         f"{default['relative_difference']:+.1%}{ci}.")
    if sanity:
        lines.append("Sanity check: Phase-Slip with noise 0 " + ("reproduces" if sanity["noise0_equals_standard_matched"]
                     else "does NOT reproduce") + " temperature-matched standard sampling token for token "
                     f"({sanity['generations_compared']} generations).")
    return " ".join(lines)


def write_markdown(res: dict, path: Path, command: str) -> None:
    cfg, prov = res["config"], res["provenance"]
    out = [f"# Sampling benchmark: {res['model']}", "",
           f"Command: `{command}`  ",
           f"Commit `{prov['commit']}`{' (dirty)' if prov['dirty'] else ''}, {prov['machine']}, device {prov['device']}, "
           f"torch {prov['torch']}, transformers {prov['transformers']}; wall time {res['wall_seconds'] / 60:.1f} min.  ",
           f"Prompts: {len(cfg['prompts'])} × {cfg['rounds']} rounds × {cfg['max_new_tokens']} new tokens; "
           f"seed of a generation = prompt_index·1000 + round (same seeds for every method). "
           f"Phase-Slip heads (calibrated): {res['heads']}.", "",
           "## Verdict", "", verdict(res), "", "![frontier](frontier.png)", ""]
    metrics = [m for m in ("unique_word_ratio", "perplexity", "distinct_2", "distinct_4", "self_bleu", "repetition_rate",
                           "judge_perplexity") if any(m in r for r in res["results"].values())]
    out += ["## All methods (mean ± std [95% bootstrap CI])", "",
            "| method | " + " | ".join(metrics) + " | tok/s |", "|---|" + "---|" * (len(metrics) + 1)]
    for name, r in res["results"].items():
        tps = r.get("tokens_per_second")
        out.append(f"| `{name}` {r['describe']} | " + " | ".join(_fmt(r.get(m)) for m in metrics)
                   + (f" | {tps:.1f} |" if tps else " | – |"))
    speed = res["speed"]["phase_slip_over_standard_matched"]
    if speed:
        out += ["", f"Speed in this run (batch {res['speed']['batch_size']}): Phase-Slip / temperature-matched "
                    f"standard = {speed:.2f}."]
    out += ["", "## Perplexity at matched diversity", "",
            "Phase-Slip points against the standard-sampling temperature curve, interpolated in log perplexity at "
            "the same mean unique-word ratio (bootstrap over generations, 1000 resamples).", "",
            "| Phase-Slip setting | diversity | PPL | standard PPL at same diversity | difference [95% CI] |",
            "|---|---|---|---|---|"]
    for r in _distinct_rows(res):
        if r["relative_difference"] is None:
            out.append(f"| {r['describe']} | {r['diversity']:.3f} | {r['perplexity']:.2f} | outside the curve | – |")
        else:
            lo, hi = r["ci95"]
            ci = f"[{lo:+.1%}, {hi:+.1%}]" if lo is not None else "–"
            out.append(f"| {r['describe']} | {r['diversity']:.3f} | {r['perplexity']:.2f} | "
                       f"{r['standard_perplexity_at_same_diversity']:.2f} | {r['relative_difference']:+.1%} {ci} |")
    human = res.get("human_reference")
    if human:
        out += ["", "## Human reference", "",
                f"{human['passages']} passages ({', '.join(human['sources'])}): first {cfg['human_prompt_tokens']} tokens "
                f"as prompt, the next {cfg['max_new_tokens']} as the human continuation. Human-text perplexity under the "
                f"model: {_fmt(human['human_perplexity'], 2)}. Distance = |log(mean PPL / human mean PPL)| (0 is human-like). "
                "MAUVE uses the model's final hidden state at the last token as features (no featurizer can be "
                "downloaded here); with this few samples it is a coarse signal.", "",
                "| method | PPL | PPL / human | distance | MAUVE |", "|---|---|---|---|---|"]
        for name, e in human["methods"].items():
            m = e.get("mauve")
            out.append(f"| `{name}` | {_fmt(e['perplexity'], 2)} | {e['ppl_ratio_to_human']:.2f} | "
                       f"{e.get('human_ppl_distance', float('nan')):.3f} | {'–' if m is None else f'{m:.3f}'} |")
    out += ["", "## Published table (GPT-2 small, T 0.8 standard vs T 0.65 Phase-Slip: confounded by temperature)", "",
            "| method | diversity | perplexity | tok/s |", "|---|---|---|---|"]
    for name, (d, p, t) in res["published_table"].items():
        ours = res["results"].get(name, {})
        mine = f" (here: {ours['unique_word_ratio']['mean']:.2f} / {ours['perplexity']['mean']:.2f})" \
            if ours.get("unique_word_ratio") and ours.get("perplexity") else ""
        out.append(f"| {name} | {d} | {p} | {t} |{mine}")
    out += ["", "Metric definitions: `docs/sampling_benchmark.md`. Every number: `results.json`."]
    _atomic_write(path, "\n".join(out) + "\n")


def plot_frontier(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    results = res["results"]
    for ax, xkey, xlabel in ((axes[0], "unique_word_ratio", "diversity: unique-word ratio per text (published)"),
                             (axes[1], "distinct_2", "diversity: distinct-2 across samples of a prompt")):
        for label, names in res["curves"].items():
            pts = [(results[n][xkey]["mean"], results[n]["perplexity"]) for n in names
                   if results[n].get(xkey) and results[n].get("perplexity")]
            if not pts:
                continue
            pts.sort(key=lambda p: p[0])
            xs = [p[0] for p in pts]
            ys = [p[1]["mean"] for p in pts]
            lo = [p[1]["ci95"][0] for p in pts]
            hi = [p[1]["ci95"][1] for p in pts]
            line, = ax.plot(xs, ys, "o-", label=label, ms=4)
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
        for name, marker in (("greedy", "s"), ("standard_published", "^"), ("min_p", "D"), ("phase_slip", "*")):
            r = results.get(name)
            if r and r.get(xkey) and r.get("perplexity"):
                ax.errorbar(r[xkey]["mean"], r["perplexity"]["mean"],
                            yerr=[[r["perplexity"]["mean"] - r["perplexity"]["ci95"][0]],
                                  [r["perplexity"]["ci95"][1] - r["perplexity"]["mean"]]],
                            fmt=marker, color="k", ms=8 if marker == "*" else 6, label=name, capsize=3)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("perplexity of generated tokens (generating model)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"Diversity vs perplexity, {res['model']} (bands: 95% bootstrap CI of perplexity)")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_all(res: dict, out_dir: str | Path, command: str) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    res = dict(res, command=command)
    _atomic_write(out_dir / "results.json", json.dumps(res, indent=1, default=float))
    write_markdown(res, out_dir / "report.md", command)
    plot_frontier(res, out_dir / "frontier.png")
    return [out_dir / "results.json", out_dir / "report.md", out_dir / "frontier.png"]


if __name__ == "__main__":  # re-render report.md and frontier.png from a results.json
    import sys

    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "results/sampling")
    data = json.loads((folder / "results.json").read_text())
    write_markdown(data, folder / "report.md", data["command"])
    plot_frontier(data, folder / "frontier.png")
    print(f"re-rendered {folder / 'report.md'} and {folder / 'frontier.png'}")
