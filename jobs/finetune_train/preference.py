"""Preference tuning: DPO (Rafailov et al., 2023) and IPO (Azar et al., 2023) on chosen/rejected pairs.

The policy learns to raise each chosen completion's log-probability ratio to a frozen reference
above the rejected one's: with margin = (log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r)),
DPO's loss is −log σ(β · margin), IPO's (margin − 1/2β)² on per-token averages. β × a
completion's log-ratio is its implicit reward; the evaluation reports their means, margin and
the fraction of pairs ranked right.

The reference is the starting model (or training.preference.referenceModel): with LoRA the
same model with its adapters off, so it costs no second copy; otherwise a frozen copy behind
its own DeepSpeed engine, partitioned like the policy under ZeRO-3 and without optimizer state.
Its log-probabilities are computed with each batch rather than precomputed: a pass over the
data before training costs as much as one epoch of reference forwards, so it only pays from
the second epoch on, and it would need a cache keyed by the model and the data.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from finetune_api.spec import PreferenceSpec
from finetune_train.data import model_inputs
from finetune_train.evaluate import Evaluation, all_reduce
from finetune_train.loss import next_token_losses

Forward = Callable[[dict], torch.Tensor]  # model inputs → logits


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, average: bool = False) -> torch.Tensor:
    """The log-probability of each row's target tokens (position i predicts token i + 1): their
    sum, or with `average` their mean."""
    losses, targets = next_token_losses(logits.float(), labels)
    total = -losses.sum(-1)  # 0 where the label is IGNORE
    return total / targets.sum(-1).clamp(min=1) if average else total


class Pairs(NamedTuple):
    losses: torch.Tensor  # one per pair
    chosen: torch.Tensor  # implicit rewards β · log-ratio, detached
    rejected: torch.Tensor


def pair_losses(policy: torch.Tensor, reference: torch.Tensor, p: PreferenceSpec) -> Pairs:
    """Losses and rewards of pairs from sequence log-probabilities laid out as a batch is:
    every chosen row, then every rejected row."""
    n = policy.size(0) // 2
    ratios = policy - reference.detach()
    margin = ratios[:n] - ratios[n:]
    if p.loss == "ipo":
        losses = (margin - 1 / (2 * p.beta)) ** 2
    else:
        losses = -(1 - p.label_smoothing) * F.logsigmoid(p.beta * margin) - p.label_smoothing * F.logsigmoid(-p.beta * margin)
    rewards = p.beta * ratios.detach()
    return Pairs(losses, rewards[:n], rewards[n:])


def reference_config(ds_config: dict) -> dict:
    """The DeepSpeed config of a frozen reference: ZeRO-3 stays (its parameters partitioned
    like the policy's); ZeRO 1-2 shard only optimizer state, which it has none of: stage 0."""
    config = copy.deepcopy(ds_config)
    if config["zero_optimization"]["stage"] != 3:
        config["zero_optimization"] = {"stage": 0}
    return config


def adapters_off(engine) -> Forward:
    """The LoRA reference: the policy's own base model, its adapters disabled."""

    def forward(inputs: dict) -> torch.Tensor:
        with engine.module.disable_adapter():
            return engine(**inputs).logits

    return forward


def frozen(reference_engine) -> Forward:
    """A frozen copy's DeepSpeed engine (built with reference_config)."""
    reference_engine.eval()
    return lambda inputs: reference_engine(**inputs).logits


class Objective:
    """The preference loss of a batch: the reference's log-probabilities (no gradient), then the
    policy's forward pass."""

    def __init__(self, spec: PreferenceSpec, reference: Forward):
        self.spec, self.reference, self.average = spec, reference, spec.loss == "ipo"

    def __call__(self, engine, batch: dict) -> Pairs:
        inputs, labels = model_inputs(batch), batch["labels"]
        with torch.no_grad():
            reference = sequence_logps(self.reference(inputs), labels, self.average)
        policy = sequence_logps(engine(**inputs).logits, labels, self.average)
        return pair_losses(policy, reference, self.spec)


@torch.no_grad()
def evaluate_pairs(engine, objective: Objective, batches, device, prefix: str = "eval_") -> Evaluation:
    """Mean loss, rewards, margin and accuracy (chosen rewarded above rejected) over the pairs
    of every rank."""
    was_training = engine.module.training
    engine.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss, chosen, rejected, ranked right, pairs
    for batch, weight in batches:
        pairs = objective(engine, {k: v.to(device) for k, v in batch.items()})
        w = weight.to(device, torch.float64)
        sums += torch.stack([(x.double() * w).sum() for x in (pairs.losses, pairs.chosen, pairs.rejected,
                                                               (pairs.chosen > pairs.rejected).double(), torch.ones_like(w))])
    engine.train(was_training)
    loss, chosen, rejected, right, n = all_reduce(sums).tolist()
    n = max(n, 1.0)
    return Evaluation({
        f"{prefix}loss": loss / n,
        f"{prefix}rewards_chosen": chosen / n,
        f"{prefix}rewards_rejected": rejected / n,
        f"{prefix}rewards_margin": (chosen - rejected) / n,
        f"{prefix}rewards_accuracy": right / n,
    }, None)
