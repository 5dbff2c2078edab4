"""One trainer for every trainable phaselm model (``phaselm train CONFIG.yaml``).

AdamW with linear warm-up and cosine decay, gradient clipping and accumulation, autocast on GPU,
optional ``torch.compile``; evaluation on the whole val split (non-overlapping windows, capped
by ``train.eval_max_tokens``): loss in nats/token and perplexity = exp(mean NLL over all tokens);
metrics appended to ``out_dir/metrics.jsonl`` (the source of truth); atomic checkpoints
(:mod:`phaselm.training.checkpoint`) with exact resume; a non-finite loss or an exploding
gradient stops the run and keeps the last good checkpoint; Ctrl-C saves before exiting.

Under ``torchrun --nproc_per_node N`` the same command runs DDP (gloo on CPU, NCCL on GPU). The
global batch (``train.batch_size``) is drawn identically on every rank from one seeded generator
and each rank takes its slice, so N processes follow the same data as one; rank 0 logs and
checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from phaselm.data.datasets import CharTokenizer, HFTokenizer, get_tokenizer, load_splits, tokenized
from phaselm import oscillators as osc
from phaselm.attention import PhaseCoupledAttention, PhaseModulatedAttention, phase_gpt
from phaselm.models.gpt import GPT, GPTConfig
from phaselm.models.pma import PhaseModulatedAttentionLM, PMAConfig
from phaselm.training import checkpoint as ckpt
from phaselm.training.config import RunConfig, from_dict


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, exploding gradient, mismatched resume)."""


def tokenizer_from_json(text: str):
    spec = json.loads(text)
    if spec["type"] == "char":
        return CharTokenizer(spec["chars"])
    return get_tokenizer(spec["name"])


def build_model(cfg: RunConfig, vocab_size: int) -> torch.nn.Module:
    m = cfg.model
    fields = {f.name: getattr(m, f.name) for f in dataclasses.fields(GPTConfig)}
    gpt_cfg = GPTConfig(**dict(fields, vocab_size=m.vocab_size or vocab_size))
    if m.type == "gpt":
        return GPT(gpt_cfg)
    if m.type == "pma":
        return PhaseModulatedAttentionLM(pma_config(m, vocab_size))
    return phase_gpt(gpt_cfg, m.phase_layers, n_osc=m.n_osc, coupling_init=m.coupling_init, steps=m.kuramoto_steps,
                     dt=m.kuramoto_dt, method=m.integrator, coherence_init=m.coherence_init,
                     phase_noise=m.phase_noise, freq_jitter=m.freq_jitter)


def pma_config(m, vocab_size: int) -> PMAConfig:
    """The :class:`PMAConfig` of a ``model.type: pma`` section (``n_embd`` is ``d_model``)."""
    names = {f.name for f in dataclasses.fields(PMAConfig)} - {"d_model", "vocab_size"}
    return PMAConfig(d_model=m.n_embd, vocab_size=m.vocab_size or vocab_size, **{k: getattr(m, k) for k in names})


def coherence_loss(model: torch.nn.Module, m) -> torch.Tensor | None:
    """λ · Σ over phase layers of the coherence penalty on their R (with gradients), or None."""
    if m.coherence_reg <= 0:
        return None
    rs = [a.last_r for a in model.modules() if isinstance(a, (PhaseCoupledAttention, PhaseModulatedAttention))]
    return m.coherence_reg * sum(osc.coherence_penalty(r, m.coherence_mode, m.coherence_target, m.coherence_width)
                                 for r in rs)


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
            logits, _ = model(x)
        nll = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1,
                                                reduction="sum")
        total += nll.item()
        count += int((y >= 0).sum())
    model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": math.exp(loss), "tokens": count}


class Trainer:
    """Trains ``cfg`` (a validated :class:`RunConfig`); ``resume=True`` continues from the latest checkpoint."""

    def __init__(self, cfg: RunConfig, resume: bool = False, progress: bool = True):
        self.cfg, self.resume, self.progress = cfg, resume, progress
        t = cfg.train
        self.ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        want_cuda = t.device.startswith("cuda") or (t.device == "auto" and torch.cuda.is_available())
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
    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _batch(self, tokens: np.ndarray, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        block, global_b = self.cfg.model.block_size, self.cfg.train.batch_size
        starts = torch.randint(len(tokens) - block - 1, (global_b,), generator=generator)
        local = global_b // self.world
        mine = starts[self.rank * local: (self.rank + 1) * local].tolist()
        rows = np.stack([np.asarray(tokens[s: s + block + 1], dtype=np.int64) for s in mine])
        xy = torch.from_numpy(rows)
        return xy[:, :-1].to(self.device), xy[:, 1:].to(self.device)

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
        state = {"config": self.cfg.to_dict(), "tokenizer": self.tokenizer.to_json(), "metrics": extra,
                 "world_size": self.world}
        return ckpt.save_checkpoint(self.out, it, self.raw_model, self.optimizer, rng, state,
                                    keep=self.cfg.train.keep_checkpoints)

    # ------------------------------------------------------------------ main loop
    def train(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        torch.manual_seed(t.seed)
        splits = load_splits(cfg.data.name, cfg.data.path)
        self.tokenizer = get_tokenizer(cfg.data.tokenizer, "".join(splits.values()))  # char: all splits
        train_tokens, val_tokens = tokenized(splits["train"], self.tokenizer), tokenized(splits["val"], self.tokenizer)
        if len(train_tokens) <= cfg.model.block_size + 1:
            raise TrainingError(f"the train split has {len(train_tokens)} tokens, too few for model.block_size "
                                f"{cfg.model.block_size}; use a larger dataset or a smaller block")
        self.raw_model = build_model(cfg, self.tokenizer.vocab_size).to(self.device)
        decay = [p for p in self.raw_model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.raw_model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=t.lr, betas=(t.beta1, t.beta2), fused=self.device.type == "cuda")
        batch_gen = torch.Generator().manual_seed(t.seed)
        start_iter, best = 0, float("inf")
        existing = ckpt.latest_checkpoint(self.out)
        if self.resume:
            if existing is None:
                raise TrainingError(f"--resume: no checkpoint in {self.out}; start without --resume")
            state, rng = ckpt.load_training_state(existing, self.optimizer)
            if state["config"]["model"] != cfg.to_dict()["model"] or state["config"]["data"] != cfg.to_dict()["data"]:
                raise TrainingError(f"--resume: the model/data config differs from the checkpoint in {existing}")
            ckpt.load_weights(existing, self.raw_model)
            torch.set_rng_state(rng["torch"])
            batch_gen.set_state(rng["batch"])
            start_iter, best = state["step"], state["metrics"].get("best_val_loss", best)
        elif existing is not None:
            raise TrainingError(f"{self.out} already holds a run; pass --resume to continue it or choose another "
                                "train.out_dir")
        self.out.mkdir(parents=True, exist_ok=True)
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
        tokens_per_iter = t.batch_size * t.grad_accum * cfg.model.block_size
        bar = tqdm(total=t.max_iters, initial=start_iter, desc="train", unit="it",
                   disable=not self.progress or self.rank != 0)
        it, last_val = start_iter, None
        summary = {"start_iter": start_iter}
        rng = {"torch": torch.get_rng_state(), "batch": batch_gen.get_state()}
        try:
            while True:
                rng = {"torch": torch.get_rng_state(), "batch": batch_gen.get_state()}
                at_eval = it % t.eval_interval == 0 or it == t.max_iters
                if at_eval and not (self.resume and it == start_iter):
                    last_val = evaluate(self.raw_model, val_tokens, cfg.model.block_size, self.device,
                                        t.eval_max_tokens, autocast=self.autocast)
                    best = min(best, last_val["loss"])
                    self._log({"iter": it, "split": "val", **last_val, "best_loss": best})
                    bar.set_postfix_str(f"val {last_val['loss']:.3f} ppl {last_val['ppl']:.2f}")
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
                    x, y = self._batch(train_tokens, batch_gen)
                    sync = self.ddp and micro < t.grad_accum - 1
                    with (model.no_sync() if sync else nullcontext()), self.autocast():
                        _, loss = model(x, y)
                        reg = coherence_loss(self.raw_model, cfg.model)
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
                    if cfg.model.coherence_reg > 0:
                        row["coherence_reg"] = reg_sum
                    row.update(self.raw_model.layer_metrics())
                    self._log(row)
                    bar.set_postfix_str(f"loss {loss_sum:.3f} ppl {row['ppl']:.2f} {row['tokens_per_s']:.0f} tok/s")
        except KeyboardInterrupt:
            # rng holds the states at the start of iteration `it`, which has not been applied
            path = self._save(it, rng, {"best_val_loss": best, "val": last_val, "interrupted": True})
            bar.close()
            raise TrainingError(f"interrupted at iteration {it}; saved {path}; continue with --resume") from None
        finally:
            bar.close()
            if self.tb is not None:
                self.tb.close()
        summary.update({"iters": it, "best_val_loss": best, "final_val": last_val})
        return summary

    def _stop_message(self, what: str) -> str:
        last = ckpt.latest_checkpoint(self.out)
        keep = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        return f"{what}; stopped, {keep}. Lower train.lr or raise train.warmup_iters, then --resume"

    def _truncate_metrics(self, start_iter: int) -> None:
        """Drop metric rows after the resumed iteration, so the JSONL matches an uninterrupted run."""
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return
        rows = [r for r in path.read_text().splitlines() if r.strip() and json.loads(r)["iter"] <= start_iter]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(r + "\n" for r in rows))
        os.replace(tmp, path)


def evaluate_split(path: str | Path, split: str = "test", device: str = "cpu", max_tokens: int | None = None) -> dict:
    """Loss (nats/token), perplexity and token count of a trained run's latest checkpoint on a
    split of its own dataset (the whole split by default), plus the checkpoint ``step``."""
    from phaselm.data.datasets import load_splits

    model, tok, cfg, state = load_for_inference(path, device)
    tokens = tokenized(load_splits(cfg.data.name, cfg.data.path)[split], tok)
    return {**evaluate(model, tokens, cfg.model.block_size, torch.device(device), max_tokens), "step": state["step"]}


def load_for_inference(path: str | Path, device: str = "cpu"):
    """``(model, tokenizer, cfg, state)`` from a run folder or checkpoint folder."""
    folder = ckpt.latest_checkpoint(path)
    if folder is None:
        raise ValueError(f"no checkpoint found at {path} (expected a run folder or a checkpoints/step-* folder)")
    state = ckpt.read_state(folder)
    cfg = from_dict(state["config"]).validate()
    tok = tokenizer_from_json(state["tokenizer"])
    model = build_model(cfg, tok.vocab_size)
    ckpt.load_weights(folder, model)
    return model.to(device).eval(), tok, cfg, state
