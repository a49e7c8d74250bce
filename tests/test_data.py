"""Data at scale and the loss: the token cache, packing, token-weighted loss (no Ray)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from conftest import TINY_BERT, TINY_LLAMA, make_job, write_text_data
from finetune_train.data import Collator, load_splits, model_inputs, pack, token_table
from finetune_train.loss import IGNORE, count_targets, step_scale, summed_loss
from finetune_train.modeling import build_model, load_tokenizer, model_folder

pytestmark = pytest.mark.unit


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A token cache of the test's own."""
    import finetune_train.data as data

    monkeypatch.setattr(data, "CACHE", tmp_path / "cache")
    return tmp_path / "cache"


def setup(tmp_path, model=TINY_LLAMA, **spec):
    job = make_job("data", tmp_path, model, **spec)
    path = model_folder(job.spec)
    return job.spec, path, load_tokenizer(job.spec, path)


def reader(spec, tokenizer):
    return lambda path, split: token_table(path, split, spec, tokenizer)


def mixed_lengths(path, rows: int = 40):
    """Texts of 3 to 30 words: packing has something to gain."""
    rng = np.random.default_rng(0)
    with path.open("w") as f:
        for i in range(rows):
            f.write(json.dumps({"text": " ".join(["word"] * int(rng.integers(3, 30))) + f" {i}"}) + "\n")
    return path


def test_pack_puts_each_row_where_it_fits_best_and_never_overflows():
    lengths = np.array([5, 5, 5, 9, 1, 10, 2])
    order, bounds = pack(lengths, 10)
    packs = [order[a:b].tolist() for a, b in zip(bounds, bounds[1:])]
    # 4 packs, not the 5 of filling in file order ([0, 1], [2], [3, 4], [5], [6]): the 1 tops up the 9.
    assert packs == [[5], [3, 4], [0, 1], [2, 6]]
    assert sorted(order.tolist()) == list(range(7)) and all(lengths[p].sum() <= 10 for p in packs)


def test_the_token_table_is_built_once_and_keyed_by_content(tmp_path, cache):
    spec, _, tokenizer = setup(tmp_path)
    data = tmp_path / "data.jsonl"
    first = token_table(str(data), "train", spec, tokenizer)
    assert len(first) == 96 and first.path.parent.parent == cache / "tokens"
    mtime = first.path.stat().st_mtime_ns
    copy = tmp_path / "elsewhere.jsonl"
    copy.write_bytes(data.read_bytes())
    assert token_table(str(copy), "train", spec, tokenizer).path == first.path  # same bytes: the same table
    assert first.path.stat().st_mtime_ns == mtime  # not built again
    write_text_data(copy, rows=50)
    other = token_table(str(copy), "train", spec, tokenizer)
    assert other.path != first.path and len(other) == 50
    ids, labels = first.example(3)
    assert ids.dtype == np.int32 and len(ids) == len(labels) and (labels[labels != IGNORE] == ids[labels != IGNORE]).all()


def token_losses(model, batch) -> torch.Tensor:
    """Per-position loss of predicting the next token (0 where it is no target)."""
    logits = model(**model_inputs(batch)).logits
    labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="none")
    return loss.view(labels.shape)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_packed_row_gives_each_example_the_loss_it_has_alone(tmp_path, cache, attention):
    spec, path, tokenizer = setup(tmp_path, {**TINY_LLAMA, "attention": attention}, dataset={"packing": True, "maxLength": 64})
    mixed_lengths(tmp_path / "data.jsonl")
    train = load_splits(spec, reader(spec, tokenizer), str(tmp_path / "data.jsonl")).train
    unit = next(u for u in map(train.unit, range(len(train))) if len(u) >= 3)
    torch.manual_seed(0)
    model = build_model(spec, path, tokenizer, pretrained=True).eval()
    packed = Collator(train.table, tokenizer.pad_token_id, False, packed=True)([unit])
    alone = [Collator(train.table, tokenizer.pad_token_id, False)([np.array([row])]) for row in unit]
    with torch.no_grad():
        row_loss = token_losses(model, packed)[0]
        start = 0
        for i, single in enumerate(alone):
            n = single["input_ids"].shape[1]
            expected = token_losses(model, single)[0]
            # The example's targets inside the packed row: its positions but the last (which
            # would predict the next example's first token, no target).
            got = row_loss[start:start + n - 1]
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
            if i < len(alone) - 1:
                assert row_loss[start + n - 1] == 0  # the boundary between examples is no target
            start += n


def test_packed_rows_laid_end_to_end_give_each_example_its_loss(tmp_path, cache):
    """What flash-attn's kernel gets (flat=True): the rows of a packed batch as one row, told
    apart by position ids alone; checked with SDPA, which reads them the same way."""
    spec, path, tokenizer = setup(tmp_path, {**TINY_LLAMA, "attention": "sdpa"}, dataset={"packing": True, "maxLength": 64})
    mixed_lengths(tmp_path / "data.jsonl")
    train = load_splits(spec, reader(spec, tokenizer), str(tmp_path / "data.jsonl")).train
    units = [train.unit(i) for i in range(3)]
    torch.manual_seed(0)
    model = build_model(spec, path, tokenizer, pretrained=True).eval()
    rows = Collator(train.table, tokenizer.pad_token_id, False, packed=True)(units)
    flat = Collator(train.table, tokenizer.pad_token_id, False, packed=True, flat=True)(units)
    assert flat["input_ids"].shape == (1, rows["input_ids"].numel()) and flat["tokens"] == rows["tokens"]
    with torch.no_grad():
        per_row, end_to_end = token_losses(model, rows), token_losses(model, flat)[0]
    boundary = torch.zeros(1)  # a row's last position predicts the next row's first token: no target
    expected = torch.cat([torch.cat([r, boundary]) for r in per_row])[:-1]
    torch.testing.assert_close(end_to_end, expected, atol=1e-5, rtol=1e-4)


def test_the_loss_weighs_every_target_the_same_however_the_step_is_cut(tmp_path, cache):
    """Micro-batch 4 × accumulation 1 and micro-batch 1 × accumulation 4 over the same rows of
    different lengths: the same step loss and the same gradients (DeepSpeed's division by the
    accumulation steps done here by hand), unlike a mean of micro-batch means."""
    spec, path, tokenizer = setup(tmp_path)
    mixed_lengths(tmp_path / "data.jsonl")
    train = load_splits(spec, reader(spec, tokenizer), str(tmp_path / "data.jsonl")).train
    collate = Collator(train.table, tokenizer.pad_token_id, False)
    units = [train.unit(i) for i in range(4)]
    torch.manual_seed(0)
    model = build_model(spec, path, tokenizer, pretrained=True)

    def gradients(micro_batches, accumulation: int):
        model.zero_grad()
        targets = sum(count_targets(b["labels"], False) for b in micro_batches)
        total = 0.0
        for b in micro_batches:
            loss, _ = summed_loss(model(**model_inputs(b)).logits, b["labels"], False)
            (loss * step_scale(targets, world=1, accumulation=accumulation) / accumulation).backward()
            total += loss.item()
        return total / targets, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    loss_one, grads_one = gradients([collate(units)], 1)
    loss_four, grads_four = gradients([collate([u]) for u in units], 4)
    assert loss_one == pytest.approx(loss_four, rel=1e-5)
    for a, b in zip(grads_one, grads_four):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    means = [summed_loss(model(**model_inputs(b)).logits, b["labels"], False) for b in (collate([u]) for u in units)]
    assert abs(sum((s / n).item() for s, n in means) / 4 - loss_one) > 1e-3  # the mean of means differs here


def test_classification_counts_a_target_per_row(tmp_path, cache):
    spec, _, tokenizer = setup(tmp_path, TINY_BERT)
    train, validation, _ = load_splits(spec, reader(spec, tokenizer), spec.dataset.train)
    units = [train.unit(i) for i in range(3)]
    batch = Collator(train.table, tokenizer.pad_token_id, True)(units)
    assert count_targets(batch["labels"], True) == 3 and batch["labels"].tolist() == [int(train.table.example(int(u[0]))[1]) for u in units]
    assert len(train) + len(validation) == 96 and batch["tokens"] == batch["attention_mask"].sum()


def test_a_worker_reads_only_the_pages_of_its_rows(tmp_path, cache):
    """The table is memory-mapped: opening it maps the file without reading the token data."""
    spec, _, tokenizer = setup(tmp_path)
    write_text_data(tmp_path / "big.jsonl", rows=5000)
    table = token_table(str(tmp_path / "big.jsonl"), "train", spec, tokenizer)
    import psutil

    before = psutil.Process(os.getpid()).memory_info().rss
    reopened = type(table)(table.path)
    reopened.example(4999)
    assert psutil.Process(os.getpid()).memory_info().rss - before < table.path.stat().st_size
