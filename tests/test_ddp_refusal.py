"""A refusal under torchrun: every rank stops cleanly (none waits in a collective for a rank that
stopped, none prints a traceback), and phaselm prints the one line once, whichever rank found it."""
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
