"""The PMA intervention test: sweep the coupling K (and the order parameter R) on trained models and
measure next-token entropy, R and the Fisher information, per kind of prompt.

    phaselm report interventions RUN [RUN ...] --out results/pma [--prompts 16]

Each RUN is a trained PMA run folder (e.g. ``runs/pma/tiny/seed-1``). Prompts (windows of the
model's context length, characters or tokens of its tokenizer):

* ``shakespeare``: held-out test-split windows of the training corpus;
* ``shuffled``: the same windows with their characters randomly permuted (same symbols, no structure);
* ``repetitive``: one line repeated;
* ``modern``: modern English prose (out of domain).

For every K in ``K_GRID`` (``set_coupling_override``; all PMA layers) and every R in ``R_GRID``
(``override(R=...)``), and for interventions of known size (:data:`REFERENCE`): mean next-token entropy (nats) over the second half of each window, the R
the model actually reaches (K sweep), and tr F of the next-token distribution w.r.t. the phase
parameters (:func:`phaselm.evaluation.metrics.fisher_trace`, model-sampled, K sweep). Writes
``intervention.json`` and ``intervention.png`` (mean over runs, band = min..max over runs).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from phaselm.data.datasets import load_splits
from phaselm.evaluation.metrics import fisher_trace
from phaselm.interventions import override
from phaselm.nn.functional import entropy
from phaselm.nn.hooks import hooks
from phaselm.utils import atomic_write, provenance, pyplot, save_figure

K_GRID = [0.0, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0]
R_GRID = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
# interventions of known size, for scale: λ at its bounds, τ halved / doubled, the PMA heads' output zeroed
REFERENCE = {"lambda=0": {"lam": 0.0}, "lambda=0.49": {"lam": 0.49}, "tau=0.5": {"tau": 0.5}, "tau=2": {"tau": 2.0},
             "pma_attention_knocked_out": "knockout"}
MODERN = ("The committee will meet again next week to review the budget, and the report is expected to show "
          "that spending on software and travel rose sharply while the cost of office space fell. Several members "
          "asked whether the new policy on remote work had changed how often people came into the building. ")


def make_prompts(tokenizer, data_name: str, length: int, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``{kind: LongTensor [n, length]}`` (see the module docstring)."""
    rng = random.Random(seed)
    text = load_splits(data_name)["test"]
    vocab = set(getattr(tokenizer, "chars", [])) or None

    def keep(s: str) -> str:
        return "".join(c for c in s if c in vocab) if vocab else s

    def windows(source: str) -> list[list[int]]:
        ids = tokenizer.encode(keep(source))
        starts = [rng.randrange(0, len(ids) - length) for _ in range(n)]
        return [ids[s: s + length] for s in starts]

    shakespeare = windows(text)
    shuffled = [rng.sample(w, len(w)) for w in shakespeare]
    line = keep("To be, or not to be, that is the question. ")
    repetitive = [tokenizer.encode((line * (length // len(line) + 2))[i: i + length * 2])[:length] for i in range(n)]
    modern = windows(MODERN * (4 * length // len(MODERN) + 4))
    return {k: torch.tensor(v) for k, v in [("shakespeare", shakespeare), ("shuffled", shuffled),
                                            ("repetitive", repetitive), ("modern", modern)]}


@torch.no_grad()
def _entropy_and_r(model, ids: torch.Tensor) -> tuple[float, float]:
    out = model(ids, return_metrics=True)
    logits, metrics = out.logits, out.metrics
    half = ids.shape[1] // 2
    return float(entropy(logits[:, half:]).mean()), metrics["R_mean"]


def sweep_run(model, prompts: dict[str, torch.Tensor], fisher_prompts: int = 4) -> dict:
    out = {"K": {}, "R": {}}
    gen = torch.Generator().manual_seed(0)
    for kind, ids in prompts.items():
        rows = []
        for k in K_GRID:
            with override(model, K=k):
                ent, r = _entropy_and_r(model, ids)
                fisher = fisher_trace(model, ids[:fisher_prompts], samples=2, generator=gen)
            rows.append({"K": k, "entropy": ent, "R_measured": r, "fisher_trace": fisher})
        out["K"][kind] = rows
        rows = []
        for r_value in R_GRID:
            with override(model, R=r_value):
                ent, _ = _entropy_and_r(model, ids)
            rows.append({"R": r_value, "entropy": ent})
        out["R"][kind] = rows
        ent, r = _entropy_and_r(model, ids)
        out.setdefault("unmodified", {})[kind] = {"entropy": ent, "R_measured": r}
        out.setdefault("reference", {})[kind] = {name: _entropy_and_r_with(model, ids, values)[0]
                                                 for name, values in REFERENCE.items()}
    return out


def _entropy_and_r_with(model, ids, values: dict) -> tuple[float, float]:
    if values == "knockout":
        with hooks(model, [(lambda n: n.endswith("pma.hook_z"), lambda z, hook: torch.zeros_like(z))]):
            return _entropy_and_r(model, ids)
    with override(model, **values):
        return _entropy_and_r(model, ids)


def summarize(per_run: list[dict]) -> dict:
    """Per kind: entropy range over the K sweep, the largest step between neighbouring K values,
    and the same for the R sweep (means over runs)."""
    summary = {}
    for kind in per_run[0]["K"]:
        k_curves = [[row["entropy"] for row in run["K"][kind]] for run in per_run]
        r_curves = [[row["entropy"] for row in run["R"][kind]] for run in per_run]
        mean_k = [sum(c[i] for c in k_curves) / len(k_curves) for i in range(len(K_GRID))]
        mean_r = [sum(c[i] for c in r_curves) / len(r_curves) for i in range(len(R_GRID))]
        summary[kind] = {
            "entropy_range_over_K": max(mean_k) - min(mean_k),
            "largest_step_over_K": max(abs(b - a) for a, b in zip(mean_k, mean_k[1:])),
            "entropy_range_over_R": max(mean_r) - min(mean_r),
            "entropy_unmodified": sum(r["unmodified"][kind]["entropy"] for r in per_run) / len(per_run),
            "R_unmodified": sum(r["unmodified"][kind]["R_measured"] for r in per_run) / len(per_run),
            "reference_entropy_change": {name: sum(r["reference"][kind][name] - r["unmodified"][kind]["entropy"]
                                                   for r in per_run) / len(per_run) for name in REFERENCE},
        }
    return summary


def plot(per_run: list[dict], path: Path) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    xk = [max(k, 0.01) for k in K_GRID]
    panels = [("K", "entropy", "next-token entropy (nats)", xk), ("K", "R_measured", "R reached", xk),
              ("K", "fisher_trace", "tr F (phase parameters)", xk), ("R", "entropy", "next-token entropy (nats)", R_GRID)]
    for ax, (sweep, key, label, xs) in zip(axes, panels):
        for kind in per_run[0][sweep]:
            curves = [[row[key] for row in run[sweep][kind]] for run in per_run]
            mean = [sum(c[i] for c in curves) / len(curves) for i in range(len(xs))]
            line, = ax.plot(xs, mean, "o-", label=kind, ms=3)
            ax.fill_between(xs, [min(c[i] for c in curves) for i in range(len(xs))],
                            [max(c[i] for c in curves) for i in range(len(xs))], color=line.get_color(), alpha=0.15)
        if sweep == "K":
            ax.set_xscale("log")
            ax.set_xlabel("K override (all PMA layers; 0 plotted at 0.01)")
        else:
            ax.set_xlabel("R override (all PMA layers)")
        if key == "fisher_trace":
            ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"PMA interventions on {len(per_run)} trained tiny model(s): mean over runs, band = min..max")
    fig.tight_layout()
    save_figure(fig, path)


def run_interventions(runs: list[str], out: str | Path = "results/pma", prompts: int = 16, device: str = "cpu",
                      command: str = "") -> dict:
    """Sweep every PMA run in ``runs``; write ``out/intervention.json`` and ``out/intervention.png``."""
    from phaselm.training.trainer import load_for_inference

    if prompts < 1:
        raise ValueError(f"--prompts must be >= 1, got {prompts}")
    per_run = []
    for run in runs:
        model, tok, cfg, _ = load_for_inference(run, device)
        if not hasattr(model, "pma_layers") or not model.pma_layers():
            raise ValueError(f"{run} is not a PMA model with PMA blocks; pass PMA run folders")
        torch.manual_seed(0)
        windows = make_prompts(tok, cfg.data.name, cfg.model.block_size, prompts)
        per_run.append(sweep_run(model, windows))
        print(f"swept {run}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"command": command, "runs": list(runs), "provenance": provenance(), "K_grid": K_GRID, "R_grid": R_GRID,
              "prompts_per_kind": prompts, "summary": summarize(per_run), "per_run": per_run}
    atomic_write(out / "intervention.json", json.dumps(result, indent=1))
    plot(per_run, out / "intervention.png")
    return result
