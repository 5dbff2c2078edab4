"""Causal Kuramoto coupling: O(T·N) mean field vs the direct pairwise masked sum, one run.

    python benchmarks/kuramoto_speed.py [--T 256] [--N 32] [--batch 8] [--heads 4]

Both compute (1/i) Σ_{j≤i} sin(θ_j − θ_i) for θ [B, H, T, N]; the pairwise one builds the
[B, H, T, T, N] tensor that the public PhaseGPT materialised. Prints the max difference and the
times (median of 5), last line ``ratio: X`` = pairwise time / mean-field time.
"""

import argparse

import torch

from common import median_seconds
from phaselm.nn import oscillators as osc


def pairwise(theta):
    diff = torch.sin(theta.unsqueeze(-3) - theta.unsqueeze(-2))
    t = theta.shape[-2]
    mask = torch.tril(torch.ones(t, t, dtype=theta.dtype))
    return (diff * mask[..., None]).sum(-2) / mask.sum(-1)[:, None]


def timed(fn, x, repeats=5):
    return median_seconds(lambda: fn(x), repeats)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, default=256)
    ap.add_argument("--N", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=4)
    args = ap.parse_args()
    theta = torch.rand(args.batch, args.heads, args.T, args.N) * 6.283
    diff = (osc.coupling_term(theta) - pairwise(theta)).abs().max().item()
    fast, slow = timed(osc.coupling_term, theta), timed(pairwise, theta)
    print(f"theta {list(theta.shape)}, threads {torch.get_num_threads()}, max |difference| {diff:.2e}")
    print(f"mean field {fast * 1e3:.2f} ms, pairwise {slow * 1e3:.2f} ms")
    print(f"ratio: {slow / fast:.1f}")


if __name__ == "__main__":
    main()
