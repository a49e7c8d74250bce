"""Distributed evaluation: every rank scores its shard, sums are all-reduced, so every rank
ends with the same metrics (early stopping decides identically everywhere)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from finetune_train.data import IGNORE


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


@torch.no_grad()
def evaluate(engine, batches, task: str, num_classes: int | None, device) -> dict[str, float]:
    was_training = engine.module.training
    engine.eval()
    classify = task == "sequence-classification"
    # Sums stay on the device: no per-batch host copy of the logits, and NCCL reduces only
    # device tensors.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    confusion = torch.zeros((num_classes or 1, num_classes or 1), dtype=torch.float64, device=device)
    for batch, weight in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        weight = weight.to(device, torch.float64)
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"]
        if classify:
            loss_sum += (F.cross_entropy(logits, labels, reduction="none").double() * weight).sum()
            count += weight.sum()
            confusion.index_put_((labels, logits.argmax(-1)), weight, accumulate=True)
        else:
            shifted = labels[:, 1:]
            token_loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), shifted.reshape(-1), ignore_index=IGNORE, reduction="none"
            ).view(shifted.shape)
            tokens = (shifted != IGNORE).double() * weight[:, None]
            loss_sum += (token_loss.double() * tokens).sum()
            count += tokens.sum()
    totals = _all_reduce(torch.cat([loss_sum[None], count[None], confusion.flatten()])).cpu()
    engine.train(was_training)
    loss = (totals[0] / totals[1].clamp(min=1)).item()
    if not classify:
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}
    confusion = totals[2:].view_as(confusion)
    true_pos = confusion.diag()
    precision = true_pos / confusion.sum(0).clamp(min=1e-12)
    recall = true_pos / confusion.sum(1).clamp(min=1e-12)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    return {  # precision, recall and F1 are macro averages over classes
        "eval_loss": loss,
        "eval_accuracy": (true_pos.sum() / confusion.sum().clamp(min=1)).item(),
        "eval_precision": precision.mean().item(),
        "eval_recall": recall.mean().item(),
        "eval_f1": f1.mean().item(),
    }
