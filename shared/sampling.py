"""Sampling completions: prompts in, a padded batch of token ids and masks out.

The interface is deliberately narrow (`generate` returns a `Rollout`) so that a faster backend
(vLLM) can replace the Hugging Face one without touching the algorithms. A prompt is either
chat-templated text or a list of token ids; the second form is how a later turn of a conversation
conditions on the exact tokens an earlier turn sampled (`continue_chats`), with no decode/re-encode
round trip in between.

The sampler draws from the plain softmax(logits / T) (optionally nucleus-truncated with top_p):
no top-k, no repetition penalty, whatever the checkpoint's generation_config says. That is the
distribution `shared.logprobs.token_logprobs(..., temperature=T)` scores, so ratios π_θ / π_old
start at exactly 1 on-policy (GRPO pitfalls 5 and 7). With top_p < 1 the sampler draws from a
truncated distribution that the log-probs do not model; the papers we follow use top_p = 1.

The n samples of a prompt share its prefill: each distinct prompt but its last token runs once, its
key/value cache is repeated n times, and `model.generate` continues from that cache (processing only
the last prompt token of each row, then sampling as usual). The sampler sees the same logits up to
float32 rounding and draws from the torch RNG in the same order, so a seed gives the same tokens.

Every token `generate` returns (up to and including EOS) is added to this process's count of
generated tokens, except inside `uncounted()` (held-out evaluation). The count is the compute budget
`--token-budget` holds a training run to (`shared.run.Run.budget_left`), and what
scripts/benchmark.py plots accuracy against.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import BoolTensor, LongTensor, Tensor
from transformers import GenerationConfig

from shared.logprobs import CACHE, prefill, prompt_groups


# ---------------------------------------------------------------------------------------- the token count
_COUNT = {"tokens": 0, "paused": 0}


def generated_tokens() -> int:
    """Tokens this process has generated for training since the count was last set."""
    return _COUNT["tokens"]


def set_generated_tokens(n: int) -> None:
    """Start the count at n (0 for a new run, the checkpoint's count for a resumed one)."""
    _COUNT["tokens"] = int(n)


def count_generated(n: int) -> None:
    """Add n tokens to the count (outside `uncounted()`): for a sampler other than `generate`, or for the
    target tokens a supervised baseline trains on."""
    if not _COUNT["paused"]:
        _COUNT["tokens"] += int(n)


@contextmanager
def uncounted():
    """A block whose generations do not count toward the budget (held-out evaluation)."""
    _COUNT["paused"] += 1
    try:
        yield
    finally:
        _COUNT["paused"] -= 1


@dataclass
class Rollout:
    """N = len(prompts) * n sampled completions. Rows [i*n, (i+1)*n) are the n samples of prompt i."""

    prompt_ids: LongTensor  # [N, P] prompt tokens, left-padded with pad_token_id
    prompt_mask: LongTensor  # [N, P] 1 on prompt tokens, 0 on padding
    completion_ids: LongTensor  # [N, C] generated tokens, right-padded with pad_token_id
    completion_mask: Tensor  # [N, C] float: 1 up to and including the first EOS, 0 after it and on padding
    texts: list[str]  # the completions decoded (masked tokens only, special tokens skipped)
    truncated: BoolTensor  # [N] True where no EOS was produced within max_new_tokens
    pad_token_id: int = 0  # the id in padded positions (needed to re-pad in `cat_rollouts`)

    def __len__(self) -> int:
        return len(self.texts)

    def to(self, device: torch.device | str) -> Rollout:
        """The same rollout with its tensors on `device`."""
        tensors = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "truncated")
        return dataclasses.replace(self, **{name: getattr(self, name).to(device) for name in tensors})


def eos_token_ids(model, tokenizer) -> list[int]:
    """The tokens that end a completion: the tokenizer's EOS plus any the model's generation_config lists
    (e.g. a base tokenizer's <|endoftext|> next to the chat model's <|im_end|>)."""
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    extra = [extra] if isinstance(extra, int) else list(extra or [])
    return sorted({i for i in [tokenizer.eos_token_id, *extra] if i is not None})


def sampling_config(
    eos_ids: list[int], pad_id: int, max_new_tokens: int, temperature: float, top_p: float, greedy: bool
) -> GenerationConfig:
    """An explicit GenerationConfig for plain (temperature, top_p) sampling or greedy decoding.

    `generate` fills every field left unset from the model's own generation_config, and from global
    defaults after that (top_k=50!), so the processors that checkpoints commonly switch on are set to
    their neutral values here. (`load_model` also resets the model's generation_config.)
    """
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        min_new_tokens=0,
        do_sample=not greedy,
    )
    if not greedy:  # the warpers below only exist in sampling mode
        config.update(temperature=temperature, top_p=top_p, top_k=0, typical_p=1.0)
    return config


@contextmanager
def neutral_generation_config(model):
    """Within the block, `model.generation_config` holds only bos/eos/pad ids: transformers fills the
    fields a passed GenerationConfig leaves unset (min_p, epsilon_cutoff, ...) from the model's own,
    so a checkpoint's sampling defaults would otherwise leak into `generate`."""
    saved = model.generation_config
    model.generation_config = GenerationConfig(
        bos_token_id=saved.bos_token_id, eos_token_id=saved.eos_token_id, pad_token_id=saved.pad_token_id)
    try:
        yield
    finally:
        model.generation_config = saved


def encode_prompts(tokenizer, prompts: list[str] | list[list[int]]) -> tuple[LongTensor, LongTensor]:
    """Left-padded (ids, mask) for prompts given as chat-templated text or as lists of token ids.

    Text is tokenized without special tokens of its own (the chat template already wrote any BOS)."""
    if prompts and not isinstance(prompts[0], str):
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            if len(p):
                ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
                mask[i, width - len(p):] = 1
        return ids, mask
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    return enc.input_ids, enc.attention_mask


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str] | list[list[int]],
    n: int = 1,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    batch_size: int | None = None,
    share_prompt: bool = True,
) -> Rollout:
    """Sample n completions for each prompt (chat-templated text, or token ids) with `model.generate`.

    batch_size: rows (prompt copies) per `generate` call; None = all N rows at once.
    share_prompt: prefill each prompt once for the adjacent rows that repeat it (see the module
    docstring); False: every row prefills its own copy.
    Uses the global torch RNG (seed it for reproducible samples).
    """
    gen_model = getattr(model, "module", model)  # unwrap DDP / accelerate; peft models generate as is
    pad_id = tokenizer.pad_token_id
    eos_ids = eos_token_ids(gen_model, tokenizer)
    config = sampling_config(eos_ids, pad_id, max_new_tokens, temperature, top_p, greedy)

    # Tokenize every prompt once (left padding: all prompts end at the same column), then repeat
    # each n times so that the n samples of a prompt sit in adjacent rows.
    ids, mask = encode_prompts(tokenizer, prompts)
    device = gen_model.device
    prompt_ids = ids.repeat_interleave(n, dim=0).to(device)
    prompt_mask = mask.repeat_interleave(n, dim=0).to(device)

    was_training = gen_model.training
    gen_model.eval()
    hf_model = gen_model.get_base_model() if hasattr(gen_model, "get_base_model") else gen_model  # under peft
    try:
        chunks = []
        step = batch_size or len(prompt_ids)
        with neutral_generation_config(hf_model):
            for start in range(0, len(prompt_ids), step):
                ids, mask = prompt_ids[start : start + step], prompt_mask[start : start + step]
                cache = shared_prefill(gen_model, ids, mask) if share_prompt else {}
                out = gen_model.generate(input_ids=ids, attention_mask=mask, generation_config=config, **cache)
                chunks.append(out[:, ids.shape[1] :])  # keep only the new tokens
    finally:
        gen_model.train(was_training)

    # Chunks stop at different lengths (when all their rows hit EOS); pad them to a common width.
    width = max(c.shape[1] for c in chunks)
    completion_ids = torch.cat([F.pad(c, (0, width - c.shape[1]), value=pad_id) for c in chunks])

    # Mask: 1 up to and including the first EOS. Rows without EOS ran out of tokens (truncated).
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=device))
    truncated = ~is_eos.any(dim=1)
    first_eos = torch.where(truncated, width, is_eos.int().argmax(dim=1))  # argmax = first True
    positions = torch.arange(width, device=device)
    completion_mask = (positions[None, :] <= first_eos[:, None]).float()
    completion_ids = completion_ids.masked_fill(completion_mask == 0, pad_id)

    count_generated(completion_mask.sum().item())
    texts = tokenizer.batch_decode(
        [row[m.bool()] for row, m in zip(completion_ids, completion_mask)], skip_special_tokens=True
    )
    return Rollout(prompt_ids, prompt_mask, completion_ids, completion_mask, texts, truncated, pad_id)


def shared_prefill(model, ids: LongTensor, mask: LongTensor) -> dict:
    """{cache keyword: the key/value cache of every row's prompt but its last token}, computed once per
    run of identical adjacent prompts, for `model.generate(input_ids=ids, ..., **this)`; {} when no
    two adjacent rows share a prompt (or the prompts are a single column wide)."""
    groups = prompt_groups(ids, mask) if ids.shape[1] > 1 else None
    if groups is None:
        return {}
    _, cache = prefill(model, ids[:, :-1], mask[:, :-1], groups)
    return {CACHE: cache}


def cat_rollouts(rollouts: list[Rollout], rows: list[list[int]] | None = None) -> Rollout:
    """One Rollout from rows[k] of rollouts[k] (all rows where rows is None), in that order.

    Prompts are re-padded on the left and completions on the right to the widest of the inputs, then
    columns that are padding in every selected row are trimmed away.
    """
    rows = rows if rows is not None else [range(len(r)) for r in rollouts]
    pad = rollouts[0].pad_token_id
    P = max(r.prompt_ids.shape[1] for r in rollouts)
    C = max(r.completion_ids.shape[1] for r in rollouts)
    parts = []
    for r, idx in zip(rollouts, rows):
        idx = torch.as_tensor(list(idx), dtype=torch.long, device=r.prompt_ids.device)
        left, right = (P - r.prompt_ids.shape[1], 0), (0, C - r.completion_ids.shape[1])
        parts.append((
            F.pad(r.prompt_ids[idx], left, value=pad),
            F.pad(r.prompt_mask[idx], left, value=0),
            F.pad(r.completion_ids[idx], right, value=pad),
            F.pad(r.completion_mask[idx], right, value=0.0),
            r.truncated[idx],
        ))
    prompt_ids, prompt_mask, completion_ids, completion_mask, truncated = (torch.cat(t) for t in zip(*parts))
    texts = [r.texts[i] for r, idx in zip(rollouts, rows) for i in idx]
    # Keep the widths actually used: the longest prompt (right-aligned), the longest completion (left-aligned).
    p = slice(P - int(prompt_mask.sum(1).max()) if texts else P, None)
    c = slice(0, int(completion_mask.sum(1).max()) if texts else 0)
    return Rollout(
        prompt_ids[:, p], prompt_mask[:, p], completion_ids[:, c], completion_mask[:, c], texts, truncated, pad
    )


# ---------------------------------------------------------------------------------------- multi-turn
def chat_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a chat ([{"role": ..., "content": ...}, ...]) rendered by the tokenizer's chat
    template, ending where the assistant starts its next turn. A prompt for `generate`."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


def turn_separator(tokenizer, user: str) -> list[int]:
    """The tokens the chat template writes after an assistant turn's end-of-turn token, for a new user
    message `user`, up to where the assistant starts again ("\\n<|im_start|>user\\n{user}<|im_end|>\\n
    <|im_start|>assistant\\n" in ChatML). Found by rendering a chat with a placeholder answer."""
    marker = "\x00ANSWER\x00"
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}, {"role": "user", "content": user}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    after = text[text.index(marker) + len(marker):]
    if not after.startswith(tokenizer.eos_token):
        raise ValueError("the chat template does not end an assistant turn with the tokenizer's EOS token")
    return tokenizer(after[len(tokenizer.eos_token):], add_special_tokens=False).input_ids


def next_turn_prompts(tokenizer, ro: Rollout, user_messages: list[str]) -> list[list[int]]:
    """Prompts (token ids) for the next turn of each row of `ro`: the row's prompt and sampled answer,
    token for token as they were generated (no decode/re-encode), the end-of-turn token (added when
    the answer was truncated before it), then `user_messages[i]` in the chat template's format.
    `generate(model, tokenizer, next_turn_prompts(...), n=...)` then samples the next turn, and its
    Rollout's completion mask covers the new turn only."""
    if len(user_messages) != len(ro):
        raise ValueError(f"{len(user_messages)} user messages for {len(ro)} rows")
    separators: dict[str, list[int]] = {}
    out = []
    for i, message in enumerate(user_messages):
        if message not in separators:
            separators[message] = turn_separator(tokenizer, message)
        prompt = ro.prompt_ids[i][ro.prompt_mask[i].bool()].tolist()
        answer = ro.completion_ids[i][ro.completion_mask[i].bool()].tolist()
        end = [tokenizer.eos_token_id] if bool(ro.truncated[i]) else []
        out.append(prompt + answer + end + separators[message])
    return out
