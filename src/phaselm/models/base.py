"""What phaselm's three language models share: the transformers plumbing.

Each model is a ``transformers.PreTrainedModel`` + ``GenerationMixin`` with its own
``PreTrainedConfig`` (``save_pretrained`` / ``from_pretrained``, ``generate``, the Cache API). A
model only defines its layers and :meth:`PhaseLMForCausalLM.hidden_states`; this class turns token
ids into logits and a loss, builds the cache and the masks, and keeps ``generate`` working.

Shapes: ``input_ids [B, T]`` → ``logits [B, T, V]`` (or the last ``logits_to_keep`` positions).
Two ways to give the loss: ``targets [B, T]``, the next token of every position (nanoGPT style,
−1 = ignore; what the trainer passes), or ``labels [B, T]`` in the transformers convention (the
input ids themselves, shifted inside, −100 = ignore).
"""


import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from phaselm.nn import oscillators as osc
from phaselm.nn.attention import LayerInputs


@dataclass(kw_only=True)
class CoherenceRegulariser:
    """Config fields of the coherence regulariser (an anti-over-synchronisation control shared by
    PhaseGPT and PMA): loss += ``coherence_reg`` · Σ_layers penalty(R) with
    :func:`phaselm.nn.oscillators.coherence_penalty` (``ceiling`` / ``center`` / ``band``)."""

    coherence_reg: float | int = 0.0
    coherence_mode: str = "ceiling"
    coherence_target: float | int = 0.45
    coherence_width: float | int = 0.1

    def validate_coherence_regulariser(self):
        if not self.coherence_reg >= 0:
            raise ValueError(f"coherence_reg must be >= 0, got {self.coherence_reg}")
        if self.coherence_mode not in ("ceiling", "center", "band"):
            raise ValueError(f"coherence_mode must be ceiling, center or band, got {self.coherence_mode!r}")


@dataclass(kw_only=True)
class KuramotoSettings:
    """Config fields of the oscillators' Kuramoto dynamics (shared by PhaseGPT and PMA)."""

    coupling_init: float | int = 1.0
    kuramoto_steps: int = 2
    kuramoto_dt: float | int = 0.1
    integrator: str = "euler"
    phase_noise: float | int = 0.0
    freq_jitter: float | int = 0.0

    def validate_kuramoto(self):
        if self.kuramoto_steps < 0 or not self.kuramoto_dt > 0:
            raise ValueError(f"kuramoto_steps must be >= 0 and kuramoto_dt > 0, got {self.kuramoto_steps}, "
                             f"{self.kuramoto_dt}")
        if self.integrator not in ("euler", "rk4"):
            raise ValueError(f"integrator must be euler or rk4, got {self.integrator!r}")
        if self.phase_noise < 0 or self.freq_jitter < 0:
            raise ValueError("phase_noise and freq_jitter must be >= 0")


class CacheLayout:
    """Config properties the transformers cache and Phase-Slip read: one key/value head per query
    head (``num_key_value_heads``), ``head_dim``, and ``layer_types`` (the cache layer kind of each
    block), derived from the other fields by :meth:`cache_layer_types` (None while they are invalid;
    the validators say why). transformers may write ``layer_types`` back; only its own value is
    accepted."""

    @property
    def num_key_value_heads(self) -> int:
        return self.n_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def cache_layer_types(self) -> list[str] | None:
        raise NotImplementedError

    @property
    def layer_types(self) -> list[str] | None:
        return self.cache_layer_types()

    @layer_types.setter
    def layer_types(self, value):
        if value is not None and list(value) != self.layer_types:
            raise ValueError(f"layer_types is derived from the config ({self.layer_types}), got {value}")


def check_sizes(**sizes) -> None:
    """Every size >= 1 (vocab_size may be None until a tokenizer fills it in)."""
    for key, value in sizes.items():
        if value is not None and value < 1:
            raise ValueError(f"{key} must be >= 1, got {value}")


class PhaseLMForCausalLM(PreTrainedModel, GenerationMixin):
    """Base of phaselm's causal LMs (see the module docstring). Subclasses build ``self.wte``,
    ``self.blocks``, the final norm and ``self.lm_head`` (tied to ``wte``), and implement
    :meth:`hidden_states`."""

    base_model_prefix = "model"
    _tied_weights_keys = {"lm_head.weight": "wte.weight"}
    _supports_cache_class = True
    _supports_sdpa = True
    supports_gradient_checkpointing = False

    def _init_weights(self, module):
        """Weights are initialised in ``__init__`` (the GPT-2 scheme, in a fixed order, so a seed
        gives the same model as before these were transformers models); nothing to do here."""

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, value):
        self.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def create_masks_for_generate(self, attention_mask=None, **kwargs):
        """``generate`` builds 4-D masks for compileable caches; these models take the 2-D mask."""
        return attention_mask

    @staticmethod
    def gpt2_init(model: nn.Module, n_layer: int, residual_suffixes: tuple[str, ...]) -> None:
        """N(0, 0.02) for every Linear and Embedding weight (zero biases), then N(0, 0.02/√(2L))
        for the residual projections (GPT-2)."""
        def init(module):
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

        model.apply(init)  # children before parents, as nanoGPT's model.apply
        for name, p in model.named_parameters():
            if name.endswith(residual_suffixes):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    # ------------------------------------------------------------------ helpers for the trainer
    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count (tied weights once); ``non_embedding`` leaves position embeddings out."""
        n = sum(p.numel() for p in self.parameters())
        wpe = getattr(self, "wpe", None)
        return n - wpe.weight.numel() if non_embedding and wpe is not None else n

    def layer_metrics(self) -> dict[str, float]:
        """``layer{i}.{name}`` for every layer module with a ``metrics()`` method (for logging)."""
        return {f"layer{i}.{k}": v for i, m in self.phase_layers().items() for k, v in m.metrics().items()}

    def phase_layers(self) -> dict[int, nn.Module]:
        """The layers that carry oscillators, by block index (none in the GPT baseline)."""
        return {}

    def coherence_loss(self) -> torch.Tensor | None:
        """λ · Σ over phase layers of the coherence penalty on their R of the last forward (with
        gradients), or None when the config's ``coherence_reg`` is 0 or absent."""
        lam = getattr(self.config, "coherence_reg", 0.0)
        if not lam:
            return None
        c = self.config
        return lam * sum(osc.coherence_penalty(m.last_r, c.coherence_mode, c.coherence_target, c.coherence_width)
                         for m in self.phase_layers().values())

    # ------------------------------------------------------------------ forward
    def hidden_states(self, input_ids: torch.Tensor, inputs: LayerInputs) -> torch.Tensor:
        """Final hidden states ``[B, T, C]`` (after the final norm)."""
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                past_key_values=None, use_cache: bool | None = None, labels: torch.Tensor | None = None,
                logits_to_keep: int = 0, return_dict: bool | None = None, head_at_targets: bool = False,
                **kwargs) -> CausalLMOutputWithPast:
        """Logits (and the loss when ``targets`` or ``labels`` are given); see the module docstring.
        ``use_cache=True`` (what ``generate`` passes) creates a cache when none is given.
        ``head_at_targets=True`` (with ``targets``): the LM head runs only where ``targets >= 0``
        and ``logits`` holds those rows, ``[n_targets, V]`` in row-major order (synthetic tasks
        label a few positions per sequence; the loss is the same)."""
        if input_ids is None:
            raise ValueError(f"{type(self).__name__} needs input_ids (inputs_embeds are not supported)")
        b, t = input_ids.shape
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        inputs = LayerInputs.build(b, t, input_ids.device, attention_mask, position_ids, past_key_values)
        if inputs.past + t > self.config.block_size:
            raise ValueError(f"sequence length {inputs.past + t} exceeds block_size {self.config.block_size}; "
                             f"shorten the input or max_new_tokens")
        x = self.hidden_states(input_ids, inputs)
        if head_at_targets:
            if targets is None:
                raise ValueError("head_at_targets=True needs targets (the positions to compute logits at)")
            keep = targets >= 0
            logits = self.lm_head(x[keep])  # [n_targets, V]
            loss = F.cross_entropy(logits.float(), targets[keep])
            return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.reshape(-1), ignore_index=-1)
        elif labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values)
