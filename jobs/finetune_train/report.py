"""What a finished run leaves beside the model: metrics.json, loss.png and, for a classifier,
confusion.png."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(out: Path, state: dict, stopped_early: bool, extra: dict) -> None:
    """`extra`: test (metrics of the test split), restored_best (the step whose model was
    exported, with restoreBest), per_class, confusion and labels (classifiers)."""
    evals = state["eval"]
    restored = extra.get("restored_best")
    after = next((e for e in evals if restored and e["step"] == restored["step"]), evals[-1] if evals else {})
    metrics = {
        "steps": state["step"],
        "stopped_early": stopped_early,
        "eval_before": {k: v for k, v in evals[0].items() if k != "step"} if evals else {},
        "eval_after": {k: v for k, v in after.items() if k != "step"},
        **{k: v for k, v in extra.items() if v is not None and k != "labels"},
        "train": state["train"],
        "eval": evals,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_losses(state, out / "loss.png")
    if extra.get("confusion"):
        plot_confusion(extra["confusion"], extra["labels"], out / "confusion.png", "test" if extra.get("test") else "validation")


def plot_confusion(confusion: list[list[float]], labels: list[str], path: Path, split: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(labels)
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * n + 2), max(3.5, 0.6 * n + 1.5)), dpi=120)
    image = ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{confusion[i][j]:.0f}", ha="center", va="center", fontsize=8,
                    color="white" if confusion[i][j] > 0.5 * max(map(max, confusion)) else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion matrix ({split})")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


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
