"""DeepSpeed engine from the spec: config, optimizer parameter groups, LR schedule."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import math
import os
import shutil
from argparse import Namespace
from pathlib import Path

import torch
import torch.distributed as dist

from finetune_api.spec import FineTuneJobSpec
from finetune_train.modeling import DS_TAG, Layout, unfrozen_blocks
from finetune_train.storage import CACHE, build_once


def precision(spec: FineTuneJobSpec) -> str:
    if spec.training.precision != "auto":
        return spec.training.precision
    return "bf16" if spec.resources.gpus_per_node > 0 else "fp32"


def deepspeed_config(spec: FineTuneJobSpec) -> dict:
    t, ds = spec.training, spec.deepspeed
    zero: dict = {"stage": ds.zero_stage}
    if ds.zero_stage == 3:
        # lets the export gather full weights on rank 0
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if ds.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": spec.resources.gpus_per_node > 0}
        if ds.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": spec.resources.gpus_per_node > 0}
    dtype = precision(spec)
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": dtype == "fp16", "loss_scale": 0},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def param_groups(model: torch.nn.Module, spec: FineTuneJobSpec, parts: Layout | None) -> list[dict]:
    """AdamW-style groups (no weight decay on biases and norms). With a layout (freeze,
    layerwiseLrDecay) also one group per block, so the schedule can hold each block at lr 0
    until its step and scale it by its depth: `depth` 0 for the head and the top block, 1 for
    the block under it, ..., len(blocks) for the embeddings."""
    depth_of = {}
    if parts is not None:
        n = len(parts.blocks)
        depth_of = {id(p): n - 1 - i for i, block in enumerate(parts.blocks) for p in block}
        depth_of.update({id(p): n for p in parts.embeddings})
    block_of = {id(p): i for i, block in enumerate(parts.blocks) for p in block} if parts else {}
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2 and "norm" not in name.lower()
        key = (block_of.get(id(p)), depth_of.get(id(p), 0), decay)
        groups.setdefault(key, {"params": [], "weight_decay": spec.training.weight_decay if decay else 0.0,
                                "block": key[0], "depth": key[1]})["params"].append(p)
    if not groups:
        raise ValueError("method: nothing left to train; every parameter is frozen")
    return list(groups.values())


def optimizer(groups: list[dict], spec: FineTuneJobSpec) -> torch.optim.Optimizer:
    t = spec.training
    clean = [{k: v for k, v in g.items() if k not in ("block", "depth")} for g in groups]
    if t.optimizer == "sgd":
        return torch.optim.SGD(clean, lr=t.lr, momentum=0.9)
    if spec.deepspeed.cpu_offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(clean, lr=t.lr, adamw_mode=True)
    return torch.optim.AdamW(clean, lr=t.lr)


def schedule(spec: FineTuneJobSpec, total_steps: int, groups: list[dict], n_blocks: int):
    """A callable DeepSpeed builds the LR scheduler with, once it has wrapped the optimizer:
    warmup then linear/cosine/constant, times 0 for blocks not yet unfrozen."""
    t = spec.training
    warmup = math.ceil(t.warmup_ratio * total_steps)

    def base(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if t.scheduler == "linear":
            return max(0.0, 1.0 - progress)
        if t.scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    def group(block: int | None, depth: int):
        scale = (t.layerwise_lr_decay or 1.0) ** depth  # discriminative learning rates
        freeze = spec.method.freeze
        if block is None or freeze is None:
            return lambda step: base(step) * scale
        return lambda step: base(step) * scale * (block >= n_blocks - unfrozen_blocks(freeze, step, n_blocks))

    lambdas = [group(g["block"], g["depth"]) for g in groups]
    return lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambdas)


def shm_allreduce_usable(local_world: int, world: int, compiler: str | None) -> bool:
    """DeepSpeed's CPU all-reduce through /dev/shm only helps when 2 or more ranks all share one
    host, and it is a C++ op compiled at first use: without a compiler (the trainer image has
    none) building it fails the run, a single worker included."""
    return world > 1 and local_world == world and compiler is not None


def skip_shm_kernels(local_world: int, world: int) -> None:
    """Where the shm all-reduce cannot help or cannot be built, DeepSpeed is told not to build
    it: gloo does the all-reduce."""
    if not shm_allreduce_usable(local_world, world, shutil.which(os.environ.get("CXX", "c++"))):
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def load_checkpoint(engine, folder: str, uri: str, local_rank: int, **kwargs) -> dict:
    """Loads the DeepSpeed checkpoint in `folder` (stored at `uri`) into the engine; returns
    its client state. ZeRO 1-3 partition the optimizer state (ZeRO-3 the weights too) by
    worker, so a checkpoint written by another number of workers (resources changed while
    suspended, a retry of another size) is read through DeepSpeed's universal format, which
    holds each parameter and its optimizer state whole. The conversion is written once per node
    into the cache, never over the stored checkpoint, and removed once every rank has loaded."""
    written = len(glob.glob(os.path.join(folder, DS_TAG, "*optim_states.pt")))
    if engine.zero_optimization_stage() == 0 or written == engine.dp_world_size:
        return engine.load_checkpoint(folder, tag=DS_TAG, **kwargs)[1]
    out = CACHE / "universal" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    build_once(out, lambda tmp: _universal(Path(folder, DS_TAG), tmp / DS_TAG))
    engine._config.load_universal_checkpoint = True  # read at each load: only this one is universal
    try:
        client = engine.load_checkpoint(str(out), tag=DS_TAG, **kwargs)[1]
    finally:
        engine._config.load_universal_checkpoint = False
    dist.barrier()
    if local_rank == 0:
        shutil.rmtree(out, ignore_errors=True)
    return client


def _universal(tag_folder: Path, out: Path) -> None:
    from deepspeed.checkpoint import ds_to_universal

    args = Namespace(input_folder=str(tag_folder), output_folder=str(out), num_extract_workers=1, num_merge_workers=1,
                     keep_temp_folder=False, strict=True, inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()):  # its progress lines
        ds_to_universal.main(args)
