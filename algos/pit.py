"""PIT — implicit self-improvement learned from preference data.

Paper: Wang et al., "Enabling Language Models to Implicitly Learn Self-Improvement", ICLR 2024,
arXiv:2310.00898. Spec: shared/papers/pit.md (§ below; the paper's body was not readable, so the
equations are rebuilt from detailed readings of it, and the items marked [unverified] there are flags).

Self-Refine needs a hand-written rubric of what "better" means. PIT learns it from the preference pairs
(x, y_w, y_l) that would train an RLHF reward model, by conditioning all three RLHF stages on a
reference answer: an improver M_PIT learns to write y_w given y_l; a gap reward model R_PIT(x, y_a, y_b)
scores how much better y_a is than y_b; RL makes M_PIT's answer beat its reference, first references
from the data, then references from the policy model M_P. At inference M_PIT rewrites its own output.

    L_SFT  = −Σ_D log M_PIT(y_w | x, y_l)                  loss on y_w's tokens only          (§2)
    r^{a,b} = R_PIT(x, y_a, y_b)
    L_RM   = −Σ_D [ log σ(r^{w,l} − r^{w,w}) + log σ(r^{w,l} − r^{l,l}) + log σ(r^{w,l} − r^{l,w})
                    + log σ(r^{w,w} − r^{l,w}) + log σ(r^{l,l} − r^{l,w}) ]                      (Eq. 2)
    max E_{x, y_ref, y ~ M_PIT(·|x, y_ref)} [ R_PIT(x, y, y_ref) − β KL(M_PIT(·|x, y_ref) ‖ M_PIT^SFT(·|x, y_ref)) ]
                                                                                               (Eqs. 4–5)
    round 0: y_ref = y_l from D;  round 1: y_ref ~ M_P(·|x), fresh for every batch          (curriculum)
    y^0 ~ M_P(·|x),  y^{k+1} ~ M_PIT(·|x, y^k)                                            (inference)

Choices (the paper leaves them open, spec §4 and §7): the RL algorithm is REINFORCE with the KL in
the reward (a per-sequence Σ_t log π_θ − log π_SFT on the same (x, y_ref) prompt) and a leave-one-out
baseline over G answers per (x, y_ref) (RLOO); an answer cut off at --max-new-tokens gets no reward and
no gradient (`--score-truncated` scores it); R_PIT starts from the SFT model plus a linear head read at
the last token; each training stage is one fresh AdamW run at a constant learning rate; the optional
stop rule (keep y^k once R_PIT(x, y^{k+1}, y^k) ≤ 0) is not from the paper and is reported next to the
plain chain, from the same samples. The preference data are built offline from a task (shared/
preferences.py) or are Anthropic HH / TL;DR comparisons from the Hub. Runs on one process. `--token-budget`
counts the RL rounds' samples (answers, M_P's references): round r of R ends once (r + 1)/R of it is spent.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python algos/pit.py` finds `shared`

import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.nn.utils.rnn import pad_sequence
from tqdm.auto import tqdm

from shared.args import LMArgs, cli, require, usage_error
from shared.logprobs import token_logprobs
from shared.models import chat_prompt, load_model
from shared.preferences import Triple, builtin_triples, hub_triples, quality, reward_model_judge
from shared.rollouts import PromptStream, rollout_logprobs
from shared.run import Run
from shared.sampling import encode_prompts, generate, uncounted


@dataclass
class Args(LMArgs):  # the experiment flags (--model, --task, --seed, ...) come from shared/args.py
    """PIT (arXiv:2310.00898): improvement SFT, the gap reward model, curriculum RL and iterative inference,
    each stage resumable. Runs on one process."""

    task: str = "multistep"
    """task behind the built-in preference set (`multistep` or `arith`); ignored for Hub preference sets"""
    n_train: int = 400
    """training triples (x, y_w, y_l): SFT and RM data, and the RL prompts"""
    n_test: int = 100
    """held-out triples: RM ordering accuracy, and the prompts of the inference evaluation (reported only)"""
    max_new_tokens: int = 64
    """generation budget of every answer (RL samples, M_P references, inference chains)"""
    temperature: float = 1.0
    """T of the RL samples from M_PIT (log-probs and KL use logits / T)"""
    lr: float = 1e-5
    """AdamW learning rate of the SFT and RM stages (spec §4: 1e-5)"""

    # ---- data and models
    preferences: Literal["builtin", "hh-rlhf", "tldr"] = "builtin"
    """preference set D: built from --task offline, or Anthropic/hh-rlhf or TL;DR comparisons (Hub)"""
    policy_model: str | None = None
    """M_P, whose answers PIT improves (round-1 references, y^0): None = the base chat model --model"""
    improve_template: str = "{prompt}\n\nReference response:\n{reference}\n\nImproved response:"
    """the M_PIT prompt (user turn): x and y_ref, no rubric of how to improve (§5); same in SFT, RL, inference"""
    rm_template: str = "{prompt}\n\nResponse A:\n{a}\n\nResponse B:\n{b}"
    """the R_PIT input (user turn); the scalar read at its last token is the gap of A over B (§5)"""

    # ---- stage 1: improvement SFT
    sft_epochs: int = 1
    """epochs of L_SFT over the training triples"""
    batch_size: int = 8
    """triples per SFT and per RM step"""
    # ---- stage 2: gap reward model
    rm_epochs: int = 1
    """epochs of L_RM (Eq. 2) over the training triples (four R_PIT passes per triple)"""
    # ---- stage 3: curriculum RL
    curriculum: tuple[Literal["data", "policy"], ...] = ("data", "policy")
    """reference source of each RL round: `data` (y_l from D, Opt^{RL,0}) then `policy` (y_ref ~ M_P, Opt^{RL,1})"""
    ref_winners: bool = False
    """[unverified] `data` rounds also use y_w as the reference (every other prompt); default y_l only"""
    rl_steps: int = 8
    """updates per RL round (spec §4: round 1 as long as round 0)"""
    rl_batch_size: int = 4
    """(x, y_ref) prompts per RL update"""
    group_size: int = 4
    """G: answers sampled per (x, y_ref); each one's baseline is the mean reward of the other G − 1"""
    beta: float = 0.05
    """β: weight of the KL to M_PIT^SFT inside the reward (spec §4: 0.05)"""
    rl_lr: float = 1e-5
    """AdamW learning rate of the RL rounds (spec §4 suggests 1e-6 at scale; 1e-5 suits a 135M model, as in grpo.py)"""
    ref_temperature: float = 0.5
    """T of the references sampled from M_P in `policy` rounds (0 = greedy)"""
    score_truncated: bool = False
    """score an RL answer cut off at --max-new-tokens with R_PIT (default: no reward, no gradient)"""
    # ---- stage 4: iterative inference
    improve_iterations: int = 3
    """K: rewrites y^1..y^K of y^0 at inference (the paper looks at up to 5)"""
    infer_temperature: float = 0.5
    """T of y^0 ~ M_P and y^{k+1} ~ M_PIT at inference (paper: PIT best at 0.4–0.6; 0 = greedy)"""
    judge_rm: str | None = None
    """an HF sequence-classification reward model R(x, y) as a second judge of y^k vs y^0 (e.g. a DeBERTa RM)"""
    # ---- optimisation
    micro_batch_size: int = 8
    """sequences per forward/backward (gradient accumulation; no effect on the maths)"""
    max_grad_norm: float = 1.0
    """gradient-norm clip"""
    save_every: int = 20
    """checkpoint every this many updates inside a stage (and at every stage's end, and on Ctrl-C)"""

    RULES: ClassVar[dict[str, str]] = {
        "temperature": "> 0", "sft_epochs": ">= 0", "batch_size": "> 0", "rm_epochs": ">= 0", "rl_steps": ">= 0",
        "rl_batch_size": "> 0", "group_size": ">= 2; the baseline is the mean of the other answers", "beta": ">= 0",
        "rl_lr": ">= 0", "ref_temperature": ">= 0", "improve_iterations": ">= 0", "infer_temperature": ">= 0",
        "micro_batch_size": "> 0", "max_grad_norm": "> 0", "save_every": ">= 1"}

    def check(self) -> None:
        super().check()
        require(self.preferences != "builtin" or self.task in ("multistep", "arith"), "task", self.task,
                "the built-in preference set is made from multistep or arith")
        for name, keys in (("improve_template", ("prompt", "reference")), ("rm_template", ("prompt", "a", "b"))):
            text, fields = getattr(self, name), {k: f"<{k}>" for k in keys}
            try:
                ok = all(v in text.format(**fields) for v in fields.values())
            except (KeyError, IndexError, ValueError):
                ok = False
            require(ok, name, repr(text), "must hold " + " and ".join(f"{{{k}}}" for k in keys) + " and no other {field}")


# ------------------------------------------------------------------------------------ ALGO LOGIC
RM_PAIRS = (("w", "l"), ("l", "w"), ("w", "w"), ("l", "l"))  # the four R_PIT inputs of a triple, in this order


def pit_rm_loss(r_wl: torch.Tensor, r_lw: torch.Tensor, r_ww: torch.Tensor, r_ll: torch.Tensor) -> torch.Tensor:
    """Eq. 2, averaged over triples: r^{w,l} above both symmetric gaps and above r^{l,w}, both symmetric
    gaps above r^{l,w}. Nothing ties r^{w,w} to r^{l,l} or to 0 (spec §2)."""
    terms = (F.logsigmoid(r_wl - r_ww) + F.logsigmoid(r_wl - r_ll) + F.logsigmoid(r_wl - r_lw)
             + F.logsigmoid(r_ww - r_lw) + F.logsigmoid(r_ll - r_lw))
    return -terms.mean()


def ordering_accuracy(r_wl, r_lw, r_ww, r_ll) -> dict[str, float]:
    """How often each of Eq. 2's five orderings holds strictly (r^{w,l} > r^{w,w}, ...)."""
    pairs = {"wl>ww": (r_wl, r_ww), "wl>ll": (r_wl, r_ll), "wl>lw": (r_wl, r_lw), "ww>lw": (r_ww, r_lw), "ll>lw": (r_ll, r_lw)}
    return {k: (a > b).float().mean().item() for k, (a, b) in pairs.items()}


def sft_loss(logp: torch.Tensor, mask: torch.Tensor, num_tokens: float) -> torch.Tensor:
    """L_SFT: −Σ mask · log M_PIT(y_w | x, y_l) / (y_w tokens of the whole batch); x and y_l are the
    prompt, so they never enter `logp` (token_logprobs scores completion tokens only)."""
    return -(logp * mask.to(logp.dtype)).sum() / max(float(num_tokens), 1.0)


def pit_reward(gap: torch.Tensor, logp: torch.Tensor, anchor_logp: torch.Tensor, mask: torch.Tensor,
               beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eqs. 4–5 as a per-answer reward: R_PIT(x, y, y_ref) − β · KL, with KL the sampled estimate
    Σ_t log M_PIT(y_t|x, y_ref, y_<t) − log M_PIT^SFT(y_t|x, y_ref, y_<t) (both on the same prompt)."""
    kl = ((logp - anchor_logp) * mask.to(logp.dtype)).sum(1)
    return gap - beta * kl, kl


def rloo_advantages(reward: torch.Tensor, valid: torch.Tensor, group_size: int) -> torch.Tensor:
    """A_i = r_i − mean of the other valid answers of its group (REINFORCE leave-one-out); 0 for an
    invalid answer and for a valid one without a valid neighbour."""
    r, v = reward.view(-1, group_size), valid.view(-1, group_size).to(reward.dtype)
    n_others = v.sum(1, keepdim=True) - v
    baseline = ((r * v).sum(1, keepdim=True) - r * v) / n_others.clamp(min=1)
    return torch.where((n_others > 0) & (v > 0), r - baseline, torch.zeros_like(r)).flatten()


def reinforce_loss(logp: torch.Tensor, mask: torch.Tensor, adv: torch.Tensor, num_seqs: float) -> torch.Tensor:
    """−(1/N) Σ_i A_i Σ_t log π(y_{i,t}): the policy gradient of the reward above (A detached)."""
    return -(adv.detach().to(logp.dtype) * (logp * mask.to(logp.dtype)).sum(1)).sum() / max(float(num_seqs), 1.0)


def stop_index(gaps: list[float]) -> int:
    """The optional stop rule: with gaps[k] = R_PIT(x, y^{k+1}, y^k), the chain ends at the first k whose
    rewrite is no better (gap ≤ 0) and keeps y^k; without one it runs to y^K."""
    return next((k for k, g in enumerate(gaps) if g <= 0), len(gaps))


def win_lose(q: list[int], q_ref: list[int]) -> tuple[float, float]:
    """(win, lose): how often a grade is strictly above / below its reference's; Δ = win − lose (§4)."""
    return sum(a > b for a, b in zip(q, q_ref)) / max(len(q), 1), sum(a < b for a, b in zip(q, q_ref)) / max(len(q), 1)


def improvement_message(template: str, x: str, y_ref: str) -> str:
    return template.format(prompt=x, reference=y_ref)


def rm_quadruple(t: Triple) -> list[tuple[str, str, str]]:
    """The four R_PIT inputs (x, y_a, y_b) of a triple in RM_PAIRS order: (w,l), (l,w), (w,w), (l,l)."""
    return [(t.x, getattr(t, f"y_{a}"), getattr(t, f"y_{b}")) for a, b in RM_PAIRS]


def references(source: str, triples: list[Triple], positions: list[int], sample_policy, winners: bool) -> list[str]:
    """y_ref of an RL batch: `data` → y_l from D (with `winners`, y_w at odd stream positions);
    `policy` → one fresh answer of M_P per x (`sample_policy(xs)`; M_PIT never makes references)."""
    if source == "data":
        return [t.y_w if winners and pos % 2 else t.y_l for t, pos in zip(triples, positions)]
    return sample_policy([t.x for t in triples])


def improve_chain(xs: list[str], first, improve, template: str, K: int) -> list[list[tuple[str, bool]]]:
    """[y^0, …, y^K] per x: y^0 = first(xs), y^{k+1} = improve(prompts holding y^k verbatim); both give (text, truncated)."""
    chain = [first(xs)]
    for _ in range(K):
        chain.append(improve([improvement_message(template, x, y) for x, (y, _) in zip(xs, chain[-1])]))
    return chain


# ------------------------------------------------------------------------------------ helpers
class GapRewardModel(torch.nn.Module):
    """R_PIT(x, y_a, y_b): the LM's decoder reads x, y_a and y_b; a linear head maps the hidden state at
    the last token to one scalar, the gap of y_a over y_b."""

    def __init__(self, lm, seed: int):
        super().__init__()
        self.lm, hidden = lm, lm.config.hidden_size
        self.head = torch.nn.utils.skip_init(torch.nn.Linear, hidden, 1, device=next(lm.parameters()).device)
        with torch.no_grad():  # its own generator: building the head draws nothing from the global RNG
            self.head.weight.copy_(torch.randn(1, hidden, generator=torch.Generator().manual_seed(seed)) / hidden ** 0.5)
            self.head.bias.zero_()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        base = self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
        out = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return self.head(out.last_hidden_state[:, -1].float()).squeeze(-1)  # left-padded: column −1 is each row's last token


def trainable(module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def save_weights(tensors: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({n: t.detach().cpu().contiguous() for n, t in tensors.items()}, str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)


def load_weights(module, path: Path) -> None:
    unexpected = module.load_state_dict(load_file(str(path)), strict=False).unexpected_keys
    assert not unexpected, f"{path} holds weights the model lacks: {unexpected[:3]}"


def seed_of(seed: int, stage: str, update: int) -> int:
    """The RNG seed of one update of one stage: a run interrupted anywhere and resumed samples the same."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{stage}/{update}".encode()).digest()[:7], "big")


def sft_batch(tokenizer, template: str, triples: list[Triple], device):
    """(x, y_l) → y_w: prompts (x, y_l) left-padded; completions (y_w, end of turn) right-padded, mask 1 on them."""
    prompts = [chat_prompt(tokenizer, improvement_message(template, t.x, t.y_l)) for t in triples]
    p_ids, p_mask = encode_prompts(tokenizer, prompts)
    targets = [torch.tensor(tokenizer(t.y_w, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]) for t in triples]
    c_ids = pad_sequence(targets, batch_first=True, padding_value=tokenizer.pad_token_id)
    c_mask = pad_sequence([torch.ones(len(c)) for c in targets], batch_first=True)
    return p_ids.to(device), p_mask.to(device), c_ids.to(device), c_mask.to(device)


def rm_scores(rm, tokenizer, template: str, items: list[tuple[str, str, str]], micro: int, accelerator) -> torch.Tensor:
    """R_PIT(x, y_a, y_b) for each (x, y_a, y_b), `micro` inputs per forward pass (with autograd when on)."""
    out = []
    for i in range(0, len(items), micro):
        texts = [chat_prompt(tokenizer, template.format(prompt=x, a=a, b=b)) for x, a, b in items[i:i + micro]]
        ids, mask = encode_prompts(tokenizer, texts)
        with accelerator.autocast():
            out.append(rm(ids.to(accelerator.device), mask.to(accelerator.device)))
    return torch.cat(out) if out else torch.zeros(0)


def kl_logprobs(model, anchor, ro, temperature: float, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    """log M_PIT and log M_PIT^SFT of the sampled answers, both on the rollout's own prompt (x, y_ref)."""
    rows = torch.arange(len(ro), device=ro.prompt_ids.device)
    return (rollout_logprobs(model, ro, rows, temperature, micro), rollout_logprobs(anchor, ro, rows, temperature, micro))


def epoch_batches(n: int, batch_size: int, epochs: int, seed: int) -> list[list[int]]:
    """`epochs` seeded permutations of range(n) cut into batches (the last one of an epoch may be short)."""
    perms = [torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1009 + e)).tolist() for e in range(epochs)]
    return [perm[i:i + batch_size] for perm in perms for i in range(0, n, batch_size)]


def optimizer_step(model, optimizer, max_grad_norm: float) -> float:
    norm = float(torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


@dataclass
class Pipeline:
    """What the stages share. `pos`: the finished stages, the updates done in the current one, the logged steps;
    `rm_state`: R_PIT's weights and AdamW state while stage 2 runs (they ride in the checkpoint until it ends)."""

    args: Args
    run: Run
    lm: Any
    task: Any
    train: list[Triple]
    heldout: list[Triple]
    pos: dict
    models: Path  # sft.safetensors (M_PIT^SFT) and rm.safetensors (R_PIT)
    rm_state: dict | None = None
    stage: str = ""
    mp: Any = None

    def log(self, metrics: dict) -> None:
        self.run.logger.log(metrics, self.pos["step"])

    def checkpoint(self) -> None:
        self.run.save(self.lm, **self.pos, rm_state=self.rm_state)

    def update_done(self, k: int, total: int, metrics: dict) -> None:
        """The end of update k of `total` (inside its atomic block): count it, log it, checkpoint now and then."""
        self.pos["update"], self.pos["step"] = k + 1, self.pos["step"] + 1
        self.log(metrics)
        if self.pos["update"] % self.args.save_every == 0 and self.pos["update"] < total:
            self.checkpoint()

    def score(self, rm, items: list[tuple[str, str, str]]) -> torch.Tensor:
        """R_PIT(x, y_a, y_b) of every (x, y_a, y_b)."""
        return rm_scores(rm, self.lm.tokenizer, self.args.rm_template, items, self.args.micro_batch_size, self.run.accelerator)

    def answers(self, model, messages: list[str], n: int, temperature: float):
        """A Rollout of n answers of `model` to every message (T = 0: greedy), at most --max-new-tokens each."""
        tok = self.lm.tokenizer
        return generate(model, tok, [chat_prompt(tok, m) for m in messages], n=n, max_new_tokens=self.args.max_new_tokens,
                        temperature=max(temperature, 1e-6), greedy=temperature == 0, batch_size=64)

    def frozen(self, path: Path | None = None):
        """A frozen copy of the policy (the same structure and precision), with `path`'s weights if given."""
        m = self.run.frozen_copy(self.lm)
        if path is not None:
            load_weights(m, path)
        return m

    def reward_model(self, train: bool = False) -> GapRewardModel:
        """R_PIT: from M_PIT's SFT weights plus a new head (stage 2), or as trained (later stages)."""
        rm = GapRewardModel(self.frozen(), seed=self.args.seed)
        if not train:
            load_weights(rm, self.models / "rm.safetensors")
            return rm.eval()
        names = set(trainable(self.lm.policy))  # with LoRA only the adapters (and the head) train
        for n, p in rm.lm.named_parameters():
            p.requires_grad_(n in names)
        return rm.train()

    def policy_model(self):
        """M_P, frozen and loaded once: --policy-model, or the base chat model M_PIT started from."""
        if self.mp is None:
            acc = self.run.accelerator
            mp, _ = load_model(self.args.policy_model or self.args.model, device=acc.device, seed=self.args.seed,
                               log=self.run.log)
            self.mp = acc.prepare_model(mp.eval().requires_grad_(False), evaluation_mode=True)
        return self.mp


# ------------------------------------------------------------------------------------ main
def main(args: Args) -> dict:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        usage_error("pit.py runs on one process (its four stages hold two trainable models); start it without torchrun")
    run = Run("pit", args, task=args.preferences == "builtin")  # flags, resume, task, run dir (shared/run.py)
    args, task = run.args, run.task
    if args.preferences == "builtin":  # held-out triples are the same for every seed
        train, heldout = builtin_triples(task, task.train, args.seed), builtin_triples(task, task.test, 0)
    else:
        train, heldout = (hub_triples(args.preferences, split, n, args.seed)
                          for split, n in (("train", args.n_train), ("test", args.n_test)))
    run.log(f"preferences: {len(train)} training and {len(heldout)} held-out triples ({args.preferences})")
    lm = run.setup_lm(restore=False)  # M_PIT: starts as the base LM
    state = run.restore(lm)  # --resume: weights, optimizer, where the run stands
    where = {"completed": state.get("completed", []), "update": state.get("update", 0), "step": state.get("step", 0)}
    p = Pipeline(args, run, lm, task, train, heldout, where, run.dir / "models", state.get("rm_state"))
    stages = ["sft", "rm", *(f"rl{r}:{src}" for r, src in enumerate(args.curriculum)), f"infer:{len(args.curriculum)}"]
    results = {}
    try:
        for name in stages:
            if name in p.pos["completed"]:
                continue
            p.stage, t0, metrics = name, time.time(), {}
            if name == "sft":  # ---- stage 1: M_PIT learns to write y_w given (x, y_l)
                train_sft(p)
                save_weights(trainable(lm.policy), p.models / "sft.safetensors")
            elif name == "rm":  # ---- stage 2: R_PIT with the five-term loss of Eq. 2
                rm = p.reward_model(train=True)
                train_rm(p, rm)
                save_weights(trainable(rm), p.models / "rm.safetensors")
            elif name.startswith("rl"):  # ---- stage 3: one curriculum round, KL to M_PIT^SFT
                rl_round(p, p.reward_model(), p.frozen(p.models / "sft.safetensors"))
            else:  # ---- stage 4: y^0 from M_P, then K rewrites by M_PIT
                results = metrics = infer(p, p.reward_model(), p.policy_model())
            with run.atomic():  # the stage's end and its checkpoint go together
                p.log(metrics | {f"perf/stage_s/{name}": time.time() - t0})
                lm.optimizer.state.clear()  # each training stage is a fresh AdamW run
                p.pos |= {"completed": p.pos["completed"] + [name], "update": 0}
                p.rm_state = None
                p.checkpoint()
            run.log(f"stage {name} done in {time.time() - t0:.0f} s")
    except KeyboardInterrupt:
        run.save_on_interrupt(lm, f"stage {p.stage} update {p.pos['update']}", **p.pos, rm_state=p.rm_state)
        raise
    finally:
        run.close()
    return run.summary(lm, None, None) | {"inference": results, "policy_model": p.mp}


def train_sft(p: Pipeline) -> None:
    """Stage 1: L_SFT over `sft_epochs` of the training triples, one atomic update per batch."""
    args, model, optimizer, tok = p.args, p.lm.model, p.lm.optimizer, p.lm.tokenizer
    batches = epoch_batches(len(p.train), args.batch_size, args.sft_epochs, args.seed)
    for group in optimizer.param_groups:
        group["lr"] = args.lr
    model.train()
    for k in tqdm(range(p.pos["update"], len(batches)), desc="sft", leave=False):
        t0, batch = time.time(), [p.train[i] for i in batches[k]]
        n_tok = sum(len(tok(t.y_w, add_special_tokens=False).input_ids) + 1 for t in batch)
        with p.run.atomic():
            loss_sum = 0.0
            for i in range(0, len(batch), args.micro_batch_size):
                b = sft_batch(tok, args.improve_template, batch[i:i + args.micro_batch_size], p.run.accelerator.device)
                loss = sft_loss(token_logprobs(model, *b), b[3], n_tok)
                loss.backward()
                loss_sum += loss.item()
            grad_norm = optimizer_step(model, optimizer, args.max_grad_norm)
            p.update_done(k, len(batches), {"sft/loss": loss_sum, "sft/grad_norm": grad_norm,
                                            "perf/step_s": time.time() - t0, "perf/tokens_per_s": n_tok / (time.time() - t0)})


def train_rm(p: Pipeline, rm: GapRewardModel) -> None:
    """Stage 2: Eq. 2 over `rm_epochs` of the training triples; held-out ordering accuracy before and after."""
    args = p.args
    optimizer = torch.optim.AdamW(trainable(rm).values(), lr=args.lr, weight_decay=0.0)
    if p.rm_state is not None:  # resumed inside the stage
        rm.load_state_dict(p.rm_state["weights"], strict=False)
        optimizer.load_state_dict(p.rm_state["optimizer"])

    def heldout_accuracy(prefix: str) -> None:
        rm.eval()
        with torch.no_grad():
            r = p.score(rm, [q for t in p.heldout for q in rm_quadruple(t)]).view(-1, 4)
        rm.train()
        res = ordering_accuracy(*r.unbind(1))
        p.log({f"rm/{prefix}/{k}": v for k, v in res.items()})
        p.run.log(f"R_PIT held-out ordering accuracy ({prefix}): " + ", ".join(f"{k} {v:.2f}" for k, v in res.items()))

    batches = epoch_batches(len(p.train), args.batch_size, args.rm_epochs, args.seed + 1)
    if p.pos["update"] == 0:
        heldout_accuracy("heldout_init")
    per_micro = max(args.micro_batch_size // 4, 1)  # triples per forward pass (4 inputs each)
    for k in tqdm(range(p.pos["update"], len(batches)), desc="rm", leave=False):
        t0, batch, scores = time.time(), [p.train[i] for i in batches[k]], []
        with p.run.atomic():
            loss_sum = 0.0
            for i in range(0, len(batch), per_micro):
                chunk = batch[i:i + per_micro]
                r = p.score(rm, [q for t in chunk for q in rm_quadruple(t)]).view(-1, 4)
                loss = pit_rm_loss(*r.unbind(1)) * len(chunk) / len(batch)
                loss.backward()
                loss_sum += loss.item()
                scores.append(r.detach())
            grad_norm = optimizer_step(rm, optimizer, args.max_grad_norm)
            p.rm_state = {"weights": trainable(rm), "optimizer": optimizer.state_dict()}
            r = torch.cat(scores)
            p.update_done(k, len(batches), {"rm/loss": loss_sum, "rm/grad_norm": grad_norm, "perf/step_s": time.time() - t0}
                          | {f"rm/train/{key}": v for key, v in ordering_accuracy(*r.unbind(1)).items()}
                          | {f"rm/r_{a}{b}": r[:, j].mean().item() for j, (a, b) in enumerate(RM_PAIRS)})
    heldout_accuracy("heldout")


def rl_round(p: Pipeline, rm: GapRewardModel, anchor) -> None:
    """Stage 3, one round: REINFORCE (leave-one-out baseline) on R_PIT(x, y, y_ref) − β KL, with y_ref from
    the data (`data`) or sampled from M_P (`policy`). Every update draws from its own seed."""
    args, acc, model, optimizer, tok = p.args, p.run.accelerator, p.lm.model, p.lm.optimizer, p.lm.tokenizer
    source, G, B, T, mb = p.stage.split(":")[1], args.group_size, args.rl_batch_size, args.temperature, args.micro_batch_size
    for group in optimizer.param_groups:
        group["lr"] = args.rl_lr

    sample_policy = lambda xs: p.answers(p.policy_model(), xs, 1, args.ref_temperature).texts  # noqa: E731  M_P's references
    rnd = int(p.stage[2:].split(":")[0])  # only RL generates for training (SFT and RM run in full, inference is uncounted)
    for k in tqdm(range(p.pos["update"], args.rl_steps), desc=p.stage, leave=False):
        if args.token_budget and p.run.tokens_spent() >= args.token_budget * (rnd + 1) / len(args.curriculum):
            break  # this round's share of --token-budget is spent
        t0 = time.time()
        torch.manual_seed(seed_of(args.seed, p.stage, k))
        stream = PromptStream(len(p.train), seed_of(args.seed, p.stage, -1) % 2**31, cursor=k * B)
        triples = [p.train[i] for i in stream.take(B)]
        model.eval()
        refs = references(source, triples, list(range(k * B, (k + 1) * B)), sample_policy, args.ref_winners)
        ro = p.answers(model, [improvement_message(args.improve_template, t.x, r) for t, r in zip(triples, refs)], G, T)
        t_gen = time.time() - t0
        pairs = [(t, r) for t, r in zip(triples, refs) for _ in range(G)]  # (triple, y_ref) of every answer
        with torch.no_grad():
            gap = p.score(rm, [(t.x, y, r) for (t, r), y in zip(pairs, ro.texts)])
            copy_gap = p.score(rm, [(t.x, r, r) for t, r in zip(triples, refs)])
            logp, anchor_logp = kl_logprobs(model, anchor, ro, T, mb)
        reward, kl = pit_reward(gap.to(acc.device), logp, anchor_logp, ro.completion_mask, args.beta)
        valid = torch.ones_like(ro.truncated) if args.score_truncated else ~ro.truncated
        adv = rloo_advantages(reward, valid, G)
        model.train()
        with p.run.atomic():
            t1, loss_sum, n_valid = time.time(), 0.0, int(valid.sum())
            for rows in torch.arange(len(ro), device=acc.device).split(mb):
                logp_g = token_logprobs(model, ro.prompt_ids[rows], ro.prompt_mask[rows], ro.completion_ids[rows],
                                        ro.completion_mask[rows], temperature=T)
                loss = reinforce_loss(logp_g, ro.completion_mask[rows], adv[rows], n_valid)
                loss.backward()
                loss_sum += loss.item()
            grad_norm = optimizer_step(model, optimizer, args.max_grad_norm)
            metrics = {"train/reward": (reward * valid).sum().item() / max(n_valid, 1), "pit/gap": gap.mean().item(),
                       "pit/copy_gap": copy_gap.mean().item(), "train/kl": kl.mean().item(), "train/loss": loss_sum,
                       "train/grad_norm": grad_norm, "pit/round": rnd, "perf/gen_s": t_gen,
                       "train/truncated_frac": ro.truncated.float().mean().item(),
                       "train/completion_len": ro.completion_mask.sum(1).float().mean().item(),
                       "pit/ref_len": sum(len(tok(r).input_ids) for r in refs) / B, "perf/update_s": time.time() - t1,
                       "perf/step_s": time.time() - t0, "perf/tokens_per_s": ro.completion_mask.sum().item() / (time.time() - t0)}
            if p.task is not None:  # the verifier's view of the same answers: did they beat their reference?
                q = [quality(p.task, t.problem, y, tr) for (t, _), y, tr in zip(pairs, ro.texts, ro.truncated.tolist())]
                win, lose = win_lose(q, [quality(p.task, t.problem, r) for t, r in pairs])
                metrics |= {"train/accuracy": sum(x > 0 for x in q) / len(q), "pit/true_win": win, "pit/true_lose": lose}
            p.update_done(k, args.rl_steps, metrics)


@torch.no_grad()
def infer(p: Pipeline, rm: GapRewardModel, mp) -> dict:
    """Stage 4: y^0 ~ M_P, y^{k+1} ~ M_PIT(·|x, y^k) on the held-out prompts. Per k: accuracy and win/lose
    against y^0 by the task's exact grade (built-in data), R_PIT's verdict R_PIT(x, y^k, y^0) > 0, the judge
    RM's (--judge-rm), and the same for the chain with the stop rule. Texts go to inference_<rounds>.jsonl."""
    args, acc, tok, K = p.args, p.run.accelerator, p.lm.tokenizer, p.args.improve_iterations
    torch.manual_seed(seed_of(args.seed, "infer", 0))  # y^0 is the same in every run of this seed
    p.lm.model.eval()

    def answers(model):
        def fn(messages: list[str]) -> list[tuple[str, bool]]:
            ro = p.answers(model, messages, 1, args.infer_temperature)
            return list(zip(ro.texts, ro.truncated.tolist()))
        return fn

    xs = [t.x for t in p.heldout]
    with uncounted():  # held-out evaluation: not part of the --token-budget
        chain = improve_chain(xs, answers(mp), answers(p.lm.model), args.improve_template, K)
    texts = [[y for y, _ in c] for c in chain]
    gap0 = [p.score(rm, list(zip(xs, texts[k], texts[0]))).cpu() for k in range(K + 1)]  # R_PIT(x, y^k, y^0); k = 0: a copy
    step_gaps = [(gap0[1] if k == 0 else p.score(rm, list(zip(xs, texts[k + 1], texts[k])))).tolist()
                 for k in range(K)]  # R_PIT(x, y^{k+1}, y^k)
    stops = [stop_index([g[i] for g in step_gaps]) for i in range(len(xs))]
    judge = reward_model_judge(args.judge_rm, acc.device) if args.judge_rm else None
    judge0 = judge(xs, texts[0]) if judge is not None else None
    grade = lambda i, j: quality(p.task, p.heldout[i].problem, *chain[j][i])  # noqa: E731  (built-in data)
    q0 = [grade(i, 0) for i in range(len(xs))] if p.task is not None else None
    out = {"infer/stopped_frac": sum(s < K for s in stops) / len(xs), "perf/gen_tokens": p.run.tokens_spent()}
    for k in range(K + 1):
        out |= {f"infer/rm_gap_k{k}": gap0[k].mean().item(),
                f"infer/len_k{k}": sum(len(tok(y).input_ids) for y in texts[k]) / len(xs),
                f"infer/truncated_k{k}": sum(tr for _, tr in chain[k]) / len(xs)}
        if k:
            out[f"infer/rm_win_k{k}"] = (gap0[k] > 0).float().mean().item()
        if judge is not None and k:
            out[f"infer/judge_win_k{k}"] = (judge(xs, texts[k]) > judge0).float().mean().item()
        if p.task is not None:  # exact grades of y^k (and of the stop rule's answer) against y^0
            stopped = [grade(i, min(k, s)) for i, s in enumerate(stops)]  # the stop rule's answer at budget k
            for tag, q in (("", [grade(i, k) for i in range(len(xs))]), ("stop_", stopped)):
                win, lose = win_lose(q, q0)
                out |= {f"infer/{tag}accuracy_k{k}": sum(x > 0 for x in q) / len(q), f"infer/{tag}win_k{k}": win,
                        f"infer/{tag}wellformed_k{k}": sum(x == 2 for x in q) / len(q), f"infer/{tag}lose_k{k}": lose,
                        f"infer/{tag}delta_k{k}": win - lose}
    tag = p.stage.split(":")[1]
    (p.run.dir / f"inference_{tag}.json").write_text(json.dumps(out, indent=1))
    (p.run.dir / f"inference_{tag}.jsonl").write_text("".join(json.dumps(
        {"x": x, "chain": [c[i][0] for c in chain], "truncated": [c[i][1] for c in chain], "stop": stops[i],
         "step_gaps": [g[i] for g in step_gaps]}) + "\n" for i, x in enumerate(xs)))
    if p.task is not None:
        p.run.log(f"{p.stage}: accuracy " + " → ".join(f"{out[f'infer/accuracy_k{k}']:.2f}" for k in range(K + 1))
                  + ", Δ vs y^0 " + " ".join(f"{out[f'infer/delta_k{k}']:+.2f}" for k in range(1, K + 1)))
    return out


if __name__ == "__main__":
    main(cli(Args))
