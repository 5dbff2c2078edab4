"""Why Phase-Slip deterministic does (not) leave loops: the entropy gate's weight on the perturbed pass.

On the first 8 prompts on which greedy looped in results/loops/methods/greedy.json, decode 128 tokens
with PhaseSlipSampler(do_sample=False) and record per step the clean entropy H, the gate's clean
weight α_eff = α + (1 − α)·sigmoid(c − H) and KL(clean ‖ perturbed); once with the default gate
(α = 0.45, c = 2.5) and once with the gate open (α = 0, c = −100: α_eff = 0, the fused logits are the
perturbed logits); writes results/loops/gate_diagnostic.json. Exploratory (8 prompts).
Run: OMP_NUM_THREADS=1 .venv/bin/python experiments/loop_gate_diagnostic.py
"""
import json
from pathlib import Path

import phaselm
from phaselm.evaluation.loops import has_loop
from phaselm.utils import provenance
from phaselm.sampling import PhaseSlipSampler

HERE = Path(__file__).resolve().parents[1] / "results" / "loops"
model, tok = phaselm.load_causal_lm()
greedy = json.loads((HERE / "methods" / "greedy.json").read_text())
ps1 = json.loads((HERE / "methods" / "phase_slip_1.json").read_text())
heads = [tuple(h) for h in ps1["heads"]]
prompts_by_id = {r["id"]: r["prompt"] for r in phaselm.evaluation.loops.load_prompts()}
looped = [g["id"] for g in greedy["generations"] if has_loop(g["token_ids"])][:8]
prompts = [prompts_by_id[i] for i in looped]
out = {"prompt_ids": looped, "heads": heads, "max_new_tokens": 128, "provenance": provenance(), "runs": {}}
for name, kw in {"gate_default_noise2": dict(noise_scale=2.0),
                 "gate_open_noise2": dict(noise_scale=2.0, logit_fusion_alpha=0.0, entropy_center=-100.0)}.items():
    sampler = PhaseSlipSampler(model, tok, heads=heads, **kw)
    res = sampler.generate(prompts, max_new_tokens=128, do_sample=False, seed=list(range(len(prompts))),
                           return_details=True)
    d = res.diagnostics
    out["runs"][name] = {
        "settings": kw,
        "mean_clean_entropy": float(d["entropy"].mean()), "mean_clean_weight": float(d["clean_weight"].mean()),
        "mean_perturbed_weight": float((1 - d["clean_weight"]).mean()), "mean_kl": float(d["kl"].mean()),
        "loop_rate": sum(has_loop(t) for t in res.token_ids) / len(prompts),
        "texts": [t[:200] for t in res.texts[:3]],
    }
    print(name, {k: v for k, v in out["runs"][name].items() if k != "texts"})
(HERE / "gate_diagnostic.json").write_text(json.dumps(out, indent=1))
