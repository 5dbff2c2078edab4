"""Summarise a training run for ``results/``: ``summary.json`` (with the final checkpoint's loss on
the whole test split), the metrics JSONL and a loss curve.

    python -m phaselm.evaluation.run_report RUN_DIR OUT_DIR ["the command that made the run"]
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from phaselm.training import checkpoint as ckpt


def summarize_run(run_dir: str | Path, out_dir: str | Path, command: str = "") -> dict:
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines() if r.strip()]
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    state = ckpt.read_state(ckpt.latest_checkpoint(run_dir))
    from phaselm.evaluation.sampling_bench import provenance

    best = min(val, key=lambda r: r["loss"])
    from phaselm.training.trainer import evaluate_split

    test = evaluate_split(run_dir, "test")
    summary = {
        "command": command, "config": state["config"], "provenance": provenance(),
        "iters": state["step"], "final_val_loss": val[-1]["loss"], "final_val_ppl": val[-1]["ppl"],
        "best_val_loss": best["loss"], "best_val_iter": best["iter"], "val_tokens": val[-1].get("tokens"),
        "final_test_loss": test["loss"], "final_test_ppl": test["ppl"], "test_tokens": test["tokens"],
        "mean_train_tokens_per_s": sum(r["tokens_per_s"] for r in train) / max(1, len(train)),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    shutil.copyfile(run_dir / "metrics.jsonl", out_dir / "metrics.jsonl")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([r["iter"] for r in train], [r["loss"] for r in train], label="train (batch loss)", alpha=0.7)
    ax.plot([r["iter"] for r in val], [r["loss"] for r in val], "o-", label="val (whole split, capped)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"{run_dir.name}: best val {best['loss']:.3f} (ppl {best['ppl']:.2f})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "loss_curve.png", dpi=110)
    plt.close(fig)
    return summary


if __name__ == "__main__":
    print(json.dumps({k: v for k, v in summarize_run(*sys.argv[1:4]).items() if k not in ("config",)}, indent=1))
