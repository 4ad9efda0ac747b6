"""GRPO vs NFT vs RFT with the same seed, model, prompts, group size and step budget on `arith`.

    python scripts/compare_grpo_nft.py                       # SmolLM2-135M-Instruct, 12 steps each
    python scripts/compare_grpo_nft.py --model tiny --steps 2 --n-test 8   # a quick check

Writes into `--out` (default docs/nft/):
    results.md     one table: held-out greedy accuracy before/after, wall time, mean step time
    accuracy.png   held-out accuracy against step for the three methods
    step_time.md   NFT's training-step time as a ratio of GRPO's (β = 0.04) on the same rollout batch

Every method samples from the same seeded prompt stream and starts from the same weights, so the
runs differ only in the objective (and in which groups each keeps: NFT/RFT drop groups whose answers
are all right or all wrong and sample more, GRPO trains on every group).
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from algos import grpo, nft  # noqa: E402
from shared.run import read_metrics  # noqa: E402


def run_all(a) -> list[dict]:
    common = dict(model=a.model, task="arith", level=a.level, seed=a.seed, total_steps=a.steps, batch_size=a.batch_size,
                  group_size=a.group_size, max_new_tokens=a.max_new_tokens, lr=a.lr, n_test=a.n_test,
                  eval_every=a.eval_every, save_every=10**6, output_dir=str(ROOT / "runs" / "compare"))
    methods = [("GRPO (β=0.04)", grpo.main, grpo.Args(**common)),
               ("NFT (ω = 1 − r̂)", nft.main, nft.Args(**common)),
               ("RFT", nft.main, nft.Args(**common, rft=True))]
    rows = []
    for name, main, args in methods:
        t = time.time()
        out = main(args)
        wall = time.time() - t
        metrics = read_metrics(Path(out["run_dir"]))
        rows.append({"method": name, "run_dir": out["run_dir"], "wall_s": wall,
                     "before": out["before"]["accuracy"], "after": out["after"]["accuracy"],
                     "step_s": statistics.median(m["perf/step_s"] for m in metrics if "perf/step_s" in m),
                     "curve": [(m["step"], m["eval/accuracy"]) for m in metrics if "eval/accuracy" in m]})
    return rows


def step_time_ratio(a, repeats: int = 3) -> dict:
    """Time the training part of one step (π_ref log-probs + update for GRPO, update for NFT) on one
    shared rollout batch: only the objective and the reference forward differ."""
    from shared.models import chat_prompt, load_model
    from shared.rollouts import rollout_logprobs
    from shared.logprobs import token_logprobs
    from shared.sampling import generate
    from shared.tasks import load_task

    torch.manual_seed(a.seed)
    model, tok = load_model(a.model, seed=a.seed)
    ref = __import__("copy").deepcopy(model).eval().requires_grad_(False)
    task = load_task("arith", seed=a.seed, n_train=64, n_test=8, level=a.level)
    prompts = [chat_prompt(tok, p.prompt) for p in task.train[:a.batch_size]]
    ro = generate(model, tok, prompts, n=a.group_size, max_new_tokens=a.max_new_tokens)
    n = len(ro)
    correct = torch.tensor([float(i % 3 == 0) for i in range(n)])  # mixed groups, same for both
    rows = torch.arange(n)
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)  # lr 0: identical weights for every repeat

    def update(loss_fn):
        logp = token_logprobs(model, ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask)
        loss_fn(logp).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def grpo_step():
        ref_logp = rollout_logprobs(ref, ro, rows, 1.0, n)
        adv = grpo.group_advantages(correct, a.group_size)
        update(lambda lp: grpo.grpo_loss(lp, lp.detach(), ref_logp, adv, ro.completion_mask, beta=0.04)[0])

    def nft_step():
        rhat = nft.group_rate(correct, a.group_size)
        omega = nft.prompt_weights(rhat, "one_minus_r")
        update(lambda lp: nft.nft_loss(lp, lp.detach(), correct, rhat, omega, ro.completion_mask)[0])

    times = {"grpo": [], "nft": []}
    for _ in range(repeats + 1):  # the first round is warm-up
        for name, fn in (("grpo", grpo_step), ("nft", nft_step)):
            t = time.time()
            fn()
            times[name].append(time.time() - t)
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    return {"grpo_s": med["grpo"], "nft_s": med["nft"], "ratio": med["nft"] / med["grpo"], "rows": n}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--level", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=4)
    p.add_argument("--out", default=str(ROOT / "docs" / "nft"))
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    hardware = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"

    ratio = step_time_ratio(a)
    (out / "step_time.md").write_text(
        f"NFT vs GRPO training-step time on one shared rollout batch ({ratio['rows']} answers, {a.model}, {hardware}):\n\n"
        f"| GRPO (β=0.04: reference forward + update) | NFT (update) | NFT / GRPO |\n|---|---|---|\n"
        f"| {ratio['grpo_s']:.2f} s | {ratio['nft_s']:.2f} s | {ratio['ratio']:.2f} |\n")
    print((out / "step_time.md").read_text())

    rows = run_all(a)
    lines = [f"`python scripts/compare_grpo_nft.py --model {a.model} --steps {a.steps}` — arith level {a.level}, "
             f"B={a.batch_size}, G=K={a.group_size}, {a.max_new_tokens} new tokens, lr {a.lr}, seed {a.seed}, "
             f"{a.n_test} held-out problems, {hardware}.", "",
             "| method | held-out acc. before | after | wall time | median step |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['before']:.3f} | {r['after']:.3f} | {r['wall_s'] / 60:.1f} min | {r['step_s']:.1f} s |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    print("\n".join(lines))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        steps, acc = zip(*r["curve"])
        ax.plot(steps, acc, marker="o", label=r["method"])
    ax.set_xlabel("rollout step")
    ax.set_ylabel("held-out greedy accuracy")
    ax.set_title(f"arith level {a.level}, {Path(a.model).name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)


if __name__ == "__main__":
    main()
