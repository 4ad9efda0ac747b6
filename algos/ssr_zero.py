"""SSR-Zero — self-rewarding GRPO for machine translation: the policy is its own judge.

Paper: Yang, Zheng, Song, Li, Wang, "SSR-Zero: Simple Self-Rewarding Reinforcement Learning for
Machine Translation", arXiv:2505.16637 (no official training code was released; see the spec).

Idea: R1-Zero-style online RL for translation with no references and no reward model. For a
monolingual source sentence x the policy samples G candidates in a <think>…</think><answer>…</answer>
format; then the SAME current weights, prompted as a reference-free GEMBA-DA-style judge, score each
well-formed candidate from 0 to 100. The parsed score plus a format reward is the GRPO reward, so
judging and translating co-evolve. SSR-X-Zero adds a COMET-family quality-estimation reward.

    o_i ~ π_θ(· | P_act(x)),  ŷ_i = content of the single <answer> block      (i = 1..G)
    f_i = 1 if o_i is <think>…</think> <answer>ŷ≠∅</answer> and nothing else, else 0
    s_i = clamp(first number in the judge's last <answer> block, 0, 100),  j_i ~ π_θ(· | P_judge(x, ŷ_i))
    r_i = f_i + s_i/100 (+ k_i, SSR-X)   if f_i = 1,   r_i = −1 (no judge call) otherwise
    A_i = (r_i − mean_j r_j) / (std_j r_j + 1e-6)                             (unbiased std)
    ρ_{i,t} = π_θ(o_{i,t}|…) / π_old(o_{i,t}|…),  D_{i,t} = π_ref/π_θ − log(π_ref/π_θ) − 1   (k3)
    J(θ) = (1/G) Σ_i (1/|o_i|) Σ_t [min(ρ A_i, clip(ρ, 1−ε, 1+ε) A_i) − β D_{i,t}]   (DeepSeekMath GRPO)

The judge text is generated under no_grad and never enters a loss: gradients flow only through the
actor tokens o_i. Every constant the paper does not state (the reward combination, −1 for a bad format,
ε, β, G, judge decoding, the judge prompt's exact words) is a flag with the spec's default.

Changed or simplified, and why:
- Data: the project's own small EN/DE/FR sentences (shared/translation_data.py) instead of 13K EN/ZH
  sentences, so everything runs offline; directions are a flag (default EN→DE and DE→EN, an even split
  as the spec's default; the smaller language's sentences are repeated). WMT/Flores are not wired in.
- Evaluation: chrF (sacreBLEU's default chrF2) against the project's references on a dev and a test split, plus the model's own mean judge score,
  instead of COMETKiwi-XXL / XCOMET-XXL (10B-parameter models). Only ŷ is scored; a malformed output
  scores as an empty translation (`chrf_lenient` also scores the text after </think> instead).
- SSR-X: `--qe-model` takes a local COMET checkpoint (needs `pip install unbabel-comet`); k_i is its
  reference-free score. Not exercised by the tests (no such model offline).
- `--stop-at-answer` (off by default) ends a generation at its first </answer>, like a stop string in
  vLLM; `--prefill-think` writes "<think>" after the prompt; `--chat-template` wraps the prompts in the
  tokenizer's chat template. The paper uses none of these (a base model, plain text); they let a small
  instruct model produce the format at all.
- An actor output cut off at --max-new-tokens has an invalid format (half an answer is not an answer).
- One process only (no batch split across processes); one on-policy update per step by default.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python algos/ssr_zero.py` finds `shared`

import dataclasses
import importlib.util
import math
import re
import time
from dataclasses import dataclass
from typing import Callable, ClassVar, NamedTuple

import sacrebleu
import torch
from tqdm.auto import tqdm

from shared.args import StepArgs, cli, require
from shared.logprobs import token_logprobs
from shared.models import chat_prompt
from shared.rollouts import PromptStream, rollout_logprobs
from shared.run import Run
from shared.sampling import Rollout, generate, uncounted
from shared.translation_data import LANGUAGES, MONOLINGUAL, N_DEV, PARALLEL, parallel_split


@dataclass
class Args(StepArgs):  # the experiment flags (--model, --total-steps, --lr, ...) come from shared/args.py
    """SSR-Zero: self-rewarding GRPO for translation (the policy is its own judge). Runs on one process."""

    task: str = "mt-builtin"
    """`mt-builtin`: the project's EN/DE/FR sentences (shared/translation_data.py), offline"""
    n_train: int = 10_000
    """at most this many training prompts (the built-in set gives 192 for the default directions)"""
    n_dev: int = N_DEV
    """dev sentences with references (at most 16): chrF logged as dev/chrf"""
    n_test: int = len(PARALLEL) - N_DEV
    """test sentences with references (at most 32): chrF logged as eval/chrf (the reported number)"""
    max_new_tokens: int = 96
    """actor generation budget (spec: 1024 at 7B)"""
    # ---- algorithm (spec defaults; every one except ε, β is unverified)
    directions: tuple[str, ...] = ("en-de", "de-en")
    """translation directions `src-tgt` among en, de, fr (the paper: en-zh and zh-en), an even split"""
    batch_size: int = 2
    """B: source sentences per step (spec: 64 on 8 GPUs)"""
    group_size: int = 8
    """G: candidate translations per source"""
    epsilon: float = 0.2
    """ε: clip range of ρ"""
    beta: float = 1e-3
    """β: k3 KL coefficient towards π_ref, the initial policy (0 skips the reference model)"""
    adv_eps: float = 1e-6
    """added to the group std in A_i"""
    invalid_reward: float = -1.0
    """r_i for a malformed output (the judge is not called)"""
    judge_max_new_tokens: int = 64
    """judge generation budget (spec: 1024 at 7B)"""
    judge_temperature: float = 0.0
    """judge decoding: 0 = greedy, else one sample at this temperature (spec: greedy or 1.0)"""
    qe_model: str | None = None
    """SSR-X: path of a local COMET QE checkpoint (e.g. wmt22-cometkiwi-da); adds k_i ∈ [0, 1] to r_i"""
    qe_weight: float = 1.0
    """weight of k_i in r_i (SSR-X; unverified)"""
    prefill_think: bool = False
    """write "<think>" after the actor and judge prompts (the paper pre-fills nothing)"""
    stop_at_answer: bool = False
    """end actor and judge generations at their first </answer> (a stop string; the paper: unknown)"""
    chat_template: bool = False
    """wrap prompts in the tokenizer's chat template (the paper: plain text for a base model)"""
    num_iterations: int = 1
    """μ: optimisation epochs over each rollout batch (one optimizer step per epoch)"""
    micro_batch_size: int = 16
    """sequences per forward/backward (gradient accumulation; no effect on the maths)"""
    gen_batch_size: int | None = None
    """rows per `generate` call (None = all at once)"""
    max_grad_norm: float = 1.0
    """gradient-norm clip"""

    RULES: ClassVar[dict[str, str]] = {
        "batch_size": "> 0", "group_size": ">= 2; a group of one has zero advantage", "epsilon": "[0, 1]",
        "beta": ">= 0", "adv_eps": ">= 0", "judge_max_new_tokens": ">= 1", "judge_temperature": ">= 0",
        "qe_weight": ">= 0", "num_iterations": ">= 1", "micro_batch_size": "> 0", "gen_batch_size": "> 0",
        "max_grad_norm": "> 0", "n_dev": f"[0, {N_DEV}]", "n_test": f"[1, {len(PARALLEL) - N_DEV}]"}

    def check(self) -> None:  # replaces LMArgs.check: the task is translation, not a math task
        require(self.task == "mt-builtin", "task", self.task, "SSR-Zero needs translation data: only `mt-builtin`")
        for d in self.directions:
            src, _, tgt = d.partition("-")
            require(src in LANGUAGES and tgt in LANGUAGES and src != tgt, "directions", d,
                    f"each must be `src-tgt` with two different languages among {', '.join(LANGUAGES)}")
        if self.qe_model is not None:  # SSR-X
            require(Path(self.qe_model).is_file(), "qe_model", self.qe_model, "must be a local COMET checkpoint file (model.ckpt)")
            require(importlib.util.find_spec("comet") is not None, "qe_model", self.qe_model, "needs `pip install unbabel-comet`")
        require(not (self.load_in_4bit or self.load_in_8bit) or self.lora_r > 0, "lora_r", self.lora_r,
                "--load-in-4bit/8bit quantises frozen weights: pass --lora-r too")


# ------------------------------------------------------------------------------------ prompts
PREAMBLE = ("A conversation between User and Assistant. The User asks a question, and the Assistant solves it. "
            "The Assistant first thinks about the reasoning process in the mind and then provides the User with "
            "the answer. The reasoning process is enclosed within <think> </think> and answer is enclosed within "
            "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer "
            "here </answer>.")  # spec §5, the model card's R1-Zero template
ACTOR_INSTRUCTION = "Translate the following text to {tgt}: \n{x}"
JUDGE_INSTRUCTION = (  # GEMBA-DA without a reference, plus the SSR zero-score rules (spec §5; wording unverified)
    "Score the following translation from {src} to {tgt} on a continuous scale from 0 to 100, where 0 means "
    "\"no meaning preserved\" and 100 means \"perfect meaning and grammar\". Give a score of 0 if the "
    "translation contains irrelevant content (explanations, notes or reasoning), is not in {tgt}, or offers "
    "more than one translation. Put only the score inside <answer> </answer>.\n\n"
    "{src} source: \"{x}\"\n{tgt} translation: \"{y}\"")


def render(tokenizer, instruction: str, chat: bool, prefill: bool) -> str:
    """The R1-Zero prompt: plain text `PREAMBLE\\n\\nUser:\\n…\\n\\nAssistant:\\n` (spec §5), or the
    tokenizer's chat template with PREAMBLE as the system message; optionally pre-filled with <think>."""
    text = chat_prompt(tokenizer, instruction, PREAMBLE) if chat else f"{PREAMBLE}\n\nUser:\n{instruction}\n\nAssistant:\n"
    return text + ("<think>" if prefill else "")


def actor_prompt(tokenizer, x: str, src: str, tgt: str, args: Args) -> str:
    """P_act(x): the source language is not named (the model card's instruction)."""
    return render(tokenizer, ACTOR_INSTRUCTION.format(tgt=LANGUAGES[tgt], x=x), args.chat_template, args.prefill_think)


def judge_prompt(tokenizer, x: str, y: str, src: str, tgt: str, args: Args) -> str:
    """P_judge(x, ŷ): source and candidate in quotes, no reference field."""
    text = JUDGE_INSTRUCTION.format(src=LANGUAGES[src], tgt=LANGUAGES[tgt], x=x, y=y)
    return render(tokenizer, text, args.chat_template, args.prefill_think)


# ------------------------------------------------------------------------------------ parsing (no eval)
class Parsed(NamedTuple):
    valid: bool  # f_i
    answer: str  # ŷ_i ("" when invalid)
    quoted: bool  # ŷ wrapped in quotation marks (the late-training artefact of spec §7)


TAGS = ("<think>", "</think>", "<answer>", "</answer>")
FORMAT = re.compile(r"\s*<think>.*?</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)
QUOTES = "\"'“”„«»‘’‚"


def parse_translation(text: str, prefix: str = "") -> Parsed:
    """f_i and ŷ_i of the actor output `prefix + text` (prefix: what was pre-filled, e.g. "<think>").
    Exactly one of each tag, in order, only whitespace around the blocks, a non-empty answer. Quotes
    are kept (and flagged), never stripped."""
    full = prefix + text
    m = FORMAT.fullmatch(full)
    if m is None or any(full.count(tag) != 1 for tag in TAGS) or not m.group(1).strip():
        return Parsed(False, "", False)
    y = m.group(1).strip()
    return Parsed(True, y, len(y) >= 2 and y[0] in QUOTES and y[-1] in QUOTES)


ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def parse_score(text: str, prefix: str = "", max_chars: int = 20_000) -> tuple[float, bool]:
    """s_i of a judge output and whether a number was found: the last <answer> block, else the text after
    the last </think>, else everything; its first number, clamped to [0, 100]; none → (0, False)."""
    full = (prefix + text)[:max_chars]  # bounded work on whatever the model wrote
    blocks = ANSWER_BLOCK.findall(full)
    region = blocks[-1] if blocks else full.rsplit("</think>", 1)[-1]
    m = NUMBER.search(region)
    if m is None:
        return 0.0, False
    return min(max(float(m.group()), 0.0), 100.0), True


def lenient_answer(text: str, prefix: str = "") -> str:
    """For the lenient chrF only: the answer block if there is one, else the text after </think>,
    with tags removed."""
    full = prefix + text
    blocks = ANSWER_BLOCK.findall(full)
    out = blocks[-1] if blocks else full.rsplit("</think>", 1)[-1]
    for tag in TAGS:
        out = out.replace(tag, " ")
    return " ".join(out.split())


STOPWORDS = {  # a cheap language ID for the output-language ratio (en/de/fr only)
    "en": set("the a an is are was of to and in on it this that with you i he she we they my your not at for".split()),
    "de": set("der die das ist sind ein eine und nicht ich du er sie wir ihr mit auf im zu den dem es mein".split()),
    "fr": set("le la les est sont un une et ne pas je tu il elle nous vous avec dans du des au mon ma".split()),
}


def guess_language(text: str) -> str | None:
    """The language whose stopwords (and letters: ß/äöü for German, accents for French) occur most; None if none."""
    words = re.findall(r"[a-zà-ÿ']+", text.lower())
    score = {lang: sum(w in sw for w in words) for lang, sw in STOPWORDS.items()}
    score["de"] += sum(c in "äöüß" for c in text.lower())
    score["fr"] += sum(c in "éèêàçùœ" for c in text.lower()) + text.count("'")
    best = max(score, key=score.get)
    return best if score[best] > 0 else None


# ------------------------------------------------------------------------------------ ALGO LOGIC
def self_rewards(parsed: list[Parsed], judge: Callable[[list[int]], list[tuple[float, bool]]],
                 qe: Callable[[list[int]], list[float]] | None = None, *, invalid_reward: float = -1.0,
                 qe_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """r_i = f_i + s_i/100 (+ w·k_i with SSR-X) for a valid format, r_i = invalid_reward otherwise.
    `judge(rows)` is called once, with the valid rows only (a malformed output costs no judge call).
    Returns rewards [N], scores s [N] (NaN where not judged) and judge-parse success [N] (NaN likewise)."""
    valid = [i for i, p in enumerate(parsed) if p.valid]
    rewards = torch.full((len(parsed),), float(invalid_reward))
    scores, ok = torch.full((len(parsed),), math.nan), torch.full((len(parsed),), math.nan)
    if valid:
        judged = judge(valid)
        k = qe(valid) if qe is not None else [0.0] * len(valid)
        for i, (s, found), k_i in zip(valid, judged, k):
            scores[i], ok[i] = s, float(found)
            rewards[i] = 1.0 + s / 100.0 + qe_weight * k_i
    return rewards, scores, ok


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """A_i = (r_i − mean_j r_j) / (std_j r_j + eps) within each group of G consecutive rows (unbiased std,
    as verl); a group with equal rewards gets A = 0 exactly."""
    r = rewards.view(-1, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    sigma = r.std(dim=1, keepdim=True, unbiased=True)
    return torch.where(sigma > 0, centred / (sigma + eps), torch.zeros_like(centred)).flatten()


def grpo_loss(logp, old_logp, ref_logp, adv, mask, *, epsilon: float = 0.2, beta: float = 1e-3):
    """−J(θ): per token −min(ρA, clip(ρ, 1−ε, 1+ε)A) + β·k3, averaged over each response's tokens, then
    over responses. logp [N, T] carries the gradient; old_logp, ref_logp (None when β = 0), adv [N] are
    detached; mask [N, T] is 1 on actor tokens only (the judge never appears here)."""
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    a = adv.to(logp.dtype).unsqueeze(1)
    per_token = -torch.min(ratio * a, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * a)
    kl = torch.zeros_like(per_token)
    if beta > 0:
        log_q = ref_logp - logp
        kl = torch.exp(log_q) - log_q - 1  # k3 ≥ 0
        per_token = per_token + beta * kl
    loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    with torch.no_grad():
        kl_mean = (kl * mask).sum() / mask.sum().clamp(min=1)
        clipped = ((a > 0) & (ratio > 1 + epsilon)) | ((a < 0) & (ratio < 1 - epsilon))
        clip_frac = (clipped.to(mask.dtype) * mask).sum() / mask.sum().clamp(min=1)
    return loss, {"kl": kl_mean, "clip_frac": clip_frac}


# ------------------------------------------------------------------------------------ helpers
def chrf(hypotheses: list[str], references: list[str]) -> float:
    """Corpus chrF with sacreBLEU's defaults (chrF2: character 1..6-grams, whitespace removed)."""
    return sacrebleu.corpus_chrf(hypotheses, [references]).score


def cut_at_answer(ro: Rollout, tokenizer) -> Rollout:
    """`--stop-at-answer`: end each completion at the token that completes its first "</answer>" (as a
    stop string would): the mask, the text and `truncated` are updated; later tokens carry no loss."""
    mask, texts, truncated = ro.completion_mask.clone(), list(ro.texts), ro.truncated.clone()
    for i in range(len(ro)):
        if "</answer>" not in texts[i]:
            continue
        ids = ro.completion_ids[i][mask[i].bool()].tolist()
        lo, hi = 1, len(ids)  # smallest k with "</answer>" in decode(ids[:k]) (monotone in k)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if "</answer>" in tokenizer.decode(ids[:mid], skip_special_tokens=True) else (mid + 1, hi)
        mask[i, lo:] = 0
        texts[i] = tokenizer.decode(ids[:lo], skip_special_tokens=True)
        truncated[i] = False
    return dataclasses.replace(ro, completion_mask=mask, texts=texts, truncated=truncated,
                               completion_ids=ro.completion_ids.masked_fill(mask == 0, ro.pad_token_id))


def build_train_prompts(args: Args) -> list[tuple[str, str, str]]:
    """(src, tgt, x) for each direction, interleaved so every direction gets the same share; a
    direction whose source language has fewer sentences cycles through them again."""
    per_dir = [[(d.split("-")[0], d.split("-")[1], x) for x in MONOLINGUAL[d.split("-")[0]]] for d in args.directions]
    longest = max(len(p) for p in per_dir)
    out = [p[k % len(p)] for k in range(longest) for p in per_dir]
    return out[:args.n_train]


def sample(model, tokenizer, prompts: list[str], n: int, max_new_tokens: int, temperature: float, args: Args) -> Rollout:
    """n completions per prompt (temperature 0 = greedy), cut at </answer> with --stop-at-answer."""
    ro = generate(model, tokenizer, prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature or 1.0,
                  greedy=temperature == 0, batch_size=args.gen_batch_size)
    return cut_at_answer(ro, tokenizer) if args.stop_at_answer else ro


def actor_parsed(texts: list[str], truncated: torch.Tensor, prefix: str = "") -> list[Parsed]:
    """`parse_translation` of each actor output; one cut off at --max-new-tokens is malformed."""
    return [parse_translation(t, prefix) if not cut else Parsed(False, "", False) for t, cut in zip(texts, truncated.tolist())]


def judge_scores(model, tokenizer, items: list[tuple[str, str, str, str]], args: Args) -> list[tuple[float, bool]]:
    """(s, found) for each (x, ŷ, src, tgt), judged by `model` itself: the CURRENT policy, under no_grad
    (`generate`), its text never part of a loss."""
    prompts = [judge_prompt(tokenizer, x, y, src, tgt, args) for x, y, src, tgt in items]
    texts = sample(model, tokenizer, prompts, 1, args.judge_max_new_tokens, args.judge_temperature, args).texts
    return [parse_score(text, "<think>" if args.prefill_think else "") for text in texts]


def evaluate_mt(model, tokenizer, rows: list[dict], args: Args) -> dict:
    """Greedy actor on `rows` in every direction: chrF of ŷ against the references (per direction and
    their mean; a malformed output is an empty translation), BLEU over all directions, the lenient chrF,
    the format rate, and the model's own judge score of its well-formed answers (with parse failures,
    language ratio, quotes)."""
    prefix = "<think>" if args.prefill_think else ""
    res, lenient, answers, refs, parsed_all, items = {}, [], [], [], [], []
    for d in args.directions:
        src, tgt = d.split("-")
        ro = sample(model, tokenizer, [actor_prompt(tokenizer, r[src], src, tgt, args) for r in rows], 1,
                    args.max_new_tokens, 0, args)
        parsed = actor_parsed(ro.texts, ro.truncated, prefix)
        res[f"chrf_{d}"] = chrf([p.answer for p in parsed], [r[tgt] for r in rows])  # only ŷ is scored
        lenient += [lenient_answer(t, prefix) for t in ro.texts]
        answers += [p.answer for p in parsed]
        refs += [r[tgt] for r in rows]
        parsed_all += parsed
        items += [(r[src], p.answer, src, tgt) for r, p in zip(rows, parsed) if p.valid]
    res["chrf"] = sum(res[f"chrf_{d}"] for d in args.directions) / len(args.directions)
    res["chrf_lenient"] = chrf(lenient, refs)
    res["bleu"] = sacrebleu.corpus_bleu(answers, [refs]).score  # all directions pooled, sacreBLEU's 13a tokens
    res["format_rate"] = sum(p.valid for p in parsed_all) / len(parsed_all)
    if items:
        judged = judge_scores(model, tokenizer, items, args)
        res["self_score"] = sum(s for s, _ in judged) / len(judged)
        res["judge_parse_fail"] = sum(not ok for _, ok in judged) / len(judged)
        res["lang_ratio"] = sum(guess_language(y) == tgt for _, y, _, tgt in items) / len(items)
        res["quote_frac"] = sum(p.quoted for p in parsed_all) / len(items)
    return res


def main(args: Args) -> dict:
    run = Run("ssr_zero", args, task=False)  # flags, resume, accelerator, run dir (shared/run.py)
    args, accelerator = run.args, run.accelerator
    require(accelerator.num_processes == 1, "nproc_per_node", accelerator.num_processes, "ssr_zero.py runs on one process")
    lm = run.setup_lm(reference=args.beta > 0)
    model, tokenizer, optimizer, scheduler, device = lm.model, lm.tokenizer, lm.optimizer, lm.scheduler, accelerator.device
    train = build_train_prompts(args)
    splits = {"dev": parallel_split("dev")[:args.n_dev], "eval": parallel_split("test")[:args.n_test]}
    step, stream = lm.state.get("step", 0), PromptStream(len(train), args.seed, lm.state.get("cursor", 0))
    prefix = "<think>" if args.prefill_think else ""

    qe_model = None
    if args.qe_model:  # SSR-X: a local COMET checkpoint (reference-free QE)
        from comet import load_from_checkpoint
        qe_model = load_from_checkpoint(args.qe_model)

    def qe(items):  # [(x, ŷ)] -> k ∈ [0, 1]
        out = qe_model.predict([{"src": x, "mt": y} for x, y in items], batch_size=16, gpus=int(torch.cuda.is_available()))
        return [min(max(float(k), 0.0), 1.0) for k in out.scores]

    def evaluate(step):  # dev (dev/*) and test (eval/*, the reported split)
        results = {}
        for split, rows in splits.items():
            if rows:
                t = time.time()
                with uncounted():  # held-out evaluation (its judge passes too): not part of the --token-budget
                    results[split] = res = evaluate_mt(model, tokenizer, rows, args)
                run.logger.log({f"{split}/{k}": v for k, v in res.items()} | {f"perf/{split}_s": time.time() - t,
                                                                              "perf/gen_tokens": run.tokens_spent()}, step)
                run.log(f"step {step}: {split} chrF {res['chrf']:.2f} (lenient {res['chrf_lenient']:.2f}), format "
                        f"{res['format_rate']:.2f}, self-score {res.get('self_score', float('nan')):.1f}")
        return results

    before = evaluate(step) if step == 0 else None
    last_eval, cursor = before, stream.cursor
    bar = tqdm(total=args.total_steps, initial=step, desc="ssr_zero", disable=not accelerator.is_main_process)
    try:
        # --token-budget (actor samples and the self-judge's passes): checked before each step; the step that
        # spends it is the last: evaluated and saved as the --total-steps one would be
        while step < args.total_steps and run.budget_left():
            # ---- actor: G candidates per source (π_θ, temperature T)
            t0 = time.time()
            model.eval()
            batch = [train[i] for i in stream.take(args.batch_size)]
            ro = sample(model, tokenizer, [actor_prompt(tokenizer, x, s, t, args) for s, t, x in batch], args.group_size,
                        args.max_new_tokens, args.temperature, args).to(device)
            parsed = actor_parsed(ro.texts, ro.truncated, prefix)
            t_gen = time.time() - t0

            # ---- judge: the same current weights score each well-formed ŷ (no_grad; never trained on)
            t1 = time.time()
            row = lambda i: batch[i // args.group_size]  # noqa: E731  (src, tgt, x) of row i
            rewards, scores, judge_ok = self_rewards(
                parsed, lambda rows: judge_scores(model, tokenizer, [(row(i)[2], parsed[i].answer, row(i)[0], row(i)[1]) for i in rows], args),
                (lambda rows: qe([(row(i)[2], parsed[i].answer) for i in rows])) if qe_model is not None else None,
                invalid_reward=args.invalid_reward, qe_weight=args.qe_weight)
            adv = group_advantages(rewards, args.group_size, args.adv_eps).to(device)
            t_judge = time.time() - t1

            # ---- GRPO update on the actor tokens only
            t2 = time.time()
            all_rows = torch.arange(len(ro), device=device)
            old_logp = None if args.num_iterations == 1 else rollout_logprobs(model, ro, all_rows, args.temperature, args.micro_batch_size)
            ref_logp = None
            if args.beta > 0:
                with lm.reference() as ref:
                    ref_logp = rollout_logprobs(ref, ro, all_rows, args.temperature, args.micro_batch_size)
            model.train()
            sums = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "grad_norm": 0.0}
            with run.atomic():  # Ctrl-C / SIGTERM wait for the end of the update: no half-updated checkpoint
                for _ in range(args.num_iterations):
                    for mrows in all_rows.split(args.micro_batch_size):
                        logp = token_logprobs(model, ro.prompt_ids[mrows], ro.prompt_mask[mrows], ro.completion_ids[mrows],
                                              ro.completion_mask[mrows], temperature=args.temperature)
                        loss, s = grpo_loss(logp, logp.detach() if old_logp is None else old_logp[mrows],
                                            None if ref_logp is None else ref_logp[mrows], adv[mrows],
                                            ro.completion_mask[mrows], epsilon=args.epsilon, beta=args.beta)
                        w = len(mrows) / len(all_rows)  # the loss is a mean over responses
                        accelerator.backward(loss * w)
                        sums["loss"] += loss.item() * w / args.num_iterations
                        sums["kl"] += float(s["kl"]) * w / args.num_iterations
                        sums["clip_frac"] += float(s["clip_frac"]) * w / args.num_iterations
                    sums["grad_norm"] += float(accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)) / args.num_iterations
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                t_update = time.time() - t2
                step, cursor = step + 1, stream.cursor

                # ---- logging
                valid = torch.tensor([p.valid for p in parsed], dtype=torch.float32)
                judged = ~torch.isnan(scores)
                tgt_of = [row(i)[1] for i in range(len(parsed))]
                n_valid = max(int(valid.sum()), 1)
                tokens = int(ro.completion_mask.sum())
                step_s = time.time() - t0
                metrics = {
                    "train/reward": rewards.mean().item(), "train/reward_std": rewards.std().item(),
                    "train/format_rate": valid.mean().item(), "train/loss": sums["loss"], "train/kl": sums["kl"],
                    "train/grad_norm": sums["grad_norm"], "train/completion_len": tokens / len(ro),
                    "train/truncated_frac": ro.truncated.float().mean().item(), "train/lr": scheduler.get_last_lr()[0],
                    "ssr_zero/judge_calls": int(judged.sum()),
                    "ssr_zero/lang_ratio": sum(guess_language(p.answer) == t for p, t in zip(parsed, tgt_of) if p.valid) / n_valid,
                    "ssr_zero/quote_frac": sum(p.quoted for p in parsed) / n_valid,
                    "ssr_zero/answer_chars": sum(len(p.answer) for p in parsed) / n_valid,
                    "ssr_zero/group_std": rewards.view(-1, args.group_size).std(1).mean().item(),  # 0: no signal
                    "ssr_zero/zero_std_frac": (rewards.view(-1, args.group_size).std(1) == 0).float().mean().item(),
                    "grpo/clip_frac": sums["clip_frac"], "perf/step_s": step_s, "perf/gen_s": t_gen,
                    "perf/judge_s": t_judge, "perf/update_s": t_update, "perf/tokens_per_s": tokens / step_s}
                if judged.any():  # mean s_i over the judged answers; the share of judge outputs without a number
                    metrics |= {"ssr_zero/self_score": scores[judged].mean().item(),
                                "ssr_zero/judge_parse_fail": 1 - judge_ok[judged].mean().item()}
                run.logger.log(metrics, step)
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['train/reward']:.2f}", fmt=f"{metrics['train/format_rate']:.2f}")
            last = step == args.total_steps or not run.budget_left()
            if last and step < args.total_steps:
                run.log(f"token budget spent after step {step}: {run.tokens_spent()} of {args.token_budget} tokens")
            if step % args.eval_every == 0 or last:
                last_eval = evaluate(step)
            if step % args.save_every == 0 or last:
                run.save(lm, step=step, cursor=cursor)
    except KeyboardInterrupt:
        run.save_on_interrupt(lm, f"step {step}", step=step, cursor=cursor)
        raise
    finally:
        bar.close()
        run.close()
    if before is not None and last_eval is not None:
        run.log(f"test chrF: before {before['eval']['chrf']:.2f}, after {last_eval['eval']['chrf']:.2f}")
    return run.summary(lm, None, None) | {"before": before, "after": last_eval}


if __name__ == "__main__":
    main(cli(Args))
