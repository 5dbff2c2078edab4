"""What each ``phaselm`` command does (the arguments are parsed by :mod:`phaselm_cli`, which imports
this module only once a command runs): ``generate``, ``calibrate``, ``demo``, ``train``, ``eval``,
``sample``, ``interpret``, ``bench sampling | loops | tasks`` and ``report ...``.

:func:`run` turns bad input (a ``ValueError``, a model or checkpoint that cannot be loaded) into one
line on stderr and exit status 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

EX_TEMPFAIL = 75
"""Exit status of ``bench tasks --no-wait`` when its runs must wait for other shards (BSD sysexits)."""

def run(args) -> int:
    """Run the parsed command ``args`` (from :func:`phaselm_cli.build_parser`); return the exit status."""
    from phaselm.pretrained import ModelLoadError
    from phaselm.training.trainer import TrainingError

    commands = {"generate": cmd_generate, "calibrate": cmd_calibrate, "demo": cmd_demo, "bench": cmd_bench,
                "train": cmd_train, "eval": cmd_eval, "sample": cmd_sample, "interpret": cmd_interpret,
                "report": cmd_report}
    try:
        return commands[args.command](args)
    except (ValueError, ModelLoadError, TrainingError) as err:
        if not getattr(err, "quiet", False):  # quiet: another rank of a torchrun launch says it
            print(f"phaselm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"phaselm {args.command}: interrupted", file=sys.stderr)
        return 130



def _load(args):
    from phaselm.pretrained import load_causal_lm

    return load_causal_lm(args.model, device=args.device)


def _phase_slip(model, tok, args, prompts, noise_scale=None, progress=True, text=None):
    """A Phase-Slip sampler with calibrated heads; ``prompts`` and ``--max-new-tokens`` are checked against
    the model's context first, so a request that cannot run is refused before calibrating."""
    from phaselm.sampling import PhaseSlipSampler

    sampler = PhaseSlipSampler(
        model, tok,
        noise_scale=args.noise_scale if noise_scale is None else noise_scale,
        logit_fusion_alpha=getattr(args, "alpha", 0.45),
        perturbation_window=getattr(args, "window", 12),
        fusion=getattr(args, "fusion", "gate"),
    )
    sampler.encode(prompts, args.max_new_tokens)
    sampler.calibrate_heads(text=text, search_layers=getattr(args, "search_layers", None),
                            num_heads=getattr(args, "num_heads", None), progress=progress)
    return sampler


def cmd_generate(args) -> int:
    if args.input_file is not None:
        return _generate_file(args)
    if args.prompt is None:
        raise ValueError("give a prompt, or --input-file with one prompt per line")
    _check_decoding(args)  # the cheap arguments, before loading a model or calibrating
    model, tok = _load(args)
    return _decode_and_print(model, tok, args)


def _generate_file(args) -> int:
    """``generate --input-file``: one prompt per line → JSONL ``{"index", "prompt", "seed", "text",
    "new_tokens"}`` in input order. Line i uses seed ``--seed + i``; batches of ``--batch-size``
    consecutive lines are dealt round-robin to the ranks under torchrun and gathered on rank 0, so
    the output does not depend on the number of processes."""
    import json

    from phaselm.sampling import Sampler
    from phaselm.utils import all_gather, atomic_write, batches_for_rank

    if args.prompt is not None:
        raise ValueError("give either a prompt or --input-file, not both")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.output and not Path(args.output).resolve().parent.is_dir():
        raise ValueError(f"--output: the folder of {args.output} does not exist; create it or pick another path")
    try:
        with open(args.input_file, encoding="utf-8") as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
    except OSError as err:
        raise ValueError(f"--input-file: cannot read {args.input_file}: {err.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"--input-file: {args.input_file} is not UTF-8 text; write one prompt per line") from None
    if not prompts:
        raise ValueError(f"--input-file: {args.input_file} has no prompts; write one prompt per line")
    args.prompt = prompts[0]
    _check_decoding(args)
    args.prompt = None
    rank, _ = _init_distributed()
    model, tok = _load(args)
    if args.sampler == "phase-slip":
        sampler = _phase_slip(model, tok, args, prompts, progress=False)
    else:
        sampler = Sampler(model, tok)
    rows = []
    for cut in batches_for_rank(len(prompts), args.batch_size):
        seeds = [args.seed + i for i in cut]
        out = sampler.generate([prompts[i] for i in cut], max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                               seed=seeds, do_sample=args.sampler != "greedy", return_details=True)
        rows += [{"index": i, "prompt": prompts[i], "seed": s, "text": t, "new_tokens": len(ids)}
                 for i, s, t, ids in zip(cut, seeds, out.texts, out.token_ids)]
    rows = sorted((r for part in all_gather(rows) for r in part), key=lambda r: r["index"])
    if rank != 0:
        return 0
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if args.output:
        atomic_write(args.output, text)
        print(f"wrote {len(rows)} generations to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _check_decoding(args) -> None:
    from phaselm.sampling import SamplingConfig
    from phaselm.sampling.processors import check_seed

    if not args.prompt.strip():
        raise ValueError("prompt is empty; pass non-empty text")
    check_seed("--seed", args.seed)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature is not None and not 0 < args.temperature < float("inf"):
        raise ValueError(f"--temperature must be a finite number > 0, got {args.temperature}")
    SamplingConfig(temperature=1.0 if args.temperature is None else args.temperature, top_k=args.top_k,
                   top_p=args.top_p, min_p=args.min_p, do_sample=args.sampler != "greedy")
    if args.noise_scale < 0:
        raise ValueError(f"noise_scale must be >= 0 (a rotation angle in radians), got {args.noise_scale}")
    if args.window < 1:
        raise ValueError(f"perturbation_window must be an integer >= 1, got {args.window}")


def _decode_and_print(model, tok, args, calibration_text: str | None = None) -> int:
    from phaselm.sampling import Sampler

    kwargs = dict(max_new_tokens=args.max_new_tokens, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                  seed=args.seed, return_details=True, progress=True)
    if args.sampler == "phase-slip":
        sampler = _phase_slip(model, tok, args, [args.prompt], text=calibration_text)
        out = sampler.generate(args.prompt, temperature=args.temperature, **kwargs)
    else:
        out = Sampler(model, tok).generate(args.prompt, temperature=args.temperature,
                                           do_sample=args.sampler == "standard", **kwargs)
    print(args.prompt + out.texts[0])
    print(f"[{args.sampler}: {out.new_tokens} tokens, {out.tokens_per_second:.1f} tok/s]", file=sys.stderr)
    if args.diagnostics and out.diagnostics:
        d = out.diagnostics
        print(f"heads perturbed: {d['heads']}", file=sys.stderr)
        for t in range(d["entropy"].shape[-1]):
            print(f"step {t:3d}  H={d['entropy'][0, t]:.3f}  clean_weight={d['clean_weight'][0, t]:.3f}  "
                  f"KL={d['kl'][0, t]:.2e}", file=sys.stderr)
    return 0


def cmd_calibrate(args) -> int:
    from phaselm.sampling import PhaseSlipSampler

    text = None
    if args.text_file:
        try:
            with open(args.text_file, encoding="utf-8") as f:
                text = f.read()
        except OSError as err:
            raise ValueError(f"--text-file: cannot read {args.text_file}: {err.strerror}") from None
    model, tok = _load(args)
    cal = PhaseSlipSampler(model, tok).calibrate_heads(text=text, search_layers=args.search_layers,
                                                       num_heads=args.num_heads, seed=args.seed, progress=True)
    print(cal.table())
    print(f"\nselected (layer, kv_head): {cal.selected}")
    return 0


def cmd_demo(args) -> int:
    import textwrap

    from phaselm.sampling import Sampler

    model, tok = _load(args)
    print(f"prompt: {args.prompt!r}   seed={args.seed}   max_new_tokens={args.max_new_tokens}\n")
    from phaselm.sampling import PhaseSlipSampler

    phase = _phase_slip(model, tok, args, [args.prompt])
    strong = PhaseSlipSampler(model, tok, noise_scale=1.0, heads=phase.heads)
    plain = Sampler(model, tok)
    common = dict(max_new_tokens=args.max_new_tokens, seed=args.seed, return_details=True)
    runs = [
        ("greedy", plain.generate(args.prompt, do_sample=False, **common)),
        ("standard (T=0.65, top-k 40)", plain.generate(args.prompt, temperature=0.65, top_k=40, **common)),
        (f"phase-slip (T=0.65, top-k 40, noise {args.noise_scale} rad, heads {phase.heads})",
         phase.generate(args.prompt, top_k=40, **common)),
        ("phase-slip, noise 1.0 rad (same heads)", strong.generate(args.prompt, top_k=40, **common)),
    ]
    for name, out in runs:
        kl = out.diagnostics.get("kl")
        extra = f", mean KL(clean ‖ perturbed) {kl.mean():.1e} nats/step" if kl is not None else ""
        print(f"── {name}: {out.tokens_per_second:.1f} tok/s{extra}")
        print(textwrap.fill(args.prompt + out.texts[0], width=100, replace_whitespace=False))
        print()
    print("noise_scale is the rotation angle of the value vectors in radians; the same seed gives the same "
          "draws, so any difference from 'standard' is the perturbation's.")
    return 0


def cmd_train(args) -> int:
    from phaselm.training.config import load_config
    from phaselm.training.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    if args.nproc_per_node is not None:
        return _launch_ddp(args, cfg)
    summary = Trainer(cfg, resume=args.resume, overwrite=args.overwrite).train()
    if int(os.environ.get("RANK", 0)) == 0:
        val = summary["final_val"]
        tail = f", final val loss {val['loss']:.4f} (ppl {val['ppl']:.3f})" if val else ""
        print(f"trained to iteration {summary['iters']}: best val loss {summary['best_val_loss']:.4f}{tail}; "
              f"run folder {cfg.train.out_dir}")
    return 0


def _launch_ddp(args, cfg) -> int:
    """``phaselm train CONFIG --nproc-per-node N``: make every check a run makes before it starts here,
    in one process (a refusal is one line and exit 2: under a bare torchrun the ranks agree on it, but
    torchrun's launcher then adds its own failure report and exit 1), then run ``torchrun --standalone
    --nproc_per_node N -m phaselm train CONFIG ...`` with the same arguments; its exit status is ours."""
    from phaselm.training.trainer import RunFolder

    if "RANK" in os.environ:
        raise ValueError("--nproc-per-node launches torchrun itself; drop it when running under torchrun")
    _check_nproc(args.nproc_per_node, cfg.train.batch_size, "train.batch_size", cfg.train.device, "train.device")
    RunFolder(Path(cfg.train.out_dir)).check_launch(args.resume, args.overwrite)
    rest = [args.config, *args.overrides] + ["--resume"] * args.resume + ["--overwrite"] * args.overwrite
    return _torchrun(args.nproc_per_node, ["train", *rest])


def _check_nproc(n: int, batch_size: int, batch_name: str, device: str, device_name: str) -> None:
    """One-line refusals of ``--nproc-per-node n`` with a global batch of ``batch_size`` on ``device``
    (a CUDA launch puts rank r on GPU r, so it needs n GPUs and no fixed ``cuda:N``)."""
    import torch

    from phaselm.utils import wants_cuda

    if n < 1:
        raise ValueError(f"--nproc-per-node must be at least 1, got {n}")
    if batch_size % n:
        raise ValueError(f"{batch_name} ({batch_size}) must be divisible by --nproc-per-node ({n})")
    cuda = wants_cuda(device)
    if n > 1 and cuda and ":" in device:
        raise ValueError(f"{device_name}={device} would put all {n} processes on one GPU; use {device_name}=cuda "
                         "(process r takes GPU r)")
    if n > 1 and cuda and torch.cuda.device_count() < n:
        raise ValueError(f"--nproc-per-node {n} on CUDA needs {n} GPUs, this machine has "
                         f"{torch.cuda.device_count()}; lower --nproc-per-node or train on the CPU")


def _torchrun(n: int, phaselm_argv: list[str]) -> int:
    """Run ``torchrun --standalone --nproc_per_node n -m phaselm PHASELM_ARGV``; its exit status.

    Stopping it stops the processes cleanly (each saves a checkpoint, ``--resume`` continues): Ctrl-C
    reaches torchrun from the terminal, which passes it on, and this process waits for it rather than
    killing it (that would leave the training processes running, holding the run folder); a SIGTERM
    to this process is passed on to torchrun the same way."""
    import signal
    import subprocess

    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
            "-m", "phaselm", *phaselm_argv]
    sys.stdout.flush()
    sys.stderr.flush()
    proc = subprocess.Popen(argv)
    handlers = {signal.SIGINT: signal.SIG_IGN, signal.SIGTERM: lambda signum, frame: proc.send_signal(signum)}
    previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def cmd_eval(args) -> int:
    from phaselm.training.trainer import evaluate_split

    res = evaluate_split(args.checkpoint, args.split, str(torch_device(args.device)))
    if "accuracy" in res:
        print(f"checkpoint step {res['step']}: {args.split} accuracy {res['accuracy']:.4f} over {res['answers']} "
              f"answer tokens (exact-match examples {res['exact']:.4f}), loss {res['loss']:.4f} nats/answer")
        return 0
    print(f"checkpoint step {res['step']}: {args.split} loss {res['loss']:.4f} nats/token, perplexity "
          f"{res['ppl']:.3f} over {res['tokens']} tokens")
    return 0


def cmd_sample(args) -> int:
    from phaselm.data.datasets import load_splits
    from phaselm.training.trainer import load_for_inference

    args.device = str(torch_device(args.device))
    _check_decoding(args)
    model, tok, cfg, _ = load_for_inference(args.checkpoint, args.device)
    tok.encode(args.prompt)  # a character outside a char tokenizer's vocabulary: a one-line error
    # Phase-Slip calibrates its heads on the run's own validation text (a char model knows only its characters)
    text = load_splits(cfg.data.name, cfg.data.path)["val"][:4000] if args.sampler == "phase-slip" else None
    return _decode_and_print(model, tok.tok, args, calibration_text=text)


def cmd_interpret(args) -> int:
    from phaselm.evaluation.interpret import interpret
    from phaselm.training.trainer import load_for_inference

    if args.windows < 1:
        raise ValueError(f"--windows must be at least 1, got {args.windows}")
    args.device = str(torch_device(args.device))
    if args.text:  # read before any model loads
        try:
            text = Path(args.text).read_text(encoding="utf-8")
        except OSError as err:
            raise ValueError(f"--text: cannot read {args.text}: {err.strerror}") from None
        except UnicodeDecodeError:
            raise ValueError(f"--text: {args.text} is not UTF-8 text; pass a text file") from None
    model, tok, cfg, _ = load_for_inference(args.checkpoint, args.device)
    if not 0 <= args.head < cfg.model.n_head:
        raise ValueError(f"--head must be in 0..{cfg.model.n_head - 1} (the model has {cfg.model.n_head} heads), "
                         f"got {args.head}")
    if args.split:
        from phaselm.data.datasets import load_splits

        text = load_splits(cfg.data.name, cfg.data.path)[args.split]
    out = Path(args.out) if args.out else Path(args.checkpoint) / "interpret"
    summary = interpret(model, tok, text, out, max_windows=args.windows, head=args.head)
    for layer, entry in summary["layers"].items():
        print(f"layer {layer}: R mean {entry['R_mean']:.3f}; per head " + " ".join(f"{r:.3f}" for r in entry["R_per_head"]))
    print(f"wrote {out}/summary.json and 4 PNGs")
    return 0


def torch_device(name: str):
    """``torch.device(name)``, checked before any model loads: a one-line error for a name torch
    does not know, or a GPU this machine does not have."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s); "
                             f"use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif device.type != "cpu" and not getattr(getattr(torch, device.type, None), "is_available", lambda: False)():
        raise ValueError(f"--device {name}: no {device.type} device is available here; use --device cpu")
    return device


def _floats(text: str, name: str, cast=float) -> list[float]:
    """Comma-separated numbers (``cast``: ``int`` for integers)."""
    try:
        return [cast(x) for x in text.split(",") if x.strip()]
    except ValueError:
        kind = "integers" if cast is int else "numbers"
        raise ValueError(f"{name}: expected comma-separated {kind}, got {text!r}") from None


def _init_distributed() -> tuple[int, int]:
    """Under ``torchrun`` (WORLD_SIZE > 1) join the process group (gloo on CPU, nccl on GPUs) and
    return ``(rank, world_size)``; ``(0, 1)`` otherwise."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and torch.distributed.is_nccl_available() else "gloo"
        torch.distributed.init_process_group(backend)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def cmd_bench_loops(args) -> int:
    import shlex

    from phaselm.evaluation.loops import LoopBench, LoopConfig, analyse

    command = "phaselm " + shlex.join(args.argv)
    cfg = LoopConfig(max_new_tokens=args.max_new_tokens, prompts=args.prompts, batch_size=args.batch_size,
                     seed=args.seed, human_passages=args.human_passages)
    if args.methods:
        cfg.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    cfg.validate()  # before loading any model
    if args.analyse_only:
        analyse(args.out, cfg.n, cfg.k, cfg.max_new_tokens, command=command)
    else:
        model, tok = _load(args)
        LoopBench(model, tok, cfg, args.out, model_name=args.model or "embedded SmolLM2-135M-Instruct").run(
            command, resume=args.resume)
    print(f"wrote {args.out}/results.json, report.md, loops.png")
    return 0


def cmd_bench_tasks(args) -> int:
    import shlex

    from phaselm.evaluation.tasks_bench import MODELS, SweepPending, TasksBench, TasksConfig, parse_shard
    from phaselm.evaluation.tasks_report import render

    cfg = TasksConfig(task=args.task, models=_names(args.models, "--models") if args.models is not None else list(MODELS),
                      widths=_floats(args.widths, "--widths", int), seeds=args.seeds, lrs=_floats(args.lrs, "--lrs"),
                      difficulties=_names(args.difficulties, "--difficulties") if args.difficulties is not None else None,
                      sweep_difficulty=args.sweep_difficulty, steps=args.steps,
                      batch_size=args.batch_size, num_train=args.num_train, num_test=args.num_test,
                      eval_interval=args.eval_interval, vocab_size=args.vocab_size, mixture=args.mixture,
                      device=args.device, short_conv=args.short_conv)
    n = args.nproc_per_node
    if n is not None:
        _check_nproc(n, cfg.batch_size, "--batch-size", cfg.device, "--device")
    data_parallel = n is not None and n > 1  # each run trained by n processes together (DDP)
    shard = parse_shard(args.shard) if args.shard is not None or not data_parallel else (0, 1)
    if not data_parallel:
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # under torchrun each process trains its own runs alone
            os.environ.pop(key, None)
    for flag, value in (("--out", args.out), ("--work", args.work)):
        if value is not None and not value.strip():
            raise ValueError(f"{flag} is empty; give a folder, or leave {flag} out for its default")
    out = args.out or f"results/tasks/{args.task}"
    sharded = args.shard is None and shard[1] > 1
    launch = f"torchrun --nproc_per_node {shard[1]} -m phaselm " if sharded else "phaselm "
    bench = TasksBench(cfg, out, args.work or f"runs/tasks/{Path(out).name or args.task}", launch + shlex.join(args.argv),
                       shard=shard, resume=args.resume, wait=not args.no_wait, processes=n if data_parallel else 1)
    if data_parallel and "RANK" not in os.environ:  # check here (one line, exit 2), then launch the n processes
        bench.check_start()
        status = _torchrun(n, args.argv)
        # the ranks exit 0 on --no-wait's early stop (torchrun reports any other status as a failure)
        return EX_TEMPFAIL if status == 0 and bench.unfinished() else status
    try:
        bench.run()
    except SweepPending as e:
        if bench.rank == 0:
            print(f"phaselm bench tasks: {e} (--no-wait: exit status {EX_TEMPFAIL})", file=sys.stderr)
        return 0 if data_parallel else EX_TEMPFAIL
    except ValueError as err:
        err.quiet = bench.rank != 0  # rank 0 says it
        raise
    if bench.rank != 0:
        return 0
    if not any(bench.runs_dir.glob("*.json")):  # a shard with no runs of its own (more shards than runs)
        print(f"phaselm bench tasks: shard {shard[0]}/{shard[1]} has no runs of this grid; nothing to render")
        return 0
    for path in render(out):  # every shard renders what exists; the last one to finish renders all of it
        print(f"wrote {path}")
    return 0


def _names(text: str, flag: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names:
        raise ValueError(f"{flag} is empty; give comma-separated names, or leave {flag} out for its default")
    return names



def cmd_bench(args) -> int:
    if args.bench == "loops":
        return cmd_bench_loops(args)
    if args.bench == "tasks":
        return cmd_bench_tasks(args)
    import shlex
    from dataclasses import asdict

    from phaselm.evaluation.sampling_bench import (
        POWERED, PROMPT_FILE, PUBLISHED_ROUNDS, PUBLISHED_TOKENS, BenchConfig, SamplingBench, load_prompts,
    )
    from phaselm.evaluation.sampling_report import read_earlier, setup_mismatch, verdict, write_all

    cfg = BenchConfig()
    if args.protocol == "published":
        cfg.rounds, cfg.max_new_tokens, cfg.protocol = PUBLISHED_ROUNDS, PUBLISHED_TOKENS, "published"
    elif args.protocol == "powered":
        for k, v in POWERED.items():
            setattr(cfg, k, list(v) if isinstance(v, list) else v)
        cfg.prompts, cfg.protocol = load_prompts(PROMPT_FILE), "powered"
        args.human_passages = 0 if args.human_passages is None else args.human_passages
    if args.rounds is not None:
        cfg.rounds = args.rounds
    if args.max_new_tokens is not None:
        cfg.max_new_tokens = args.max_new_tokens
    if args.prompts:
        cfg.prompts = load_prompts(args.prompts)
    if args.methods:
        cfg.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.metrics:
        cfg.metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    cfg.sweep = not args.no_sweep
    if args.sweeps:
        cfg.sweeps = [m.strip() for m in args.sweeps.split(",") if m.strip()]
    if args.temperatures:
        cfg.temperatures = _floats(args.temperatures, "--temperatures")
    if args.noise_scales:
        cfg.noise_scales = _floats(args.noise_scales, "--noise-scales")
    cfg.human_passages = 20 if args.human_passages is None else args.human_passages
    cfg.batch_size = args.batch_size
    cfg.validate()  # before loading any model
    if not args.resume and (Path(args.out) / "parts").is_dir() and any((Path(args.out) / "parts").glob("*.json")):
        raise ValueError(f"{Path(args.out) / 'parts'} holds results of an earlier run; pass --resume to continue it, "
                         f"or choose another --out")
    earlier = read_earlier(args.out)  # its rows are kept in the new report: refuse another setup before running
    model_name = args.model or "embedded SmolLM2-135M-Instruct"
    why = earlier and setup_mismatch(earlier, asdict(cfg), model_name, args.judge)
    if why:
        raise ValueError(f"{Path(args.out) / 'results.json'} holds results of another setup: {why}; choose another "
                         "--out (a report keeps the rows that earlier commands wrote)")
    rank, _ = _init_distributed()
    model, tok = _load(args)
    judge = None
    if args.judge:
        from phaselm.pretrained import load_causal_lm

        judge = load_causal_lm(args.judge, device=args.device)
    bench = SamplingBench(model, tok, cfg, judge=judge, model_name=model_name, judge_name=args.judge)
    res = bench.run(out_dir=args.out, resume=args.resume)
    if rank != 0:
        return 0
    world = int(os.environ.get("WORLD_SIZE", "1"))
    threads = os.environ.get("OMP_NUM_THREADS")
    command = ((f"OMP_NUM_THREADS={threads} " if threads else "")
               + (f"torchrun --standalone --nproc_per_node {world} -m phaselm " if world > 1 else "phaselm ")
               + shlex.join(args.argv))
    for path in write_all(res, args.out, command):
        print(f"wrote {path}")
    print(verdict(res))
    return 0



def cmd_report(args) -> int:
    import json
    import shlex

    command = "phaselm " + shlex.join(args.argv)
    if args.report == "run":
        from phaselm.evaluation.run_report import summarize_run

        s = summarize_run(args.run, args.out, args.run_command or command)
        print(f"wrote {Path(args.out) / 'summary.json'}: final val loss {s['final_val_loss']:.4f}, "
              f"test perplexity {s['final_test_ppl']:.3f}")
    elif args.report == "grid":
        from phaselm.evaluation.grid_report import report

        print(report(args.runs, args.out, args.baseline, args.plots, tuple(args.exclude)), end="")
    elif args.report == "criteria":
        from phaselm.evaluation.phase_b_criteria import criteria, markdown
        from phaselm.utils import atomic_write

        if not Path(args.runs).is_dir():
            raise ValueError(f"{args.runs} is not a folder of summarised runs (RUNS/ARM/seed-S/summary.json)")
        text = markdown(criteria(Path(args.runs)))
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            atomic_write(args.out, text)
        print(text, end="")
    elif args.report == "interventions":
        from phaselm.evaluation.pma_report import run_interventions

        result = run_interventions(args.runs, args.out, args.prompts, str(torch_device(args.device)), command)
        print(json.dumps(result["summary"], indent=1))
    elif args.report == "tasks":
        from phaselm.evaluation.tasks_report import parse_seeds, render

        seeds = parse_seeds(args.seeds) if args.seeds is not None else None
        print("re-rendered " + ", ".join(str(p) for p in render(args.folder, seeds)))
    else:  # sampling
        from phaselm.evaluation.sampling_report import rerender

        try:
            paths = rerender(args.folder)
        except (OSError, json.JSONDecodeError, KeyError) as err:
            raise ValueError(f"{args.folder}/results.json cannot be read ({err}); pass a folder written by "
                             "phaselm bench sampling") from None
        print("re-rendered " + ", ".join(str(p) for p in paths))
    return 0
