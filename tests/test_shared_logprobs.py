"""shared/logprobs.py: parity with a plain full log_softmax, padding invariance, gradients, chunking,
and agreement with the sampler (the distribution generate() draws from is the one we score)."""

import pytest
import torch
import torch.nn.functional as F

from shared.logprobs import selective_log_softmax, token_logprobs
from shared.models import chat_prompt, load_model
from shared.sampling import eos_token_ids, generate, sampling_config


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


def test_positions_count_real_tokens_only(tiny, rollout):
    """(RoPE is shift-invariant, so for Llama the test above cannot see positions; models with absolute
    position embeddings can. The first real token must sit at position 0 whatever the padding.)"""
    model, _ = tiny
    seen = {}
    hook = model.model.register_forward_pre_hook(lambda m, args, kwargs: seen.update(kwargs), with_kwargs=True)
    try:
        with torch.no_grad():
            logprobs(model, rollout)
    finally:
        hook.remove()
    mask = torch.cat([rollout.prompt_mask, rollout.completion_mask], dim=1)
    for positions, row_mask in zip(seen["position_ids"], mask):  # (the last token is never fed)
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
        out = model.generate(**enc, generation_config=config)
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
