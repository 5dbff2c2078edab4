"""Checkpoints and run folders: hashes verified on load, resume past damage, locks, SIGTERM, overwrite."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from phaselm_cli import main
from phaselm.training import checkpoint as ckpt
from phaselm.training.config import load_config
from phaselm.training.trainer import Trainer, TrainingError, usable_checkpoint
from tests.test_bad_inputs import CONFIG, CORPUS


def setup_run(tmp_path, *overrides, train=True):
    (tmp_path / "corpus.txt").write_text(CORPUS)
    (tmp_path / "cfg.yaml").write_text(CONFIG.format(tmp=tmp_path))
    cfg = load_config(tmp_path / "cfg.yaml", list(overrides))
    if train:
        Trainer(cfg, progress=False).train()
    return cfg


def metric_iters(run: Path, split="train") -> list[int]:
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["iter"] for r in rows if r["split"] == split]


def rewrite(folder: Path, change) -> None:
    """Change a checkpoint's weights and re-record its hashes: a genuine checkpoint of another model."""
    path = folder / "model.safetensors"
    save_file({k: change(v) for k, v in load_file(str(path)).items()}, str(path))
    state = json.loads((folder / "state.json").read_text())
    ckpt.write_manifest(folder, {k: v for k, v in state.items() if k not in ("files", "state_sha256")})


def test_the_manifest_covers_every_file_and_names_the_one_that_changed(tmp_path):
    folder = tmp_path / "step-000001"
    files = {"config.json": b"{}", "model.safetensors": b"w" * 100, "tokenizer.json": b"t", "sub/extra.bin": b"x"}
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    state = ckpt.write_manifest(folder, {"step": 1})
    assert sorted(state["files"]) == sorted(files) and ckpt.verify(folder)["step"] == 1
    for rel, data in files.items():
        (folder / rel).write_bytes(data + b"!")
        with pytest.raises(ckpt.CheckpointError, match=f"{rel} is damaged"):
            ckpt.verify(folder)
        (folder / rel).unlink()
        with pytest.raises(ckpt.CheckpointError, match=f"{rel} is missing"):
            ckpt.verify(folder)
        (folder / rel).write_bytes(data)
    manifest = json.loads((folder / "state.json").read_text())
    (folder / "state.json").write_text(json.dumps(dict(manifest, step=2)))
    with pytest.raises(ckpt.CheckpointError, match="state.json was edited"):
        ckpt.verify(folder)


def test_resume_falls_back_past_a_damaged_checkpoint_says_so_and_matches_an_uninterrupted_run(tmp_path, capsys):
    full = setup_run(tmp_path, f"train.out_dir={tmp_path / 'full'}", "train.max_iters=4", "train.lr_decay_iters=4")
    cfg = setup_run(tmp_path, "train.max_iters=3", "train.lr_decay_iters=4")
    run = Path(cfg.train.out_dir)
    newest = run / "checkpoints" / "step-000003" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    capsys.readouterr()
    Trainer(load_config(tmp_path / "cfg.yaml", ["train.max_iters=4", "train.lr_decay_iters=4"]), resume=True, progress=False).train()
    err = capsys.readouterr().err
    assert "step-000003" in err and "model.safetensors" in err and "resuming from" in err and "step-000002" in err
    assert metric_iters(run) == metric_iters(Path(full.train.out_dir)) == [1, 2, 3, 4]  # no duplicated rows
    assert metric_iters(run, "val") == [0, 1, 2, 3, 4]
    a = load_file(str(run / "checkpoints" / "step-000004" / "model.safetensors"))
    b = load_file(str(Path(full.train.out_dir) / "checkpoints" / "step-000004" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_without_a_latest_pointer_is_found_and_temporaries_are_removed(tmp_path):
    cfg = setup_run(tmp_path)
    root = Path(cfg.train.out_dir) / "checkpoints"
    (root / "latest").unlink()
    (root / "step-000003.tmp-abc").mkdir()
    (root / "step-000003.tmp-abc" / "model.safetensors").write_bytes(b"half")
    assert ckpt.latest_checkpoint(root.parent).name == "step-000002"
    Trainer(load_config(tmp_path / "cfg.yaml", ["train.max_iters=3"]), resume=True, progress=False).train()
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000001", "step-000002", "step-000003"]
    assert main(["eval", str(root.parent), "--split", "val"]) == 0


def test_overwrite_replaces_the_run_and_nothing_else(tmp_path):
    cfg = setup_run(tmp_path)
    run = Path(cfg.train.out_dir)
    (run / "notes.txt").write_text("mine")
    with pytest.raises(TrainingError, match="--overwrite"):
        Trainer(cfg, progress=False).train()
    Trainer(load_config(tmp_path / "cfg.yaml", ["train.max_iters=1"]), overwrite=True, progress=False).train()
    assert metric_iters(run) == [1] and (run / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-000001"]


def test_a_stale_lock_is_taken_over_and_the_lock_is_held_while_training(tmp_path, monkeypatch, capsys):
    import phaselm.training.trainer as trainer_mod

    cfg = setup_run(tmp_path, train=False)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = Path(cfg.train.out_dir)
    run.mkdir()
    (run / "lock").write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename}))
    seen = []
    original = trainer_mod.lr_at
    monkeypatch.setattr(trainer_mod, "lr_at", lambda it, c: seen.append(json.loads((run / "lock").read_text())["pid"])
                        or original(it, c))
    Trainer(cfg, progress=False).train()
    assert seen and set(seen) == {os.getpid()} and not (run / "lock").exists()
    assert "stale lock" in capsys.readouterr().err


def test_sigterm_saves_a_checkpoint_like_ctrl_c(tmp_path):
    setup_run(tmp_path, train=False)
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "phaselm", "train", str(tmp_path / "cfg.yaml"),
                             "train.max_iters=100000", "train.eval_interval=100000", "train.log_interval=1"],
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 120
    while time.time() < deadline and not (
            (run / "metrics.jsonl").exists() and len(metric_iters(run)) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-1000:]
    assert "terminated (SIGTERM)" in err and "--resume" in err
    folder = ckpt.latest_checkpoint(run)
    assert ckpt.verify(folder)["metrics"]["interrupted"] is True and not (run / "lock").exists()


def test_a_diverged_checkpoint_is_skipped_by_the_stop_message_and_by_resume(tmp_path):
    cfg = setup_run(tmp_path, "train.max_iters=3")
    run = Path(cfg.train.out_dir)
    rewrite(run / "checkpoints" / "step-000003", lambda w: w * float("nan"))
    assert "non-finite" in usable_checkpoint(run / "checkpoints" / "step-000003")
    trainer = Trainer(cfg, progress=False)
    trainer.out = run
    assert "last good checkpoint is" in trainer._stop_message("boom") and "step-000002" in trainer._stop_message("x")
    for step in (1, 2):
        rewrite(run / "checkpoints" / f"step-00000{step}", lambda w: w * float("inf"))
    msg = trainer._stop_message("non-finite training loss")
    assert "no good checkpoint" in msg and "--overwrite" in msg and "--resume" not in msg


def test_nan_at_the_first_step_says_there_is_no_checkpoint(tmp_path, monkeypatch):
    cfg = setup_run(tmp_path, train=False)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: torch.tensor(float("nan")))
    with pytest.raises(TrainingError, match="no good checkpoint"):
        Trainer(cfg, progress=False).train()


def test_eval_of_a_diverged_checkpoint_reports_infinite_perplexity(tmp_path, capsys):
    cfg = setup_run(tmp_path)
    step = Path(cfg.train.out_dir) / "checkpoints" / "step-000002"
    rewrite(step, lambda w: w * 1e4)  # the checkpoint only: the run folder's published files still hold the old weights
    capsys.readouterr()
    assert main(["eval", str(step), "--split", "val"]) == 0
    assert "perplexity inf" in capsys.readouterr().out


def test_yaml_exponent_numbers_are_floats(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  lr: 1e-3\n  min_lr: 1E-5\n")
    cfg = load_config(tmp_path / "c.yaml", ["train.weight_decay=5e-2"])
    assert (cfg.train.lr, cfg.train.min_lr, cfg.train.weight_decay) == (1e-3, 1e-5, 5e-2)
    assert isinstance(cfg.train.lr, float)
