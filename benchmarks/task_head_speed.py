"""Training on a synthetic task: the LM head at every position vs at the answer positions only.

    python benchmarks/task_head_speed.py [--device cpu|cuda] [--repeats 3] [--json FILE]

One training step (forward + backward + AdamW) of the suite's GPT (2 layers, 2 heads) on an MQAR
batch (phaselm.data.tasks), the loss over the answers either way: ``model(x, y)`` computes all
B·L rows of the [V, width] head, ``model(x, y, head_at_targets=True)`` (what the trainer does for
tasks) only the B·kv answer rows. Shapes: width 64, MQAR (L 256, 16 pairs, V 8192), batch 64.
Last line: ``ratio: X`` = full-head step time / answers-only step time.
"""

import numpy as np
import torch

from common import arg_parser, finish, machine, median_seconds
from phaselm.data.tasks import make_task
from phaselm.evaluation.tasks_bench import model_section
from phaselm.models import MODELS, config_from_dict


def main():
    ap = arg_parser(__doc__)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    task = make_task("mqar", seq_len=256, num_kv_pairs=16)
    x, y = (torch.from_numpy(a).to(args.device) for a in task.generate(args.batch, np.random.default_rng(0)))
    torch.manual_seed(0)
    section = model_section("gpt", args.width, task.seq_len, task.vocab_size)
    model = MODELS["gpt"][1](config_from_dict(section, task.vocab_size)).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(sparse: bool):
        model(x, y, head_at_targets=sparse).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = {}
    for _ in range(args.repeats):  # interleaved
        for name, sparse in (("full_head", False), ("answers_only", True)):
            times.setdefault(name, []).append(median_seconds(lambda: step(sparse), 1, args.device))
    full, sparse = (float(np.median(times[k])) for k in ("full_head", "answers_only"))
    rows = int((y >= 0).sum())
    print(f"MQAR L{task.seq_len} kv{task.num_kv_pairs} V{task.vocab_size}, batch {args.batch}, width {args.width}: "
          f"{rows} of {y.numel()} positions carry a target")
    print(f"step with the head at every position {full * 1e3:.0f} ms, at the answers only {sparse * 1e3:.0f} ms")
    finish({**machine(args), "full_head_s": full, "answers_only_s": sparse, "answer_rows": rows,
            "positions": y.numel()}, args, full / sparse)


if __name__ == "__main__":
    main()
