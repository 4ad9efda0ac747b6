"""shared/sampling.py on the tiny model: layout of a Rollout, EOS masking, truncation, greedy
determinism, chunking, that checkpoint generation defaults cannot distort sampling, and that sampling
from a prompt prefilled once per group is sampling from the same distribution as before."""

import pytest
import torch

from shared.models import chat_prompt, load_model
from shared.logprobs import token_logprobs
from shared.sampling import (cat_rollouts, count_generated, eos_token_ids, generate, generated_tokens, sampling_config,
                             set_generated_tokens, shared_prefill, uncounted)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", device="cpu", log=lambda *a: None)


def prompts_for(tok):
    return [chat_prompt(tok, "What is 2+2?"), chat_prompt(tok, "Hi"), chat_prompt(tok, "A longer question here?")]


def test_shapes_and_group_layout(tiny):
    model, tok = tiny
    prompts = prompts_for(tok)
    torch.manual_seed(0)
    r = generate(model, tok, prompts, n=4, max_new_tokens=12)
    N = len(prompts) * 4
    assert r.prompt_ids.shape[0] == r.prompt_mask.shape[0] == N and r.truncated.shape == (N,) and len(r.texts) == N
    assert r.completion_ids.shape == r.completion_mask.shape and r.completion_ids.shape[0] == N
    assert r.completion_ids.shape[1] <= 12 and r.completion_mask.dtype == torch.float32
    for i, prompt in enumerate(prompts):
        rows = slice(i * 4, (i + 1) * 4)
        # The n samples of prompt i are adjacent and share its (left-padded) prompt.
        assert (r.prompt_ids[rows] == r.prompt_ids[i * 4]).all()
        real = r.prompt_ids[i * 4][r.prompt_mask[i * 4].bool()]
        assert real.tolist() == tok(prompt, add_special_tokens=False).input_ids
        # Left padding: the mask is 0...0 1...1 and padding holds pad_token_id.
        mask = r.prompt_mask[i * 4]
        assert mask.tolist() == sorted(mask.tolist())
        assert (r.prompt_ids[i * 4][mask == 0] == tok.pad_token_id).all()
    assert len({tuple(row.tolist()) for row in r.completion_ids}) > 1  # samples differ


def test_completion_mask_stops_at_first_eos_and_flags_truncation(tiny):
    model, tok = tiny
    torch.manual_seed(0)
    # A random model ends a row with EOS (1 of 259 tokens) now and then: 64 rows x 30 tokens gives both kinds.
    r = generate(model, tok, prompts_for(tok)[:2], n=32, max_new_tokens=30)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    assert r.truncated.any() and (~r.truncated).any(), "want rows of both kinds for this seed"
    for ids, mask, truncated in zip(r.completion_ids, r.completion_mask, r.truncated):
        kept = ids[mask.bool()]
        assert mask.tolist() == sorted(mask.tolist(), reverse=True)  # 1...1 0...0
        assert (ids[mask == 0] == pad).all()
        if truncated:  # no EOS at all within max_new_tokens: every one of the 30 tokens counts
            assert len(kept) == 30 and eos not in kept.tolist()
        else:  # the mask ends exactly at the first EOS, which is included
            assert kept[-1] == eos and eos not in kept[:-1].tolist()


def test_tiny_budget_truncates_exactly_the_rows_without_eos(tiny):
    model, tok = tiny
    torch.manual_seed(1)
    r = generate(model, tok, prompts_for(tok), n=100, max_new_tokens=1)
    assert r.completion_ids.shape == (300, 1)
    assert r.truncated.tolist() == (r.completion_ids[:, 0] != tok.eos_token_id).tolist()
    assert (r.completion_mask == 1).all()  # one token each, EOS or not


def test_texts_are_the_decoded_masked_tokens(tiny):
    model, tok = tiny
    torch.manual_seed(2)
    r = generate(model, tok, prompts_for(tok)[:1], n=32, max_new_tokens=30)
    for text, ids, mask in zip(r.texts, r.completion_ids, r.completion_mask):
        kept = ids[mask.bool()].tolist()
        assert text == tok.decode(kept, skip_special_tokens=True)
        # The tiny tokenizer is one token per byte (id = byte + 3): decoding is just bytes -> UTF-8.
        assert text == bytes(i - 3 for i in kept if i >= 3).decode("utf-8", errors="replace")
        assert "<|im_end|>" not in text and "<pad>" not in text


def test_greedy_is_deterministic_and_chunking_changes_nothing(tiny):
    model, tok = tiny
    prompts = prompts_for(tok)
    a = generate(model, tok, prompts, n=2, max_new_tokens=10, greedy=True)
    b = generate(model, tok, prompts, n=2, max_new_tokens=10, greedy=True, batch_size=4)
    assert torch.equal(a.completion_ids, b.completion_ids) and a.texts == b.texts
    assert torch.equal(a.completion_ids[0], a.completion_ids[1])  # greedy: both samples of a group agree
    # Sampling in chunks keeps shapes consistent too (chunks padded to a common width).
    torch.manual_seed(0)
    c = generate(model, tok, prompts, n=3, max_new_tokens=8, batch_size=2)
    assert c.completion_ids.shape[0] == 9 and c.completion_mask.shape == c.completion_ids.shape


def test_restores_training_mode(tiny):
    model, tok = tiny
    model.train()
    generate(model, tok, prompts_for(tok)[:1], max_new_tokens=2)
    assert model.training
    model.eval()
    generate(model, tok, prompts_for(tok)[:1], max_new_tokens=2)
    assert not model.training


def test_checkpoint_generation_defaults_do_not_distort_sampling():
    """A checkpoint's generation_config may carry top_k / top_p / temperature / repetition penalty; the
    sampler must ignore them. With top_k=3 in force every sampled token would be among the 3 likeliest."""
    model, tok = load_model("tiny", device="cpu", log=lambda *a: None)
    model.generation_config.update(top_k=3, top_p=0.5, temperature=0.05, repetition_penalty=3.0, do_sample=False)
    torch.manual_seed(0)
    r = generate(model, tok, prompts_for(tok)[:2], n=8, max_new_tokens=16)
    ids = torch.cat([r.prompt_ids, r.completion_ids], dim=1)
    mask = torch.cat([r.prompt_mask, r.completion_mask], dim=1).long()
    with torch.no_grad():
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    logits = logits[:, r.prompt_ids.shape[1] - 1 : -1]  # the positions that predict completion tokens
    rank = (logits > logits.gather(-1, r.completion_ids[..., None])).sum(-1)  # 0 = the likeliest token
    in_top3 = (rank < 3)[r.completion_mask.bool()].float().mean().item()
    assert in_top3 < 0.3, f"{in_top3:.0%} of sampled tokens in the top 3: a top_k leaked into sampling"


def test_peft_model_generates(tiny):
    model, tok = load_model("tiny", device="cpu", lora_r=2, log=lambda *a: None)
    r = generate(model, tok, prompts_for(tok)[:1], n=2, max_new_tokens=4, greedy=True)
    assert r.completion_ids.shape[0] == 2


def test_cat_rollouts_selects_and_repads_rows(tiny):
    model, tok = tiny
    torch.manual_seed(0)
    a = generate(model, tok, [chat_prompt(tok, "Hi")], n=4, max_new_tokens=6)
    b = generate(model, tok, [chat_prompt(tok, "A much longer question than the first one?")], n=4, max_new_tokens=12)
    rows = [[3, 1], [0, 2, 3]]
    c = cat_rollouts([a, b], rows)
    picked = [(a, 3), (a, 1), (b, 0), (b, 2), (b, 3)]
    assert len(c) == 5 and c.texts == [r.texts[i] for r, i in picked]
    assert c.truncated.tolist() == [bool(r.truncated[i]) for r, i in picked]
    assert c.prompt_ids.shape[1] == b.prompt_ids.shape[1]  # the widest prompt, nothing wider
    assert c.completion_ids.shape[1] == int(c.completion_mask.sum(1).max())
    for k, (r, i) in enumerate(picked):  # same real tokens, re-padded with pad_token_id
        assert c.prompt_ids[k][c.prompt_mask[k].bool()].equal(r.prompt_ids[i][r.prompt_mask[i].bool()])
        assert c.completion_ids[k][c.completion_mask[k].bool()].equal(r.completion_ids[i][r.completion_mask[i].bool()])
        assert (c.prompt_ids[k][c.prompt_mask[k] == 0] == tok.pad_token_id).all()
        assert (c.completion_ids[k][c.completion_mask[k] == 0] == tok.pad_token_id).all()
    with torch.no_grad():  # and the log-probs of each row are unchanged
        got = token_logprobs(model, c.prompt_ids, c.prompt_mask, c.completion_ids, c.completion_mask)
        for k, (r, i) in enumerate(picked):
            want = token_logprobs(model, r.prompt_ids[i : i + 1], r.prompt_mask[i : i + 1],
                                  r.completion_ids[i : i + 1], r.completion_mask[i : i + 1])[0]
            n = int(r.completion_mask[i].sum())
            torch.testing.assert_close(got[k, :n], want[:n], rtol=0, atol=1e-5)
    assert len(cat_rollouts([a], [[]])) == 0


def test_min_p_and_other_unset_fields_of_the_checkpoint_config_do_not_leak():
    """transformers fills every field our GenerationConfig leaves unset from the model's own config;
    a checkpoint's min_p = 0.9 would keep only the likeliest token. `generate` swaps in a neutral
    config while it runs (and puts the model's back afterwards)."""
    model, tok = load_model("tiny", device="cpu", log=lambda *a: None)
    model.generation_config.update(min_p=0.9, epsilon_cutoff=0.5, top_k=1)
    saved = model.generation_config
    torch.manual_seed(0)
    r = generate(model, tok, prompts_for(tok)[:1], n=16, max_new_tokens=1)
    assert len(set(r.completion_ids[:, 0].tolist())) > 4, "min_p/top_k of the checkpoint leaked into sampling"
    assert model.generation_config is saved and model.generation_config.min_p == 0.9


def test_token_id_prompts_sample_like_the_same_text(tiny):
    model, tok = tiny
    prompts = prompts_for(tok)
    ids = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    torch.manual_seed(3)
    a = generate(model, tok, prompts, n=2, max_new_tokens=6)
    torch.manual_seed(3)
    b = generate(model, tok, ids, n=2, max_new_tokens=6)
    assert torch.equal(a.prompt_ids, b.prompt_ids) and torch.equal(a.prompt_mask, b.prompt_mask)
    assert torch.equal(a.completion_ids, b.completion_ids) and a.texts == b.texts


def test_next_turn_prompt_holds_the_first_turns_exact_tokens_and_masks_only_the_new_turn(tiny):
    from shared.sampling import chat_ids, next_turn_prompts

    model, tok = tiny
    torch.manual_seed(0)
    first = generate(model, tok, [chat_prompt(tok, "What is 2+2?")], n=4, max_new_tokens=12)
    assert first.truncated.any(), "want a truncated first turn for this seed"
    second_prompts = next_turn_prompts(tok, first, ["Check your answer."] * 4)
    second = generate(model, tok, second_prompts, n=2, max_new_tokens=5)
    for i in range(4):
        answer = first.completion_ids[i][first.completion_mask[i].bool()].tolist()
        prompt = first.prompt_ids[i][first.prompt_mask[i].bool()].tolist()
        turn2 = second.prompt_ids[2 * i][second.prompt_mask[2 * i].bool()].tolist()
        assert turn2[:len(prompt) + len(answer)] == prompt + answer  # the sampled tokens themselves
        if not first.truncated[i]:  # the same chat rendered by the template, when it round-trips
            msgs = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": first.texts[i]},
                    {"role": "user", "content": "Check your answer."}]
            assert turn2 == chat_ids(tok, msgs)
        else:  # a cut-off answer is closed with the end-of-turn token before the next user message
            assert turn2[len(prompt) + len(answer)] == tok.eos_token_id
    # the new rollout's completion mask covers only turn-2 tokens: at most max_new_tokens per row
    assert (second.completion_mask.sum(1) <= 5).all() and second.completion_mask.shape[1] <= 5


# ------------------------------------------------------------------ prefill once per group
def assert_same_rollout(a, b):
    for name in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "truncated"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.texts == b.texts


@pytest.mark.parametrize("temperature, top_p, batch_size", [(1.0, 1.0, None), (0.7, 1.0, 5), (1.0, 0.9, 7)])
def test_shared_prefill_samples_the_same_tokens(tiny, temperature, top_p, batch_size):
    """Same seed, same tokens: the shared prefill changes the logits only by float32 rounding and the sampler
    draws from the RNG in the same order (batch_size 5 and 7 cut groups of 4 across `generate` calls)."""
    model, tok = tiny
    kwargs = dict(n=4, max_new_tokens=30, temperature=temperature, top_p=top_p, batch_size=batch_size)
    torch.manual_seed(0)
    shared = generate(model, tok, prompts_for(tok), **kwargs)
    torch.manual_seed(0)
    plain = generate(model, tok, prompts_for(tok), share_prompt=False, **kwargs)
    assert shared.truncated.any() and (~shared.truncated).any()  # both kinds of rows (EOS and truncation)
    assert_same_rollout(shared, plain)


def test_shared_prefill_with_ragged_token_id_prompts_multi_turn_and_lora():
    from shared.sampling import next_turn_prompts

    model, tok = load_model("tiny", device="cpu", lora_r=2, log=lambda *a: None)
    with torch.no_grad():  # a non-trivial adapter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))

    def both_ways(prompts, seed):
        runs = []
        for share in (True, False):
            torch.manual_seed(seed)
            runs.append(generate(model, tok, prompts, n=3, max_new_tokens=12, share_prompt=share))
        assert_same_rollout(*runs)
        assert shared_prefill(model, runs[0].prompt_ids, runs[0].prompt_mask)  # (there was something to share)
        return runs[0]

    # a single-token prompt (its prefill is all padding) next to longer, left-padded ones; then a second turn
    first = both_ways([[7], [1, 50, 60], list(range(3, 40))], seed=1)
    both_ways(next_turn_prompts(tok, first, ["Check."] * len(first)), seed=2)


def test_shared_prefill_gives_the_sampler_the_same_probabilities(tiny):
    """The distribution itself, step by step: the sampler's scores after the shared prefill equal those
    after a full prefill of every row, to 1e-5 (independently of which tokens were drawn)."""
    model, tok = tiny
    prompts = prompts_for(tok)
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    ids, mask = enc.input_ids.repeat_interleave(4, 0), enc.attention_mask.repeat_interleave(4, 0)
    config = sampling_config(eos_token_ids(model, tok), tok.pad_token_id, 16, temperature=0.7, top_p=1.0, greedy=False)
    config.update(output_scores=True, return_dict_in_generate=True)
    seen = []
    hook = model.model.register_forward_pre_hook(lambda m, args, kw: seen.append(tuple(kw["input_ids"].shape)),
                                                 with_kwargs=True)
    try:
        with torch.no_grad():
            torch.manual_seed(0)
            cache = shared_prefill(model, ids, mask)
            shared = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, **cache)
    finally:
        hook.remove()
    P = ids.shape[1]
    assert seen[:2] == [(3, P - 1), (12, 1)]  # each prompt but its last token once, then every row's last token
    with torch.no_grad():
        torch.manual_seed(0)
        plain = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    assert torch.equal(shared.sequences, plain.sequences)
    for a, b in zip(shared.scores, plain.scores):
        finite = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), finite)
        torch.testing.assert_close(a[finite], b[finite], rtol=0, atol=1e-5)


def test_no_shared_prefill_for_distinct_prompts(tiny):
    """Greedy evaluation (one sample per prompt) runs exactly as before: nothing to share."""
    model, tok = tiny
    enc = tok(prompts_for(tok), return_tensors="pt", padding=True, add_special_tokens=False)
    assert shared_prefill(model, enc.input_ids, enc.attention_mask) == {}


def test_generate_counts_exactly_the_unmasked_tokens_and_evaluation_counts_none(tiny):
    from shared.evaluation import evaluate
    from shared.tasks import load_task

    model, tok = tiny
    set_generated_tokens(5)
    torch.manual_seed(0)
    r = generate(model, tok, prompts_for(tok), n=3, max_new_tokens=9)
    used = int(r.completion_mask.sum())
    assert used > 0
    assert generated_tokens() == 5 + used
    with uncounted():
        with uncounted():  # nested blocks
            generate(model, tok, prompts_for(tok), n=2, max_new_tokens=9)
        count_generated(100)
    task = load_task("arith", n_train=1, n_test=4)
    evaluate(model, tok, task, task.test, max_new_tokens=6)
    assert generated_tokens() == 5 + used  # nothing inside uncounted(), and evaluation is uncounted
    count_generated(7)
    assert generated_tokens() == 12 + used
    set_generated_tokens(0)
