"""Markdown report and frontier plot for ``phaselm bench sampling`` results (the JSON dict).

:func:`write_all` never drops what earlier commands wrote into the same folder: rows of
``OUT/results.json`` that the new run lacks (methods, their comparisons, curve points) are kept, keyed
by method name (:func:`merge_earlier`), when both runs have the same setup (:func:`setup_mismatch`).
"""

from __future__ import annotations

import json
from pathlib import Path

from phaselm.utils import atomic_write, pyplot, save_figure


def _fmt(s: dict | None, digits: int = 3) -> str:
    if not s or s.get("mean") is None:
        return "–"
    lo, hi = s["ci95"]
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _pct(x) -> str:
    return "–" if x is None else f"{x:+.1%}"


def _ci(e: dict) -> str:
    lo, hi = e["ci95"]
    return "–" if lo is None else f"[{lo:+.1%}, {hi:+.1%}]"


def _mde(e: dict) -> str:
    return "–" if e.get("mde") is None else f"±{e['mde']:.1%}"


def _call(e: dict) -> str:
    """The verdict of one comparison, with its power."""
    if e.get("outside_curve"):
        return "outside the standard curve's range"
    if e.get("difference") is None or e["ci95"][0] is None:
        return "no interval"
    lo, hi = e["ci95"]
    if hi < 0:
        return "significantly lower"
    if lo > 0:
        return "significantly higher"
    return f"no difference detected (80% power for effects of {_mde(e)})"


def _measure_name(res: dict, key: str) -> str:
    return {"entropy": "mean next-token entropy", "distinct_2": "distinct-2", "self_bleu": "self-BLEU",
            "unique_word_ratio": "unique-word ratio"}.get(key, key)


def verdict(res: dict) -> str:
    rows = res.get("comparisons") or []
    primary = res.get("primary_diversity", "entropy")
    sanity = res.get("sanity") or {}
    lines = []
    order = (res.get("config") or {}).get("headline") or []
    heads = sorted([r for r in rows if r.get("headline")], key=lambda r: order.index(r["method"])) \
        or [r for r in rows if r["method"] == "phase_slip"]
    if not rows:
        lines.append("No method could be compared with the standard-sampling curve.")
    for r in heads:
        e = r["matched"].get(primary)
        if e is None:
            continue
        txt = (f"{r['describe']} vs standard sampling at the same {_measure_name(res, primary)} (primary): perplexity "
               f"{_pct(e['difference'])} {_ci(e)}, minimum detectable effect {_mde(e)}: {_call(e)}.")
        st = r.get("same_temperature")
        if st:
            txt += (f" Against standard sampling at the same temperature: {_pct(st['difference'])} {_ci(st)}, "
                    f"MDE {_mde(st)}.")
        lines.append(txt)
    others = [r for r in rows if r not in heads]
    if others:
        sig = [r for r in others if (r["matched"].get(primary) or {}).get("significant")]
        lines.append(f"Other settings at matched {_measure_name(res, primary)}: {len(sig)} of {len(others)} differ "
                     f"significantly (about {len(others) / 20:.1f} would by chance at 95% without correction).")
    changed = res.get("default_changed_tokens")
    if changed:
        lines.append(f"The published default changed the tokens of {changed['generations_differing']} of "
                     f"{changed['generations_compared']} generations relative to standard sampling at T 0.65 (same seeds).")
    if sanity:
        lines.append("Sanity check: Phase-Slip with noise 0 " + ("reproduces" if sanity["noise0_equals_standard_matched"]
                     else "does NOT reproduce") + " temperature-matched standard sampling token for token "
                     f"({sanity['generations_compared']} generations).")
    return " ".join(lines)


def _kept_lines(res: dict) -> list[str]:
    """The report's note on rows kept from earlier commands into the folder (:func:`merge_earlier`)."""
    kept = res.get("kept_from_earlier")
    if not kept:
        return []
    methods = ", ".join(f"`{m}`" for m in kept["methods"])
    commands = "; ".join(f"`{c}`" for c in kept["commands"])
    return [f"Kept from earlier commands into this folder (same setup): {methods} ({commands}).", ""]


def write_markdown(res: dict, path: Path, command: str) -> None:
    cfg, prov = res["config"], res["provenance"]
    primary = res.get("primary_diversity", "entropy")
    out = [f"# Sampling benchmark: {res['model']}", "",
           f"Command: `{command}`  ",
           f"Commit `{prov['commit']}`{' (dirty)' if prov['dirty'] else ''}, {prov['machine']}"
           f"{' (' + prov['cpu'] + ', ' + str(prov['cores']) + ' cores)' if prov.get('cpu') else ''}, device {prov['device']}, "
           f"torch {prov['torch']}, transformers {prov['transformers']}; wall time {res['wall_seconds'] / 60:.1f} min"
           f"{' (this invocation; methods resumed from earlier ones: ' + ', '.join(res['resumed']) + ')' if res.get('resumed') else ''}.  ",
           f"Prompts: {len(cfg['prompts'])} ({cfg['protocol']} protocol) × {cfg['rounds']} rounds × "
           f"{cfg['max_new_tokens']} new tokens; seed of a generation = prompt_index·1000 + round (same seeds for every "
           f"method). Phase-Slip heads (calibrated): {res['heads']}.  ",
           f"Primary diversity measure (declared before the run): **{_measure_name(res, primary)}**. "
           f"Confidence intervals: 95%, bootstrap stratified by prompt ({cfg.get('n_boot', 2000)} draws; prompts with "
           f"replacement, then rounds within each drawn prompt, the same draws for every method). "
           f"MDE = minimum detectable effect = {res.get('mde_factor', 2.8)} × bootstrap SE (80% power, α = 0.05).", "",
           *_kept_lines(res),
           "## Verdict", "", verdict(res), "", "![comparisons](comparisons.png)", "", "![frontier](frontier.png)", ""]
    out += ["## Comparisons (perplexity difference, method / standard − 1)", "",
            "Matched: against the standard-sampling temperature curve interpolated (log perplexity) at the method's "
            "mean diversity on each measure. Same T: against standard sampling at the method's temperature.", "",
            "| method | measure | diversity | PPL | standard PPL at same diversity | difference [95% CI] | MDE | verdict |",
            "|---|---|---|---|---|---|---|---|"]
    for r in res.get("comparisons") or []:
        name = f"**`{r['method']}`**" if r.get("headline") else f"`{r['method']}`"
        for key, e in r["matched"].items():
            label = _measure_name(res, key) + (" (primary)" if key == primary else "")
            ref = e.get("standard_perplexity_at_same_diversity")
            out.append(f"| {name} {r['describe']} | {label} | {e['diversity']:.3f} | {r['perplexity']:.3f} | "
                       f"{'–' if ref is None else f'{ref:.3f}'} | {_pct(e['difference'])} {_ci(e)} | {_mde(e)} | {_call(e)} |")
        st = r.get("same_temperature")
        if st:
            out.append(f"| {name} {r['describe']} | same T (`{st['reference']}`) | – | {r['perplexity']:.3f} | "
                       f"{st['reference_perplexity']:.3f} | {_pct(st['difference'])} {_ci(st)} | {_mde(st)} | {_call(st)} |")
    metrics = [m for m in ("entropy", "perplexity", "distinct_2", "self_bleu", "unique_word_ratio", "repetition_rate",
                           "judge_perplexity") if any(m in r for r in res["results"].values())]
    out += ["", "## All methods (mean ± std [95% CI])", "",
            "| method | " + " | ".join(metrics) + " | tok/s | wall min |", "|---|" + "---|" * (len(metrics) + 2)]
    walls = res.get("method_wall_seconds") or {}
    for name, r in res["results"].items():
        tps = r.get("tokens_per_second")
        w = walls.get(name)
        out.append(f"| `{name}` {r['describe']} | " + " | ".join(_fmt(r.get(m)) for m in metrics)
                   + (f" | {tps:.1f}" if tps else " | –") + (f" | {w / 60:.1f} |" if w else " | – |"))
    speed = res["speed"]["phase_slip_over_standard_matched"]
    if speed:
        out += ["", f"Speed in this run (batch {res['speed']['batch_size']}): Phase-Slip / temperature-matched "
                    f"standard = {speed:.2f}."]
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
    atomic_write(path, "\n".join(out) + "\n")


def plot_frontier(res: dict, path: Path) -> None:
    import matplotlib.ticker

    plt = pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(18, 5.2))
    results = res["results"]
    primary = res.get("primary_diversity", "entropy")
    panels = (("entropy", "mean next-token entropy of the sampling distribution (nats)"),
              ("distinct_2", "distinct-2 across the samples of a prompt"),
              ("unique_word_ratio", "unique-word ratio per text (published)"))
    for ax, (xkey, xlabel) in zip(axes, panels):
        xlabel += " [primary]" if xkey == primary else ""
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
        marks = [("greedy", "s"), ("standard_published", "^"), ("min_p", "D"), ("phase_slip", "*"), ("dry", "v"),
                 ("xtc", "<"), ("top_nsigma", ">")]
        marks += [(r["method"], "P") for r in res.get("comparisons") or [] if r.get("headline")
                  and r["method"] not in dict(marks)]
        for name, marker in marks:
            r = results.get(name)
            if r and r.get(xkey) and r.get("perplexity"):
                ax.errorbar(r[xkey]["mean"], r["perplexity"]["mean"],
                            yerr=[[r["perplexity"]["mean"] - r["perplexity"]["ci95"][0]],
                                  [r["perplexity"]["ci95"][1] - r["perplexity"]["mean"]]],
                            fmt=marker, color="k", ms=8 if marker == "*" else 6, label=name, capsize=3)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("perplexity of generated tokens (generating model)")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"Diversity vs perplexity, {res['model']} (bands: 95% bootstrap CI of perplexity)")
    fig.tight_layout()
    save_figure(fig, path)


def plot_comparisons(res: dict, path: Path) -> None:
    """Forest plot: each comparison's perplexity difference with its 95% CI (bars) and ±MDE (grey)."""
    plt = pyplot()

    primary = res.get("primary_diversity", "entropy")
    items = []
    for r in res.get("comparisons") or []:
        for key, e in list(r["matched"].items()) + ([("same T", r["same_temperature"])] if r.get("same_temperature") else []):
            if e.get("difference") is None or e["ci95"][0] is None:
                continue
            label = "same temperature" if key == "same T" else "matched " + _measure_name(res, key)
            items.append((f"{r['method']}: {label}" + (" [primary]" if key == primary else ""), e, r.get("headline")))
    fig, ax = plt.subplots(figsize=(10, 0.42 * max(len(items), 2) + 1.2))
    for y, (label, e, head) in enumerate(reversed(items)):
        d, (lo, hi), mde = e["difference"] * 100, e["ci95"], e.get("mde")
        if mde:
            ax.plot([-mde * 100, mde * 100], [y, y], color="0.85", lw=7, solid_capstyle="butt", zorder=1)
        ax.errorbar(d, y, xerr=[[d - lo * 100], [hi * 100 - d]], fmt="o", color="C3" if head else "C0", capsize=3, zorder=2)
    ax.axvline(0, color="k", lw=0.8)
    for x in (-5, 5):
        ax.axvline(x, color="k", lw=0.6, ls=":")
    ax.set_yticks(range(len(items)), [i[0] for i in reversed(items)], fontsize=7)
    ax.set_xlabel("perplexity vs standard sampling (%): 95% CI; grey: ±MDE (80% power); dotted: ±5%")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


SETUP_CONFIG = ("prompts", "rounds", "max_new_tokens", "batch_size", "metrics", "primary_diversity", "n_boot")
"""The config fields two runs must share for their rows to sit in one report (besides model, judge and heads)."""


def setup_mismatch(old: dict, config: dict, model: str, judge: str | None = None, heads=None) -> str | None:
    """Why the rows of ``old`` (a results dict) cannot be merged with a run of ``config`` on ``model``
    (the first differing field, e.g. ``"rounds (4 there, 1 here)"``), or ``None``. ``heads=None``: not
    compared (known only after calibration)."""
    ours = {"model": model, "judge": judge, **{k: config.get(k) for k in SETUP_CONFIG}}
    theirs = {"model": old.get("model"), "judge": old.get("judge"), **{k: (old.get("config") or {}).get(k)
                                                                        for k in SETUP_CONFIG}}
    if heads is not None:
        ours["heads"], theirs["heads"] = [list(h) for h in heads], old.get("heads")
    for key, value in ours.items():
        if theirs[key] != value:
            show = (lambda v: f"{len(v)} prompts" if key == "prompts" else repr(v))
            return f"{key} ({show(theirs[key])} there, {show(value)} here)"
    return None


def read_earlier(out_dir: str | Path) -> dict | None:
    """``out_dir/results.json`` of an earlier run, ``None`` when there is none; a one-line ValueError when it
    cannot be read (so that it is never overwritten by accident)."""
    path = Path(out_dir) / "results.json"
    if not path.exists():
        return None
    try:
        old = json.loads(path.read_text())
        if not isinstance(old.get("results"), dict):
            raise KeyError("results")
        return old
    except (OSError, ValueError, KeyError, AttributeError) as err:
        raise ValueError(f"{path} cannot be read ({type(err).__name__}); move it away or choose another --out, "
                         "so that its results are not overwritten") from None


def merge_earlier(res: dict, old: dict) -> dict:
    """``res`` plus every row of ``old`` it lacks, keyed by method name: ``results``, ``methods``,
    ``generations``, ``method_wall_seconds``, ``comparisons`` (by ``method``), the points of each curve,
    the config's ``methods`` and ``headline``; whole-run entries (human reference, sanity check, speed) are
    kept where the new run has none. ``res["kept_from_earlier"]`` names the rows kept and the commands
    that made them."""
    res = dict(res)
    kept = [n for n in old["results"] if n not in res["results"]]
    for key in ("results", "methods", "generations", "method_wall_seconds"):
        res[key] = {**{n: v for n, v in (old.get(key) or {}).items() if n in kept}, **(res.get(key) or {})}
    done = {r["method"] for r in res.get("comparisons") or []}
    res["comparisons"] = list(res.get("comparisons") or []) + [r for r in old.get("comparisons") or []
                                                                 if r["method"] not in done]
    curves = {label: list(points) for label, points in (res.get("curves") or {}).items()}
    for label, points in (old.get("curves") or {}).items():
        curves.setdefault(label, []).extend(p for p in points if p not in curves[label])
    res["curves"] = curves
    config = dict(res["config"])
    for key in ("methods", "headline"):
        config[key] = list(dict.fromkeys(list(config.get(key) or []) + list((old.get("config") or {}).get(key) or [])))
    res["config"] = config
    for key in ("human_reference", "sanity", "default_changed_tokens"):
        if res.get(key) is None and old.get(key) is not None:
            res[key] = old[key]
    if not (res.get("speed") or {}).get("phase_slip_over_standard_matched") and old.get("speed"):
        res["speed"] = old["speed"]
    earlier = (old.get("kept_from_earlier") or {}).get("commands") or []
    commands = list(dict.fromkeys(earlier + ([old["command"]] if old.get("command") else [])))
    if kept:
        res["kept_from_earlier"] = {"methods": kept, "commands": commands}
    return res


def write_all(res: dict, out_dir: str | Path, command: str) -> list[Path]:
    """Write results.json, report.md, frontier.png and comparisons.png under ``out_dir``, keeping the rows
    of an earlier results.json there that ``res`` lacks (:func:`merge_earlier`); a one-line ValueError,
    with nothing written, when that earlier run had another setup."""
    out_dir = Path(out_dir)
    old = read_earlier(out_dir)
    if old is not None:
        why = setup_mismatch(old, res["config"], res["model"], res.get("judge"), res.get("heads"))
        if why:
            raise ValueError(f"{out_dir / 'results.json'} holds results of another setup: {why}; nothing was "
                             "overwritten; choose another --out")
        res = merge_earlier(res, old)
    out_dir.mkdir(parents=True, exist_ok=True)
    res = dict(res, command=command)
    atomic_write(out_dir / "results.json", json.dumps(res, indent=1, default=float))
    write_markdown(res, out_dir / "report.md", command)
    plot_frontier(res, out_dir / "frontier.png")
    plot_comparisons(res, out_dir / "comparisons.png")
    return [out_dir / "results.json", out_dir / "report.md", out_dir / "frontier.png", out_dir / "comparisons.png"]


def rerender(folder: str | Path) -> list[Path]:
    """Re-render report.md, frontier.png and comparisons.png from ``folder/results.json``."""
    folder = Path(folder)
    data = json.loads((folder / "results.json").read_text())
    write_markdown(data, folder / "report.md", data["command"])
    plot_frontier(data, folder / "frontier.png")
    plot_comparisons(data, folder / "comparisons.png")
    return [folder / "report.md", folder / "frontier.png", folder / "comparisons.png"]
