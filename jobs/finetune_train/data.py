"""Dataset → token ids: reading jsonl/csv/parquet, the validation split, tokenization per
input style, per-rank sharding and batching."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from finetune_api.spec import DatasetSpec, FineTuneJobSpec

IGNORE = -100  # label id that the loss skips (prompt tokens, padding)


class DataError(ValueError):
    pass


def read_table(path: str, fmt: str) -> list[dict]:
    if fmt == "auto":
        suffix = Path(path).suffix.lower().lstrip(".")
        fmt = {"json": "jsonl", "jsonl": "jsonl", "csv": "csv", "parquet": "parquet", "pq": "parquet"}.get(suffix, "")
        if not fmt:
            raise DataError(f"dataset: cannot tell the format of {path!r} from its extension; set dataset.format")
    try:
        if fmt == "jsonl":
            frame = pd.read_json(path, lines=True, dtype=False)
        elif fmt == "csv":
            frame = pd.read_csv(path, keep_default_na=False)
        else:
            frame = pd.read_parquet(path)
    except FileNotFoundError:
        raise DataError(f"dataset: file not found: {path}") from None
    except ValueError as err:
        raise DataError(f"dataset: {path} is not valid {fmt}: {err}") from None
    if frame.empty:
        raise DataError(f"dataset: {path} has no rows")
    return frame.to_dict("records")


def load_splits(d: DatasetSpec) -> tuple[list[dict], list[dict]]:
    """(train, validation) records; validation is empty when the spec asks for none."""
    train = read_table(d.train, d.format)
    if d.validation:
        return train, read_table(d.validation, d.format)
    if d.validation_split:
        order = list(range(len(train)))
        random.Random(d.seed).shuffle(order)
        n_val = max(1, round(len(train) * d.validation_split))
        if n_val >= len(train):
            raise DataError(f"dataset.validationSplit: {d.validation_split} leaves no training rows")
        return [train[i] for i in order[n_val:]], [train[i] for i in order[:n_val]]
    return train, []


def _column(row: dict, column: str, index: int, split: str):
    if column not in row:
        raise DataError(f"dataset.{split} row {index}: no column {column!r} (has {sorted(row)})")
    return row[column]


def causal_example(row: dict, index: int, split: str, d: DatasetSpec, tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The text to tokenize and the character spans the loss is computed on."""
    eos = tokenizer.eos_token or ""
    if d.style == "text":
        text = str(_column(row, d.text_column, index, split)) + eos
        return text, [(0, len(text))]
    if d.style == "prompt-completion":
        prompt = str(_column(row, d.prompt_column, index, split))
        text = prompt + str(_column(row, d.completion_column, index, split)) + eos
        return text, [(len(prompt), len(text))]
    messages = _column(row, d.messages_column, index, split)
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise DataError(f"dataset.{split} row {index}: {d.messages_column!r} must be a list of {{role, content}}")
    render = lambda msgs, gen: tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)  # noqa: E731
    text, spans = render(messages, False), []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start = len(render(messages[:i], True))
            spans.append((start, len(render(messages[: i + 1], False))))
    if not spans:
        raise DataError(f"dataset.{split} row {index}: no assistant message to train on")
    return text, spans


def tokenize(records: list[dict], split: str, spec: FineTuneJobSpec, tokenizer) -> list[dict]:
    d = spec.dataset
    out = []
    if spec.model.task == "sequence-classification":
        label_ids = {name: i for i, name in enumerate(spec.model.labels or [])}
        n = spec.model.num_classes
        for i, row in enumerate(records):
            label = _column(row, d.label_column, i, split)
            if isinstance(label, str) and label in label_ids:
                label = label_ids[label]
            elif isinstance(label, int | float) and float(label).is_integer() and 0 <= label < n:
                label = int(label)
            else:
                known = spec.model.labels or f"0..{n - 1}"
                raise DataError(f"dataset.{split} row {i}: label {label!r} is not one of model.labels {known}")
            ids = tokenizer(str(_column(row, d.text_column, i, split)), truncation=True, max_length=d.max_length)
            out.append({"input_ids": ids["input_ids"], "labels": label})
        return out
    for i, row in enumerate(records):
        text, spans = causal_example(row, i, split, d, tokenizer)
        enc = tokenizer(text, truncation=True, max_length=d.max_length, return_offsets_mapping=True)
        labels = [
            tok if end > start and any(a <= start < b for a, b in spans) else IGNORE
            for tok, (start, end) in zip(enc["input_ids"], enc["offset_mapping"])
        ]
        if all(label == IGNORE for label in labels):
            continue  # the prompt filled maxLength: nothing left to learn from
        out.append({"input_ids": enc["input_ids"], "labels": labels})
    if not out:
        raise DataError(f"dataset.{split}: every example is prompt only after truncation; raise dataset.maxLength")
    return out


@dataclass
class Collator:
    pad_id: int
    classification: bool

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, e in enumerate(examples):
            ids[row, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
            mask[row, : len(e["input_ids"])] = 1
        if self.classification:
            labels = torch.tensor([e["labels"] for e in examples])
        else:
            labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
            for row, e in enumerate(examples):
                labels[row, : len(e["labels"])] = torch.tensor(e["labels"])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@dataclass
class ShardedBatches:
    """Deterministic per-rank micro-batches: the permutation depends only on (seed, epoch),
    so a resumed run can jump to any step without replaying the data before it."""

    examples: list[dict]
    micro_batch_size: int
    rank: int
    world: int
    seed: int
    collate: Collator

    @property
    def per_epoch(self) -> int:
        """Micro-batches per rank per epoch (drop-last, so every rank steps in lockstep)."""
        return len(self.examples) // self.world // self.micro_batch_size

    def steps(self, accumulation: int, start: int, per_epoch: int):
        """(step index, micro-batches) from optimizer step `start` on, forever."""
        step = start
        while True:
            epoch, index = divmod(step, per_epoch)
            batches = self.epoch(epoch, skip=index * accumulation)
            for _ in range(index, per_epoch):
                yield step, [next(batches) for _ in range(accumulation)]
                step += 1

    def epoch(self, epoch: int, skip: int = 0):
        order = list(range(len(self.examples)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        mine = order[self.rank :: self.world][: self.per_epoch * self.micro_batch_size]
        for start in range(skip * self.micro_batch_size, len(mine), self.micro_batch_size):
            yield self.collate([self.examples[i] for i in mine[start : start + self.micro_batch_size]])


def eval_batches(examples: list[dict], batch_size: int, rank: int, world: int, collate: Collator):
    """(batch, weight) pairs: every example counted once across ranks, and every rank runs the
    same number of forward passes (ZeRO-3 gathers parameters collectively); padding examples
    carry weight 0."""
    per_rank = math.ceil(len(examples) / world)
    padded = [(examples[i % len(examples)], float(i < len(examples))) for i in range(per_rank * world)]
    mine = padded[rank::world]
    for start in range(0, len(mine), batch_size):
        chunk = mine[start : start + batch_size]
        yield collate([e for e, _ in chunk]), torch.tensor([w for _, w in chunk])
