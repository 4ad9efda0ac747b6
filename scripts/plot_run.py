"""Plot a run's learning curve from its metrics.jsonl: held-out accuracy and training reward per step.

    python scripts/plot_run.py runs/grpo__arith__0__1764130000 [--out curve.png]
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, default=None, help="default: RUN_DIR/curve.png")
    a = p.parse_args()
    rows = [json.loads(line) for line in (a.run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, style in (("eval/accuracy", "o-"), ("train/accuracy", ".--")):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), style, label=key)
    args = json.loads((a.run_dir / "args.json").read_text())
    ax.set_xlabel("rollout step")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{a.run_dir.name.split('__')[0]} on {args.get('task')} — {Path(str(args.get('model'))).name}")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = a.out or a.run_dir / "curve.png"
    fig.savefig(out, dpi=120)
    print(out)


if __name__ == "__main__":
    main()
