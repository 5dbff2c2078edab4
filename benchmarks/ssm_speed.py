"""Selective scan: the fast path (``scan="parallel"``: blocked in time, analytic backward) vs the
sequential loop, forward + backward, one run.

    python benchmarks/ssm_speed.py [--device cpu|cuda] [--repeats 3] [--json FILE]

Shapes of the tiny PMA config's Mamba blocks (E = 256 inner channels, N = 16 states; batch 1) at
L = 256 and 1024, of the 130M config's (E = 1536, N = 16) at L = 1024, and a training batch
(B = 32, L = 256, E = 128, N = 16). Each number is the median of ``--repeats`` interleaved timings
of ``selective_scan`` forward + backward. The last line is the smaller of the ratios sequential
time / fast time at tiny_L1024 and 130m_L1024 (``ratio: X``; target >= 5 at both).
"""

import statistics

import torch

from common import arg_parser, finish, machine, seconds
from phaselm.nn.mamba import selective_scan


def timed(scan: str, batch: int, length: int, e: int, n: int, device: str) -> float:
    g = torch.Generator().manual_seed(0)
    u, delta = torch.randn(batch, length, e, generator=g), torch.rand(batch, length, e, generator=g) * 0.1
    A, D = -torch.rand(e, n, generator=g) - 0.5, torch.ones(e)
    B, C = torch.randn(batch, length, n, generator=g), torch.randn(batch, length, n, generator=g)
    tensors = [t.to(device).requires_grad_() for t in (u, delta, A, B, C, D)]
    return seconds(lambda: selective_scan(*tensors, scan=scan).square().sum().backward(), device)


def main():
    args = arg_parser(__doc__, repeats=3).parse_args()
    res = {**machine(args), "cases": {}}
    cases = {"tiny_L256": (1, 256, 256, 16), "tiny_L1024": (1, 1024, 256, 16), "130m_L1024": (1, 1024, 1536, 16),
             "train_B32_L256": (32, 256, 128, 16)}
    for name, shape in cases.items():
        timed("parallel", *shape, args.device)  # warm-up
        par, seq = [], []
        for _ in range(args.repeats):
            par.append(timed("parallel", *shape, args.device))
            seq.append(timed("sequential", *shape, args.device))
        p, s = statistics.median(par), statistics.median(seq)
        res["cases"][name] = {"batch_L_E_N": shape, "parallel_s": p, "sequential_s": s, "ratio": s / p}
        print(f"{name} (B, L, E, N = {shape}): parallel {p * 1e3:.1f} ms, sequential {s * 1e3:.1f} ms, "
              f"ratio {s / p:.1f}")
    finish(res, args, min(res["cases"][name]["ratio"] for name in ("tiny_L1024", "130m_L1024")), digits=1)


if __name__ == "__main__":
    main()
