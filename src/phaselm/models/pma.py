"""The Phase-Modulated Attention language model: a hybrid of Mamba and PMA blocks, as a
transformers model.

    tokens [B, T] → embedding → N × SSM block → M × PMA block → RMSNorm → LM head (tied) → [B, T, V]

* SSM block: x + Mamba(RMSNorm(x)) (:class:`phaselm.nn.mamba.MambaMixer`).
* PMA block: x + PMA(RMSNorm(x), c), then x + MLP(RMSNorm(x)), with
  :class:`phaselm.nn.phase_modulated.PhaseModulatedAttention`; c, the hidden state of the most recent SSM
  block (the embeddings if none precedes), sets the oscillators' coupling K = f(c), so
  synchronisation depends on context.

``layout="ssm_first"`` (as published) puts all SSM blocks first; ``"interleaved"`` spreads the PMA
blocks evenly among them. ``n_ssm = n_layer`` is a pure Mamba LM, ``n_ssm = 0`` a pure PMA
transformer (no positional embedding besides the learned phases φ_pos).

In the cache an SSM block is a "linear_attention" layer (the last ``d_conv`` conv inputs and the
SSM state h), a PMA block a "hybrid" layer (keys with their phase features, values, and the running
sums of e^{iφ} for the Kuramoto steps and R). Var(P) needs no state: it depends on positions only.
A pure Mamba stack (``n_ssm = n_layer``) would leave transformers' cache without a sequence length,
which ``generate`` reads; its first block is then a "hybrid" layer that also records a one-number
key/value entry per token (transformers counts a zero-width entry as no tokens).

Every internal quantity has a hook point (:mod:`phaselm.nn.hooks`): ``hook_embed``,
``blocks.{L}.hook_resid_post``, ``blocks.{L}.pma.hook_{K,phi,phi_pos,R,lam,var_P,tau,P,pattern,z}``.
"""


from dataclasses import dataclass

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import PreTrainedConfig
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from phaselm.models.base import (
    CacheLayout, CoherenceRegulariser, KuramotoSettings, PhaseLMForCausalLM, PhaseLMModel, check_sizes,
)
from phaselm.nn.attention import MLP, LayerInputs
from phaselm.nn.functional import entropy
from phaselm.nn.hooks import HookPoint, hook_names, name_hook_points
from phaselm.nn.mamba import SCANS, MambaConfig, MambaMixer
from phaselm.nn.phase_modulated import PhaseModulatedAttention


LAYOUTS = ("ssm_first", "interleaved")


@strict
class PMAConfig(CacheLayout, PreTrainedConfig, KuramotoSettings, CoherenceRegulariser):
    """``n_layer`` blocks (``n_ssm`` Mamba + the rest PMA, arranged by ``layout``) of width
    ``n_embd`` (d_model); PMA blocks have ``n_head`` heads; Mamba blocks ``d_state``, ``d_conv``,
    ``expand`` and a ``scan`` implementation; the modulation's λ₀ (``lam_init`` in [0, 0.5),
    ``lam_trainable``), τ_base₀, α₀, β₀, the coupling mode (``context`` | ``constant``), the
    Kuramoto settings and the coherence regulariser."""

    model_type = "phaselm_pma"
    attribute_map = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
                     "max_position_embeddings": "block_size"}

    vocab_size: int | None = 49152  # the embedded SmolLM2 tokenizer's
    block_size: int = 1024
    n_embd: int = 768
    n_layer: int = 24  # SSM + PMA blocks
    n_ssm: int = 20
    n_head: int = 12
    layout: str = "ssm_first"  # ssm_first | interleaved
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dropout: float | int = 0.0
    bias: bool = False
    lam_init: float | int = 0.1
    lam_trainable: bool = True
    tau_base_init: float | int = 1.0
    tau_alpha_init: float | int = 0.1
    tau_beta_init: float | int = 0.1
    coupling_mode: str = "context"  # context | constant
    scan: str = "auto"  # auto | parallel | sequential | cuda
    tie_word_embeddings: bool = True
    use_cache: bool = False  # forward's default for use_cache (generate asks for the cache itself)
    initializer_range: float = 0.02  # σ of the N(0, σ²) Linear/Embedding initialisation

    def validate_architecture(self):
        check_sizes(vocab_size=self.vocab_size, block_size=self.block_size, n_layer=self.n_layer,
                    n_head=self.n_head, n_embd=self.n_embd, d_state=self.d_state, d_conv=self.d_conv,
                    expand=self.expand)
        if not 0 <= self.n_ssm <= self.n_layer:
            raise ValueError(f"n_ssm must be in 0..n_layer ({self.n_layer}), got {self.n_ssm}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be 'ssm_first' or 'interleaved', got {self.layout!r}")
        if self.coupling_mode not in ("context", "constant"):
            raise ValueError(f"coupling_mode must be 'context' or 'constant', got {self.coupling_mode!r}")
        if self.scan not in SCANS:
            raise ValueError(f"scan must be one of {SCANS}, got {self.scan!r}")
        if not 0 <= self.lam_init < PhaseModulatedAttention.LAM_MAX or (
                self.lam_trainable and self.lam_init <= 0):
            raise ValueError(f"lam_init must be in [0, 0.5) (and > 0 when trainable), got {self.lam_init}")
        if min(self.tau_base_init, self.tau_alpha_init, self.tau_beta_init) <= 0:
            raise ValueError("tau_base_init, tau_alpha_init and tau_beta_init must be > 0")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def block_types(self) -> list[str]:
        """``"ssm"`` / ``"pma"`` for each of the ``n_layer`` blocks, in order."""
        n_pma = self.n_layer - self.n_ssm
        if self.layout == "ssm_first" or n_pma == 0:
            return ["ssm"] * self.n_ssm + ["pma"] * n_pma
        pma_at = {round((k + 1) * self.n_layer / n_pma) - 1 for k in range(n_pma)}
        return ["pma" if i in pma_at else "ssm" for i in range(self.n_layer)]

    def cache_layer_types(self) -> list[str] | None:
        """Cache layer kinds: "linear_attention" (conv + SSM state) and "hybrid" (KV + Kuramoto state)."""
        if not all(isinstance(v, int) for v in (self.n_layer, self.n_ssm)) or self.layout not in LAYOUTS:
            return None  # invalid sizes: the validators say why
        kinds = ["linear_attention" if kind == "ssm" else "hybrid" for kind in self.block_types()]
        return ["hybrid"] + kinds[1:] if self.n_ssm == self.n_layer else kinds



def create_130m_config(**overrides) -> PMAConfig:
    """d_model 768, 24 blocks: 20 Mamba + 4 PMA (12 heads) after them, vocabulary 49152 (the
    embedded SmolLM2 tokenizer), context 1024; ≈141M parameters with tied embeddings (the published
    name says 130M; the Mamba-130M trunk it is named after has 24 Mamba blocks)."""
    return PMAConfig(**overrides)


def create_tiny_config(**overrides) -> PMAConfig:
    """A CPU-sized hybrid: d_model 128, 4 Mamba + 2 PMA blocks (4 heads), d_state 8, context 128,
    character vocabulary (65 for Shakespeare)."""
    base = dict(vocab_size=65, block_size=128, n_embd=128, n_layer=6, n_ssm=4, n_head=4, d_state=8)
    return PMAConfig(**{**base, **overrides})


class SSMBlock(GradientCheckpointingLayer):
    def __init__(self, cfg: PMAConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.records_length = cfg.layer_types[layer_idx] == "hybrid"  # see the module docstring
        self.norm = nn.RMSNorm(cfg.n_embd)
        self.ssm = MambaMixer(MambaConfig(d_model=cfg.n_embd, d_state=cfg.d_state, d_conv=cfg.d_conv,
                                          expand=cfg.expand, bias=cfg.bias, scan=cfg.scan))
        self.drop = nn.Dropout(cfg.dropout)
        self.hook_resid_post = HookPoint()

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, **fields) -> torch.Tensor:
        inputs = LayerInputs(**fields)
        if self.records_length and inputs.cache is not None:
            marker = x.new_zeros(x.shape[0], 1, x.shape[1], 1)  # [B, 1, T, 1]
            inputs.cache.update(marker, marker, self.layer_idx)
        y = self.ssm(self.norm(x), inputs.cache, self.layer_idx, inputs.valid)
        return self.hook_resid_post(x + self.drop(y))


class PMABlock(GradientCheckpointingLayer):
    def __init__(self, cfg: PMAConfig, layer_idx: int):
        super().__init__()
        self.norm_1 = nn.RMSNorm(cfg.n_embd)
        self.pma = PhaseModulatedAttention(
            cfg.n_embd, cfg.n_head, cfg.block_size, cfg.dropout, cfg.bias, layer_idx,
            coupling_init=cfg.coupling_init, coupling_mode=cfg.coupling_mode, kuramoto_steps=cfg.kuramoto_steps,
            kuramoto_dt=cfg.kuramoto_dt, integrator=cfg.integrator, lam_init=cfg.lam_init,
            lam_trainable=cfg.lam_trainable, tau_base_init=cfg.tau_base_init, tau_alpha_init=cfg.tau_alpha_init,
            tau_beta_init=cfg.tau_beta_init, phase_noise=cfg.phase_noise, freq_jitter=cfg.freq_jitter)
        self.norm_2 = nn.RMSNorm(cfg.n_embd)
        self.mlp = MLP(cfg.n_embd, cfg.dropout, cfg.bias)
        self.hook_resid_post = HookPoint()

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, **fields) -> torch.Tensor:
        inputs = LayerInputs(**fields)
        x = x + self.pma(self.norm_1(x), context, inputs=inputs)
        return self.hook_resid_post(x + self.mlp(self.norm_2(x)))


class PMAModel(PhaseLMModel):
    """Embedding, the SSM and PMA blocks and the final RMSNorm (``AutoModel``; ``PMAForCausalLM.model``).
    Hook point names (``hook_embed``, ``blocks.{L}...``) are paths inside this model."""

    config_class = PMAConfig
    _no_split_modules = ["SSMBlock", "PMABlock"]
    residual_suffixes = (".pma.proj.weight", ".mlp.proj.weight", ".ssm.out_proj.weight")

    def __init__(self, config: PMAConfig, **kwargs):
        super().__init__(config, **kwargs)
        if config.vocab_size is None:
            raise ValueError("vocab_size must be set (the trainer takes it from the tokenizer)")
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.hook_embed = HookPoint()
        self.blocks = nn.ModuleList([SSMBlock(config, i) if kind == "ssm" else PMABlock(config, i)
                                     for i, kind in enumerate(config.block_types())])
        self.norm_f = nn.RMSNorm(config.n_embd)
        name_hook_points(self)
        self.post_init()

    def embed(self, input_ids, inputs_embeds, inputs: LayerInputs) -> torch.Tensor:
        """hook_embed(drop(wte(ids))) ``[B, T, C]`` (``inputs_embeds`` in place of wte(ids)); no
        positional embedding (PMA's keys carry their learned phases φ_pos)."""
        return self.hook_embed(self.drop(self.wte(input_ids) if inputs_embeds is None else inputs_embeds))

    def run_block(self, block, x, context, inputs: LayerInputs):
        """A block gets the hidden state of the most recent SSM block (the embeddings before any) as
        the context of its coupling K = f(c)."""
        x = block(x, context, **inputs.as_kwargs())
        return x, (x if isinstance(block, SSMBlock) else context)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_f(x)


@dataclass
class PMAOutput(CausalLMOutputWithPast):
    """:class:`CausalLMOutputWithPast` plus ``metrics`` (with ``return_metrics=True``)."""

    metrics: dict | None = None


class LogitsAndMetrics(tuple):
    """``(logits, metrics)``, what ``model(ids, return_metrics=True)`` returns (the PMA seed's
    ``logits, metrics = model(input_ids, return_metrics=True)``); the fields of the full
    :class:`PMAOutput` (``.logits``, ``.metrics``, ``.loss``, ``.past_key_values``, ...) are attributes."""

    def __new__(cls, output: "PMAOutput"):
        pair = super().__new__(cls, (output.logits, output.metrics))
        pair.output = output
        return pair

    def __getattr__(self, name):
        return getattr(self.output, name)


class PMAForCausalLM(PhaseLMForCausalLM):
    """``model(ids).logits``; ``model(ids, targets).loss``; ``logits, metrics = model(ids, return_metrics=True)``.

    ``metrics``: ``R_mean`` (mean order parameter over PMA layers), per PMA layer (keyed by block
    index) ``R``, ``tau``, ``lam``, ``K`` and ``attention_entropy`` (nats), the mean
    ``next_token_entropy`` (nats) and that of the last position, and ``loss`` when targets are given.
    With ``return_metrics=True`` the result is a :class:`LogitsAndMetrics` pair (also readable as
    ``.logits`` / ``.metrics``); with ``return_dict=True`` a :class:`PMAOutput`, with
    ``return_dict=False`` its ``to_tuple()``. ``model.set_coupling_override(K)`` (the PMA seed's method
    form of :func:`phaselm.set_coupling_override`) is attached by ``import phaselm``, since the
    interventions sit above the models.
    """

    config_class = PMAConfig
    base_model_class = PMAModel
    _no_split_modules = ["SSMBlock", "PMABlock"]
    residual_suffixes = PMAModel.residual_suffixes
    _is_stateful = True  # SSM states and Kuramoto sums cannot be cropped: transformers refuses assisted decoding

    def pma_layers(self) -> dict[int, PhaseModulatedAttention]:
        """The PMA attention layers by block index (:meth:`phase_layers`)."""
        return self.phase_layers()

    def phase_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.phase_layers().values() for p in m.phase_parameters()]

    def hook_names(self) -> list[str]:
        return hook_names(self)

    def forward(self, input_ids: torch.Tensor | None = None, targets: torch.Tensor | None = None, *,
                return_metrics: bool = False, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values=None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                labels: torch.Tensor | None = None, logits_to_keep: int | torch.Tensor = 0,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, head_at_targets: bool = False, **kwargs):
        """:meth:`PhaseLMForCausalLM.forward`, plus ``return_metrics`` (class docstring; the metrics
        use the explicit PMA path, so they need a full forward without cache or padding)."""
        layers = self.phase_layers().values()
        for m in layers:
            m.explicit = return_metrics  # attention entropy needs the pattern
        try:
            out = super().forward(input_ids, targets, attention_mask=attention_mask, position_ids=position_ids,
                                  past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                                  labels=labels, logits_to_keep=logits_to_keep, output_attentions=output_attentions,
                                  output_hidden_states=output_hidden_states, return_dict=True,
                                  head_at_targets=head_at_targets, **kwargs)
        finally:
            for m in layers:
                m.explicit = False
        metrics = self._metrics(out.logits, out.loss) if return_metrics else None
        result = PMAOutput(loss=out.loss, logits=out.logits, past_key_values=out.past_key_values,
                           hidden_states=out.hidden_states, attentions=out.attentions, metrics=metrics)
        if return_dict is None and return_metrics:
            return LogitsAndMetrics(result)
        return result if (self.config.return_dict if return_dict is None else return_dict) else result.to_tuple()

    def _metrics(self, logits: torch.Tensor, loss: torch.Tensor | None) -> dict:
        ent = entropy(logits.detach())
        out: dict = {"next_token_entropy": float(ent.mean()), "next_token_entropy_last": float(ent[:, -1].mean())}
        layers = self.phase_layers()
        for key in ("R", "tau", "lam", "K", "attention_entropy"):
            out[key] = {i: float(m.last[key]) for i, m in layers.items() if key in m.last}
        out["R_mean"] = sum(out["R"].values()) / len(layers) if layers else float("nan")
        if loss is not None:
            out["loss"] = float(loss)
        return out


PhaseModulatedAttentionLM = PMAForCausalLM  # the PMA seed's name for the model
