"""Integer kernels: oneDNN int8 execution matches the float layer on dequantized codes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modiff_quant.integer_kernels import (
    _PROBE_WIDTH,
    IntegerWeights,
    UnsupportedWeights,
    _probe,
    code_range,
    pack_weights,
    unavailable_reason,
)
from modiff_quant.quant import Granularity, QuantSpec, quantize_minmax

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))

LAYERS = {
    "linear": lambda: nn.Linear(24, 20),
    "conv3x3": lambda: nn.Conv2d(16, 24, 3, padding=1),
    "conv3x3_stride2": lambda: nn.Conv2d(16, 16, 3, stride=2),
    "conv1x1": lambda: nn.Conv2d(16, 8, 1),
    "conv_grouped": lambda: nn.Conv2d(16, 24, 3, padding=1, groups=4),
    "conv_depthwise_dilated": lambda: nn.Conv2d(16, 16, 3, padding="same", dilation=2, groups=16),
    "conv1d": lambda: nn.Conv1d(16, 12, 3, stride=2, padding=1),
}


def lattice_weight(layer: nn.Module, bits: int, *, per_tensor: bool = False) -> Tensor:
    """A symmetric fake-quantized weight as quantize_minmax makes it: (codes·scale) in float32."""
    qmax = 2 ** (bits - 1) - 1
    weight = layer.weight.detach()
    amax = weight.abs().amax() if per_tensor else weight.flatten(1).abs().amax(1).view(-1, *[1] * (weight.dim() - 1))
    scale = amax / qmax
    return torch.clamp(torch.round(weight / scale), -qmax - 1, qmax) * scale


def affine_weight(layer: nn.Module, bits: int) -> Tensor:
    """An asymmetric fake-quantized weight, per output channel, shifted so that its offsets are
    not zero: (clamp(round(w/s) + z, 0, 2^b - 1) - z)·s."""
    weight = layer.weight.detach() + 0.6 * layer.weight.detach().abs().amax()
    shape = (-1, *[1] * (weight.dim() - 1))
    low, high = weight.flatten(1).amin(1).clamp(max=0).view(shape), weight.flatten(1).amax(1).clamp(min=0).view(shape)
    scale = (high - low) / (2**bits - 1)
    zero_point = torch.round(-low / scale)
    return (torch.clamp(torch.round(weight / scale) + zero_point, 0, 2**bits - 1) - zero_point) * scale


def activation(layer: nn.Module, codes: int, batch: int = 3) -> Tensor:
    shape = {nn.Linear: (batch, 5, 24), nn.Conv1d: (batch, 16, 11)}.get(type(layer), (batch, 16, 9, 10))
    return torch.randint(-codes, codes + 1, shape).float()


def reference(layer: nn.Module, x: Tensor, weight: Tensor) -> Tensor:
    """The float layer without bias, in float64 so the comparison sees only the kernel's error."""
    if isinstance(layer, nn.Linear):
        return F.linear(x.double(), weight.double())
    conv = F.conv1d if isinstance(layer, nn.Conv1d) else F.conv2d
    return conv(x.double(), weight.double(), None, layer.stride, layer.padding, layer.dilation, layer.groups)


def assert_close(actual: Tensor, expected: Tensor) -> None:
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    error = (actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)
    assert error < 1e-5, f"relative error {error:.2e}"


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("codes", [7, 15, 255])
@pytest.mark.parametrize("per_sample", [False, True])
def test_matches_float_layer(no_grad: None, name: str, bits: int, codes: int, per_sample: bool) -> None:
    torch.manual_seed(bits * 1000 + codes)
    layer = LAYERS[name]()
    weight = lattice_weight(layer, bits)
    x = activation(layer, codes)
    scale = torch.rand(x.shape[0], *[1] * (x.dim() - 1)) + 0.01 if per_sample else torch.tensor(0.037)
    kernel = IntegerWeights.from_layer(layer, weight, bits)
    expected = reference(layer, x * scale.double(), weight)
    assert_close(kernel.run(x, scale), expected)
    accumulate = torch.randn(expected.shape)
    assert_close(kernel.run(x, scale, accumulate), expected + accumulate)


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("bits", [4, 8])
def test_asymmetric_weights_run_with_a_zero_point_correction(no_grad: None, name: str, bits: int) -> None:
    """Weights s·(c + o) with nonzero offsets: s·c on the kernels plus s·o times the input's
    window sums matches the float layer, for every layer shape, per-sample scales, wide codes
    split into pieces, and channels-last inputs."""
    torch.manual_seed(bits)
    layer = LAYERS[name]()
    weight = affine_weight(layer, bits)
    kernel = IntegerWeights.from_layer(layer, weight, bits)
    assert kernel._offsets is not None and kernel._offsets.abs().amin() > 0
    for codes in (7, 255):
        x = activation(layer, codes)
        scale = torch.rand(x.shape[0], *[1] * (x.dim() - 1)) + 0.01
        expected = reference(layer, x * scale.double(), weight)
        assert_close(kernel.run(x, scale), expected)
        if x.dim() == 4:
            assert_close(kernel.run(x.contiguous(memory_format=torch.channels_last), scale), expected)


@pytest.mark.parametrize(
    ("name", "group"),
    [("linear", 8), ("conv3x3", 36), ("conv3x3_stride2", 9), ("conv1x1", 4), ("conv1d", 6)],
)
@pytest.mark.parametrize("symmetric", [True, False])
def test_weight_scales_per_group_of_input_channels(no_grad: None, name: str, group: int, symmetric: bool) -> None:
    """w_granularity group:N covering whole input channels (a scale per output channel and input
    group) runs as one grouped kernel call, summed over the input groups; channels-last inputs
    and torch.compile too."""
    torch.manual_seed(group)
    layer = LAYERS[name]()
    with torch.no_grad():
        layer.weight.mul_(torch.rand(layer.weight.shape[1]).view(1, -1, *[1] * (layer.weight.dim() - 2)) * 4)
    spec = QuantSpec(8, symmetric, Granularity("group", group))
    weight = quantize_minmax(layer.weight.detach(), spec, weight=True)
    with pytest.raises(UnsupportedWeights, match="lattice"):
        IntegerWeights.from_layer(layer, weight, 8)  # one scale per output channel cannot hold it
    kernel = pack_weights(layer, weight, 8, group)
    x = activation(layer, 255)
    scale = torch.rand(x.shape[0], *[1] * (x.dim() - 1)) + 0.01
    expected = reference(layer, x * scale.double(), weight)
    assert_close(kernel.run(x, scale), expected)
    accumulate = torch.randn(expected.shape)
    assert_close(kernel.run(x, scale, accumulate), expected + accumulate)
    if x.dim() == 4:
        assert_close(kernel.run(x.contiguous(memory_format=torch.channels_last), scale), expected)
    torch._dynamo.reset()
    compiled = torch.compile(kernel.run, backend="aot_eager", fullgraph=True)
    assert_close(compiled(x, scale, accumulate, bounds=(-255, 255)), expected + accumulate)


def test_input_groups_must_be_whole_channels_of_an_ungrouped_layer() -> None:
    with pytest.raises(UnsupportedWeights, match="whole input channels .9 elements each"):
        pack_weights(LAYERS["conv3x3"](), lattice_weight(LAYERS["conv3x3"](), 8), 8, 3)
    grouped = LAYERS["conv_grouped"]()
    with pytest.raises(UnsupportedWeights, match="ungrouped layer"):
        pack_weights(grouped, lattice_weight(grouped, 8), 8, 9)


@pytest.mark.parametrize(
    "bounds",
    [(-40, 215), (0, 255), (-255, 0), (-255, 255), (-8, 7), (0, 127), (-120, 7)],
    ids=["shifted", "unsigned", "negative", "split", "4bit", "unsigned7", "shifted7"],
)
@pytest.mark.parametrize("measured", [True, False], ids=["measured", "as_given"])
def test_code_ranges_and_given_bounds(
    no_grad: None, monkeypatch: pytest.MonkeyPatch, bounds: tuple[int, int], measured: bool
) -> None:
    """Codes minus a zero point: one shifted (or negated) call when they span at most U values
    (zero point 0 included, which has its own weight packing), pieces otherwise; with the bounds
    used as given (compiled code: no measuring pass) as well as measured (eager)."""
    if not measured:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.manual_seed(1)
    layer = LAYERS["conv3x3"]()
    weight = lattice_weight(layer, 8)
    x = torch.randint(bounds[0], bounds[1] + 1, (2, 16, 6, 6)).float()
    x[0, 0, 0, :2] = torch.tensor(bounds, dtype=torch.float32)  # the extremes occur
    kernel = IntegerWeights.from_layer(layer, weight, 8)
    expected = reference(layer, x * 0.5, weight)
    assert_close(kernel.run(x, torch.tensor(0.5), bounds=bounds), expected)
    assert_close(kernel.run(x.to(torch.int16), torch.tensor(0.5), bounds=bounds), expected)
    if measured:
        assert_close(kernel.run(x, torch.tensor(0.5)), expected)


def test_kernel_input_range_is_what_the_cpu_multiplies_exactly() -> None:
    """U is 255 with VNNI/AMX and 127 on AVX2 alone (16-bit pairwise sums saturate above it)."""
    assert code_range() in (127, 255)
    assert _probe(code_range()) == [_PROBE_WIDTH * (code_range() - 1) * w for w in (-128, 127)] * 2


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", ["linear", "conv3x3", "conv1d"])
def test_compiles_in_one_graph_without_host_syncs(no_grad: None, backend: str, name: str) -> None:
    """Under torch.compile(fullgraph=True) the run traces whole, with symmetric and asymmetric
    weights: static bounds (split into pieces where wide), tensor scales, the packing for any
    shape; inductor fuses code prep and scaling."""
    torch._dynamo.reset()
    torch.manual_seed(3)
    layer = LAYERS[name]()
    for weight in (lattice_weight(layer, 8), affine_weight(layer, 8)):
        kernel = IntegerWeights.from_layer(layer, weight, 8)
        run = torch.compile(kernel.run, backend=backend, fullgraph=True)
        for bounds in [(-15, 15), (-255, 255)]:
            x = activation(layer, bounds[1])
            scale = torch.rand(x.shape[0], *[1] * (x.dim() - 1)) + 0.01
            accumulate = torch.randn(reference(layer, x, weight).shape)
            expected = reference(layer, x * scale.double(), weight) + accumulate
            assert_close(run(x, scale, accumulate, bounds=bounds), expected)


def test_layouts_shapes_and_per_tensor_weights(no_grad: None) -> None:
    """Channels-last input gives channels-last output (as F.conv2d); one kernel serves several
    input shapes; per-tensor weight scales and transposed Conv1d inputs work; the caller's
    tensors are not modified."""
    torch.manual_seed(2)
    conv = LAYERS["conv3x3"]()
    weight = lattice_weight(conv, 4, per_tensor=True)
    kernel = IntegerWeights.from_layer(conv, weight, 4)
    x = activation(conv, 7).contiguous(memory_format=torch.channels_last)
    kept = x.clone()
    out = kernel.run(x, torch.tensor(1.0))
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, reference(conv, x, weight))
    assert torch.equal(x, kept)
    for other in (activation(conv, 7, batch=1), torch.randint(-7, 8, (2, 16, 5, 4)).float(), x):
        assert_close(kernel.run(other, torch.tensor(1.0)), reference(conv, other, weight))
    conv1d = LAYERS["conv1d"]()
    weight = lattice_weight(conv1d, 8)
    x = activation(conv1d, 100).transpose(1, 2).contiguous().transpose(1, 2)
    assert_close(IntegerWeights.from_layer(conv1d, weight, 8).run(x, torch.tensor(1.0)), reference(conv1d, x, weight))


def test_lattice_recovery_beyond_minmax(no_grad: None) -> None:
    """Channels whose largest code is below qmax (rounded down, clipped at -128, or all zero) are exact too."""
    layer = nn.Linear(4, 4, bias=False)
    codes = torch.tensor([[3, -2, 1, 0], [-128, 5, 127, 0], [0, 0, 0, 0], [126, -7, 1, 2]], dtype=torch.float32)
    weight = codes * torch.tensor([[0.1], [0.02], [1.0], [3e-4]])
    x = torch.randint(-100, 101, (6, 4)).float()
    assert_close(IntegerWeights.from_layer(layer, weight, 8).run(x, torch.tensor(1.0)), reference(layer, x, weight))


def test_unsupported_weights_and_layers() -> None:
    conv = nn.Conv2d(4, 4, 3)
    with pytest.raises(UnsupportedWeights, match="not on a per-channel 8-bit lattice"):
        IntegerWeights.from_layer(conv, torch.randn(4, 4, 3, 3), 8)
    with pytest.raises(UnsupportedWeights, match="4-bit lattice"):
        IntegerWeights.from_layer(conv, lattice_weight(conv, 8), 4)
    reflect = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
    with pytest.raises(UnsupportedWeights, match="padding_mode='reflect'"):
        IntegerWeights.from_layer(reflect, lattice_weight(reflect, 8), 8)
    with pytest.raises(UnsupportedWeights, match="ConvTranspose2d"):
        IntegerWeights.from_layer(nn.ConvTranspose2d(4, 4, 3), torch.zeros(4, 4, 3, 3), 8)
    with pytest.raises(UnsupportedWeights, match="2-8 bit"):
        IntegerWeights.from_layer(conv, lattice_weight(conv, 8), 16)


def test_codes_out_of_range() -> None:
    layer = nn.Linear(4, 4)
    kernel = IntegerWeights.from_layer(layer, lattice_weight(layer, 8), 8)
    with pytest.raises(ValueError, match="within ±255"):
        kernel.run(torch.tensor([[0.0, 300.0, 0.0, 0.0]]), torch.tensor(1.0))
