"""The training program every FineTuneJob runs on each Ray Train worker.

Reads top to bottom: config → data → model → method → engine → resume → loop (log, eval,
early stopping, checkpoint) → export. Everything it needs arrives in `config`.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from pathlib import Path

import ray.train
import torch
import torch.distributed as dist

from finetune_api.spec import FineTuneJobSpec
from finetune_train.preempt import Watcher
from finetune_train.data import Collator, ShardedBatches, eval_batches, load_splits, tokenize
from finetune_train.engine import deepspeed_config, optimizer, param_groups, schedule
from finetune_train.evaluate import evaluate
from finetune_train.modeling import (
    DS_TAG,
    apply_freeze,
    apply_lora,
    build_model,
    consolidated,
    export,
    load_tokenizer,
    materialize,
    resolve_source,
    unfrozen_blocks,
)
from finetune_train.report import write_report
from finetune_train.storage import Store

log = logging.getLogger("finetune.train")


class EarlyStopping:
    def __init__(self, spec):
        self.spec, self.best, self.bad = spec, None, 0

    def should_stop(self, metrics: dict) -> bool:
        value = metrics[self.spec.metric]
        sign = 1 if self.spec.mode == "min" else -1
        if self.best is None or sign * (self.best - value) > self.spec.min_delta:
            self.best, self.bad = value, 0
        else:
            self.bad += 1
        return self.bad >= self.spec.patience


def _mean_across_ranks(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)  # NCCL reduces only device tensors
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


def train_loop(config: dict) -> None:
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)

    # ---- config
    spec = FineTuneJobSpec.model_validate(config["spec"])
    output_uri: str = config["output_uri"]
    store = Store.of(spec.storage)
    t = spec.training
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(t.seed)
    preemption = Watcher(config["signal"], device)

    # ---- data (s3:// inputs are fetched once per node)
    path = materialize(resolve_source(store.local_copy(spec.model.source)), spec.model.gguf_file)
    tokenizer = load_tokenizer(spec, path)
    d = spec.dataset
    train_records, val_records = load_splits(
        d.model_copy(update={"train": store.local_copy(d.train), "validation": d.validation and store.local_copy(d.validation)})
    )
    classify = spec.model.task == "sequence-classification"
    collate = Collator(tokenizer.pad_token_id, classify)
    train = ShardedBatches(tokenize(train_records, "train", spec, tokenizer), t.micro_batch_size, rank, world, spec.dataset.seed, collate)
    val = tokenize(val_records, "validation", spec, tokenizer) if val_records else []
    steps_per_epoch = train.per_epoch // t.gradient_accumulation_steps
    if steps_per_epoch == 0:
        raise ValueError(
            f"dataset.train: {len(train.examples)} examples cannot fill one step of "
            f"{world} workers × training.microBatchSize {t.micro_batch_size} × gradientAccumulationSteps "
            f"{t.gradient_accumulation_steps}; lower them or add data"
        )
    total_steps = t.max_steps or math.ceil(t.epochs * steps_per_epoch)

    # ---- model and method
    model = build_model(spec, path, tokenizer, pretrained=True)
    parts = None
    if spec.method.type == "lora":
        model = apply_lora(model, spec)
    elif spec.method.type == "freeze":
        parts = apply_freeze(model, spec.method.freeze, total_steps)
    groups = param_groups(model, spec, parts)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer(groups, spec),
        lr_scheduler=schedule(spec, total_steps, groups, len(parts.blocks) if parts else 0),
        config=deepspeed_config(spec),
        dist_init_required=False,
    )

    # ---- resume
    state = {"step": 0, "train": [], "eval": []}  # eval[0] is the evaluation before training
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            _, client = engine.load_checkpoint(ckpt_dir, tag=DS_TAG)
        state = client["finetune"]
        if rank == 0:
            log.warning("resumed from %s at step %d", checkpoint.path, state["step"])
        ray.train.report({"step": state["step"], "total_steps": total_steps, "resumed_from": checkpoint.path})
    evaluator = lambda: evaluate(  # noqa: E731
        engine, eval_batches(val, t.micro_batch_size, rank, world, collate), spec.model.task, spec.model.num_classes, device
    )
    if val and not state["eval"]:
        state["eval"].append({"step": 0, **evaluator()})
    stopper = EarlyStopping(t.early_stopping) if t.early_stopping else None
    for past in state["eval"][1:] if stopper else ():
        stopper.should_stop(past)

    upload = store.checkpoint_uploader(config["run_uri"])

    def save(metrics: dict) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(tmp, tag=DS_TAG, client_state={"finetune": state})
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=f"checkpoint_{state['step']:08d}",
                checkpoint_upload_fn=upload,
            )

    # ---- loop
    engine.train()
    metrics: dict = {}
    window_loss, window_tokens, window_start = [], 0, time.perf_counter()
    stop = False
    for step, micro_batches in train.steps(t.gradient_accumulation_steps, state["step"], steps_per_epoch):
        if step >= total_steps:  # resumed from the final checkpoint
            break
        for batch in micro_batches:
            window_tokens += int(batch["attention_mask"].sum())  # counted on the CPU copy: no device sync
            loss = engine(**{k: v.to(device) for k, v in batch.items()}).loss
            engine.backward(loss)
            engine.step()
            window_loss.append(loss.detach())
        state["step"] = done = step + 1
        last = done == total_steps
        if not last and preemption.due():
            save({**metrics, "step": done, "total_steps": total_steps, "preempted": True})
            if rank == 0:
                log.warning("preempted: saved a checkpoint at step %d", done)
            return
        due_eval = bool(val) and t.eval_every is not None and done % t.eval_every == 0 and not last
        due_ckpt = spec.checkpointing.every_steps is not None and done % spec.checkpointing.every_steps == 0
        if not (done % t.log_every == 0 or due_eval or due_ckpt or last):
            continue
        loss_mean, tokens = _mean_across_ranks([torch.stack(window_loss).mean().item(), window_tokens], device)
        elapsed = time.perf_counter() - window_start
        metrics = {
            "step": done,
            "total_steps": total_steps,
            "epoch": step / steps_per_epoch,
            "train_loss": loss_mean,
            "lr": scheduler.get_last_lr()[-1],
            "tokens_per_s": tokens * world / elapsed,
        }
        if parts is not None:
            metrics["unfrozen_blocks"] = unfrozen_blocks(spec.method.freeze, step, len(parts.blocks))
        state["train"].append(
            {k: metrics[k] for k in ("step", "train_loss", "tokens_per_s", "unfrozen_blocks") if k in metrics}
        )
        if due_eval:
            metrics.update(evaluator())
            state["eval"].append({"step": done, **{k: v for k, v in metrics.items() if k.startswith("eval_")}})
            stop = stopper is not None and stopper.should_stop(metrics)
        # Evaluation is not training time; the report below counts in the next window.
        window_loss, window_tokens, window_start = [], 0, time.perf_counter()
        metrics["stopped_early"] = stop
        if last or stop:
            break  # the final evaluation and checkpoint follow the loop
        if due_ckpt:
            save(metrics)
        else:
            ray.train.report(metrics)

    # ---- final evaluation, checkpoint and export
    eval_after = {}
    if val:
        if state["eval"][-1]["step"] != state["step"]:
            state["eval"].append({"step": state["step"], **evaluator()})
        eval_after = {k: v for k, v in state["eval"][-1].items() if k != "step"}
    final = {**metrics, **eval_after, "step": state["step"], "total_steps": total_steps, "stopped_early": stop}
    save(final)
    trained = consolidated(engine, spec, path, tokenizer, rank)
    if rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            export(trained, spec, tokenizer, Path(tmp) / "model")
            write_report(Path(tmp), state, stop)
            store.upload_dir(tmp, output_uri)
    ray.train.report({**final, "exported": True})
