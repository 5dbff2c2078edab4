"""``phaselm interpret CHECKPOINT --text FILE`` (or ``--split val``): phase synchrony of a trained PhaseGPT on real text.

Runs the model on windows of the text (``block_size`` tokens each) and records, for every phase
layer, the phases θ ``[B, H, T, N]`` after the Kuramoto steps. Writes to ``--out``:

* ``summary.json``: R per layer and head (R = |mean_n e^{iθ_n}| per token, averaged over tokens and
  windows), R(t) along the sequence, and the order parameter over tokens as well;
* ``r_by_layer_head.png``: R per layer × head;
* ``r_over_time.png``: R(t) along the sequence per phase layer (mean over heads and windows);
* ``phase_heatmap.png``: θ of the first window, one head: oscillators × tokens;
* ``coherence.png``: the coherence matrix c_ij = mean_n cos(θ_i,n − θ_j,n) of that head (causal
  part), the quantity that biases the attention logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from phaselm.nn import oscillators as osc
from phaselm.nn.phase_coupled import PhaseCoupledAttention
from phaselm.utils import pyplot, save_figure


@torch.no_grad()
def interpret(model, tokenizer, text: str, out_dir: str | Path, max_windows: int = 8, head: int = 0) -> dict:
    out_dir = Path(out_dir)
    layers = {i: b.attn for i, b in enumerate(model.blocks) if isinstance(getattr(b, "attn", None), PhaseCoupledAttention)}
    if not layers:
        kind = type(model).__name__
        hint = " (for a PMA run: phaselm report interventions RUN)" if kind.startswith("PMA") else ""
        raise ValueError(f"this checkpoint ({kind}) has no phase layers, and interpret reads PhaseGPT phase layers; pass "
                         f"a PhaseGPT run{hint}")
    ids = tokenizer.encode(text)
    block = model.config.block_size
    if len(ids) < 2:
        raise ValueError("--text: the text is shorter than 2 tokens")
    windows = [ids[s: s + block] for s in range(0, len(ids), block)][:max_windows]
    windows = [w for w in windows if len(w) == len(windows[0])]
    out_dir.mkdir(parents=True, exist_ok=True)  # after the checks: bad input leaves no folder
    x = torch.tensor(windows, device=next(model.parameters()).device)
    captured: dict[int, torch.Tensor] = {}
    hooks = [layer.register_forward_hook(lambda m, args, out, i=i: captured.__setitem__(i, m.phases(args[0])))
             for i, layer in layers.items()]
    try:
        model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    summary = {"windows": len(windows), "tokens_per_window": len(windows[0]), "layers": {}}
    for i, theta in captured.items():
        r_tok = osc.order_parameter(theta, dim=-1)  # [B, H, T]: synchrony across oscillators per token
        summary["layers"][str(i)] = {
            "R_per_head": r_tok.mean(dim=(0, 2)).tolist(),
            "R_mean": float(r_tok.mean()),
            "R_over_time": r_tok.mean(dim=(0, 1)).tolist(),
            "R_over_tokens_per_head": osc.order_parameter(theta, dim=-2).mean(dim=(0, 2)).tolist(),
            "coupling_K": layers[i].coupling.tolist(),
            "coherence_beta": layers[i].coherence.tolist(),
        }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    _plots(captured, summary, out_dir, head)
    return summary


def _plots(captured, summary, out_dir: Path, head: int) -> None:
    plt = pyplot()

    first = min(captured)
    grid = np.array([summary["layers"][str(i)]["R_per_head"] for i in sorted(captured)])
    fig, ax = plt.subplots(figsize=(6, 1.2 + 0.5 * len(grid)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_yticks(range(len(grid)), [f"layer {i}" for i in sorted(captured)])
    ax.set_xlabel("head")
    ax.set_title("order parameter R (over oscillators, mean over tokens)")
    fig.colorbar(im)
    fig.tight_layout()
    save_figure(fig, out_dir / "r_by_layer_head.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    for i in sorted(captured):
        ax.plot(summary["layers"][str(i)]["R_over_time"], label=f"layer {i}")
    ax.set_xlabel("token position t")
    ax.set_ylabel("R(t)")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, out_dir / "r_over_time.png")

    theta = captured[first][0, head].cpu().double()  # [T, N]
    fig, ax = plt.subplots(figsize=(8, 4))
    im = ax.imshow((torch.remainder(theta + np.pi, 2 * np.pi).T - np.pi).numpy(), cmap="twilight", aspect="auto", vmin=-np.pi, vmax=np.pi)
    ax.set_xlabel("token position")
    ax.set_ylabel("oscillator")
    ax.set_title(f"phases θ, layer {first}, head {head}, first window")
    fig.colorbar(im)
    fig.tight_layout()
    save_figure(fig, out_dir / "phase_heatmap.png")

    c = torch.cos(theta[:, None, :] - theta[None, :, :]).mean(-1)
    c = c.masked_fill(~torch.ones_like(c, dtype=torch.bool).tril(), float("nan"))
    fig, ax = plt.subplots(figsize=(5.5, 5))
    im = ax.imshow(c.numpy(), cmap="coolwarm", vmin=-1, vmax=1)
    ax.set_xlabel("key position j")
    ax.set_ylabel("query position i")
    ax.set_title(f"coherence c_ij, layer {first}, head {head}")
    fig.colorbar(im)
    fig.tight_layout()
    save_figure(fig, out_dir / "coherence.png")
