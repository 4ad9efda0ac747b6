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

import copy
import dataclasses
import json
import os
import random
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from shared.args import check_args, require, usage_error
from shared.models import load_model
from shared.sampling import generated_tokens, set_generated_tokens


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


def save_args(run_dir: Path, args: Any, algo: str | None = None) -> None:
    """`args.json`: the resolved args (and the algorithm's name, checked when a run is resumed)."""
    fields = dataclasses.asdict(args)
    record = {"algo": algo, **fields} if algo is not None else fields
    (Path(run_dir) / "args.json").write_text(json.dumps(record, indent=2, default=str))


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
        self.last_step = 0
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
        self.last_step = step
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
class Run:
    """The plumbing every LM training script starts with, in one place:

        run = Run("grpo", args, presets=resolve_variant)   # check flags, resume, task, accelerator, run dir
        args, task = run.args, run.task
        lm = run.setup_lm(reference=args.beta > 0)          # model, tokenizer, π_ref, optimizer, scheduler,
                                                            # accelerate.prepare, restore from --resume
        run.evaluate(lm, step, args.max_new_tokens)         # logs eval/* and prints one line
        with run.atomic():                                  # Ctrl-C / SIGTERM wait until this block is done
            ...update...
        run.save(lm, step=step, cursor=...)

    Nothing expensive happens before the flags are checked: a bad flag (or a `--resume` directory
    that is not a run of this algorithm) exits with status 2 and one line, before a task or model is
    loaded and before a run directory exists. `Accelerator(cpu=True)` when there is no GPU is what
    makes `torchrun --nproc_per_node N` use gloo.
    """

    def __init__(self, algo: str, args: Any, presets: Callable[[Any], Any] | None = None,
                 label: str | None = None, task: bool = True):
        """algo: the script's name, recorded in args.json and checked on --resume; label: the run
        directory's prefix (default `algo`, e.g. `rft` for `nft.py --rft`); presets: fills the fields a
        variant/mode leaves at None (applied after resume merging, before args.json is written);
        task: load `args.task` here (its sizes are checked before a run directory exists)."""
        from accelerate import Accelerator
        from accelerate.utils import broadcast_object_list

        cls = type(args)
        check_args(args)
        if args.resume:
            check_resume_dir(Path(args.resume), algo, cls)
            args = merge_resumed_args(Path(args.resume), args, cls)
        if presets is not None:
            args = presets(args)
        check_args(args)
        self.task = load_task_checked(args) if task else None
        cuda = torch.cuda.is_available()
        mixed = args.dtype == "bf16-mixed" or (args.dtype == "auto" and cuda)
        self.accelerator = acc = Accelerator(cpu=not cuda, mixed_precision="bf16" if mixed else "no")
        check_args(args, world=acc.num_processes)
        self.args, self.algo = args, algo
        self.log = print if acc.is_main_process else (lambda *a, **k: None)
        if args.resume:
            self.dir = Path(args.resume)
        else:  # every process must agree on the directory: the main one names it
            name = [str(make_run_dir(label or algo, args.task, args.seed, args.output_dir)) if acc.is_main_process else ""]
            self.dir = Path(broadcast_object_list(name)[0])
        if acc.is_main_process:
            save_args(self.dir, args, algo)
        self.logger = MetricsLogger(self.dir, acc.is_main_process, args.track, args.wandb_project, args)
        self._atomic, self._pending = 0, None
        set_generated_tokens(0)  # the token budget counts this run's generations (restore() resumes the count)
        if threading.current_thread() is threading.main_thread():  # Ctrl-C and `kill`/preemption alike
            signal.signal(signal.SIGINT, self._on_signal)
            signal.signal(signal.SIGTERM, self._on_signal)

    # ------------------------------------------------------------------ set-up
    def setup_lm(self, *, reference: bool = False, weight_decay: float = 0.0, warmup_steps: int = 0,
                 lr_lambda: Callable[[int], float] | None = None, restore: bool = True) -> LM:
        """Load the policy (and tokenizer), an optional frozen π_ref, AdamW over the trainable
        parameters, a LambdaLR schedule (linear warm-up over `warmup_steps` optimizer steps, unless
        `lr_lambda` is given), `accelerator.prepare`, and, with --resume, the checkpoint.

        reference: keep a frozen copy of the initial policy as π_ref (with LoRA none is needed: π_ref
        is the base model with the adapter disabled, `lm.reference()` either way).
        restore=False: leave restoring to the caller (`lm.state = run.restore(lm)`), for a method that
        must capture the initial weights first (STaR restarts from them)."""
        args, acc = self.args, self.accelerator
        seed_everything(args.seed)
        model, tokenizer = load_model(args.model, device=acc.device, lora_r=args.lora_r, seed=args.seed, log=self.log,
                                      dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32,
                                      load_in_4bit=args.load_in_4bit, load_in_8bit=args.load_in_8bit)
        ref = self._frozen(model) if reference and not args.lora_r else None
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=weight_decay)
        warmup = max(warmup_steps, 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda or (lambda s: min(1.0, (s + 1) / warmup)))
        model, optimizer = acc.prepare(model, optimizer)  # not the scheduler: accelerate would step it per process
        lm = LM(model, tokenizer, self.task, optimizer, scheduler, params, acc, ref)
        if restore:
            lm.state = self.restore(lm)
        return lm

    def restore(self, lm: LM) -> dict:
        """A new run: seed each process differently (seed + rank) so they sample different answers.
        A resumed run: load weights, optimizer, scheduler and this process's RNG states; return the
        saved extras (step, cursor, ...)."""
        acc = self.accelerator
        if not self.args.resume:
            seed_everything(self.args.seed + acc.process_index)
            return {}
        state = load_checkpoint(self.dir, acc.unwrap_model(lm.model))
        lm.optimizer.load_state_dict(state.pop("optimizer"))
        lm.scheduler.load_state_dict(state.pop("scheduler"))
        set_rng_state(state.pop("rng")[acc.process_index])
        set_generated_tokens(state.pop("gen_tokens", [0] * acc.num_processes)[acc.process_index])
        where = ", ".join(f"{k} {v}" for k, v in state.items() if isinstance(v, int))
        self.log(f"resumed {self.dir} after {where}")
        return state

    def frozen_copy(self, lm: LM):
        """A frozen snapshot of the current policy (e.g. M_t as the next iteration's reference, or
        the SFT model as a KL anchor), run in the same precision as the policy. With LoRA the whole
        peft model is copied."""
        return self._frozen(lm.policy)

    def _frozen(self, model):
        frozen = copy.deepcopy(model).eval().requires_grad_(False)
        if self.accelerator.mixed_precision == "no" or hasattr(frozen, "_original_forward"):
            return frozen  # fp32, or a copy of a policy whose forward already runs under autocast
        return self.accelerator.prepare_model(frozen, evaluation_mode=True)  # the policy's autocast wrapper

    # ------------------------------------------------------------------ during the run
    def save(self, lm: LM, **extras) -> None:
        """Checkpoint (every process calls this): weights, optimizer, scheduler, every process's RNG,
        and `extras` (step, prompt-stream cursor, ...)."""
        from accelerate.utils import gather_object

        acc = self.accelerator
        rngs = gather_object([rng_state()]) if acc.num_processes > 1 else [rng_state()]
        tokens = gather_object([generated_tokens()]) if acc.num_processes > 1 else [generated_tokens()]
        save_checkpoint(self.dir, lm.model, lm.tokenizer, {**extras, "rng": rngs, "gen_tokens": tokens,
                                                           "optimizer": lm.optimizer.state_dict(),
                                                           "scheduler": lm.scheduler.state_dict()}, acc)

    def evaluate(self, lm: LM, step: int, max_new_tokens: int, problems: list | None = None,
                 split: str = "eval") -> dict:
        """Greedy accuracy on `problems` (default: the task's held-out split), logged as {split}/* at `step`."""
        from shared.evaluation import evaluate

        t = time.time()
        problems = self.task.test if problems is None else problems
        res = evaluate(lm.model, lm.tokenizer, self.task, problems, max_new_tokens, accelerator=self.accelerator)
        self.logger.log({f"{split}/{k}": v for k, v in res.items()} | {f"perf/{split}_s": time.time() - t,
                                                                      "perf/gen_tokens": self.tokens_spent()}, step)
        self.log(f"step {step}: {split} greedy accuracy {res['accuracy']:.3f} on {len(problems)} problems")
        return res

    def tokens_spent(self) -> int:
        """Tokens generated for training so far, summed over processes (every process must call this
        at the same point: it is a collective when several run). Held-out evaluation is not counted."""
        if self.accelerator.num_processes == 1:
            return generated_tokens()
        total = torch.tensor([generated_tokens()], dtype=torch.float64, device=self.accelerator.device)
        return int(self.accelerator.reduce(total, reduction="sum").item())

    def budget_left(self) -> bool:
        """False once `--token-budget` tokens have been generated for training (always True without a
        budget). A loop checks it before each step, on every process, and stops as after its last step."""
        return not self.args.token_budget or self.tokens_spent() < self.args.token_budget

    @contextmanager
    def atomic(self):
        """A block that Ctrl-C or SIGTERM does not cut in half (an optimizer update and the bookkeeping
        that goes with it): the signal is held until the block ends, then raised as KeyboardInterrupt,
        so a checkpoint written in the handler never holds half an update. A second Ctrl-C aborts at
        once, without saving."""
        self._atomic += 1
        try:
            yield
        finally:
            self._atomic -= 1
        if self._atomic == 0 and self._pending is not None:
            signum, self._pending = self._pending, None
            raise KeyboardInterrupt(f"signal {signum}")

    def _on_signal(self, signum, frame):
        if self._atomic and self._pending is None:
            self._pending = signum
            self.log("\nfinishing the current update before stopping (Ctrl-C again to abort without saving)")
            return
        raise KeyboardInterrupt(f"signal {signum}")

    def save_on_interrupt(self, lm: LM, what: str, **extras) -> None:
        """In `except KeyboardInterrupt:` (Ctrl-C or SIGTERM): say so, and checkpoint the last complete
        step (`extras` as for `save`); the caller re-raises."""
        self.log(f"\ninterrupted after {what}: saving a checkpoint; continue with --resume {self.dir}")
        self.save(lm, **extras)

    def close(self) -> None:
        """Log this process's peak memory (max resident set size; on CUDA also the peak of allocated
        GPU memory) at the last logged step, and close the metrics files."""
        import resource

        peak = {"perf/peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB on Linux
        if torch.cuda.is_available():
            peak["perf/cuda_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
        self.logger.log(peak, self.logger.last_step)
        self.logger.close()

    def summary(self, lm: LM, before: dict | None, after: dict | None) -> dict:
        """The last lines of a run (held-out accuracy before and after, the run directory), and what
        `main` returns."""
        if before is not None and after is not None:
            self.log(f"held-out greedy accuracy: before {before['accuracy']:.3f}, after {after['accuracy']:.3f}")
        self.log(f"run directory: {self.dir}")
        return {"run_dir": str(self.dir), "before": before, "after": after, "policy": lm.policy}


@dataclass
class LM:
    """What `Run.setup_lm` returns: everything a language-model training loop works on."""

    model: Any  # the policy, prepared by accelerate (DDP-wrapped when several processes run)
    tokenizer: Any
    task: Any
    optimizer: Any
    scheduler: Any
    params: list  # the trainable parameters
    accelerator: Any
    ref_copy: Any = None  # frozen π_ref copy (None with LoRA or without reference=True)
    state: dict = dataclasses.field(default_factory=dict)  # restored extras (step, cursor, ...); {} for a new run

    @property
    def policy(self):
        """The policy without its DDP wrapper (for `generate`, saving, adapter switches)."""
        return self.accelerator.unwrap_model(self.model)

    @contextmanager
    def reference(self):
        """π_ref as a model to run forward passes on: the frozen copy of the initial policy, or with
        LoRA the policy itself with its adapter disabled for the duration of the block."""
        if self.ref_copy is not None:
            yield self.ref_copy
        elif hasattr(self.policy, "disable_adapter"):
            with self.policy.disable_adapter():
                yield self.model
        else:
            raise RuntimeError("no reference model: call setup_lm(reference=True)")


def check_resume_dir(run_dir: Path, algo: str, cls: type, need_checkpoint: bool = True) -> None:
    """Exit with one line unless `run_dir` is a run of `algo` with a checkpoint to resume from (or, without
    `need_checkpoint`, a run of `algo` that may not have saved one yet and then starts afresh)."""
    state = run_dir / "checkpoint" / "trainer_state.pt"
    require((run_dir / "args.json").is_file(), "resume", run_dir, "not a run directory (no args.json)")
    saved = json.loads((run_dir / "args.json").read_text())
    other = saved.get("algo")
    if other is None:  # args.json of an older run: recognise the algorithm by its fields
        fields = {f.name for f in dataclasses.fields(cls)}
        other = algo if set(saved) <= fields else "another algorithm (its flags differ)"
    require(other == algo, "resume", run_dir, f"a run of {other}, not {algo}")
    require(state.is_file() or not need_checkpoint, "resume", run_dir, f"has no checkpoint to resume from (no {state})")


def load_task_checked(args: Any):
    """`load_task` for the args' task, with a size it cannot provide turned into a one-line usage error."""
    from shared.tasks import load_task

    try:
        return load_task(args.task, seed=args.seed, n_train=args.n_train, n_test=args.n_test, level=args.level,
                         n_dev=args.n_dev)
    except ValueError as e:
        usage_error(f"--n-train {args.n_train} / --n-test {args.n_test} / --n-dev {args.n_dev} for {args.task} "
                    f"level {args.level}: {e}")
