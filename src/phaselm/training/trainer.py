"""One trainer for every trainable phaselm model (``phaselm train CONFIG.yaml``).

AdamW with linear warm-up and cosine decay, gradient clipping and accumulation, autocast on GPU,
optional ``torch.compile``; evaluation on the whole val split (non-overlapping windows, capped
by ``train.eval_max_tokens``): loss in nats/token and perplexity = exp(mean NLL over all tokens);
metrics appended to ``out_dir/metrics.jsonl`` (the source of truth); atomic, hash-verified
checkpoints (:mod:`phaselm.training.checkpoint`) with exact resume; a non-finite loss or an
exploding gradient stops the run and names the last good checkpoint; Ctrl-C and SIGTERM save
before exiting.

The run folder is guarded: it is checked to be writable before training, a lock file
(``out_dir/lock``, holding the owner's pid) stops a second run in the same folder (a lock whose
process is gone is taken over), a folder that already holds a run is refused unless ``--resume``
(continue from the newest intact checkpoint, falling back past damaged ones) or ``--overwrite``
(delete its checkpoints and metrics first) is given.

Under ``torchrun --nproc_per_node N`` the same command runs DDP (gloo on CPU, NCCL on GPU). The
global batch (``train.batch_size``) is drawn identically on every rank from one seeded generator
and each rank takes its slice, so N processes follow the same data as one, and each rank's loss is
weighted by its share of the batch's targets, so the gradient is the one process's (tested where
examples have different numbers of targets); rank 0 logs and checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import shutil

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from phaselm.data.datasets import (
    TextTokenizer, get_tokenizer, load_splits, token_id_tokenizer, tokenized,
)
from phaselm.data.tasks import TaskData
from phaselm.models import MODELS, config_from_dict, config_to_dict
from phaselm.training import checkpoint as ckpt
from phaselm.training.config import RunConfig, from_dict
from phaselm.utils import atomic_write, device_name, json_row, machine_name, wants_cuda


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, exploding gradient, mismatched resume)."""


class _Terminated(KeyboardInterrupt):
    """SIGTERM (what schedulers send), handled like Ctrl-C: save, then stop."""


def _perplexity(loss: float) -> float:
    """exp(loss), inf where that overflows (a diverged model), never an OverflowError."""
    return math.exp(loss) if loss < 709 else float("inf")


def usable_checkpoint(folder: Path) -> str | None:
    """None if checkpoint ``folder`` is good to continue from, else why not: it does not verify,
    holds non-finite weights, or its recorded val loss is non-finite or worse than the untrained
    model's (the run's first val loss): diverged."""
    try:
        state = ckpt.verify(folder)
        weights = ckpt.load_file(str(folder / "model.safetensors"))
    except (ckpt.CheckpointError, ckpt.SafetensorError, OSError) as err:
        return str(err)
    if not all(bool(torch.isfinite(w).all()) for w in weights.values() if w.is_floating_point()):
        return f"{folder.name} holds non-finite weights"
    metrics = state.get("metrics") or {}
    loss = (metrics.get("val") or {}).get("loss")
    initial = metrics.get("initial_val_loss")
    if loss is not None and (not math.isfinite(loss) or initial is not None and loss > initial):
        untrained = "" if initial is None else f", untrained model {initial:.4g}"
        return f"{folder.name} has diverged (val loss {loss:.4g}{untrained})"
    return None


class RunFolder:
    """``train.out_dir``: writable check, lock file, refusal to start over an existing run."""

    def __init__(self, path: Path):
        self.path, self.lock_path, self.locked = path, path / "lock", False

    def prepare(self) -> None:
        """Create the folder and prove it writable, before any training."""
        where = f"train.out_dir {self.path}"
        if self.path.exists() and not self.path.is_dir():
            raise TrainingError(f"{where} is a file, not a folder; choose another train.out_dir")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write-test-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise TrainingError(f"{where} cannot be written ({err.strerror or err}); choose a writable "
                                "train.out_dir") from None

    def acquire(self) -> None:
        """Take ``out_dir/lock`` (pid + host); a live owner refuses, a dead one's lock is taken over."""
        host = os.uname().nodename
        for _ in range(3):
            try:
                fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self.check_free()
                print(f"phaselm: taking over the stale lock {self.lock_path} (its process is gone)", file=sys.stderr)
                self.lock_path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": host}, f)
            self.locked = True
            return
        raise TrainingError(f"could not take the lock {self.lock_path}; remove it if no run uses {self.path}")

    def check_free(self) -> None:
        """Refuse if a live process holds ``out_dir/lock``."""
        owner = self._owner()
        if owner is not None:
            pid, owner_host = owner
            raise TrainingError(f"train.out_dir {self.path} is in use by another run (pid {pid} on {owner_host}, "
                                f"lock file {self.lock_path}); wait for it to finish, or choose another train.out_dir")

    def refusal(self, resume: bool, overwrite: bool) -> str | None:
        """Why a run cannot start here, in one line (None: it can): ``--resume`` without a checkpoint,
        or an earlier run in the folder without ``--resume`` or ``--overwrite``."""
        if resume and not ckpt.step_folders(self.path):
            return f"--resume: no checkpoint in {self.path}; start without --resume"
        earlier = [] if resume or overwrite else self.holds_run()
        if earlier:
            return (f"{self.path} already holds a run ({', '.join(earlier)}); pass --resume to continue it, "
                    "--overwrite to delete it and start again, or choose another train.out_dir")
        return None

    def check_launch(self, resume: bool, overwrite: bool) -> None:
        """Every check a run makes before it starts, without taking the lock (``phaselm train
        --nproc-per-node`` calls it before any rank exists)."""
        problem = self.refusal(resume, overwrite)
        if problem is not None:
            raise TrainingError(problem)
        self.prepare()
        self.check_free()

    def _owner(self) -> tuple[int, str] | None:
        """``(pid, host)`` of a live lock owner, None for a stale or unreadable lock."""
        try:
            info = json.loads(self.lock_path.read_text())
            pid, host = int(info["pid"]), str(info.get("host", ""))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if host and host != os.uname().nodename:
            return pid, host  # another machine's process: cannot tell, so it counts as live
        if pid == os.getpid():
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return pid, host or "this machine"

    def release(self) -> None:
        if self.locked:
            self.lock_path.unlink(missing_ok=True)
            self.locked = False

    def holds_run(self) -> list[str]:
        """What in the folder belongs to an earlier run (checkpoints, metrics.jsonl, the model files)."""
        found = []
        root = self.path / "checkpoints"
        if root.is_dir() and any(ckpt.STEP_NAME.match(p.name) for p in root.iterdir()):
            found.append("checkpoints")
        if (self.path / "metrics.jsonl").exists():
            found.append("metrics.jsonl")
        return found + [p.name for p in ckpt.published_files(self.path)]

    def clear(self) -> None:
        """``--overwrite``: delete the earlier run's checkpoints, model files, metrics and TensorBoard logs."""
        for path in ckpt.published_files(self.path):
            path.unlink(missing_ok=True)
        for name in ("checkpoints", "tensorboard"):
            shutil.rmtree(self.path / name, ignore_errors=True)
        (self.path / "metrics.jsonl").unlink(missing_ok=True)


def build_model(cfg: RunConfig, vocab_size: int) -> torch.nn.Module:
    """The model of ``cfg.model`` (its config class, with the tokenizer's ``vocab_size`` unless the
    config gives one)."""
    section = config_to_dict(cfg.model)
    config = config_from_dict(section, vocab_size)
    return MODELS[section["type"]][1](config)


def optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices, none on vectors and on parameters tagged
    ``p._no_weight_decay = True`` where they are created (A_log, PhaseGPT's ω, PMA's φ_pos)."""
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.dim() < 2 or getattr(p, "_no_weight_decay", False) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}
"""Dense bf16 tensor-core peak FLOP/s by GPU name (the denominator of MFU)."""


def flops_per_token(model: torch.nn.Module, block_size: int) -> float:
    """Training FLOPs per token, nanoGPT's estimate (PaLM, appendix B): 6·N for the weights'
    matmuls forward and backward, plus 12·L·C·T for the attention scores and their use (N: every
    parameter (nanoGPT leaves out the position embedding, < 1% of N at its baby-GPT size), L
    layers, width C, context T). Oscillator and scan work is not counted."""
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    return 6 * n + 12 * c.n_layer * c.n_embd * block_size


def peak_flops(device: torch.device) -> float | None:
    """The GPU's dense bf16 peak FLOP/s (None: unknown, or not a GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def lr_at(it: int, cfg) -> float:
    """Linear warm-up to ``lr`` over ``warmup_iters``, then cosine decay to ``min_lr`` at ``lr_decay_iters``."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


@torch.no_grad()
def evaluate(model, tokens: np.ndarray, block_size: int, device, max_tokens: int | None = None,
             batch_size: int = 32, autocast=nullcontext) -> dict:
    """Mean NLL (nats/token) and perplexity over non-overlapping windows of ``tokens``: every
    token after the first is predicted exactly once (up to ``max_tokens`` predictions)."""
    was_training = model.training
    model.eval()
    n = len(tokens) - 1 if max_tokens is None else min(len(tokens) - 1, max_tokens)
    starts = list(range(0, n, block_size))
    total, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        chunk = [np.asarray(tokens[s: min(s + block_size, n) + 1], dtype=np.int64) for s in starts[i: i + batch_size]]
        width = max(len(c) for c in chunk) - 1
        x = torch.zeros(len(chunk), width, dtype=torch.long)
        y = torch.full((len(chunk), width), -1, dtype=torch.long)
        for j, c in enumerate(chunk):
            x[j, : len(c) - 1] = torch.from_numpy(c[:-1])
            y[j, : len(c) - 1] = torch.from_numpy(c[1:])
        x, y = x.to(device), y.to(device)
        with autocast():
            logits = model(x).logits
        nll = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1,
                                                reduction="sum")
        total += nll.item()
        count += int((y >= 0).sum())
    model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": _perplexity(loss), "tokens": count}


@torch.no_grad()
def evaluate_answers(model, inputs: np.ndarray, targets: np.ndarray, device, batch_size: int = 100,
                     autocast=nullcontext) -> dict:
    """Synthetic-task metrics over the answer positions (``targets >= 0``) of ``inputs``/``targets``
    ``[n, L]``: mean NLL (``loss``), ``accuracy`` = fraction of answer tokens whose argmax prediction
    is right, ``answers`` (their number), ``correct``, and ``exact`` = fraction of examples with
    every answer right. The LM head runs at the answer positions only."""
    was_training = model.training
    model.eval()
    total, correct, answers, exact = 0.0, 0, 0, 0
    for i in range(0, len(inputs), batch_size):
        x = torch.from_numpy(np.asarray(inputs[i: i + batch_size])).to(device)
        y = torch.from_numpy(np.asarray(targets[i: i + batch_size])).to(device)
        with autocast():
            out = model(x, y, head_at_targets=True)  # logits [answers in the batch, V], loss their mean NLL
        keep, logits = y >= 0, out.logits
        total += float(out.loss) * int(keep.sum())
        hit = torch.zeros_like(y, dtype=torch.bool)
        hit[keep] = logits.argmax(-1) == y[keep]
        correct += int(hit.sum())
        answers += int(keep.sum())
        exact += int((hit | ~keep).all(dim=1).sum())
    model.train(was_training)
    loss = total / max(answers, 1)
    return {"loss": loss, "ppl": _perplexity(loss), "accuracy": correct / max(answers, 1), "answers": answers,
            "correct": correct, "exact": exact / max(len(inputs), 1)}


class TextData:
    """A text dataset as training data: random windows of ``block_size + 1`` tokens of the train
    split; evaluation = loss over the val split (:func:`evaluate`)."""

    head_at_targets = False  # every position has a target

    def __init__(self, cfg: RunConfig, saved_tokenizer: str | None = None):
        self.cfg = cfg
        self.splits = load_splits(cfg.data.name, cfg.data.path)
        # a resumed run keeps the tokenizer its checkpoint was trained with (``saved_tokenizer``, its JSON)
        self.tokenizer = (TextTokenizer.from_json(saved_tokenizer) if saved_tokenizer is not None
                          else get_tokenizer(cfg.data.tokenizer, "".join(self.splits.values())))  # char: all splits
        self.train_tokens = tokenized(self.splits["train"], self.tokenizer)
        self.val_tokens = tokenized(self.splits["val"], self.tokenizer)
        if len(self.train_tokens) <= cfg.model.block_size + 1:
            raise TrainingError(f"the train split has {len(self.train_tokens)} tokens, too few for model.block_size "
                                f"{cfg.model.block_size}; use a larger dataset or a smaller block")
        self.tokens_per_example = cfg.model.block_size

    def rows(self, generator: torch.Generator, global_b: int) -> list[np.ndarray]:
        """``global_b`` windows (token ids, ``[block + 1]``), drawn from ``generator``."""
        block = self.cfg.model.block_size
        starts = torch.randint(len(self.train_tokens) - block - 1, (global_b,), generator=generator)
        return [np.asarray(self.train_tokens[s: s + block + 1], dtype=np.int64) for s in starts.tolist()]

    def xy(self, rows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        xy = torch.from_numpy(np.stack(rows))
        return xy[:, :-1], xy[:, 1:]

    def evaluate(self, model, device, autocast, max_tokens) -> dict:
        return evaluate(model, self.val_tokens, self.cfg.model.block_size, device, max_tokens, autocast=autocast)


class TaskExamples:
    """A synthetic task (:mod:`phaselm.data.tasks`) as training data: examples drawn with
    replacement from the training set; evaluation = :func:`evaluate_answers` on the val set. The
    LM head runs at the answer positions only (``head_at_targets``).

    With ``data.mixture`` (components c = 1..C of ``n_c`` training examples each) every step first
    draws one component, p(c) = n_c / Σ n, then its batch from that component's examples (the
    expected mix of Zoology's concatenated training sets, without padding short sequences); the
    val metrics are the components' means, with each component's own under ``by_component``."""

    head_at_targets = True

    def __init__(self, cfg: RunConfig):
        d = cfg.data
        self.parts = [TaskData.build(task, n, d.num_test, d.data_seed, cache=True) for task, n in d.components()]
        self.data = self.parts[0]
        self.sizes = torch.tensor([len(p.train[0]) for p in self.parts], dtype=torch.float64)
        self.offsets = [0, *torch.cumsum(self.sizes, 0).long().tolist()]
        self.tokenizer = TextTokenizer(token_id_tokenizer(self.data.vocab_size), f"task:{d.name}")
        self.tokens_per_example = round(float((self.sizes * torch.tensor([p.task.seq_len for p in self.parts]))
                                              .sum() / self.sizes.sum()))

    def rows(self, generator: torch.Generator, global_b: int) -> list[int]:
        """Row indices into the components' concatenated training sets, all from one component."""
        c = 0 if len(self.parts) == 1 else int(torch.multinomial(self.sizes, 1, generator=generator))
        picks = torch.randint(len(self.parts[c].train[0]), (global_b,), generator=generator)
        return (picks + self.offsets[c]).tolist()

    def xy(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        c = int(np.searchsorted(self.offsets, rows[0], side="right")) - 1
        x, y = self.parts[c].train
        local = np.asarray(rows) - self.offsets[c]
        return torch.from_numpy(x[local]), torch.from_numpy(y[local])

    def evaluate(self, model, device, autocast, max_tokens=None, split: str = "val") -> dict:
        return self.combine([evaluate_answers(model, *getattr(p, split), device, autocast=autocast) for p in self.parts])

    def combine(self, results: list[dict]) -> dict:
        """The metrics of the components' :func:`evaluate_answers` ``results``: one component's own,
        else the means of loss, accuracy and exact match, the summed counts and ``by_component``."""
        if len(results) == 1:
            return results[0]
        mean = {k: float(np.mean([r[k] for r in results])) for k in ("loss", "accuracy", "exact")}
        return {**mean, "ppl": _perplexity(mean["loss"]), "answers": sum(r["answers"] for r in results),
                "correct": sum(r["correct"] for r in results),
                "by_component": {p.task.describe(): r for p, r in zip(self.parts, results)}}


class Trainer:
    """Trains ``cfg`` (a validated :class:`RunConfig`); ``resume=True`` continues from the newest
    intact checkpoint, ``overwrite=True`` replaces a run already in ``train.out_dir``."""

    def __init__(self, cfg: RunConfig, resume: bool = False, progress: bool = True, overwrite: bool = False):
        if resume and overwrite:
            raise TrainingError("--resume and --overwrite exclude each other; pick one")
        self.cfg, self.resume, self.progress, self.overwrite = cfg, resume, progress, overwrite
        t = cfg.train
        self.ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        want_cuda = wants_cuda(t.device)
        if t.device.startswith("cuda") and not torch.cuda.is_available():
            raise TrainingError("train.device is cuda but no GPU is available; use train.device=cpu")
        if self.ddp and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if want_cuda else "gloo")
        if want_cuda:
            local = int(os.environ.get("LOCAL_RANK", 0))
            self.device = torch.device(t.device if ":" in t.device else f"cuda:{local}")
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        dtype = t.dtype if t.dtype != "auto" else ("bfloat16" if want_cuda else "float32")
        self.autocast_dtype = None if dtype == "float32" else getattr(torch, dtype)
        if self.autocast_dtype is not None and not want_cuda:
            raise TrainingError(f"train.dtype={dtype} autocast is for GPUs; use train.dtype=float32 on CPU")
        if t.batch_size % self.world:
            raise TrainingError(f"train.batch_size ({t.batch_size}) must be divisible by the number of processes ({self.world})")
        self.out = Path(t.out_dir)

    # ------------------------------------------------------------------ helpers
    def _saved_tokenizer(self) -> str | None:
        """On ``--resume``: the tokenizer JSON of the newest readable checkpoint trained on this run's
        model/data config (None: none is; a changed config is refused later, once the run folder's
        lock is held, and a changed data set must not meet the saved tokenizer first)."""
        for folder in ckpt.step_folders(self.out) if self.resume else []:
            try:
                state = ckpt.read_state(folder)
                saved = from_dict(state["config"]).to_dict()  # a field added since has its default
                tokenizer = state["tokenizer"]
            except (ckpt.CheckpointError, OSError, KeyError, ValueError):
                continue
            return None if any(saved[k] != self.cfg.to_dict()[k] for k in ("model", "data")) else tokenizer
        return None

    def _agree(self, problem: str | None) -> None:
        """Refuse on every rank if any rank found ``problem`` (a one-line message; None: no problem).
        Under DDP the ranks first exchange what they found, so none is left waiting in a collective
        for a rank that stopped; the error is ``quiet`` on ranks other than 0, which print nothing."""
        problems = [problem]
        if self.ddp:
            problems = [None] * self.world
            dist.all_gather_object(problems, problem)
        first = next((p for p in problems if p is not None), None)
        if first is not None:
            err = TrainingError(first)
            err.quiet = self.rank != 0
            raise err

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _batch(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of the global batch (drawn identically on every rank)."""
        global_b = self.cfg.train.batch_size
        rows = self.data.rows(generator, global_b)
        local = global_b // self.world
        x, y = self.data.xy(rows[self.rank * local: (self.rank + 1) * local])
        return x.to(self.device), y.to(self.device)

    def _log(self, row: dict) -> None:
        if self.rank == 0:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            if self.tb is not None:
                for k, v in row.items():
                    if isinstance(v, (int, float)) and k not in ("iter",):
                        self.tb.add_scalar(f"{row.get('split', 'train')}/{k}", v, row["iter"])

    def _save(self, it: int, rng: dict, extra: dict) -> Path | None:
        if self.rank != 0:
            return None
        state = {"config": self.cfg.to_dict(), "tokenizer": self.tokenizer.to_json(), "world_size": self.world,
                 "metrics": dict(extra, initial_val_loss=self.initial_val_loss, parts=self._parts(it))}
        return ckpt.save_checkpoint(self.out, it, self.raw_model, self.optimizer, rng, state,
                                    keep=self.cfg.train.keep_checkpoints, tokenizer=self.tokenizer.tok)

    # ------------------------------------------------------------------ main loop
    def train(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        torch.manual_seed(t.seed)
        self.data = TaskExamples(cfg) if cfg.data.is_task else TextData(cfg, self._saved_tokenizer())
        self.tokenizer = self.data.tokenizer
        if cfg.model.vocab_size is not None and cfg.model.vocab_size < self.tokenizer.vocab_size:
            raise TrainingError(f"model.vocab_size {cfg.model.vocab_size} is smaller than the data's vocabulary "
                                f"({self.tokenizer.vocab_size} tokens); remove model.vocab_size or set it to at least "
                                f"{self.tokenizer.vocab_size}")
        self.raw_model = build_model(cfg, self.tokenizer.vocab_size).to(self.device)
        self.optimizer = torch.optim.AdamW(
            optimizer_groups(self.raw_model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2), fused=self.device.type == "cuda")
        self.run_folder = RunFolder(self.out)
        problem = None
        try:
            if self.rank == 0:
                problem = self.run_folder.refusal(self.resume, self.overwrite)  # before anything is written
                try:
                    if problem is None:
                        self.run_folder.prepare()
                        self.run_folder.acquire()
                except TrainingError as err:
                    problem = str(err)
            self._agree(problem)
            return self._train()
        finally:
            self.run_folder.release()

    def _start(self, batch_gen: torch.Generator) -> tuple[int, float]:
        """Clear an earlier run on ``--overwrite`` (the refusals came in :meth:`train`); restore a
        checkpoint on ``--resume``; return ``(start_iter, best)``."""
        cfg, start_iter, best = self.cfg, 0, float("inf")
        self.initial_val_loss, self.earlier_parts = None, []
        if self.overwrite and self.rank == 0:  # an earlier run without --overwrite was refused in train()
            self.run_folder.clear()
        if self.rank == 0:
            ckpt.remove_temporaries(self.out)
        if not self.resume:
            return start_iter, best
        folder, problems = None, []
        for candidate in ckpt.step_folders(self.out):
            why = usable_checkpoint(candidate)
            if why is None:
                folder = candidate
                break
            problems.append(why)
        if folder is None:
            raise TrainingError(f"--resume: no intact checkpoint in {self.out} ({problems[0]}); start again "
                                "with --overwrite")
        if problems and self.rank == 0:
            print(f"phaselm: {'; '.join(problems)}; resuming from the newest intact checkpoint, {folder.name}",
                  file=sys.stderr)
        state, rng = ckpt.load_training_state(folder, self.optimizer)
        saved = from_dict(state["config"]).to_dict()  # a checkpoint from before a field existed has its default
        if saved["model"] != cfg.to_dict()["model"] or saved["data"] != cfg.to_dict()["data"]:
            raise TrainingError(f"--resume: the model/data config differs from the checkpoint in {folder}")
        ckpt.load_weights(folder, self.raw_model)
        torch.set_rng_state(rng["torch"])
        batch_gen.set_state(rng["batch"])
        self.initial_val_loss = state["metrics"].get("initial_val_loss")
        unknown = [{"steps": [0, state["step"]], "seconds": None}] if state["step"] else []  # saved before parts were
        self.earlier_parts = state["metrics"].get("parts", unknown)
        return state["step"], state["metrics"].get("best_val_loss", best)

    def _parts(self, it: int) -> list[dict]:
        """The run's parts up to iteration ``it``: one per start or resume, ``{"steps": [first, last],
        "seconds", "machine", "device"}`` (seconds: the training loop's wall time; None for a part
        saved before parts were recorded), so a run trained in pieces, on other machines or numbers of
        processes, says so; parts of no steps are left out."""
        first, t0 = self.part_start
        part = {"steps": [first, it], "seconds": round(time.perf_counter() - t0, 1), "machine": machine_name(),
                "device": device_name()}
        return self.earlier_parts + ([part] if it > first else [])

    def _train(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        batch_gen = torch.Generator().manual_seed(t.seed)
        start_iter, best = self._start(batch_gen)
        self.part_start = (start_iter, time.perf_counter())
        if self.rank == 0:
            self._truncate_metrics(start_iter)
        self.tb = None
        if t.tensorboard and self.rank == 0:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise TrainingError("train.tensorboard is true but the 'tensorboard' package is not installed; "
                                    "pip install tensorboard, or set train.tensorboard=false") from None

            self.tb = SummaryWriter(str(self.out / "tensorboard"))
        model = torch.compile(self.raw_model) if t.compile else self.raw_model
        if self.ddp:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        scaler = torch.amp.GradScaler(enabled=self.autocast_dtype == torch.float16)
        tokens_per_iter = t.batch_size * t.grad_accum * self.data.tokens_per_example
        # MFU on a known GPU: model FLOP/s of the global batch / (ranks · peak)
        flops_per_iter = flops_per_token(self.raw_model, cfg.model.block_size) * tokens_per_iter
        peak = peak_flops(self.device)
        bar = tqdm(total=t.max_iters, initial=start_iter, desc="train", unit="it",
                   disable=not self.progress or self.rank != 0)
        it, last_val = start_iter, None
        summary = {"start_iter": start_iter}
        rng = {"torch": torch.get_rng_state(), "batch": batch_gen.get_state()}
        on_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _raise_terminated) if on_main else None
        try:
            while True:
                rng = {"torch": torch.get_rng_state(), "batch": batch_gen.get_state()}
                at_eval = it % t.eval_interval == 0 or it == t.max_iters
                if at_eval and not (self.resume and it == start_iter):
                    last_val = self.data.evaluate(self.raw_model, self.device, self.autocast, t.eval_max_tokens)
                    best = min(best, last_val["loss"])
                    if self.initial_val_loss is None:
                        self.initial_val_loss = last_val["loss"]
                    self._log({"iter": it, "split": "val", **last_val, "best_loss": best})
                    acc = f" acc {last_val['accuracy']:.3f}" if "accuracy" in last_val else ""
                    bar.set_postfix_str(f"val {last_val['loss']:.3f} ppl {last_val['ppl']:.2f}{acc}")
                ckpt_due = t.checkpoint_interval is None and at_eval or (
                    t.checkpoint_interval is not None and it % t.checkpoint_interval == 0) or it == t.max_iters
                if ckpt_due and it > start_iter:
                    self._save(it, rng, {"best_val_loss": best, "val": last_val})
                if it >= t.max_iters:
                    break
                t0 = time.perf_counter()
                lr = lr_at(it, t)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                loss_sum, reg_sum = 0.0, 0.0
                for micro in range(t.grad_accum):
                    x, y = self._batch(batch_gen)
                    sync = self.ddp and micro < t.grad_accum - 1
                    with (model.no_sync() if sync else nullcontext()), self.autocast():
                        loss = model(x, y, head_at_targets=self.data.head_at_targets).loss
                        reg = self.raw_model.coherence_loss()
                    if self.ddp:  # DDP averages the ranks' gradients: weight each by its share of the targets
                        loss = loss * self._target_share(y)
                    total = loss if reg is None else loss + reg
                    scaler.scale(total / t.grad_accum).backward()
                    loss_sum += loss.item() / t.grad_accum
                    reg_sum += 0.0 if reg is None else reg.item() / t.grad_accum
                if self.ddp:  # the logged loss is the global-batch mean on every rank
                    lt = torch.tensor([loss_sum], device=self.device)
                    dist.all_reduce(lt)
                    loss_sum = lt.item() / self.world
                if not math.isfinite(loss_sum):
                    raise TrainingError(self._stop_message(f"non-finite training loss ({loss_sum}) at iteration {it}"))
                scaler.unscale_(self.optimizer)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(
                    self.raw_model.parameters(), t.grad_clip if t.grad_clip > 0 else float("inf")))
                if not math.isfinite(grad_norm) or grad_norm > t.max_grad_norm:
                    raise TrainingError(self._stop_message(f"exploding gradient (norm {grad_norm:.3g} > "
                                                           f"train.max_grad_norm {t.max_grad_norm:g}) at iteration {it}"))
                scaler.step(self.optimizer)
                scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                it += 1
                bar.update(1)
                dt = time.perf_counter() - t0
                if it % t.log_interval == 0 or it == t.max_iters:
                    row = {"iter": it, "split": "train", "loss": loss_sum, "ppl": math.exp(min(loss_sum, 50)),
                           "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_iter / dt}
                    if self.device.type == "cuda":
                        row["model_tflops"] = flops_per_iter / dt / 1e12
                        if peak:
                            row["mfu"] = flops_per_iter / dt / (self.world * peak)
                    if getattr(cfg.model, "coherence_reg", 0) > 0:
                        row["coherence_reg"] = reg_sum
                    row.update(self.raw_model.layer_metrics())
                    self._log(row)
                    mfu = f" MFU {row['mfu']:.1%}" if "mfu" in row else ""
                    bar.set_postfix_str(f"loss {loss_sum:.3f} ppl {row['ppl']:.2f} {row['tokens_per_s']:.0f} tok/s{mfu}")
        except KeyboardInterrupt as stop:
            # rng holds the states at the start of iteration `it`, which has not been applied
            if on_main:  # a second SIGTERM must not cut the save short
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            path = self._save(it, rng, {"best_val_loss": best, "val": last_val, "interrupted": True})
            bar.close()
            how = "terminated (SIGTERM)" if isinstance(stop, _Terminated) else "interrupted"
            err = TrainingError(f"{how} at iteration {it}; saved {path}; continue with --resume")
            err.quiet = self.rank != 0  # rank 0 saved and says where
            raise err from None
        finally:
            if on_main:
                signal.signal(signal.SIGTERM, previous)
            bar.close()
            if self.tb is not None:
                self.tb.close()
        summary.update({"iters": it, "best_val_loss": best, "final_val": last_val, "parts": self._parts(it)})
        return summary

    def _target_share(self, y: torch.Tensor) -> torch.Tensor:
        """n_r·W / Σ n: this rank's share of the global micro-batch's targets (``y >= 0``), times the
        world size W, so the ranks' mean loss times it, averaged by DDP, is the mean over every target
        of the global batch, as in one process (1 exactly where every rank has as many targets: text,
        MQAR, selective copying; fuzzy and noisy recall have a varying number per example)."""
        n = (y >= 0).sum().to(torch.float32)
        total = n.clone()
        dist.all_reduce(total)
        return n * self.world / total.clamp_min(1)

    def _stop_message(self, what: str) -> str:
        """The stop message; it names the newest checkpoint that is intact, finite and not diverged."""
        fix = "lower train.lr or raise train.warmup_iters"
        for folder in ckpt.step_folders(self.out):
            if usable_checkpoint(folder) is None:
                return f"{what}; stopped, the last good checkpoint is {folder}. To continue from it, {fix}, then --resume"
        return (f"{what}; stopped, and no good checkpoint (finite, not diverged) was written. {fix}, then start "
                "again with --overwrite")

    def _truncate_metrics(self, start_iter: int) -> None:
        """Drop metric rows after the resumed iteration (and a line torn by a kill), so the JSONL
        matches an uninterrupted run: a restart never duplicates rows."""
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return
        rows = [r for r in path.read_text().splitlines() if (row := json_row(r)) and row.get("iter", 0) <= start_iter]
        atomic_write(path, "".join(r + "\n" for r in rows))


def _raise_terminated(signum, frame):
    raise _Terminated()


def evaluate_split(path: str | Path, split: str = "test", device: str = "cpu", max_tokens: int | None = None) -> dict:
    """Loss (nats/token), perplexity and token count of a trained run's latest checkpoint on a
    split of its own dataset (the whole split by default), plus the checkpoint ``step``; for a
    synthetic task, :func:`evaluate_answers` on its ``train``/``val``/``test`` examples."""
    model, tok, cfg, state = load_for_inference(path, device)
    if cfg.data.is_task:
        return {**TaskExamples(cfg).evaluate(model, torch.device(device), nullcontext, split=split),
                "step": state["step"], "tokens": None}
    tokens = tokenized(load_splits(cfg.data.name, cfg.data.path)[split], tok)
    return {**evaluate(model, tokens, cfg.model.block_size, torch.device(device), max_tokens), "step": state["step"]}


def load_for_inference(path: str | Path, device: str = "cpu"):
    """``(model, tokenizer, cfg, state)`` from a run folder or checkpoint folder."""
    ckpt.verify_folder(path)  # a run folder's published model files against their checkpoint's manifest
    folder = ckpt.latest_checkpoint(path)
    if folder is None:
        raise ValueError(f"no checkpoint found at {path} (expected a run folder or a checkpoints/step-* folder)")
    state = ckpt.read_state(folder)  # verifies every file's SHA-256
    cfg = from_dict(state["config"]).validate()
    if not (folder / "config.json").is_file():  # written before checkpoints were save_pretrained folders
        tok = TextTokenizer.from_json(state["tokenizer"])
        model = build_model(cfg, tok.vocab_size)
        ckpt.load_weights(folder, model)
        return model.to(device).eval(), tok, cfg, state
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a one-line error stays one line; loading a small model is instant
    try:
        model = AutoModelForCausalLM.from_pretrained(folder)
    finally:
        hf_logging.enable_progress_bar()
    return model.to(device).eval(), get_tokenizer(str(folder)), cfg, state
