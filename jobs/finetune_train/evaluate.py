"""Distributed evaluation: every rank scores its shard, sums are all-reduced, so every rank
ends with the same metrics (early stopping decides identically everywhere)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist

from finetune_train.data import model_inputs
from finetune_train.loss import summed_loss


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


class Evaluation(NamedTuple):
    metrics: dict[str, float]
    confusion: list[list[float]] | None  # classification: rows true class, columns predicted


@torch.no_grad()
def evaluate(engine, batches, classify: bool, num_classes: int | None, device, prefix: str = "eval_") -> Evaluation:
    was_training = engine.module.training
    engine.eval()
    # Sums stay on the device: no per-batch host copy of the logits, and NCCL reduces only
    # device tensors.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    confusion = torch.zeros((num_classes or 1, num_classes or 1), dtype=torch.float64, device=device)
    for batch, weight in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        weight = weight.to(device, torch.float64)
        logits = engine(**model_inputs(batch)).logits
        labels = batch["labels"]
        loss, targets = summed_loss(logits, labels, classify, weight)
        loss_sum += loss.double()
        count += targets.double()
        if classify:
            confusion.index_put_((labels, logits.argmax(-1)), weight, accumulate=True)
    totals = all_reduce(torch.cat([loss_sum[None], count[None], confusion.flatten()])).cpu()
    engine.train(was_training)
    loss = (totals[0] / totals[1].clamp(min=1)).item()
    if not classify:
        return Evaluation({f"{prefix}loss": loss, f"{prefix}perplexity": math.exp(min(loss, 50.0))}, None)
    confusion = totals[2:].view_as(confusion)
    true_pos = confusion.diag()
    precision = true_pos / confusion.sum(0).clamp(min=1e-12)
    recall = true_pos / confusion.sum(1).clamp(min=1e-12)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    return Evaluation({  # precision, recall and F1 are macro averages over classes
        f"{prefix}loss": loss,
        f"{prefix}accuracy": (true_pos.sum() / confusion.sum().clamp(min=1)).item(),
        f"{prefix}precision": precision.mean().item(),
        f"{prefix}recall": recall.mean().item(),
        f"{prefix}f1": f1.mean().item(),
    }, confusion.tolist())


def per_class(confusion: list[list[float]], names: list[str]) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support of each class, from a confusion matrix."""
    report = {}
    for i, name in enumerate(names):
        tp, predicted = confusion[i][i], sum(row[i] for row in confusion)
        support = sum(confusion[i])
        precision, recall = tp / predicted if predicted else 0.0, tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        report[name] = {"precision": precision, "recall": recall, "f1": f1, "support": int(support)}
    return report
