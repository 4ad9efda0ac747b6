"""MCTS-DPO — step-level Monte Carlo tree search with self-evaluation, then iterative step-level DPO.

Paper: Xie et al., "Monte Carlo Tree Search Boosts Reasoning via Iterative Preference Learning",
arXiv:2405.00451; official code YuxiXie/MCTS-DPO. The paper's body was not readable here, so the
equations cite the sections (§) of the spec shared/papers/mcts_dpo.md, not equation numbers.

Idea: the policy searches its own solutions one step (one line) at a time with AlphaZero-style PUCT.
Every new node is scored once by the policy itself ("is this step correct?", probability C of the
"correct" option) plus ±1 when the node ends in a final answer that the verifier checks; rewards are
differences of successive scores and values are backed up. At every committed decision point the
highest-Q and lowest-Q children share the same prefix and form a step-level preference pair, trained
with conservative DPO whose label smoothing α comes from their visit counts. Rounds repeat with the
improved policy as the new searcher and reference.

    v(c)   = C(c) + O(c),  O ∈ {+1, −1} at a final answer, else 0;   v(root) = 0        §2 [paper]
    r(c)   = v(c) − v(u);   a new child starts with N = 0, V = 0, Q = V(u) + r(c)        §2
    p(c)   = exp( Σ_t log π_θ(a_t | x, s, a_<t) / |a|^λ )                               §2 (prior)
    select argmax_c  Q(c) + w · p(c) · √N(u) / (1 + N(c))                               §2 (PUCT)
    backup leaf: Q ← r + γV, N += 1; ancestors u: V(u) = Σ_c max(1,N_c) Q_c / Σ_c max(1,N_c),
           N(u) += 1, Q(u) ← r(u) + γV(u)                                                §2
    commit argmax_c (N_c·(1 + g_c), Q_c, V_c),  g_c = max − min visits among c's children  §2
    h      = [log π_θ(y_w|x) − log π_ref(y_w|x)] − [log π_θ(y_l|x) − log π_ref(y_l|x)]   (sums from
             the first token where y_w and y_l differ)                                   §2
    α      = min(N_l / (max(1, N_w) + N_l), 0.5)                                         §2 (cDPO)
    L      = −(1 − α) log σ(βh) − α log σ(−βh),  averaged over a tree's pairs, then trees  §2

Choices (the spec's [code] items are flags; where paper and code differ the paper is the default):
rounds of (search every prompt with π_{i−1} → DPO on the new pairs) with π_ref = π_{i−1} (paper;
`--fixed-reference`: the code's π_ref = the initial policy); the self-evaluation prompt hides the gold
solution (`--eval-hint` shows it, as the code does); v = C + O (`--code-score`: the code's
C / max(d_u − 3, 1), and O = 1.25 for a right answer that is not a prefix of the gold solution); a
judgement with no A/B token (C = 0) inherits v(u) (code; the paper is silent). A step is one line (the
code cuts at lines/sentences); from `--finish-depth` one action finishes the solution (the code's
force_terminating_on_depth_limit); a solution cut off at --max-new-tokens is wrong (O = −1, the
project's rule; `--no-truncated-wrong`: no O term, as the code). The policy sees the task's chat
prompt, not "QUESTION: … ANSWER:". Left out: gold steps as candidates (include_gt), near-duplicates by
embeddings (exact duplicates are removed), choose_random (= choose_worst with ≤ 2 children), the
cosine schedule and the KL term. The search sees only the final-answer verifier; `check_steps` serves
analysis only (are the chosen / rejected steps arithmetically right?). `--baseline`: plain
outcome-level DPO on sampled pairs (one right vs one wrong full answer, α = 0), same rounds and optimiser.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python algos/mcts_dpo.py` finds `shared`

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from accelerate.utils import gather_object
from transformers import StoppingCriteria, StoppingCriteriaList

from shared.args import LMArgs, cli, require
from shared.logprobs import token_logprobs
from shared.models import chat_prompt
from shared.rollouts import PromptStream
from shared.run import Run
from shared.sampling import count_generated, encode_prompts, eos_token_ids, generate, neutral_generation_config, sampling_config
from shared.steps import check_steps, split_steps


@dataclass
class Args(LMArgs):  # the experiment flags (--model, --task, --lr, ...) come from shared/args.py
    task: str = "multistep"
    """`multistep` (one calculation per line), `gsm8k`, or any task of shared/tasks.py"""
    n_train: int = 1000
    """training problems drawn from the task (multistep level 1 has 1691)"""
    max_new_tokens: int = 64
    """token budget of a whole solution (search and held-out evaluation); a node reaching it is terminal"""
    iterations: int = 2
    """rounds i = 1..M of (MCTS with π_{i−1} → DPO on the new pairs) [paper]"""
    prompts_per_iteration: int = 16
    """training questions searched per round (the code: one epoch of GSM8K + MATH)"""

    # ---- search (spec §2–§3; math defaults of scripts/mcts_mathqa.sh)
    simulations: int = 64
    """K: MCTS iterations from each committed node (n_iters)"""
    root_multiplier: int = 4
    """the absolute root gets root_multiplier · K iterations"""
    depth_limit: int = 3
    """deepest expansion of one iteration, counted from the current search root"""
    finish_depth: int = 3
    """from this absolute depth one action finishes the solution (force_terminating_on_depth_limit); 0 = never"""
    n_init_actions: int = 2
    """steps sampled when the absolute root is expanded"""
    n_actions: int = 2
    """steps sampled when any other node is expanded"""
    breadth_limit: int = 4
    """most distinct children of a node (duplicates removed first)"""
    w_exp: float = 1.0
    """w: PUCT exploration weight"""
    lam: float = 1.25
    """λ: length normalisation of the prior p = exp(log π(a) / |a|^λ)"""
    gamma: float = 1.0
    """γ: discount in the backup"""
    step_tokens: int = 48
    """most tokens sampled for one step (the code's 32 + 16 slack); a step ends at its first line break"""
    eval_hint: bool = False
    """self-evaluation prompt shows the gold solution (the code's HINTED_EVAL_PROMPT; unusable at test time)"""
    code_score: bool = False
    """the code's node score: C / max(d_u − 3, 1), and O = 1.25 for a right answer that is not a prefix of the gold solution"""
    truncated_wrong: bool = True
    """a solution cut off at --max-new-tokens gets O = −1 (False: no O term, as the code)"""

    # ---- preference pairs and cDPO (spec §2, §4)
    max_pairs: int = 8
    """most pairs per tree (the first ones along the committed path)"""
    filter: bool = True
    """drop a tree unless the chosen candidate at its last decision point ends in a right answer (--filter)"""
    beta: float = 0.1
    """β: DPO inverse temperature (scale_coeff)"""
    conservative: bool = True
    """cDPO label smoothing α from visit counts (False: α = 0, plain DPO)"""
    alpha_cap: float = 0.5
    """cap on α (code 0.5; 1.0 = the paper's α = N_l / (N_w + N_l) uncapped)"""
    fixed_reference: bool = False
    """keep π_ref = the initial policy in every round (the code) instead of π_ref = π_{i−1} (the paper)"""
    batch_size: int = 4
    """trees per optimizer step (the code: 64 by gradient accumulation)"""
    epochs: int = 1
    """passes over a round's trees"""
    micro_batch_size: int = 8
    """pairs per forward/backward (gradient accumulation; no effect on the maths)"""
    weight_decay: float = 0.05
    """AdamW weight decay (Adam betas are the code's (0.9, 0.95))"""
    max_grad_norm: float = 1.0
    """gradient-norm clip"""

    # ---- baseline and teaching
    baseline: bool = False
    """plain outcome-level DPO instead: G full answers per prompt, one right vs one wrong, α = 0"""
    group_size: int = 8
    """G: full answers sampled per prompt by --baseline"""
    search_only: bool = False
    """search one tree for the first training question, print it and its pairs, and exit (for teaching)"""

    RULES: ClassVar[dict[str, str]] = {
        "iterations": ">= 1", "prompts_per_iteration": ">= 1", "simulations": ">= 1", "root_multiplier": ">= 1",
        "depth_limit": ">= 1", "finish_depth": ">= 0", "n_init_actions": ">= 1", "n_actions": ">= 1",
        "breadth_limit": ">= 1", "w_exp": ">= 0", "lam": ">= 0", "gamma": "[0, 1]", "step_tokens": ">= 1",
        "max_pairs": ">= 1", "beta": "> 0", "alpha_cap": "[0, 1]", "batch_size": ">= 1", "epochs": ">= 1",
        "micro_batch_size": ">= 1", "weight_decay": ">= 0", "max_grad_norm": "> 0", "group_size": ">= 2"}
    PER_PROCESS: ClassVar[tuple[str, ...]] = ("prompts_per_iteration", "batch_size")  # questions and trees per process

    def check(self) -> None:
        super().check()
        require(self.temperature > 0, "temperature", self.temperature, "must be > 0: the search samples steps")


ADAM_BETAS = (0.9, 0.95)  # spec §4


# ------------------------------------------------------------------------------------ ALGO LOGIC: the tree
@dataclass(eq=False)
class Node:
    """A prefix of steps; the edge into it is its last step `a` (empty at the root)."""
    ids: list[int] = field(default_factory=list)  # the step's tokens
    text: str = ""  # the step, decoded
    parent: "Node | None" = None
    depth: int = 0  # absolute depth (root = 0)
    prior: float = 1.0  # p(a | s)
    C: float = 0.0  # self-evaluation confidence
    v: float = 0.0  # node score
    r: float = 0.0  # reward of the edge into the node
    Q: float = 0.0
    V: float = 0.0
    N: int = 0
    terminal: bool = False
    correct: bool | None = None  # verdict of a terminal node's answer (None: cut off or not terminal)
    children: list["Node"] = field(default_factory=list)

    def solution_ids(self) -> list[int]:
        """The tokens of every step from the root to here."""
        return (self.parent.solution_ids() if self.parent else []) + self.ids


def step_prior(logp_sum: float, length: int, lam: float) -> float:
    """p(c) = exp(Σ log π(a_t) / |a|^λ) (§2: the code divides the log-probability, not π, by |a|^λ)."""
    return math.exp(logp_sum / max(length, 1) ** lam)


def node_score(C: float, parent_v: float, parent_depth: int, outcome: float | None = None,
               code_score: bool = False) -> float:
    """v(c) = C (+ O at a final answer); the code divides C by max(d_u − 3, 1). C = 0 (no judgement
    parsed) inherits v(u) (§2)."""
    v = C / max(parent_depth - 3, 1) if code_score else C
    v = parent_v if v == 0 else v
    return v + (outcome or 0.0)


def outcome(correct: bool, ended: bool, truncated_wrong: bool = True, novel: bool = False,
            code_score: bool = False) -> float | None:
    """O of a terminal node: +1 right (1.25 with --code-score when not a prefix of the gold solution), −1
    wrong; a solution cut off by the token budget (ended = False) is wrong, or has no O term (None)."""
    if not ended:
        return -1.0 if truncated_wrong else None
    return (1.25 if code_score and novel else 1.0) if correct else -1.0


def puct(Q: float, prior: float, parent_N: int, N: int, w: float) -> float:
    """Q(c) + w · p(c) · √N(u) / (1 + N(c)) (§2)."""
    return Q + w * prior * math.sqrt(parent_N) / (1 + N)


def select_child(node: Node, w: float) -> Node:
    """The child with the largest PUCT score; ties go to the first child."""
    return max(node.children, key=lambda c: puct(c.Q, c.prior, node.N, c.N, w))


def add_child(parent: Node, child: Node) -> Node:
    """Attach a scored child: r = v(c) − v(u), N = V = 0, Q = V(u) + r (V(u) at creation time, §2)."""
    child.parent, child.depth = parent, parent.depth + 1
    child.r = child.v - parent.v
    child.N, child.V, child.Q = 0, 0.0, parent.V + child.r
    parent.children.append(child)
    return child


def backup(path: list[Node], gamma: float = 1.0) -> None:
    """Leaf: Q ← r + γV, N += 1. Each ancestor u, bottom-up: V(u) = Σ_c max(1,N_c)·Q_c / Σ_c max(1,N_c)
    over all its children (unvisited ones at their initial Q), N(u) += 1, and Q(u) ← r(u) + γV(u)
    unless u is the tree's original root (§2)."""
    leaf = path[-1]
    leaf.Q, leaf.N = leaf.r + gamma * leaf.V, leaf.N + 1
    for u in reversed(path[:-1]):
        weights = [max(1, c.N) for c in u.children]
        u.V = sum(wt * c.Q for wt, c in zip(weights, u.children)) / sum(weights)
        u.N += 1
        if u.parent is not None:
            u.Q = u.r + gamma * u.V


def simulate(root: Node, expand: Callable[[Node], None], depth_limit: int, w: float, gamma: float) -> None:
    """One MCTS iteration from the search root: N(root) += 1; PUCT down to a leaf; then expand, pick a
    child by PUCT and descend until a terminal node or depth_limit below the root; back up (§2). No
    random rollout: the new nodes' scores are the evaluation."""
    root.N += 1
    path = [root]
    while path[-1].children and not path[-1].terminal:
        path.append(select_child(path[-1], w))
    while not path[-1].terminal and path[-1].depth - root.depth < depth_limit:
        if not path[-1].children:
            expand(path[-1])
        path.append(select_child(path[-1], w))
    backup(path, gamma)


def commit_key(c: Node, n_actions: int) -> tuple:
    """(N_c·(1 + g_c), Q_c, V_c), g_c = max − min visits among c's children (0 if none; no factor when
    n_actions = 1); the committed child is the largest, the first one on ties (§2)."""
    g = max(x.N for x in c.children) - min(x.N for x in c.children) if c.children else 0
    return (c.N * (1 + g) if n_actions > 1 else c.N, c.Q, c.V)


@dataclass
class Decision:
    """A committed node and its children's statistics right after its search."""
    node: Node
    stats: list[dict]  # per child: Q, pi, r, v, N
    chosen: int  # index of the committed child


def tree_search(root: Node, expand: Callable[[Node], None], args) -> tuple[Node, list[Decision]]:
    """Search K iterations (root_multiplier · K at the absolute root), commit a child, re-root there
    keeping its subtree, until the committed node is terminal (§2). Ends: every step has ≥ 1 token,
    so the token budget (or finish_depth) makes a bounded depth terminal."""
    node, decisions = root, []
    while not node.terminal:
        for _ in range(args.simulations * (args.root_multiplier if node.parent is None else 1)):
            simulate(node, expand, args.depth_limit, args.w_exp, args.gamma)
        best = max(node.children, key=lambda c: commit_key(c, args.n_actions))
        stats = [dict(Q=c.Q, pi=float(c is best), r=c.r, v=c.v, N=c.N) for c in node.children]
        decisions.append(Decision(node, stats, node.children.index(best)))
        node = best
    return node, decisions


def candidate(child: Node) -> list[Node]:
    """The child's step plus the chain of only-children below it (§2)."""
    chain = [child]
    while len(chain[-1].children) == 1:
        chain.append(chain[-1].children[0])
    return chain


def choose_pair(stats: list[dict]) -> tuple[int, int]:
    """(y_w, y_l): the last and the first child sorted by (Q, π, r, v, N) ascending (choose_worst, §2)."""
    order = sorted(range(len(stats)), key=lambda i: tuple(stats[i][k] for k in ("Q", "pi", "r", "v", "N")))
    return order[-1], order[0]


# ------------------------------------------------------------------------------------ ALGO LOGIC: the loss
def cdpo_alpha(n_w: int, n_l: int, cap: float = 0.5) -> float:
    """α = min(1 − 1/(1 + N_l/max(1, N_w)), cap) = min(N_l/(N_w' + N_l), cap) (§2; paper: no cap)."""
    return min(1 - 1 / (1 + n_l / max(1, n_w)), cap)


def cdpo_loss(pi_w: torch.Tensor, pi_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
              alpha: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair L = −(1−α) log σ(βh) − α log σ(−βh), h = (π_w − ref_w) − (π_l − ref_l) (§2).

    Each argument is a [P] sum of log-probs of the completion from the first diverging token on;
    α is a constant (no gradient). α = 0 is the DPO loss. Returns (loss [P], h [P])."""
    h = (pi_w - ref_w) - (pi_l - ref_l)
    alpha = alpha.to(h.dtype)
    loss = -(1 - alpha) * F.logsigmoid(beta * h) - alpha * F.logsigmoid(-beta * h)
    return loss, h.detach()


def divergence(a: list[int], b: list[int]) -> int:
    """Index of the first token where a and b differ (the shared prefix's terms cancel in h, §8.8)."""
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def sequence_logps(model, tokenizer, rows: list[tuple[list[int], list[int], int]], micro_batch_size: int) -> torch.Tensor:
    """Σ_{t ≥ start} log π(o_t | prompt, o_<t) for rows (prompt ids, completion ids, start); differentiable
    unless called under no_grad. The whole completion is attended; only the sum starts at `start`."""
    out, device = [], next(model.parameters()).device
    for i in range(0, len(rows), micro_batch_size):
        chunk = rows[i:i + micro_batch_size]
        p_ids, p_mask = encode_prompts(tokenizer, [r[0] for r in chunk])
        c_ids = pad_sequence([torch.tensor(r[1], dtype=torch.long) for r in chunk], True, tokenizer.pad_token_id)
        pos = torch.arange(c_ids.shape[1])
        c_mask = (pos < torch.tensor([len(r[1]) for r in chunk])[:, None]).float()
        keep = c_mask * (pos >= torch.tensor([r[2] for r in chunk])[:, None])
        logp = token_logprobs(model, p_ids.to(device), p_mask.to(device), c_ids.to(device), c_mask.to(device))
        out.append((logp * keep.to(device)).sum(1))
    return torch.cat(out)


def pair_rows(pairs: list[dict]) -> list[tuple[list[int], list[int], int]]:
    """The chosen rows then the rejected rows, each summed from the pair's first diverging token."""
    return ([(p["prompt"], p["chosen"], divergence(p["chosen"], p["rejected"])) for p in pairs]
            + [(p["prompt"], p["rejected"], divergence(p["chosen"], p["rejected"])) for p in pairs])


# ------------------------------------------------------------------------------------ the policy's side
TRIGGERS = ("A", "B", "correct", "wrong", "incorrect")  # spec §5; a second pass adds "Cor", "In"
EVAL_PROMPT = ("QUESTION:{question}\n\n{hint}PROPOSED SOLUTION:\n{solution}\n\n"
               "QUESTION: Evaluate if the proposed solution is logically heading in the correct direction{based}.\n"
               "Answer Choices:\n(A) incorrect\n(B) correct")  # spec §5; the assistant's turn starts "The answer is"


def confidence(pieces: list[str], probs: torch.Tensor, correct_ids: list[int]) -> float:
    """C: at the first generated token whose stripped text is A/B/correct/wrong/incorrect, the summed
    probability of the "correct" tokens; if that is 0, a second pass also accepts Cor/In; else 0 (§5).
    pieces: the decoded greedy tokens; probs [T, V]: the distributions they were picked from."""
    for triggers in (TRIGGERS, TRIGGERS + ("Cor", "In")):
        t = next((i for i, p in enumerate(pieces) if p.strip() in triggers), None)
        if t is not None and (c := float(probs[t, correct_ids].sum())) > 0:
            return c
    return 0.0


def correct_token_ids(tokenizer) -> list[int]:
    """The "correct" option's tokens: the first token of B / correct / Correct and the last of (B, " B",
    " correct" (and " Correct" when it is one token) (§5)."""
    enc = lambda s: tokenizer(s, add_special_tokens=False).input_ids  # noqa: E731
    ids = [enc(s)[0] for s in ("B", "correct", "Correct")] + [enc(s)[-1] for s in ("(B", " B", " correct")]
    return sorted(set(ids + (enc(" Correct") if len(enc(" Correct")) == 1 else [])))


def cut_step(pieces: list[str], is_eos: list[bool]) -> tuple[int, bool]:
    """(tokens kept, ends): a step ends at the first line break after some text, or at EOS; when only
    whitespace is left before the sample's EOS, the step keeps it and ends the solution."""
    seen_text = False
    for i, (piece, eos) in enumerate(zip(pieces, is_eos)):
        if eos:
            return i + 1, True
        if "\n" in piece and (seen_text or piece.split("\n")[0].strip()):
            rest = list(zip(pieces[i + 1:], is_eos[i + 1:]))
            j = next((k for k, (p, e) in enumerate(rest) if e or p.strip()), None)
            if j is not None and rest[j][1]:
                return i + 1 + j + 1, True
            return i + 1, False
        seen_text = seen_text or bool(piece.strip())
    return len(pieces), False


class StepEnd(StoppingCriteria):
    """Stops sampling a row once `cut_step` has decided its step (a line break after some text and
    one more token that is not whitespace), so a step costs its own length, not --step-tokens."""

    def __init__(self, piece: Callable[[int], str], eos: list[int], start: int):
        self.piece, self.eos, self.start = piece, eos, start  # a plain function: generate deep-copies criteria

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        done = []
        for row in input_ids[:, self.start:].tolist():
            pieces = [self.piece(t) for t in row]
            n, ends = cut_step(pieces, [t in self.eos for t in row])
            done.append(ends or (n < len(row) and (row[-1] in self.eos or bool(pieces[-1].strip()))))
        return torch.tensor(done, device=input_ids.device)


@torch.no_grad()
def hf_generate(model, ids: torch.Tensor, mask: torch.Tensor, config, stop: StoppingCriteria | None = None):
    """`model.generate` as shared.sampling.generate calls it: unwrapped from DDP, under a neutral
    generation config, so only `config` (plain softmax(logits / T) or greedy) decides the tokens."""
    model = getattr(model, "module", model)
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    with neutral_generation_config(hf):
        return model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), generation_config=config,
                              stopping_criteria=StoppingCriteriaList([stop] if stop else []))


def sample_steps(model, tokenizer, prompt: list[int], n: int, max_new_tokens: int, temperature: float,
                 eos: list[int], stop: StoppingCriteria | None = None) -> list[list[int]]:
    """n sampled continuations of one prompt (token ids), each up to its first EOS; `stop` ends rows early."""
    ids = torch.tensor([prompt] * n)
    config = sampling_config(eos, tokenizer.pad_token_id, max_new_tokens, temperature, 1.0, greedy=False)
    rows = hf_generate(model, ids, torch.ones_like(ids), config, stop)[:, len(prompt):].tolist()
    rows, pad = [row[:next((i + 1 for i, t in enumerate(row) if t in eos), len(row))] for row in rows], tokenizer.pad_token_id
    count_generated(sum(len(r) - r.count(pad) * (pad not in eos) for r in rows))  # to the budget: no padding after a stop
    return rows


class Policy:
    """What the search asks of the model: sample steps, their log-probs, the self-evaluation, and the
    final-answer verdict at terminal nodes (the only outside signal). Counts its model calls."""

    def __init__(self, model, tokenizer, task, problem, args):
        self.model, self.tok, self.task, self.problem, self.args = model, tokenizer, task, problem, args
        self.prompt = tokenizer(chat_prompt(tokenizer, problem.prompt, task.system_prompt), add_special_tokens=False).input_ids
        self.eos = eos_token_ids(model, tokenizer)
        self.correct_ids = correct_token_ids(tokenizer)
        self.calls = 0
        self.piece = lambda t: tokenizer.decode([t])  # one token's text (a plain function: StepEnd gets deep-copied)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def expand(self, node: Node) -> None:
        """Sample n_actions steps (n_init_actions at the absolute root), drop duplicates, keep ≤
        breadth_limit, and score each new child once (§2–§3)."""
        a, prefix = self.args, node.solution_ids()
        context, left = self.prompt + prefix, a.max_new_tokens - len(prefix)
        finish = a.finish_depth > 0 and node.depth >= a.finish_depth  # one action finishes the solution
        rows = sample_steps(self.model, self.tok, context, a.n_actions if node.parent else a.n_init_actions,
                            left if finish else min(a.step_tokens, left), a.temperature, self.eos,
                            None if finish else StepEnd(self.piece, self.eos, len(context)))
        steps, seen = [], set()
        for ids in rows:
            n, ends = ((len(ids), bool(ids) and ids[-1] in self.eos) if finish
                       else cut_step([self.piece(t) for t in ids], [t in self.eos for t in ids]))
            key = (self.decode(ids[:n]).strip(), ends)
            if key not in seen and len(steps) < a.breadth_limit:
                seen.add(key)
                steps.append((ids[:n], ends))
        logp = sequence_logps(self.model, self.tok, [(context, ids, 0) for ids, _ in steps], len(steps))
        solutions = [self.decode(prefix + ids) for ids, _ in steps]
        C = self.judge(solutions)
        self.calls += 3  # sampling, prior log-probs, self-evaluation
        gold = self.problem.meta.get("solution", "")
        for (ids, ends), lp, c, sol in zip(steps, logp.tolist(), C, solutions):
            terminal = ends or len(prefix) + len(ids) >= a.max_new_tokens
            correct = self.task.verify(sol, self.problem).correct if ends else None
            O = outcome(bool(correct), ends, a.truncated_wrong, not gold.startswith(sol.strip()), a.code_score) if terminal else None
            add_child(node, Node(ids=ids, text=self.decode(ids), prior=step_prior(lp, len(ids), a.lam), C=c, terminal=terminal,
                                 correct=correct, v=node_score(c, node.v, node.depth, O, a.code_score)))

    @torch.no_grad()
    def judge(self, solutions: list[str]) -> list[float]:
        """C for each partial solution: greedy-decode 4 tokens after "The answer is" and read the
        probability of the "correct" option at the first A/B token (§5)."""
        hint, based = "", ""
        if self.args.eval_hint:  # the gold steps, then "The answer is {a}" unless the last line says so
            gold = self.problem.meta.get("solution", "").strip()
            if "answer is" not in (gold.splitlines() or [""])[-1]:
                gold += f"\nThe answer is {self.problem.answer}"
            hint, based = f"EXAMPLE ANSWER:\n{gold}\n\n", " based on the example answer"
        texts = [chat_prompt(self.tok, EVAL_PROMPT.format(question=self.problem.prompt, hint=hint, solution=s, based=based),
                             self.task.system_prompt) + "The answer is" for s in solutions]
        ids, mask = encode_prompts(self.tok, [self.tok(t, add_special_tokens=False).input_ids for t in texts])
        config = sampling_config(self.eos, self.tok.pad_token_id, 4, 1.0, 1.0, greedy=True)
        config.update(output_logits=True, return_dict_in_generate=True)
        out = hf_generate(self.model, ids, mask, config)
        probs = torch.stack(out.logits, 1).float().softmax(-1).cpu()  # [B, T, V]
        new = out.sequences[:, ids.shape[1]:].tolist()
        count_generated(sum(next((i + 1 for i, t in enumerate(r) if t in self.eos), len(r)) for r in new))  # to the budget
        return [confidence([self.piece(t) for t in row], probs[b], self.correct_ids) for b, row in enumerate(new)]


# ------------------------------------------------------------------------------------ one question
def search_question(policy: Policy, args) -> tuple[Node, list[Decision], list[dict], dict]:
    """MCTS on one question, then its pairs: (root, decisions, pairs, stats)."""
    root = Node()
    leaf, decisions = tree_search(root, policy.expand, args)
    pairs, last_ok = [], False
    for d in decisions:
        if len(d.node.children) < 2 or len(pairs) == args.max_pairs:
            continue
        w, l = choose_pair(d.stats)
        chosen, rejected = candidate(d.node.children[w]), candidate(d.node.children[l])
        pairs.append(dict(prompt=policy.prompt + d.node.solution_ids(), chosen=[t for n in chosen for t in n.ids],
                          rejected=[t for n in rejected for t in n.ids], n_w=d.stats[w]["N"], n_l=d.stats[l]["N"],
                          alpha=cdpo_alpha(d.stats[w]["N"], d.stats[l]["N"], args.alpha_cap) if args.conservative else 0.0,
                          prefix_text=policy.decode(d.node.solution_ids()), texts=(chosen[0].text, rejected[0].text)))
        last_ok = chosen[-1].terminal and bool(chosen[-1].correct)  # --filter looks at the last decision point
    nodes = list(walk(root))
    ends = [(n.C, bool(n.correct)) for n in nodes if n.terminal]  # C at right and wrong ends: is C informative?
    stats = {"correct": float(bool(leaf.correct)), "tree_nodes": len(nodes), "pairs_per_tree": len(pairs),
             "depth": leaf.depth, "passed_filter": float(last_ok), "right_ends": sum(r for _, r in ends),
             "wrong_ends": sum(not r for _, r in ends), "C_right": sum(c for c, r in ends if r),
             "C_wrong": sum(c for c, r in ends if not r), **step_analysis(pairs, policy.problem)}
    return root, decisions, pairs, stats


def walk(node: Node):
    yield node
    for c in node.children:
        yield from walk(c)


def step_analysis(pairs: list[dict], problem) -> dict:
    """Analysis only (never seen by the search): is the first step of each chosen / rejected candidate
    an arithmetically right, grounded equation (shared.steps.check_steps)? Steps without "=" are skipped."""
    out = {"chosen_steps": 0, "chosen_ok": 0, "rejected_steps": 0, "rejected_ok": 0}
    numbers = problem.meta.get("numbers")
    if numbers is None:
        return out
    for p in pairs:
        before = len(split_steps(p["prefix_text"]))
        for name, step in zip(("chosen", "rejected"), p["texts"]):
            report = check_steps(p["prefix_text"] + step, numbers)
            if len(report.steps) > before:
                out[f"{name}_steps"] += 1
                out[f"{name}_ok"] += report.steps[before].ok
    return out


def sample_pair(policy: Policy, args) -> tuple[list[dict], dict]:
    """--baseline: G full answers; the first right one over the first wrong one (cut-off = wrong), α = 0."""
    ro = generate(policy.model, policy.tok, [policy.prompt], n=args.group_size, max_new_tokens=args.max_new_tokens,
                  temperature=args.temperature)
    policy.calls += 1
    answers = [row[:int(sum(m))] for row, m in zip(ro.completion_ids.tolist(), ro.completion_mask.tolist())]
    ok = [policy.task.verify(t, policy.problem).correct and not tr for t, tr in zip(ro.texts, ro.truncated.tolist())]
    pairs = []
    if any(ok) and not all(ok):
        w, l = ok.index(True), ok.index(False)
        pairs.append(dict(prompt=policy.prompt, chosen=answers[w], rejected=answers[l], n_w=0, n_l=0, alpha=0.0,
                          prefix_text="", texts=(ro.texts[w], ro.texts[l])))
    stats = {"correct": sum(ok) / len(ok), "pairs_per_tree": len(pairs), "passed_filter": 1.0, "right_ends": sum(ok),
             "wrong_ends": len(ok) - sum(ok), **step_analysis(pairs, policy.problem)}  # no tree: its statistics are 0
    return pairs, stats


def render(node: Node, committed: set, indent: int = 0) -> list[str]:
    """--search-only: the tree as text, one line per node, * on the committed path."""
    end = {True: "  ✓ right", False: "  ✗ wrong", None: "  ✗ cut off"}[node.correct] if node.terminal else ""
    line = (f"{'  ' * indent}{'*' if node in committed else ' '} {repr(node.text) if node.parent else '[question]'}  "
            f"N={node.N} Q={node.Q:+.3f} V={node.V:+.3f} v={node.v:+.3f} r={node.r:+.3f} p={node.prior:.3f} C={node.C:.2f}{end}")
    return [line] + [x for c in node.children for x in render(c, committed, indent + 1)]


def show_one_tree(lm, task, args, log) -> dict:
    """--search-only: search the first training question, print the tree and its pairs."""
    policy = Policy(lm.policy, lm.tokenizer, task, task.train[0], args)
    root, decisions, pairs, stats = search_question(policy, args)
    committed = {d.node for d in decisions} | {decisions[-1].node.children[decisions[-1].chosen]}
    log(f"question: {task.train[0].prompt}  (gold {task.train[0].answer})\n" + "\n".join(render(root, committed)))
    for p in pairs:
        log(f"pair after {p['prefix_text']!r}: chosen {p['texts'][0]!r} (N={p['n_w']}) over "
            f"rejected {p['texts'][1]!r} (N={p['n_l']}), α={p['alpha']:.3f}")
    log(f"{stats['tree_nodes']} nodes, {policy.calls} policy calls, final answer {'right' if stats['correct'] else 'wrong'}, "
        f"{len(pairs)} pairs")
    return {"root": root, "pairs": pairs, "stats": stats}


# ------------------------------------------------------------------------------------ the update
def tree_batches(n: int, batch_size: int, epochs: int, world: int, seed: int) -> list[list[int]]:
    """Epoch-wise shuffled batches of tree indices; a short last batch is cut to a multiple of the processes."""
    gen, out = torch.Generator().manual_seed(seed), []
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).tolist()
        for i in range(0, n, batch_size):
            b = order[i:i + batch_size]
            b = b[:len(b) - len(b) % world]
            if b:
                out.append(b)
    return out


def dpo_update(lm, trees: list[dict], n_trees: int, args) -> dict:
    """One optimizer step on this process's trees; the loss is normalised by the batch's n_trees trees."""
    acc, world = lm.accelerator, lm.accelerator.num_processes
    items = [(p, 1.0 / (len(t["pairs"]) * n_trees)) for t in trees for p in t["pairs"]]
    chunks = [items[i:i + args.micro_batch_size] for i in range(0, len(items), args.micro_batch_size)]
    sums = {"loss": 0.0, "h": 0.0, "h_pos": 0.0, "alpha": 0.0, "pairs": 0.0}
    for k, chunk in enumerate(chunks):
        pairs = [p for p, _ in chunk]
        with nullcontext() if k == len(chunks) - 1 else acc.no_sync(lm.model):
            logps = sequence_logps(lm.model, lm.tokenizer, pair_rows(pairs), args.micro_batch_size * 2)
            dev = logps.device
            ref_w = torch.tensor([p["ref_w"] for p in pairs], device=dev)
            ref_l = torch.tensor([p["ref_l"] for p in pairs], device=dev)
            alpha = torch.tensor([p["alpha"] for p in pairs], device=dev)
            loss, h = cdpo_loss(logps[:len(pairs)], logps[len(pairs):], ref_w, ref_l, alpha, args.beta)
            weight = torch.tensor([w for _, w in chunk], device=dev)
            acc.backward((loss * weight).sum() * world)  # DDP averages over processes; the weights are global
        for key, value in (("loss", (loss.detach() * weight).sum()), ("h", h.sum()), ("h_pos", (h > 0).sum()),
                           ("alpha", alpha.sum()), ("pairs", len(pairs))):
            sums[key] += float(value)
    if world > 1:  # totals over every process
        sums = dict(zip(sums, acc.reduce(torch.tensor(list(sums.values()), device=acc.device), "sum").tolist()))
    sums["grad_norm"] = float(acc.clip_grad_norm_(lm.params, args.max_grad_norm))
    lm.optimizer.step()
    lm.scheduler.step()
    lm.optimizer.zero_grad(set_to_none=True)
    return sums


def round_metrics(st: dict, n_updates: int, kept: list[dict], round_s: float, args) -> dict:
    """Per question means of the search, per update means of the loss, per pair means of h and α."""
    total = lambda key: sum(t["stats"].get(key, 0) for t in st["trees"])  # noqa: E731
    ratio = lambda num, den: num / max(den, 1)  # noqa: E731
    tr, n_trees = st["train"], len(st["trees"])
    n_pairs = tr.get("pairs", 0.0)
    return {"train/accuracy": ratio(total("correct"), n_trees), "train/loss": ratio(tr.get("loss", 0.0), n_updates),
            "train/grad_norm": ratio(tr.get("grad_norm", 0.0), n_updates), "train/updates": n_updates,
            **{f"mcts_dpo/{k}": ratio(total(k), n_trees)
               for k in ("tree_nodes", "pairs_per_tree", "passed_filter", "depth", "policy_calls", "search_s")},
            "mcts_dpo/pairs": sum(len(t["pairs"]) for t in kept), "mcts_dpo/kept_trees": len(kept),
            "mcts_dpo/margin": args.beta * tr.get("h", 0.0) / max(n_pairs, 1),
            "mcts_dpo/pair_accuracy": ratio(tr.get("h_pos", 0.0), n_pairs), "mcts_dpo/alpha": ratio(tr.get("alpha", 0.0), n_pairs),
            "mcts_dpo/chosen_step_ok": ratio(total("chosen_ok"), total("chosen_steps")),
            "mcts_dpo/rejected_step_ok": ratio(total("rejected_ok"), total("rejected_steps")),
            "mcts_dpo/analysed_steps": total("chosen_steps") + total("rejected_steps"),
            "mcts_dpo/right_ends": total("right_ends"), "mcts_dpo/wrong_ends": total("wrong_ends"),
            "mcts_dpo/C_right": ratio(total("C_right"), total("right_ends")),
            "mcts_dpo/C_wrong": ratio(total("C_wrong"), total("wrong_ends")),
            "perf/gen_s": total("search_s"), "perf/update_s": tr.get("update_s", 0.0), "perf/step_s": round_s}


# ------------------------------------------------------------------------------------ main
def main(args: Args) -> dict:
    run = Run("mcts_dpo", args, label="outcome_dpo" if args.baseline else None)  # flags, resume, task, run dir
    args, acc, task, log = run.args, run.accelerator, run.task, run.log
    world, rank = acc.num_processes, acc.process_index
    lm = run.setup_lm(reference=args.fixed_reference, weight_decay=args.weight_decay)
    for group in lm.optimizer.param_groups:
        group["betas"] = ADAM_BETAS
    model, tokenizer = lm.model, lm.tokenizer
    st = {"iteration": 0, "searched": 0, "trees": [], "update": 0, "train": {}} | lm.state

    if args.search_only:  # teaching: one tree, printed, nothing trained
        shown = show_one_tree(lm, task, args, log)
        run.close()
        return {"run_dir": str(run.dir), "policy": lm.policy} | shown

    fresh = st["iteration"] == 0 and st["searched"] == 0 and st["update"] == 0
    before = run.evaluate(lm, 0, args.max_new_tokens) if fresh else None
    last_eval = before
    try:
        while st["iteration"] < args.iterations and run.budget_left():
            it, P = st["iteration"], args.prompts_per_iteration
            questions = PromptStream(len(task.train), args.seed, it * P).take(P)  # round i's questions
            t_round = time.time()
            # ---- 1. search every question with π_{i−1} (one per process at a time, gathered)
            while st["searched"] < P and run.budget_left():  # --token-budget spent: train on these trees, end
                problem = task.train[questions[st["searched"] + rank]]
                t0, policy = time.time(), Policy(lm.policy, tokenizer, task, problem, args)
                model.eval()
                if args.baseline:
                    pairs, stats = sample_pair(policy, args)
                else:
                    _, _, pairs, stats = search_question(policy, args)
                with torch.no_grad(), (lm.reference() if args.fixed_reference else nullcontext(lm.policy)) as ref:
                    if pairs:  # π_ref log-probs now, while the policy is still π_{i−1}
                        sums = sequence_logps(ref, tokenizer, pair_rows(pairs), args.micro_batch_size).tolist()
                        for j, p in enumerate(pairs):
                            p["ref_w"], p["ref_l"] = sums[j], sums[len(pairs) + j]
                stats |= {"policy_calls": policy.calls, "search_s": time.time() - t0}
                tree = {"pairs": pairs, "keep": bool(pairs) and (stats["passed_filter"] > 0 or not args.filter), "stats": stats}
                trees = gather_object([tree]) if world > 1 else [tree]
                with run.atomic():
                    st["trees"] += trees
                    st["searched"] += world

            # ---- 2. cDPO on the round's kept trees: each tree's pairs averaged, then the trees of a batch
            kept = [t for t in st["trees"] if t["keep"]]
            batches = tree_batches(len(kept), args.batch_size, args.epochs, world, args.seed * 100_003 + it)
            model.train()
            while st["update"] < len(batches):
                t1 = time.time()
                with run.atomic():
                    batch = [kept[i] for i in batches[st["update"]]]
                    s = dpo_update(lm, batch[rank::world], len(batch), args)
                    for k, v in s.items():
                        st["train"][k] = st["train"].get(k, 0.0) + v
                    st["train"]["update_s"] = st["train"].get("update_s", 0.0) + time.time() - t1
                    st["update"] += 1

            # ---- 3. bookkeeping; π_ref ← π_i happens by itself: next round's reference log-probs use the policy
            with run.atomic():
                metrics = round_metrics(st, len(batches), kept, time.time() - t_round, args)
                st.update(iteration=it + 1, searched=0, trees=[], update=0, train={})
                run.logger.log(metrics, it + 1)
            log(f"round {it + 1}: {metrics['mcts_dpo/pairs']:.0f} pairs from {len(kept)}/{P} kept trees, "
                f"{len(batches)} updates, loss {metrics['train/loss']:.4f}, train accuracy {metrics['train/accuracy']:.3f}")
            last_eval = run.evaluate(lm, it + 1, args.max_new_tokens)
            run.save(lm, **st)
    except KeyboardInterrupt:
        run.save_on_interrupt(lm, f"round {st['iteration']} (searched {st['searched']}, updates {st['update']})", **st)
        raise
    finally:
        run.close()
    return run.summary(lm, before, last_eval)


if __name__ == "__main__":
    main(cli(Args))
