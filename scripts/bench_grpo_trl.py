"""Time GRPO steps of `algos/grpo.py` against TRL's `GRPOTrainer` on the same model, prompts, group
size, generation length, β and learning rate, in one run, and print the per-step ratio and the peak
memory of each.

    pip install trl            # benchmark-only dependency, not in requirements.txt
    python scripts/bench_grpo_trl.py --model tiny
    python scripts/bench_grpo_trl.py --model HuggingFaceTB/SmolLM2-135M-Instruct
    python scripts/bench_grpo_trl.py --model HuggingFaceTB/SmolLM2-135M-Instruct --trl-defaults

Like for like by default: TRL runs without gradient checkpointing (its default recomputes every
activation in the backward pass; ours recomputes nothing) and without its KL bias correction (its
default multiplies the k3 term by the importance ratio, DeepSeek-V3.2; ours is DeepSeekMath's plain
k3). `--trl-defaults` leaves both at TRL's defaults instead.

Each trainer runs in its own subprocess (so peak memory — max RSS on CPU, max allocated on CUDA — is
its own) for `--steps` steps; the first step is warm-up and excluded from the median. Our step time
is `perf/step_s` (generation + reference + update, evaluation excluded); TRL's is the wall time
between `on_step_begin` and `on_step_end` of its training loop (generation + scoring + update).
Both are split into generation (sampling and verifying the answers), reference (π_ref log-probs,
plus rewards and advantages for TRL) and update (the policy's forward, backward and optimizer step);
for TRL the split comes from timing its `_generate` and `_generate_and_score_completions`.
Our trainer runs twice, with the shared prompt (each prompt computed once per group: `share_prompt`
in shared/logprobs.py and shared/sampling.py, the default) and without it (every row computes its own
copy of the prompt); with the same seed both draw the same prompts and sample the same answers
until float32 rounding (which differs between the two paths) flips a sampled token; the JSONL row
records each step's reward and answer length and the number of leading steps on which they agree.
`--skip-plain` leaves out the second run.
Results are appended to `--out` (JSON lines) and printed as markdown rows.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_ours(a, share_prompt: bool = True) -> dict:
    import inspect

    import torch

    import shared.logprobs
    import shared.sampling
    from algos.grpo import Args, main
    from shared.run import read_metrics

    if not share_prompt:  # every call that does not pass share_prompt takes the per-row path
        for fn in (shared.logprobs.token_logprobs, shared.sampling.generate):
            fn = inspect.unwrap(fn)  # generate is wrapped by torch.no_grad
            assert fn.__code__.co_varnames[fn.__code__.co_argcount - 1] == "share_prompt"
            fn.__defaults__ = fn.__defaults__[:-1] + (False,)

    out = main(Args(model=a.model, task="arith", seed=a.seed, total_steps=a.steps, batch_size=a.batch_size,
                    group_size=a.group_size, max_new_tokens=a.max_new_tokens, lr=a.lr, beta=a.beta,
                    n_test=4, eval_every=10**6, save_every=10**6,
                    output_dir=str(ROOT / "runs" / "bench")))
    rows = [r for r in read_metrics(Path(out["run_dir"])) if "perf/step_s" in r]
    split = {k: [r[f"perf/{k}_s"] for r in rows] for k in ("gen", "ref", "update")}
    return {"step_s": [r["perf/step_s"] for r in rows], **split, "peak_mb": peak_memory_mb(),
            "reward": [r["train/reward"] for r in rows], "completion_len": [r["train/completion_len"] for r in rows],
            "device": str(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")}


def run_trl(a) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from shared.models import load_model
    from shared.run import seed_everything
    from shared.tasks import load_task

    seed_everything(a.seed)
    model, tokenizer = load_model(a.model, seed=a.seed)
    task = load_task("arith", seed=a.seed, n_train=2000, n_test=200)
    system = [{"role": "system", "content": task.system_prompt}] if task.system_prompt else []
    rows = [{"prompt": system + [{"role": "user", "content": p.prompt}], "idx": i} for i, p in enumerate(task.train)]
    dataset = Dataset.from_list(rows)

    def reward(completions, idx, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [task.reward(t, task.train[i]) for t, i in zip(texts, idx)]

    times, t0, inner = [], [0.0], {"_generate": [], "_generate_and_score_completions": []}

    class Timer(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            t0[0] = time.time()

        def on_step_end(self, *args, **kwargs):
            times.append(time.time() - t0[0])

    def timed(fn, name):  # wall time of each call of one of the trainer's methods
        def wrapper(*args, **kwargs):
            start = time.time()
            try:
                return fn(*args, **kwargs)
            finally:
                inner[name].append(time.time() - start)
        return wrapper

    use_cuda = torch.cuda.is_available()
    config = GRPOConfig(
        output_dir=str(ROOT / "runs" / "bench" / "trl"), max_steps=a.steps, learning_rate=a.lr, beta=a.beta,
        num_generations=a.group_size, per_device_train_batch_size=a.batch_size * a.group_size,
        gradient_accumulation_steps=1, max_completion_length=a.max_new_tokens, temperature=1.0,
        loss_type="grpo", scale_rewards="group", logging_steps=1, save_strategy="no", report_to=[],
        seed=a.seed, bf16=use_cuda, use_cpu=not use_cuda, dataloader_num_workers=0, lr_scheduler_type="constant",
        warmup_steps=0, max_grad_norm=1.0, model_init_kwargs={"dtype": "bfloat16" if use_cuda else "float32"},
        **({} if a.trl_defaults else {"gradient_checkpointing": False, "use_bias_correction_kl": False}))
    # TRL builds its reference model from the policy's path when β > 0, so hand it a directory
    model_dir = ROOT / "runs" / "bench" / "trl_model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    trainer = GRPOTrainer(model=str(model_dir), processing_class=tokenizer, reward_funcs=[reward], args=config,
                          train_dataset=dataset, callbacks=[Timer()])
    for name in inner:
        setattr(trainer, name, timed(getattr(trainer, name), name))
    trainer.train()
    gen, scored = inner["_generate"], inner["_generate_and_score_completions"]
    return {"step_s": times, "gen": gen, "ref": [b - g for g, b in zip(gen, scored)],
            "update": [t - b for b, t in zip(scored, times)], "peak_mb": peak_memory_mb(),
            "gradient_checkpointing": trainer.args.gradient_checkpointing,
            "use_bias_correction_kl": trainer.args.use_bias_correction_kl}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4, help="questions per step (B)")
    p.add_argument("--group-size", type=int, default=8, help="answers per question (G)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trl-defaults", action="store_true",
                   help="TRL with its defaults (gradient checkpointing, bias-corrected KL) instead of matched settings")
    p.add_argument("--skip-plain", action="store_true",
                   help="leave out the run of our trainer without the shared prompt")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench" / "grpo_vs_trl.jsonl"))
    p.add_argument("--which", choices=["both", "ours", "ours_plain", "trl"], default="both", help=argparse.SUPPRESS)
    a = p.parse_args()

    if a.which != "both":  # child process: run one trainer, print one JSON line
        res = run_trl(a) if a.which == "trl" else run_ours(a, share_prompt=a.which == "ours")
        print("RESULT " + json.dumps(res))
        return

    results = {}
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    for which in ("ours",) + (() if a.skip_plain else ("ours_plain",)) + ("trl",):
        cmd = [sys.executable, __file__, "--which", which] + sys.argv[1:]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode or not lines:
            sys.exit(f"{which} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
        results[which] = json.loads(lines[-1][len("RESULT "):])
    med = {k: statistics.median(v["step_s"][1:] or v["step_s"]) for k, v in results.items()}
    split = {k: {part: statistics.median(v[part][1:] or v[part]) for part in ("gen", "ref", "update")}
             for k, v in results.items()}
    trl = results["trl"]
    row = {"model": a.model, "device": results["ours"]["device"], "cpus": os.cpu_count(), "machine": platform.machine(),
           "torch": torch_version(), "B": a.batch_size, "G": a.group_size, "max_new_tokens": a.max_new_tokens,
           "beta": a.beta, "steps": a.steps, "trl_gradient_checkpointing": trl["gradient_checkpointing"],
           "trl_use_bias_correction_kl": trl["use_bias_correction_kl"],
           "ours_step_s": med["ours"], "trl_step_s": med["trl"], "ratio_ours_over_trl": med["ours"] / med["trl"],
           "ours_split_s": split["ours"], "trl_split_s": split["trl"],
           "ours_peak_mb": results["ours"]["peak_mb"], "trl_peak_mb": trl["peak_mb"],
           "ours_all_steps": results["ours"]["step_s"], "trl_all_steps": trl["step_s"],
           "ours_reward": results["ours"]["reward"], "ours_completion_len": results["ours"]["completion_len"]}
    if "ours_plain" in results:
        plain = results["ours_plain"]
        row.update({"ours_plain_step_s": med["ours_plain"], "ours_plain_split_s": split["ours_plain"],
                    "speedup_shared_prompt": med["ours_plain"] / med["ours"],
                    "ratio_ours_plain_over_trl": med["ours_plain"] / med["trl"],
                    "ours_plain_peak_mb": plain["peak_mb"], "ours_plain_all_steps": plain["step_s"],
                    "ours_plain_reward": plain["reward"], "ours_plain_completion_len": plain["completion_len"]})
        # float32 rounding differs between the two paths, so a sampled token may flip at some step and
        # the runs diverge from there on: count the leading steps whose batches still agree
        same = [r == q and n == m for r, q, n, m in zip(row["ours_reward"], plain["reward"],
                                                         row["ours_completion_len"], plain["completion_len"])]
        row["same_batch_steps"] = same.index(False) if False in same else len(same)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    trl_config = "TRL defaults" if a.trl_defaults else "no grad. ckpt, plain k3"
    fmt = lambda s: f"{s['gen']:.2f} / {s['ref']:.2f} / {s['update']:.2f}"  # noqa: E731
    print("| model | device | B×G | new tokens | β | TRL config | ours s/step (gen / ref / update) | "
          "TRL s/step (gen / ref+scoring / update) | ours/TRL | ours peak MB | TRL peak MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {a.model} | {row['device']} ({os.cpu_count()} CPUs) | {a.batch_size}×{a.group_size} | {a.max_new_tokens} | "
          f"{a.beta} | {trl_config} | {med['ours']:.2f} ({fmt(split['ours'])}) | {med['trl']:.2f} ({fmt(split['trl'])}) | "
          f"{row['ratio_ours_over_trl']:.2f} | {row['ours_peak_mb']:.0f} | {row['trl_peak_mb']:.0f} |")
    if "ours_plain" in results:
        print(f"\nwithout the shared prompt: {med['ours_plain']:.2f} s/step ({fmt(split['ours_plain'])}), "
              f"ours/TRL {row['ratio_ours_plain_over_trl']:.2f}, peak {row['ours_plain_peak_mb']:.0f} MB; "
              f"shared-prompt speed-up {row['speedup_shared_prompt']:.2f}x; the same rewards and answer lengths "
              f"in the first {row['same_batch_steps']} of {len(same)} steps")


def torch_version() -> str:
    import torch

    return torch.__version__


if __name__ == "__main__":
    main()
