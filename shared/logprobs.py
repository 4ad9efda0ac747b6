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

Group methods (GRPO, NFT, ...) score G answers to the same prompt, and the prompt is usually the
longer part (≈ 46 chat-template tokens against ≤ 24 answer tokens in the default GRPO run). When
adjacent rows share their prompt (the `Rollout` layout), the prompt runs once per group with
`use_cache=True`, its key/value cache is repeated for the group's rows, and the answers run against
it. This is exact, not an approximation: in a causal model the prompt's activations do not depend on
what follows them, so the G copies the plain path computes are identical; and the repeat is an
indexing op whose backward sums the G answers' gradients with respect to the prompt's keys and
values, which is what the plain path's G identical copies add to the weights' gradients one by one.
Results agree with the plain path up to float32 summation order (tests/test_shared_logprobs.py,
also under DDP and LoRA); `share_prompt=False` forces the plain path, and so does gradient
checkpointing, under which transformers drops the cache.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import CausalLMOutputWithPast

# The keyword (and output field) of a model's key/value cache: `cache` in recent transformers,
# `past_key_values` before it was renamed.
CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def token_logprobs(
    model,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    share_prompt: bool = True,
) -> Tensor:
    """[N, C] log π(o_t | q, o_<t) of each completion token under logits / temperature; 0 where mask == 0.

    prompt_ids/prompt_mask [N, P] left-padded, completion_ids/completion_mask [N, C] right-padded (the
    layout of `shared.sampling.Rollout`). Differentiable; wrap in torch.no_grad() for old/ref log-probs.
    share_prompt: run each prompt once for the adjacent rows that share it (`prompt_groups`; faster
    when whole groups are in one call, the same numbers however the rows are split); False: every row
    on its own.
    """
    C = completion_ids.shape[1]
    if C == 0:
        return torch.zeros(completion_ids.shape, device=completion_ids.device)
    groups = prompt_groups(prompt_ids, prompt_mask) if share_prompt and keeps_cache(model) else None
    if groups is not None:
        logp = _shared_prompt_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                                       groups, temperature, chunk_size)
        return logp.masked_fill(completion_mask == 0, 0.0)
    # The logits at position p predict token p + 1, so completion token t is predicted by position
    # P - 1 + t, and the last completion token predicts nothing we need: drop it from the input and keep
    # only the last C positions' logits ([N, C, V], contiguous).
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)[:, :-1]
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)[:, :-1].long()
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions(attention_mask),
        logits_to_keep=C,
        use_cache=False,
    ).logits
    logp = selective_log_softmax(logits, completion_ids, temperature=temperature, chunk_size=chunk_size)
    return logp.masked_fill(completion_mask == 0, 0.0)


def positions(attention_mask: Tensor) -> Tensor:
    """position_ids that count real tokens only (padding gets 0): cumsum(mask) - 1, as `generate` does."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def keeps_cache(model) -> bool:
    """False where the model would drop the key/value cache: gradient checkpointing (transformers turns
    the cache off in training mode with autograd on, to recompute layers in the backward pass)."""
    inner = getattr(model, "module", model)  # DDP / accelerate
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # peft
    return not (getattr(inner, "is_gradient_checkpointing", False) and inner.training and torch.is_grad_enabled())


def prompt_groups(prompt_ids: Tensor, prompt_mask: Tensor) -> tuple[Tensor, Tensor] | None:
    """(first, group) for rows that come in runs of identical adjacent prompts: `first` [K] the first row
    of each run, `group` [N] the run of each row (0..K-1). None when sharing cannot help or apply: no two
    adjacent rows share a prompt, or some row's prompt does not end in the last column (an empty
    prompt, or padding on the right)."""
    if len(prompt_ids) < 2 or prompt_ids.shape[1] == 0 or not prompt_mask[:, -1].bool().all():
        return None
    real = prompt_mask.bool()
    same = (real[1:] == real[:-1]).all(dim=1) & ((prompt_ids[1:] == prompt_ids[:-1]) | ~real[1:]).all(dim=1)
    if not same.any():
        return None
    starts = torch.cat([same.new_ones(1), ~same])
    return starts.nonzero().squeeze(1), starts.long().cumsum(0) - 1


def prefill(model, ids: Tensor, mask: Tensor, groups: tuple[Tensor, Tensor]):
    """Run the distinct prompts ids[first] once with `use_cache=True` and repeat their key/value cache for
    every row (row n gets prompt group[n]). Returns (logits of each distinct prompt's last position
    [K, 1, V], the cache with N rows). Differentiable: the backward of the repeat sums the rows'
    gradients into their prompt's activations."""
    first, group = groups
    mask = mask[first].long()
    out = model(input_ids=ids[first], attention_mask=mask, position_ids=positions(mask), use_cache=True,
                logits_to_keep=1)
    cache = getattr(out, CACHE, None)
    if cache is None or cache.get_seq_length() != ids.shape[1]:
        raise RuntimeError("the model returned no key/value cache for the prompts; pass share_prompt=False")
    cache.batch_select_indices(group)  # keys/values [K, ...] -> [N, ...]: row n holds its prompt's
    return out.logits, cache


def _shared_prompt_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, groups,
                            temperature, chunk_size) -> Tensor:
    """`token_logprobs` with each distinct prompt run once: the prompt's last position predicts answer
    token 0, and answer tokens 0..C-2, run against the prompt's cache, predict tokens 1..C-1."""
    P, C = prompt_ids.shape[1], completion_ids.shape[1]
    last_logits, cache = prefill(model, prompt_ids, prompt_mask, groups)
    logp = [selective_log_softmax(last_logits[groups[1]], completion_ids[:, :1], temperature, chunk_size)]
    if C > 1:
        attention_mask = torch.cat([prompt_mask, completion_mask[:, :-1]], dim=1).long()  # cache + new tokens
        logits = model(
            input_ids=completion_ids[:, :-1],
            attention_mask=attention_mask,
            position_ids=positions(attention_mask)[:, P:],  # the positions the plain path gives these tokens
            use_cache=True,
            **{CACHE: cache},
        ).logits
        logp.append(selective_log_softmax(logits, completion_ids[:, 1:], temperature, chunk_size))
    return torch.cat(logp, dim=1)


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
