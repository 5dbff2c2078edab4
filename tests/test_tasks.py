"""Synthetic tasks: each generator against its definition, held-out sets, training on answers only,
and the ``bench tasks`` runner (end to end, resume, shards)."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from phaselm.data.tasks import IGNORE, TASKS, TaskData, make_task


def gen(name, n=200, seed=0, **kw):
    task = make_task(name, **kw)
    return task, task.generate(n, np.random.default_rng(seed))


def test_mqar_matches_its_definition():
    task, (x, y) = gen("mqar", seq_len=64, num_kv_pairs=4, vocab_size=512)
    kv, half = 4, 256
    assert x.shape == y.shape == (200, 64) and x.min() >= 0 and x.max() < 512
    keys, values = x[:, 0:2 * kv:2], x[:, 1:2 * kv:2]
    assert ((keys >= 1) & (keys < half)).all() and ((values >= half) & (values < 512)).all()
    assert all(len(set(k)) == kv and len(set(v)) == kv for k, v in zip(keys, values))  # distinct per sequence
    for row in range(200):
        answers = np.flatnonzero(y[row] != IGNORE)
        assert len(answers) == kv  # each key queried once, and only answers carry a target
        assert ((answers >= 2 * kv) & ((answers - 2 * kv) % 2 == 0)).all()  # queries at 2kv + 2·gap
        mapping = dict(zip(keys[row], values[row]))
        assert sorted(x[row, answers]) == sorted(keys[row])
        assert all(y[row, t] == mapping[x[row, t]] for t in answers)
        filler = np.setdiff1d(np.arange(2 * kv, 64), answers)
        assert (x[row, filler] == 0).all()  # Zoology's Figure 2 setting: no random fill
    _, (xr, yr) = gen("mqar", seq_len=64, num_kv_pairs=4, vocab_size=512, random_fill=True)
    assert (yr >= 0).sum() == 800 and (xr[:, 8:] > 0).mean() > 0.9  # random_fill: random tokens around the queries


def test_mqar_gaps_follow_the_power_law():
    _, (x, y) = gen("mqar", n=2000, seq_len=256, num_kv_pairs=16, vocab_size=1024)
    gaps = (np.flatnonzero(y.reshape(-1) != IGNORE) % 256 - 32) // 2
    counts = np.bincount(gaps, minlength=112)
    assert counts[:10].sum() > counts[-10:].sum()  # short gaps are likelier
    assert gaps.min() >= 0 and gaps.max() < 112


def test_selective_copy_matches_its_definition():
    task, (x, y) = gen("selective_copy", seq_len=64, num_tokens=8, vocab_size=16)
    blank, marker = 14, 15
    assert (x[:, 64 - 8 - 1] == marker).all() and (x[:, 64 - 8:] == blank).all()
    assert (y[:, : 64 - 8] == IGNORE).all()
    for row in range(200):
        content = x[row, : 64 - 8 - 1][x[row, : 64 - 8 - 1] != blank]
        assert len(content) == 8 and (content < 14).all()
        assert (y[row, 64 - 8:] == content).all()  # reproduced in order after the marker


@pytest.mark.parametrize("name,kw", [("noisy_recall", {}), ("noisy_recall", {"frac_noise": 0.0}),
                                     ("fuzzy_recall", {}), ("fuzzy_recall", {"seq_len": 64})])
def test_recall_targets_are_the_values_of_keys_shown_before(name, kw):
    task, (x, y) = gen(name, **kw)
    L = task.seq_len
    assert x.shape == y.shape == (200, L)
    k = task.vocab_size - getattr(task, "noise_vocab_size", 1)
    values = set(range(k // 2, k))
    for row in range(200):
        answers = np.flatnonzero(y[row] != IGNORE)
        assert len(answers) >= 1 and answers[-1] == L - 1  # every sequence ends with a probe
        assert set(y[row, answers]) <= values
        inner = answers[answers < L - 1]
        assert (x[row, inner + 1] == y[row, inner]).all()  # the target is the next token of the sequence
        if name == "noisy_recall":
            text = x[row].tolist() + [int(y[row, -1])]
            pairs = [(text[i], text[i + 1]) for i in range(1, L + 1, 2)]  # after the leading random token
            real = [(a, b) for a, b in pairs if a < k // 2]
            assert len({a for a, _ in real}) == len(set(real))  # a key keeps its value within a sequence
            assert all(a >= k for a, b in pairs if a >= k // 2)  # anything else is noise
            shown = [a for a, _ in real[:-1]]
            assert real[-1][0] in shown  # the probe key was shown before


def test_fuzzy_recall_held_out_keys_have_the_largest_size():
    task = make_task("fuzzy_recall", seq_len=128)
    x, y = task.generate(100, np.random.default_rng(0), held_out=True)
    pad = task.vocab_size - 1
    for row in range(100):
        seq = x[row][x[row] != pad].tolist()
        first_value = next(i for i, t in enumerate(seq) if t >= (pad // 2))
        assert first_value == task.k_motif  # the first key is k_motif tokens long


@pytest.mark.parametrize("held_out", [False, True])
def test_fuzzy_recall_answers_are_determined_by_the_context(held_out):
    """An oracle that parses the sequence (a key is a run of tokens from the first half of the
    vocabulary, its value the run from the second half that follows) and looks the key up among the
    motifs before answers every target: the task caps no model below 100%."""
    task = make_task("fuzzy_recall", seq_len=128)
    x, y = task.generate(200, np.random.default_rng(1), held_out=held_out)
    pad, half = task.vocab_size - 1, (task.vocab_size - 1) // 2
    for row, target in zip(x.tolist(), y.tolist()):
        memory, oracle, i = {}, {}, 0
        while i < len(row):
            if row[i] == pad:
                i += 1
                continue
            j = i
            while j < len(row) and row[j] < half:
                j += 1
            k = j
            while k < len(row) and half <= row[k] < pad:
                k += 1
            key, value = tuple(row[i:j]), row[j:k]
            if key in memory:  # the value's tokens are the targets at the positions before them
                oracle.update({j - 1 + n: v for n, v in enumerate(memory[key])})
            memory.setdefault(key, value)
            i = k
        answers = {p: t for p, t in enumerate(target) if t >= 0}
        assert answers and oracle == answers


@pytest.mark.parametrize("name", sorted(TASKS))
def test_generators_are_deterministic_and_held_out_sets_never_overlap_training(name):
    task = make_task(name, **({"seq_len": 64, "num_kv_pairs": 4, "vocab_size": 128} if name == "mqar" else
                              {"seq_len": 64, "num_tokens": 8} if name == "selective_copy" else {"seq_len": 64}))
    a, b = TaskData.build(task, 300, 100, seed=3), TaskData.build(task, 300, 100, seed=3)
    for split in ("train", "val", "test"):
        for u, v in zip(getattr(a, split), getattr(b, split)):
            assert np.array_equal(u, v)
    assert not np.array_equal(a.train[0][:100], TaskData.build(task, 300, 100, seed=4).train[0][:100])
    for cached in (TaskData.build(task, 300, 100, seed=3, cache=True), TaskData.build(task, 300, 100, seed=3, cache=True)):
        for split in ("train", "val", "test"):  # stored by the first build, read back by the second
            assert all(np.array_equal(u, v) for u, v in zip(getattr(a, split), getattr(cached, split)))
    train = {r.tobytes() for r in a.train[0]}
    assert len(a.test[0]) == len(a.val[0]) == 100
    assert not any(r.tobytes() in train for r in np.concatenate([a.val[0], a.test[0]]))


def test_held_out_examples_seen_in_training_are_replaced():
    task = make_task("selective_copy", seq_len=12, num_tokens=2, vocab_size=4)  # only 36 · 2² distinct sequences
    data = TaskData.build(task, 100, 20, seed=0)
    train = {r.tobytes() for r in data.train[0]}
    assert not any(r.tobytes() in train for r in data.test[0])


@pytest.mark.parametrize("name,kw,message", [
    ("mqar", {"seq_len": 64, "num_kv_pairs": 32}, "4 \\* num_kv_pairs"),
    ("mqar", {"seq_len": 64, "vocab_size": 32}, "vocab_size > seq_len"),
    ("selective_copy", {"seq_len": 16, "num_tokens": 8}, "2 \\* num_tokens"),
    ("noisy_recall", {"frac_noise": 1.0}, "frac_noise"),
    ("fuzzy_recall", {"k_motif": 9}, "k_motif"),
    ("mqar", {"num_tokens": 3}, "does not apply to task mqar"),
    ("copying", {}, "unknown task"),
])
def test_impossible_task_settings_are_one_line_errors(name, kw, message):
    with pytest.raises(ValueError, match=message):
        make_task(name, **kw)


def test_config_errors_name_the_key():
    from phaselm.training.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="data.num_kv_pairs is a synthetic-task setting"):
        load_config(None, ["data.num_kv_pairs=4"])
    with pytest.raises(ConfigError, match="model.block_size \\(64\\) is shorter than the task's seq_len \\(256\\)"):
        load_config(None, ["data.name=selective_copy", "model.block_size=64"])


# ---------------------------------------------------------------- training on answers
@pytest.mark.parametrize("kind", ["gpt", "pma"])
def test_the_head_at_answer_positions_gives_the_full_loss(kind):
    from phaselm.models import config_from_dict, MODELS

    section = {"type": kind, "vocab_size": 50, "block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 16}
    if kind == "pma":
        section["n_ssm"] = 1
    torch.manual_seed(0)
    model = MODELS[kind][1](config_from_dict(section))
    x = torch.randint(0, 50, (3, 32))
    y = torch.full((3, 32), -1)
    y[:, [5, 17, 31]] = torch.randint(0, 50, (3, 3))
    full, sparse = model(x, y), model(x, y, head_at_targets=True)
    assert sparse.logits.shape == (9, 50)
    assert torch.allclose(full.loss, sparse.loss, atol=1e-6)
    assert torch.allclose(full.logits[y >= 0], sparse.logits, atol=1e-6)


def test_training_on_a_task_learns_and_reports_accuracy(tmp_path):
    from phaselm.training.config import load_config
    from phaselm.training.trainer import Trainer, evaluate_split

    cfg = load_config(None, ["data.name=selective_copy", "data.seq_len=24", "data.num_tokens=2", "data.vocab_size=6",
                             "data.num_train=2000", "data.num_test=200", "model.block_size=24", "model.n_layer=2",
                             "model.n_head=2", "model.n_embd=32", "train.max_iters=150", "train.batch_size=32",
                             "train.lr=3e-3", "train.eval_interval=150", "train.warmup_iters=10", "train.device=cpu",
                             f"train.out_dir={tmp_path / 'run'}"])
    summary = Trainer(cfg, progress=False).train()
    val = summary["final_val"]
    assert val["answers"] == 400 and 0 <= val["accuracy"] <= 1
    assert val["accuracy"] > 0.5  # chance is 1/4
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["split"] == "val" and rows[-1]["accuracy"] == val["accuracy"]
    test = evaluate_split(tmp_path / "run", "test")
    assert test["answers"] == 400 and test["step"] == 150


# ---------------------------------------------------------------- the bench
TINY = ["--task", "selective_copy", "--models", "gpt,mamba", "--widths", "16", "--seeds", "2", "--difficulties",
        "L256", "--lrs", "3e-3,1e-2", "--steps", "6", "--batch-size", "8", "--num-train", "64",
        "--num-test", "32", "--eval-interval", "3"]
VOLATILE = {"train_seconds", "command", "commit", "dirty", "machine", "cpu", "cores", "resumed", "started_at_step", "parts"}


def bench(tmp_path, name, *extra):
    return [sys.executable, "-m", "phaselm", "bench", "tasks", *TINY, "--out", str(tmp_path / name / "out"),
            "--work", str(tmp_path / name / "work"), *extra]


def records(folder):
    return {p.name: {k: v for k, v in json.loads(p.read_text()).items() if k not in VOLATILE}
            for p in sorted((folder / "out" / "runs").glob("*.json"))}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    subprocess.run(bench(tmp, "a"), check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return tmp / "a"


def test_bench_tasks_end_to_end_and_report_rerenders_identically(uninterrupted):
    from phaselm.evaluation.tasks_bench import choose_lr

    runs = records(uninterrupted)
    assert len(runs) == 2 * 2 + 2 * 2  # sweep: 2 models x 1 width x 2 lrs; main: 2 models x 1 width x 2 seeds
    main = [r for r in runs.values() if not r["sweep"]]
    for m in ("gpt", "mamba"):
        sweep = [r for r in runs.values() if r["sweep"] and r["model"] == m and r["width"] == 16]
        assert {r["lr"] for r in main if r["model"] == m} == {choose_lr(sweep)}
        assert [r for r in main if r["model"] == m and r["seed"] == 1][0]["reused"]  # the sweep run at that rate
    for r in main:
        lo, hi = r["test"]["wilson95"]
        assert lo <= r["test"]["accuracy"] <= hi and r["test"]["answers"] == 32 * 16
        steps, acc = zip(*r["val_curve"])  # every evaluation (--steps 6, --eval-interval 3), the last = "val"
        assert steps[-2:] == (3, 6) and acc[-1] == r["val"]["accuracy"] and all(0 <= a <= 1 for a in acc)
    out = uninterrupted / "out"
    names = ["report.md", "summary.json", "accuracy_vs_difficulty.png", "accuracy_vs_width.png", "accuracy_by_seed.png",
             "val_by_step.png"]
    before = {n: (out / n).read_bytes() for n in names}
    assert "## Paired differences" in before["report.md"].decode() and "| mamba | gpt | L256 | 2 |" in before["report.md"].decode()
    subprocess.run([sys.executable, "-m", "phaselm", "report", "tasks", str(out)], check=True, capture_output=True)
    assert {n: (out / n).read_bytes() for n in names} == before


def test_report_of_some_seeds_equals_the_report_of_a_folder_holding_only_them(uninterrupted, tmp_path):
    import shutil

    from phaselm.evaluation.tasks_report import parse_seeds, render

    shutil.copytree(uninterrupted / "out", tmp_path / "only2")
    for path in (tmp_path / "only2" / "runs").glob("*seed1.json"):  # main runs of seed 1 (sweep runs end in _lr...)
        path.unlink()
    render(tmp_path / "only2")
    full = tmp_path / "full"
    shutil.copytree(uninterrupted / "out", full)
    before = (full / "report.md").read_bytes()
    paths = render(full, parse_seeds("2-2"))
    assert [p.name for p in paths] == ["report_seeds2-2.md", "summary_seeds2-2.json"]
    assert (full / "report.md").read_bytes() == before  # the folder's own report untouched
    text = paths[0].read_text().replace("(Seeds 2–2 only.)\n\n", "")
    assert text == (tmp_path / "only2" / "report.md").read_text()
    assert json.loads(paths[1].read_text())["comparisons"] == json.loads((tmp_path / "only2" / "summary.json").read_text())["comparisons"]
    for bad in ("4", "13-4", "0-3", "a-b"):
        with pytest.raises(ValueError, match="--seeds must be a range"):
            parse_seeds(bad)
    with pytest.raises(ValueError, match="no test results of seeds 7-9"):
        render(full, parse_seeds("7-9"))


def test_bench_tasks_refuses_an_earlier_run_without_resume(uninterrupted, tmp_path):
    for extra in ([], ["--nproc-per-node", "2"]):  # data-parallel: refused before torchrun starts
        out = subprocess.run(bench(uninterrupted.parent, "a", *extra), capture_output=True, text=True)
        assert out.returncode == 2 and "pass --resume" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_resumed_bench_equals_uninterrupted(uninterrupted, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(bench(tmp_path, "b"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    runs = tmp_path / "b" / "out" / "runs"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(runs.glob("*.json"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # mid-run: the trainer saves a checkpoint, the bench stops
    proc.wait()
    assert len(list(runs.glob("*.json"))) < 8
    subprocess.run(bench(tmp_path, "b", "--resume"), check=True, capture_output=True, env=env)
    assert records(tmp_path / "b") == records(uninterrupted)
    started = [json.loads(p.read_text())["started_at_step"] for p in sorted(runs.glob("*.json"))]
    assert set(started) <= set(range(6)) and not any(json.loads(p.read_text())["started_at_step"]
                                                     for p in (uninterrupted / "out" / "runs").glob("*.json"))
    for path in runs.glob("*.json"):  # the parts cover the run's steps, one per start or resume, and add up
        raw = json.loads(path.read_text())
        steps = [p["steps"] for p in raw["parts"]]
        assert steps[0][0] == 0 and steps[-1][1] == 6 and all(a[1] == b[0] for a, b in zip(steps, steps[1:]))
        assert len(steps) == 1 + (raw["started_at_step"] > 0) and all(p["machine"] for p in raw["parts"])
        assert raw["train_seconds"] == pytest.approx(sum(p["seconds"] for p in raw["parts"]), abs=0.1)


def test_union_of_shards_equals_the_unsharded_run(uninterrupted, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(bench(tmp_path, "c", "--shard", f"{i}/2"), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, env=env) for i in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()
    assert records(tmp_path / "c") == records(uninterrupted)
    provenance = (tmp_path / "c" / "out" / "report.md").read_text().split("## Provenance")[1]
    commands = [line for line in provenance.splitlines() if line.startswith("  - `")]
    assert len(commands) == 1 and "--shard" not in commands[0]  # one grid, one command


def test_data_parallel_runs_equal_the_one_process_runs_up_to_float_rounding(uninterrupted, tmp_path):
    """``--nproc-per-node 2``: each run trained by two processes together (DDP, the global batch split
    between them): the same runs and learning rates, the same right answers, losses equal to float
    rounding; the run files name the two processes and the command."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(bench(tmp_path, "dp", "--nproc-per-node", "2"), capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    one, two = records(uninterrupted), records(tmp_path / "dp")
    assert one.keys() == two.keys()
    measured = ("val", "test", "val_curve", "test_by_difficulty")
    for name, a in one.items():
        b = two[name]
        assert {k: v for k, v in a.items() if k not in measured} == {k: v for k, v in b.items() if k not in measured}
        assert (b["test"]["correct"], b["test"]["answers"]) == (a["test"]["correct"], a["test"]["answers"])
        assert b["val"]["loss"] == pytest.approx(a["val"]["loss"], abs=1e-5)
        assert [s for s, _ in b["val_curve"]] == [s for s, _ in a["val_curve"]]
    raw = json.loads(next((tmp_path / "dp" / "out" / "runs").glob("*.json")).read_text())
    assert raw["machine"].endswith("× 2 processes") and raw["command"].endswith("--nproc-per-node 2")


def test_a_shard_without_main_runs_does_not_wait_for_the_sweep(tmp_path):
    """Only a shard with main runs needs the chosen rates; one without (here shard 4 of 5: the grid has
    4 sweep and 4 main runs) returns at once instead of waiting for the other shards' sweep runs (a
    worker running shards one after another would otherwise wait forever)."""
    out = subprocess.run(bench(tmp_path, "e", "--shard", "4/5"), capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0 and "has no runs of this grid" in out.stdout, out.stderr
    assert not list((tmp_path / "e" / "out" / "runs").glob("*.json"))


@pytest.mark.parametrize("extra", [[], ["--nproc-per-node", "2"]], ids=["one process", "data-parallel"])
def test_no_wait_exits_75_instead_of_waiting_for_other_shards_sweep_runs(uninterrupted, tmp_path, extra):
    """Shard 0 of 5 holds one sweep run and one main run: with ``--no-wait`` it trains its sweep run,
    then exits with status 75 before any main run, because the other sweep runs are missing; once
    they exist the same command finishes its main run, equal to the unsharded run's. The same with
    each run on two processes (whose ranks agree on what is missing)."""
    import shutil

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(bench(tmp_path, "f", "--shard", "0/5", "--no-wait", *extra), capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 75 and "the sweep is incomplete" in out.stderr, (out.returncode, out.stderr)
    assert [p.name for p in (tmp_path / "f" / "out" / "runs").glob("*.json")] == ["L256__gpt__w16__seed1_lr0.003.json"]
    for path in (uninterrupted / "out" / "runs").glob("*_lr*.json"):  # the other shards' sweep runs
        shutil.copy(path, tmp_path / "f" / "out" / "runs")
    out = subprocess.run(bench(tmp_path, "f", "--shard", "0/5", "--no-wait", "--resume", *extra), capture_output=True,
                         text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    main = "L256__gpt__w16__seed1.json"
    assert records(tmp_path / "f")[main] == records(uninterrupted)[main]


def test_a_checkpoint_of_other_settings_in_work_is_refused_not_overwritten(uninterrupted, tmp_path):
    """Two benches sharing a --work folder (here: another --out, other --steps) must not overwrite each
    other's checkpoints (lost work): the second is refused with a one-line error and the folder stays
    as it was. Without --work each bench gets runs/tasks/<last part of --out>, so they never share."""
    import shutil

    shutil.copytree(uninterrupted / "work", tmp_path / "shared")
    before = {p: p.read_bytes() for p in (tmp_path / "shared").rglob("*") if p.is_file()}
    out = subprocess.run(bench(tmp_path, "g", "--steps", "5", "--work", str(tmp_path / "shared")), capture_output=True,
                         text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 2 and "holds a checkpoint of other training settings" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert {p: p.read_bytes() for p in (tmp_path / "shared").rglob("*") if p.is_file()} == before
    command = [sys.executable, "-m", "phaselm", "bench", "tasks", *TINY, "--models", "gpt", "--lrs", "3e-3",
               "--seeds", "1", "--out", "results/o1"]
    subprocess.run(command, check=True, capture_output=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert (tmp_path / "runs" / "tasks" / "o1").is_dir() and not (tmp_path / "runs" / "tasks" / "selective_copy").exists()


def test_bench_tasks_refuses_bad_arguments_in_one_line(tmp_path):
    cases = {("--models", ""): "--models is empty", ("--difficulties", ""): "--difficulties is empty",
             ("--out", ""): "--out is empty", ("--work", " "): "--work is empty",
             ("--lrs", "nan"): "--lrs must be finite positive", ("--lrs", "1e-3,inf"): "--lrs must be finite positive",
             ("--mixture",): "--mixture trains on a mixture of at least two difficulties",
             ("--device", "cuda:x"): "--device must be cpu, cuda, cuda:N or auto",
             ("--lrs", "-1e-3"): "must be attached with '=' (--lrs=VALUE)",
             ("--out", str(tmp_path / "file")): "cannot create it",
             ("--num-test", "100000000"): "the task data alone would take",
             ("--vocab-size", "1000000000"): "the embedding and LM head alone would take",
             ("--nproc-per-node", "3"): "--batch-size (8) must be divisible by --nproc-per-node (3)",
             ("--nproc-per-node", "0"): "--nproc-per-node must be at least 1"}
    (tmp_path / "file").write_text("")
    for extra, message in cases.items():
        out = subprocess.run(bench(tmp_path, "h", *extra), capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and message in out.stderr, (extra, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1, (extra, out.stderr)


def test_report_refuses_foreign_truncated_and_mixed_run_files(uninterrupted, tmp_path):
    import shutil

    from phaselm.evaluation.tasks_report import parse_seeds, render

    def folder(name):
        shutil.copytree(uninterrupted / "out", tmp_path / name)
        return tmp_path / name

    (folder("stray") / "runs" / "summary.json").write_text('{"task": "selective_copy"}')
    with pytest.raises(ValueError, match=r"summary.json is not a run result of phaselm bench tasks \(no 'run'\)"):
        render(tmp_path / "stray")
    path = next((folder("cut") / "runs").glob("*seed2.json"))
    path.write_text(path.read_text()[:100])
    with pytest.raises(ValueError, match="is not valid JSON .*truncated"):
        render(tmp_path / "cut")
    path = next((folder("mixed") / "runs").glob("*seed2.json"))
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "protocol": {**record["protocol"], "steps": 4000}}))
    with pytest.raises(ValueError, match="mixes runs of different settings .*steps=6.*4000"):
        render(tmp_path / "mixed")
    with pytest.raises(ValueError, match=r"--seeds 1-5: .* has no test results of seed 3 \(seeds there: 1-2\)"):
        render(folder("seeds"), parse_seeds("1-5"))
    out = subprocess.run(bench(tmp_path, "stray", "--resume", "--out", str(tmp_path / "stray")), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "is not a run result" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_suite_models_match_parameter_counts_within_10_percent():
    from phaselm.evaluation.tasks_bench import MODELS, count_params, model_section

    for width in (32, 64, 128):
        for vocab in (16, 8192):
            for conv in (0, 3):
                gpt = count_params(model_section("gpt", width, 256, vocab, conv), vocab)
                for m in MODELS:
                    n = count_params(model_section(m, width, 256, vocab, conv), vocab)
                    assert abs(n / gpt - 1) <= 0.10, (m, width, vocab, conv, n, gpt)
            # the Mamba stacks are sized against the GPT without the convolution: their runs do not depend on it
            assert model_section("mamba", width, 256, vocab, 3) == model_section("mamba", width, 256, vocab, 0)


def test_each_control_differs_from_the_model_it_controls_in_its_one_setting():
    from phaselm.evaluation.tasks_bench import BASELINE, model_section

    off = {"frozen": {"kuramoto_steps": 0}, "nobias": {"coherence_init": 0.0, "coherence_trainable": False}}
    for control in ("phasegpt_frozen", "phasegpt_nobias", "phasegpt_single_frozen", "phasegpt_single_nobias"):
        model = BASELINE[control]
        section, base = model_section(control, 64, 128, 16, 3), model_section(model, 64, 128, 16, 3)
        assert section == {**base, **off[control.rsplit("_", 1)[1]]}, control
    assert model_section("phasegpt_single", 64, 128, 16, 3)["phase_layers"] == [1]
    assert model_section("phasegpt_all", 64, 128, 16, 3)["phase_layers"] == [0, 1]


@pytest.mark.parametrize("coupling_mode", ["context", "constant"])
def test_every_trainable_parameter_of_every_suite_model_gets_a_gradient(coupling_mode):
    """DDP (``--nproc-per-node``) needs a gradient for every trainable parameter: the frozen-phase
    controls' ω and K, which never reach the output, do not require one."""
    import torch

    from phaselm.evaluation.tasks_bench import MODELS, model_section
    from phaselm.models import MODELS as ARCH, config_from_dict

    for name in MODELS:
        section = model_section(name, 16, 32, 32, 3)
        if section["type"] == "pma":
            section["coupling_mode"] = coupling_mode
        torch.manual_seed(0)
        model = ARCH[section["type"]][1](config_from_dict(section, 32))
        x = torch.randint(0, 32, (2, 32))
        loss = model(x, targets=x).loss
        reg = model.coherence_loss()
        (loss if reg is None else loss + reg).backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, (name, missing)
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        if name.endswith("frozen"):
            assert frozen and all(n.rsplit(".", 1)[-1] in ("omega", "coupling", "coupling_raw", "weight", "bias")
                                  and (".attn." in n or ".pma." in n) for n in frozen), (name, frozen)


def test_resume_refuses_a_run_trained_at_another_rate_than_the_sweep_chooses(uninterrupted, tmp_path):
    import shutil

    shutil.copytree(uninterrupted, tmp_path / "d")
    path = next(p for p in (tmp_path / "d" / "out" / "runs").glob("*seed2.json"))
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "lr": 0.5}))
    out = subprocess.run(bench(tmp_path, "d", "--resume"), capture_output=True, text=True)
    assert out.returncode == 2 and "another learning rate" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_resume_refuses_runs_of_another_model_configuration(uninterrupted, tmp_path):
    import shutil

    shutil.copytree(uninterrupted, tmp_path / "f")
    gpt = json.loads(next((tmp_path / "f" / "out" / "runs").glob("*gpt*seed2.json")).read_text())
    assert gpt["model_config"]["short_conv"] == 3  # the default (docs/tasks.md, amendment 4)
    out = subprocess.run(bench(tmp_path, "f", "--resume", "--short-conv", "0"), capture_output=True, text=True)
    assert out.returncode == 2 and "another model configuration" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    # a run made before the field existed counts as made without the convolution
    from phaselm.evaluation.tasks_bench import _same_model

    old = {k: v for k, v in gpt["model_config"].items() if k != "short_conv"}
    assert _same_model(old, {**old, "short_conv": 0}) and not _same_model(old, {**old, "short_conv": 3})
    old = {k: v for k, v in gpt["model_config"].items() if k != "initializer_range"}  # made before that field
    assert _same_model(old, {**old, "initializer_range": 0.02}) and not _same_model(old, {**old, "initializer_range": 0.1})


def test_every_committed_task_run_is_recognised_as_the_model_its_command_builds():
    """A committed run's JSON is reused by ``--resume`` only if its recorded model section equals the
    one the bench builds now from the run's own command; a field added to the configs later must not
    make committed runs look like another model (their cells would fail instead of being skipped)."""
    from pathlib import Path

    from phaselm.evaluation.tasks_bench import _same_model, model_section
    from phaselm.training.config import from_dict

    root = Path(__file__).resolve().parents[1] / "results" / "tasks"
    records = [json.loads(p.read_text()) for p in sorted(root.glob("*/runs/*.json"))]
    assert records
    for r in records:
        saved = r["model_config"]
        section = {**model_section(r["model"], r["width"], saved["block_size"], saved["vocab_size"],
                                   saved.get("short_conv", 0)), "vocab_size": saved["vocab_size"]}
        mine = from_dict({"data": r["data"], "model": section, "train": {}}).to_dict()["model"]
        assert _same_model(r["model_config"], mine), r["run"]


def test_a_sweep_gains_a_rate_without_retraining_the_runs_it_has(uninterrupted, tmp_path):
    import shutil

    shutil.copytree(uninterrupted, tmp_path / "e")
    runs = tmp_path / "e" / "out" / "runs"
    before = {p.name: p.read_bytes() for p in runs.glob("*.json")}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(bench(tmp_path, "e", "--resume", "--lrs", "1e-4,3e-3,1e-2"), check=True, capture_output=True, env=env)
    after = {p.name: p.read_bytes() for p in runs.glob("*.json")}
    assert {n: after[n] for n in before} == before  # nothing retrained: 1e-4 learns less in 6 steps than the chosen rate
    assert sorted(set(after) - set(before)) == [f"L256__{m}__w16__seed1_lr0.0001.json" for m in ("gpt", "mamba")]
    out = subprocess.run(bench(tmp_path, "e", "--resume", "--lrs", "3e-3"), capture_output=True, text=True, env=env)
    assert out.returncode == 2 and "--lrs must include 0.0001,0.01" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_a_checkpoint_of_other_training_settings_is_not_counted_as_the_same(tmp_path):
    from phaselm.evaluation.tasks_bench import _same_training
    from phaselm.training.config import load_config
    from phaselm.training.trainer import Trainer

    base = ["data.name=selective_copy", "data.seq_len=24", "data.num_tokens=2", "data.vocab_size=6",
            "data.num_train=64", "data.num_test=16", "model.block_size=24", "model.n_layer=1", "model.n_head=2",
            "model.n_embd=16", "train.max_iters=2", "train.batch_size=4", "train.eval_interval=2",
            "train.device=cpu", f"train.out_dir={tmp_path / 'run'}"]
    Trainer(load_config(None, base + ["train.lr=1e-3"]), progress=False).train()
    assert _same_training(tmp_path / "run", load_config(None, base + ["train.lr=1e-3"]))
    assert not _same_training(tmp_path / "run", load_config(None, base + ["train.lr=1e-2"]))


# ---------------------------------------------------------------- the mixture of difficulties
def mixture_config(tmp_path, **kw):
    from phaselm.training.config import load_config

    return load_config(None, ["data.name=mqar", "data.vocab_size=256", "data.num_train=40", "data.num_test=16",
                              "data.mixture=[{seq_len: 32, num_kv_pairs: 2, num_train: 200}, {seq_len: 64, num_kv_pairs: 4}]",
                              "model.block_size=64", "model.n_layer=1", "model.n_head=2", "model.n_embd=16",
                              "train.max_iters=4", "train.batch_size=8", "train.eval_interval=4", "train.device=cpu",
                              f"train.out_dir={tmp_path / 'run'}", *[f"{k}={v}" for k, v in kw.items()]])


def test_mixture_batches_come_from_one_component_in_proportion_to_its_examples(tmp_path):
    from phaselm.training.trainer import TaskExamples

    data = TaskExamples(mixture_config(tmp_path))
    assert [len(p.train[0]) for p in data.parts] == [200, 40] and [p.task.seq_len for p in data.parts] == [32, 64]
    g = torch.Generator().manual_seed(0)
    lengths = []
    for _ in range(3000):
        x, y = data.xy(data.rows(g, 8))
        assert x.shape == y.shape and x.shape[0] == 8
        part = data.parts[[p.task.seq_len for p in data.parts].index(x.shape[1])]
        assert all(any((row == t).all() for t in torch.from_numpy(part.train[0])) for row in x[:2])  # its own rows
        lengths.append(x.shape[1])
    share = lengths.count(32) / len(lengths)
    assert abs(share - 200 / 240) < 0.03  # p(component) = n_c / sum n


def test_mixture_settings_errors_are_one_line(tmp_path):
    from phaselm.training.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"data.mixture\[1\].*'depth' is neither"):
        load_config(None, ["data.name=mqar", "data.mixture=[{seq_len: 64}, {depth: 3}]", "model.block_size=64"])
    with pytest.raises(ConfigError, match="block_size .64. is shorter than the task's seq_len .128."):
        load_config(None, ["data.name=mqar", "data.mixture=[{seq_len: 64}, {seq_len: 128}]", "model.block_size=64"])
    with pytest.raises(ConfigError, match="data.mixture is for synthetic tasks"):
        load_config(None, ["data.name=tiny-shakespeare", "data.mixture=[{seq_len: 64}]"])


def test_bench_on_the_mixture_tests_one_model_per_seed_on_every_difficulty(tmp_path):
    from phaselm.evaluation.tasks_bench import MIX, TasksBench, TasksConfig
    from phaselm.evaluation.tasks_report import load, markdown
    from phaselm.training.trainer import TaskExamples, evaluate_answers, load_for_inference

    cfg = TasksConfig(task="mqar", models=["gpt"], widths=[16], seeds=2, difficulties=["L64-kv4", "L128-kv8"],
                      lrs=[3e-3], steps=4, batch_size=8, num_train=50, num_test=16, eval_interval=4, vocab_size=256,
                      mixture=True)
    TasksBench(cfg, tmp_path / "out", tmp_path / "work", "test", progress=False).run()
    runs = {p.name: json.loads(p.read_text()) for p in (tmp_path / "out" / "runs").glob("*.json")}
    assert sorted(runs) == sorted([f"{MIX}__gpt__w16__seed1_lr0.003.json", f"{MIX}__gpt__w16__seed1.json",
                                   f"{MIX}__gpt__w16__seed2.json"] + [f"{d}__gpt__w16__seed{s}.json" for d in
                                                                      ("L64-kv4", "L128-kv8") for s in (1, 2)])
    mix = runs[f"{MIX}__gpt__w16__seed2.json"]
    assert [p["num_train"] for p in mix["data"]["mixture"]] == [50, 10] and mix["model_config"]["block_size"] == 128
    model, *_ = load_for_inference(tmp_path / "work" / f"{MIX}__gpt__w16__seed2")
    parts = TaskExamples(load_for_inference(tmp_path / "work" / f"{MIX}__gpt__w16__seed2")[2]).parts
    for label, part, pairs in zip(("L64-kv4", "L128-kv8"), parts, (4, 8)):
        r = runs[f"{label}__gpt__w16__seed2.json"]
        assert r["trained_on"] == mix["run"] and r["difficulty"] == label and r["test"]["answers"] == 16 * pairs
        assert r["test"] == mix["test_by_difficulty"][label]
        assert r["test"]["accuracy"] == evaluate_answers(model, *part.test, torch.device("cpu"))["accuracy"]
    main, sweep = load(tmp_path / "out")
    assert {r["difficulty"] for r in main} == {"L64-kv4", "L128-kv8"} and len(sweep) == 1
    # a folder holding only the mixture runs (an experiment that wrote no per-difficulty files) loads the same
    only_mix = tmp_path / "only_mix"
    (only_mix / "runs").mkdir(parents=True)
    for name, record in runs.items():
        if name.startswith(MIX):
            (only_mix / "runs" / name).write_text(json.dumps(record))
    assert load(only_mix) == (main, sweep)
    text = markdown(main, sweep)[0]
    assert "mixture of L64-kv4, L128-kv8" in text
    # provenance counts a mixture run once, not once per difficulty it was tested on
    seconds = runs[f"{MIX}__gpt__w16__seed1_lr0.003.json"]["train_seconds"] + mix["train_seconds"]
    assert (f"- training time: {seconds / 3600:.2f} h over 2 trained runs (1 in the sweep; seed-1 runs that "
            "reused a sweep run: 1)") in text and "  - `test` (3)" in text
    # the commits line names the commit of every training, a sweep run's too
    sweep = [{**sweep[0], "commit": "sweeponly"}]
    assert f"- commits: {', '.join(sorted({main[0]['commit'], 'sweeponly'}))}" in markdown(main, sweep)[0]


def test_paired_comparisons_count_one_pair_per_trained_model():
    """A mixture run is one model tested on every difficulty: the overall comparison pairs each
    seed's mean over the difficulties (n = seeds, not seeds × difficulties), each difficulty its own."""
    from phaselm.evaluation.tasks_report import markdown

    proto = {"num_test": 2000, "steps": 4, "batch_size": 8, "training": "mixture of L64-kv4, L128-kv8",
             "num_train": 50}
    acc = {("gpt", "L64-kv4"): [0.9, 0.8, 0.7], ("gpt", "L128-kv8"): [0.5, 0.4, 0.6],
           ("phasegpt_all", "L64-kv4"): [0.95, 0.8, 0.72], ("phasegpt_all", "L128-kv8"): [0.45, 0.5, 0.6]}
    main = [{"run": f"{d}/{m}/w64/seed{s + 1}", "task": "mqar", "protocol": proto, "model": m, "width": 64,
             "difficulty": d, "seed": s + 1, "lr": 3e-3, "sweep": False, "params": 1000, "test": {"accuracy": a},
             "train_seconds": 1.0, "commit": "c", "command": "x", "machine": "m", "cpu": "c", "torch": "t"}
            for (m, d), accs in acc.items() for s, a in enumerate(accs)]
    text, summary = markdown(main, [])
    c = summary["phasegpt_all"]
    assert c["baseline"] == "gpt" and c["overall"]["n"] == 3
    assert [c["by_difficulty"][d]["n"] for d in ("L64-kv4", "L128-kv8")] == [3, 3]
    per_seed = [np.mean([acc["phasegpt_all", d][s] - acc["gpt", d][s] for d in ("L64-kv4", "L128-kv8")]) for s in range(3)]
    assert c["overall"]["mean"] == pytest.approx(np.mean(per_seed))
    assert c["by_difficulty"]["L64-kv4"]["mean"] == pytest.approx(np.mean([0.05, 0.0, 0.02]))
    assert "| phasegpt_all | gpt | all | 3 | 65.00 |" in text and "| phasegpt_all | gpt | L128-kv8 | 3 | 50.00 |" in text
    assert c["overall"]["baseline"] == pytest.approx(0.65) and c["by_difficulty"]["L64-kv4"]["baseline"] == pytest.approx(0.8)


def test_a_verdict_at_three_seeds_needs_the_t_interval_to_exclude_zero():
    """Three pairs of +1, +2, +3 points: the percentile bootstrap stays above 0, the paired t-interval
    (mean 2 ± 4.30·1/√3) does not, so no verdict; ten pairs of the same spread are a verdict."""
    from phaselm.evaluation.tasks_report import _verdict, comparison

    c = comparison([0.01, 0.02, 0.03])
    assert c["ci95"][0] > 0 and c["t95"] == pytest.approx([0.02 - 4.303 * 0.01 / 3 ** 0.5, 0.02 + 4.303 * 0.01 / 3 ** 0.5], abs=1e-4)
    assert _verdict(c).startswith("no difference detected")
    assert _verdict(comparison([0.01, 0.02, 0.03] * 3 + [0.02])) == "helps"
    assert _verdict(comparison([-0.01, -0.02, -0.03] * 3 + [-0.02])) == "hurts"


def test_report_of_a_folder_without_test_results_is_a_one_line_error(tmp_path):
    """An empty runs folder, or one holding only mixture training runs (no per-difficulty test files),
    is refused in one line that names what is missing, not an IndexError."""
    from phaselm.evaluation.tasks_report import load

    (tmp_path / "runs").mkdir()
    with pytest.raises(ValueError, match="holds no run results"):
        load(tmp_path)
    (tmp_path / "runs" / "mix__gpt__w64__seed1.json").write_text(json.dumps(
        {"run": "mix/gpt/w64/seed1", "task": "mqar", "difficulty": "mix", "model": "gpt", "width": 64, "seed": 1,
         "lr": 3e-3, "sweep": False, "protocol": {"task": "mqar"}, "val": {}, "test": {}}))
    with pytest.raises(ValueError, match="mixture runs without their per-difficulty test files"):
        load(tmp_path)


def test_a_verdict_against_a_baseline_at_the_ceiling_says_only_a_loss_could_show():
    """A baseline at 99.99% leaves 0.01 points for a gain: "no difference" there is not "does not
    help", and the verdict says so; below the ceiling it does not."""
    from phaselm.evaluation.tasks_report import CEILING, _verdict, comparison

    diffs = [0.0001, -0.0001, 0.0]
    at_top = _verdict(comparison(diffs, [0.9999, 1.0, 0.9998]))
    assert at_top.startswith("no difference detected") and "at the ceiling (99.99%), so only a loss could show" in at_top
    assert "ceiling" not in _verdict(comparison(diffs, [CEILING - 0.01] * 3))
    assert "ceiling" not in _verdict(comparison(diffs))
    assert _verdict(comparison([-0.01, -0.02, -0.03] * 3 + [-0.02], [0.999] * 10)) == "hurts"


@pytest.mark.parametrize("kw, message", [
    ({"device": "tpu"}, "--device must be cpu, cuda, cuda:N or auto"),
    ({"mixture": True, "sweep_difficulty": "L64-kv4"}, "--sweep-difficulty does not apply to --mixture"),
    ({"difficulties": ["L32"]}, "'L32' is not a difficulty of mqar"),
    ({"short_conv": -1}, "--short-conv must be >= 0"),
])
def test_bench_settings_errors_are_one_line(kw, message):
    from phaselm.evaluation.tasks_bench import TasksConfig

    with pytest.raises(ValueError, match=message):
        TasksConfig(task="mqar", **kw).validate()


def test_val_curves_near_the_top_are_drawn_as_error_rates(tmp_path, monkeypatch):
    """Runs that all end at >= 90% are drawn as error rates on a symlog axis (a run with no error at 0);
    below that, as accuracy."""
    import phaselm.evaluation.tasks_report as report

    figures = []
    monkeypatch.setattr(report, "save_figure", lambda fig, path: figures.append(fig))

    def run(model, seed, curve):
        return {"task": "selective_copy", "difficulty": "L256", "model": model, "width": 64, "seed": seed,
                "val_curve": curve}

    report._plot_curves([run("gpt", 1, [[0, 0.0], [500, 0.99], [1000, 0.9995]]),
                         run("phasegpt_single", 1, [[0, 0.0], [1000, 1.0]])], tmp_path / "top.png")
    report._plot_curves([run("gpt", 2, [[0, 0.0], [1000, 0.5]])], tmp_path / "low.png")
    (top,), (low,) = figures[0].axes[:1], figures[1].axes[:1]
    assert top.get_yscale() == "symlog" and "error rate" in top.get_ylabel()
    assert [list(line.get_ydata()) for line in top.lines[:2]] == [pytest.approx([100, 1, 0.05]), [100, 0]]
    assert low.get_yscale() == "linear" and list(low.lines[0].get_ydata()) == [0.0, 50.0]
