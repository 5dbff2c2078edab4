"""Run configurations: YAML files validated against dataclasses.

An unknown key, a value of the wrong type or a missing file is a :class:`ConfigError` (a
``ValueError``) whose one-line message names the key, e.g.
``config: unknown key 'train.lr_decay' (known: ...)``. Overrides on the command line use the same
dotted names: ``train.max_iters=200 model.n_layer=2``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from phaselm.models.gpt import GPTConfig


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


@dataclass
class DataConfig:
    name: str = "tiny-shakespeare"  # shakespeare | tiny-shakespeare | text | a hub dataset name
    path: str | None = None  # for name: text
    tokenizer: str = "char"  # char | bpe | a tokenizer name or folder


@dataclass
class ModelConfig(GPTConfig):
    """The model section: the architecture (``type``) and its :class:`GPTConfig` fields; the
    field checks of ``GPTConfig`` run when the config is loaded."""

    vocab_size: int | None = None  # None: the tokenizer's
    type: str = "gpt"  # gpt | phasegpt | pma
    # phasegpt (phaselm.attention.PhaseCoupledAttention in these layers; the others stay standard)
    phase_layers: list[int] = field(default_factory=list)
    n_osc: int = 32
    coupling_init: float = 1.0
    kuramoto_steps: int = 2
    kuramoto_dt: float = 0.1
    integrator: str = "euler"  # euler | rk4
    coherence_init: float = 0.5
    phase_noise: float = 0.0
    freq_jitter: float = 0.0
    coherence_reg: float = 0.0  # λ: loss += λ · Σ_layers coherence_penalty(R)
    coherence_mode: str = "ceiling"  # ceiling | center | band
    coherence_target: float = 0.45
    coherence_width: float = 0.1
    # pma (phaselm.models.pma; n_embd is d_model, n_layer counts SSM + PMA blocks; the Kuramoto
    # fields above are shared, n_osc is not used: one oscillator per head and token)
    n_ssm: int = 0  # Mamba blocks (n_layer: pure Mamba, 0: no SSM)
    layout: str = "ssm_first"  # ssm_first | interleaved
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    lambda_init: float = 0.1
    lambda_trainable: bool = True
    tau_base_init: float = 1.0
    tau_alpha_init: float = 0.1
    tau_beta_init: float = 0.1
    coupling_mode: str = "context"  # context | constant
    scan: str = "auto"  # auto | parallel | sequential | cuda


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
    model: ModelConfig = field(default_factory=ModelConfig)
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
            ("model.type", self.model.type in ("gpt", "phasegpt", "pma")),
            ("model.layout", self.model.layout in ("ssm_first", "interleaved")),
            ("model.coupling_mode", self.model.coupling_mode in ("context", "constant")),
            ("model.scan", self.model.scan in ("auto", "parallel", "sequential", "cuda")),
            ("model.n_ssm", 0 <= self.model.n_ssm <= self.model.n_layer),
            ("model.lambda_init", 0 <= self.model.lambda_init < 0.5),
            ("model.integrator", self.model.integrator in ("euler", "rk4")),
            ("model.coherence_mode", self.model.coherence_mode in ("ceiling", "center", "band")),
            ("model.n_osc", self.model.n_osc >= 1), ("model.kuramoto_steps", self.model.kuramoto_steps >= 0),
            ("model.kuramoto_dt", self.model.kuramoto_dt > 0), ("model.coherence_reg", self.model.coherence_reg >= 0),
        ]
        for key, ok in checks:
            if not ok:
                raise ConfigError(f"config: invalid value for {key}: {_get(self, key)!r}")
        bad_layers = [i for i in self.model.phase_layers if not 0 <= i < self.model.n_layer]
        if bad_layers:
            raise ConfigError(f"config: model.phase_layers {bad_layers} outside 0..{self.model.n_layer - 1}")
        if self.model.type == "phasegpt" and not self.model.phase_layers:
            raise ConfigError("config: model.phase_layers is empty; model.type phasegpt needs at least one phase layer")
        if self.model.type != "phasegpt" and self.model.phase_layers:
            raise ConfigError("config: model.phase_layers is only used by model.type: phasegpt (it would be ignored)")
        if self.data.name == "text" and not self.data.path:
            raise ConfigError("config: data.path is required when data.name is 'text'")
        if self.data.path and not Path(self.data.path).expanduser().exists():
            raise ConfigError(f"config: data.path: file not found: {self.data.path}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = from_dict(data[f.name], hint, f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = _check_type(prefix + f.name, data[f.name], hint)
    try:
        return cls(**kwargs)
    except ValueError as err:  # a dataclass's own field checks (e.g. GPTConfig.__post_init__)
        raise ConfigError(f"config: {err}") from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config (``None``: defaults), apply ``key=value`` overrides, validate."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config: file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config: {p} is not valid YAML: {str(err).splitlines()[0]}") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"config: override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2:
            raise ConfigError(f"config: override key {key!r} must be section.key (e.g. train.max_iters)")
        value = yaml.safe_load(raw) if raw.strip() else None
        data.setdefault(parts[0], {})
        if not isinstance(data[parts[0]], dict):
            raise ConfigError(f"config: {parts[0]} must be a mapping")
        data[parts[0]][parts[1]] = value
    return from_dict(data).validate()
