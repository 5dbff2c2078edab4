"""Data-parallel `bench sampling` and `generate --input-file`: 2 processes (gloo, CPU) give exactly
what 1 process gives; an interrupted benchmark resumed with --resume gives exactly what an
uninterrupted one gives."""
import json
import os
import socket

import torch.multiprocessing as mp

from phaselm_cli import main

BENCH = ["--rounds", "3", "--max-new-tokens", "6", "--human-passages", "0", "--batch-size", "4",
         "--methods", "standard_matched,phase_slip,dry,xtc,top_nsigma", "--sweeps", "standard_T,phase_slip_noise",
         "--temperatures", "0.5,0.8,1.2", "--noise-scales", "1.0"]
# prompts in the tiny tokenizer's vocabulary, of different lengths (batches are left-padded)
PROMPTS = ["the old king", "a dark night", "she saw the sea", "the ship", "then the queen went to the town",
           "it was a new day", "the dog"]
# what may differ between runs: timings, and how the run was made
VOLATILE = {"provenance", "wall_seconds", "method_wall_seconds", "world_size", "speed", "resumed", "command"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, argv: list[str]) -> None:
    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        assert main(argv) == 0
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _run_world(world: int, argv: list[str]) -> None:
    """``world`` processes of one thread each (one process: no process group), as torchrun starts them."""
    mp.spawn(_rank_main, args=(world, _free_port(), argv), nprocs=world, join=True)


def _stable(res: dict) -> dict:
    return {k: v for k, v in res.items() if k not in VOLATILE}


def _parts(folder) -> dict:
    out = {}
    for p in sorted((folder / "parts").glob("*.json")):
        data = json.loads(p.read_text())["data"]
        out[p.stem] = data["generations"]
    return out


def _strip_speed(res: dict) -> dict:
    res = _stable(res)
    res["results"] = {n: {k: v for k, v in r.items() if k != "tokens_per_second"} for n, r in res["results"].items()}
    return res


def test_bench_two_processes_equal_one(tiny_folder, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    argv = ["bench", "sampling", "--model", str(tiny_folder), "--prompts", str(prompts), *BENCH]
    _run_world(1, argv + ["--out", str(tmp_path / "one")])
    _run_world(2, argv + ["--out", str(tmp_path / "two")])
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert _parts(tmp_path / "one") == _parts(tmp_path / "two")  # every generation, token for token, and its scores
    assert _strip_speed(one) == _strip_speed(two)  # every summary, CI, comparison and MDE
    assert len(_parts(tmp_path / "one")["standard_matched"]) == len(PROMPTS) * 3


def test_generate_input_file_two_processes_equal_one(tiny_folder, tmp_path):
    inp = tmp_path / "in.txt"
    inp.write_text("\n".join(PROMPTS) + "\n")
    for sampler in ("phase-slip", "standard"):
        argv = ["generate", "--model", str(tiny_folder), "--input-file", str(inp), "--sampler", sampler,
                "--max-new-tokens", "6", "--batch-size", "2", "--seed", "7", "--top-k", "20", "--noise-scale", "1.0"]
        _run_world(1, argv + ["--output", str(tmp_path / f"{sampler}-one.jsonl")])
        _run_world(2, argv + ["--output", str(tmp_path / f"{sampler}-two.jsonl")])
        one = (tmp_path / f"{sampler}-one.jsonl").read_text()
        assert one == (tmp_path / f"{sampler}-two.jsonl").read_text()
        rows = [json.loads(line) for line in one.splitlines()]
        assert [r["index"] for r in rows] == list(range(len(PROMPTS)))
        assert [r["prompt"] for r in rows] == PROMPTS and [r["seed"] for r in rows] == [7 + i for i in range(len(PROMPTS))]


def test_resume_after_interruption_equals_uninterrupted(tiny_folder, tmp_path, monkeypatch, capsys):
    from phaselm.evaluation.sampling_bench import SamplingBench

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:4]) + "\n")
    argv = ["bench", "sampling", "--model", str(tiny_folder), "--prompts", str(prompts), *BENCH]
    assert main(argv + ["--out", str(tmp_path / "full")]) == 0

    real, calls = SamplingBench._generate, []

    def dies_on_the_fourth(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # a run killed in the middle of its fourth method
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SamplingBench, "_generate", dies_on_the_fourth)
    out = tmp_path / "cut"
    assert main(argv + ["--out", str(out)]) == 130
    done = sorted(p.stem for p in (out / "parts").glob("*.json"))
    assert len(done) == 3 and not (out / "results.json").exists()
    capsys.readouterr()
    # without --resume the earlier parts are not overwritten
    assert main(argv + ["--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    monkeypatch.setattr(SamplingBench, "_generate", real)
    assert main(argv + ["--out", str(out), "--resume"]) == 0
    full = json.loads((tmp_path / "full" / "results.json").read_text())
    resumed = json.loads((out / "results.json").read_text())
    assert sorted(resumed["resumed"]) == done
    assert _parts(out) == _parts(tmp_path / "full")
    assert _strip_speed(resumed) == _strip_speed(full)
    # a different configuration is refused, naming the fix
    capsys.readouterr()
    assert main([*argv, "--out", str(out), "--resume", "--max-new-tokens", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "max_new_tokens (6 there, 5 here)" in err[0] and "another --out" in err[0]
