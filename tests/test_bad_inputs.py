"""Bad input is a clear error: exit status 2, one line naming the problem, nothing on disk changed.

Every case runs ``phaselm ARGV`` in-process through :func:`phaselm_cli.main` against a fresh copy
of a tiny trained run (a PhaseGPT with two checkpoints, trained once per session on a local text
file), after an optional ``damage`` step (truncate a weight file, edit ``state.json``, plant a lock
...). The case passes when ``main`` returns 2 (argparse's ``SystemExit(2)`` counts), stderr is
exactly one line holding every expected word, no traceback escaped, and every file and folder
under the case's folder is byte-identical afterwards.

A second list checks the Python API of the interventions: a bad override value raises a
``ValueError`` naming the problem and leaves the model's output unchanged.

A failure message starts with the kind of failure, ``[traceback]``, ``[silent]`` (exit 0: a wrong
result), ``[data loss]`` (an existing file changed or vanished), ``[disk changed]`` (files were
added) or ``[unclear]`` (exit 2 but not one line with the words), so a run over an old version
counts what each kind of bad input did there.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from phaselm_cli import main
from phaselm.nn.hooks import run_with_cache
from tests.test_pma import tiny_lm

CORPUS = ("ROMEO. But soft, what light through yonder window breaks?\n"
          "It is the east, and Juliet is the sun.\n"
          "JULIET. O Romeo, Romeo, wherefore art thou Romeo?\n") * 40

CONFIG = """
data: {{name: text, path: {tmp}/corpus.txt, tokenizer: char}}
model: {{type: phasegpt, phase_layers: [0], n_osc: 2, block_size: 8, n_layer: 1, n_head: 2, n_embd: 8}}
train: {{out_dir: {tmp}/run, max_iters: 2, batch_size: 2, warmup_iters: 0, eval_interval: 1, eval_max_tokens: 32,
        log_interval: 1, keep_checkpoints: 3, device: cpu, seed: 1}}
"""
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    """A folder with corpus.txt, cfg.yaml and run/ (checkpoints step-000001 and step-000002)."""
    root = tmp_path_factory.mktemp("trained")
    (root / "corpus.txt").write_text(CORPUS)
    (root / "cfg.yaml").write_text(CONFIG.format(tmp=root))
    assert main(["train", str(root / "cfg.yaml")]) == 0
    return root


# ---------------------------------------------------------------- damage steps (run on the case folder)
def ckpt(tmp: Path, step: int = 2) -> Path:
    return tmp / "run" / "checkpoints" / f"step-{step:06d}"


def truncate(rel: str, step: int = 2):
    def damage(tmp):
        path = ckpt(tmp, step) / rel
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return damage


def garble(rel: str, step: int = 2):
    def damage(tmp):
        path = ckpt(tmp, step) / rel
        data = bytearray(path.read_bytes())
        for i in range(len(data) // 2, len(data), 7):
            data[i] ^= 0x5A
        path.write_bytes(bytes(data))
    return damage


def remove(rel: str, step: int = 2):
    return lambda tmp: (ckpt(tmp, step) / rel).unlink()


def replace_weights(tmp, step: int = 2):
    """Overwrite every weight with another valid tensor of the same shape (a valid safetensors file)."""
    from safetensors.torch import load_file, save_file

    path = ckpt(tmp, step) / "model.safetensors"
    tensors = load_file(str(path))
    save_file({k: v + 1.0 for k, v in tensors.items()}, str(path))


def edit_state(**changes):
    def damage(tmp, step=2):
        path = ckpt(tmp, step) / "state.json"
        state = json.loads(path.read_text())
        state.update(changes)
        path.write_text(json.dumps(state, indent=1))
    return damage


def write(rel: str, data: bytes | str):
    def damage(tmp):
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return damage


def both(*steps):
    def damage(tmp):
        for step in steps:
            step(tmp)
    return damage


def no_run(tmp):
    shutil.rmtree(tmp / "run")


def metrics_only(tmp):
    """A run killed before its first checkpoint: metrics.jsonl and nothing else."""
    shutil.rmtree(tmp / "run" / "checkpoints")


def no_pointer(tmp):
    (tmp / "run" / "checkpoints" / "latest").unlink()


def live_lock(tmp):
    """A lock held by a live process (a sleeping child of the test)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    LIVE.append(proc)
    (tmp / "run" / "lock").write_text(json.dumps({"pid": proc.pid, "host": os.uname().nodename}))


LIVE: list[subprocess.Popen] = []
BINARY = bytes(range(256)) * 64
PNG = b"\x89PNG\r\n\x1a\n" + bytes(200) + b"IEND"


# ---------------------------------------------------------------- the cases
@dataclass
class Case:
    id: str
    argv: list[str]
    words: list[str]
    damage: Callable[[Path], None] | None = None
    marks: tuple = ()


def T(*overrides, resume=False):
    """``phaselm train {tmp}/cfg.yaml OVERRIDES`` (argv with a placeholder)."""
    return ["train", "{tmp}/cfg.yaml", *overrides] + (["--resume"] if resume else [])


CASES = [
    # flags are never prefix-matched; argparse errors are one line
    Case("train-abbrev-resume", T("--resum"), ["unrecognized", "--resum"]),
    Case("train-abbrev-overwrite", T("--overw"), ["unrecognized", "--overw"]),
    Case("sample-abbrev-max-new", ["sample", "{tmp}/run", "ROMEO", "--max-new", "5"], ["unrecognized", "--max-new"]),
    Case("sample-abbrev-temp", ["sample", "{tmp}/run", "ROMEO", "--temp", "0.5"], ["unrecognized", "--temp"]),
    Case("eval-abbrev-split", ["eval", "{tmp}/run", "--spl", "val"], ["unrecognized", "--spl"]),
    Case("generate-abbrev-noise", ["generate", "hello", "--noise", "0.1"], ["unrecognized", "--noise"]),
    Case("bench-abbrev-rounds", ["bench", "sampling", "--round", "2"], ["unrecognized", "--round"]),
    Case("interpret-abbrev-windows", ["interpret", "{tmp}/run", "--split", "val", "--out", "{tmp}/i", "--wind", "2"],
         ["unrecognized", "--wind"]),
    Case("calibrate-abbrev-search", ["calibrate", "--search", "3"], ["unrecognized", "--search"]),
    Case("demo-abbrev-max-new", ["demo", "--max-new", "5"], ["unrecognized", "--max-new"]),
    Case("unknown-command", ["trian", "{tmp}/cfg.yaml"], ["trian"]),
    Case("eval-bad-split-choice", ["eval", "{tmp}/run", "--split", "train"], ["--split", "train"]),
    Case("train-missing-config-arg", ["train"], ["config"]),
    Case("sample-max-new-not-int", ["sample", "{tmp}/run", "ROMEO", "--max-new-tokens", "abc"], ["--max-new-tokens"]),
    Case("train-resume-and-overwrite", T("--resume", "--overwrite"), ["--resume", "--overwrite"]),
    # sample / eval / interpret arguments
    Case("sample-negative-max-new", ["sample", "{tmp}/run", "ROMEO", "--max-new-tokens", "-5"], ["--max-new-tokens"]),
    Case("sample-negative-temperature", ["sample", "{tmp}/run", "ROMEO", "--temperature", "-1"], ["temperature"]),
    Case("sample-nan-temperature", ["sample", "{tmp}/run", "ROMEO", "--temperature", "nan"], ["temperature"]),
    Case("sample-inf-temperature", ["sample", "{tmp}/run", "ROMEO", "--temperature", "inf"], ["temperature"]),
    Case("sample-zero-top-k", ["sample", "{tmp}/run", "ROMEO", "--top-k", "0"], ["top"]),
    Case("sample-negative-top-k", ["sample", "{tmp}/run", "ROMEO", "--top-k", "-3"], ["top"]),
    Case("sample-empty-prompt", ["sample", "{tmp}/run", ""], ["prompt"]),
    Case("sample-unknown-chars", ["sample", "{tmp}/run", "日本語"], ["vocabulary"]),
    Case("sample-device-cuda", ["sample", "{tmp}/run", "ROMEO", "--device", "cuda"], ["cuda"], marks=(NO_CUDA,)),
    Case("sample-device-cuda1", ["sample", "{tmp}/run", "ROMEO", "--device", "cuda:1"], ["cuda"], marks=(NO_CUDA,)),
    Case("sample-device-foo", ["sample", "{tmp}/run", "ROMEO", "--device", "foo"], ["--device", "foo"]),
    Case("eval-device-cuda", ["eval", "{tmp}/run", "--device", "cuda"], ["cuda"], marks=(NO_CUDA,)),
    Case("eval-device-foo", ["eval", "{tmp}/run", "--device", "foo"], ["--device", "foo"]),
    Case("interpret-device-cuda", ["interpret", "{tmp}/run", "--split", "val", "--out", "{tmp}/i", "--device", "cuda"],
         ["cuda"], marks=(NO_CUDA,)),
    Case("interpret-device-foo", ["interpret", "{tmp}/run", "--split", "val", "--out", "{tmp}/i", "--device", "foo"],
         ["--device", "foo"]),
    Case("interpret-zero-windows", ["interpret", "{tmp}/run", "--split", "val", "--windows", "0"], ["--windows"]),
    Case("interpret-head-too-big", ["interpret", "{tmp}/run", "--split", "val", "--out", "{tmp}/i", "--head", "9"],
         ["--head"]),
    Case("interpret-head-negative", ["interpret", "{tmp}/run", "--split", "val", "--out", "{tmp}/i", "--head", "-1"],
         ["--head"]),
    Case("interpret-missing-text", ["interpret", "{tmp}/run", "--text", "{tmp}/nope.txt", "--out", "{tmp}/i"],
         ["--text", "nope.txt"]),
    Case("interpret-binary-text", ["interpret", "{tmp}/run", "--text", "{tmp}/blob.bin", "--out", "{tmp}/i"],
         ["blob.bin", "text"], damage=write("blob.bin", BINARY)),
    Case("sample-no-such-run", ["sample", "{tmp}/nowhere", "ROMEO"], ["no checkpoint", "nowhere"]),
    Case("eval-no-such-run", ["eval", "{tmp}/nowhere"], ["no checkpoint", "nowhere"]),
    Case("eval-empty-folder", ["eval", "{tmp}/empty"], ["no checkpoint"], damage=write("empty/.keep", "")),
    Case("eval-run-without-checkpoints", ["eval", "{tmp}/run"], ["no checkpoint"], damage=metrics_only),
    # damaged checkpoints: every loader verifies every file against the SHA-256 in its manifest
    Case("eval-truncated-weights", ["eval", "{tmp}/run"], ["model.safetensors", "step-000002"],
         damage=truncate("model.safetensors")),
    Case("eval-garbled-weights", ["eval", "{tmp}/run"], ["model.safetensors"], damage=garble("model.safetensors")),
    Case("eval-replaced-weights", ["eval", "{tmp}/run"], ["model.safetensors"], damage=replace_weights),
    Case("eval-missing-weights", ["eval", "{tmp}/run"], ["model.safetensors"], damage=remove("model.safetensors")),
    Case("eval-empty-weights", ["eval", "{tmp}/run"], ["model.safetensors"], damage=write(
        "run/checkpoints/step-000002/model.safetensors", b"")),
    Case("eval-truncated-state", ["eval", "{tmp}/run"], ["state.json"], damage=truncate("state.json")),
    Case("eval-state-not-json", ["eval", "{tmp}/run"], ["state.json"], damage=write(
        "run/checkpoints/step-000002/state.json", "{not json")),
    Case("eval-state-edited-step", ["eval", "{tmp}/run"], ["state.json"], damage=edit_state(step=999)),
    Case("eval-state-without-config", ["eval", "{tmp}/run"], ["state.json"], damage=edit_state(config=None)),
    Case("eval-state-is-a-list", ["eval", "{tmp}/run"], ["state.json"], damage=write(
        "run/checkpoints/step-000002/state.json", "[1, 2]")),
    Case("eval-missing-state", ["eval", "{tmp}/run/checkpoints/step-000002"], ["state.json"],
         damage=remove("state.json")),
    Case("eval-truncated-optimizer", ["eval", "{tmp}/run"], ["optimizer.safetensors"],
         damage=truncate("optimizer.safetensors")),
    Case("eval-checkpoint-folder-truncated", ["eval", "{tmp}/run/checkpoints/step-000001"], ["model.safetensors"],
         damage=truncate("model.safetensors", step=1)),
    Case("eval-checkpoint-folder-replaced", ["eval", "{tmp}/run/checkpoints/step-000001"], ["model.safetensors"],
         damage=lambda tmp: replace_weights(tmp, step=1)),
    Case("eval-binary-pointer", ["eval", "{tmp}/run"], ["model.safetensors"], damage=both(
        write("run/checkpoints/latest", BINARY), truncate("model.safetensors"))),
    Case("sample-truncated-weights", ["sample", "{tmp}/run", "ROMEO"], ["model.safetensors"],
         damage=truncate("model.safetensors")),
    Case("sample-replaced-weights", ["sample", "{tmp}/run", "ROMEO"], ["model.safetensors"], damage=replace_weights),
    Case("sample-garbled-state", ["sample", "{tmp}/run", "ROMEO"], ["state.json"], damage=garble("state.json")),
    Case("sample-edited-tokenizer", ["sample", "{tmp}/run", "ROMEO"], ["state.json"],
         damage=edit_state(tokenizer='{"type": "char", "chars": "abc"}')),
    Case("interpret-truncated-weights", ["interpret", "{tmp}/run", "--split", "val", "--out", "{tmp}/i"],
         ["model.safetensors"], damage=truncate("model.safetensors")),
    Case("interpret-edited-state", ["interpret", "{tmp}/run", "--split", "val", "--out", "{tmp}/i"],
         ["state.json"], damage=edit_state(step=7)),
    # resuming and restarting runs
    Case("resume-all-damaged", T(resume=True), ["no intact checkpoint"],
         damage=both(truncate("model.safetensors", 1), truncate("model.safetensors", 2))),
    Case("resume-all-edited", T(resume=True), ["no intact checkpoint"],
         damage=both(lambda t: edit_state(step=5)(t, 1), lambda t: edit_state(step=5)(t, 2))),
    Case("resume-no-checkpoint", T(resume=True), ["--resume", "no checkpoint"], damage=metrics_only),
    Case("resume-no-run", T(resume=True), ["--resume", "no checkpoint"], damage=no_run),
    Case("resume-changed-model", T("model.n_embd=16", resume=True), ["differs"]),
    Case("resume-changed-data", T("data.path={tmp}/other.txt", resume=True), ["differs"],
         damage=write("other.txt", CORPUS.upper())),
    Case("restart-existing-run", T(), ["--resume", "--overwrite"]),
    Case("restart-run-without-pointer", T(), ["--resume", "--overwrite"], damage=no_pointer),
    Case("restart-run-with-damaged-newest", T(), ["--resume", "--overwrite"], damage=truncate("model.safetensors")),
    Case("restart-run-with-only-metrics", T(), ["--resume", "--overwrite"], damage=metrics_only),
    Case("restart-run-longer", T("train.max_iters=4"), ["--resume", "--overwrite"]),
    Case("second-run-same-out-dir", T(resume=True), ["lock", "pid"], damage=live_lock),
    Case("second-run-same-out-dir-overwrite", T("--overwrite"), ["lock", "pid"], damage=live_lock),
    Case("out-dir-under-a-file", T("train.out_dir={tmp}/corpus.txt/run"), ["train.out_dir"]),
    Case("out-dir-is-a-file", T("train.out_dir={tmp}/corpus.txt"), ["train.out_dir"]),
    # config values
    Case("config-lr-inf", T("train.lr=.inf"), ["train.lr"]),
    Case("config-lr-nan", T("train.lr=.nan"), ["train.lr"]),
    Case("config-lr-string", T("train.lr=fast"), ["train.lr"]),
    Case("config-max-iters-float-string", T("train.max_iters=1e3"), ["train.max_iters"]),
    Case("config-batch-fraction", T("train.batch_size=1.5"), ["train.batch_size"]),
    Case("config-checkpoint-interval-zero", T("train.checkpoint_interval=0"), ["train.checkpoint_interval"]),
    Case("config-eval-max-tokens-zero", T("train.eval_max_tokens=0"), ["train.eval_max_tokens"]),
    Case("config-grad-clip-negative", T("train.grad_clip=-1"), ["train.grad_clip"]),
    Case("config-weight-decay-negative", T("train.weight_decay=-0.1"), ["train.weight_decay"]),
    Case("config-beta1-above-one", T("train.beta1=1.5"), ["train.beta1"]),
    Case("config-beta2-negative", T("train.beta2=-0.5"), ["train.beta2"]),
    Case("config-max-grad-norm-zero", T("train.max_grad_norm=0"), ["train.max_grad_norm"]),
    Case("config-seed-negative", T("train.seed=-1"), ["train.seed"]),
    Case("config-lr-decay-iters-negative", T("train.lr_decay_iters=-5"), ["train.lr_decay_iters"]),
    Case("config-device-cuda", T("train.device=cuda"), ["cuda"], marks=(NO_CUDA,)),
    Case("config-device-cuda0", T("train.device=cuda:0"), ["cuda"], marks=(NO_CUDA,)),
    Case("config-device-foo", T("train.device=foo"), ["train.device"]),
    Case("config-dtype-fp16-on-cpu", T("train.dtype=float16"), ["train.dtype"]),
    Case("config-dropout-one", T("model.dropout=1.0"), ["model", "dropout"]),
    Case("config-n-embd-zero", T("model.n_embd=0"), ["model", "n_embd"]),
    Case("config-kuramoto-dt-inf", T("model.kuramoto_dt=.inf"), ["model.kuramoto_dt"]),
    Case("config-phase-noise-nan", T("model.phase_noise=.nan"), ["model.phase_noise"]),
    Case("config-phase-noise-negative", T("model.phase_noise=-1"), ["model", "phase_noise"]),
    Case("config-coupling-inf", T("model.coupling_init=-.inf"), ["model.coupling_init"]),
    Case("config-phase-layers-strings", T("model.phase_layers=[a]"), ["model", "phase_layers"]),
    Case("config-vocab-too-small", T("model.vocab_size=5"), ["model.vocab_size"]),
    Case("config-block-too-big", T("model.block_size=100000"), ["block_size"]),
    Case("config-unknown-section", T("optim.lr=1"), ["optim"]),
    Case("config-override-without-equals", T("train.lr"), ["train.lr"]),
    Case("config-override-three-parts", T("train.lr.x=1"), ["train.lr.x"]),
    Case("config-file-missing", ["train", "{tmp}/missing.yaml"], ["missing.yaml"]),
    Case("config-file-is-folder", ["train", "{tmp}/run"], ["run"]),
    Case("config-file-binary", ["train", "{tmp}/blob.yaml"], ["blob.yaml"], damage=write("blob.yaml", BINARY)),
    Case("config-file-a-list", ["train", "{tmp}/list.yaml"], ["mapping"], damage=write("list.yaml", "- 1\n- 2\n")),
    Case("config-file-bad-yaml", ["train", "{tmp}/bad.yaml"], ["bad.yaml", "YAML"],
         damage=write("bad.yaml", "train: {max_iters: [1\n")),
    # data files
    Case("data-binary-file", T("data.path={tmp}/blob.txt", "train.out_dir={tmp}/new"), ["data.path", "blob.txt"],
         damage=write("blob.txt", BINARY)),
    Case("data-png-file", T("data.path={tmp}/image.png", "train.out_dir={tmp}/new"), ["data.path", "image.png"],
         damage=write("image.png", PNG)),
    Case("data-latin1-file", T("data.path={tmp}/latin.txt", "train.out_dir={tmp}/new"), ["data.path", "latin.txt"],
         damage=write("latin.txt", ("caf\xe9 " * 500).encode("latin-1"))),
    Case("data-folder-with-binary", T("data.path={tmp}/docs", "train.out_dir={tmp}/new"), ["data.path", "b.txt"],
         damage=both(write("docs/a.txt", CORPUS), write("docs/b.txt", BINARY))),
    Case("data-empty-file", T("data.path={tmp}/empty.txt", "train.out_dir={tmp}/new"), ["empty.txt"],
         damage=write("empty.txt", "")),
    Case("data-folder-without-txt", T("data.path={tmp}/imgs", "train.out_dir={tmp}/new"), ["data.path"],
         damage=write("imgs/a.png", PNG)),
    Case("data-missing-file", T("data.path={tmp}/gone.txt", "train.out_dir={tmp}/new"), ["data.path", "gone.txt"]),
]


def snapshot(root: Path) -> dict[str, str]:
    """``{relative path: sha256 of the bytes, or 'dir'}`` of everything under ``root``."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def disk_verdict(before: dict, after: dict) -> str | None:
    lost = [k for k in before if after.get(k) != before[k]]
    if lost:
        return f"[data loss] changed or removed: {lost[:5]}"
    added = [k for k in after if k not in before]
    return f"[disk changed] added: {added[:5]}" if added else None


@pytest.fixture
def case_dir(trained, tmp_path) -> Path:
    """A fresh copy of the trained run, its config and corpus."""
    for name in ("corpus.txt", "run"):
        src = trained / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, tmp_path / name)
    (tmp_path / "cfg.yaml").write_text(CONFIG.format(tmp=tmp_path))
    yield tmp_path
    while LIVE:
        proc = LIVE.pop()
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_the_disk_unchanged(case, case_dir, capsys, monkeypatch):
    monkeypatch.chdir(case_dir)  # a relative default path (bench --out results/...) lands here, never in the repo
    if case.damage:
        case.damage(case_dir)
    argv = [a.replace("{tmp}", str(case_dir)) for a in case.argv]
    before = snapshot(case_dir)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    except Exception as err:  # noqa: BLE001 - the point is that nothing escapes
        pytest.fail(f"[traceback] {type(err).__name__}: {err}")
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    disk = disk_verdict(before, snapshot(case_dir))
    if disk and disk.startswith("[data loss]"):
        pytest.fail(disk)
    assert "Traceback" not in err, f"[traceback] {err[-500:]}"
    assert code != 0, f"[silent] exit 0; stderr: {err[-300:]!r}"
    assert code == 2, f"[unclear] exit {code}: {err[-300:]!r}"
    assert len(lines) == 1, f"[unclear] {len(lines)} lines: {err[-400:]!r}"
    missing = [w for w in case.words if w.lower() not in lines[0].lower()]
    assert not missing, f"[unclear] {missing} not in {lines[0]!r}"
    assert lines[0].startswith("phaselm"), f"[unclear] {lines[0]!r}"
    assert disk is None, disk


# ---------------------------------------------------------------- interventions (Python API)
def _set(target, value, **kw):
    from phaselm.interventions import set_override

    return lambda model: set_override(model, target, value, **kw)


def _with(**values):
    from phaselm.interventions import override

    def run(model):
        with override(model, **values):
            model(torch.randint(0, 30, (1, 6)))
    return run


API_CASES = [
    ("R-above-one", _set("R", 1.5), ["R", "[0, 1]"]),
    ("R-negative", _set("R", -0.1), ["R", "[0, 1]"]),
    ("R-nan", _set("R", math.nan), ["R"]),
    ("R-tensor-above-one", _set("R", torch.full((2, 1), 1.2)), ["R"]),
    ("K-inf", _set("K", math.inf), ["K", "finite"]),
    ("K-nan", _set("K", math.nan), ["K", "finite"]),
    ("K-tensor-with-nan", _set("K", torch.tensor([1.0, math.nan])), ["K", "finite"]),
    ("tau-zero", _set("tau", 0.0), ["tau", "> 0"]),
    ("tau-negative", _set("tau", -1.0), ["tau", "> 0"]),
    ("tau-inf", _set("tau", math.inf), ["tau"]),
    ("lam-above-one", _set("lam", 1.5), ["lam", "[0, 1]"]),
    ("lam-negative", _set("lam", -0.2), ["lam"]),
    ("phi-inf", _set("phi", math.inf), ["phi", "finite"]),
    ("phi-pos-nan", _set("phi_pos", math.nan), ["phi_pos", "finite"]),
    ("R-wrong-heads", _set("R", torch.full((3, 1), 0.5)), ["R", "shape"]),
    ("R-too-many-dims", _set("R", torch.full((1, 1, 1, 1, 1), 0.5)), ["R", "shape"]),
    ("lam-wrong-shape", _set("lam", torch.full((3,), 0.2)), ["lam", "shape"]),
    ("K-string", _set("K", "3"), ["K"]),
    ("unknown-target", _set("gamma", 1.0), ["gamma"]),
    ("layer-not-pma", _set("K", 1.0, layers=[0]), ["not PMA"]),
    ("layer-int-not-pma", _set("K", 1.0, layers=1), ["not PMA"]),
    ("context-R-above-one", _with(R=2.0), ["R"]),
    ("context-tau-zero", _with(tau=0.0), ["tau"]),
    ("context-wrong-shape", _with(K=torch.ones(5, 5)), ["K", "shape"]),
]


@pytest.mark.parametrize("fn, words", [pytest.param(f, w, id=i) for i, f, w in API_CASES])
def test_bad_override_is_a_value_error_and_changes_nothing(fn, words):
    model = tiny_lm()  # PMA blocks 2 and 3, 2 heads
    x = torch.randint(0, 30, (2, 6), generator=torch.Generator().manual_seed(1))
    base = model(x)[0]  # the logits
    try:
        fn(model)
    except ValueError as err:
        missing = [w for w in words if w not in str(err)]
        assert not missing and "\n" not in str(err), f"[unclear] {missing} not in {err!r}"
    except Exception as err:  # noqa: BLE001
        pytest.fail(f"[traceback] {type(err).__name__}: {err}")
    else:
        pytest.fail("[silent] no error")
    assert torch.equal(model(x)[0], base), "[silent] the bad override changed the model"


def test_an_int_layer_works_like_a_list_and_overrides_on_other_layers_add_up():
    from phaselm.interventions import clear_overrides, set_override

    model = tiny_lm()
    x = torch.randint(0, 30, (1, 8), generator=torch.Generator().manual_seed(2))

    def k_values():
        _, cache = run_with_cache(model, x, names_filter=lambda n: n.endswith("hook_K"))
        return {n.split(".")[1]: float(v.flatten()[0]) for n, v in cache.items()}

    set_override(model, "K", 3.0, layers=2)
    assert k_values()["2"] == 3.0 and k_values()["3"] != 3.0
    set_override(model, "K", 5.0, layers=[3])  # another layer: adds, the first stays
    assert k_values() == {"2": 3.0, "3": 5.0}
    set_override(model, "K", 4.0, layers=2)  # the same layer: replaces
    assert k_values() == {"2": 4.0, "3": 5.0}
    set_override(model, "K", None, layers=3)
    assert k_values()["2"] == 4.0 and k_values()["3"] != 5.0
    clear_overrides(model)
    assert not any(p.active for p in model.modules() if hasattr(p, "active"))


def test_run_with_cache_on_a_bare_attention_module_keys_by_name():
    model = tiny_lm()
    attn = model.pma_layers()[2]
    for point in attn.modules():  # as built on its own: nothing named its hook points
        if hasattr(point, "active"):
            point.name = None
    x = torch.randn(1, 6, 16, dtype=next(attn.parameters()).dtype)  # [B, T, n_embd]
    _, cache = run_with_cache(attn, x)
    assert None not in cache and {"hook_K", "hook_R", "hook_tau"} <= set(cache)
