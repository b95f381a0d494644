"""Plot learning curves from training runs: the learned policy's mean tree time over the
baseline's (``train.baseline``) on the evaluation seeds, against env steps.

    python scripts/plot_learning_curve.py RUN_DIR [RUN_DIR ...] --out curve.png [--labels a b]

Reads each run's ``train_summary.json`` (written by scripts/train.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--labels", nargs="*")
    parser.add_argument("--title", default="learning curve")
    parser.add_argument("--log-y", action="store_true", help="log-scale the ratio axis")
    args = parser.parse_args()
    if args.labels and len(args.labels) != len(args.runs):
        parser.error("--labels needs one label per run")
    fig, ax = plt.subplots(figsize=(6, 3.6))
    baseline = None
    for i, run in enumerate(args.runs):
        path = run / "train_summary.json"
        if not path.exists():
            parser.error(f"{path} does not exist: is {run} a scripts/train.py run directory?")
        summary = json.loads(path.read_text())
        history = summary["eval_history"]
        if not history:
            parser.error(f"{path}: no evaluations (train.eval_every was 0)")
        baseline = summary["baseline"]
        label = args.labels[i] if args.labels else run.name
        ax.plot(
            [h["timesteps"] for h in history],
            [h["ratio_to_baseline"] for h in history],
            marker="o",
            label=label,
        )
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    if args.log_y:
        ax.set_yscale("log")
    ax.set_xlabel("env steps")
    ax.set_ylabel(f"mean tree time / {baseline}")
    ax.set_title(args.title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(args.out)


if __name__ == "__main__":
    main()
