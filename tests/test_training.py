"""Trainer: config validation, exact resume, atomic checkpoints, NaN stop, 2-process DDP."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from phaselm_cli import main
from phaselm.training import checkpoint as ckpt
from phaselm.training.config import ConfigError, load_config
from phaselm.training.trainer import Trainer, TrainingError
from phaselm.utils import read_jsonl

TINY = """
data: {name: tiny-shakespeare, tokenizer: char}
model: {block_size: 16, n_layer: 1, n_head: 2, n_embd: 16}
train: {max_iters: 8, lr_decay_iters: 8, batch_size: 4, warmup_iters: 2, eval_interval: 4,
        eval_max_tokens: 400, log_interval: 1, device: cpu, seed: 3}
"""


def config_file(tmp_path, text=TINY):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def rows(out_dir, split):
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


@pytest.mark.parametrize("text, override, needle", [
    ("train:\n  max_iters: 5\n  lr_decay: 3\n", [], "unknown key 'train.lr_decay'"),
    (TINY, ["train.max_iters=abc"], "train.max_iters must be int"),
    (TINY, ["model.n_layers=2"], "unknown key 'model.n_layers'"),
    (TINY, ["data.name=text", "data.path=/no/such/file.txt"], "data.path"),
    (TINY, ["train.lr=-1"], "train.lr"),
])
def test_config_errors_name_the_key(tmp_path, text, override, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        load_config(config_file(tmp_path, text), override)


def test_cli_config_errors_are_one_line(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert main(["train", str(config_file(tmp_path)), "train.batch_size=x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "file not found" in err[0] and "train.batch_size" in err[1]


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    cfg_path = config_file(tmp_path)
    full = load_config(cfg_path, [f"train.out_dir={tmp_path / 'full'}"])
    Trainer(full, progress=False).train()
    half = load_config(cfg_path, [f"train.out_dir={tmp_path / 'half'}", "train.max_iters=4"])
    Trainer(half, progress=False).train()
    rest = load_config(cfg_path, [f"train.out_dir={tmp_path / 'half'}"])
    Trainer(rest, resume=True, progress=False).train()
    a, b = rows(tmp_path / "full", "train"), rows(tmp_path / "half", "train")
    assert [r["iter"] for r in a] == [r["iter"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-6)
    va, vb = rows(tmp_path / "full", "val"), rows(tmp_path / "half", "val")
    assert [r["iter"] for r in va] == [r["iter"] for r in vb] and va[-1]["loss"] == pytest.approx(vb[-1]["loss"], abs=1e-6)
    with pytest.raises(TrainingError, match="already holds a run"):
        Trainer(full, progress=False).train()


def test_a_killed_save_leaves_the_previous_checkpoint_readable(tmp_path, monkeypatch):
    cfg = load_config(config_file(tmp_path), [f"train.out_dir={tmp_path / 'run'}", "train.max_iters=4"])
    Trainer(cfg, progress=False).train()
    before = ckpt.latest_checkpoint(tmp_path / "run")
    assert before.name == "step-000004"

    def crash(*a, **k):
        raise OSError("killed while writing")

    model = torch.nn.Linear(2, 2)
    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path / "run", 8, model, torch.optim.AdamW(model.parameters()), {}, {})
    assert ckpt.latest_checkpoint(tmp_path / "run") == before
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if ".tmp" in p.name]
    assert main(["eval", str(tmp_path / "run"), "--split", "val"]) == 0


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    from phaselm.models.gpt import GPTForCausalLM

    calls = {"n": 0}
    original = GPTForCausalLM.forward

    def poisoned(self, idx, targets=None, **kwargs):
        out = original(self, idx, targets, **kwargs)
        if targets is not None:
            calls["n"] += 1
            if calls["n"] > 5:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(GPTForCausalLM, "forward", poisoned)
    cfg = load_config(config_file(tmp_path), [f"train.out_dir={tmp_path / 'run'}"])
    with pytest.raises(TrainingError, match="non-finite training loss .* iteration 5.*last good checkpoint is .*step-000004"):
        Trainer(cfg, progress=False).train()
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "step-000004"


TASK = """
data: {name: fuzzy_recall, seq_len: 64, num_train: 256, num_test: 64}
model: {block_size: 64, n_layer: 1, n_head: 2, n_embd: 16}
train: {max_iters: 8, lr_decay_iters: 8, batch_size: 4, warmup_iters: 2, eval_interval: 4, log_interval: 1,
        device: cpu, seed: 3}
"""


@pytest.mark.parametrize("text", [TINY, TASK], ids=["text", "fuzzy recall (targets per example vary)"])
def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path, text):
    cfg_path = config_file(tmp_path, text)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "phaselm", "train", str(cfg_path), f"train.out_dir={tmp_path / 'one'}"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "phaselm", "train", str(cfg_path), f"train.out_dir={tmp_path / 'two'}"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = rows(tmp_path / "one", "train"), rows(tmp_path / "two", "train")
    assert len(a) == len(b) == 8
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-5)
    wa = ckpt.load_file(str(ckpt.latest_checkpoint(tmp_path / "one") / "model.safetensors"))
    wb = ckpt.load_file(str(ckpt.latest_checkpoint(tmp_path / "two") / "model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_a_checkpoint_saved_before_parts_were_recorded_resumes_with_an_unknown_first_part(tmp_path, monkeypatch):
    save = ckpt.save_checkpoint

    def without_parts(*args, **kwargs):  # the state a checkpoint of before 2026-12-08 holds
        args[5]["metrics"].pop("parts")
        return save(*args, **kwargs)

    cfg_path = config_file(tmp_path)
    monkeypatch.setattr(ckpt, "save_checkpoint", without_parts)
    Trainer(load_config(cfg_path, [f"train.out_dir={tmp_path / 'r'}", "train.max_iters=4"]), progress=False).train()
    monkeypatch.setattr(ckpt, "save_checkpoint", save)
    summary = Trainer(load_config(cfg_path, [f"train.out_dir={tmp_path / 'r'}"]), resume=True, progress=False).train()
    first, second = summary["parts"]
    assert first == {"steps": [0, 4], "seconds": None} and second["steps"] == [4, 8] and second["seconds"] >= 0
    from phaselm.evaluation.tasks_bench import train_seconds

    assert train_seconds(summary, 99.0) == round(second["seconds"], 1)  # the unknown part counts 0
    assert train_seconds({"diverged": "..."}, 99.0) == 99.0


def test_ctrl_c_saves_a_checkpoint_and_resume_continues_the_same_curve(tmp_path, monkeypatch):
    import phaselm.training.trainer as trainer_mod

    cfg_path = config_file(tmp_path)
    Trainer(load_config(cfg_path, [f"train.out_dir={tmp_path / 'full'}"]), progress=False).train()
    original = trainer_mod.lr_at

    def interrupt_at_6(it, cfg):
        if it == 6:
            raise KeyboardInterrupt
        return original(it, cfg)

    monkeypatch.setattr(trainer_mod, "lr_at", interrupt_at_6)
    cfg = load_config(cfg_path, [f"train.out_dir={tmp_path / 'cut'}"])
    with pytest.raises(TrainingError, match="interrupted at iteration 6.*--resume"):
        Trainer(cfg, progress=False).train()
    assert ckpt.latest_checkpoint(tmp_path / "cut").name == "step-000006"
    monkeypatch.setattr(trainer_mod, "lr_at", original)
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:  # a line torn by a kill mid-write
        f.write('{"split": "train", "it')
    assert read_jsonl(tmp_path / "cut" / "metrics.jsonl")[-1]["iter"] <= 6  # readers skip the torn line
    summary = Trainer(cfg, resume=True, progress=False).train()
    assert [p["steps"] for p in summary["parts"]] == [[0, 6], [6, 8]]  # how the run was trained, part by part
    assert all(p["seconds"] >= 0 and p["machine"] and p["device"] == "cpu" for p in summary["parts"])
    a, b = rows(tmp_path / "full", "train"), rows(tmp_path / "cut", "train")  # every line parses: the resume dropped the torn one
    assert [r["iter"] for r in b] == list(range(1, 9))
    assert all(ra["loss"] == pytest.approx(rb["loss"], abs=1e-6) for ra, rb in zip(a, b))


def test_model_section_checks_run_at_load_time(tmp_path):
    with pytest.raises(ConfigError, match="n_embd"):
        load_config(config_file(tmp_path), ["model.n_embd=31"])


def test_phasegpt_trains_logs_r_per_layer_and_applies_the_regulariser(tmp_path):
    overrides = [f"train.out_dir={tmp_path / 'p'}", "train.max_iters=4", "model.type=phasegpt", "model.n_layer=2",
                 "model.phase_layers=[1]", "model.n_osc=4", "model.coherence_reg=0.1", "model.coherence_target=0.0"]
    Trainer(load_config(config_file(tmp_path), overrides), progress=False).train()
    last = rows(tmp_path / "p", "train")[-1]
    assert 0 < last["layer1.R_mean"] <= 1 and "layer0.R_mean" not in last
    assert last["coherence_reg"] > 0
    # interpret the trained checkpoint on real text
    text = tmp_path / "text.txt"
    text.write_text("ROMEO.\nBut soft, what light through yonder window breaks?\n" * 10)
    assert main(["interpret", str(tmp_path / "p"), "--text", str(text), "--out", str(tmp_path / "interp")]) == 0
    summary = json.loads((tmp_path / "interp" / "summary.json").read_text())
    layer = summary["layers"]["1"]
    assert len(layer["R_per_head"]) == 2 and all(0 <= r <= 1 for r in layer["R_per_head"])
    assert len(layer["R_over_time"]) == 16
    for png in ("r_by_layer_head", "r_over_time", "phase_heatmap", "coherence"):
        assert (tmp_path / "interp" / f"{png}.png").stat().st_size > 1000
    # or on a split of the run's own dataset
    assert main(["interpret", str(tmp_path / "p"), "--split", "val", "--windows", "2", "--out", str(tmp_path / "iv")]) == 0
    assert json.loads((tmp_path / "iv" / "summary.json").read_text())["windows"] == 2
    # the run's summary for results/ carries the val-loss and R curves of its log, and a grid of it reports them
    grid = tmp_path / "grid" / "phasegpt" / "seed-1"
    assert main(["report", "run", str(tmp_path / "p"), str(grid), "--command", "phaselm train x.yaml"]) == 0
    summary = json.loads((grid / "summary.json").read_text())
    assert summary["command"] == "phaselm train x.yaml" and summary["curves"]["R"]["layer1"][-1] == [4, last["layer1.R_mean"]]
    assert [p[1] for p in summary["curves"]["val_loss"]] == [r["loss"] for r in rows(tmp_path / "p", "val")]
    assert main(["report", "grid", str(tmp_path / "grid"), "--baseline", "phasegpt", "--plots", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "val_curves.png").exists() and (tmp_path / "plots" / "r_curves.png").exists()


def test_interpret_needs_a_phasegpt_checkpoint(tmp_path, capsys):
    Trainer(load_config(config_file(tmp_path), [f"train.out_dir={tmp_path / 'g'}", "train.max_iters=4"]),
            progress=False).train()
    text = tmp_path / "t.txt"
    text.write_text("some real text here\n" * 5)
    assert main(["interpret", str(tmp_path / "g"), "--text", str(text)]) == 2
    assert "no phase layers" in capsys.readouterr().err


@pytest.mark.parametrize("override, needle", [
    (["model.phase_layers=[0]"], "unknown key .model.phase_layers. for model.type gpt"),
    (["model.type=phasegpt", "model.phase_layers=[5]"], "outside"),
    (["model.type=phasegpt", "model.phase_layers=one"], "phase_layers.* expected"),
])
def test_phasegpt_config_errors(tmp_path, override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(config_file(tmp_path), override)


def test_every_committed_config_loads():
    paths = sorted(Path(__file__).parent.parent.glob("configs/**/*.yaml"))
    assert len(paths) >= 20
    for path in paths:
        load_config(path)


def test_a_character_only_in_val_or_test_still_trains_and_evaluates(tmp_path):
    # the text dataset splits each file 90/5/5 by lines, so 'é' and '⁻' land in val/test only
    (tmp_path / "corpus.txt").write_text("to be or not to be\n" * 180 + "café\n" * 10 + "x⁻¹\n" * 10)
    cfg = TINY.replace("{name: tiny-shakespeare, tokenizer: char}",
                       f"{{name: text, path: {tmp_path / 'corpus.txt'}, tokenizer: char}}")
    Trainer(load_config(config_file(tmp_path, cfg), [f"train.out_dir={tmp_path / 'r'}", "train.max_iters=2"]),
            progress=False).train()
    assert main(["eval", str(tmp_path / "r"), "--split", "test"]) == 0


def test_a_config_inherits_from_its_base_key_by_key(tmp_path):
    config_file(tmp_path)  # cfg.yaml, the base
    (tmp_path / "arms").mkdir()
    arm = tmp_path / "arms" / "deeper.yaml"
    arm.write_text("base: ../cfg.yaml\nmodel: {n_layer: 2}\ntrain: {seed: 5}\n")
    whole = load_config(config_file(tmp_path), ["model.n_layer=2", "train.seed=5"]).to_dict()
    assert load_config(arm).to_dict() == whole
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="inherits from itself"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="file not found: .*missing.yaml .the base of"):
        load_config(tmp_path / "c.yaml")


def test_a_run_folder_is_a_transformers_model_folder(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from phaselm.training.trainer import Trainer, load_for_inference

    run = tmp_path / "run"
    Trainer(load_config(config_file(tmp_path), [f"train.out_dir={run}", "train.max_iters=4"]), progress=False).train()
    model = AutoModelForCausalLM.from_pretrained(run).eval()
    tok = AutoTokenizer.from_pretrained(run)
    ours, ours_tok, _, _ = load_for_inference(run)
    enc = tok("ROMEO:", return_tensors="pt")
    assert enc["input_ids"][0].tolist() == ours_tok.encode("ROMEO:")
    assert torch.equal(model(enc["input_ids"]).logits, ours(enc["input_ids"]).logits)
    torch.manual_seed(0)
    out = model.generate(**enc, max_new_tokens=10, do_sample=True, top_p=0.9)
    assert tok.decode(out[0]).startswith("ROMEO:") and out.shape == (1, 16)
    latest = ckpt.latest_checkpoint(run)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in latest.iterdir()}


def test_sample_decodes_a_trained_run_and_phase_slip_at_noise_zero_matches_it(tmp_path, capsys):
    run = tmp_path / "run"
    cfg = TINY.replace("n_layer: 1", "n_layer: 2, type: phasegpt, phase_layers: [1], n_osc: 4")
    Trainer(load_config(config_file(tmp_path, cfg), [f"train.out_dir={run}", "train.max_iters=4"]), progress=False).train()
    common = ["--max-new-tokens", "9", "--temperature", "0.8", "--top-p", "0.95", "--seed", "1"]
    texts = []
    for extra in (["--sampler", "standard"], ["--sampler", "phase-slip", "--noise-scale", "0"]):
        capsys.readouterr()
        assert main(["sample", str(run), "ROMEO:", *common, *extra]) == 0
        texts.append(capsys.readouterr().out[:-1])  # print's newline
    assert texts[0].startswith("ROMEO:") and len(texts[0]) == len("ROMEO:") + 9
    assert texts[1] == texts[0]


def test_flops_per_token_is_nanogpts_estimate_and_mfu_needs_a_known_gpu():
    from phaselm.models import GPTConfig, GPTForCausalLM
    from phaselm.training.trainer import flops_per_token, peak_flops

    model = GPTForCausalLM(GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=16))
    n = sum(p.numel() for p in model.parameters())
    assert flops_per_token(model, 32) == 6 * n + 12 * 2 * 16 * 32
    assert peak_flops(torch.device("cpu")) is None
