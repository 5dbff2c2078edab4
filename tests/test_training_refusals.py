"""Trainer edge cases: a refusal under torchrun (every rank stops cleanly, none waits in a collective
for a rank that stopped or prints a traceback, and phaselm prints the one line once), and a run
saved by an older phaselm resuming with its own vocabulary."""
import os
import socket
import subprocess
import sys

TINY = """
data: {name: tiny-shakespeare, tokenizer: char}
model: {block_size: 16, n_layer: 1, n_head: 2, n_embd: 16}
train: {max_iters: 2, batch_size: 4, warmup_iters: 1, eval_interval: 2, eval_max_tokens: 200, device: cpu}
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_into_a_folder_holding_a_run_is_one_line_on_every_rank(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(TINY)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = ["-m", "phaselm", "train", str(cfg), f"train.out_dir={tmp_path / 'run'}"]
    subprocess.run([sys.executable, *run], check=True, capture_output=True, env=env)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(_port()), *run], capture_output=True, text=True, env=env,
                         timeout=300)
    ours = [line for line in out.stderr.splitlines() if line.startswith("phaselm train:")]
    assert len(ours) == 1 and ours[0].startswith(f"phaselm train: error: {tmp_path / 'run'} already holds a run ("), out.stderr
    assert ours[0].endswith("pass --resume to continue it, --overwrite to delete it and start again, or choose "
                            "another train.out_dir")
    workers = out.stderr.split("Traceback (most recent call last)")  # torchrun's own launcher traceback follows
    assert len(workers) == 2 and "torch/distributed/run.py" in workers[1], out.stderr  # no worker traceback
    assert "Root Cause" in out.stderr and "exitcode  : 2" in out.stderr  # the first rank out exited with phaselm's status


def test_nproc_per_node_trains_ddp_and_refuses_an_occupied_folder_in_one_line_before_launching(tmp_path):
    """``phaselm train --nproc-per-node 2`` trains on two ranks (torchrun under the hood); into the
    folder it then holds, the same command is one line and exit 2, with no process launched."""
    import json

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(TINY)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-m", "phaselm", "train", str(cfg), f"train.out_dir={tmp_path / 'run'}", "--nproc-per-node", "2"]
    first = subprocess.run(run, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr
    assert json.loads((tmp_path / "run" / "checkpoints" / "step-000002" / "state.json").read_text())["world_size"] == 2
    again = subprocess.run(run, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 2 and again.stdout == ""
    lines = again.stderr.splitlines()
    assert len(lines) == 1, again.stderr
    assert lines[0].startswith(f"phaselm train: error: {tmp_path / 'run'} already holds a run (checkpoints, metrics.jsonl, ")
    assert lines[0].endswith("pass --resume to continue it, --overwrite to delete it and start again, or choose "
                             "another train.out_dir")
    bad = subprocess.run(run[:-1] + ["3"], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and bad.stderr.splitlines() == [
        "phaselm train: error: train.batch_size (4) must be divisible by --nproc-per-node (3)"]


def test_nproc_per_node_on_cuda_needs_a_gpu_per_process_and_no_fixed_gpu(monkeypatch):
    """A CUDA launch puts process r on GPU r: too few GPUs, or a fixed cuda:N for every process, is one
    line naming the fix (``phaselm train`` and ``phaselm bench tasks`` share the check)."""
    import pytest
    import torch

    from phaselm.cli import _check_nproc

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"^--nproc-per-node 2 on CUDA needs 2 GPUs, this machine has 1; lower"):
        _check_nproc(2, 8, "--batch-size", "cuda", "--device")
    with pytest.raises(ValueError, match=r"^train.device=cuda:0 would put all 2 processes on one GPU; use train.device=cuda"):
        _check_nproc(2, 8, "train.batch_size", "cuda:0", "train.device")
    with pytest.raises(ValueError, match=r"needs 2 GPUs"):
        _check_nproc(2, 8, "train.batch_size", "auto", "train.device")
    _check_nproc(1, 8, "--batch-size", "cuda:0", "--device")  # one process: any device
    _check_nproc(2, 8, "--batch-size", "cpu", "--device")


def test_a_char_run_from_before_the_special_tokens_resumes_with_its_own_vocabulary(tmp_path, monkeypatch):
    """A checkpoint whose char vocabulary has no end-of-text/unknown tokens (saved by an older
    phaselm) resumes with that vocabulary: same ids, same embedding rows, no shape error."""
    from phaselm.data import datasets
    from phaselm.training.config import load_config
    from phaselm.training.trainer import Trainer

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(TINY.replace("max_iters: 2", "max_iters: 4"))
    over = [f"train.out_dir={tmp_path / 'run'}"]
    with monkeypatch.context() as m:
        m.setattr(datasets, "char_vocab", lambda text: sorted(set(text)))  # the old vocabulary
        old = Trainer(load_config(str(cfg), over + ["train.max_iters=2"]), progress=False)
        old.train()
    width = old.raw_model.get_input_embeddings().weight.shape[0]
    resumed = Trainer(load_config(str(cfg), over), resume=True, progress=False)
    assert resumed.train()["iters"] == 4
    assert resumed.tokenizer.vocab_size == width == resumed.raw_model.get_input_embeddings().weight.shape[0]
    assert resumed.tokenizer.tok.unk_token is None  # the saved vocabulary, not today's
