"""Decode speed of Phase-Slip vs plain sampling vs ``model.generate(do_sample=True)``, one run.

    python benchmarks/sampler_speed.py [--model NAME] [--device cpu|cuda] [--tokens 128] [--repeats 3]

All methods use T=0.65, top-k 40 and generate exactly ``--tokens`` new tokens (EOS ignored) at
batch 1; the methods are interleaved and each is timed ``--repeats`` times (median), so machine
noise hits them alike. Then the same at batch 8. The last line is the ratio
``Phase-Slip / model.generate`` tokens/s at batch 1 (target >= 0.70 on the 2-core CPU).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time

import torch

from phaselm import PhaseSlipSampler, Sampler, load_causal_lm

PROMPT = "The ancient door creaked open"


def hf_generate(model, tok, prompts, n):
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left").to(model.device)
    torch.manual_seed(0)
    start = time.perf_counter()
    model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=True, temperature=0.65, top_k=40,
                   top_p=1.0, pad_token_id=tok.pad_token_id)
    _sync(model)
    return len(prompts) * n / (time.perf_counter() - start)


def ours(sampler, prompts, n, **kw):
    start = time.perf_counter()
    out = sampler.generate(prompts, max_new_tokens=n, top_k=40, seed=0, stop_at_eos=False, return_details=True, **kw)
    _sync(sampler.model)
    return out.new_tokens / (time.perf_counter() - start)


def _sync(model):
    if model.device.type == "cuda":
        torch.cuda.synchronize()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args()

    model, tok = load_causal_lm(args.model, device=args.device)
    phase = PhaseSlipSampler(model, tok)  # published defaults: noise 0.03, alpha 0.45, window 12
    t0 = time.perf_counter()
    cal = phase.calibrate_heads(search_layers=min(6, model.config.num_hidden_layers))
    calib_s = time.perf_counter() - t0
    plain = Sampler(model, tok)
    methods = {
        "phase_slip": lambda p: ours(phase, p, args.tokens),
        "ours_standard": lambda p: ours(plain, p, args.tokens, temperature=0.65),
        "hf_generate": lambda p: hf_generate(model, tok, p, args.tokens),
    }
    results = {}
    for batch in (1, args.batch):
        prompts = [PROMPT] * batch
        for fn in methods.values():  # warm-up
            fn(prompts[:1] if batch == 1 else prompts)
        samples = {name: [] for name in methods}
        for _ in range(args.repeats):
            for name, fn in methods.items():
                samples[name].append(fn(prompts))
        results[batch] = {name: statistics.median(v) for name, v in samples.items()}

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"model: {args.model or 'embedded SmolLM2-135M'}  device: {args.device} ({device})  "
          f"threads: {torch.get_num_threads()}  torch {torch.__version__}  commit {commit}")
    print(f"heads: {cal.selected}  (calibration {calib_s:.1f} s)  tokens: {args.tokens}  repeats: {args.repeats}")
    for batch, r in results.items():
        print(f"batch {batch}: " + "  ".join(f"{k} {v:.1f} tok/s" for k, v in r.items())
              + f"  | phase/ours {r['phase_slip'] / r['ours_standard']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "heads": cal.selected, "device": device, "commit": commit,
                       "tokens": args.tokens, "repeats": args.repeats}, f, indent=2)
    print(f"ratio: {results[1]['phase_slip'] / results[1]['hf_generate']:.2f}")


if __name__ == "__main__":
    main()
