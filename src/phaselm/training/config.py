"""Run configurations: YAML files validated against dataclasses.

An unknown key, a value of the wrong type or a missing file is a :class:`ConfigError` (a
``ValueError``) whose one-line message names the key, e.g.
``config: unknown key 'train.lr_decay' (known: ...)``. Overrides on the command line use the same
dotted names: ``train.max_iters=200 model.n_layer=2``. A file may start with ``base: other.yaml``
(relative to it): it then lists only what it changes (:func:`read_yaml`).
"""

from __future__ import annotations

import codecs
import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from phaselm.models import config_from_dict, config_to_dict


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


class _Loader(yaml.SafeLoader):
    """YAML with ``1e-3`` read as a float (PyYAML's YAML 1.1 rules want ``1.0e-3``, and read
    ``1e-3`` as the string '1e-3')."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


@dataclass
class DataConfig:
    name: str = "tiny-shakespeare"  # shakespeare | tiny-shakespeare | text | a hub dataset | a synthetic task
    path: str | None = None  # for name: text
    tokenizer: str = "char"  # char | bpe | a tokenizer name or folder (text data only)
    # synthetic tasks (name: mqar | selective_copy | noisy_recall | fuzzy_recall; phaselm.data.tasks):
    # the task's settings (None: the task's default; a setting the task lacks is an error) ...
    seq_len: int | None = None
    vocab_size: int | None = None
    num_kv_pairs: int | None = None  # mqar
    power_a: float | None = None  # mqar
    random_fill: bool | None = None  # mqar
    num_tokens: int | None = None  # selective_copy
    noise_vocab_size: int | None = None  # noisy_recall
    frac_noise: float | None = None  # noisy_recall
    k_motif: int | None = None  # fuzzy_recall
    v_motif: int | None = None  # fuzzy_recall
    # ... and the example sets: training examples, held-out (val and test) examples, their seed
    num_train: int = 12_800
    num_test: int = 2_000
    data_seed: int = 0
    # a mixture of difficulties (Zoology's MQAR protocol): a list of settings dicts, each overriding
    # the settings above for one component (``num_train`` too); each step draws its batch from one
    # component, with probability proportional to its number of training examples
    mixture: list[dict] | None = None

    TASK_FIELDS = ("seq_len", "vocab_size", "num_kv_pairs", "power_a", "random_fill", "num_tokens", "noise_vocab_size",
                   "frac_noise", "k_motif", "v_motif")

    @property
    def is_task(self) -> bool:
        from phaselm.data.tasks import TASKS

        return self.name in TASKS

    def task(self, **overrides):
        """The synthetic task of this section (:func:`phaselm.data.tasks.make_task`), with ``overrides``."""
        from phaselm.data.tasks import make_task

        return make_task(self.name, **{**{k: getattr(self, k) for k in self.TASK_FIELDS}, **overrides})

    def components(self) -> list[tuple]:
        """``[(task, num_train)]``: the one task of this section, or each component of ``mixture``."""
        if self.mixture is None:
            return [(self.task(), self.num_train)]
        out = []
        for i, part in enumerate(self.mixture):
            if not isinstance(part, dict) or (bad := [k for k in part if k not in (*self.TASK_FIELDS, "num_train")]):
                raise ValueError(f"data.mixture[{i}] must be a mapping of task settings and num_train"
                                 + (f"; {bad[0]!r} is neither" if isinstance(part, dict) else f", got {part!r}"))
            settings = {k: v for k, v in part.items() if k != "num_train"}
            out.append((self.task(**settings), int(part.get("num_train", self.num_train))))
        if not out:
            raise ValueError("data.mixture is empty; give at least one component or leave it out")
        return out


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    max_iters: int = 1000
    batch_size: int = 32  # global sequences per optimiser step, per micro-step
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int | None = None  # None: max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 disables
    max_grad_norm: float = 1e4  # a larger (pre-clip) gradient norm stops the run as exploding
    eval_interval: int = 250
    eval_max_tokens: int | None = 200_000  # cap on val tokens per evaluation (None: all)
    log_interval: int = 10
    checkpoint_interval: int | None = None  # None: at every evaluation
    keep_checkpoints: int = 2
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
    compile: bool = False
    tensorboard: bool = False


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    # the model section: ``type`` (gpt | phasegpt | pma) and that model's config fields, checked by
    # its config class (phaselm.models.config_from_dict); vocab_size: the tokenizer's unless given
    model: object = field(default_factory=lambda: config_from_dict({"type": "gpt", "vocab_size": None}))
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "RunConfig":
        t = self.train
        checks = [
            ("train.max_iters", t.max_iters >= 1), ("train.batch_size", t.batch_size >= 1),
            ("train.grad_accum", t.grad_accum >= 1), ("train.lr", t.lr > 0), ("train.min_lr", 0 <= t.min_lr <= t.lr),
            ("train.warmup_iters", t.warmup_iters >= 0), ("train.eval_interval", t.eval_interval >= 1),
            ("train.log_interval", t.log_interval >= 1), ("train.keep_checkpoints", t.keep_checkpoints >= 1),
            ("train.device", t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:")),
            ("train.dtype", t.dtype in ("auto", "float32", "bfloat16", "float16")),
            ("train.lr_decay_iters", t.lr_decay_iters is None or t.lr_decay_iters >= 1),
            ("train.eval_max_tokens", t.eval_max_tokens is None or t.eval_max_tokens >= 1),
            ("train.checkpoint_interval", t.checkpoint_interval is None or t.checkpoint_interval >= 1),
            ("train.weight_decay", t.weight_decay >= 0), ("train.beta1", 0 <= t.beta1 < 1),
            ("train.beta2", 0 <= t.beta2 < 1), ("train.grad_clip", t.grad_clip >= 0),
            ("train.max_grad_norm", t.max_grad_norm > 0), ("train.seed", t.seed >= 0),
        ]
        numbers = {f"train.{k}": v for k, v in dataclasses.asdict(t).items()}
        numbers.update({f"model.{k}": v for k, v in self.to_dict()["model"].items()})
        for key, value in numbers.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"config: {key} must be a finite number, got {value}")
        for key, ok in checks:
            if not ok:
                raise ConfigError(f"config: invalid value for {key}: {_get(self, key)!r}")
        d = self.data
        if d.is_task:
            try:
                parts = d.components()
            except ValueError as err:
                raise ConfigError(f"config: {err}") from None
            if min(n for _, n in parts) < 1 or d.num_test < 1 or d.data_seed < 0:
                raise ConfigError("config: data.num_train and data.num_test must be >= 1 and data.data_seed >= 0")
            if self.model.block_size < (longest := max(task.seq_len for task, _ in parts)):
                raise ConfigError(f"config: model.block_size ({self.model.block_size}) is shorter than the task's "
                                  f"seq_len ({longest}); raise model.block_size")
        elif d.mixture is not None:
            raise ConfigError(f"config: data.mixture is for synthetic tasks, but data.name {d.name!r} is not a task")
        elif (used := [k for k in d.TASK_FIELDS if getattr(d, k) is not None]):
            raise ConfigError(f"config: data.{used[0]} is a synthetic-task setting, but data.name {d.name!r} is "
                              "not a task (mqar, selective_copy, noisy_recall, fuzzy_recall)")
        if self.data.name == "text" and not self.data.path:
            raise ConfigError("config: data.path is required when data.name is 'text'")
        if self.data.path and not Path(self.data.path).expanduser().exists():
            raise ConfigError(f"config: data.path: file not found: {self.data.path}")
        return self

    def to_dict(self) -> dict:
        return {"data": dataclasses.asdict(self.data), "model": config_to_dict(self.model),
                "train": dataclasses.asdict(self.train)}


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _check_type(key: str, value, annotation):
    """Return ``value`` converted to ``annotation`` where that is lossless, else raise ConfigError."""
    if typing.get_origin(annotation) is list:
        if not isinstance(value, list):
            raise ConfigError(f"config: {key} must be a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(annotation)
        return [_check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    args = typing.get_args(annotation)
    options = args if args else (annotation,)
    if isinstance(value, list) and (lists := [o for o in options if typing.get_origin(o) is list]):
        return _check_type(key, value, lists[0])
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"config: {key} must not be null")
    for opt in options:
        if opt is type(None):
            continue
        if opt is bool and isinstance(value, bool):
            return value
        if opt is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if opt is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if opt is str and isinstance(value, str):
            return value
        if opt is dict and isinstance(value, dict):  # checked by its user (data.mixture: DataConfig.components)
            return value
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ConfigError(f"config: {key} must be {names}, got {type(value).__name__} {value!r}")


def from_dict(data: dict | None, cls=RunConfig, prefix: str = ""):
    """Build ``cls`` from a nested dict, rejecting unknown keys and wrong types."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: {prefix.rstrip('.') or 'the file'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(f"config: unknown key '{prefix}{key}' (known: {', '.join(sorted(known))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        hint = hints[f.name]
        if cls is RunConfig and f.name == "model":
            if not isinstance(data["model"] or {}, dict):
                raise ConfigError(f"config: model must be a mapping, got {type(data['model']).__name__}")
            try:
                kwargs["model"] = config_from_dict(data["model"] or {})
            except ValueError as err:
                raise ConfigError(f"config: {err}") from None
        elif dataclasses.is_dataclass(hint):
            kwargs[f.name] = from_dict(data[f.name], hint, f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = _check_type(prefix + f.name, data[f.name], hint)
    try:
        return cls(**kwargs)
    except ValueError as err:  # a dataclass's own field checks (e.g. GPTConfig.__post_init__)
        raise ConfigError(f"config: {err}") from None


def read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """A YAML config as a dict, with inheritance: a top-level ``base: other.yaml`` (relative to the
    file) is read first, and this file's sections update it key by key (``model.n_layer`` here
    replaces only that key of the base's ``model``)."""
    if not path.is_file():
        raise ConfigError(f"config: file not found: {path}" + (f" (the base of {chain[-1]})" if chain else ""))
    if path.resolve() in chain:
        raise ConfigError(f"config: {path} inherits from itself through base: ({' -> '.join(map(str, chain))})")
    try:
        data = _yaml(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"config: {path} is not a text (UTF-8) file; pass a YAML config") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config: {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must be a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"config: base in {path} must be a file name, got {base!r}")
    merged = read_yaml(path.parent / base, chain + (path.resolve(),))
    for section, values in data.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
    return merged


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config (``None``: defaults), apply ``key=value`` overrides, validate."""
    data = read_yaml(Path(path)) if path is not None else {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"config: override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2:
            raise ConfigError(f"config: override key {key!r} must be section.key (e.g. train.max_iters)")
        try:
            value = _yaml(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"config: override {item!r}: the value is not valid YAML") from None
        data.setdefault(parts[0], {})
        if not isinstance(data[parts[0]], dict):
            raise ConfigError(f"config: {parts[0]} must be a mapping")
        data[parts[0]][parts[1]] = value
    cfg = from_dict(data).validate()
    check_text_files(cfg.data.path)
    return cfg


def check_text_files(path: str | None, probe: int = 1 << 20) -> None:
    """Refuse a ``data.path`` file (or a ``*.txt`` of a folder) that is empty, binary or not UTF-8
    text, reading at most ``probe`` bytes of each."""
    if not path:
        return
    root = Path(path).expanduser()
    files = sorted(root.glob("**/*.txt")) if root.is_dir() else [root]
    if not files:
        raise ConfigError(f"config: data.path: {root} holds no .txt files")
    for file in files:
        try:
            with open(file, "rb") as f:
                head = f.read(probe)
        except OSError as err:
            raise ConfigError(f"config: data.path: cannot read {file} ({err.strerror})") from None
        if not head.strip():
            raise ConfigError(f"config: data.path: {file} is empty")
        try:
            if b"\0" in head:
                raise UnicodeDecodeError("utf-8", head, head.index(b"\0"), head.index(b"\0") + 1, "NUL byte")
            codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        except UnicodeDecodeError as err:
            raise ConfigError(f"config: data.path: {file} is not UTF-8 text (binary data at byte {err.start}); "
                              "pass a text file") from None
