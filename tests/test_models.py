"""Tests of the model zoo: shapes, gradients, heads, torch.func, specs and user-facing errors."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from torch import nn
from torch.func import functional_call

from ssdd.errors import ConfigError, ShapeError, UnknownNameError
from ssdd.models import MODELS, Backbone, create_model, list_models, register_model

# Narrow versions of every model so the whole file runs in seconds on a CPU.
SMALL: dict[str, dict[str, Any]] = {
    "convnet": {"width": 8},
    "convnet3": {"width": 8},
    "convnet3-bn": {"width": 8},
    "convnet-widening": {"width": 4},
    "resnet10": {"width": 4},
    "resnet18": {"width": 4},
    "resnet50": {"width": 4},
    "vgg11": {"width": 4},
    "alexnet": {"width": 4},
    "mobilenetv2": {"width_mult": 0.25},
    "vit-tiny": {"dim": 24, "depth": 2, "heads": 2},
}
SIZES = (28, 32, 64)
CHANNELS = (1, 3)
BATCH = 2


def expected_feature_dim(name: str, image_size: int, **kwargs: Any) -> int:
    """The documented feature_dim formula of each model, written out independently of the models."""
    if name.startswith("convnet"):
        width = kwargs.get("width", 128)
        if name == "convnet-widening":
            depth = 4 if image_size >= 64 else 3
            widths = [width * 2**i for i in range(depth)]
        else:
            widths = kwargs.get("widths") or [width] * kwargs.get("depth", 3)
        return widths[-1] * (image_size // 2 ** len(widths)) ** 2
    if name in ("resnet10", "resnet18", "vgg11"):
        return 8 * kwargs.get("width", 64)
    if name == "resnet50":
        return 32 * kwargs.get("width", 64)
    if name == "alexnet":
        return 16 * kwargs.get("width", 64)
    if name == "mobilenetv2":
        return 1280
    if name == "vit-tiny":
        return kwargs.get("dim", 192)
    raise AssertionError(f"no feature_dim formula for {name}")


def images(model: Backbone, batch: int = BATCH) -> torch.Tensor:
    return torch.randn(batch, *model.input_shape)


def test_every_registered_model_is_covered() -> None:
    assert list_models() == sorted(SMALL)


@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", sorted(SMALL))
def test_model_contract(name: str, size: int, channels: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_outputs=5, in_channels=channels, image_size=size, **SMALL[name])
    assert isinstance(model, Backbone)
    assert model.feature_dim == expected_feature_dim(name, size, **SMALL[name])
    x = images(model)

    feats = model.features(x)
    assert feats.shape == (BATCH, model.feature_dim)
    out = model(x)
    assert out.shape == (BATCH, 5)
    out.square().mean().backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None, f"{name}: no gradient for {pname}"
        assert torch.isfinite(param.grad).all(), f"{name}: non-finite gradient for {pname}"

    model.eval()
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    with torch.no_grad():
        torch.testing.assert_close(functional_call(model, state, (x,)), model(x))

    model.reset_head(10)
    assert isinstance(model.head, nn.Linear)
    assert model(x).shape == (BATCH, 10)
    model.reset_head(0)
    assert isinstance(model.head, nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.features(x))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_functional_call_in_train_mode(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_outputs=3, image_size=32, **SMALL[name])
    x = images(model)
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    torch.testing.assert_close(functional_call(model, state, (x,)), model(x))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_spec_rebuilds_the_model(name: str) -> None:
    model = create_model(name, num_outputs=4, in_channels=1, image_size=28, **SMALL[name])
    spec = json.loads(json.dumps(model.spec))
    assert spec == {"name": name, "num_outputs": 4, "in_channels": 1, "image_size": 28, **SMALL[name]}
    rebuilt = create_model(**spec)
    shapes = {key: value.shape for key, value in model.state_dict().items()}
    assert {key: value.shape for key, value in rebuilt.state_dict().items()} == shapes


def test_spec_is_json_and_follows_reset_head() -> None:
    model = create_model("convnet", image_size=28, widths=(4, 8))
    assert model.spec == {"name": "convnet", "num_outputs": 0, "in_channels": 3, "image_size": 28, "widths": [4, 8]}
    model.reset_head(7)
    rebuilt = create_model(**model.spec)
    assert rebuilt(images(rebuilt)).shape == (BATCH, 7)
    with pytest.raises(ConfigError, match="JSON"):
        create_model("convnet", width=object())


@pytest.mark.parametrize("name", sorted(SMALL))
def test_default_model_builds(name: str) -> None:
    model = create_model(name, num_outputs=10).eval()
    assert model.feature_dim == expected_feature_dim(name, 32)
    with torch.no_grad():
        assert model(images(model)).shape == (BATCH, 10)


@pytest.mark.parametrize("size", SIZES)
def test_convnet_feature_dim_formula(size: int) -> None:
    for depth, widths in ((1, [8]), (3, [4, 8, 16]), (4, [4, 4, 4, 4])):
        model = create_model("convnet", image_size=size, widths=widths)
        assert model.feature_dim == widths[-1] * (size // 2**depth) ** 2
        assert model.features(images(model)).shape == (BATCH, model.feature_dim)
    assert create_model("convnet-widening", image_size=size, width=4).widths == (
        [4, 8, 16, 32] if size >= 64 else [4, 8, 16]
    )


def test_convnet_variants() -> None:
    instance = create_model("convnet3", width=4)
    assert sum(isinstance(m, nn.GroupNorm) and m.num_groups == 4 and m.affine for m in instance.modules()) == 3
    batch = create_model("convnet3-bn", width=4)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in batch.modules()) == 3
    plain = create_model("convnet", width=4, norm="none", pooling="max")
    assert not any(isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)) for m in plain.modules())
    assert sum(isinstance(m, nn.MaxPool2d) for m in plain.modules()) == 3


@pytest.mark.parametrize(("stem", "size", "first_map"),
                         [("cifar", 32, 32), ("cifar-pad2", 32, 34), ("imagenet", 64, 16)])
def test_resnet_stems_and_their_first_feature_map(stem: str, size: int, first_map: int) -> None:
    """The stem's output side, worked out by hand: 3x3 s1 p1 keeps it, p2 grows it by 2, 7x7 s2 p3 + max-pool 3 s2
    p1 quarters it; without ``stem_relu`` the stem output keeps its negative values."""
    model = create_model("resnet18", image_size=size, width=4, stem=stem).eval()
    x = torch.randn(2, 3, size, size)
    assert model.stem(x).shape == (2, 4, first_map, first_map)
    assert (model.stem(x) >= 0).all()
    bare = create_model("resnet18", image_size=size, width=4, stem=stem, stem_relu=False).eval()
    assert not any(isinstance(m, nn.ReLU) for m in bare.stem)
    assert (bare.stem(x) < 0).any()
    assert bare.features(x).shape == (2, 32)


def test_resnet50_is_three_four_six_three_bottlenecks() -> None:
    model = create_model("resnet50", width=4)
    assert [len(stage) for stage in model.stages] == [3, 4, 6, 3]
    assert all(type(block).__name__ == "Bottleneck" for stage in model.stages for block in stage)
    assert model.stages[3][0].conv3.out_channels == 4 * 8 * 4


def test_construction_uses_the_global_generator_without_reseeding() -> None:
    def weights() -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in create_model("resnet10", 3, width=4).parameters()])

    torch.manual_seed(1)
    first, second = weights(), weights()
    torch.manual_seed(1)
    again = weights()
    assert torch.equal(first, again)
    assert not torch.equal(first, second)


def test_duplicate_registration_raises() -> None:
    before = list_models()

    def builder(name: str, num_outputs: int, in_channels: int, image_size: int) -> Backbone:
        raise AssertionError("never built")

    with pytest.raises(ValueError, match="already registered"):
        register_model("convnet3")(builder)
    with pytest.raises(ValueError, match="already registered"):
        MODELS.add("resnet18", MODELS.get("resnet10"))
    assert list_models() == before


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(UnknownNameError) as info:
        create_model("resnet-18")
    message = str(info.value)
    assert "resnet-18" in message and "resnet18" in message
    for name in list_models():
        assert name in message


def test_unknown_argument_raises_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        create_model("convnet3", depthh=4)
    message = str(info.value)
    assert "convnet3" in message and "'depthh'" in message and "width" in message and "pooling" in message
    with pytest.raises(ConfigError, match="'width'"):
        MODELS.get("mobilenetv2")(10, 3, 32, width=2)


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("convnet", {"norm": "layer"}, "norm must be one of"),
        ("convnet", {"pooling": "sum"}, "pooling must be one of"),
        ("convnet", {"depth": 6}, "depth 6"),
        ("convnet", {"depth": 2, "widths": [4, 8, 16]}, "depth=2"),
        ("resnet18", {"width": 0}, "width must be a positive integer"),
        ("resnet50", {"stem": "cifar-pad3"}, "stem must be one of"),
        ("resnet18", {"stem_relu": "no"}, "stem_relu must be true or false"),
        ("mobilenetv2", {"width_mult": -1.0}, "width_mult"),
        ("vit-tiny", {"dim": 32, "heads": 3}, "divisible by heads"),
        ("vgg11", {"in_channels": 0}, "in_channels"),
        ("alexnet", {"num_outputs": -1}, "num_outputs"),
    ],
)
def test_bad_option_values_raise_config_error(name: str, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        create_model(name, **kwargs)


def test_wrong_input_shape_raises_shape_error() -> None:
    model = create_model("convnet3", num_outputs=10, width=4)
    with pytest.raises(ShapeError) as info:
        model(torch.zeros(2, 1, 28, 28))
    message = str(info.value)
    assert "convnet3" in message and "(3, 32, 32)" in message and "(1, 28, 28)" in message
    assert "image_size=32" in message and "in_channels=1" in message
    with pytest.raises(ShapeError, match=r"resize the data with image_size=32"):
        model.features(torch.zeros(2, 3, 64, 64))
    with pytest.raises(ShapeError, match="batch of images"):
        model(torch.zeros(3, 32, 32))
    vit = create_model("vit-tiny", image_size=28, **SMALL["vit-tiny"])
    with pytest.raises(ShapeError, match=r"\(3, 28, 28\)"):
        vit(torch.zeros(2, 3, 32, 32))


@pytest.mark.parametrize(("image_size", "patch_size"), [(30, 4), (32, 5)])
def test_vit_rejects_image_size_not_divisible_by_patch(image_size: int, patch_size: int) -> None:
    with pytest.raises(ShapeError, match="not divisible by patch_size"):
        create_model("vit-tiny", image_size=image_size, patch_size=patch_size, dim=24, depth=1, heads=2)
