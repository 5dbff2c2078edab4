"""Probe (not part of the suite): does a short causal convolution in front of attention take the GPT
off the MQAR recall plateau at the seeds where it stays on it?

Zoology's MQAR mixture configuration (``original_mqar_configs``, the one amendment 2 follows) puts
a short convolution (kernel 3) in front of every attention layer; the suite's GPT has none, so its
first layer must learn a previous-token head from learned positions before attention can recall a
key's value, and at our budget whether it does is a matter of seed (results/tasks/README.md). This
trains the suite's width-64 GPT run (the bench's own configuration and training code) with

    attn_in = CausalConv1d_k(LN_1(x))          # depthwise, [B, T, C] -> [B, T, C], Mamba's conv
    x = x + attn(attn_in);  x = x + MLP(LN_2(x))

in every block (+ (k + 1)·C parameters a block), training and teacher-forced evaluation only (no
cache), and writes the bench's JSON for each seed into ``--out``. Usage:

    OMP_NUM_THREADS=1 .venv/bin/python experiments/mqar_short_conv_probe.py --seeds 3 [--steps 4000]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from torch import nn

import phaselm.training.trainer as trainer
from phaselm.evaluation.tasks_bench import MIX, Run, TasksBench, TasksConfig
from phaselm.nn.mamba import CausalConv1d


class ConvThenAttention(nn.Module):
    """attn(CausalConv1d_k(x), inputs) for ``x [B, T, C]`` (training and teacher-forced evaluation)."""

    def __init__(self, attn: nn.Module, width: int, kernel: int):
        super().__init__()
        self.conv, self.attn = CausalConv1d(width, kernel), attn

    def forward(self, x, inputs):
        return self.attn(self.conv(x), inputs)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="3", help="comma-separated seeds (default: 3, the seed that stayed on the plateau)")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--lr", type=float, default=3e-3, help="the rate the width-64 GPT's sweep chose")
    p.add_argument("--kernel", type=int, default=3)
    p.add_argument("--out", default="results/tasks/probe_short_conv")
    p.add_argument("--work", default="runs/tasks/probe_short_conv")
    args = p.parse_args(argv)
    build = trainer.build_model

    def with_conv(cfg, vocab_size):
        model = build(cfg, vocab_size)
        for block in model.model.blocks:
            block.attn = ConvThenAttention(block.attn, model.config.n_embd, args.kernel)
        return model

    trainer.build_model = with_conv
    cfg = TasksConfig(task="mqar", models=["gpt"], widths=[64], seeds=3, lrs=[args.lr], steps=args.steps,
                      eval_interval=500, mixture=True)
    bench = TasksBench(cfg, args.out, args.work, "OMP_NUM_THREADS=1 .venv/bin/python experiments/mqar_short_conv_probe.py "
                       + shlex.join(argv), resume=True)
    bench.runs_dir.mkdir(parents=True, exist_ok=True)
    for seed in map(int, args.seeds.split(",")):
        run = Run(MIX, "gpt", 64, seed, None)
        path = bench.train(run, args.lr)
        record = json.loads(path.read_text())
        if "probe" not in record:
            path.write_text(json.dumps({**record, "probe": f"causal depthwise conv, kernel {args.kernel}, in front of "
                                        "each block's attention"}, indent=1) + "\n")
        accs = {d: round(100 * t["accuracy"], 2) for d, t in record["test_by_difficulty"].items()}
        print(f"seed {seed}: test accuracy % {accs} ({record['train_seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
