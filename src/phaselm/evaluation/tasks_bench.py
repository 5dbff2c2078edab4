"""``phaselm bench tasks``: where could phase help? Every model of the suite on a synthetic task
(:mod:`phaselm.data.tasks`), across difficulties, widths and seeds, with a learning-rate sweep first.

Protocol (docs/tasks.md), fixed before the runs:

1. **Sweep.** Each model at every width, at the sweep difficulty (default: the middle one), seed
   1, at every learning rate of ``--lrs``. The rule: the learning rate with the highest *val*
   accuracy (answer tokens; the val set is held out, and is not the test set); ties go to the
   lower val loss, then to the smaller learning rate. (A sweep at one width is not enough: the
   GPT's best rate at width 64, 1e-2, left width 128 on the MQAR plateau at 18%.)
2. **Main runs.** Every (difficulty, model, width) cell at the rate chosen for that model and
   width, seeds 1..``--seeds``. A sweep run is reused as the seed-1 run of its cell.
3. Each run reports its accuracy on the fixed *test* set (>= 2,000 held-out examples, none in the
   training set) with a Wilson interval; :mod:`phaselm.evaluation.tasks_report` pairs runs by seed
   against each model's baseline.

Each run is one ``phaselm train`` run (:class:`phaselm.training.trainer.Trainer`) in its own folder
under ``--work``; its result is ``OUT/runs/<run id>.json`` (with the command, commit, machine and
seed). ``--resume`` skips runs whose JSON exists and continues an interrupted run from its
checkpoint. ``--shard I/N`` runs the I-th of N slices of each phase (one process of a torchrun
launch or of a Slurm job array each); before the main runs a shard waits until every sweep run it
depends on has its JSON (written by whichever shard ran it). The union of the shards' run files is
the unsharded run's, and ``report.md`` and the plots are re-rendered from the run files.
``--nproc-per-node P`` (``processes=P``) instead trains each run on P processes together (DDP: the
global batch split across them, as ``phaselm train --nproc-per-node``), for a run too long for one
core: rank 0 evaluates and writes, and the ranks meet at a barrier around each run.

Models (``MODELS``): ``gpt``; ``phasegpt_all`` (phase coupling in every attention layer) and
``phasegpt_single`` (the published placement: one phase layer, here the last); ``pma`` (Mamba blocks,
then one PMA block); ``pma_lam0`` (λ = 0: the phase modulation off); ``mamba`` (Mamba blocks only);
the oscillator controls ``phasegpt_frozen`` / ``pma_frozen`` (no Kuramoto steps: phases stay at
their initial values θ⁰ = π·tanh(Wx)) and ``phasegpt_nobias`` (coherence bias β fixed at 0), and the
same two for the single placement (``phasegpt_single_frozen``, ``phasegpt_single_nobias``). Mamba
stacks get the number of Mamba blocks whose parameter count is closest to the GPT's at that width
(:func:`model_section`), so counts match within 10% (tested).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from phaselm.utils import atomic_write, provenance, read_jsonl, wants_cuda

# task -> its difficulties: (label, data settings); the default run uses all of them
DIFFICULTIES = {
    "mqar": [("L64-kv4", {"seq_len": 64, "num_kv_pairs": 4}), ("L128-kv8", {"seq_len": 128, "num_kv_pairs": 8}),
             ("L256-kv16", {"seq_len": 256, "num_kv_pairs": 16}), ("L256-kv64", {"seq_len": 256, "num_kv_pairs": 64})],
    "selective_copy": [("L256", {"seq_len": 256}), ("L512", {"seq_len": 512})],
    "fuzzy_recall": [("L128", {"seq_len": 128}), ("L256", {"seq_len": 256})],
    "noisy_recall": [("L128", {"seq_len": 128}), ("L256", {"seq_len": 256})],
}
NUM_TRAIN = {"mqar": 100_000, "selective_copy": 12_800, "fuzzy_recall": 12_800, "noisy_recall": 12_800}
"""Training examples per difficulty: Zoology's 100,000 for MQAR (with MAD's 12,800 a 2-layer GPT memorises
the training set and stalls near 24% held-out accuracy), MAD's 12,800 for its tasks."""
MODELS = ("gpt", "phasegpt_all", "phasegpt_single", "phasegpt_frozen", "phasegpt_nobias", "phasegpt_single_frozen",
          "phasegpt_single_nobias", "pma", "pma_lam0", "pma_frozen", "mamba")
BASELINE = {"phasegpt_all": "gpt", "phasegpt_single": "gpt", "phasegpt_frozen": "phasegpt_all",
            "phasegpt_nobias": "phasegpt_all", "phasegpt_single_frozen": "phasegpt_single",
            "phasegpt_single_nobias": "phasegpt_single", "pma": "pma_lam0", "pma_frozen": "pma", "mamba": "gpt",
            "pma_lam0": "mamba"}
"""What each model is compared with, paired by seed (phase on vs off within a family; controls vs the
model they control)."""
N_LAYER, N_HEAD, N_OSC = 2, 2, 16
SHORT_CONV = 3
"""The GPT family's short causal convolution in front of attention (docs/tasks.md, amendment 4:
Zoology's recall models put one of kernel 3 there; the MQAR runs before it had none)."""
ADDED_MODEL_FIELDS = {"short_conv": 0, "initializer_range": 0.02}
"""Model config fields added after runs were committed, with the value those runs had (the MQAR runs
of results/tasks/mqar predate both)."""
INFERENCE_FIELDS = {"use_cache"}
"""Model config fields that change neither the weights nor the training (not compared)."""
MIX = "mix"
"""The difficulty label of a run trained on the mixture of the selected difficulties (``--mixture``)."""


@dataclass
class TasksConfig:
    task: str = "mqar"
    models: list[str] = field(default_factory=lambda: list(MODELS))
    widths: list[int] = field(default_factory=lambda: [32, 64, 128])
    seeds: int = 3
    difficulties: list[str] | None = None  # labels of DIFFICULTIES[task]; None: all
    lrs: list[float] = field(default_factory=lambda: [1e-3, 3e-3, 1e-2])
    sweep_difficulty: str | None = None  # None: the middle one of the selected difficulties
    steps: int = 2000
    batch_size: int = 64
    num_train: int | None = None  # None: NUM_TRAIN[task]
    num_test: int = 2_000
    eval_interval: int = 500
    vocab_size: int | None = None  # None: the task's default (MQAR 8192)
    mixture: bool = False  # one run per (model, width, seed) on the mixture of the difficulties, tested on each
    device: str = "cpu"  # train.device of every run (cpu | cuda | cuda:N | auto); recorded in each run's JSON
    short_conv: int = SHORT_CONV  # kernel of the GPT family's convolution in front of attention (0: none)

    def validate(self) -> "TasksConfig":
        if self.task not in DIFFICULTIES:
            raise ValueError(f"--task must be one of {', '.join(DIFFICULTIES)}, got {self.task!r}")
        if bad := [m for m in self.models if m not in MODELS]:
            raise ValueError(f"--models: unknown model {bad[0]!r} (known: {', '.join(MODELS)})")
        if not self.models:
            raise ValueError("--models is empty; name at least one model")
        known = [label for label, _ in DIFFICULTIES[self.task]]
        if self.difficulties is not None and (bad := [d for d in self.difficulties if d not in known]):
            raise ValueError(f"--difficulties: {bad[0]!r} is not a difficulty of {self.task} (known: {', '.join(known)})")
        if self.short_conv < 0:
            raise ValueError(f"--short-conv must be >= 0 (a kernel size; 0: none), got {self.short_conv}")
        if self.mixture and self.difficulties is not None and len(self.difficulties) < 2:
            raise ValueError("--mixture trains on a mixture of at least two difficulties; list more --difficulties, "
                             "or drop --mixture")
        if self.mixture and self.sweep_difficulty is not None:
            raise ValueError("--sweep-difficulty does not apply to --mixture (the sweep trains on the mixture too)")
        if self.sweep_difficulty is not None and self.sweep_difficulty not in self.difficulty_labels():
            raise ValueError(f"--sweep-difficulty {self.sweep_difficulty!r} is not among the difficulties run "
                             f"({', '.join(self.difficulty_labels())})")
        if not self.widths or min(self.widths) < N_HEAD * 4 or any(w % N_HEAD for w in self.widths):
            raise ValueError(f"--widths must be multiples of {N_HEAD} and >= {N_HEAD * 4}, got {self.widths}")
        if not self.lrs or not all(0 < lr < math.inf for lr in self.lrs):
            raise ValueError(f"--lrs must be finite positive learning rates, got {self.lrs}")
        if not (self.device in ("cpu", "cuda", "auto") or re.fullmatch(r"cuda:\d+", self.device)):
            raise ValueError(f"--device must be cpu, cuda, cuda:N or auto, got {self.device!r}")
        if self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ValueError(f"--device {self.device}: no GPU is available here; use --device cpu")
        if self.num_train is None:
            self.num_train = NUM_TRAIN[self.task]
        for key in ("seeds", "steps", "batch_size", "num_train", "num_test", "eval_interval"):
            if getattr(self, key) < 1:
                raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(self, key)}")
        for label in self.difficulty_labels():  # every task setting is valid before anything runs
            self.data_section(label)
        self.check_memory()
        return self

    def check_memory(self) -> None:
        """A one-line error, before anything runs, where a run's task data (int64 inputs and targets,
        ``[n, L]`` each, of the training set and the val and test sets of ``num_test``; a mixture
        holds all its components) or the widest model's embedding and LM head (V × width each, with
        gradients and AdamW's two moments: 16 bytes a weight) would not fit this machine's memory."""
        def data_bytes(label: str) -> int:
            section = self.data_section(label)
            parts = section.get("mixture") or [section]
            return sum(16 * self.task_of(d).seq_len * (part["num_train"] + 2 * self.num_test)
                       for d, part in zip(self.difficulty_labels() if label == MIX else [label], parts))
        data = max(data_bytes(label) for label in self.train_labels())
        vocab = max(self.task_of(label).vocab_size for label in self.difficulty_labels())
        weights = 2 * 16 * vocab * max(self.widths)
        try:
            total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):  # no sysconf (Windows): nothing to check against
            return
        for what, need, fix in (("the task data", data, "--num-train/--num-test"),
                                ("the embedding and LM head", weights, "--vocab-size/--widths")):
            if need > total:
                raise ValueError(f"{what} alone would take {need / 2**30:.1f} GiB, more than this machine's "
                                 f"{total / 2**30:.1f} GiB of memory; use a smaller {fix}")

    def difficulty_labels(self) -> list[str]:
        known = [label for label, _ in DIFFICULTIES[self.task]]
        return known if self.difficulties is None else [d for d in known if d in self.difficulties]

    def sweep_label(self) -> str:
        if self.mixture:
            return MIX
        labels = self.difficulty_labels()
        return self.sweep_difficulty or labels[(len(labels) - 1) // 2]

    def train_labels(self) -> list[str]:
        """The difficulties main runs train at (``[MIX]`` with ``--mixture``)."""
        return [MIX] if self.mixture else self.difficulty_labels()

    def settings(self, label: str) -> dict:
        """The task settings of difficulty ``label`` (with ``vocab_size`` when given)."""
        settings = dict(DIFFICULTIES[self.task])[label]
        return settings if self.vocab_size is None else {**settings, "vocab_size": self.vocab_size}

    def task_of(self, label: str):
        """The task at difficulty ``label`` (a one-line ValueError for impossible settings)."""
        from phaselm.data.tasks import make_task

        return make_task(self.task, **self.settings(label))

    def data_section(self, label: str) -> dict:
        """The ``data:`` section of a run at difficulty ``label`` (checked). For :data:`MIX`, Zoology's
        mixture: the first (easiest) difficulty with ``num_train`` examples, each other one with a
        fifth of that (Zoology: 100,000 at L 64, 20,000 at each longer setting)."""
        if label == MIX:
            labels = self.difficulty_labels()
            for other in labels:
                self.task_of(other)
            parts = [{**self.settings(d), "num_train": self.num_train if i == 0 else max(1, self.num_train // 5)}
                     for i, d in enumerate(labels)]
            return {"name": self.task, "mixture": parts, "num_train": self.num_train, "num_test": self.num_test,
                    "data_seed": 0}
        self.task_of(label)
        return {"name": self.task, **self.settings(label), "num_train": self.num_train, "num_test": self.num_test,
                "data_seed": 0}


def _gpt_section(model: str, width: int, block: int, short_conv: int = 0) -> dict:
    base = {"block_size": block, "n_layer": N_LAYER, "n_head": N_HEAD, "n_embd": width, "short_conv": short_conv}
    if model == "gpt":
        return {"type": "gpt", **base}
    phase = {"type": "phasegpt", **base, "n_osc": N_OSC,
             "phase_layers": [N_LAYER - 1] if model.startswith("phasegpt_single") else list(range(N_LAYER))}
    if model.endswith("_frozen"):
        phase["kuramoto_steps"] = 0
    if model.endswith("_nobias"):
        phase.update(coherence_init=0.0, coherence_trainable=False)
    return phase


def _pma_section(model: str, width: int, block: int, n_ssm: int, expand: int = 2) -> dict:
    attn = 0 if model == "mamba" else 1
    section = {"type": "pma", "block_size": block, "n_embd": width, "n_head": N_HEAD, "n_layer": n_ssm + attn,
               "n_ssm": n_ssm, "d_state": 16, "expand": expand, "scan": "parallel"}
    if model == "pma_lam0":
        section.update(lam_init=0.0, lam_trainable=False)
    if model == "pma_frozen":
        section["kuramoto_steps"] = 0
    return section


def count_params(section: dict, vocab_size: int) -> int:
    """Parameters of the model of ``section``, position tables left out (:func:`matched_params`)."""
    from phaselm.models import MODELS as ARCH, config_from_dict

    return matched_params(ARCH[section["type"]][1](config_from_dict(section, vocab_size)))


def matched_params(model) -> int:
    """The count the suite matches across models: every parameter (tied embeddings once) but the
    GPT family's learned position table, a lookup that Mamba stacks have no counterpart of (the
    nanoGPT convention)."""
    wpe = getattr(model, "wpe", None)
    return sum(p.numel() for p in model.parameters()) - (wpe.weight.numel() if wpe is not None else 0)


def model_section(model: str, width: int, block: int, vocab_size: int, short_conv: int = 0) -> dict:
    """The ``model:`` section of ``model`` at ``width`` (``block`` = the task's length). GPT-family
    models have N_LAYER blocks of N_HEAD heads (and a causal convolution of kernel ``short_conv`` in
    front of each attention). Mamba stacks (``pma*``, ``mamba``; d_state 16) take the number of
    Mamba blocks (1..8) whose parameter count (:func:`matched_params`) is closest to the GPT's
    without the convolution (its (k + 1)·width weights a block change no choice) with Mamba's
    usual expansion 2; only where no depth comes within 10% another expansion (1..4) is allowed,
    the closest count winning."""
    if not model.startswith(("pma", "mamba")):
        return _gpt_section(model, width, block, short_conv)
    target = count_params(_gpt_section("gpt", width, block), vocab_size)

    def rank(option):
        off = abs(count_params(option, vocab_size) / target - 1)
        return off > 0.10, option["expand"] != 2, off

    options = [_pma_section(model, width, block, n, e) for e in (2, 1, 3, 4) for n in range(1, 9)]
    return min(options, key=rank)


@dataclass(frozen=True)
class Run:
    difficulty: str
    model: str
    width: int
    seed: int
    lr: float | None  # None: the model's swept learning rate (known after the sweep)
    sweep: bool = False

    @property
    def run_id(self) -> str:
        lr = "" if self.lr is None else f"_lr{self.lr:g}"
        return f"{self.difficulty}/{self.model}/w{self.width}/seed{self.seed}{lr if self.sweep else ''}"

    def file_name(self) -> str:
        return self.run_id.replace("/", "__") + ".json"


def split_record(record: dict) -> list[dict]:
    """One result per difficulty of a mixture run's result ``record`` (``test_by_difficulty``): the
    same model and seed, with that difficulty's test set as ``test``; none for a record without it."""
    return [{**record, "run": Run(label, record["model"], record["width"], record["seed"], None).run_id,
             "difficulty": label, "test": test, "trained_on": record["run"], "test_by_difficulty": None}
            for label, test in (record.get("test_by_difficulty") or {}).items()]


def val_curve(folder: Path) -> list[list[float]]:
    """``[[step, val accuracy], ...]`` of the run trained in ``folder`` (its metrics.jsonl, which a
    resumed run truncates to match an uninterrupted one): when a seed left a plateau, if it did."""
    rows = read_jsonl(folder / "metrics.jsonl")
    return [[r["iter"], r["accuracy"]] for r in rows if r.get("split") == "val" and "accuracy" in r]


def train_seconds(summary: dict, seconds: float) -> float:
    """A run's training time: its parts' seconds summed (each start or resume is a part,
    :meth:`Trainer._parts`; a part saved before parts were recorded counts 0), else ``seconds`` (this
    process's, when training stopped without a summary of parts: a diverged run)."""
    parts = summary.get("parts")
    return round(sum(p["seconds"] or 0.0 for p in parts) if parts else seconds, 1)


def sweep_runs(cfg: TasksConfig) -> list[Run]:
    return [Run(cfg.sweep_label(), m, w, 1, lr, sweep=True) for m in cfg.models for w in cfg.widths for lr in cfg.lrs]


def main_runs(cfg: TasksConfig) -> list[Run]:
    return [Run(d, m, w, s, None) for d in cfg.train_labels() for m in cfg.models for w in cfg.widths
            for s in range(1, cfg.seeds + 1)]


def _rates(lrs) -> str:
    return ",".join(f"{lr:g}" for lr in lrs)


def choose_lr(results: list[dict]) -> float:
    """The sweep rule: highest val accuracy, then lower val loss, then smaller learning rate."""
    best = min(results, key=lambda r: (-r["val"]["accuracy"], r["val"]["loss"], r["lr"]))
    return best["lr"]


def _same_model(saved: dict, mine: dict) -> bool:
    """Whether a run's recorded ``model`` section is ``mine`` (a field the run predates counts as
    the value runs had before it existed, :data:`ADDED_MODEL_FIELDS`; :data:`INFERENCE_FIELDS` are not
    compared)."""
    return set(saved) <= set(mine) and all(saved.get(k, ADDED_MODEL_FIELDS.get(k)) == v for k, v in mine.items()
                                           if k not in INFERENCE_FIELDS)


def _same_training(folder: Path, cfg) -> bool:
    """Whether the newest checkpoint in ``folder`` was trained with ``cfg``'s training settings and
    model (a checkpoint of another learning rate, say, is not continued: :meth:`TasksBench.train`
    refuses it). A damaged checkpoint counts as the same: the trainer's ``--resume`` falls back past it."""
    from phaselm.training import checkpoint as ckpt

    try:
        saved, mine = ckpt.read_state(ckpt.step_folders(folder)[0])["config"], cfg.to_dict()
        return saved["train"] == mine["train"] and _same_model(saved["model"], mine["model"])
    except (ckpt.CheckpointError, OSError, KeyError, ValueError):
        return True


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"I/N"`` → ``(I, N)``; None: this process's torchrun rank and world size, else ``(0, 1)``."""
    if text is None:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like I/N (e.g. 0/4), got {text!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard I/N needs 0 <= I < N, got {text!r}")
    return i, n


RUN_KEYS = ("run", "task", "difficulty", "model", "width", "seed", "lr", "sweep", "protocol", "val", "test")
"""Keys every run file of :class:`TasksBench` holds (what the report and ``--resume`` read)."""


def read_run(path: Path) -> dict:
    """A run file of ``OUT/runs``, checked: a one-line ValueError naming the file if it is not valid
    JSON (a truncated copy) or not a run result (another file put into ``runs/``)."""
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}; truncated?); "
                         "restore it from git or delete it, then run again") from None
    missing = [k for k in RUN_KEYS if k not in record] if isinstance(record, dict) else ["run"]
    if missing:
        raise ValueError(f"{path} is not a run result of phaselm bench tasks (no {missing[0]!r}); move it out of "
                         f"{path.parent}")
    return record


def protocol_of(record: dict) -> dict:
    """A run file's protocol; runs made before mixtures existed lack ``training``: per difficulty."""
    return {"training": "per difficulty", **record["protocol"]}


class SweepPending(RuntimeError):
    """This shard's main runs need the chosen learning rates, and other shards' sweep runs are unfinished."""


class TasksBench:
    """Runs the grid of :class:`TasksConfig` into ``out`` (see the module docstring). ``wait=False``:
    where this shard's main runs need sweep runs that other shards have not finished, raise
    :class:`SweepPending` (before training any main run) instead of waiting for them."""

    def __init__(self, cfg: TasksConfig, out: str | Path, work: str | Path, command: str,
                 shard: tuple[int, int] = (0, 1), resume: bool = False, progress: bool = True,
                 poll_seconds: float = 2.0, wait: bool = True, processes: int = 1):
        self.cfg, self.out, self.work, self.command = cfg.validate(), Path(out), Path(work), command
        self.shard, self.resume, self.progress, self.poll, self.wait = shard, resume, progress, poll_seconds, wait
        self.processes, self.rank = processes, 0  # rank: this process's, once run() has joined the group
        self.runs_dir = self.out / "runs"

    def _join(self) -> None:
        """With ``processes`` > 1 (under torchrun): join its process group, as the trainer would (gloo
        for CPU runs, NCCL for CUDA ones), so the ranks can meet at :meth:`_sync` before any training."""
        if self.processes == 1:
            return
        import torch
        import torch.distributed as dist

        world = int(os.environ.get("WORLD_SIZE", 1))
        if world != self.processes:
            raise ValueError(f"--nproc-per-node {self.processes} under a launch of {world} processes; leave torchrun "
                             "out (--nproc-per-node launches it) or give it the same --nproc_per_node")
        if not dist.is_initialized():
            cuda = wants_cuda(self.cfg.device)
            if cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group("nccl" if cuda else "gloo")
        self.rank = dist.get_rank()

    def _sync(self) -> None:
        """Every rank waits here for the others (one process: nothing to wait for)."""
        if self.processes > 1:
            import torch.distributed as dist

            dist.barrier()

    def _agreed(self, value):
        """Rank 0's ``value`` on every rank (what it saw of files other shards may be writing)."""
        if self.processes == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def result_path(self, run: Run) -> Path:
        return self.runs_dir / run.file_name()

    def check_start(self) -> None:
        """Refuse to mix with an earlier run's files unless ``--resume``; refuse a changed protocol. A
        shard of a sharded launch cannot tell its sibling shards' fresh results from an earlier run's,
        so it always continues what is there (the protocol must still match). The list of swept
        rates may grow (``--lrs`` must include the earlier runs' rates): each run records its own
        rate, and a main run trained at a rate the larger sweep does not choose is refused
        (:meth:`train`), so a sweep can gain a rate without retraining what it already has."""
        for flag, folder in (("--out", self.runs_dir), ("--work", self.work)):
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise ValueError(f"{flag} {folder}: cannot create it ({err.strerror}); choose a writable folder "
                                 f"for {flag}") from None
        existing = sorted(self.runs_dir.glob("*.json"))
        if existing and not self.resume and self.shard[1] == 1:
            raise ValueError(f"{self.runs_dir} holds {len(existing)} run results of an earlier run; pass --resume to "
                             "continue it, or choose another --out")
        mine, swept = self.protocol(), set()
        for path in existing:
            saved = protocol_of(read_run(path))
            key = next((k for k in mine if k != "lrs" and saved.get(k) != mine[k]), None)
            if key is not None:
                raise ValueError(f"{path} was made with {key}={saved.get(key)!r}, this run has "
                                 f"{mine[key]!r}; use the same settings or another --out")
            swept |= set(saved["lrs"])
        dropped = sorted(swept - set(mine["lrs"]))
        if dropped:
            raise ValueError(f"{self.runs_dir} holds a sweep over --lrs {_rates(sorted(swept))}; --lrs must "
                             f"include {_rates(dropped)} (a sweep can gain rates, not lose them), or choose another --out")

    def protocol(self) -> dict:
        """What every run of this grid shares (a resumed run must match it)."""
        c = self.cfg
        return {"task": c.task, "steps": c.steps, "batch_size": c.batch_size, "num_train": c.num_train,
                "num_test": c.num_test, "lrs": list(c.lrs), "sweep": "per model and width",
                "sweep_difficulty": c.sweep_label(), "eval_interval": c.eval_interval, "vocab_size": c.vocab_size,
                "training": f"mixture of {', '.join(c.difficulty_labels())}" if c.mixture else "per difficulty"}

    def mine(self, runs: list[Run]) -> list[Run]:
        i, n = self.shard
        return runs[i::n]

    def unfinished(self) -> list[Run]:
        """This shard's runs that have no result file yet."""
        return [r for r in self.mine(sweep_runs(self.cfg)) + self.mine(main_runs(self.cfg))
                if not self.result_path(r).exists()]

    def run(self) -> list[Path]:
        self._join()
        self.check_start()
        for run in self.mine(sweep_runs(self.cfg)):
            self.train(run)
        mine = self.mine(main_runs(self.cfg))
        chosen = self.chosen_lrs(wait=self.wait) if mine else {}  # a shard with no main runs need not wait
        done = []
        for run in mine:
            done.append(self.train(run, chosen[run.model, run.width]))
            if run.difficulty == MIX:
                done += self.split_mixture(run)
        self._sync()
        return done

    def split_mixture(self, run: Run) -> list[Path]:
        """Writes :func:`split_record` of a mixture run, a file per difficulty."""
        paths = []
        for record in split_record(read_run(self.result_path(run))):
            path = self.result_path(Run(record["difficulty"], run.model, run.width, run.seed, None))
            if not path.exists() and self.rank == 0:
                atomic_write(path, json.dumps(record, indent=1) + "\n")
            paths.append(path)
        return paths

    def chosen_lrs(self, wait: bool = False) -> dict[tuple[str, int], float]:
        """The swept learning rate of each (model, width): waits for other shards' sweep runs when
        ``wait``, else raises :class:`SweepPending` while any is missing."""
        runs, waiting_for = sweep_runs(self.cfg), None
        while True:
            missing = self._agreed([r for r in runs if not self.result_path(r).exists()])
            if not missing:
                break
            if not wait:
                raise SweepPending(f"the sweep is incomplete ({len(missing)} runs missing, e.g. {missing[0].run_id}); "
                                   "run this shard again once the other shards have finished their sweep runs")
            if len(missing) != waiting_for and self.rank == 0:
                waiting_for = len(missing)
                print(f"phaselm bench tasks: waiting for {waiting_for} sweep runs of other shards (e.g. "
                      f"{missing[0].run_id}); start those shards, or pass --no-wait", file=sys.stderr)
            time.sleep(self.poll)
        cells: dict[tuple[str, int], list[dict]] = {}
        for r in runs:
            cells.setdefault((r.model, r.width), []).append(read_run(self.result_path(r)))
        return {cell: choose_lr(rs) for cell, rs in cells.items()}

    def run_config(self, run: Run, lr: float):
        from phaselm.training.config import from_dict

        c = self.cfg
        data = c.data_section(run.difficulty)
        vocab = c.task_of(c.difficulty_labels()[0] if run.difficulty == MIX else run.difficulty).vocab_size
        block = max(part["seq_len"] for part in data.get("mixture") or [data])
        return from_dict({
            "data": data,
            "model": {**model_section(run.model, run.width, block, vocab, c.short_conv), "vocab_size": vocab},
            "train": {"out_dir": str(self.work / run.run_id.replace("/", "__")), "max_iters": c.steps,
                      "batch_size": c.batch_size, "lr": lr, "min_lr": lr / 10, "warmup_iters": min(100, c.steps // 10),
                      "weight_decay": 0.1, "beta2": 0.99, "eval_interval": c.eval_interval,
                      "log_interval": max(1, c.eval_interval // 5), "seed": run.seed, "device": c.device,
                      "keep_checkpoints": 1},
        }).validate()

    def train(self, run: Run, lr: float | None = None) -> Path:
        """Train ``run`` (or, in the main phase, reuse the identical sweep run) and write its JSON."""
        self._sync()  # every rank sees the files rank 0 wrote, and none is written while they look
        path = self._train(run, lr)
        self._sync()
        return path

    def _train(self, run: Run, lr: float | None) -> Path:
        from contextlib import nullcontext

        from phaselm.training.trainer import TaskExamples, Trainer, TrainingError, evaluate_answers
        from phaselm.evaluation.loops import wilson

        path = self.result_path(run)
        lr = run.lr if lr is None else lr
        cfg = self.run_config(run, lr)
        if path.exists():
            record = read_run(path)
            if record["lr"] != lr:
                raise ValueError(f"{path} was trained at another learning rate than the sweep chooses ({lr:g}); "
                                 "delete it to retrain it at the chosen rate")
            if not _same_model(record["model_config"], cfg.to_dict()["model"]):
                raise ValueError(f"{path} was trained with another model configuration than this run's (e.g. "
                                 "--short-conv); use the settings it was made with, or another --out")
            return path
        same = Run(run.difficulty, run.model, run.width, run.seed, lr, sweep=True)
        if not run.sweep and self.result_path(same).exists() and same in sweep_runs(self.cfg):
            record = read_run(self.result_path(same))
            if self.rank == 0:
                atomic_write(path, json.dumps({**record, "run": run.run_id, "sweep": False, "reused": same.run_id}, indent=1) + "\n")
            return path
        folder = Path(cfg.train.out_dir)
        from phaselm.training import checkpoint as ckpt

        resume = folder.exists() and bool(ckpt.step_folders(folder))
        if resume and not _same_training(folder, cfg):
            raise ValueError(f"{folder} holds a checkpoint of other training settings (another --steps, learning "
                             "rate or model; another bench's work?); give this bench its own --work, or delete that "
                             "folder to train the run from the start")
        self._sync()  # every rank has decided whether to resume before rank 0's trainer touches the folder
        t0 = time.perf_counter()
        trainer = Trainer(cfg, resume=resume, progress=self.progress, overwrite=not resume)
        try:
            summary = trainer.train()
        except TrainingError as err:
            if "exploding gradient" not in str(err) and "non-finite" not in str(err):
                raise
            summary = {"diverged": str(err)}
        seconds = time.perf_counter() - t0
        if self.rank != 0:  # rank 0 evaluates the (identical) trained model and writes the result
            return path
        model = trainer.raw_model
        data: TaskExamples = trainer.data
        val = summary.get("final_val") or data.evaluate(model, trainer.device, nullcontext)
        tests = [evaluate_answers(model, *part.test, trainer.device) for part in data.parts]
        tests = [{**t, "wilson95": list(wilson(t["correct"], t["answers"]))} for t in tests]
        test = data.combine(tests)
        lo, hi = test.get("wilson95") or wilson(test["correct"], test["answers"])
        record = {
            "run": run.run_id, "task": self.cfg.task, "difficulty": run.difficulty, "model": run.model,
            "width": run.width, "seed": run.seed, "lr": lr, "sweep": run.sweep,
            "data": cfg.to_dict()["data"], "model_config": cfg.to_dict()["model"],
            "params": matched_params(model), "params_total": sum(p.numel() for p in model.parameters()),
            "steps": self.cfg.steps, "train_seconds": train_seconds(summary, seconds), "resumed": resume,
            "started_at_step": summary.get("start_iter", 0), "parts": summary.get("parts"),
            "diverged": summary.get("diverged"), "val": val, "val_curve": val_curve(folder),
            "test": {**test, "wilson95": [lo, hi]},
            "test_by_difficulty": dict(zip(self.cfg.difficulty_labels(), tests)) if run.difficulty == MIX else None,
            "protocol": self.protocol(), "command": self.command, **provenance(),
        }
        atomic_write(path, json.dumps(record, indent=1) + "\n")
        if self.progress:
            print(f"{run.run_id} lr {lr:g}: test accuracy {test['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] "
                  f"({seconds:.0f} s)", file=sys.stderr)
        return path
