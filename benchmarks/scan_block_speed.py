"""The CPU selective scan's time block (``phaselm.nn.mamba._BLOCK_ELEMS``: state elements per block)
at the synthetic-task training shape (B 64, L 256, E 128, N 16: Mamba at width 64), forward +
backward, with ``--processes`` copies running at once (2: what two training processes on the 2-core
machine see; they share the L3 cache, and the backward keeps four block buffers each).

    python benchmarks/scan_block_speed.py [--processes 2] [--seconds 3] [--repeats 5] [--json FILE]

Each block size is timed for ``--seconds`` in turn, ``--repeats`` rounds, in every process; each
number is the median over all of them. The last line is the time at 2^21 elements (the block size
before 2026-12-07) / the time at the default (``ratio: X``).
"""

import multiprocessing as mp
import statistics
import time

import torch

from common import arg_parser, finish, machine
import phaselm.nn.mamba as mamba

SIZES = (1 << 21, 1 << 20, 1 << 19, 1 << 18)


def _times(seconds: float, repeats: int) -> dict:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    b, length, e, n = 64, 256, 128, 16
    u, delta = torch.randn(b, length, e, generator=g), torch.rand(b, length, e, generator=g) * 0.1
    A, D = -torch.rand(e, n, generator=g) - 0.5, torch.ones(e)
    B, C = torch.randn(b, length, n, generator=g), torch.randn(b, length, n, generator=g)
    tensors = [t.requires_grad_() for t in (u, delta, A, B, C, D)]
    out = {size: [] for size in SIZES}
    for _ in range(repeats):
        for size in SIZES:
            mamba._BLOCK_ELEMS = size
            start = time.perf_counter()
            while time.perf_counter() - start < seconds:
                t0 = time.perf_counter()
                mamba.selective_scan(*tensors, scan="parallel").square().sum().backward()
                out[size].append(time.perf_counter() - t0)
    return out


def main():
    ap = arg_parser(__doc__, repeats=5)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    default = mamba._BLOCK_ELEMS
    with mp.get_context("spawn").Pool(args.processes) as pool:
        runs = pool.starmap(_times, [(args.seconds, args.repeats)] * args.processes)
    res = {**machine(args), "processes": args.processes, "default": default, "median_s": {}}
    for size in SIZES:
        res["median_s"][size] = statistics.median(t for run in runs for t in run[size])
        print(f"block 2^{size.bit_length() - 1} elements: {res['median_s'][size] * 1e3:.0f} ms"
              + (" (default)" if size == default else ""))
    finish(res, args, res["median_s"][1 << 21] / res["median_s"][default])


if __name__ == "__main__":
    main()
