"""Teacher-forced scoring of continuations under a causal LM, and text features for MAUVE.

Perplexity of a continuation c_1..c_n after a prompt x: PPL = exp( −(1/n) Σ_t log p(c_t | x, c_<t) ),
the per-generation perplexity of the generated tokens (the published definition).
"""

from __future__ import annotations

import math

import torch


def _right_padded(seqs: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def continuation_nll(model, prompt_ids: list[list[int]], continuation_ids: list[list[int]], pad_id: int = 0,
                     batch_size: int = 8) -> list[tuple[float, int]]:
    """``[(sum of NLL in nats, number of tokens)]`` of each continuation given its prompt."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(prompt_ids), batch_size):
        ps, cs = prompt_ids[start: start + batch_size], continuation_ids[start: start + batch_size]
        ids, mask = _right_padded([p + c for p, c in zip(ps, cs)], pad_id, device)
        logp = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)
        token_logp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # [B, T-1]: log p(ids[t+1] | ids[..t])
        for b, (p, c) in enumerate(zip(ps, cs)):
            if not c:
                out.append((float("nan"), 0))
                continue
            span = token_logp[b, len(p) - 1: len(p) - 1 + len(c)]
            out.append((float(-span.sum()), len(c)))
    return out


def perplexities(nll: list[tuple[float, int]]) -> list[float]:
    return [math.exp(s / n) if n else float("nan") for s, n in nll]


def text_perplexities(model, tokenizer, prompts: list[str], continuations: list[str], batch_size: int = 8) -> list[float]:
    """Per-continuation perplexity after re-tokenising text with ``tokenizer`` (for a judge model
    whose tokenizer differs from the generator's); the continuation is tokenised on its own."""
    p_ids = [tokenizer(p)["input_ids"] for p in prompts]
    c_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in continuations]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return perplexities(continuation_nll(model, p_ids, c_ids, pad, batch_size))


@torch.no_grad()
def last_token_features(model, tokenizer, texts: list[str], batch_size: int = 8, max_tokens: int = 256) -> torch.Tensor:
    """``[N, hidden]``: the final-layer hidden state at the last token of each text (MAUVE features)."""
    device = next(model.parameters()).device
    feats = []
    for start in range(0, len(texts), batch_size):
        seqs = [tokenizer(t)["input_ids"][:max_tokens] or [tokenizer.eos_token_id] for t in texts[start: start + batch_size]]
        ids, mask = _right_padded(seqs, tokenizer.pad_token_id or 0, device)
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        last = mask.sum(-1) - 1
        feats.append(hidden[torch.arange(len(seqs), device=device), last].float().cpu())
    return torch.cat(feats)
