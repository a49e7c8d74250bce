"""Dataset → token ids at any size.

Rows are read in chunks (jsonl/csv/parquet), checked, and tokenized once per node into a
memory-mapped Arrow file keyed by the content of the file, the tokenizer and the spec fields
that shape tokens (`token_table`): every later run and every worker on the node reads it
without tokenizing again, and a worker reads only the rows of its shard, so its memory does not
grow with the dataset. (Arrow IPC rather than Hugging Face `datasets`: pyarrow is installed
already, the format is the same memory-mapped Arrow, and we need only offsets into two
columns; Ray Data would stream blocks through the object store, but training needs random
access at any step for an exact resume.)

Then: the validation split, packing (causal-lm: several examples per row, position ids
restarting per example), per-rank sharding and batching.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import torch

from finetune_api.spec import DatasetSpec, FineTuneJobSpec
from finetune_train.loss import IGNORE
from finetune_train.storage import CACHE, build_once

log = logging.getLogger("finetune.data")
CHUNK_ROWS = 4096  # rows read and tokenized at a time: bounds the memory of building a table
FORMATS = {"json": "jsonl", "jsonl": "jsonl", "csv": "csv", "parquet": "parquet", "pq": "parquet"}


class DataError(ValueError):
    pass


# ---- reading and checking rows


def iter_rows(path: str, fmt: str) -> Iterator[tuple[int, list[dict]]]:
    """(index of the first row, rows) chunk by chunk, in file order."""
    if fmt == "auto":
        fmt = FORMATS.get(Path(path).suffix.lower().lstrip("."), "")
        if not fmt:
            raise DataError(f"dataset: cannot tell the format of {path!r} from its extension; set dataset.format")
    start = 0
    try:
        for rows in _chunks(path, fmt):
            yield start, rows
            start += len(rows)
    except FileNotFoundError:
        raise DataError(f"dataset: file not found: {path}") from None
    except (ValueError, pa.ArrowException) as err:
        raise DataError(f"dataset: {path} is not valid {fmt}: {err}") from None
    if start == 0:
        raise DataError(f"dataset: {path} has no rows")


def _chunks(path: str, fmt: str) -> Iterator[list[dict]]:
    import pandas as pd

    if fmt == "parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=CHUNK_ROWS):
            yield batch.to_pylist()
        return
    if fmt == "jsonl":
        reader = pd.read_json(path, lines=True, dtype=False, chunksize=CHUNK_ROWS)
    else:
        reader = pd.read_csv(path, keep_default_na=False, chunksize=CHUNK_ROWS)
    with reader:
        for frame in reader:
            yield frame.to_dict("records")


def _column(row: dict, column: str, index: int, split: str):
    if column not in row:
        raise DataError(f"dataset.{split} row {index}: no column {column!r} (has {sorted(row)})")
    return row[column]


def _messages(row: dict, index: int, split: str, d: DatasetSpec) -> list[dict]:
    messages = _column(row, d.messages_column, index, split)
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise DataError(f"dataset.{split} row {index}: {d.messages_column!r} must be a list of {{role, content}}")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"dataset.{split} row {index}: no assistant message to train on")
    return messages


def label_id(row: dict, index: int, split: str, spec: FineTuneJobSpec) -> int:
    """The row's class id, from a class name of model.labels or an id below numLabels."""
    label = _column(row, spec.dataset.label_column, index, split)
    names = spec.model.labels or []
    if isinstance(label, str) and label in names:
        return names.index(label)
    n = spec.model.num_classes
    if isinstance(label, int | float) and not isinstance(label, bool) and float(label).is_integer() and 0 <= label < n:
        return int(label)
    raise DataError(f"dataset.{split} row {index}: label {label!r} is not one of model.labels {names or f'0..{n - 1}'}")


def _completion(row: dict, column: str, index: int, split: str) -> str | list[dict]:
    value = _column(row, column, index, split)
    if isinstance(value, list):
        if not value or not all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
            raise DataError(f"dataset.{split} row {index}: {column!r} must be a string or a non-empty list of "
                            "{role, content} messages")
        if not any(str(m["content"]).strip() for m in value):
            raise DataError(f"dataset.{split} row {index}: {column!r} is empty; give every row a {column} completion")
        return value
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"dataset.{split} row {index}: {column!r} is empty; give every row a {column} completion")
    return value


def preference_row(row: dict, index: int, split: str, d: DatasetSpec) -> tuple[str | list[dict], str | list[dict], str | list[dict]]:
    """(prompt, chosen, rejected) of a row in either of TRL's preference formats: strings, or
    lists of messages (conversational), where the prompt may be left out and is then the
    messages chosen and rejected begin with (TRL's implicit prompt)."""
    chosen = _completion(row, d.chosen_column, index, split)
    rejected = _completion(row, d.rejected_column, index, split)
    if isinstance(chosen, list) != isinstance(rejected, list):
        raise DataError(f"dataset.{split} row {index}: {d.chosen_column!r} and {d.rejected_column!r} must both be strings "
                        "or both be lists of messages")
    if isinstance(chosen, list) and d.prompt_column not in row:
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        if shared == 0:
            raise DataError(f"dataset.{split} row {index}: no column {d.prompt_column!r}, and {d.chosen_column!r} and "
                            f"{d.rejected_column!r} share no prompt messages; add the prompt")
        return chosen[:shared], chosen[shared:], rejected[shared:]
    prompt = _column(row, d.prompt_column, index, split)
    if isinstance(prompt, list) != isinstance(chosen, list):
        raise DataError(f"dataset.{split} row {index}: {d.prompt_column!r} must be messages when the completions are "
                        "messages, and a string when they are strings")
    return prompt, chosen, rejected


def check_records(records: list[dict], split: str, spec: FineTuneJobSpec, start: int = 0) -> int:
    """Every row has what the task reads (columns, labels, chat structure, completions).
    DataError names the first bad row by its index in the file (`start`: the index of
    records[0]). Returns how many rows have something to learn (preference: chosen differs
    from rejected; every row otherwise)."""
    d = spec.dataset
    useful = len(records)
    for i, row in enumerate(records, start):
        if spec.model.task == "preference":
            _, chosen, rejected = preference_row(row, i, split, d)
            useful -= chosen == rejected
        elif spec.model.task == "sequence-classification":
            label_id(row, i, split, spec)
            _column(row, d.text_column, i, split)
        elif d.style == "chat":
            _messages(row, i, split, d)
        else:
            for column in (d.text_column, d.prompt_column, d.completion_column):
                if column:
                    _column(row, column, i, split)
    return useful


def check_file(path: str, split: str, spec: FineTuneJobSpec) -> None:
    """check_records over a whole file, a chunk at a time: the checks a run makes before any
    worker starts."""
    useful = sum(check_records(rows, split, spec, start) for start, rows in iter_rows(path, spec.dataset.format))
    if spec.model.task == "preference" and not useful:
        raise DataError(f"dataset.{split}: in every row {spec.dataset.chosen_column!r} equals {spec.dataset.rejected_column!r}: "
                        "there is no preference to learn")


# ---- tokenizing


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
    messages = _messages(row, index, split, d)
    render = lambda msgs, gen: tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)  # noqa: E731
    text, spans = render(messages, False), []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start = len(render(messages[:i], True))
            spans.append((start, len(render(messages[: i + 1], False))))
    return text, spans


def preference_texts(row: dict, index: int, split: str, d: DatasetSpec, tokenizer) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) as text: strings as they are (an EOS after each completion),
    messages rendered with the chat template (the prompt with the generation prompt; each
    completion as what the template adds after it, end of turn included)."""
    prompt, chosen, rejected = preference_row(row, index, split, d)
    if isinstance(chosen, str):
        eos = tokenizer.eos_token or ""
        return str(prompt), chosen + eos, rejected + eos
    head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    completions = []
    for messages in (chosen, rejected):
        full = tokenizer.apply_chat_template(prompt + messages, tokenize=False)
        if not full.startswith(head):
            raise DataError(f"dataset.{split} row {index}: the chat template renders the prompt differently once a "
                            "completion follows; give the prompt and completions as strings")
        completions.append(full[len(head):])
    return head, *completions


def tokenize_pairs(rows: list[dict], start: int, split: str, spec: FineTuneJobSpec, tokenizer) -> list[list]:
    """Columns input_ids, labels (chosen), rejected_ids, rejected_labels, targets of preference
    rows: the prompt then the completion, the prompt IGNOREd; completions truncated to
    maxLength, never the prompt: a row whose prompt leaves no room is no target (targets 0,
    left out and counted), as is a row whose chosen equals its rejected."""
    texts = [preference_texts(row, i, split, spec.dataset, tokenizer) for i, row in enumerate(rows, start)]
    prompts = tokenizer([p for p, _, _ in texts])["input_ids"]
    chosen = tokenizer([c for _, c, _ in texts], add_special_tokens=False)["input_ids"]
    rejected = tokenizer([r for _, _, r in texts], add_special_tokens=False)["input_ids"]
    columns = [[], [], [], [], []]
    for p, c, r in zip(prompts, chosen, rejected):
        room = spec.dataset.max_length - len(p)
        c, r = c[:max(room, 0)], r[:max(room, 0)]
        for k, completion in enumerate((c, r)):
            columns[2 * k].append(p + completion)
            columns[2 * k + 1].append([IGNORE] * len(p) + completion)
        columns[4].append(int(room > 0 and c != r))
    return columns


def tokenize_rows(rows: list[dict], start: int, split: str, spec: FineTuneJobSpec, tokenizer) -> tuple[list[list[int]], list]:
    """(input ids, labels) of each row: a class id per row (classification), or per token with
    IGNORE where the loss does not look (the prompt, other turns)."""
    d = spec.dataset
    if spec.model.task == "sequence-classification":
        texts = [str(_column(row, d.text_column, i, split)) for i, row in enumerate(rows, start)]
        ids = tokenizer(texts, truncation=True, max_length=d.max_length)["input_ids"]
        return ids, [label_id(row, i, split, spec) for i, row in enumerate(rows, start)]
    examples = [causal_example(row, i, split, d, tokenizer) for i, row in enumerate(rows, start)]
    enc = tokenizer([text for text, _ in examples], truncation=True, max_length=d.max_length, return_offsets_mapping=True)
    labels = [
        [tok if end > begin and any(a <= begin < b for a, b in spans) else IGNORE for tok, (begin, end) in zip(ids, offsets)]
        for ids, offsets, (_, spans) in zip(enc["input_ids"], enc["offset_mapping"], examples)
    ]
    return enc["input_ids"], labels


class TokenTable:
    """One file's rows as token ids: a memory-mapped Arrow IPC file with columns input_ids,
    labels (a list per row for causal-lm, an int for classification) and targets (tokens the
    loss looks at; preference: 1 for a pair to learn from), and for preference the rejected
    completion's rejected_ids and rejected_labels. Rows are read on demand: only the pages of
    the rows asked for are touched."""

    def __init__(self, path: Path):
        self.path = path
        table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
        self.targets = table.column("targets").to_numpy()  # one small int per row
        self._ids = _chunked_lists(table.column("input_ids"))
        self._labels = _chunked_lists(table.column("labels")) if pa.types.is_list(table.schema.field("labels").type) else None
        self._class = None if self._labels else table.column("labels").to_numpy()
        pairs = "rejected_ids" in table.column_names
        self._rejected = (_chunked_lists(table.column("rejected_ids")), _chunked_lists(table.column("rejected_labels"))) if pairs else None
        self._starts = np.cumsum([0] + [len(offsets) - 1 for offsets, _ in self._ids])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def lengths(self) -> np.ndarray:
        return np.concatenate([np.diff(offsets) for offsets, _ in self._ids])

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray | int]:
        """(input ids, labels) of row i (preference: of its chosen completion)."""
        if self._labels is None:
            return self._row(self._ids, i), int(self._class[i])
        return self._row(self._ids, i), self._row(self._labels, i)

    def rejected(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(input ids, labels) of the rejected completion of preference row i."""
        ids, labels = self._rejected
        return self._row(ids, i), self._row(labels, i)

    def _row(self, column: list[tuple[np.ndarray, np.ndarray]], i: int) -> np.ndarray:
        chunk = bisect.bisect_right(self._starts, i) - 1
        j = i - self._starts[chunk]
        offsets, values = column[chunk]
        return values[offsets[j]:offsets[j + 1]]


def _chunked_lists(column: pa.ChunkedArray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(offsets, values) of each chunk of a list column: zero-copy views of the mapped file."""
    return [(chunk.offsets.to_numpy(), chunk.values.to_numpy()) for chunk in column.chunks]


def token_table(path: str, split: str, spec: FineTuneJobSpec, tokenizer) -> TokenTable:
    """The file's TokenTable, built once per node (whoever comes first builds it, under a lock;
    the others wait) into the cache, keyed by what decides its content."""
    d = spec.dataset
    columns = [d.text_column, d.prompt_column, d.completion_column, d.messages_column, d.label_column, d.chosen_column, d.rejected_column]
    shaping = {"task": spec.model.task, "labels": spec.model.labels, "numLabels": spec.model.num_labels, "maxLength": d.max_length,
               "columns": columns, "format": d.format}
    key = hashlib.sha256(json.dumps([file_digest(path), tokenizer_digest(tokenizer), shaping]).encode()).hexdigest()[:24]
    out = CACHE / "tokens" / key
    classify, pairs = spec.model.task == "sequence-classification", spec.model.task == "preference"
    ids = pa.list_(pa.int32())

    def build(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        fields = [("input_ids", ids), ("labels", pa.int32() if classify else ids)]
        schema = pa.schema([*fields, ("rejected_ids", ids), ("rejected_labels", ids), ("targets", pa.int32())] if pairs
                           else [*fields, ("targets", pa.int32())])
        with pa.OSFile(str(tmp / "tokens.arrow"), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for start, rows in iter_rows(path, d.format):
                if pairs:
                    writer.write_batch(pa.record_batch(tokenize_pairs(rows, start, split, spec, tokenizer), schema=schema))
                    continue
                tokens, labels = tokenize_rows(rows, start, split, spec, tokenizer)
                targets = [1] * len(tokens) if classify else [sum(x != IGNORE for x in row[1:]) for row in labels]
                writer.write_batch(pa.record_batch([tokens, labels, targets], schema=schema))

    build_once(out, build)
    return TokenTable(out / "tokens.arrow")


def file_digest(path: str) -> str:
    """sha256 of a file's bytes, or of a folder's files (names and bytes): the same data from
    another path is the same data."""
    h = hashlib.sha256()
    root = Path(path)
    for file in sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else [root]:
        if root.is_dir():
            h.update(str(file.relative_to(root)).encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """What decides the ids a tokenizer gives: its definition (without the truncation and
    padding a previous call left set) and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        definition.pop("truncation", None), definition.pop("padding", None)
        definition = json.dumps(definition, sort_keys=True)
    else:
        definition = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    extra = [type(tokenizer).__name__, getattr(tokenizer, "chat_template", None), tokenizer.eos_token, tokenizer.model_max_length]
    return hashlib.sha256((definition + json.dumps(extra, default=str)).encode()).hexdigest()


# ---- splits and packing


@dataclass
class Split:
    """Examples of one split: rows of a table (a TokenTable, or images.ImageTable), in units.
    Without packing a unit is one row; with packing, a run of rows that share one packed row
    (`bounds`: where each unit's rows start in `rows`). Arrays, not lists: 8 bytes a row,
    whatever the dataset's size."""

    table: TokenTable
    rows: np.ndarray
    bounds: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.rows) if self.bounds is None else len(self.bounds) - 1

    def unit(self, i: int) -> np.ndarray:
        return self.rows[i:i + 1] if self.bounds is None else self.rows[self.bounds[i]:self.bounds[i + 1]]


class Splits(NamedTuple):
    train: Split
    validation: Split | None
    test: Split | None


def load_splits(spec: FineTuneJobSpec, read: Callable[[str, str], TokenTable], train: str, validation: str | None = None,
                test: str | None = None) -> Splits:
    """The splits, each from its own file (`read`: path, split name → table), or held out of
    train's rows (validationSplit, testSplit: a permutation seeded by dataset.seed); rows with
    nothing to learn from left out (a prompt that filled maxLength). Packed into rows of
    maxLength when dataset.packing."""
    d = spec.dataset
    table = read(train, "train")
    order = np.random.default_rng(d.seed).permutation(len(table))
    held = {}
    for name, path, fraction in (("validation", validation, d.validation_split), ("test", test, d.test_split)):
        if path:
            other = read(path, name)
            held[name] = _split(other, np.arange(len(other)), spec, name)
        elif fraction:
            n = max(1, round(len(table) * fraction))
            if n >= len(order):
                raise DataError(f"dataset.{name}Split: {fraction} leaves no training rows")
            held[name], order = _split(table, np.sort(order[:n]), spec, name), order[n:]
    splits = Splits(_split(table, order, spec, "train"), held.get("validation"), held.get("test"))
    for name, split in splits._asdict().items():
        if split is not None and not len(split):
            raise DataError(f"dataset.{name}: no row has anything to learn from: {_NOTHING[spec.model.task == 'preference']}")
    return splits


_NOTHING = ("a prompt that fills dataset.maxLength (raise it)",
            "a prompt that fills dataset.maxLength (raise it, or shorten the prompt), or chosen equal to rejected")


def _split(table: TokenTable, rows: np.ndarray, spec: FineTuneJobSpec, name: str) -> Split:
    empty = table.targets[rows] == 0
    if empty.any():  # counted and said, never silently: the rows are numbered as in the file
        first = sorted(rows[empty][:5].tolist())
        log.warning("dataset.%s: %d of %d rows left out, nothing to learn from (%s); e.g. rows %s", name, int(empty.sum()),
                    len(rows), _NOTHING[spec.model.task == "preference"], first)
    rows = rows[~empty]
    if spec.dataset.packing:
        order, bounds = pack(table.lengths()[rows], spec.dataset.max_length)
        return Split(table, rows[order], bounds)
    return Split(table, rows)


def pack(lengths: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows into packs of at most `width` tokens, best fit decreasing (as TRL's "bfd"): longest
    row first, each into the open pack it leaves least room in, a new pack when none has room.
    Filling packs in file order instead leaves a long row's room empty whenever the next row
    does not fit: a fifth of the tokens were padding on chat data of mixed lengths. Returns the
    rows' order, each pack's rows together, and the packs' bounds in it. Deterministic, so a
    resumed run packs the same way; ShardedBatches shuffles the packs."""
    packs: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (tokens free, pack), sorted; packs too full for any row left out
    smallest = int(lengths.min(initial=width))
    for i in np.argsort(-lengths, kind="stable").tolist():
        length = int(lengths[i])
        at = bisect.bisect_left(room, (length, -1))
        if at == len(room):
            free, p = width, len(packs)
            packs.append([])
        else:
            free, p = room.pop(at)
        packs[p].append(i)
        if free - length >= smallest:
            bisect.insort(room, (free - length, p))
    order = np.array([i for rows in packs for i in rows], dtype=np.int64)
    return order, np.cumsum([0] + [len(rows) for rows in packs])


@dataclass
class Collator:
    """Units → a batch. Unpacked: rows padded, with an attention mask. Packed: each unit's rows
    concatenated into one row with position ids restarting per example and no attention mask,
    from which transformers masks attention within each example; the first token of each
    example is no target (nothing before it in its own example predicts it). Every batch also
    says how many tokens it holds (`tokens`, padding not counted)."""

    table: TokenTable
    pad_id: int
    classification: bool
    packed: bool = False
    pairs: bool = False  # preference: every unit's chosen row, then every unit's rejected row (one forward pass)
    # Packed rows laid end to end as one: flash-attn's kernel in transformers tells examples apart
    # by position ids only at batch size 1 (else its causal attention crosses them).
    flat: bool = False

    def __call__(self, units: list[np.ndarray]) -> dict[str, torch.Tensor]:
        if self.pairs:
            rows = [[self.table.example(int(u[0]))] for u in units] + [[self.table.rejected(int(u[0]))] for u in units]
        else:
            rows = [[self.table.example(int(i)) for i in unit] for unit in units]
        ids = [np.concatenate([x for x, _ in row]) for row in rows]
        width = max(len(x) for x in ids)
        batch = {"input_ids": torch.full((len(ids), width), self.pad_id, dtype=torch.long)}
        for r, x in enumerate(ids):
            batch["input_ids"][r, : len(x)] = torch.from_numpy(x.astype(np.int64))
        if self.classification:
            batch["labels"] = torch.tensor([row[0][1] for row in rows])
        else:
            batch["labels"] = torch.full((len(ids), width), IGNORE, dtype=torch.long)
            for r, row in enumerate(rows):
                labels = [y.astype(np.int64) for _, y in row]
                if self.packed:
                    for y in labels:
                        y[:1] = IGNORE
                joined = np.concatenate(labels)
                batch["labels"][r, : len(joined)] = torch.from_numpy(joined)
        lengths = [[len(x) for x, _ in row] for row in rows]
        if self.packed:
            # Padding is one more "example" at the end of the row: attention stays inside it.
            batch["position_ids"] = torch.tensor(
                [np.concatenate([np.arange(n) for n in (*row, width - sum(row)) if n]).tolist() for row in lengths])
        else:
            batch["attention_mask"] = (torch.arange(width)[None, :] < torch.tensor([sum(row) for row in lengths])[:, None]).long()
        if self.packed and self.flat:  # each row ends in its own padding "example": nothing crosses rows
            batch = {k: v.reshape(1, -1) for k, v in batch.items()}
        batch["tokens"] = torch.tensor(sum(map(sum, lengths)))
        return batch


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the model takes of a batch (not the labels: the loss is ours)."""
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids", "pixel_values")}


@dataclass
class ShardedBatches:
    """Deterministic micro-batches in one global order: each epoch is a permutation of the
    units that depends only on (seed, epoch); each step takes the next world × micro batch ×
    accumulation units of it, every rank its share. A position (epoch, units used) says where
    a run is, whatever the number of workers: a resumed run continues from it, with as many
    workers as it has now, in the same order."""

    split: Split
    micro_batch_size: int
    rank: int
    world: int
    seed: int
    collate: Collator

    def per_step(self, accumulation: int) -> int:
        return self.world * self.micro_batch_size * accumulation

    def steps_per_epoch(self, accumulation: int) -> int:
        """Whole steps in an epoch (drop-last, so every rank steps in lockstep)."""
        return len(self.split) // self.per_step(accumulation)

    def steps(self, accumulation: int, position: tuple[int, int]):
        """(position after the step, micro-batches) from `position` on, forever."""
        epoch, used = position
        size = self.per_step(accumulation)
        while True:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.split))
            while used + size <= len(order):
                mine = order[used + self.rank : used + size : self.world]
                used += size
                yield (epoch, used), [
                    self.collate([self.split.unit(i) for i in mine[k * self.micro_batch_size : (k + 1) * self.micro_batch_size]])
                    for k in range(accumulation)
                ]
            epoch, used = epoch + 1, 0


def eval_batches(split: Split, batch_size: int, rank: int, world: int, collate: Collator):
    """(batch, weight) pairs: every unit counted once across ranks, and every rank runs the
    same number of forward passes (ZeRO-3 gathers parameters collectively); padding units
    carry weight 0."""
    per_rank = math.ceil(len(split) / world)
    mine = [(split.unit(i % len(split)), float(i < len(split))) for i in range(rank, per_rank * world, world)]
    for start in range(0, len(mine), batch_size):
        chunk = mine[start : start + batch_size]
        yield collate([u for u, _ in chunk]), torch.tensor([w for _, w in chunk])
