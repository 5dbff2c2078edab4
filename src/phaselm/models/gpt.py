"""A GPT in the nanoGPT style, as a transformers model: pre-LN blocks, causal attention through
``torch.nn.functional.scaled_dot_product_attention``, learned positions, tied input/output
embeddings (unless ``tie_word_embeddings=False``), dropout. PhaseGPT (:mod:`phaselm.models.phasegpt`)
is this model with phase-coupled attention in some layers.

    tokens [B, T] → wte + wpe(positions) → n_layer × Block → LayerNorm → LM head (tied) → [B, T, V]

:class:`GPTModel` is everything before the LM head (``AutoModel``; ``GPTForCausalLM.model``).

    model = GPTForCausalLM(GPTConfig(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384))
    model.save_pretrained("runs/gpt"); GPTForCausalLM.from_pretrained("runs/gpt")
    model.generate(ids, max_new_tokens=100, do_sample=True, top_p=0.9)
"""


import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import PreTrainedConfig

from phaselm.models.base import CacheLayout, PhaseLMForCausalLM, PhaseLMModel, check_sizes
from phaselm.nn.attention import Block, CausalSelfAttention, LayerInputs


@strict
class GPTConfig(CacheLayout, PreTrainedConfig):
    """The GPT baseline: ``n_layer`` blocks of ``n_head`` heads, width ``n_embd``, context
    ``block_size`` tokens, vocabulary ``vocab_size``; ``dropout`` in [0, 1); ``bias`` in the
    linear layers and LayerNorms; ``short_conv`` k > 0: a causal depthwise convolution of kernel k
    in front of every block's attention (:class:`~phaselm.nn.attention.Block`; Zoology's recall
    models use k = 3; 0: none); ``use_cache``: forward's default for ``use_cache``."""

    model_type = "phaselm_gpt"
    attribute_map = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
                     "max_position_embeddings": "block_size"}

    vocab_size: int | None = 65
    block_size: int = 256
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float | int = 0.0
    bias: bool = False
    short_conv: int = 0
    tie_word_embeddings: bool = True
    use_cache: bool = False
    initializer_range: float = 0.02  # σ of the N(0, σ²) Linear/Embedding initialisation

    def validate_architecture(self):
        check_sizes(vocab_size=self.vocab_size, block_size=self.block_size, n_layer=self.n_layer,
                    n_head=self.n_head, n_embd=self.n_embd)
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.short_conv < 0:
            raise ValueError(f"short_conv must be >= 0 (a kernel size; 0: no convolution), got {self.short_conv}")

    def cache_layer_types(self) -> list[str] | None:
        """Cache layer kinds: key/value caches, "hybrid" (KV + the conv state) with ``short_conv``
        (None while the sizes are invalid)."""
        kind = "hybrid" if self.short_conv else "full_attention"
        return [kind] * self.n_layer if isinstance(self.n_layer, int) else None


class GPTModel(PhaseLMModel):
    """Token and position embeddings, the blocks and the final LayerNorm. Subclasses choose each
    layer's attention with :meth:`make_attention`."""

    config_class = GPTConfig
    _no_split_modules = ["Block"]

    def __init__(self, config: GPTConfig, **kwargs):
        super().__init__(config, **kwargs)
        if config.vocab_size is None:
            raise ValueError("vocab_size must be set (the trainer takes it from the tokenizer)")
        c = config
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.block_size, c.n_embd)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList([Block(c.n_embd, self.make_attention(i), c.dropout, c.bias, c.short_conv, i)
                                     for i in range(c.n_layer)])
        self.ln_f = nn.LayerNorm(c.n_embd, bias=c.bias)
        self.post_init()

    def make_attention(self, layer_idx: int) -> nn.Module:
        c = self.config
        return CausalSelfAttention(c.n_embd, c.n_head, c.dropout, c.bias, layer_idx)

    def embed(self, input_ids, inputs_embeds, inputs: LayerInputs) -> torch.Tensor:
        """drop(wte(ids) + wpe(positions)) ``[B, T, C]`` (``inputs_embeds`` in place of wte(ids))."""
        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds
        pos = inputs.positions if inputs.positions is not None else torch.arange(x.shape[1], device=x.device)
        return self.drop(x + self.wpe(pos))

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_f(x)


class GPTForCausalLM(PhaseLMForCausalLM):
    """GPT language model (see the module docstring): :class:`GPTModel` + the LM head."""

    config_class = GPTConfig
    base_model_class = GPTModel
    _no_split_modules = ["Block"]
