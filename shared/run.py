"""Run plumbing shared by every script: seeding, run directories, metrics, checkpoints.

A run lives in `runs/{algo}__{task}__{seed}__{time}/`:
    args.json           the resolved `Args`
    metrics.jsonl       one JSON object per logged step (always written)
    events.*            TensorBoard events (with --track)
    checkpoint/         `save_pretrained` directory of the policy + tokenizer, and
    checkpoint/trainer_state.pt   optimizer, scheduler, RNG states, step and any loop counters

Checkpoints are written to `checkpoint.tmp/` and renamed over `checkpoint/`, so a run killed while
saving keeps its previous checkpoint intact.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


# ---------------------------------------------------------------------------------------- seeding
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds all CUDA devices


def rng_state() -> dict:
    """Every RNG state a training loop touches, so a resumed run draws the same numbers."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------- run dir
def make_run_dir(algo: str, task: str, seed: int, output_dir: str | os.PathLike = "runs") -> Path:
    """`{output_dir}/{algo}__{task}__{seed}__{unix time}`; the time makes concurrent runs distinct."""
    run_dir = Path(output_dir) / f"{algo}__{task}__{seed}__{int(time.time())}"
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def save_args(run_dir: Path, args: Any) -> None:
    (Path(run_dir) / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2, default=str))


def merge_resumed_args(run_dir: Path, cli_args: Any, cls: type) -> Any:
    """The `Args` a resumed run continues with: the run's saved args.json, overridden by every flag
    given on this command line (e.g. a larger `--total-steps`) and by every field of `cli_args`
    that differs from its default (for callers that build `Args(...)` in Python)."""
    path = Path(run_dir) / "args.json"
    if not path.exists():
        raise SystemExit(f"--resume: {run_dir} is not a run directory (no args.json)")
    saved = json.loads(path.read_text())
    defaults = cls()
    merged = {}
    for f in dataclasses.fields(cls):
        given = getattr(cli_args, f.name)
        flag = "--" + f.name.replace("_", "-")
        on_command_line = any(a == flag or a.startswith(flag + "=") for a in sys.argv[1:])
        changed = on_command_line or given != getattr(defaults, f.name)
        merged[f.name] = given if changed or f.name not in saved else saved[f.name]
    merged["resume"] = str(run_dir)
    return cls(**merged)


# ---------------------------------------------------------------------------------------- metrics
class MetricsLogger:
    """Metrics to `metrics.jsonl` always; to TensorBoard and/or W&B when asked.

    Only the main process writes (`enabled=False` elsewhere), so multi-process runs log once.
    """

    def __init__(self, run_dir: Path, enabled: bool = True, track: bool = False,
                 wandb_project: str | None = None, config: Any = None):
        self.enabled = enabled
        self.tb = self.wandb = None
        if not enabled:
            return
        self.file = open(Path(run_dir) / "metrics.jsonl", "a", buffering=1)  # line-buffered: survives kills
        if track:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir))
        if wandb_project:
            import wandb

            cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
            self.wandb = wandb.init(project=wandb_project, name=Path(run_dir).name, config=cfg, dir=str(run_dir))

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        self.file.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        if self.tb is not None:
            for k, v in clean.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(clean, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(run_dir: Path, model, tokenizer, state: dict, accelerator=None) -> Path:
    """Write `checkpoint/` atomically: the model as a `save_pretrained` directory (adapter only for
    a peft model) plus `trainer_state.pt` holding `state` (optimizer, scheduler, RNG, step, ...).

    With an accelerator, every process must call this (state dicts may need collectives); only the
    main process writes.
    """
    run_dir = Path(run_dir)
    final, tmp = run_dir / "checkpoint", run_dir / "checkpoint.tmp"
    is_main = accelerator is None or accelerator.is_main_process
    unwrapped = accelerator.unwrap_model(model) if accelerator is not None else model
    state_dict = accelerator.get_state_dict(model) if accelerator is not None else None
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        torch.save(state, tmp / "trainer_state.pt")
        if final.exists():  # swap: the old checkpoint is removed only once the new one is complete
            old = run_dir / "checkpoint.old"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return final


def load_checkpoint(run_dir: Path, model) -> dict:
    """Load the weights of `run_dir/checkpoint` into `model` (unwrapped) and return the trainer state."""
    from safetensors.torch import load_file

    ckpt = Path(run_dir) / "checkpoint"
    if not (ckpt / "trainer_state.pt").exists():
        raise SystemExit(f"--resume: no checkpoint in {ckpt} (expected {ckpt / 'trainer_state.pt'})")
    if (ckpt / "adapter_model.safetensors").exists():  # peft: only the adapter was saved
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(ckpt / "adapter_model.safetensors"))
    else:
        weights = load_file(ckpt / "model.safetensors")
        missing, unexpected = model.load_state_dict(weights, strict=False)
        # tied embeddings are saved once, so lm_head may be reported missing; anything else is an error
        missing = [k for k in missing if not k.endswith("lm_head.weight")]
        if missing or unexpected:
            raise RuntimeError(f"checkpoint does not match the model: missing={missing} unexpected={unexpected}")
    return torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)


# ---------------------------------------------------------------------------------------- a run
def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


class Run:
    """The plumbing every LM training script starts with, in one place:

        run = Run("grpo", args, Args)         # accelerator, run dir, args.json, metrics logger
        args = run.args                       # with --resume: the saved args, overridden by given flags
        ...build model, optimizer, scheduler; accelerator.prepare(...)
        state = run.restore(model, optimizer, scheduler)   # {} for a new run, else step, cursor, ...
        run.evaluate(model, tokenizer, task, step, max_new_tokens)   # logs eval/* and prints one line
        run.save(model, tokenizer, optimizer, scheduler, step=step, cursor=...)

    `Accelerator(cpu=True)` when there is no GPU is what makes `torchrun --nproc_per_node N` use gloo.
    """

    def __init__(self, algo: str, args: Any, args_cls: type):
        from accelerate import Accelerator
        from accelerate.utils import broadcast_object_list

        if args.resume:
            args = merge_resumed_args(Path(args.resume), args, args_cls)
        self.args = args
        self.accelerator = acc = Accelerator(cpu=not torch.cuda.is_available())
        self.log = print if acc.is_main_process else (lambda *a, **k: None)
        if args.resume:
            self.dir = Path(args.resume)
        else:  # every process must agree on the directory: the main one names it
            name = [str(make_run_dir(algo, args.task, args.seed, args.output_dir)) if acc.is_main_process else ""]
            self.dir = Path(broadcast_object_list(name)[0])
        if acc.is_main_process:
            save_args(self.dir, args)
        self.logger = MetricsLogger(self.dir, acc.is_main_process, args.track, args.wandb_project, args)
        if threading.current_thread() is threading.main_thread():  # `kill`/preemption: checkpoint like Ctrl-C
            signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)

    def restore(self, model, optimizer, scheduler) -> dict:
        """A new run: seed each process differently (seed + rank) so they sample different answers.
        A resumed run: load weights, optimizer, scheduler and this process's RNG states; return the
        saved extras (step, cursor, ...)."""
        acc = self.accelerator
        if not self.args.resume:
            seed_everything(self.args.seed + acc.process_index)
            return {}
        state = load_checkpoint(self.dir, acc.unwrap_model(model))
        optimizer.load_state_dict(state.pop("optimizer"))
        scheduler.load_state_dict(state.pop("scheduler"))
        set_rng_state(state.pop("rng")[acc.process_index])
        where = ", ".join(f"{k} {v}" for k, v in state.items() if isinstance(v, int))
        self.log(f"resumed {self.dir} after {where}")
        return state

    def save(self, model, tokenizer, optimizer, scheduler, **extras) -> None:
        """Checkpoint (every process calls this): weights, optimizer, scheduler, every process's RNG."""
        from accelerate.utils import gather_object

        acc = self.accelerator
        rngs = gather_object([rng_state()]) if acc.num_processes > 1 else [rng_state()]
        save_checkpoint(self.dir, model, tokenizer, {**extras, "rng": rngs, "optimizer": optimizer.state_dict(),
                                                     "scheduler": scheduler.state_dict()}, acc)

    def evaluate(self, model, tokenizer, task, step: int, max_new_tokens: int) -> dict:
        """Greedy accuracy on the held-out split, logged as eval/* at `step`."""
        from shared.evaluation import evaluate

        t = time.time()
        res = evaluate(model, tokenizer, task, task.test, max_new_tokens, accelerator=self.accelerator)
        self.logger.log({f"eval/{k}": v for k, v in res.items()} | {"perf/eval_s": time.time() - t}, step)
        self.log(f"step {step}: held-out greedy accuracy {res['accuracy']:.3f} on {len(task.test)} problems")
        return res
