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
    loss_sum = torch.zeros((), dtype=torch.float64)
    count = torch.zeros((), dtype=torch.float64)
    confusion = torch.zeros((num_classes or 1, num_classes or 1), dtype=torch.float64)
    for batch, weight in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float().cpu()
        labels = batch["labels"].cpu()
        if classify:
            loss_sum += (F.cross_entropy(logits, labels, reduction="none") * weight).sum().double()
            count += weight.sum().double()
            for truth, pred, w in zip(labels.tolist(), logits.argmax(-1).tolist(), weight.tolist()):
                confusion[truth, pred] += w
        else:
            shifted = labels[:, 1:]
            token_loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), shifted.reshape(-1), ignore_index=IGNORE, reduction="none"
            ).view(shifted.shape)
            tokens = (shifted != IGNORE).double() * weight[:, None].double()
            loss_sum += (token_loss.double() * tokens).sum()
            count += tokens.sum()
    totals = _all_reduce(torch.cat([loss_sum[None], count[None], confusion.flatten()]))
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
