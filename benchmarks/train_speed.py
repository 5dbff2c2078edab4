"""Training tokens/s of phaselm's GPT vs ``transformers.GPT2LMHeadModel`` of the same shapes, one run.

    python benchmarks/train_speed.py [--device cpu|cuda] [--steps 20] [--repeats 3] [--json FILE]

Same shapes (4 layers, 4 heads, 128 wide, block 128, vocab 65, no dropout, tied head), same
batch, same AdamW; forward + backward + optimiser step, timed after warm-up; the two models are
interleaved and the median of ``--repeats`` timings is taken. Last line: ``ratio: X`` = ours /
transformers (target >= 1.0).
"""

import statistics

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from common import arg_parser, finish, machine, seconds
from phaselm.models.gpt import GPTConfig, GPTForCausalLM


def timed_steps(step, steps, device):
    """Seconds for ``steps`` training steps after 3 warm-up steps."""
    for _ in range(3):
        step()
    return seconds(lambda: [step() for _ in range(steps)], device)


def main():
    ap = arg_parser(__doc__)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--block", type=int, default=128)
    args = ap.parse_args()
    torch.manual_seed(0)
    vocab, heads = 65, max(1, args.width // 32)
    ours = GPTForCausalLM(GPTConfig(vocab_size=vocab, block_size=args.block, n_layer=args.layers, n_head=heads,
                         n_embd=args.width, dropout=0.0, bias=True)).to(args.device)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=args.block, n_layer=args.layers, n_head=heads,
                                    n_embd=args.width, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
                                    bos_token_id=None, eos_token_id=None,  # GPT-2's 50256 is outside this vocabulary
                                    attn_implementation="sdpa")).to(args.device)
    x = torch.randint(0, vocab, (args.batch, args.block), device=args.device)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-4)

    def step_ours():
        loss = ours(x[:, :-1], x[:, 1:]).loss
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_hf():
        loss = hf(input_ids=x, labels=x).loss
        loss.backward()
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)

    # HF shifts labels inside (block-1 predictions); ours gets block-1 inputs: the same work
    tokens = args.batch * (args.block - 1) * args.steps
    t_ours, t_hf = [], []
    for _ in range(args.repeats):
        t_ours.append(tokens / timed_steps(step_ours, args.steps, args.device))
        t_hf.append(tokens / timed_steps(step_hf, args.steps, args.device))
    a, b = statistics.median(t_ours), statistics.median(t_hf)
    print(f"params: ours {sum(p.numel() for p in ours.parameters())}, transformers {sum(p.numel() for p in hf.parameters())}")
    print(f"device {args.device}, threads {torch.get_num_threads()}, torch {torch.__version__}; "
          f"batch {args.batch} x block {args.block}, {args.steps} steps x {args.repeats} repeats")
    print(f"phaselm GPT {a:.0f} tok/s, transformers GPT2LMHeadModel {b:.0f} tok/s")
    finish({"machine": machine(args), "shapes": {k: getattr(args, k) for k in ("batch", "layers", "width", "block", "steps")},
            "tokens_per_s": {"phaselm": a, "gpt2": b}}, args, a / b)


if __name__ == "__main__":
    main()
