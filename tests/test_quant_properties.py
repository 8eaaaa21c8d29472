"""Property tests for the uniform fake-quantization math, the observers and the shipped
base quantizers (DESIGN.md §3: granularities tensor / sample / channel / group:N, symmetric and
asymmetric, weights quantized once by the base quantizer).

The reference for every bound is the library's own scale and zero point, computed the same way
the library does (`stats_view` + `qparams`), so the tests check the quantize-dequantize step
against its own parameters rather than re-deriving them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from modiff_quant.backends.static import StaticQuantizer

from modiff_quant.base_quantizer import ObservedActivationQuantizer
from modiff_quant.observers import LpSearchObserver, MinMaxObserver, MovingAverageMinMaxObserver
from modiff_quant.quant import (
    FLOAT_BITS,
    Granularity,
    QuantSpec,
    fake_quantize,
    qparams,
    quantize_minmax,
    round_ste,
    stats_view,
)
from modiff_quant.registry import OBSERVERS

EPS = torch.finfo(torch.float32).eps
TINY = torch.finfo(torch.float32).tiny
FMAX = torch.finfo(torch.float32).max

PROPERTY_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------------------------------
# helpers


def spec_of(bits: int, symmetric: bool, granularity: str) -> QuantSpec:
    return QuantSpec(bits, symmetric, Granularity.parse(granularity))


def reference_qparams(x: torch.Tensor, spec: QuantSpec, *, channel_dim: int = 1, weight: bool = False):
    """The library's min-max parameters for `x`, plus the grouped view they broadcast against."""
    view, dims = stats_view(x, spec.granularity, channel_dim=channel_dim, weight=weight)
    scale, zero_point = qparams(view.amin(dims, keepdim=True), view.amax(dims, keepdim=True), spec)
    return view, dims, scale, zero_point


def float_slack(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Float32 rounding of x/scale and of (code - zp) * scale: a few ulps of the values involved."""
    return 4 * EPS * (x.abs() + q.abs())


def check_half_scale_error(
    x_view, q_view, scale, zero_point, spec, *, all_inside: bool, within_half_step: bool = False
):
    """|x - Q(x)| <= scale/2 for every element inside [scale*(qmin-zp), scale*(qmax-zp)].

    `all_inside` additionally requires every element to lie inside that clipping range (up to float
    slack); `within_half_step` requires every element to lie within scale/2 of it, which is what
    asymmetric min-max can promise once the zero point is rounded to an integer.
    Returns the boolean "inside" mask.
    """
    x_view, q_view = x_view.double(), q_view.double()
    scale, zero_point = scale.double(), zero_point.double()
    slack = float_slack(x_view, q_view)
    clip_lo = scale * (spec.qmin - zero_point)
    clip_hi = scale * (spec.qmax - zero_point)
    inside = (x_view >= clip_lo) & (x_view <= clip_hi)
    err = (x_view - q_view).abs()
    bound = scale / 2 + slack
    bad = inside & (err > bound)
    assert not bad.any(), f"error above scale/2 inside the range: max err/scale = {(err / scale)[inside].max().item()}"
    if all_inside:
        outside = (x_view < clip_lo - slack) | (x_view > clip_hi + slack)
        assert not outside.any(), "min-max quantization left an element outside its clipping range"
    if within_half_step:
        assert not (err > bound).any(), f"min-max error above scale/2: max err/scale = {(err / scale).max().item()}"
        far = (x_view < clip_lo - scale / 2 - slack) | (x_view > clip_hi + scale / 2 + slack)
        assert not far.any(), "an element lies more than half a step outside the clipping range"
    return inside


def rows_per_group(view: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """[groups, values]: one row per scale group."""
    kept = [d for d in range(view.dim()) if d not in dims]
    return view.permute(*kept, *dims).reshape(math.prod(view.shape[d] for d in kept), -1)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# ---------------------------------------------------------------------------------------------
# strategies


@st.composite
def layouts(draw):
    """(shape, channel_dim, weight, granularity text): conv / linear activations and weights."""
    kind = draw(st.sampled_from(["conv_act", "linear_act", "conv_weight", "linear_weight"]))
    if kind == "conv_act":
        shape = (draw(st.integers(1, 3)), draw(st.integers(1, 8)), draw(st.integers(1, 4)), draw(st.integers(1, 4)))
        channel_dim, weight, channels = 1, False, shape[1]
    elif kind == "linear_act":
        shape = (draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 12)))
        channel_dim, weight, channels = -1, False, shape[-1]
    elif kind == "conv_weight":
        k = draw(st.sampled_from([1, 3]))
        shape = (draw(st.integers(1, 6)), draw(st.integers(1, 6)), k, k)
        channel_dim, weight, channels = 0, True, math.prod(shape[1:])
    else:
        shape = (draw(st.integers(1, 8)), draw(st.integers(1, 16)))
        channel_dim, weight, channels = 0, True, shape[1]
    kinds = ["tensor", "channel", "group"] + ([] if weight else ["sample"])
    granularity = draw(st.sampled_from(kinds))
    if granularity == "group":
        granularity = f"group:{draw(st.sampled_from(divisors(channels)))}"
    return shape, channel_dim, weight, granularity


specs_bits = st.integers(2, 16)


def random_tensor(shape, seed: int, distribution: str, magnitude: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if distribution == "normal":
        x = torch.randn(shape, generator=g)
    elif distribution == "positive":
        x = torch.rand(shape, generator=g)
    elif distribution == "negative":
        x = -torch.rand(shape, generator=g)
    elif distribution == "heavy":  # Student-t-like: normal / sqrt(chi2_1)
        x = torch.randn(shape, generator=g) / torch.randn(shape, generator=g).abs().clamp(min=1e-3)
    else:  # sparse: mostly exact zeros
        x = torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < 0.2)
    return (x.double() * magnitude).float()


# ---------------------------------------------------------------------------------------------
# quantize_minmax properties


@PROPERTY_SETTINGS
@given(
    layout=layouts(),
    bits=specs_bits,
    symmetric=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
    distribution=st.sampled_from(["normal", "positive", "negative", "heavy", "sparse"]),
    exponent=st.integers(-30, 28),
)
def test_minmax_error_at_most_half_scale(layout, bits, symmetric, seed, distribution, exponent):
    """Min-max fake quantization is within half a step of every element, at every granularity."""
    shape, channel_dim, weight, granularity = layout
    spec = spec_of(bits, symmetric, granularity)
    x = random_tensor(shape, seed, distribution, 10.0**exponent)
    q = quantize_minmax(x, spec, channel_dim=channel_dim, weight=weight)
    assert q.shape == x.shape and q.dtype == x.dtype
    view, dims, scale, zero_point = reference_qparams(x, spec, channel_dim=channel_dim, weight=weight)
    q_view = q.reshape(view.shape)
    # Symmetric: the clipping range [-(qmax+1)s, qmax*s] contains [-max|x|, max|x|] exactly.
    # Asymmetric: the zero point is rounded to an integer, which shifts the grid by up to half a
    # step, so the extreme element may sit up to scale/2 outside the range (still error <= s/2).
    check_half_scale_error(view, q_view, scale, zero_point, spec, all_inside=symmetric, within_half_step=True)


@PROPERTY_SETTINGS
@given(
    layout=layouts(),
    bits=specs_bits,
    symmetric=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
    exponent=st.integers(-20, 20),
)
def test_distinct_levels_per_group_at_most_two_to_the_bits(layout, bits, symmetric, seed, exponent):
    """Each scale group uses at most 2**bits distinct values, all on the group's integer grid."""
    shape, channel_dim, weight, granularity = layout
    spec = spec_of(bits, symmetric, granularity)
    x = random_tensor(shape, seed, "normal", 10.0**exponent)
    q = quantize_minmax(x, spec, channel_dim=channel_dim, weight=weight)
    view, dims, scale, zero_point = reference_qparams(x, spec, channel_dim=channel_dim, weight=weight)
    q_view = q.reshape(view.shape)
    for row in rows_per_group(q_view, dims):
        assert torch.unique(row).numel() <= 2**bits
    codes = q_view.double() / scale.double() + zero_point.double()
    # q = (code - zp) * scale is rounded to float32, so q / scale is an integer up to a few ulps
    assert ((codes - codes.round()).abs() <= 1e-6 + 4 * EPS * (q_view.double() / scale.double()).abs()).all()
    assert codes.round().min() >= spec.qmin and codes.round().max() <= spec.qmax


def test_distinct_levels_saturate_at_low_bits():
    """With many more elements than levels, a 2..4-bit tensor uses at most 2**bits values."""
    x = torch.randn(4, 8, 16, 16, generator=torch.Generator().manual_seed(0))
    for bits in (2, 3, 4):
        for symmetric in (True, False):
            q = quantize_minmax(x, spec_of(bits, symmetric, "tensor"))
            assert 2 <= torch.unique(q).numel() <= 2**bits


BIG = float(np.float32(1e30))
finite_f32 = st.floats(
    min_value=-BIG, max_value=BIG, allow_nan=False, allow_infinity=False, allow_subnormal=True, width=32
)
special_f32 = st.sampled_from(
    [float(np.float32(v)) for v in (0.0, -0.0, 1e30, -1e30, TINY, -TINY, 1e-45, -1e-45, 1e-40, 3e-39, 1.0)]
)


@PROPERTY_SETTINGS
@given(layout=layouts(), bits=specs_bits, symmetric=st.booleans(), data=st.data())
def test_no_nan_or_inf_for_finite_inputs(layout, bits, symmetric, data):
    """Any finite input up to |x| = 1e30, subnormals and zeros included, quantizes to finite values."""
    shape, channel_dim, weight, granularity = layout
    spec = spec_of(bits, symmetric, granularity)
    values = data.draw(hnp.arrays(np.float32, shape, elements=st.one_of(finite_f32, special_f32)))
    x = torch.from_numpy(values)
    q = quantize_minmax(x, spec, channel_dim=channel_dim, weight=weight)
    assert torch.isfinite(q).all(), f"non-finite output for finite input {x}"
    # The half-step bound holds wherever the library's scale is a normal float (see the
    # subnormal-range test below for what happens otherwise).
    view, dims, scale, zero_point = reference_qparams(x, spec, channel_dim=channel_dim, weight=weight)
    normal = (scale >= TINY).expand_as(view)
    err = (view.double() - q.reshape(view.shape).double()).abs()
    bound = scale.double() / 2 + float_slack(view.double(), q.reshape(view.shape).double())
    assert not (normal & (err > bound)).any()


@pytest.mark.parametrize("constant", [0.0, 1.0, -1.0, 1e-30, -1e-30, 1e30, -1e30, TINY, 1e-40, 1e-45])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 8, 16])
def test_constant_and_extreme_inputs_stay_finite(constant, symmetric, bits):
    """Constant tensors of any finite magnitude (empty min-max ranges included) give finite output."""
    x = torch.full((2, 4, 3, 3), constant)
    for granularity in ("tensor", "sample", "channel", "group:2"):
        q = quantize_minmax(x, spec_of(bits, symmetric, granularity))
        assert torch.isfinite(q).all()


@pytest.mark.parametrize("value", [FMAX, -FMAX, 3e38, 2e38])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 8, 16])
def test_no_overflow_near_float32_max(value, symmetric, bits):
    """qparams claims ranges near the float maximum do not overflow; the dequantized output must not either."""
    for x in (torch.tensor([value, 0.0, -value / 2, value / 3]), torch.tensor([value, -value])):
        q = quantize_minmax(x, spec_of(bits, symmetric, "tensor"))
        assert torch.isfinite(q).all(), f"{x.tolist()} -> {q.tolist()}"


def test_half_scale_bound_for_subnormal_ranges():
    """Scales are floored at the smallest normal float, so tiny ranges keep the half-step bound."""
    spec = spec_of(16, True, "tensor")
    x = torch.tensor([1e-40, 0.0])
    q = quantize_minmax(x, spec)
    view, _, scale, zero_point = reference_qparams(x, spec)
    check_half_scale_error(view, q, scale, zero_point, spec, all_inside=True, within_half_step=True)


def test_asymmetric_extreme_may_sit_half_a_step_outside_the_grid():
    """Pins the asymmetric min-max design: the integer zero point shifts the grid, so a range end can
    fall up to scale/2 outside [s*(qmin-zp), s*(qmax-zp)] while its error stays below scale/2."""
    spec = spec_of(2, False, "tensor")
    x = torch.tensor([-1.4, 1.6])
    view, _, scale, zero_point = reference_qparams(x, spec)
    assert scale.item() == 1.0 and zero_point.item() == 1.0
    q = quantize_minmax(x, spec)
    assert q.tolist() == [-1.0, 2.0]
    check_half_scale_error(view, q, scale, zero_point, spec, all_inside=False, within_half_step=True)


@pytest.mark.parametrize("granularity", ["tensor", "sample", "channel", "group:2", "group:4"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_all_zero_input_gives_exact_zeros(granularity, symmetric, bits):
    """An empty range (all zeros) maps to exact zeros, with no NaN from 0/0."""
    x = torch.zeros(2, 4, 3, 3)
    q = quantize_minmax(x, spec_of(bits, symmetric, granularity))
    assert torch.equal(q, x)
    w = torch.zeros(4, 4, 3, 3)
    if granularity != "sample":
        assert torch.equal(quantize_minmax(w, spec_of(bits, symmetric, granularity), weight=True), w)


@pytest.mark.parametrize("constant", [1.0, -1.0, 0.3, -7.25, 1e-20, -3e25, 12345.678])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 8, 16])
def test_constant_input_reproduced_within_half_scale(constant, symmetric, bits):
    """A constant tensor (degenerate range lo == hi) comes back exactly or within scale/2."""
    x = torch.full((2, 4, 3, 3), constant)
    for granularity in ("tensor", "sample", "channel", "group:2"):
        spec = spec_of(bits, symmetric, granularity)
        q = quantize_minmax(x, spec)
        view, _, scale, _ = reference_qparams(x, spec)
        err = (q.reshape(view.shape).double() - view.double()).abs()
        assert (err <= scale.double() / 2 + float_slack(view.double(), view.double())).all()
        # and the constant is the top (or bottom) of the grid, so it is hit up to float rounding
        assert torch.allclose(q, x, rtol=1e-5, atol=0)


def test_round_ste_passes_gradient_one():
    """round_ste rounds forward and is the identity backward (straight-through estimator)."""
    x = torch.tensor([-2.5, -1.4, -0.5, 0.0, 0.49, 0.51, 1.5, 3.7], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y.detach(), torch.round(x.detach()))
    y.backward(torch.arange(1.0, 9.0))
    assert torch.equal(x.grad, torch.arange(1.0, 9.0))


def test_quantize_minmax_gradient_is_straight_through():
    """Gradients pass unchanged through fake quantization for in-range values (scale is detached)."""
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1), requires_grad=True)
    quantize_minmax(x, spec_of(4, False, "channel")).sum().backward()
    assert torch.allclose(x.grad, torch.ones_like(x))


def test_quant_spec_bit_range():
    """bits outside 2..16 (other than 32 = float) are rejected at construction."""
    tensor = Granularity.parse("tensor")
    for bad in (1, 17, -1, 31, 33):
        with pytest.raises(ValueError):
            QuantSpec(bad, True, tensor)
    for good in (2, 16):
        assert not QuantSpec(good, False, tensor).is_float


@pytest.mark.parametrize("granularity", ["tensor", "sample", "channel", "group:2"])
def test_float_spec_is_identity(granularity):
    """bits=32 means "leave unquantized": quantize_minmax returns the input itself."""
    spec = QuantSpec(FLOAT_BITS, True, Granularity.parse(granularity))
    assert spec.is_float
    x = torch.randn(2, 4, 3, 3)
    assert quantize_minmax(x, spec) is x


@pytest.mark.parametrize("text", ["group:0", "group:-2", "group:", "grp:4", "channels", "group:2.5"])
def test_bad_granularity_text_raises(text):
    """Granularity.parse rejects malformed names instead of guessing."""
    with pytest.raises(ValueError):
        Granularity.parse(text)


def test_group_size_must_divide_channels():
    """group:N on a channel count (or flattened input size) not divisible by N is an error."""
    with pytest.raises(ValueError):
        quantize_minmax(torch.randn(2, 6, 3, 3), spec_of(8, True, "group:4"))
    with pytest.raises(ValueError):
        quantize_minmax(torch.randn(4, 5), spec_of(8, True, "group:2"), weight=True)
    with pytest.raises(ValueError):
        quantize_minmax(torch.randn(4, 5), spec_of(8, True, "sample"), weight=True)


# ---------------------------------------------------------------------------------------------
# observers

OBSERVER_GRANULARITIES = [
    ("tensor", 1, False),
    ("channel", 1, False),
    ("group:2", 1, False),
    ("channel", -1, False),
    ("channel", 0, True),
    ("group:3", 0, True),
]


def batches_for(channel_dim: int, weight: bool, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if weight:
        return [torch.randn(4, 2, 3, 3, generator=g) * s for s in (1.0, 3.0, 0.5)]
    if channel_dim == 1:
        return [
            torch.randn(n, 6, 4, 4, generator=g) * s + o for n, s, o in ((2, 1.0, 0.0), (3, 2.0, 0.5), (1, 0.5, -1.0))
        ]
    return [torch.randn(n, 5, 6, generator=g) * s + o for n, s, o in ((2, 1.0, 0.0), (3, 2.0, 0.5), (1, 0.5, -1.0))]


@pytest.mark.parametrize("granularity,channel_dim,weight", OBSERVER_GRANULARITIES)
@pytest.mark.parametrize("symmetric", [True, False])
def test_minmax_observer_matches_global_min_max(granularity, channel_dim, weight, symmetric):
    """minmax over several batches equals qparams of the min/max over all observed data."""
    spec = spec_of(6, symmetric, granularity)
    observer = MinMaxObserver(spec, channel_dim=channel_dim, weight=weight)
    batches = batches_for(channel_dim, weight)
    for b in batches:
        observer.observe(b)
    if weight:  # same-shape weights: min/max over observations commute with min/max over a group
        lo_all, hi_all = torch.stack(batches).amin(0), torch.stack(batches).amax(0)
        view_lo, dims = stats_view(lo_all, spec.granularity, weight=True)
        view_hi, _ = stats_view(hi_all, spec.granularity, weight=True)
        expected = qparams(view_lo.amin(dims, keepdim=True), view_hi.amax(dims, keepdim=True), spec)
    else:  # activations: every static granularity reduces over the batch dim, so concatenate
        _, _, *expected = reference_qparams(torch.cat(batches), spec, channel_dim=channel_dim)
    scale, zero_point = observer.qparams()
    assert torch.equal(scale, expected[0]) and torch.equal(zero_point, expected[1])


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group:3"])
def test_ema_observer_moves_by_one_minus_momentum(momentum, granularity):
    """ema_minmax starts at the first range and then moves (1 - momentum) of the way to each new one."""
    spec = spec_of(8, False, granularity)
    observer = MovingAverageMinMaxObserver(spec, channel_dim=1, momentum=momentum)
    g = torch.Generator().manual_seed(3)
    first = torch.randn(2, 6, 4, 4, generator=g)
    observer.observe(first)
    view, dims = stats_view(first, spec.granularity)
    assert torch.equal(observer.lo, view.amin(dims, keepdim=True)) and torch.equal(
        observer.hi, view.amax(dims, keepdim=True)
    )
    for scale in (5.0, 0.1):
        batch = torch.randn(3, 6, 4, 4, generator=g) * scale
        old_lo, old_hi = observer.lo.clone(), observer.hi.clone()
        observer.observe(batch)
        view, dims = stats_view(batch, spec.granularity)
        new_lo, new_hi = view.amin(dims, keepdim=True), view.amax(dims, keepdim=True)
        assert torch.allclose(observer.lo - old_lo, (1 - momentum) * (new_lo - old_lo), atol=1e-6)
        assert torch.allclose(observer.hi - old_hi, (1 - momentum) * (new_hi - old_hi), atol=1e-6)
    expected = qparams(observer.lo, observer.hi, spec)
    got = observer.qparams()
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.parametrize("momentum", [1.0, -0.1, 1.5])
def test_ema_observer_rejects_bad_momentum(momentum):
    """A momentum outside [0, 1) would never move (or diverge): rejected."""
    with pytest.raises(ValueError):
        MovingAverageMinMaxObserver(spec_of(8, True, "tensor"), momentum=momentum)


def student_t(shape, df: float, seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_t(df, size=shape).astype(np.float32))


def l2_error(x: torch.Tensor, scale, zero_point, spec, **kw) -> float:
    from modiff_quant.quant import fake_quantize_grouped

    return (fake_quantize_grouped(x, scale, zero_point, spec, **kw) - x).double().pow(2).sum().item()


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group:2"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_mse_observer_clips_no_wider_and_lowers_l2_error(granularity, symmetric, bits):
    """mse never widens the min-max range and, on the data it searched, never loses to min-max."""
    spec = spec_of(bits, symmetric, granularity)
    # Each scale group keeps <= max_values values, so the search uses all the data here.
    batches = [student_t((2, 4, 8, 8), df=2.0, seed=s) for s in range(3)]
    mse, minmax = LpSearchObserver(spec, grid=50), MinMaxObserver(spec)
    for b in batches:
        mse.observe(b)
        minmax.observe(b)
    s_mse, z_mse = mse.qparams()
    s_mm, z_mm = minmax.qparams()
    assert s_mse.shape == s_mm.shape
    assert (s_mse <= s_mm * (1 + 1e-6)).all(), "mse chose a clipping range wider than min-max"
    # the chosen clipping range lies inside the min-max one (up to one step of zero-point rounding)
    lo_mse, hi_mse = s_mse * (spec.qmin - z_mse), s_mse * (spec.qmax - z_mse)
    lo_mm, hi_mm = s_mm * (spec.qmin - z_mm), s_mm * (spec.qmax - z_mm)
    assert (hi_mse - lo_mse <= (hi_mm - lo_mm) * (1 + 1e-6)).all()
    data = torch.cat(batches)
    err_mse, err_mm = l2_error(data, s_mse, z_mse, spec), l2_error(data, s_mm, z_mm, spec)
    assert err_mse <= err_mm * (1 + 1e-6)
    if bits <= 4:  # heavy tails: clipping must actually pay off at low bit-widths
        assert err_mse < 0.9 * err_mm


def test_mse_observer_beats_minmax_on_unseen_heavy_tailed_data():
    """With subsampling (more values than max_values) mse still wins on held-out Student-t data."""
    spec = spec_of(4, False, "channel")
    mse, minmax = LpSearchObserver(spec, max_values=512), MinMaxObserver(spec)
    for s in range(4):
        batch = student_t((4, 3, 16, 16), df=3.0, seed=100 + s)
        mse.observe(batch)
        minmax.observe(batch)
    held_out = student_t((4, 3, 16, 16), df=3.0, seed=999)
    assert l2_error(held_out, *mse.qparams(), spec) < l2_error(held_out, *minmax.qparams(), spec)


@pytest.mark.parametrize("name", ["minmax", "ema_minmax", "mse"])
def test_observer_rejects_sample_granularity(name):
    """`sample` scales change with every batch item, so they cannot be static: ValueError."""
    with pytest.raises(ValueError, match="sample"):
        OBSERVERS.get(name)(spec_of(8, True, "sample"), channel_dim=1)


@pytest.mark.parametrize("name", ["minmax", "ema_minmax", "mse"])
def test_observer_qparams_before_observe_raises(name):
    """Asking for parameters before any calibration data is a usage error, not silent garbage."""
    observer = OBSERVERS.get(name)(spec_of(8, True, "tensor"), channel_dim=1)
    assert not observer.observed
    with pytest.raises(RuntimeError):
        observer.qparams()


# ---------------------------------------------------------------------------------------------
# ObservedActivationQuantizer and the static base quantizer


@pytest.mark.parametrize("observer", ["minmax", "ema_minmax", "mse"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [1, 2, 3, 6])
def test_observed_activation_quantizer_group_granularity(observer, symmetric, group):
    """group:N static activation scales: one per group of N channels, error <= s/2 inside the range."""
    spec = spec_of(4, symmetric, f"group:{group}")
    quantizer = ObservedActivationQuantizer(spec, 1, observer)
    g = torch.Generator().manual_seed(7)
    calib = [torch.randn(2, 6, 5, 5, generator=g) * torch.linspace(0.1, 10, 6).view(1, 6, 1, 1) for _ in range(3)]
    for b in calib:
        quantizer.observe(b)
    with pytest.raises(RuntimeError):
        quantizer(calib[0])
    quantizer.freeze()
    assert quantizer.scale.shape == (1, 6 // group, 1, 1, 1)
    # quantize both a calibration batch and one of a different batch and spatial size
    for x in (calib[0], torch.randn(3, 6, 2, 7, generator=g)):
        q = quantizer(x)
        assert q.shape == x.shape and torch.isfinite(q).all()
        view, _ = stats_view(x, spec.granularity, channel_dim=1)
        inside = check_half_scale_error(
            view, q.reshape(view.shape), quantizer.scale, quantizer.zero_point, spec, all_inside=False
        )
        assert inside.any()
        if observer == "minmax" and x is calib[0]:
            err = (view - q.reshape(view.shape)).abs()
            assert (err <= quantizer.scale / 2 + float_slack(view, q.reshape(view.shape))).all()


def test_observed_activation_quantizer_raises_before_freeze():
    """Using a static quantizer before convert() froze its scale is an error, not a pass-through."""
    quantizer = ObservedActivationQuantizer(spec_of(8, True, "group:2"), 1)
    with pytest.raises(RuntimeError):
        quantizer(torch.randn(1, 4, 2, 2))
    quantizer.observe(torch.randn(1, 4, 2, 2))
    with pytest.raises(RuntimeError):
        quantizer(torch.randn(1, 4, 2, 2))


def test_observed_activation_quantizer_float_spec_passes_through():
    """A float spec needs no observer and returns activations unchanged."""
    quantizer = ObservedActivationQuantizer(QuantSpec(FLOAT_BITS, True, Granularity.parse("channel")), 1)
    x = torch.randn(2, 3, 4, 4)
    quantizer.observe(x)
    quantizer.freeze()
    assert quantizer(x) is x


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group:3", "group:9", "group:18"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_static_quantizer_conv_weight(granularity, symmetric, bits):
    """`static` quantizes a conv weight per tensor / output channel / input group within s/2."""
    spec = spec_of(bits, symmetric, granularity)
    w = torch.randn(8, 2, 3, 3, generator=torch.Generator().manual_seed(11)) * torch.logspace(-2, 1, 8).view(
        8, 1, 1, 1
    )
    q = StaticQuantizer().quantize_weight(w, spec)
    assert q.shape == w.shape and torch.isfinite(q).all()
    view, dims, scale, zero_point = reference_qparams(w, spec, weight=True)
    assert torch.equal(q, quantize_minmax(w, spec, weight=True))
    check_half_scale_error(
        view, q.reshape(view.shape), scale, zero_point, spec, all_inside=symmetric, within_half_step=True
    )
    for row in rows_per_group(q.reshape(view.shape), dims):
        assert torch.unique(row).numel() <= 2**bits


@pytest.mark.parametrize("granularity", ["channel", "group:9"])
def test_static_quantizer_mse_weight_within_half_scale_inside_range(granularity):
    """`static` with the mse observer clips weights but keeps error <= s/2 inside its range."""
    spec = spec_of(4, False, granularity)
    w = student_t((8, 2, 3, 3), df=2.0, seed=5)
    quantizer = StaticQuantizer(observer="mse")
    q = quantizer.quantize_weight(w, spec)
    observer = LpSearchObserver(spec, channel_dim=0, weight=True)
    observer.observe(w)
    scale, zero_point = observer.qparams()
    view, _ = stats_view(w, spec.granularity, weight=True)
    check_half_scale_error(view, q.reshape(view.shape), scale, zero_point, spec, all_inside=False)
    assert (q - w).pow(2).sum() <= (quantize_minmax(w, spec, weight=True) - w).pow(2).sum()


def test_static_quantizer_float_weight_and_unknown_observer():
    """A float weight spec leaves the weight alone; an unknown observer fails at construction."""
    w = torch.randn(4, 4)
    assert StaticQuantizer().quantize_weight(w, QuantSpec(FLOAT_BITS, True, Granularity.parse("channel"))) is w
    with pytest.raises(KeyError, match="minmax"):
        StaticQuantizer(observer="minmx")


def test_fake_quantize_clamps_outside_range():
    """Values beyond the clipping range saturate at the range ends (no wrap-around)."""
    spec = spec_of(4, True, "tensor")
    scale, zero = torch.tensor(0.5), torch.tensor(0.0)
    q = fake_quantize(torch.tensor([-100.0, 100.0, 0.26]), scale, zero, spec)
    assert q.tolist() == [spec.qmin * 0.5, spec.qmax * 0.5, 0.5]
