"""Number formats (spaceevo.quant.formats): every format's rounding against an exhaustive table of
its representable values, decoded here bit pattern by bit pattern from the format's definition."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch

from spaceevo.errors import UsageError
from spaceevo.quant.formats import FloatFormat, IntFormat, MxFormat, _round_minifloat, format_names, get_format

FLOAT_NAMES = [n for n in format_names() if isinstance(get_format(n), FloatFormat)]
INT_NAMES = [n for n in format_names() if isinstance(get_format(n), IntFormat)]
MX_NAMES = [n for n in format_names() if isinstance(get_format(n), MxFormat)]
# formats that only the parser reaches: another bias, no sign bit (flexible FP8)
EXTRA_FLOATS = ["fp8_e3m4_b5", "fp8_e4m3_b10", "ufp8_e4m4", "ufp8_e5m3_b12", "fp6_e3m2_b1"]


def decode(fmt: FloatFormat, pattern: int) -> float:
    """The value of one bit pattern: sign | exponent | mantissa, by the format's definition."""
    m_bits, e_bits = fmt.mantissa_bits, fmt.exponent_bits
    mantissa = pattern & ((1 << m_bits) - 1)
    exponent = (pattern >> m_bits) & ((1 << e_bits) - 1)
    negative = fmt.signed and (pattern >> (m_bits + e_bits)) & 1
    top = (1 << e_bits) - 1
    if fmt.special == "ieee" and exponent == top:
        value = math.inf if mantissa == 0 else math.nan
    elif fmt.special == "fn" and exponent == top and mantissa == (1 << m_bits) - 1:
        value = math.nan
    elif exponent == 0:
        value = mantissa / 2**m_bits * 2.0 ** (1 - fmt.bias)
    else:
        value = (1 + mantissa / 2**m_bits) * 2.0 ** (exponent - fmt.bias)
    return -value if negative else value


def table(fmt: FloatFormat) -> np.ndarray:
    """Every finite value of the format, sorted, without duplicates (+0 and -0 are one)."""
    values = {decode(fmt, p) for p in range(2**fmt.bits)}
    return np.array(sorted(v for v in values if math.isfinite(v)), dtype=np.float64)


def nearest_even(values: np.ndarray, fmt: FloatFormat, x: np.ndarray) -> np.ndarray:
    """The reference rounding: nearest table entry, ties to the one with an even mantissa, saturating."""
    x = np.clip(x, values[0], values[-1])
    index = np.searchsorted(values, x).clip(1, len(values) - 1)
    low, high = values[index - 1], values[index]
    pick_high = (x - low) > (high - x)
    tie = (x - low) == (high - x)
    even_high = np.array([_mantissa_even(fmt, v) for v in high])
    pick_high = pick_high | (tie & even_high)
    out = np.where(pick_high, high, low)
    return np.where(np.isin(x, values), x, out)


def _mantissa_even(fmt: FloatFormat, value: float) -> bool:
    for pattern in range(2**fmt.bits):
        if decode(fmt, pattern) == value:
            return pattern & 1 == 0
    raise AssertionError(value)


def rounded(fmt: FloatFormat, x: np.ndarray) -> np.ndarray:
    return fmt.round(torch.from_numpy(x.astype(np.float32))).double().numpy()


@pytest.mark.parametrize("name", FLOAT_NAMES + EXTRA_FLOATS)
def test_minifloat_rounding_equals_its_exhaustive_table(name: str) -> None:
    fmt = get_format(name)
    values = table(fmt)
    assert values[-1] == fmt.max_value and values[0] == fmt.min_value
    # (a) every representable value comes back exactly
    assert np.array_equal(rounded(fmt, values), values)
    # (b) midpoints between neighbours round to the even mantissa
    midpoints = (values[:-1] + values[1:]) / 2
    assert np.array_equal(rounded(fmt, midpoints), nearest_even(values, fmt, midpoints))
    # and a hair either side of a midpoint goes to the nearer neighbour
    below = np.nextafter(midpoints.astype(np.float32), -np.inf).astype(np.float64)
    above = np.nextafter(midpoints.astype(np.float32), np.inf).astype(np.float64)
    assert np.array_equal(rounded(fmt, below), values[:-1])
    assert np.array_equal(rounded(fmt, above), values[1:])
    # (c) beyond the largest value (infinities too) saturates; NaN stays NaN
    far = np.array([fmt.max_value * 1.01, fmt.max_value * 1e6, np.inf, -fmt.max_value * 3, -np.inf])
    expected = np.array([fmt.max_value] * 3 + [fmt.min_value] * 2)
    assert np.array_equal(rounded(fmt, far), expected)
    assert np.isnan(rounded(fmt, np.array([np.nan]))).all()
    # (d) random values across the range round to the nearest entry
    rng = np.random.default_rng(0)
    span = np.concatenate([rng.uniform(values[0], values[-1], 4000), rng.standard_normal(4000) * 2.0 ** -fmt.bias])
    span = span.astype(np.float32).astype(np.float64)
    assert np.array_equal(rounded(fmt, span), nearest_even(values, fmt, span))


@pytest.mark.parametrize(
    "name,library",
    [
        ("fp8_e4m3", ml_dtypes.float8_e4m3fn),
        ("fp8_e5m2", ml_dtypes.float8_e5m2),
        ("fp6_e3m2", ml_dtypes.float6_e3m2fn),
        ("fp6_e2m3", ml_dtypes.float6_e2m3fn),
        ("fp4_e2m1", ml_dtypes.float4_e2m1fn),
    ],
)
def test_rounding_agrees_with_ml_dtypes_and_the_generic_path_with_torch(name: str, library: type) -> None:
    fmt = get_format(name)
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(20000) * rng.choice([1e-3, 0.1, 1.0, fmt.max_value / 4], 20000)).astype(np.float32)
    x = np.clip(x, fmt.min_value, fmt.max_value)
    reference = x.astype(library).astype(np.float32)
    assert np.array_equal(fmt.round(torch.from_numpy(x)).numpy(), reference)
    # the hand-written rounding gives the same values as PyTorch's float8 casts where both exist
    assert torch.equal(_round_minifloat(torch.from_numpy(x), fmt), torch.from_numpy(reference))


def test_torch_float8_casts_are_used_for_the_onnx_formats() -> None:
    assert get_format("fp8_e4m3").torch_dtype == torch.float8_e4m3fn
    assert get_format("fp8_e5m2").torch_dtype == torch.float8_e5m2
    assert get_format("fp8_e4m3_b8").torch_dtype is None and get_format("fp8_e3m4").torch_dtype is None


def test_format_definitions_give_the_published_ranges() -> None:
    assert get_format("fp8_e4m3").max_value == 448 and get_format("fp8_e5m2").max_value == 57344
    assert get_format("fp4_e2m1").max_value == 6 and get_format("fp6_e3m2").max_value == 28
    assert get_format("fp6_e2m3").max_value == 7.5
    # subnormals: E4M3's smallest positive value is 2**-9, E5M2's 2**-16
    assert table(get_format("fp8_e4m3"))[table(get_format("fp8_e4m3")) > 0][0] == 2.0**-9
    assert table(get_format("fp8_e5m2"))[table(get_format("fp8_e5m2")) > 0][0] == 2.0**-16
    # a larger bias shifts the whole table down by a power of two
    assert np.array_equal(table(get_format("fp8_e3m4_b5")), table(get_format("fp8_e3m4")) / 4)
    unsigned = get_format("ufp8_e4m4")
    assert unsigned.bits == 8 and table(unsigned)[0] == 0 and unsigned.round(torch.tensor([-3.0])).item() == 0


@pytest.mark.parametrize("name", INT_NAMES)
def test_integer_codes_and_clamping(name: str) -> None:
    fmt = get_format(name)
    codes = np.arange(-fmt.qmax, fmt.qmax + 1, dtype=np.float32)
    x = torch.from_numpy(codes)
    assert torch.equal(fmt.round(x), x)
    assert torch.equal(fmt.round(x + 0.5), torch.round(x + 0.5).clamp(-fmt.qmax, fmt.qmax))  # ties to even
    assert fmt.round(torch.tensor([fmt.qmax + 0.6, -fmt.qmax - 9.0])).tolist() == [fmt.qmax, -fmt.qmax]
    assert fmt.qmax == 2 ** (fmt.bits - 1) - 1


def mx_reference(fmt: MxFormat, block: np.ndarray) -> tuple[int, np.ndarray]:
    """The OCP MX v1.0 conversion (section 6.3), element by element in plain Python."""
    amax = float(np.max(np.abs(block)))
    if amax == 0:
        shared = -127
    else:
        shared = max(-127, min(127, math.floor(math.log2(amax)) - fmt.emax_elem))
    scale = 2.0**shared
    element = fmt.element
    if isinstance(element, IntFormat):
        step = 2.0 ** -(element.bits - 2)
        codes = [max(-element.qmax, min(element.qmax, round(v / scale / step))) for v in block]
        return shared, np.array([c * step * scale for c in codes])
    values = table(element)
    return shared, nearest_even(values, element, block.astype(np.float64) / scale) * scale


@pytest.mark.parametrize("name", MX_NAMES)
def test_mx_blocks_match_the_spec_conversion(name: str) -> None:
    fmt = get_format(name)
    rng = np.random.default_rng(2)
    blocks = [rng.standard_normal(32) * 10.0 ** rng.uniform(-6, 4) for _ in range(40)]
    outlier = rng.standard_normal(32) * 0.01
    outlier[7] = 5000.0
    blocks += [np.zeros(32), outlier, np.full(32, -3.0), np.linspace(-1, 1, 32) * 2.0**-120]
    x = torch.tensor(np.stack(blocks), dtype=torch.float32)
    shared = fmt.shared_exponents(x.double()).squeeze(-1).tolist()
    q = fmt.quantize(x, axis=1).double().numpy()
    for index, block in enumerate(x.double().numpy()):
        expected_shared, expected = mx_reference(fmt, block)
        assert shared[index] == expected_shared, index
        assert np.array_equal(q[index], expected), index
    assert np.array_equal(q[40], np.zeros(32)) and shared[40] == -127
    # the outlier keeps its magnitude (within the element's relative precision); the rest shrink
    assert abs(q[41][7] - 5000.0) <= 5000.0 * 2.0 ** -(fmt.element.bits - 3)


def test_mx_blocks_run_along_an_axis_and_pad_the_last_block() -> None:
    fmt = get_format("mxfp8_e4m3")
    x = torch.randn(2, 40, 3, 3)
    q = fmt.quantize(x, axis=1)
    assert q.shape == x.shape
    manual = fmt.quantize(x.movedim(1, -1).reshape(-1, 40), axis=1).reshape(2, 3, 3, 40).movedim(-1, 1)
    assert torch.equal(q, manual)
    # elements 32..39 form a block of their own: scaling them leaves the first block unchanged
    y = x.clone()
    y[:, 32:] *= 1000
    assert torch.equal(fmt.quantize(y, axis=1)[:, :32], q[:, :32])


def test_unknown_and_inconsistent_names_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="allowed: int4, int6, int8, fp8_e4m3"):
        get_format("fp9")
    with pytest.raises(UsageError, match="has 8 bits, not 7"):
        get_format("fp7_e4m3")
    with pytest.raises(UsageError, match="special must be one of ieee, fn, finite"):
        FloatFormat(4, 3, special="nan")
    with pytest.raises(UsageError, match="outside float32"):
        get_format("fp8_e5m2_b200")


@pytest.mark.parametrize("name", MX_NAMES)
def test_mx_in_float32_equals_mx_in_float64(name: str) -> None:
    """Blocks from 2**-140 to 2**120: the float32 computation is exact, as the float64 one."""
    fmt = get_format(name)
    generator = torch.Generator().manual_seed(3)
    magnitude = torch.exp2(torch.randint(-140, 120, (500, 1), generator=generator).float())
    x = torch.randn(500, 32, generator=generator) * magnitude
    assert torch.equal(fmt.quantize_blocks(x), fmt.quantize_blocks(x.double()).float())
