"""A trained phaselm run through lm-evaluation-harness (the optional ``[eval]`` extra), offline, on
local JSON tasks: lm-eval's loglikelihoods and generations are the model's own, and Phase-Slip runs
inside lm-eval's generate_until through ``gen_kwargs``. Skipped when lm_eval is not installed."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from phaselm.training.config import load_config  # noqa: E402
from phaselm.training.trainer import Trainer  # noqa: E402
from tests.test_bad_inputs import CORPUS  # noqa: E402

BLOCK = 32
CONFIG = f"""
data: {{name: text, path: {{tmp}}/corpus.txt, tokenizer: char}}
model: {{type: phasegpt, phase_layers: [1], n_osc: 2, block_size: {BLOCK}, n_layer: 2, n_head: 2, n_embd: 16}}
train: {{out_dir: {{tmp}}/run, max_iters: 40, batch_size: 8, lr: 0.01, warmup_iters: 0, eval_interval: 40,
        eval_max_tokens: 64, log_interval: 40, device: cpu, seed: 1}}
"""
# a loglikelihood task (two choices; lm-eval joins context and choice with one space) and a
# generate_until task; "Z" and "!" are not in the corpus (the unknown token), "" is scored after
# the end-of-text token (lm-eval's prefix token)
CHOICES = [{"context": "ROMEO. But soft, what", "choices": ["light", "Zight"], "answer": 0},
           {"context": "It is the east, and", "choices": ["Juliet", "Romeo!"], "answer": 0},
           {"context": "", "choices": ["ROMEO.", "JULIET."], "answer": 0}]
PROMPTS = [{"context": "JULIET. O Romeo, ", "answer": "Romeo"}, {"context": "It is the east, and", "answer": " J"},
           {"context": "ROMEO. But soft!", "answer": "X"}]
MAX_GEN = 8
TASKS = f"""
task: phaselm_choice
dataset_path: json
dataset_kwargs: {{data_files: {{test: {{tmp}}/choice.jsonl}}, cache_dir: {{tmp}}/datasets}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list: [{{metric: acc}}]
---
task: phaselm_generate
dataset_path: json
dataset_kwargs: {{data_files: {{test: {{tmp}}/generate.jsonl}}, cache_dir: {{tmp}}/datasets}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs: {{until: ["\\n"], max_gen_toks: {MAX_GEN}, do_sample: false}}
metric_list: [{{metric: exact_match}}]
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """``(run folder, task folder)``: a PhaseGPT trained 40 steps on a char corpus, and the two tasks."""
    tmp = tmp_path_factory.mktemp("lm_eval")
    (tmp / "corpus.txt").write_text(CORPUS)
    (tmp / "cfg.yaml").write_text(CONFIG.replace("{tmp}", str(tmp)))
    Trainer(load_config(tmp / "cfg.yaml"), progress=False).train()
    tasks = tmp / "tasks"
    tasks.mkdir()
    for name, docs in (("choice", CHOICES), ("generate", PROMPTS)):
        (tmp / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    for i, text in enumerate(TASKS.replace("{tmp}", str(tmp)).split("---\n")):
        (tasks / f"task{i}.yaml").write_text(text)
    return tmp / "run", tasks


def evaluate(run: Path, tasks: Path, names: list[str], batch_size: int = 4, **kw) -> dict:
    """lm-eval's Python API on the local tasks; ``max_length``: the model's context (lm-eval does not
    find it under the name ``block_size``)."""
    return lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(run), "max_length": BLOCK, "device": "cpu", "dtype": "float32"},
        tasks=names, task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        batch_size=batch_size, log_samples=True, bootstrap_iters=0, **kw)


def load(run: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(run).eval(), AutoTokenizer.from_pretrained(run)


def generated(samples: list[dict]) -> dict[str, str]:
    return {s["doc"]["context"]: s["filtered_resps"][0] for s in samples}


def until_newline(tok, ids: torch.Tensor) -> str:
    return tok.decode(ids, skip_special_tokens=True).split("\n")[0]


def test_lm_eval_scores_and_generates_with_the_models_own_numbers(setup):
    run, tasks = setup
    out = evaluate(run, tasks, ["phaselm_choice", "phaselm_generate"])
    model, tok = load(run)
    assert tok.eos_token_id is not None and tok.unk_token_id is not None
    # loglikelihood: lm-eval's log-probability of each choice is the model's
    scores = {s["doc"]["context"]: [ll for ll, _ in s["filtered_resps"]] for s in out["samples"]["phaselm_choice"]}
    correct = 0
    for doc in CHOICES:
        context = tok(doc["context"])["input_ids"] or [tok.eos_token_id]
        ours = []
        for choice in doc["choices"]:
            cont = tok(" " + choice)["input_ids"]
            with torch.no_grad():
                logp = model(torch.tensor([context + cont])).logits[0, -len(cont) - 1:-1].log_softmax(-1)
            ours.append(logp.gather(-1, torch.tensor(cont)[:, None]).sum().item())
        assert scores[doc["context"]] == pytest.approx(ours, abs=1e-4)
        correct += max(range(len(ours)), key=ours.__getitem__) == doc["answer"]
    assert out["results"]["phaselm_choice"]["acc,none"] == pytest.approx(correct / len(CHOICES))
    # generate_until: greedy text up to the stop string, as model.generate gives it
    texts = generated(out["samples"]["phaselm_generate"])
    for doc in PROMPTS:
        ids = tok(doc["context"], return_tensors="pt")["input_ids"]
        greedy = model.generate(ids, max_new_tokens=MAX_GEN, do_sample=False, pad_token_id=tok.eos_token_id)
        assert texts[doc["context"]] == until_newline(tok, greedy[0, ids.shape[1]:])
    assert "exact_match,none" in out["results"]["phaselm_generate"]


def test_phase_slip_runs_inside_lm_eval_generate_until_through_gen_kwargs(setup):
    from phaselm.sampling import CUSTOM_GENERATE_DIR, phase_slip_generate

    run, tasks = setup
    heads = [(0, 0), (1, 1)]
    slip = dict(custom_generate=CUSTOM_GENERATE_DIR, trust_remote_code=True, heads=heads, rotation_seed=7)
    plain = generated(evaluate(run, tasks, ["phaselm_generate"], batch_size=1)["samples"]["phaselm_generate"])
    zero = evaluate(run, tasks, ["phaselm_generate"], batch_size=1, gen_kwargs=dict(slip, noise_scale=0.0))
    assert generated(zero["samples"]["phaselm_generate"]) == plain  # noise 0 is plain decoding, token for token
    strong = dict(noise_scale=2.5, logit_fusion_alpha=0.0, entropy_center=-10.0)
    out = evaluate(run, tasks, ["phaselm_generate"], batch_size=1, gen_kwargs=dict(slip, **strong))
    texts = generated(out["samples"]["phaselm_generate"])
    assert texts != plain  # the perturbed pass really ran inside lm-eval
    model, tok = load(run)
    for doc in PROMPTS:  # what lm-eval returns is Phase-Slip's own output for the same settings
        ids = tok(doc["context"], return_tensors="pt")["input_ids"]
        ours = phase_slip_generate(model, ids, max_new_tokens=MAX_GEN, do_sample=False, heads=heads, rotation_seed=7,
                                   pad_token_id=tok.eos_token_id, use_cache=True, **strong)
        assert texts[doc["context"]] == until_newline(tok, ours[0, ids.shape[1]:])


def test_the_lm_eval_command_line_loads_a_run_through_auto_map(setup, tmp_path):
    """``lm_eval --model hf --model_args pretrained=RUN,trust_remote_code=True``: the run folder's
    ``auto_map`` lets lm-eval's own process load the model without importing phaselm first."""
    run, tasks = setup
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "hf",
           "--model_args", f"pretrained={run},trust_remote_code=True,max_length={BLOCK},dtype=float32",
           "--tasks", "phaselm_choice", "--include_path", str(tasks), "--device", "cpu", "--batch_size", "4",
           "--output_path", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert 0 <= result["results"]["phaselm_choice"]["acc,none"] <= 1
