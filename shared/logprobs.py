"""Per-token log-probabilities of sampled completions: ℓ(t) = log π(o_t | q, o_<t).

Every policy-gradient and preference loss in `algos/` starts from these numbers, for the policy
(with gradient), the old policy and the reference model (without). Three details matter:

- Logits are divided by the sampling temperature T before the softmax, so that the scores match
  the distribution the sampler drew from (GRPO pitfall 5).
- Positions follow the real tokens, not the padded columns: position_ids = cumsum(mask) - 1, as in
  `generate`, so a sequence gets the same log-probs however much left padding its batch needs (RoPE
  models are shift-invariant anyway; models with absolute position embeddings are not).
- The vocabulary is big (49k for SmolLM2, 150k for Qwen): the model returns logits only for the
  positions that predict completion tokens, and the log-softmax is done a chunk of rows at a time in
  float32, never for the whole [batch, length, vocab] tensor at once.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def token_logprobs(
    model,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> Tensor:
    """[N, C] log π(o_t | q, o_<t) of each completion token under logits / temperature; 0 where mask == 0.

    prompt_ids/prompt_mask [N, P] left-padded, completion_ids/completion_mask [N, C] right-padded (the
    layout of `shared.sampling.Rollout`). Differentiable; wrap in torch.no_grad() for old/ref log-probs.
    """
    C = completion_ids.shape[1]
    if C == 0:
        return torch.zeros(completion_ids.shape, device=completion_ids.device)
    # The logits at position p predict token p + 1, so completion token t is predicted by position
    # P - 1 + t, and the last completion token predicts nothing we need: drop it from the input and keep
    # only the last C positions' logits ([N, C, V], contiguous).
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)[:, :-1]
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)[:, :-1].long()
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=C,
        use_cache=False,
    ).logits
    logp = selective_log_softmax(logits, completion_ids, temperature=temperature, chunk_size=chunk_size)
    return logp.masked_fill(completion_mask == 0, 0.0)


def selective_log_softmax(logits: Tensor, index: Tensor, temperature: float = 1.0, chunk_size: int = 1024) -> Tensor:
    """log_softmax(logits / temperature)[..., index], computed as logit[index] - logsumexp(logits).

    logits [..., V] in any dtype, index [...] → float32 [...] (float64 for float64 logits). Rows (all leading
    dims flattened) are processed chunk_size at a time, each upcast to float32 only while it is being used. With autograd
    on, each chunk is checkpointed: the backward pass recomputes its float32 copy instead of autograd
    keeping one per chunk alive, so a float32 copy never exists for more than one chunk at a time.
    """
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_index = index.reshape(-1, 1)
    track_grad = torch.is_grad_enabled() and logits.requires_grad
    pieces = []
    for start in range(0, flat_logits.shape[0], chunk_size):
        rows, idx = flat_logits[start : start + chunk_size], flat_index[start : start + chunk_size]
        if track_grad:
            pieces.append(checkpoint(_chunk_logprobs, rows, idx, temperature, use_reentrant=False))
        else:
            pieces.append(_chunk_logprobs(rows, idx, temperature))
    if not pieces:  # no rows at all (e.g. an empty completion batch)
        return logits.new_zeros(index.shape, dtype=torch.promote_types(logits.dtype, torch.float32))
    return torch.cat(pieces).reshape(index.shape)


def _chunk_logprobs(rows: Tensor, idx: Tensor, temperature: float) -> Tensor:
    rows = rows.to(torch.promote_types(rows.dtype, torch.float32)) / temperature  # bf16 -> fp32, fp64 stays
    return rows.gather(-1, idx).squeeze(-1) - rows.logsumexp(dim=-1)
