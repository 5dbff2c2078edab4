"""PMA attention (fast SDPA path) vs plain causal SDPA attention, forward + backward, one run.

    python benchmarks/pma_speed.py [--device cpu|cuda] [--repeats 5] [--json FILE]

Whole attention layers with the same q/k/v/output projections: :class:`PhaseModulatedAttention`
(phases, Kuramoto steps, Var(P), τ, and one SDPA call with 3× head size) against
:class:`CausalSelfAttention` (one SDPA call), at the tiny config's shapes (d 128, 4 heads, T 128,
batch 16) and the 130M config's (d 768, 12 heads, T 1024, batch 2 on CPU, 8 on GPU); the explicit
[T, T] path is timed too. Medians of ``--repeats`` interleaved timings. The last line is the
130M-shape ratio PMA fast / plain (``ratio: X``; target <= 1.6).
"""

import statistics

import torch

from common import arg_parser, finish, machine, seconds
from phaselm.nn.attention import CausalSelfAttention
from phaselm.nn.phase_modulated import PhaseModulatedAttention


def timed(layer, x, context, device, **kw) -> float:
    """Seconds of one forward + backward."""
    return seconds(lambda: (layer(x, context, **kw) if context is not None else layer(x)).square().mean().backward(), device)


def main():
    args = arg_parser(__doc__, repeats=5).parse_args()
    res = {**machine(args), "cases": {}}
    big_batch = 8 if args.device == "cuda" else 2
    cases = {"tiny": (128, 4, 128, 16), "130m": (768, 12, 1024, big_batch)}
    for name, (d, h, t, b) in cases.items():
        torch.manual_seed(0)
        pma, plain = PhaseModulatedAttention(d, h, block_size=t).to(args.device), CausalSelfAttention(d, h).to(args.device)
        x = torch.randn(b, t, d, device=args.device, requires_grad=True)
        ctx = torch.randn(b, t, d, device=args.device)
        runs = {"plain": lambda: timed(plain, x, None, args.device),
                "pma_fast": lambda: timed(pma, x, ctx, args.device, explicit=False),
                "pma_explicit": lambda: timed(pma, x, ctx, args.device, explicit=True)}
        for fn in runs.values():
            fn()  # warm-up
        times = {k: [] for k in runs}
        for _ in range(args.repeats):
            for k, fn in runs.items():
                times[k].append(fn())
        med = {k: statistics.median(v) for k, v in times.items()}
        ratio = med["pma_fast"] / med["plain"]
        res["cases"][name] = {"d_T_heads_batch": (d, t, h, b), **{f"{k}_s": v for k, v in med.items()},
                              "ratio_fast": ratio, "ratio_explicit": med["pma_explicit"] / med["plain"]}
        print(f"{name} (d {d}, {h} heads, T {t}, batch {b}): plain {med['plain'] * 1e3:.1f} ms, PMA fast "
              f"{med['pma_fast'] * 1e3:.1f} ms ({ratio:.2f}x), explicit {med['pma_explicit'] * 1e3:.1f} ms "
              f"({med['pma_explicit'] / med['plain']:.2f}x)")
    finish(res, args, res['cases']['130m']['ratio_fast'], digits=2)


if __name__ == "__main__":
    main()
