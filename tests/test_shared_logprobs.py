"""shared/logprobs.py: parity with a plain full log_softmax, padding invariance, gradients, chunking,
agreement with the sampler (the distribution generate() draws from is the one we score), and the
shared-prompt path (each prompt run once per group) against the plain per-row path."""

import copy

import pytest
import torch
import torch.nn.functional as F

from shared.logprobs import prompt_groups, selective_log_softmax, token_logprobs
from shared.models import chat_prompt, load_model
from shared.sampling import cat_rollouts, eos_token_ids, generate, sampling_config


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", device="cpu", log=lambda *a: None)


@pytest.fixture(scope="module")
def rollout(tiny):
    model, tok = tiny
    prompts = [chat_prompt(tok, q) for q in ("What is 2+2?", "Hi", "A longer question, with words?")]
    torch.manual_seed(0)
    return generate(model, tok, prompts, n=4, max_new_tokens=24, temperature=0.7)


def reference_logprobs(model, r, temperature):
    """The obvious implementation: full logits, full float32 log_softmax, gather, mask."""
    ids = torch.cat([r.prompt_ids, r.completion_ids], dim=1)
    mask = torch.cat([r.prompt_mask, r.completion_mask], dim=1).long()
    logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
    logits = logits[:, r.prompt_ids.shape[1] - 1 : -1].float() / temperature
    return F.log_softmax(logits, dim=-1).gather(-1, r.completion_ids[..., None]).squeeze(-1) * r.completion_mask


def logprobs(model, r, temperature=1.0, **kwargs):
    return token_logprobs(
        model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask, temperature=temperature, **kwargs
    )


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_full_log_softmax(tiny, rollout, temperature):
    model, _ = tiny
    with torch.no_grad():
        got = logprobs(model, rollout, temperature)
        want = reference_logprobs(model, rollout, temperature)
    assert got.shape == rollout.completion_ids.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (got[rollout.completion_mask == 0] == 0).all() and (got[rollout.completion_mask == 1] < 0).all()


def test_invariant_to_padding(tiny, rollout):
    """A sequence's log-probs depend on its tokens only: not on extra left padding of the prompt, extra
    right padding of the completion, or on the other rows of the batch."""
    model, tok = tiny
    pad = tok.pad_token_id
    with torch.no_grad():
        batch = logprobs(model, rollout)
        for i in (0, 4, 8):  # one row per prompt (each has a different amount of left padding)
            p_ids, p_mask = rollout.prompt_ids[i : i + 1], rollout.prompt_mask[i : i + 1]
            c_ids, c_mask = rollout.completion_ids[i : i + 1], rollout.completion_mask[i : i + 1]
            keep = p_mask[0].bool()
            alone = token_logprobs(model, p_ids[:, keep], p_mask[:, keep], c_ids, c_mask)  # no padding at all
            padded = token_logprobs(
                model,
                F.pad(p_ids, (5, 0), value=pad),
                F.pad(p_mask, (5, 0), value=0),
                F.pad(c_ids, (0, 7), value=pad),
                F.pad(c_mask, (0, 7), value=0.0),
            )
            torch.testing.assert_close(alone, batch[i : i + 1], rtol=0, atol=1e-5)
            torch.testing.assert_close(padded[:, : c_ids.shape[1]], alone, rtol=0, atol=1e-5)
            assert (padded[:, c_ids.shape[1] :] == 0).all()


@pytest.mark.parametrize("share_prompt", [False, True])
def test_positions_count_real_tokens_only(tiny, rollout, share_prompt):
    """(RoPE is shift-invariant, so for Llama the test above cannot see positions; models with absolute
    position embeddings can. The first real token must sit at position 0 whatever the padding, and with
    a shared prompt the answer tokens continue from the prompt's last position.)"""
    model, _ = tiny
    seen = []
    hook = model.model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs), with_kwargs=True)
    try:
        with torch.no_grad():
            logprobs(model, rollout, share_prompt=share_prompt)
    finally:
        hook.remove()
    mask = torch.cat([rollout.prompt_mask, rollout.completion_mask], dim=1)
    if share_prompt:  # one pass over the 3 distinct prompts, one over the 12 answers against their cache
        assert [len(k["input_ids"]) for k in seen] == [3, 12]
        P = rollout.prompt_ids.shape[1]
        group = torch.arange(12) // 4
        position_ids = torch.cat([seen[0]["position_ids"][group], seen[1]["position_ids"]], dim=1)
        assert position_ids.shape[1] == mask.shape[1] - 1 and seen[1]["position_ids"].shape[1] == mask.shape[1] - 1 - P
    else:
        assert len(seen) == 1
        position_ids = seen[0]["position_ids"]
    for positions, row_mask in zip(position_ids, mask):  # (the last token is never fed)
        real = positions[row_mask[: len(positions)].bool()]
        assert real.tolist() == list(range(len(real)))


def test_gradient_flows_and_matches_reference(rollout):
    model, _ = load_model("tiny", device="cpu", log=lambda *a: None)
    weights = torch.randn(rollout.completion_ids.shape, generator=torch.Generator().manual_seed(0))

    (logprobs(model, rollout, 0.7, chunk_size=16) * weights).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    (reference_logprobs(model, rollout, 0.7) * weights).sum().backward()

    assert all(g.abs().sum() > 0 for g in got.values()), "every parameter should get a gradient"
    for name, p in model.named_parameters():  # equal up to float32 summation order
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-6 * p.grad.abs().max().item(), msg=name)


def test_chunk_size_does_not_change_the_result(tiny, rollout):
    model, _ = tiny
    with torch.no_grad():
        results = [logprobs(model, rollout, 0.7, chunk_size=cs) for cs in (1, 7, 64, 100_000)]
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selective_log_softmax_matches_gather(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 1000, generator=g) * 4).to(dtype)
    index = torch.randint(0, 1000, (3, 5), generator=g)
    for temperature in (1.0, 0.3):
        want = F.log_softmax(logits.float() / temperature, dim=-1).gather(-1, index[..., None]).squeeze(-1)
        for chunk_size in (1, 4, 1024):
            got = selective_log_softmax(logits, index, temperature=temperature, chunk_size=chunk_size)
            assert got.dtype == torch.float32 and got.shape == index.shape
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # Gradients (through the checkpointed chunks) match autograd of the plain version.
    x = logits.float().requires_grad_()
    selective_log_softmax(x, index, temperature=0.3, chunk_size=4).sum().backward()
    y = logits.float().requires_grad_()
    F.log_softmax(y / 0.3, dim=-1).gather(-1, index[..., None]).sum().backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-6)
    # Empty input: nothing to score.
    assert selective_log_softmax(logits[:0], index[:0]).shape == (0, 5)


def test_scores_what_the_sampler_sampled(tiny):
    """generate() samples from softmax(scores) where scores are the logits after every logits processor
    in force; asking HF for those scores shows they are exactly logits / T: token_logprobs(T) is the
    sampler's own log-probability of each sampled token (GRPO pitfalls 5, 7)."""
    model, tok = tiny
    prompts = [chat_prompt(tok, "What is 2+2?"), chat_prompt(tok, "Hi")]
    config = sampling_config(eos_token_ids(model, tok), tok.pad_token_id, 20, temperature=0.7, top_p=1.0, greedy=False)
    config.update(output_scores=True, return_dict_in_generate=True)
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, generation_config=config)
    completion = out.sequences[:, enc.input_ids.shape[1] :]
    sampler = F.log_softmax(torch.stack(out.scores, dim=1).float(), dim=-1)
    sampler = sampler.gather(-1, completion[..., None]).squeeze(-1)
    is_eos = completion == tok.eos_token_id
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), completion.shape[1])
    mask = (torch.arange(completion.shape[1]) <= first_eos[:, None]).float()
    with torch.no_grad():
        ours = token_logprobs(model, enc.input_ids, enc.attention_mask, completion, mask, temperature=0.7)
    torch.testing.assert_close(ours, sampler * mask, rtol=0, atol=1e-5)


def test_greedy_tokens_are_the_most_likely(tiny):
    """Greedy decoding picks the argmax, so each greedy token's log-prob is the row maximum, and it
    tends to 0 as the temperature goes to 0."""
    model, tok = tiny
    r = generate(model, tok, [chat_prompt(tok, "What is 2+2?"), chat_prompt(tok, "Hi")], max_new_tokens=16, greedy=True)
    with torch.no_grad():
        ids = torch.cat([r.prompt_ids, r.completion_ids], dim=1)
        mask = torch.cat([r.prompt_mask, r.completion_mask], dim=1).long()
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
        best = F.log_softmax(logits[:, r.prompt_ids.shape[1] - 1 : -1], dim=-1).amax(-1) * r.completion_mask
        torch.testing.assert_close(logprobs(model, r), best, rtol=0, atol=1e-5)
        cold = logprobs(model, r, temperature=1e-4)[r.completion_mask.bool()]
    assert cold.median() > -1e-3, cold


# ------------------------------------------------------------------ shared prompt vs the plain path
def ragged(r, seed=0):
    """`r` with random answer tokens and answer lengths from 1 to the full width (EOS-free masks of every
    length: what `generate` produces with early EOS, truncation and DAPO's masked-out rows)."""
    g = torch.Generator().manual_seed(seed)
    N, C = r.completion_ids.shape
    lengths = torch.randint(1, C + 1, (N,), generator=g)
    lengths[0], lengths[-1] = 1, C
    mask = (torch.arange(C)[None, :] < lengths[:, None]).float()
    ids = torch.randint(3, 259, (N, C), generator=g).masked_fill(mask == 0, 0)
    return type(r)(r.prompt_ids, r.prompt_mask, ids, mask, r.texts, r.truncated, r.pad_token_id)


def logprobs_and_grads(model, r, weights, temperature, share_prompt, splits=None):
    """Log-probs of every row (computed `splits` rows per call, all at once by default) and the
    gradient of Σ weights · logp with respect to every trainable parameter."""
    model.zero_grad()
    rows = torch.arange(len(r)).split(list(splits)) if splits else [torch.arange(len(r))]
    logp = torch.cat([token_logprobs(model, r.prompt_ids[i], r.prompt_mask[i], r.completion_ids[i], r.completion_mask[i],
                                     temperature=temperature, share_prompt=share_prompt) for i in rows])
    (logp * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return logp.detach(), grads


def assert_same(a, b):
    (logp_a, grads_a), (logp_b, grads_b) = a, b
    torch.testing.assert_close(logp_a, logp_b, rtol=0, atol=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_b:  # parameter gradients equal to a relative 1e-5 (float32 summation order)
        assert grads_b[name].norm() > 0, name
        rel = ((grads_a[name] - grads_b[name]).norm() / grads_b[name].norm()).item()
        assert rel < 1e-5, (name, rel)


def test_prompt_groups_finds_runs_of_identical_adjacent_prompts(rollout):
    first, group = prompt_groups(rollout.prompt_ids, rollout.prompt_mask)
    assert first.tolist() == [0, 4, 8] and group.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    first, group = prompt_groups(rollout.prompt_ids[2:7], rollout.prompt_mask[2:7])  # groups cut by a split
    assert first.tolist() == [0, 2] and group.tolist() == [0, 0, 1, 1, 1]
    order = torch.tensor([0, 4, 8, 1, 5, 9])  # no two adjacent rows alike: the plain path
    assert prompt_groups(rollout.prompt_ids[order], rollout.prompt_mask[order]) is None
    assert prompt_groups(rollout.prompt_ids[:1], rollout.prompt_mask[:1]) is None
    right_padded = rollout.prompt_mask.clone()
    right_padded[:, -1] = 0  # a prompt must end in the last column (left padding)
    assert prompt_groups(rollout.prompt_ids, right_padded) is None


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("answers", ["sampled", "ragged"])
def test_shared_prompt_equals_plain_path_with_gradients(rollout, temperature, answers):
    """The policy pass: log-probs to 1e-5 and every parameter's gradient to a relative 1e-5, whether the
    rows come in whole groups, in groups cut by micro-batch boundaries, or one by one."""
    model, _ = load_model("tiny", device="cpu", log=lambda *a: None)
    r = rollout if answers == "sampled" else ragged(rollout)
    weights = torch.randn(r.completion_ids.shape, generator=torch.Generator().manual_seed(1))
    plain = logprobs_and_grads(model, r, weights, temperature, share_prompt=False)
    assert_same(logprobs_and_grads(model, r, weights, temperature, share_prompt=True), plain)
    assert_same(logprobs_and_grads(model, r, weights, temperature, share_prompt=True, splits=(3, 6, 2, 1)), plain)


def test_shared_prompt_reference_model_and_lora(rollout):
    """π_ref (a frozen copy, no gradient), and a LoRA policy: the adapter's gradients, and the reference
    pass with the adapter disabled."""
    base, _ = load_model("tiny", device="cpu", log=lambda *a: None)
    ref = copy.deepcopy(base).eval().requires_grad_(False)
    r = ragged(rollout, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(logprobs(ref, r, 0.7), logprobs(ref, r, 0.7, share_prompt=False), rtol=0, atol=1e-5)

    model, _ = load_model("tiny", device="cpu", lora_r=4, log=lambda *a: None)
    with torch.no_grad():  # LoRA's B starts at 0 (the adapter is a no-op and A gets no gradient): move it
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    weights = torch.randn(r.completion_ids.shape, generator=torch.Generator().manual_seed(2))
    shared = logprobs_and_grads(model, r, weights, 0.7, share_prompt=True, splits=(5, 7))
    plain = logprobs_and_grads(model, r, weights, 0.7, share_prompt=False)
    assert all("lora_" in name for name in plain[1]) and len(plain[1]) > 0
    assert_same(shared, plain)
    with torch.no_grad(), model.disable_adapter():
        off_shared, off_plain = logprobs(model, r, 0.7), logprobs(model, r, 0.7, share_prompt=False)
        torch.testing.assert_close(off_shared, off_plain, rtol=0, atol=1e-5)
        torch.testing.assert_close(off_shared, logprobs(base, r, 0.7), rtol=0, atol=1e-5)  # = the base model
    assert not torch.allclose(off_plain, plain[0], atol=1e-3)  # (the adapter did change the log-probs)


def test_shared_prompt_on_cat_rollouts_token_id_prompts_and_tiny_chunks(tiny):
    """A Rollout re-padded by `cat_rollouts` (prompts of different widths, one a single token) and a chunked
    log-softmax of one row at a time: the same numbers as the plain path."""
    model, tok = tiny
    torch.manual_seed(0)
    a = generate(model, tok, [[5], list(range(10, 40))], n=3, max_new_tokens=9)
    b = generate(model, tok, [chat_prompt(tok, "Hi")], n=4, max_new_tokens=14)
    r = cat_rollouts([a, b], [[0, 1, 2, 3, 5], [1, 2, 3]])  # the second group of `a` is cut to 2 rows
    assert prompt_groups(r.prompt_ids, r.prompt_mask)[0].tolist() == [0, 3, 5]
    with torch.no_grad():
        for chunk_size in (1, 1024):
            torch.testing.assert_close(logprobs(model, r, 0.7, chunk_size=chunk_size),
                                       logprobs(model, r, 0.7, share_prompt=False), rtol=0, atol=1e-5)


def test_algorithms_cut_batches_of_whole_groups(rollout):
    """GRPO/NFT shuffle whole groups and cut micro-batches in whole groups, so each prompt runs once per
    micro-batch; below one group a micro-batch keeps its size (and still shares within the group)."""
    from shared.rollouts import group_micro_batch, shuffled_groups

    torch.manual_seed(0)
    order = shuffled_groups(12, 4)
    assert sorted(order.tolist()) == list(range(12))
    assert all(chunk.tolist() == list(range(chunk[0], chunk[0] + 4)) and chunk[0] % 4 == 0 for chunk in order.split(4))
    assert [group_micro_batch(m, 4) for m in (1, 3, 4, 7, 8, 16, 17)] == [1, 3, 4, 4, 8, 16, 16]
    model, _ = load_model("tiny", device="cpu", log=lambda *a: None)
    with torch.no_grad():
        want = logprobs(model, rollout, share_prompt=False)[order]
        for micro in (4, 8):
            chunks = order.split(micro)
            got = torch.cat([token_logprobs(model, rollout.prompt_ids[c], rollout.prompt_mask[c], rollout.completion_ids[c],
                                            rollout.completion_mask[c]) for c in chunks])
            assert all(len(prompt_groups(rollout.prompt_ids[c], rollout.prompt_mask[c])[0]) == len(c) // 4 for c in chunks)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_gradient_checkpointing_falls_back_to_the_plain_path(rollout):
    """transformers drops the cache under gradient checkpointing (training mode, autograd on): the
    shared path must not run then, or the answers would be scored without their prompt."""
    model, _ = load_model("tiny", device="cpu", log=lambda *a: None)
    weights = torch.randn(rollout.completion_ids.shape, generator=torch.Generator().manual_seed(3))
    plain = logprobs_and_grads(model, rollout, weights, 1.0, share_prompt=False)
    model.gradient_checkpointing_enable()
    model.train()
    assert_same(logprobs_and_grads(model, rollout, weights, 1.0, share_prompt=True), plain)
