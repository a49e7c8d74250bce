"""What a finished run leaves beside the model: metrics.json and loss.png."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(out: Path, state: dict, stopped_early: bool) -> None:
    evals = state["eval"]
    metrics = {
        "steps": state["step"],
        "stopped_early": stopped_early,
        "eval_before": {k: v for k, v in evals[0].items() if k != "step"} if evals else {},
        "eval_after": {k: v for k, v in evals[-1].items() if k != "step"} if evals else {},
        "train": state["train"],
        "eval": evals,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_losses(state, out / "loss.png")


def plot_losses(state: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if state["train"]:
        ax.plot([p["step"] for p in state["train"]], [p["train_loss"] for p in state["train"]], label="train loss")
    if state["eval"]:
        ax.plot([p["step"] for p in state["eval"]], [p["eval_loss"] for p in state["eval"]], "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
