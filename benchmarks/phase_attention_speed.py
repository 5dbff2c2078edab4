"""PhaseGPT training-step time vs the GPT baseline, and memory against sequence length, one run.

    python benchmarks/phase_attention_speed.py [--device cpu|cuda] [--repeats 3]

1. CPU-scale shapes (configs/phasegpt/cpu: 6 layers × 4 heads × 128, block 128, batch 32) and seed
   shapes (12 × 12 × 768, block 512; batch 4 on CPU, 32 on GPU): forward + backward time of the
   winner (one phase layer, 32 oscillators, 2 Euler steps) over the baseline, median of
   ``--repeats`` interleaved timings.
2. Memory of forward + backward of one seed-shape phase attention layer (and of a standard layer)
   at T = 256, 512, 1024, batch 1: CUDA's peak allocated memory on a GPU; on a CPU the bytes
   autograd saves for the backward pass (activation memory).

The last line is the seed-shape ratio (``ratio: X``; target <= 1.3).
"""

import statistics

import torch

from common import arg_parser, finish, machine, median_seconds
from phaselm.nn.attention import CausalSelfAttention
from phaselm.nn.phase_coupled import PhaseCoupledAttention
from phaselm.models import config_to_dict, GPTConfig, GPTForCausalLM, PhaseGPTConfig, PhaseGPTForCausalLM


def make(cfg: GPTConfig, phase_layer: int | None):
    torch.manual_seed(0)
    if phase_layer is None:
        return GPTForCausalLM(cfg)
    sizes = {k: v for k, v in config_to_dict(cfg).items() if k != "type"}
    return PhaseGPTForCausalLM(PhaseGPTConfig(**sizes, phase_layers=[phase_layer], n_osc=32))


def step_time(model, batch, block, device, repeats):
    model.to(device).train()
    x = torch.randint(0, model.config.vocab_size, (batch, block), device=device)

    def step():
        model(x, x).loss.backward()
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    return median_seconds(step, repeats, device)


def peak_memory_mb(kind: str, t: int, device: str) -> float:
    """GPU: peak allocated memory of one layer's forward + backward. CPU: the bytes autograd saves
    for the backward pass (the activation memory that grows with T), unique storages counted once."""
    layer = (PhaseCoupledAttention(768, 12, n_osc=32) if kind == "phase" else CausalSelfAttention(768, 12)).to(device)
    x = torch.randn(1, t, 768, device=device, requires_grad=True)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        layer(x).sum().backward()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    saved = {}

    def pack(tensor):
        if not isinstance(tensor, torch.nn.Parameter):
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = layer(x).sum()
    out.backward()
    return sum(saved.values()) / 2**20


def main():
    args = arg_parser(__doc__, repeats=3).parse_args()
    res = {**machine(args)}
    shapes = {
        "cpu_scale": (GPTConfig(vocab_size=65, block_size=128, n_layer=6, n_head=4, n_embd=128), 4, 32, 128),
        "seed_shapes": (GPTConfig(vocab_size=65, block_size=512, n_layer=12, n_head=12, n_embd=768), 7,
                        32 if args.device == "cuda" else 4, 512),
    }
    for name, (cfg, layer, batch, block) in shapes.items():
        base_t, phase_t = [], []
        base, phase = make(cfg, None), make(cfg, layer)
        for _ in range(args.repeats):
            base_t.append(step_time(base, batch, block, args.device, 1))
            phase_t.append(step_time(phase, batch, block, args.device, 1))
        b, p = statistics.median(base_t), statistics.median(phase_t)
        res[name] = {"batch": batch, "block": block, "baseline_s": b, "winner_s": p, "ratio": p / b}
        print(f"{name}: batch {batch} x {block}: baseline {b * 1e3:.0f} ms, winner {p * 1e3:.0f} ms, ratio {p / b:.3f}")
    res["memory_mb"] = {}
    for t in (256, 512, 1024):
        mem = {k: peak_memory_mb(k, t, args.device) for k in ("standard", "phase")}
        res["memory_mb"][t] = mem
        print(f"T={t}: memory of one layer's forward+backward: standard {mem['standard']:.1f} MB, "
              f"phase {mem['phase']:.1f} MB")
    finish(res, args, res['seed_shapes']['ratio'], digits=2)


if __name__ == "__main__":
    main()
