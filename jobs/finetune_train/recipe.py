"""The training program every FineTuneJob runs on each Ray Train worker.

Reads top to bottom: config → model → data → method → engine → resume → loop (log, eval,
early stopping, checkpoint) → final evaluation and test → export. Everything it needs arrives
in `config`. Text and images take the same path; they differ in how rows become batches.
Preference tuning too: its batches hold pairs, and its loss compares the policy with a
reference model (finetune_train.preference).
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

from finetune_api.spec import FineTuneJobSpec, PreferenceSpec
from finetune_train.data import Collator, ShardedBatches, eval_batches, load_splits, model_inputs, token_table
from finetune_train.engine import deepspeed_config, load_checkpoint, optimizer, param_groups, schedule, skip_shm_kernels
from finetune_train.evaluate import evaluate, per_class
from finetune_train.loss import count_targets, step_scale, summed_loss
from finetune_train.modeling import (
    DS_TAG,
    apply_freeze,
    apply_lora,
    attention_kernel,
    build_model,
    classifier,
    consolidated,
    export,
    image_processor,
    layout,
    load_tokenizer,
    materialize,
    model_folder,
    resolve_source,
    unfrozen_blocks,
)
from finetune_train.preempt import Watcher
from finetune_train.preference import Objective, adapters_off, evaluate_pairs, frozen, reference_config
from finetune_train.report import write_report
from finetune_train.storage import Store, checkpoint_directory, join

log = logging.getLogger("finetune.train")
LOW_SCORE = -1e300  # the checkpoint score of a checkpoint that is no best evaluation (restoreBest)


class EarlyStopping:
    """Counts evaluations without improvement; `improved` says whether the last one was the
    best so far."""

    def __init__(self, spec):
        self.spec, self.best, self.bad, self.improved = spec, None, 0, False

    def should_stop(self, metrics: dict) -> bool:
        value = metrics[self.spec.metric]
        sign = 1 if self.spec.mode == "min" else -1
        self.improved = self.best is None or sign * (self.best - value) > self.spec.min_delta
        if self.improved:
            self.best, self.bad = value, 0
        else:
            self.bad += 1
        return self.bad >= self.spec.patience

    def score(self, value: float) -> float:
        """Larger is better, whatever the mode: Ray keeps the highest-scoring checkpoints."""
        return -value if self.spec.mode == "min" else value


def _sum_across_ranks(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)  # NCCL reduces only device tensors
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def train_loop(config: dict) -> None:
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)

    # ---- config
    spec = FineTuneJobSpec.model_validate(config["spec"])
    output_uri: str = config["output_uri"]
    store = Store.of(spec.storage)
    t, d = spec.training, spec.dataset
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(t.seed)
    preemption = Watcher(config["signal"], device)
    ds_config = deepspeed_config(spec)
    skip_shm_kernels(ctx.get_local_world_size(), world)  # before anything starts DeepSpeed's comm (zero.Init does)
    classify, image, pairs = spec.model.classifies, spec.model.task == "image-classification", spec.model.task == "preference"

    # ---- model (ZeRO-3: built partitioned, no rank holds the whole model); s3:// inputs are
    # fetched once per node
    path = model_folder(spec, store.local_copy)
    tokenizer = None if image else load_tokenizer(spec, path)
    zero3 = ds_config if spec.deepspeed.zero_stage == 3 else None
    model = build_model(spec, path, tokenizer, pretrained=True, zero3=zero3)
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # ---- data: tokenized once per node (text), or decoded and transformed per batch (images)
    if image:
        from finetune_train.images import ImageCollator, data_config, image_table, transforms

        pixels = data_config(model, spec)
        processor = image_processor(spec, model)
        read = lambda path, split: image_table(path, split, spec)  # noqa: E731
        collator = lambda split, training: ImageCollator(split.table, transforms(pixels, training, d.augment))  # noqa: E731
    else:
        processor = tokenizer
        read = lambda path, split: token_table(path, split, spec, tokenizer)  # noqa: E731
        flat = d.packing and attention_kernel(spec) == "flash_attention_2"
        collator = lambda split, training: Collator(split.table, tokenizer.pad_token_id, classify, d.packing, pairs, flat)  # noqa: E731
    local = lambda uri: uri and store.local_copy(uri)  # noqa: E731
    splits = load_splits(spec, read, local(d.train), local(d.validation), local(d.test))
    train = ShardedBatches(splits.train, t.micro_batch_size, rank, world, d.seed, collator(splits.train, True))
    steps_per_epoch = train.steps_per_epoch(t.gradient_accumulation_steps)
    if steps_per_epoch == 0:
        raise ValueError(
            f"dataset.train: {len(splits.train)} {'packed rows' if d.packing else 'examples'} cannot fill one step of "
            f"{world} workers × training.microBatchSize {t.micro_batch_size} × gradientAccumulationSteps "
            f"{t.gradient_accumulation_steps}; lower them or add data"
        )
    total_steps = t.max_steps or math.ceil(t.epochs * steps_per_epoch)

    # ---- method
    parts = None
    if spec.method.type == "lora":
        model = apply_lora(model, spec)
    if spec.method.type == "freeze" or t.layerwise_lr_decay:
        parts = layout(model, classifier(model) if image else None)
    if spec.method.type == "freeze":
        apply_freeze(model, spec.method.freeze, total_steps, parts)
    groups = param_groups(model, spec, parts)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer(groups, spec),
        lr_scheduler=schedule(spec, total_steps, groups, len(parts.blocks) if parts else 0),
        config=ds_config,
        dist_init_required=False,
    )
    if pairs:  # the reference: the adapters switched off (LoRA), or a frozen copy
        p = t.preference or PreferenceSpec()
        if spec.method.type == "lora" and not p.reference_model:
            reference = adapters_off(engine)
        else:
            source = materialize(resolve_source(store.local_copy(p.reference_model)), None) if p.reference_model else path
            still = build_model(spec, source, tokenizer, pretrained=True, zero3=zero3).requires_grad_(False)
            reference = frozen(deepspeed.initialize(model=still, config=reference_config(ds_config), dist_init_required=False)[0])
        objective = Objective(p, reference)

    def step_loss(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss, targets) of a micro-batch: tokens or labels, or pairs."""
        if pairs:
            losses = objective(engine, batch).losses
            return losses.sum(), losses.new_tensor(len(losses))
        return summed_loss(engine(**model_inputs(batch)).logits, batch["labels"], classify, label_smoothing=t.label_smoothing)

    def targets_of(batch: dict) -> int:
        return len(batch["labels"]) // 2 if pairs else count_targets(batch["labels"], classify)

    # ---- resume
    state = {"step": 0, "train": [], "eval": []}  # eval[0] is the evaluation before training
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint_directory(checkpoint) as ckpt_dir:  # by this number of workers or another
            client = load_checkpoint(engine, ckpt_dir, checkpoint.path, ctx.get_local_rank())
        state = client["finetune"]
        if rank == 0:
            log.warning("resumed from %s at step %d", checkpoint.path, state["step"])
        ray.train.report({"step": state["step"], "total_steps": total_steps, "resumed_from": checkpoint.path})

    def evaluator(split, prefix: str = "eval_"):
        batches = eval_batches(split, t.micro_batch_size, rank, world, collator(split, False))
        if pairs:
            return evaluate_pairs(engine, objective, batches, device, prefix)
        return evaluate(engine, batches, classify, spec.model.num_classes, device, prefix)

    if splits.validation and not state["eval"]:
        state["eval"].append({"step": 0, **evaluator(splits.validation).metrics})
        ray.train.report({**state["eval"][0], "total_steps": total_steps})  # the evaluation before training
    stopper = EarlyStopping(t.early_stopping) if t.early_stopping else None
    stop = False  # replayed over a resumed run's evaluations: its patience, and whether it had stopped
    for past in state["eval"][1:] if stopper else ():
        stop = stopper.should_stop(past)
    restore_best = stopper is not None and t.early_stopping.restore_best

    upload = store.checkpoint_uploader(config["run_uri"])
    checkpointed = state["step"] if checkpoint else None  # the step of the newest checkpoint

    def save(metrics: dict, best: bool = False) -> None:
        """A checkpoint of the current step. With restoreBest, Ray keeps the best-scoring ones
        (and always the latest): a best evaluation's checkpoint scores its metric. Not twice
        for one step (a preemption right after a checkpoint or a resume, a retry after the
        final one): Ray would delete the older entry's folder, which is the same, newest one."""
        nonlocal checkpointed
        if state["step"] == checkpointed:
            ray.train.report(metrics)
            return
        checkpointed = state["step"]
        name = f"checkpoint_{state['step']:08d}"
        if best:
            state["best"] = {"step": state["step"], "checkpoint": name, t.early_stopping.metric: stopper.best}
        score = {"best_score": stopper.score(stopper.best) if best else LOW_SCORE} if restore_best else {}
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(tmp, tag=DS_TAG, client_state={"finetune": state})
            ray.train.report({**metrics, **score}, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=name, checkpoint_upload_fn=upload)

    # ---- loop
    engine.train()
    metrics: dict = {}
    window = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, targets: on the device, no per-step sync
    tokens = padded = 0  # counted on the CPU copies
    window_start = time.perf_counter()
    # Where the data order stands; a checkpoint from before positions were kept has only its step.
    epoch, index = divmod(state["step"], steps_per_epoch)
    start = tuple(state.get("position") or (epoch, index * train.per_step(t.gradient_accumulation_steps)))
    for position, micro_batches in train.steps(t.gradient_accumulation_steps, start):
        step = state["step"]
        if step >= total_steps or stop:  # resumed from the final checkpoint (an early stop's too)
            break
        # One all-reduce: whether to stop for preemption, and the step's targets on every rank.
        preempted, targets = preemption.sync(sum(targets_of(b) for b in micro_batches))
        if preempted:
            save({**metrics, "step": step, "total_steps": total_steps, "preempted": True})
            if rank == 0:
                log.warning("preempted: saved a checkpoint at step %d", step)
            return
        scale = step_scale(targets, world, t.gradient_accumulation_steps)
        for batch in micro_batches:
            tokens += int(batch["tokens"])
            padded += int(batch["input_ids"].numel()) if "input_ids" in batch else int(batch["tokens"])
            batch = {k: v.to(device) for k, v in batch.items()}
            loss, n = step_loss(batch)
            engine.backward(loss * scale)
            engine.step()
            window += torch.stack([loss.detach(), n]).double()
        state["step"], state["position"] = step + 1, list(position)
        done = step + 1
        last = done == total_steps
        due_eval = bool(splits.validation) and t.eval_every is not None and done % t.eval_every == 0 and not last
        due_ckpt = spec.checkpointing.every_steps is not None and done % spec.checkpointing.every_steps == 0
        if not (done % t.log_every == 0 or due_eval or due_ckpt or last):
            continue
        loss_sum, target_sum, token_sum, padded_sum = _sum_across_ranks([*window.tolist(), tokens, padded], device)
        elapsed = time.perf_counter() - window_start
        metrics = {
            "step": done,
            "total_steps": total_steps,
            "epoch": position[0] + position[1] / len(splits.train),
            "train_loss": loss_sum / max(target_sum, 1.0),  # every target of the window weighs the same
            "lr": scheduler.get_last_lr()[-1],
            "tokens_per_s": token_sum / elapsed,  # images per second for image models
            "padding": 1 - token_sum / max(padded_sum, 1),
        }
        if device.type == "cuda":  # what bench/gpu.py reports
            metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if parts is not None and spec.method.freeze:
            metrics["unfrozen_blocks"] = unfrozen_blocks(spec.method.freeze, step, len(parts.blocks))
        state["train"].append(
            {k: metrics[k] for k in ("step", "train_loss", "tokens_per_s", "padding", "unfrozen_blocks") if k in metrics}
        )
        improved = False
        if due_eval:
            metrics.update(evaluator(splits.validation).metrics)
            state["eval"].append({"step": done, **{k: v for k, v in metrics.items() if k.startswith("eval_")}})
            stop = stopper is not None and stopper.should_stop(metrics)
            improved = restore_best and stopper.improved
        # Evaluation is not training time; the report below counts in the next window.
        window.zero_()
        tokens = padded = 0
        window_start = time.perf_counter()
        metrics["stopped_early"] = stop
        if last or stop:
            break  # the final evaluation and checkpoint follow the loop
        if due_ckpt or improved:
            save(metrics, best=improved)
        else:
            ray.train.report(metrics)

    # ---- final evaluation, checkpoint, the best model back (restoreBest), test and export
    final_eval = None
    if splits.validation:
        final_eval = evaluator(splits.validation)
        if state["eval"][-1]["step"] != state["step"]:
            state["eval"].append({"step": state["step"], **final_eval.metrics})
            if stopper is not None:
                stopper.should_stop(final_eval.metrics)
    eval_after = {k: v for k, v in state["eval"][-1].items() if k != "step"} if state["eval"] else {}
    final = {**metrics, **eval_after, "step": state["step"], "total_steps": total_steps, "stopped_early": stop}
    save(final, best=restore_best and stopper.improved)
    restored = state.get("best") if restore_best else None
    if restored and restored["step"] != state["step"]:
        with tempfile.TemporaryDirectory() as tmp:  # every rank its own shards
            best = join(config["run_uri"], restored["checkpoint"])
            store.copy_dir(best, tmp)
            load_checkpoint(engine, tmp, best, ctx.get_local_rank(), load_optimizer_states=False, load_lr_scheduler_states=False)
        if rank == 0:
            log.warning("restoreBest: exporting the model of step %d", restored["step"])
        final_eval = evaluator(splits.validation)
    test = evaluator(splits.test, "test_") if splits.test else None
    trained = consolidated(engine, spec, path, tokenizer, rank)
    if rank == 0:
        scored = test or final_eval  # the per-class report: of the test split if there is one
        names = spec.model.labels or [str(i) for i in range(spec.model.num_classes or 0)]
        report = {"test": test.metrics if test else None, "restored_best": restored,
                  "per_class": per_class(scored.confusion, names) if scored and scored.confusion else None,
                  "confusion": scored.confusion if scored else None, "labels": names if classify else None}
        with tempfile.TemporaryDirectory() as tmp:
            export(trained, spec, processor, Path(tmp) / "model")
            write_report(Path(tmp), state, stop, report)
            store.upload_dir(tmp, output_uri)
    ray.train.report({**final, **({"test": test.metrics} if test else {}), "exported": True})
