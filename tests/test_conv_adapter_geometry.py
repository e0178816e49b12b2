"""ConvAdapter on every conv geometry (issue 10, part 1): identity at init and the base layer's exact output shape
over a grid of convs and transposed convs, the bottleneck rule, blocks that resample, and bad targets."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from peft import get_peft_model
import torch.nn.functional as F
from torch import nn

from monai_peft import ConvAdapterConfig
from monai_peft.tuners.conv_adapter.geometry import bottleneck_width, down_projection_groups
from monai_peft.tuners.conv_adapter.layer import ConvAdapterLayer
from single_layer import Wrap

CHANNELS = (1, 2, 3, 4, 5, 6, 7, 16)
PADDINGS = ("zero", "half", "same", "valid")
PADDING_MODES = ("zeros", "reflect", "circular", "replicate")
CONV = {False: {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}, True: {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d,
                                                               3: nn.ConvTranspose3d}}


def _grid():
    """Every (dims, transposed, kernel, stride, dilation, padding) combination; channels, groups, padding mode,
    insertion and down-projection kind cycle through their values with lengths coprime to each other, so every
    value of every axis meets many others."""
    for i, (dims, transposed, k, stride, dilation, padding) in enumerate(
        itertools.product((1, 2, 3), (False, True), (1, 2, 3, 4, 5), (1, 2), (1, 2), PADDINGS)
    ):
        c_in = CHANNELS[i % 8]
        grouped = i % 3 == 1
        yield dict(
            dims=dims, transposed=transposed, k=k, stride=stride, dilation=dilation, padding=padding,
            c_in=c_in, c_out=c_in * (1 + i % 2) if grouped else CHANNELS[(i * 5 + 3) % 8],
            groups=c_in if grouped else 1,
            padding_mode=PADDING_MODES[i % 4] if padding != "zero" and not transposed else "zeros",
            output_padding=(i % 2) if transposed and stride == 2 else 0,
            insertion=("parallel", "sequential")[i % 5 % 2], adapter_conv=("depthwise", "dense")[i % 7 % 2],
            size=max(dilation * (k - 1) + 1, 3) + i % 3,
        )


def _base(case) -> nn.Module:
    pad = {"zero": 0, "half": case["dilation"] * (case["k"] - 1) // 2}.get(case["padding"], case["padding"])
    kwargs = dict(stride=case["stride"], padding=pad, dilation=case["dilation"], groups=case["groups"])
    if case["transposed"]:
        kwargs["output_padding"] = case["output_padding"]
    else:
        kwargs["padding_mode"] = case["padding_mode"]
    return CONV[case["transposed"]][case["dims"]](case["c_in"], case["c_out"], case["k"], **kwargs)


def test_identity_and_exact_shape_on_every_conv_geometry():
    torch.manual_seed(0)
    tested, rejected = [], 0
    for case in _grid():
        x = torch.randn(2, case["c_in"], *([case["size"]] * case["dims"]))
        try:  # only combinations PyTorch itself rejects are left out ("same" with stride 2, strings on transposed)
            model = Wrap(_base(case)).eval()
            with torch.no_grad():
                ref = model(x)
        except (RuntimeError, ValueError, TypeError):
            rejected += 1
            continue
        config = ConvAdapterConfig(target_modules=["layer"], gamma=4, insertion=case["insertion"],
                                   adapter_conv=case["adapter_conv"])
        pm = get_peft_model(model, config).eval()
        with torch.no_grad():
            out = pm(x)
        assert out.shape == ref.shape and torch.equal(out, ref), case
        layer = pm.base_model.model.layer
        with torch.no_grad():  # a non-zero adapter has the base output's shape too and changes it
            layer.conv_adapter_up["default"].weight.normal_()
            layer.conv_adapter_up["default"].bias.normal_()
            changed = pm(x)
        assert changed.shape == ref.shape and not torch.allclose(changed, ref), case
        tested.append(case)
    # every value of every axis was exercised
    for axis, values in (("dims", (1, 2, 3)), ("transposed", (False, True)), ("k", (1, 2, 3, 4, 5)),
                         ("stride", (1, 2)), ("dilation", (1, 2)), ("padding", PADDINGS), ("c_in", CHANNELS),
                         ("padding_mode", PADDING_MODES), ("insertion", ("parallel", "sequential")),
                         ("adapter_conv", ("depthwise", "dense")), ("output_padding", (0, 1))):
        assert {c[axis] for c in tested} == set(values), axis
    assert {c["groups"] > 1 for c in tested} == {True, False}
    assert {(c["transposed"], c["groups"] > 1, c["k"] % 2) for c in tested} == set(
        itertools.product((False, True), (False, True), (0, 1)))
    assert len(tested) > 300 and rejected < len(tested) / 2, (len(tested), rejected)


@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("gamma", (1, 2, 3, 4, 8, 16))
def test_bottleneck_width_and_grouping(channels, gamma):
    h = bottleneck_width(channels, gamma)
    assert h == max(1, math.ceil(channels / gamma))
    groups = down_projection_groups(channels, h, "depthwise")
    assert channels % groups == 0 and h % groups == 0
    if channels % gamma == 0:  # the paper: h filters, each over gamma input channels
        assert groups == h and channels // groups == gamma
    assert down_projection_groups(channels, h, "dense") == 1
    conv = nn.Conv2d(channels, 10, 3, padding=1)
    pm = get_peft_model(Wrap(conv), ConvAdapterConfig(target_modules=["layer"], gamma=gamma))
    down = pm.base_model.model.layer.conv_adapter_down["default"]
    assert (down.in_channels, down.out_channels, down.groups) == (channels, h, groups)
    params = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert params == (h * channels // groups * 9 + h) + (h * 10 + 10) + 10


def test_paper_adapter_on_a_1_channel_stem_and_awkward_widths():
    """The network of issue 10: 1-channel stem, 5-channel and 1x1x1 convs; every conv takes the default adapter."""
    net = nn.Sequential(nn.Conv3d(1, 5, 3, padding=1), nn.ReLU(), nn.Conv3d(5, 7, 3, stride=2, padding=1),
                        nn.ConvTranspose3d(7, 5, 2, stride=2), nn.Conv3d(5, 3, 1))
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        ref = net(x)
    pm = get_peft_model(net, ConvAdapterConfig(target_modules=["0", "2", "3", "4"]))
    with torch.no_grad():
        assert torch.equal(pm(x), ref)
    widths = {n: m.conv_adapter_down["default"].out_channels for n, m in pm.base_model.model.named_children()
              if isinstance(m, ConvAdapterLayer)}
    assert widths == {"0": 1, "2": 2, "3": 2, "4": 2}


@pytest.mark.parametrize("activation", ["leakyrelu", "relu"])
def test_default_adapter_on_a_1_channel_stem_trains_where_relu_would_stay_dead(activation):
    """A 1-channel stem over positive intensities, with the (only) bottleneck channel's kernel summing negative: every
    ReLU output is 0, the zero up-projection gets no gradient and the down-projection none through it, so a ReLU
    adapter never trains. The default (leaky ReLU) trains both projections."""
    torch.manual_seed(0)
    stem = nn.Conv3d(1, 4, 3, padding=1)
    config = ConvAdapterConfig(target_modules=["layer"]) if activation == "leakyrelu" else \
        ConvAdapterConfig(target_modules=["layer"], activation=activation)
    pm = get_peft_model(Wrap(stem), config)
    layer = pm.base_model.model.layer
    down, up = layer.conv_adapter_down["default"], layer.conv_adapter_up["default"]
    assert down.out_channels == 1
    with torch.no_grad():
        down.weight.copy_(-down.weight.abs())  # kernel sum < 0: dead on positive inputs under ReLU
    before = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    optimizer = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=1e-2)  # no decay: moves = grads
    x = torch.rand(2, 1, 6, 6, 6) + 0.1  # image intensities scaled to (0, 1]: all positive
    target = torch.randn(2, 4, 6, 6, 6)
    for _ in range(3):
        optimizer.zero_grad()
        ((pm(x) - target) ** 2).mean().backward()
        optimizer.step()
    moved = {n for n, p in pm.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    projections = {n for n in before if "conv_adapter_down" in n or n.endswith("conv_adapter_up.default.weight")}
    if activation == "relu":
        assert not moved & projections  # the failure the default avoids
    else:
        assert projections <= moved


@pytest.mark.parametrize("insertion", ["parallel", "sequential"])
@pytest.mark.parametrize("features", [(1, 1), (5, 10), (7, 3), (16, 16)])
def test_linear_layer_takes_the_adapter_as_a_1x1_conv_over_its_features(features, insertion):
    """A linear layer (peft's mock MLPs, SE blocks, classifier heads) takes the same adapter: down-projection,
    activation, up-projection and scale applied to the feature dimension of ``(..., C)`` tensors, checked against
    that computation written with ``F.linear``."""
    c_in, c_out = features
    torch.manual_seed(0)
    x = torch.randn(4, 3, c_in)
    pm = get_peft_model(Wrap(nn.Linear(c_in, c_out)), ConvAdapterConfig(target_modules=["layer"], insertion=insertion))
    layer = pm.base_model.model.layer
    with torch.no_grad():
        assert torch.equal(pm(x), layer.get_base_layer()(x))  # identity at init
        for p in (layer.conv_adapter_up["default"].weight, layer.conv_adapter_up["default"].bias,
                  layer.conv_adapter_alpha["default"]):
            p.copy_(torch.randn_like(p))
        down, up = layer.conv_adapter_down["default"], layer.conv_adapter_up["default"]
        base = layer.get_base_layer()(x)
        source = x if insertion == "parallel" else base
        groups, hidden = down.groups, down.out_channels
        parts = torch.split(source, source.shape[-1] // groups, dim=-1)
        weights = torch.split(down.weight[..., 0], hidden // groups, dim=0)
        h = torch.cat([F.linear(p, w) for p, w in zip(parts, weights)], dim=-1) + down.bias
        expected = base + layer.conv_adapter_alpha["default"] * F.linear(F.leaky_relu(h, 0.01), up.weight[..., 0],
                                                                          up.bias)
        out = pm(x)
    assert out.shape == (4, 3, c_out)
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="a linear layer has no spatial extent"):
        get_peft_model(Wrap(nn.Linear(c_in, c_out)), ConvAdapterConfig(target_modules=["layer"], kernel_size=3))


def test_transposed_conv_output_size_argument_reaches_the_adapter():
    up = nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1)
    pm = get_peft_model(Wrap(up), ConvAdapterConfig(target_modules=["layer"], init_weights=False))
    x = torch.randn(1, 4, 5, 5)
    out = pm.base_model.model.layer(x, output_size=(10, 10))  # 9x9 without output_size
    assert out.shape == (1, 4, 10, 10)


@pytest.mark.parametrize(
    "conv, kernel_size, shape",
    [
        (lambda: nn.Conv2d(4, 4, 3, stride=2, padding=1), 1, (1, 4, 9, 8)),
        (lambda: nn.Conv2d(4, 4, 3, padding="valid"), 5, (1, 4, 9, 8)),
        (lambda: nn.Conv2d(4, 4, 2, padding="same"), 5, (1, 4, 9, 8)),
        (lambda: nn.ConvTranspose3d(4, 2, 2, stride=2), 3, (1, 4, 3, 4, 5)),
        (lambda: nn.Conv1d(4, 4, 5, padding=2, dilation=1), 4, (1, 4, 11)),
    ],
)
def test_kernel_size_option_keeps_the_output_size(conv, kernel_size, shape):
    model = Wrap(conv())
    x = torch.randn(*shape)
    ref = model(x)
    pm = get_peft_model(model, ConvAdapterConfig(target_modules=["layer"], kernel_size=kernel_size, init_weights=False))
    assert pm.base_model.model.layer.conv_adapter_down["default"].kernel_size == (kernel_size,) * (len(shape) - 2)
    assert pm(x).shape == ref.shape


def test_kernel_size_that_cannot_keep_the_size_is_an_error():
    model = Wrap(nn.Conv2d(4, 4, 3, stride=2, padding=0))
    with pytest.raises(ValueError, match=r"'layer' \(Conv2d\).*kernel_size=2.*leave kernel_size=None"):
        get_peft_model(model, ConvAdapterConfig(target_modules=["layer"], kernel_size=2))


# ------------------------------------------------------------------------------------------------ blocks
class UpBlock(nn.Module):
    """Decoder block: up-sample by ``factor`` (nearest or transposed conv), then a conv."""

    def __init__(self, cin: int, cout: int, factor: float, transposed: bool = False) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cin, 2, stride=2) if transposed else nn.Upsample(scale_factor=factor)
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x):
        return self.conv(self.up(x))


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("insertion", ["parallel", "sequential"])
def test_upsampling_block_takes_an_adapter(transposed, insertion):
    torch.manual_seed(0)
    model = Wrap(UpBlock(6, 3, 2.0, transposed)).eval()
    x = torch.randn(2, 6, 5, 7)
    ref = model(x)
    pm = get_peft_model(model, ConvAdapterConfig(target_modules=["layer"], insertion=insertion)).eval()
    layer = pm.base_model.model.layer
    assert layer.geometry.is_block and layer.geometry.out_channels == 3
    assert torch.equal(pm(x), ref)
    if insertion == "parallel":
        assert isinstance(layer.conv_adapter_down["default"], nn.ConvTranspose2d)
    with torch.no_grad():
        layer.conv_adapter_up["default"].weight.normal_()
    assert pm(x).shape == (2, 3, 10, 14)


def test_bad_targets_name_the_module_and_wrap_nothing():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), UpBlock(8, 8, 1.5), nn.Conv2d(8, 8, 3, padding=1),
                          nn.Upsample(scale_factor=2), nn.Embedding(4, 4))
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=r"ConvAdapter cannot adapt '1' \(UpBlock\): UpBlock maps spatial size 16 to "
                                         r"\(24, 24\).*by an integer factor"):
        get_peft_model(model, ConvAdapterConfig(target_modules=["0", "1", "2"]))
    assert [type(m) for m in model.modules()] == before, "a failed get_peft_model left wrapped modules behind"
    with pytest.raises(TypeError, match=r"ConvAdapter cannot adapt '3' \(Upsample\): Upsample contains no Conv1d"):
        get_peft_model(model, ConvAdapterConfig(target_modules=["0", "2", "3"]))
    with pytest.raises(TypeError, match=r"ConvAdapter cannot adapt '4' \(Embedding\): Embedding is not a convolution"):
        get_peft_model(model, ConvAdapterConfig(target_modules=["0", "4"]))
    assert [type(m) for m in model.modules()] == before
    # a second adapter that fails leaves the first one exactly as it was
    pm = get_peft_model(model, ConvAdapterConfig(target_modules=["0", "2"]), adapter_name="a")
    layer0 = pm.base_model.model[0]
    with pytest.raises(ValueError):
        pm.add_adapter("b", ConvAdapterConfig(target_modules=["0", "2", "1"]))
    assert set(pm.peft_config) == {"a"} and pm.base_model.model[0] is layer0
    for m in pm.modules():
        if isinstance(m, ConvAdapterLayer):
            assert m._all_available_adapter_names() == ["a"]
    assert not isinstance(pm.base_model.model[1], ConvAdapterLayer)
