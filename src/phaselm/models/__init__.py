"""phaselm's language models, as transformers models registered with the Auto classes:

* ``phaselm_gpt``: :class:`GPTForCausalLM` (:class:`GPTConfig`, base model :class:`GPTModel`), the
  nanoGPT-style baseline;
* ``phaselm_phasegpt``: :class:`PhaseGPTForCausalLM` (:class:`PhaseGPTConfig`, :class:`PhaseGPTModel`),
  Kuramoto phase-coupled attention in some layers;
* ``phaselm_pma``: :class:`PMAForCausalLM` (:class:`PMAConfig`, :class:`PMAModel`), Mamba +
  phase-modulated attention (``PhaseModulatedAttentionLM`` is the PMA seed's name for it).

After ``import phaselm``, ``AutoConfig``, ``AutoModel`` (the base model: hidden states, no LM head)
and ``AutoModelForCausalLM.from_pretrained(folder)`` load them.
"""
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from phaselm.models.gpt import GPTConfig, GPTForCausalLM, GPTModel
from phaselm.models.phasegpt import PhaseGPTConfig, PhaseGPTForCausalLM, PhaseGPTModel
from phaselm.models.pma import (
    PhaseModulatedAttentionLM, PMAConfig, PMAForCausalLM, PMAModel, create_130m_config, create_tiny_config,
)

MODELS = {"gpt": (GPTConfig, GPTForCausalLM), "phasegpt": (PhaseGPTConfig, PhaseGPTForCausalLM),
          "pma": (PMAConfig, PMAForCausalLM)}

for _config, _model in MODELS.values():
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model.base_model_class, exist_ok=True)
    AutoModelForCausalLM.register(_config, _model, exist_ok=True)

__all__ = ["GPTConfig", "GPTForCausalLM", "GPTModel", "PhaseGPTConfig", "PhaseGPTForCausalLM", "PhaseGPTModel",
           "PMAConfig", "PMAForCausalLM", "PMAModel", "PhaseModulatedAttentionLM", "create_130m_config",
           "create_tiny_config", "MODELS"]


def _own_fields(cls) -> list[str]:
    """A config class's own fields: its dataclass fields but transformers' generic ones."""
    from dataclasses import fields

    from transformers import PreTrainedConfig

    generic = {f.name for f in fields(PreTrainedConfig)}
    return [f.name for f in fields(cls) if f.name not in generic]


def config_from_dict(section: dict, vocab_size: int | None = None):
    """The config of a ``model:`` section of a run config: ``type`` (gpt | phasegpt | pma) and that
    model's config fields; ``vocab_size`` fills in a missing one. Unknown keys and invalid values
    are one-line ``ValueError``s naming the key."""
    from huggingface_hub.errors import StrictDataclassError

    section = dict(section or {})
    kind = section.pop("type", "gpt")
    if kind not in MODELS:
        raise ValueError(f"model.type must be one of {', '.join(MODELS)}, got {kind!r}")
    cls = MODELS[kind][0]
    own = set(_own_fields(cls))
    if unknown := sorted(set(section) - own):
        raise ValueError(f"unknown key 'model.{unknown[0]}' for model.type {kind} (known: {', '.join(sorted(own))})")
    if section.get("vocab_size") is None:
        section["vocab_size"] = vocab_size
    try:
        return cls(**section)
    except (StrictDataclassError, ValueError, TypeError) as err:
        lines = [line.strip().removeprefix("ValueError: ").removeprefix("TypeError: ")
                 for line in str(err).splitlines() if line.strip()]
        message = lines[-1].split("Errors: ", 1)[-1].split(";")[0]  # a union type: its first reason
        raise ValueError(f"model: {message}") from None


def config_to_dict(config) -> dict:
    """The ``model:`` section that :func:`config_from_dict` turns back into ``config``."""
    kind = next(k for k, (cls, _) in MODELS.items() if type(config) is cls)
    return {"type": kind, **{k: getattr(config, k) for k in _own_fields(type(config))}}
