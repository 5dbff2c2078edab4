"""Decode speed of Phase-Slip vs plain sampling vs ``model.generate(do_sample=True)``, one run.

    python benchmarks/sampler_speed.py [--model NAME] [--device cpu|cuda] [--tokens 128] [--repeats 3] [--compile]

All methods use T=0.65, top-k 40 and generate exactly ``--tokens`` new tokens (EOS ignored):

* ``phase_slip``: :class:`phaselm.PhaseSlipSampler` (phaselm's short path);
* ``phase_slip_generate``: Phase-Slip inside ``model.generate`` (``phaselm.sampling.phase_slip_generate``,
  the custom-generate loop; same step);
* ``phase_slip_plausible``: the short path with ``plausible_only=True`` (perturbed logits over the
  clean top-k set only);
* ``ours_standard``: :class:`phaselm.Sampler`; ``hf_generate``: ``model.generate(do_sample=True)``.
* with ``--compile``: ``hf_generate_static_compiled`` and ``phase_slip_generate_static_compiled``, the two
  ``generate`` loops with ``cache_implementation="static"`` and a compiled decoding step (transformers'
  ``get_compiled_call``, forced on the CPU by ``CompileConfig._compile_all_devices``); the first call of
  each, per batch size, is the compile, reported as ``compile_s``. Their ratio and the compiled Phase-Slip
  against eager Phase-Slip (``phase_slip_generate``) are printed per batch.

At batch 1 and then ``--batch``; the methods are interleaved and each is timed ``--repeats`` times
(median), so machine noise hits them alike. It also measures how often the plausible-set option
changes a draw: at every step of a Phase-Slip run both fused distributions are formed from the same
clean and perturbed logits and sampled with the same uniform number (inverse CDF), and the share of
steps whose token differs is reported. The last line is the ratio ``Phase-Slip / model.generate``
tokens/s at batch 1 (target >= 0.85 on the 2-core CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess

import torch
from transformers import CompileConfig

from common import seconds
from phaselm import PhaseSlipSampler, Sampler, load_causal_lm
from phaselm.sampling import PhaseSlipStep, phase_slip_generate
from phaselm.sampling.processors import SamplingConfig, process_logits

PROMPT = "The ancient door creaked open"
COMPILE = CompileConfig()
COMPILE._compile_all_devices = True  # generate compiles on accelerators only unless told
PROMPTS = ["The ancient door creaked open", "Once upon a time in a small village", "The scientist looked at the data and",
           "In the beginning of the war, the king"]


def hf_generate(model, tok, prompts, n, compiled=False, **phase):
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left").to(model.device)
    torch.manual_seed(0)
    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=True, temperature=0.65, top_k=40, top_p=1.0,
              pad_token_id=tok.pad_token_id)
    if compiled:
        kw.update(cache_implementation="static", compile_config=COMPILE)
    run = (lambda: phase_slip_generate(model, **enc, **kw, **phase)) if phase else (lambda: model.generate(**enc, **kw))
    return len(prompts) * n / seconds(run, model.device)


def ours(sampler, prompts, n, **kw):
    out = {}
    s = seconds(lambda: out.update(r=sampler.generate(prompts, max_new_tokens=n, top_k=40, seed=0, stop_at_eos=False,
                                                       return_details=True, **kw)), sampler.model.device)
    return out["r"].new_tokens / s


@torch.no_grad()
def plausible_draw_changes(phase: PhaseSlipSampler, tok, n: int, noise_scales=(0.03, 0.5)) -> dict:
    """Share of steps whose drawn token changes when the perturbed logits are restricted to the clean
    pass's top-k set, at the same context, rotations and uniform number (see the module doc)."""
    cfg = SamplingConfig(temperature=0.65, top_k=40)
    out = {}
    for noise in noise_scales:
        changed, total, tv = 0, 0, 0.0
        gen = torch.Generator().manual_seed(1)
        step = PhaseSlipStep(phase.model, noise_scale=noise, heads=phase.heads)
        original = PhaseSlipStep.__call__

        def spy(self, run_forward, batch, diagnostics=None, plausible=None):
            nonlocal changed, total, tv
            outs = {}
            fused = original(self, lambda: outs.setdefault("o", run_forward()), batch, diagnostics, plausible)
            z_clean = outs["o"].logits[:batch, -1].float()
            keep = torch.isfinite(process_logits(z_clean, cfg))
            p_exact = process_logits(fused, cfg).softmax(-1)
            p_plaus = process_logits(fused.masked_fill(~keep, float("-inf")), cfg).softmax(-1)
            u = torch.rand(batch, 1, generator=gen)
            draw = lambda p: torch.searchsorted(p.cumsum(-1), u * p.sum(-1, keepdim=True)).clamp(max=p.shape[-1] - 1)
            changed += int((draw(p_exact) != draw(p_plaus)).sum())
            total += batch
            tv += float(0.5 * (p_exact - p_plaus).abs().sum(-1).sum())
            return fused

        sampler = PhaseSlipSampler(phase.model, tok, noise_scale=noise, heads=phase.heads)
        sampler.step = step
        PhaseSlipStep.__call__ = spy
        try:
            sampler.generate(PROMPTS, max_new_tokens=n, top_k=40, seed=0, stop_at_eos=False)
        finally:
            PhaseSlipStep.__call__ = original
        out[noise] = {"changed": changed, "draws": total, "share": changed / total, "mean_tv": tv / total}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    parser.add_argument("--compile", action="store_true", help="also time the static-cache compiled generate loops")
    args = parser.parse_args()

    model, tok = load_causal_lm(args.model, device=args.device)
    phase = PhaseSlipSampler(model, tok)  # published defaults: noise 0.03, alpha 0.45, window 12
    cal = {}
    calib_s = seconds(lambda: cal.update(r=phase.calibrate_heads(search_layers=min(6, model.config.num_hidden_layers))),
                      args.device)
    cal = cal["r"]
    plausible = PhaseSlipSampler(model, tok, heads=phase.heads, plausible_only=True)
    plain = Sampler(model, tok)
    methods = {
        "phase_slip": lambda p: ours(phase, p, args.tokens),
        "phase_slip_generate": lambda p: hf_generate(model, tok, p, args.tokens, noise_scale=0.03, heads=phase.heads),
        "phase_slip_plausible": lambda p: ours(plausible, p, args.tokens),
        "ours_standard": lambda p: ours(plain, p, args.tokens, temperature=0.65),
        "hf_generate": lambda p: hf_generate(model, tok, p, args.tokens),
    }
    if args.compile:
        methods["hf_generate_static_compiled"] = lambda p: hf_generate(model, tok, p, args.tokens, compiled=True)
        methods["phase_slip_generate_static_compiled"] = lambda p: hf_generate(
            model, tok, p, args.tokens, compiled=True, noise_scale=0.03, heads=phase.heads)
    results, compile_s = {}, {}
    for batch in (1, args.batch):
        prompts = [PROMPT] * batch
        for name, fn in methods.items():  # warm-up (the one-time kernel measurement, the compile)
            first = seconds(lambda: fn(prompts), args.device)
            if name.endswith("compiled"):
                compile_s[f"{name} batch {batch}"] = first - batch * args.tokens / fn(prompts)
        samples = {name: [] for name in methods}
        for _ in range(args.repeats):
            for name, fn in methods.items():
                samples[name].append(fn(prompts))
        results[batch] = {name: statistics.median(v) for name, v in samples.items()}
    changes = plausible_draw_changes(phase, tok, min(args.tokens, 64))

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"model: {args.model or 'embedded SmolLM2-135M'}  device: {args.device} ({device})  "
          f"threads: {torch.get_num_threads()}  torch {torch.__version__}  commit {commit}  load avg (1 min) {load:.1f}")
    print(f"heads: {cal.selected}  (calibration {calib_s:.1f} s)  tokens: {args.tokens}  repeats: {args.repeats}")
    for batch, r in results.items():
        print(f"batch {batch}: " + "  ".join(f"{k} {v:.1f} tok/s" for k, v in r.items()))
        print(f"batch {batch} ratios vs hf_generate: " + "  ".join(
            f"{k} {v / r['hf_generate']:.2f}" for k, v in r.items() if k != "hf_generate"))
        if args.compile:
            print(f"batch {batch} compiled static: phase_slip / hf_generate "
                  f"{r['phase_slip_generate_static_compiled'] / r['hf_generate_static_compiled']:.2f}  "
                  f"phase_slip compiled / eager {r['phase_slip_generate_static_compiled'] / r['phase_slip_generate']:.2f}")
    for name, s in compile_s.items():
        print(f"compile_s {name}: {s:.1f}")
    for noise, c in changes.items():
        print(f"plausible-set option at noise {noise}: changed {c['changed']} of {c['draws']} draws "
              f"({100 * c['share']:.1f}%), mean total variation {c['mean_tv']:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "heads": cal.selected, "device": device, "commit": commit,
                       "tokens": args.tokens, "repeats": args.repeats, "plausible_draw_changes": changes,
                       "load_avg": load, "compile_s": compile_s}, f, indent=2)
    print(f"ratio: {results[1]['phase_slip'] / results[1]['hf_generate']:.2f}")


if __name__ == "__main__":
    main()
