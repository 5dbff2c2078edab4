"""Metrics of phase dynamics in a language model: entropies, the order parameter, Fisher information.

* Entropy H(p) = −Σ_v p_v log p_v (nats) of next-token distributions (``entropy(logits)``) or of
  attention rows (``entropy(probs=pattern)``; log(i+1) is uniform attention): :func:`phaselm.nn.functional.entropy`.
* Order parameter R = |mean e^{iθ}| (:func:`phaselm.nn.oscillators.order_parameter`; circular only).
* Fisher information of the next-token distribution with respect to the phase parameters θ_φ
  (:meth:`phase_parameters` of a PMA model: W_φ, ω, φ_pos, the coupling map, λ):

      F = E_x E_{y ~ p(·|x)} [ ∇_{θ_φ} log p(y|x) ∇_{θ_φ} log p(y|x)ᵀ ],

  reported as its trace, tr F = E ‖∇_{θ_φ} log p(y|x)‖². :func:`fisher_trace` estimates it at the
  last position of each sequence, with y drawn from the model (``targets=None``; the true Fisher,
  Monte Carlo over ``samples`` draws per sequence) or with the observed next tokens (the empirical
  Fisher). Large tr F: the prediction is sensitive to the phases; 0: the phases do not matter.
"""

from __future__ import annotations

import torch

from phaselm.nn.functional import entropy
from phaselm.nn.oscillators import order_parameter

__all__ = ["entropy", "order_parameter", "fisher_trace"]


def fisher_trace(model, input_ids: torch.Tensor, params=None, targets: torch.Tensor | None = None,
                 samples: int = 4, generator: torch.Generator | None = None) -> float:
    """tr F of the next-token distribution at the last position w.r.t. ``params`` (default: the
    model's ``phase_parameters()``), averaged over the ``[B, T]`` batch; see the module docstring.
    ``targets [B]``: the observed next tokens (empirical Fisher) instead of ``samples`` model draws."""
    params = list(model.phase_parameters() if params is None else params)
    if not params:
        raise ValueError("fisher_trace: no parameters given and the model has no phase parameters")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for b in range(input_ids.shape[0]):
            logits = model(input_ids[b: b + 1]).logits
            logp = torch.log_softmax(logits[0, -1].float(), dim=-1)
            if targets is not None:
                ys = targets[b: b + 1].tolist()
            else:
                ys = torch.multinomial(logp.exp().detach(), samples, replacement=True, generator=generator).tolist()
            for j, y in enumerate(ys):
                grads = torch.autograd.grad(logp[y], params, retain_graph=j < len(ys) - 1, allow_unused=True)
                total += sum(float((g.float() ** 2).sum()) for g in grads if g is not None)
                count += 1
    finally:
        model.train(was_training)
    return total / count
