"""Token-weighted loss: every target counts once, wherever it sits.

A step's loss is the sum of its per-target losses divided by the number of targets in the whole
step, over all micro-batches and ranks (torchtune's normalisation, and Hugging Face's since its
2024 gradient-accumulation fix). The mean of per-micro-batch means it replaces gives a short
micro-batch as much weight as a full one, so accumulation 4 × micro-batch 1 trained differently
from micro-batch 4. A target is a token after a trained position (causal-lm) or a row's label
(classification).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # label id that the loss skips (prompt tokens, padding, the first token of a packed example)


def summed_loss(logits: torch.Tensor, labels: torch.Tensor, classify: bool, weight: torch.Tensor | None = None,
                label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the per-target losses, number of targets) of one batch, rows weighted by
    `weight` (1 by default; 0 leaves a row out)."""
    logits = logits.float()
    if classify:
        losses = F.cross_entropy(logits, labels, reduction="none", label_smoothing=label_smoothing)
        targets = torch.ones_like(labels, dtype=logits.dtype)
    else:
        losses, targets = next_token_losses(logits, labels)
        targets = targets.to(logits.dtype)
    if weight is not None:
        targets = targets * (weight if classify else weight[:, None]).to(logits.dtype)
    return (losses * targets).sum(), targets.sum()


def next_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position, the loss of predicting the next token (position i predicts token i + 1; 0
    where that label is IGNORE and at the last position), and which positions are targets. The
    labels are shifted, not the logits: a slice of the logits would copy them whole (batch ×
    length × vocabulary), and the backward pass again."""
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
    losses = F.cross_entropy(logits.reshape(-1, logits.size(-1)), shifted.reshape(-1), ignore_index=IGNORE, reduction="none")
    return losses.view(shifted.shape), shifted != IGNORE


def count_targets(labels: torch.Tensor, classify: bool) -> int:
    """Targets in a batch, from its labels alone: known before the forward pass, on the CPU."""
    return labels.numel() if classify else int((labels[:, 1:] != IGNORE).sum())


def step_scale(global_targets: float, world: int, accumulation: int) -> float:
    """What a micro-batch's summed loss is multiplied by before DeepSpeed's backward, which
    divides by the accumulation steps and averages gradients over the ranks: the step's
    gradient becomes that of (all summed losses) / (all targets)."""
    return world * accumulation / max(global_targets, 1.0)
