"""The ``phaselm`` command line: argument parsing only, so that ``phaselm --help`` answers without
importing torch; each command's work is in :mod:`phaselm.cli` (imported once a command runs).

Commands: ``generate``, ``calibrate``, ``demo`` (Phase-Slip on any causal LM), ``train``, ``eval``,
``sample``, ``interpret`` (the phaselm models), ``bench sampling | loops | tasks`` and ``report run | grid | criteria |
interventions | sampling``. Bad input (a ``ValueError``, a model or checkpoint that cannot be loaded,
a mistyped flag) prints one line and exits with status 2. Flags are never prefix-matched:
``--resum`` is an error, not ``--resume``.
"""

from __future__ import annotations

import argparse
import sys

DEMO_PROMPT = "The ancient door creaked open"


class _Parser(argparse.ArgumentParser):
    """argparse without prefix matching of flags (every parser and subparser), whose usage errors
    are one line."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        if message.startswith("argument --") and message.endswith("expected one argument"):  # --lrs -1e-3
            flag = message.split()[1].split("/")[-1].rstrip(":")  # argparse read -1e-3 as a flag
            message += f"; a value that starts with '-' must be attached with '=' ({flag}=VALUE)"
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="hub name, local folder or .gguf file (default: embedded SmolLM2-135M)")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: cpu)")


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=None, help="default: 1.0 standard, 0.65 phase-slip")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)


def _add_phase_slip(p: argparse.ArgumentParser) -> None:
    p.add_argument("--noise-scale", type=float, default=0.03, help="rotation angle in radians (default 0.03)")
    p.add_argument("--alpha", type=float, default=0.45, help="logit fusion alpha (clean weight floor)")
    p.add_argument("--window", type=int, default=12, help="perturbation window W (positions)")
    p.add_argument("--fusion", choices=["gate", "contrast"], default="gate")
    p.add_argument("--search-layers", type=int, default=None, help="layers searched by head calibration (default: min(6, layers))")
    p.add_argument("--num-heads", type=int, default=None,
                   help="heads selected by calibration (default: 3, or all the searched layers have if fewer)")


def _add_decoding(p: argparse.ArgumentParser, sampler: str) -> None:
    p.add_argument("--sampler", choices=["greedy", "standard", "phase-slip"], default=sampler)
    _add_sampling(p)
    _add_phase_slip(p)
    p.add_argument("--diagnostics", action="store_true", help="print per-step entropy / clean weight / KL")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="phaselm", description="Phase dynamics in language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="continue a prompt with greedy, standard or Phase-Slip sampling")
    gen.add_argument("prompt", nargs="?", default=None, help="the prompt (or --input-file)")
    _add_model(gen)
    _add_decoding(gen, "phase-slip")
    gen.add_argument("--input-file", default=None,
                     help="one prompt per line; writes JSONL (line i: seed = --seed + i); runs under torchrun")
    gen.add_argument("--output", default=None, help="the JSONL file for --input-file (default: stdout)")
    gen.add_argument("--batch-size", type=int, default=8, help="prompts per batch with --input-file (default 8)")

    cal = sub.add_parser("calibrate", help="score KV heads for Phase-Slip and print the table")
    _add_model(cal)
    cal.add_argument("--text-file", default=None, help="calibration text (default: a built-in paragraph)")
    cal.add_argument("--search-layers", type=int, default=None, help="default: min(6, layers)")
    cal.add_argument("--num-heads", type=int, default=3)
    cal.add_argument("--seed", type=int, default=0)

    demo = sub.add_parser("demo", help="greedy vs standard vs Phase-Slip on the embedded model")
    _add_model(demo)
    demo.add_argument("--prompt", default=DEMO_PROMPT)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--max-new-tokens", type=int, default=48)
    demo.add_argument("--noise-scale", type=float, default=0.03)
    tr = sub.add_parser("train", help="train a model from a YAML config (runs under torchrun too)")
    tr.add_argument("config", help="YAML config file")
    tr.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.max_iters=200")
    again = tr.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue from the newest intact checkpoint in train.out_dir")
    again.add_argument("--overwrite", action="store_true",
                       help="delete the checkpoints and metrics of a run already in train.out_dir, then start")
    tr.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                    help="data-parallel training on N processes of this machine: checks the run folder first (a "
                         "refusal is one line, before any process starts), then launches torchrun --standalone")
    ev = sub.add_parser("eval", help="val/test perplexity of a checkpoint, and a few samples")
    ev.add_argument("checkpoint", help="a run folder (train.out_dir) or a checkpoints/step-* folder")
    ev.add_argument("--split", choices=["val", "test"], default="test")
    ev.add_argument("--device", default="cpu")
    sp = sub.add_parser("sample", help="continue a prompt with a trained run (the same decoding flags as generate)",
                        description="Continue PROMPT with a trained run. Past the model's context (block_size tokens) "
                                    "generation goes on as nanoGPT's does: each further token is predicted from the last "
                                    "block_size tokens by a full forward pass without a cache (slower; logged once).")
    sp.add_argument("checkpoint", help="a run folder (train.out_dir) or a checkpoints/step-* folder")
    sp.add_argument("prompt")
    sp.add_argument("--device", default="cpu")
    _add_decoding(sp, "standard")
    sp.set_defaults(max_new_tokens=200)

    it = sub.add_parser("interpret", help="phase synchrony (R, phases, coherence) of a PhaseGPT checkpoint on a text")
    it.add_argument("checkpoint")
    src = it.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="a text file (real text, not random ids)")
    src.add_argument("--split", choices=["train", "val", "test"], help="a split of the run's own dataset instead of --text")
    it.add_argument("--windows", type=int, default=8, help="how many block_size windows of the text to run (default 8)")
    it.add_argument("--out", default=None, help="output folder (default: CHECKPOINT/interpret)")
    it.add_argument("--head", type=int, default=0)
    it.add_argument("--device", default="cpu")

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    bs = bench.add_parser("sampling", help="Phase-Slip vs standard sampling at matched diversity",
                          description="Writes results.json, report.md, frontier.png and comparisons.png under --out.")
    _add_model(bs)
    bs.add_argument("--judge", default=None, help="a second model whose perplexity of the generations is reported")
    bs.add_argument("--protocol", choices=["phaselm", "published", "powered"], default="phaselm",
                    help="published: its 5 prompts x 40 rounds x 200 tokens; powered: the 64 prompts of "
                         "evaluation/data/sampling_prompts.jsonl and the headline methods (docs/sampling_benchmark.md); "
                         "--rounds, --max-new-tokens, ... override")
    bs.add_argument("--rounds", type=int, default=None, help="generations per prompt (default 8)")
    bs.add_argument("--max-new-tokens", type=int, default=None, help="default 64")
    bs.add_argument("--prompts", default=None,
                    help="a text file, one prompt per line, or .jsonl with a \"prompt\" field (default: the published 5)")
    bs.add_argument("--methods", default=None, help="comma-separated subset of the main methods")
    bs.add_argument("--metrics", default=None, help="comma-separated subset of the metrics")
    bs.add_argument("--no-sweep", action="store_true", help="skip the temperature / noise sweeps")
    bs.add_argument("--sweeps", default=None,
                    help="comma-separated subset of standard_T,phase_slip_T,phase_slip_noise,contrast_noise")
    bs.add_argument("--resume", action="store_true",
                    help="skip the methods whose results are already in OUT/parts (same configuration)")
    bs.add_argument("--temperatures", default=None, help="sweep temperatures, comma-separated")
    bs.add_argument("--noise-scales", default=None, help="sweep noise scales (rad), comma-separated")
    bs.add_argument("--human-passages", type=int, default=None,
                    help="human-reference passages per source (0: none; default 20, powered: 0)")
    bs.add_argument("--batch-size", type=int, default=8)
    bs.add_argument("--out", default="results/sampling")
    bl = bench.add_parser("loops", help="repetition loops: greedy vs Phase-Slip deterministic vs DRY & co.",
                          description="Writes methods/*.json, results.json, report.md and loops.png under --out.")
    _add_model(bl)
    bl.add_argument("--out", default="results/loops")
    bl.add_argument("--max-new-tokens", type=int, default=256)
    bl.add_argument("--prompts", type=int, default=None, help="use this many prompts of the set (default: all 104)")
    bl.add_argument("--methods", default=None, help="comma-separated subset (default: all; greedy is required)")
    bl.add_argument("--batch-size", type=int, default=16)
    bl.add_argument("--seed", type=int, default=0)
    bl.add_argument("--human-passages", type=int, default=10, help="human-reference passages per source (0: none)")
    bl.add_argument("--resume", action="store_true", help="keep the methods already written under OUT/methods")
    bl.add_argument("--analyse-only", action="store_true", help="only rebuild results.json/report.md/loops.png")
    bt = bench.add_parser("tasks", help="synthetic tasks (MQAR, selective copying, fuzzy/noisy recall): where could phase help?",
                          description="Trains every model of the suite (learning-rate sweep, then seeds) and writes "
                                      "OUT/runs/*.json, report.md, summary.json, accuracy_vs_difficulty.png, "
                                      "accuracy_vs_width.png and accuracy_by_seed.png (docs/tasks.md).")
    bt.add_argument("--task", required=True, choices=["mqar", "selective_copy", "fuzzy_recall", "noisy_recall"])
    bt.add_argument("--models", default=None, help="comma-separated subset (default: all; see docs/tasks.md)")
    bt.add_argument("--widths", default="32,64,128", help="model widths, comma-separated")
    bt.add_argument("--seeds", type=int, default=3)
    bt.add_argument("--difficulties", default=None, help="comma-separated labels, e.g. L64-kv4,L256-kv16 (default: all)")
    bt.add_argument("--lrs", default="1e-3,3e-3,1e-2", help="learning rates of the sweep, comma-separated")
    bt.add_argument("--sweep-difficulty", default=None, help="default: the middle difficulty")
    bt.add_argument("--mixture", action="store_true",
                    help="train one model per (model, width, seed) on the mixture of the difficulties (Zoology's MQAR "
                         "protocol: --num-train examples of the first, a fifth of that of each other) and test it on each")
    bt.add_argument("--steps", type=int, default=2000, help="optimiser steps per run")
    bt.add_argument("--batch-size", type=int, default=64)
    bt.add_argument("--num-train", type=int, default=None,
                    help="training examples per difficulty (default: 100000 for mqar, as Zoology; 12800 for the MAD tasks)")
    bt.add_argument("--num-test", type=int, default=2000, help="held-out examples (val and test, each)")
    bt.add_argument("--eval-interval", type=int, default=500)
    bt.add_argument("--vocab-size", type=int, default=None, help="the task's vocabulary (default: the task's own)")
    bt.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (several shards may share one GPU)")
    bt.add_argument("--short-conv", type=int, default=3,
                    help="kernel of the causal convolution in front of the GPT family's attention (Zoology's recall "
                         "models: 3; 0: none, as the MQAR runs before amendment 4 of docs/tasks.md)")
    bt.add_argument("--out", default=None, help="default: results/tasks/TASK")
    bt.add_argument("--work", default=None, help="run folders (checkpoints), default: runs/tasks/NAME, NAME the last "
                    "part of --out (benches with different --out never share checkpoints)")
    bt.add_argument("--resume", action="store_true", help="keep finished runs, continue interrupted ones")
    bt.add_argument("--shard", default=None, help="I/N: run the I-th of N slices (default: the torchrun rank)")
    bt.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                    help="train each run data-parallel on N processes of this machine (torchrun --standalone under "
                         "the hood; the global --batch-size is split across them, the results are the one-process "
                         "run's up to float rounding): for a run too long for one core")
    bt.add_argument("--no-wait", action="store_true",
                    help="where this shard's runs need other shards' unfinished sweep runs, exit with status 75 "
                         "(EX_TEMPFAIL) instead of waiting, so a job scheduler can run other work meanwhile")
    rep = sub.add_parser("report", help="rebuild tables, plots and summaries from runs and results").add_subparsers(
        dest="report", required=True)
    rr = rep.add_parser("run", help="summarise one training run: summary.json (final/best val, test, curves)")
    rr.add_argument("run", help="a run folder (train.out_dir)")
    rr.add_argument("out", help="folder for summary.json")
    rr.add_argument("--command", dest="run_command", default="", help="the command that trained the run, recorded in the summary")
    rg = rep.add_parser("grid", help="table (mean ± 95%% CI over seeds, paired Δ) and curves of a grid of summarised runs")
    rg.add_argument("runs", help="RUNS/ARM/seed-S/summary.json")
    rg.add_argument("--out", default=None, help="write the markdown table here too")
    rg.add_argument("--baseline", default="baseline", help="the arm the Δ column compares with")
    rg.add_argument("--plots", default=None, help="folder for val_curves.png and r_curves.png")
    rg.add_argument("--exclude", action="append", default=[], help="leave out the arms under this prefix (repeatable)")
    rc = rep.add_parser("criteria", help="the preregistered yes/no criteria of the PhaseGPT phase B grid")
    rc.add_argument("runs", help="RUNS/ARM/seed-S/summary.json with a baseline arm")
    rc.add_argument("--out", default=None)
    ri = rep.add_parser("interventions", help="K / R intervention sweep of trained PMA runs (entropy, R, Fisher trace)")
    ri.add_argument("runs", nargs="+", help="PMA run folders")
    ri.add_argument("--out", default="results/pma")
    ri.add_argument("--prompts", type=int, default=16, help="prompts per kind")
    ri.add_argument("--device", default="cpu")
    rt = rep.add_parser("tasks", help="re-render report.md, summary.json and the plots of a phaselm bench tasks folder")
    rt.add_argument("folder", help="the --out folder of phaselm bench tasks")
    rt.add_argument("--seeds", help="A-B: only seeds A..B (a confirmatory analysis on fresh seeds), written to "
                                    "report_seedsA-B.md and summary_seedsA-B.json")
    rs = rep.add_parser("sampling", help="re-render report.md, frontier.png and comparisons.png from a sampling benchmark's results.json")
    rs.add_argument("folder", nargs="?", default="results/sampling")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    from phaselm.cli import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
