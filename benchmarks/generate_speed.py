"""Decoding speed of phaselm's models with the cache (``model.generate``) against recomputing the
whole context for every new token, eager (dynamic cache) and compiled (static cache), and phaselm's
GPT against ``transformers.GPT2LMHeadModel`` of the same shapes, one run (medians of ``--repeats``
timings, default 3, interleaved across the decoding paths of a model: on a shared CPU one timing
varied by 25%).

    python benchmarks/generate_speed.py [--tokens 512] [--batches 1,8] [--device cpu] [--no-compile]

Models: the CPU-grid shapes (6 layers, 4 heads, width 128, vocabulary 65) with a context of
``tokens + 16``: the GPT baseline, PhaseGPT (one phase layer at 4, 32 oscillators) and the PMA
hybrid (4 Mamba + 2 PMA blocks, d_state 8); random weights (speed does not depend on them). Each
decodes ``--tokens`` new tokens after a 16-token prompt by sampling (top-k 40, the same seed for
both ways; the recomputation samples with the same processors, so both do the same work per
token). Prints tokens/s for every model and batch; the speed-up of the cache (target >= 10 for GPT
and PhaseGPT, >= 5 for PMA) and GPT / GPT2LMHeadModel (target >= 0.9), eager and compiled (the
compiled ratio tells phaselm's share of the compiled path's time from transformers'). Last line: ``ratio: X``,
the smallest cache speed-up of the eager path.

Compiled path (issue 22 §2; unless ``--no-compile``): ``generate(..., cache_implementation="static",
compile_config=...)`` with the decoding step compiled by ``torch.compile`` (inductor, ``fullgraph``,
static shapes; transformers compiles only on accelerators unless ``compile_config._compile_all_devices``
is set, as here). One untimed call compiles (its seconds are reported as ``compile_s``), the next ones are
timed. Per model and batch: ``compiled_tok_s``, ``compiled_speedup`` (recompute time / compiled time,
the target >= 10 at batch 1) and ``compile_gain`` (eager dynamic time / compiled static time).
"""


import os
import statistics

import torch
import torch._dynamo
from transformers import CompileConfig, GPT2Config, GPT2LMHeadModel, LogitsProcessorList, TopKLogitsWarper

import phaselm
from common import arg_parser, finish, machine, seconds

PROMPT = 16


def models(context: int) -> dict:
    sizes = dict(vocab_size=65, block_size=context, n_layer=6, n_head=4, n_embd=128)
    torch.manual_seed(0)
    return {
        "gpt": phaselm.GPTForCausalLM(phaselm.GPTConfig(**sizes)),
        "phasegpt": phaselm.PhaseGPTForCausalLM(phaselm.PhaseGPTConfig(**sizes, phase_layers=[4], n_osc=32)),
        "pma": phaselm.PMAForCausalLM(phaselm.PMAConfig(**sizes, n_ssm=4, d_state=8)),
    }


@torch.no_grad()
def recompute(model, ids: torch.Tensor, tokens: int, generator: torch.Generator) -> torch.Tensor:
    """Decode by running the whole context for every token (no cache), sampling with top-k 40."""
    top_k = LogitsProcessorList([TopKLogitsWarper(40)])
    for _ in range(tokens):
        logits = top_k(ids, model(ids).logits[:, -1].float())
        ids = torch.cat([ids, torch.multinomial(logits.softmax(-1), 1, generator=generator)], dim=1)
    return ids


def cached(model, ids: torch.Tensor, tokens: int, **kwargs):
    return model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=True, top_k=40,
                          pad_token_id=0, **kwargs)


def compiled(model, ids: torch.Tensor, tokens: int):
    """Static cache, decoding step compiled (inductor, one graph, static shapes)."""
    config = CompileConfig(fullgraph=True, dynamic=False, mode="default")
    config._compile_all_devices = True
    return cached(model, ids, tokens, cache_implementation="static", compile_config=config)


def main():
    ap = arg_parser(__doc__, repeats=3)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled static-cache path")
    args = ap.parse_args()
    torch._dynamo.config.cache_size_limit = 64  # one graph per model and batch size
    batches = [int(b) for b in args.batches.split(",")]
    res = {"machine": machine(args), "tokens": args.tokens, "prompt": PROMPT, "runs": {},
           "load_average_1m": {"start": os.getloadavg()[0]}}  # other processes on the machine skew the timings
    speedups = []
    for name, model in models(args.tokens + PROMPT).items():
        model.to(args.device).eval()
        for b in batches:
            ids = torch.randint(0, 65, (b, PROMPT), generator=torch.Generator().manual_seed(b), device=args.device)
            if not args.no_compile:  # the first compiled call compiles; it is timed once, apart
                compile_s = seconds(lambda: compiled(model, ids, args.tokens), args.device)
            times = {"cache": [], "full": [], "comp": []}
            for _ in range(args.repeats):  # interleaved, so a burst of load hits every path alike
                times["cache"].append(seconds(lambda: cached(model, ids, args.tokens), args.device))
                times["full"].append(seconds(lambda: recompute(model, ids, args.tokens,
                                                               torch.Generator(args.device).manual_seed(0)), args.device))
                if not args.no_compile:
                    times["comp"].append(seconds(lambda: compiled(model, ids, args.tokens), args.device))
            t_cache, t_full = statistics.median(times["cache"]), statistics.median(times["full"])
            row = {"cached_tok_s": b * args.tokens / t_cache, "recompute_tok_s": b * args.tokens / t_full,
                   "speedup": t_full / t_cache}
            line = ""
            if not args.no_compile:
                t_comp = statistics.median(times["comp"])
                row.update(compile_s=compile_s, compiled_tok_s=b * args.tokens / t_comp,
                           compiled_speedup=t_full / t_comp, compile_gain=t_cache / t_comp)
                line = (f"; compiled static {row['compiled_tok_s']:8.1f} tok/s, speed-up {row['compiled_speedup']:.1f}x "
                        f"(compile buys {row['compile_gain']:.2f}x; first call {row['compile_s']:.0f} s)")
            res["runs"][f"{name}/batch{b}"] = row
            speedups.append(row["speedup"])
            print(f"{name:9s} batch {b}: cached {row['cached_tok_s']:8.1f} tok/s, recompute {row['recompute_tok_s']:8.1f} "
                  f"tok/s, speed-up {row['speedup']:.1f}x{line}", flush=True)
    ours = models(args.tokens + PROMPT)["gpt"].to(args.device).eval()
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=65, n_positions=args.tokens + PROMPT, n_embd=128, n_layer=6, n_head=4,
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                    bos_token_id=None, eos_token_id=None)).to(args.device).eval()
    for b in batches:
        ids = torch.randint(0, 65, (b, PROMPT), generator=torch.Generator().manual_seed(b), device=args.device)
        ways = {"": cached} if args.no_compile else {"": cached, "compiled_": compiled}
        for prefix, way in ways.items():
            if prefix:  # compile both first
                way(ours, ids, args.tokens), way(hf, ids, args.tokens)
            t_ours, t_hf = (statistics.median(seconds(lambda: way(m, ids, args.tokens), args.device)
                                              for _ in range(args.repeats)) for m in (ours, hf))
            res["runs"].setdefault(f"gpt_vs_gpt2/batch{b}", {}).update({
                f"{prefix}ours_tok_s": b * args.tokens / t_ours, f"{prefix}gpt2_tok_s": b * args.tokens / t_hf,
                f"{prefix}ratio": t_hf / t_ours})
            print(f"GPT vs GPT2LMHeadModel batch {b}{', compiled static' if prefix else ''}: "
                  f"{b * args.tokens / t_ours:.1f} vs {b * args.tokens / t_hf:.1f} tok/s, ratio {t_hf / t_ours:.2f}",
                  flush=True)
    res["load_average_1m"]["end"] = os.getloadavg()[0]
    print(f"load average (1 min): {res['load_average_1m']['start']:.2f} at start, {res['load_average_1m']['end']:.2f} at end "
          f"on {os.cpu_count()} CPUs", flush=True)
    finish(res, args, min(speedups), digits=1)


if __name__ == "__main__":
    main()
