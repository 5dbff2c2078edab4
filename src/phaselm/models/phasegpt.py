"""PhaseGPT: the GPT of :mod:`phaselm.models.gpt` with Kuramoto phase-coupled attention
(:class:`phaselm.nn.phase_coupled.PhaseCoupledAttention`) in the layers ``phase_layers`` (0-based) and
standard causal attention elsewhere.

    config = PhaseGPTConfig(vocab_size=65, n_layer=6, n_head=4, n_embd=128, block_size=128,
                            phase_layers=[4], n_osc=32, coupling_init=1.0)
    model = PhaseGPTForCausalLM(config)
    logits = model(ids).logits
    theta = model.get_phases()        # [B, H, T, N]: θ of the last phase layer in that forward

In the cache, a phase layer is a "hybrid" layer: keys (with the 2N coherence features) and values,
plus the running sums of e^{iθ} of every Kuramoto evaluation as its recurrent state
``[B, E, H, N, 2]`` (E = steps, ×4 for RK4), so decoding a token costs O(N) for its oscillators.
That state cannot be cut back to an earlier length, so the model is stateful for ``generate``
(assisted decoding and prompt lookup are refused before generating, by transformers).
"""


import torch
from huggingface_hub.dataclasses import strict
from torch import nn

from phaselm.models.base import CoherenceRegulariser, KuramotoSettings
from phaselm.models.gpt import GPTConfig, GPTForCausalLM, GPTModel
from phaselm.nn.phase_coupled import PhaseCoupledAttention


@strict
class PhaseGPTConfig(GPTConfig, KuramotoSettings, CoherenceRegulariser):
    """GPT fields, plus: ``phase_layers`` (0-based, at least one; default: the last layer),
    ``n_osc`` oscillators per head, ``coherence_init`` β₀ of the coherence bias (learned unless
    ``coherence_trainable`` is False), the Kuramoto settings (K₀ = ``coupling_init``,
    ``kuramoto_steps`` of ``kuramoto_dt`` with ``integrator``, ``phase_noise``, ``freq_jitter``)
    and the coherence regulariser."""

    model_type = "phaselm_phasegpt"

    phase_layers: list[int] | None = None
    n_osc: int = 32
    coherence_init: float | int = 0.5
    coherence_trainable: bool = True  # False: β stays at coherence_init (0 removes the coherence bias)

    def __post_init__(self, **kwargs):
        if self.phase_layers is None and isinstance(self.n_layer, int):
            self.phase_layers = [self.n_layer - 1]
        super().__post_init__(**kwargs)

    def validate_phase_layers(self):
        if not self.phase_layers:
            raise ValueError("phase_layers is empty; PhaseGPT needs at least one phase layer (use the GPT "
                             "baseline for none)")
        if bad := sorted(i for i in self.phase_layers if not 0 <= i < self.n_layer):
            raise ValueError(f"phase_layers {bad} are outside 0..{self.n_layer - 1} (n_layer={self.n_layer})")
        if self.n_osc < 1:
            raise ValueError(f"n_osc must be >= 1, got {self.n_osc}")

    def cache_layer_types(self) -> list[str] | None:
        """Cache layer kinds: "hybrid" (KV + Kuramoto state, + the conv state with ``short_conv``)
        for phase layers, and for every layer with ``short_conv`` (None while invalid)."""
        if not isinstance(self.n_layer, int) or not isinstance(self.phase_layers, list):
            return None
        return ["hybrid" if i in self.phase_layers or self.short_conv else "full_attention" for i in range(self.n_layer)]


class PhaseGPTModel(GPTModel):
    """:class:`GPTModel` with phase-coupled attention in ``config.phase_layers``."""

    config_class = PhaseGPTConfig

    def make_attention(self, layer_idx: int) -> nn.Module:
        c = self.config
        if layer_idx not in c.phase_layers:
            return super().make_attention(layer_idx)
        return PhaseCoupledAttention(
            c.n_embd, c.n_head, c.dropout, c.bias, layer_idx, n_osc=c.n_osc, coupling_init=c.coupling_init,
            kuramoto_steps=c.kuramoto_steps, kuramoto_dt=c.kuramoto_dt, integrator=c.integrator,
            coherence_init=c.coherence_init, coherence_trainable=c.coherence_trainable,
            phase_noise=c.phase_noise, freq_jitter=c.freq_jitter)


class PhaseGPTForCausalLM(GPTForCausalLM):
    """A GPT with phase-coupled attention in ``config.phase_layers`` (see the module docstring)."""

    config_class = PhaseGPTConfig
    base_model_class = PhaseGPTModel
    _is_stateful = True  # the Kuramoto sums cannot be cropped: transformers refuses assisted decoding

    def get_phases(self, layer: int | None = None) -> torch.Tensor:
        """θ ``[B, H, T, N]`` (batch, heads, seq_len, oscillators) of phase layer ``layer`` (a block
        index; default: the last phase layer) in the last forward, after the Kuramoto steps and with
        gradients (so a coherence penalty on it trains the phases)."""
        layers = self.phase_layers()
        if layer is None:
            layer = max(layers)
        if layer not in layers:
            raise ValueError(f"layer {layer} is not a phase layer; the phase layers are {sorted(layers)}")
        theta = layers[layer].last_phases
        if theta is None:
            raise ValueError("no phases yet: run a forward pass first (model(ids)), then call get_phases()")
        return theta
