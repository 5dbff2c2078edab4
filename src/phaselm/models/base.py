"""What phaselm's three language models share: the transformers plumbing.

Each model family has a config (``PreTrainedConfig``), a base model (:class:`PhaseLMModel`: the
embeddings, the blocks and the final norm; ``AutoModel``) and a causal LM (:class:`PhaseLMForCausalLM`:
the base model as ``.model`` (``base_model_prefix``) plus the LM head; ``AutoModelForCausalLM``,
``generate``, the Cache API). A model family only defines its embeddings and blocks.

Shapes: ``input_ids [B, T]`` (or ``inputs_embeds [B, T, C]``) → ``logits [B, T, V]`` (or the last
``logits_to_keep`` positions). Two ways to give the loss: ``targets [B, T]``, the next token of
every position (nanoGPT style, −1 = ignore; what the trainer passes), or ``labels [B, T]`` in the
transformers convention (the input ids themselves, shifted inside, −100 = ignore).

Outputs follow transformers: ``output_hidden_states`` gives ``hidden_states``, a tuple of
n_layer + 1 tensors ``[B, T, C]``: the embeddings' output, then each block's output, the last one
after the final norm (so ``lm_head(hidden_states[-1])`` are the logits). ``output_attentions``
gives ``attentions``, one ``[B, H, T, S]`` pattern per *attention* layer in block order (computed
explicitly, the eager path; a Mamba block has no pattern and no entry, as in transformers' hybrid
models). ``return_dict=False`` returns ``to_tuple()``. ``use_cache=None`` takes ``config.use_cache``
(False by default: a plain forward is the training path; ``generate`` asks for the cache itself).

Initialisation goes through ``_init_weights`` (see :meth:`PhaseLMPreTrainedModel.initialize_weights`):
a checkpoint that lacks a tensor gets it initialised and reported as a missing key, as transformers
does for its own models; a fresh model gets the same weights for a seed as phaselm 0.1 gave.
"""


import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.initialization import guard_torch_init_functions
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import logging

from phaselm.nn import oscillators as osc
from phaselm.nn.attention import CausalSelfAttention, LayerInputs, static_length

logger = logging.get_logger(__name__)


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


class PhaseLMPreTrainedModel(PreTrainedModel):
    """What phaselm's base models and causal LMs share: the transformers flags and the initialisation.

    Initialisation (the GPT-2 scheme, with the blocks' own tensors):

    * per module (:meth:`_init_weights`, children before parents as ``nn.Module.apply``): every
      Linear and Embedding weight N(0, σ²), σ = ``config.initializer_range`` (0.02), with zero
      biases; norms 1 (and 0); a Conv1d its torch
      default; a block's own tensors (ω, φ_pos, K₀, β₀, λ₀, τ₀, A_log, D) from its ``initial_value``;
    * then, over the whole model (:meth:`init_after_modules`): the residual projections
      (``residual_suffixes``) N(0, (σ/√(2L))²) again, Mamba's Δ projection and PMA's coupling map.

    A fresh model keeps the constructor's draws of the blocks' own tensors (they are marked
    initialised around ``post_init``), so a seed gives the weights phaselm gave before this class
    existed. When ``from_pretrained`` finds a tensor missing, the same code initialises just that
    tensor (transformers' guarded init functions skip loaded ones) and reports it in
    ``missing_keys``.
    """

    base_model_prefix = "model"
    _supports_cache_class = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' ``from_pretrained``, after checking a phaselm run or checkpoint folder's files
        against its SHA-256 manifest (a damaged file: a one-line ``CheckpointError``; a folder
        without a manifest, or a hub name, is loaded as transformers loads it)."""
        from phaselm.manifest import verify_folder

        verify_folder(pretrained_model_name_or_path)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True  # static-cache decoding: one graph, no breaks (tests/test_static_compile.py)
    supports_gradient_checkpointing = True  # the blocks are GradientCheckpointingLayers
    residual_suffixes: tuple[str, ...] = ("proj.weight",)

    def __init__(self, config, *inputs, initialise: bool = True, **kwargs):
        """``initialise=False``: leave the weights to an enclosing model's single init pass (a causal
        LM initialises its base model and head together, in the order that reproduces a seed)."""
        super().__init__(config, *inputs, **kwargs)
        self._deferred_init = not initialise

    def post_init(self):
        kept = list({id(t): t for m in self.modules() if not isinstance(m, (nn.Linear, nn.Embedding))
                     for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]}.values())
        for t in kept:  # the constructor's draws are these tensors' initialisation
            t._is_hf_initialized = True
        try:
            super().post_init()
        finally:
            for t in kept:
                del t._is_hf_initialized

    def init_weights(self):
        if not self._deferred_init:
            super().init_weights()

    @torch.no_grad()
    def _init_weights(self, module):
        """One module's own tensors (see the class docstring); tensors marked loaded are left alone."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            if module.weight is not None:
                nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv1d):
            module.reset_parameters()
        elif hasattr(module, "initial_value") and (todo := _not_loaded(module, recurse=False)):
            module.reset_parameters(todo)

    @torch.no_grad()
    def initialize_weights(self):
        """transformers' per-module pass, then :meth:`init_after_modules` (also when
        ``from_pretrained`` initialises missing tensors)."""
        super().initialize_weights()
        with guard_torch_init_functions():
            self.init_after_modules()

    def init_after_modules(self):
        """The model-wide second pass (class docstring): residual projections, Δ, coupling maps."""
        n_layer = self.config.n_layer
        for name, p in self.named_parameters():
            if name.endswith(self.residual_suffixes):
                nn.init.normal_(p, mean=0.0, std=self.config.initializer_range / math.sqrt(2 * n_layer))
        for m in self.modules():
            if hasattr(m, "reset_dt_parameters"):
                m.reset_dt_parameters(_not_loaded(m.dt_proj))
            if getattr(m, "coupling_mode", None) == "context":
                m.reset_parameters_after_init(_not_loaded(m.coupling_map))

    # ------------------------------------------------------------------ layers
    @property
    def blocks(self) -> nn.ModuleList:
        """The decoder blocks (``model.blocks`` of a causal LM)."""
        return self.base_model._modules["blocks"]

    def phase_layers(self) -> dict[int, nn.Module]:
        """The attention layers that carry oscillators, by block index (none in the GPT baseline)."""
        return {i: m for i, b in enumerate(self.blocks) for m in b.children()
                if isinstance(m, CausalSelfAttention) and hasattr(m, "phases")}

    def layer_metrics(self) -> dict[str, float]:
        """``layer{i}.{name}`` for every layer module with a ``metrics()`` method (for logging)."""
        return {f"layer{i}.{k}": v for i, m in self.phase_layers().items() for k, v in m.metrics().items()}

    def coherence_loss(self) -> torch.Tensor | None:
        """λ · Σ over phase layers of the coherence penalty on their R of the last forward (with
        gradients), or None when the config's ``coherence_reg`` is 0 or absent."""
        lam = getattr(self.config, "coherence_reg", 0.0)
        if not lam:
            return None
        c = self.config
        return lam * sum(osc.coherence_penalty(m.last_r, c.coherence_mode, c.coherence_target, c.coherence_width)
                         for m in self.phase_layers().values())

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count (tied weights once); ``non_embedding`` leaves the position embeddings out
        (the token embeddings where there are none)."""
        n = sum(p.numel() for p in self.parameters())
        if not non_embedding:
            return n
        base = self.base_model
        table = base.wpe if hasattr(base, "wpe") else base.wte
        return n - table.weight.numel()


def _not_loaded(module: nn.Module, recurse: bool = True) -> tuple[str, ...]:
    """Names of ``module``'s tensors that transformers has not marked as loaded / initialised."""
    return tuple(n for n, t in [*module.named_parameters(recurse=recurse), *module.named_buffers(recurse=recurse)]
                 if not getattr(t, "_is_hf_initialized", False))


class PhaseLMModel(PhaseLMPreTrainedModel):
    """A base model: embeddings → blocks → final norm (``last_hidden_state [B, T, C]``). Subclasses
    build ``wte`` and ``blocks`` and define :meth:`embed` and :meth:`final_norm` (and
    :meth:`run_block` when a block needs more than the hidden state)."""

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, value):
        self.wte = value

    def embed(self, input_ids, inputs_embeds, inputs: LayerInputs) -> torch.Tensor:
        raise NotImplementedError

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def run_block(self, block: nn.Module, x: torch.Tensor, context: torch.Tensor, inputs: LayerInputs):
        """One block: ``(new x, new context)``; the context (PMA: the last SSM output) starts as the embeddings."""
        return block(x, **inputs.as_kwargs()), context

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values=None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, **kwargs) -> BaseModelOutputWithPast:
        """``input_ids [B, T]`` or ``inputs_embeds [B, T, C]`` → ``last_hidden_state [B, T, C]`` (after
        the final norm); see the module docstring for the other fields."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError(f"{type(self).__name__} needs exactly one of input_ids and inputs_embeds")
        ref = input_ids if input_ids is not None else inputs_embeds
        b, t = ref.shape[:2]
        c = self.config
        use_cache = c.use_cache if use_cache is None else use_cache
        output_attentions = c.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = c.output_hidden_states if output_hidden_states is None else output_hidden_states
        if self.training and (use_cache or past_key_values is not None) and any(
                b.gradient_checkpointing for b in self.blocks):
            logger.warning_once("use_cache=True is incompatible with gradient checkpointing in training (the "
                                "recomputation would update the cache twice); setting use_cache=False")
            use_cache, past_key_values = False, None
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=c)
        inputs = LayerInputs.build(b, t, ref.device, attention_mask, position_ids, past_key_values, output_attentions,
                                   getattr(c, "_attn_implementation", None) or "sdpa")
        if not torch.compiler.is_compiling() and int(inputs.past) + t > c.block_size:
            raise ValueError(f"sequence length {int(inputs.past) + t} exceeds block_size {c.block_size}; "
                             f"shorten the input or max_new_tokens")
        x = self.embed(input_ids, inputs_embeds, inputs)
        hidden, attentions = [x], []
        context = x
        for block in self.blocks:
            x, context = self.run_block(block, x, context, inputs)
            hidden.append(x)
            for m in block.children():
                if isinstance(m, CausalSelfAttention):
                    attentions.append(m.attention_weights)
                    m.attention_weights = None
        x = self.final_norm(x)
        hidden[-1] = x
        out = BaseModelOutputWithPast(last_hidden_state=x, past_key_values=past_key_values,
                                      hidden_states=tuple(hidden) if output_hidden_states else None,
                                      attentions=tuple(attentions) if output_attentions else None)
        return out if (c.return_dict if return_dict is None else return_dict) else out.to_tuple()


class PhaseLMForCausalLM(PhaseLMPreTrainedModel, GenerationMixin):
    """A causal LM: ``self.model`` (a :class:`PhaseLMModel`, ``base_model_class``) and ``lm_head``,
    tied to the token embeddings unless ``config.tie_word_embeddings`` is False."""

    base_model_class: type[PhaseLMModel]
    _tied_weights_keys = {"lm_head.weight": "model.wte.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.generation_config.use_cache = True  # config.use_cache is forward's default, not generate's
        if config.vocab_size is None:
            raise ValueError("vocab_size must be set (the trainer takes it from the tokenizer)")
        self.model = self.base_model_class(config, initialise=False)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # tied by post_init (config)
        self.post_init()
        self.model._deferred_init = False

    def init_after_modules(self):
        """The base pass, then, for tied embeddings, the head's draw becomes the shared matrix
        (phaselm 0.1 tied before its init, so the head, initialised last, drew it); a loaded
        embedding is kept, and transformers ties the head to it afterwards."""
        super().init_after_modules()
        wte, head = self.model.wte.weight, self.lm_head.weight
        if self.config.tie_word_embeddings and head is not wte and not getattr(head, "_is_hf_initialized", False):
            init.copy_(wte, head)

    def get_input_embeddings(self):
        return self.model.wte

    def set_input_embeddings(self, value):
        self.model.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def get_decoder(self):
        return self.model

    def create_masks_for_generate(self, attention_mask=None, past_key_values=None, **kwargs):
        """``generate`` builds 4-D masks for compileable caches; these models take the 2-D mask, and
        for a static cache of S slots that mask padded with zeros to ``[B, S]``, so every decoding
        step has the same input shapes (a compiled step is traced once)."""
        slots = static_length(past_key_values)
        if attention_mask is not None and slots is not None and attention_mask.shape[-1] < slots:
            attention_mask = F.pad(attention_mask, (0, slots - attention_mask.shape[-1]))
        return attention_mask

    def _validate_generated_length(self, generation_config, input_ids_length, has_default_max_length):
        """transformers' checks, then: prompt + new tokens must fit ``block_size`` (positions are a
        learned table of that many entries), refused before anything is generated."""
        super()._validate_generated_length(generation_config, input_ids_length, has_default_max_length)
        limit = self.config.block_size
        if generation_config.max_length > limit:
            raise ValueError(f"prompt ({input_ids_length} tokens) + new tokens = {generation_config.max_length} exceeds "
                             f"block_size {limit} (the model's learned positions); use max_new_tokens <= "
                             f"{max(limit - input_ids_length, 0)} or a shorter prompt")

    def forward(self, input_ids: torch.Tensor | None = None, targets: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                past_key_values=None, inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                labels: torch.Tensor | None = None, logits_to_keep: int | torch.Tensor = 0,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, head_at_targets: bool = False, **kwargs) -> CausalLMOutputWithPast:
        """Logits (and the loss when ``targets`` or ``labels`` are given); see the module docstring.
        ``logits_to_keep``: an int k (0: all) keeps the last k positions, a 1-D tensor those indices.
        ``head_at_targets=True`` (with ``targets``): the LM head runs only where ``targets >= 0``
        and ``logits`` holds those rows, ``[n_targets, V]`` in row-major order (synthetic tasks
        label a few positions per sequence; the loss is the same)."""
        if head_at_targets and targets is None:
            raise ValueError("head_at_targets=True needs targets (the positions to compute logits at)")
        out = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                         return_dict=True)
        x = out.last_hidden_state
        loss = None
        if head_at_targets:
            keep = targets >= 0
            logits = self.lm_head(x[keep])  # [n_targets, V]
            loss = F.cross_entropy(logits.float(), targets[keep])
        else:
            if isinstance(logits_to_keep, int):
                x = x[:, -logits_to_keep:] if logits_to_keep else x
            else:
                x = x[:, logits_to_keep]
            logits = self.lm_head(x)
            if targets is not None:
                loss = F.cross_entropy(logits.float().flatten(0, 1), targets.reshape(-1), ignore_index=-1)
            elif labels is not None:  # transformers' convention: labels are the inputs, shifted here
                # with num_items_in_batch (transformers' Trainer under gradient accumulation) the summed
                # loss over that many tokens of the whole accumulated batch, else the mean
                n = kwargs.get("num_items_in_batch")
                loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].reshape(-1),
                                       ignore_index=-100, reduction="mean" if n is None else "sum")
                loss = loss if n is None else loss / n
        result = CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values,
                                        hidden_states=out.hidden_states, attentions=out.attentions)
        return result if (self.config.return_dict if return_dict is None else return_dict) else result.to_tuple()
