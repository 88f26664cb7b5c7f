"""Number formats a network can be simulated in: integers, minifloats (FP8 and narrower), OCP MX blocks.

A format here is a definition plus an exact rounding: ``fmt.round(u)`` maps already-scaled values
``u`` to the nearest value the format represents, ties to even, saturating. Quantizers
(:mod:`spaceevo.quant.quantizers`) put a learned or calibrated scale around it; the FP8 ONNX export
(:mod:`spaceevo.quant.fp8_export`) stores the same codes, so simulation and deployment share one
definition.

* :class:`IntFormat`: ``bits``-bit integers, signed symmetric (codes ``-(2**(bits-1) - 1) ..
  2**(bits-1) - 1``, the range of :mod:`spaceevo.quant.lsq`'s weights) or unsigned (``0 .. 2**bits - 1``).
* :class:`FloatFormat`: ExMy minifloats with any exponent bias and an optional sign bit (the
  flexible FP8 of Huang et al., "All-You-Can-Fit 8-Bit Flexible Floating-Point Format for Accurate
  and Memory-Efficient Inference of Deep Neural Networks", 2021), with subnormals and one of three
  conventions for the top exponent: ``ieee`` (infinities and NaNs, as E5M2), ``fn`` (no infinity,
  only the all-ones pattern is NaN, as E4M3FN, ONNX ``FLOAT8E4M3FN``) and ``finite`` (every pattern
  is a number, as the MX FP6 / FP4 elements). Values beyond the largest finite value, infinities
  included, saturate to it, as ONNX ``QuantizeLinear`` / ``Cast`` with ``saturate=1`` (their default)
  do for float8: a network never produces an infinity the deployed model would not. NaN stays NaN.
  E4M3FN and E5M2 (standard biases, signed) round with PyTorch's ``float8_e4m3fn`` /
  ``float8_e5m2`` casts after clamping to the finite range; every other format with the exact
  power-of-two arithmetic of :func:`_round_minifloat`.
* :class:`MxFormat`: OCP Microscaling (MX) v1.0 blocks of ``block_size`` (32) elements sharing one
  E8M0 power-of-two scale ``X = 2**shared_exp`` with ``shared_exp = floor(log2(max|V|)) -
  emax_elem`` clamped to E8M0's ``-127 .. 127``; elements ``V / X`` rounded to the element format,
  values beyond its range clamped to its largest magnitude (spec section 6.3). MXINT8 elements are
  8-bit integers with an implicit scale of ``2**-6`` (``emax_elem = 0``), codes ``-127 .. 127``
  (the code -128 is not produced, as in the symmetric INT8 weights). An all-zero block gets the
  smallest scale, ``2**-127``, and zero elements.

The registry (:func:`get_format`, :func:`format_names`) names the formats; ``get_format`` also reads
minifloat names with an explicit bias or without a sign bit (``fp8_e3m4_b5``, ``ufp8_e4m4``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F

from spaceevo.errors import UsageError

__all__ = [
    "IntFormat",
    "FloatFormat",
    "MxFormat",
    "NumberFormat",
    "SPECIALS",
    "get_format",
    "format_names",
    "register_format",
    "exact_pow2",
]

#: Conventions for a minifloat's top exponent (see the module docstring).
SPECIALS = ("ieee", "fn", "finite")

_E8M0_MIN, _E8M0_MAX = -127, 127


def exact_pow2(exponent: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``2**exponent`` exactly, built from the bits of a float32 (exponent in -126..127) or float64."""
    if dtype == torch.float64:
        return ((exponent.to(torch.int64) + 1023) << 52).view(torch.float64)
    return ((exponent.to(torch.int32) + 127) << 23).view(torch.float32)


def _working_dtype(u: torch.Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class IntFormat:
    """``bits``-bit integer codes: signed symmetric ``-qmax .. qmax`` or unsigned ``0 .. qmax``."""

    bits: int
    signed: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 16:
            raise UsageError(f"integer format bits must be an integer in 2..16, got {self.bits!r}")

    @property
    def name(self) -> str:
        return f"{'' if self.signed else 'u'}int{self.bits}"

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def max_value(self) -> float:
        """The largest code, the magnitude a scale maps a tensor's largest value to."""
        return float(self.qmax)

    @property
    def min_value(self) -> float:
        return -self.max_value if self.signed else 0.0

    def round(self, u: torch.Tensor) -> torch.Tensor:
        """Nearest code (ties to even), clamped to the code range."""
        return torch.round(u).clamp(self.min_value, self.max_value)


@dataclass(frozen=True)
class FloatFormat:
    """A minifloat: sign bit (optional), ``exponent_bits``, ``mantissa_bits``, exponent ``bias``
    (default ``2**(exponent_bits-1) - 1``) and a top-exponent convention from :data:`SPECIALS`."""

    exponent_bits: int
    mantissa_bits: int
    bias: int | None = None
    signed: bool = True
    special: str = "finite"

    def __post_init__(self) -> None:
        if not isinstance(self.exponent_bits, int) or not 1 <= self.exponent_bits <= 8:
            raise UsageError(f"exponent_bits must be an integer in 1..8, got {self.exponent_bits!r}")
        if not isinstance(self.mantissa_bits, int) or not 0 <= self.mantissa_bits <= 10:
            raise UsageError(f"mantissa_bits must be an integer in 0..10, got {self.mantissa_bits!r}")
        if self.special not in SPECIALS:
            raise UsageError(f"special must be one of {', '.join(SPECIALS)}, got {self.special!r}")
        if self.special == "ieee" and self.exponent_bits < 2:
            raise UsageError("special 'ieee' needs at least 2 exponent bits (the top exponent holds inf/NaN)")
        if self.special == "fn" and self.mantissa_bits < 1:
            raise UsageError("special 'fn' needs at least 1 mantissa bit (the all-ones pattern is NaN)")
        if self.bias is None:
            object.__setattr__(self, "bias", 2 ** (self.exponent_bits - 1) - 1)
        if not isinstance(self.bias, int):
            raise UsageError(f"bias must be an integer, got {self.bias!r}")
        if self.min_exponent - self.mantissa_bits < -126 or self.emax > 126:
            raise UsageError(
                f"bias {self.bias} puts e{self.exponent_bits}m{self.mantissa_bits} outside float32's normal range "
                f"(smallest step 2**{self.min_exponent - self.mantissa_bits}, largest exponent {self.emax}); "
                f"allowed: steps from 2**-126, exponents up to 126"
            )

    @property
    def bits(self) -> int:
        return int(self.signed) + self.exponent_bits + self.mantissa_bits

    @property
    def default_bias(self) -> bool:
        return self.bias == 2 ** (self.exponent_bits - 1) - 1

    @property
    def name(self) -> str:
        base = f"{'' if self.signed else 'u'}fp{self.bits}_e{self.exponent_bits}m{self.mantissa_bits}"
        return base if self.default_bias else f"{base}_b{self.bias}"

    @property
    def min_exponent(self) -> int:
        """Exponent of the smallest normal value, which subnormals share: ``1 - bias``."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """Exponent of the largest finite value."""
        top = 2**self.exponent_bits - 1
        return top - 1 - self.bias if self.special == "ieee" else top - self.bias

    @property
    def max_value(self) -> float:
        """The largest finite value: what values beyond it saturate to."""
        mantissa = 2 ** (-self.mantissa_bits) * (2 if self.special == "fn" else 1)
        return (2.0 - mantissa) * 2.0**self.emax

    @property
    def min_value(self) -> float:
        return -self.max_value if self.signed else 0.0

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """PyTorch's dtype of exactly this format (E4M3FN, E5M2), or None."""
        if not self.signed or not self.default_bias:
            return None
        known = {(4, 3, "fn"): torch.float8_e4m3fn, (5, 2, "ieee"): torch.float8_e5m2}
        return known.get((self.exponent_bits, self.mantissa_bits, self.special))

    def round(self, u: torch.Tensor) -> torch.Tensor:
        """Nearest representable value (ties to even, subnormals kept), saturating at ``+-max_value``."""
        dtype = self.torch_dtype
        if dtype is None:
            return _round_minifloat(u, self)
        return u.clamp(-self.max_value, self.max_value).to(dtype).to(u.dtype)


def _round_minifloat(u: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """:meth:`FloatFormat.round` for any format, with exact float arithmetic.

    A value ``a = |u|`` with ``floor(log2 a) = e`` (read from its float bits; at least the smallest
    normal exponent, where the subnormals lie) sits on the grid of step ``2**(e - mantissa_bits)``:
    scaling by a power of two, rounding half to even and scaling back is exact, and a value rounding
    up out of its binade lands on the next binade's first value, which is representable. Infinities
    and values beyond the range saturate through the final clamp; NaN stays NaN.
    """
    work = _working_dtype(u)
    integer, shift, offset = (torch.int64, 52, 1023) if work == torch.float64 else (torch.int32, 23, 127)
    a = u.to(work).abs()
    step = ((a.view(integer) >> shift) - offset).clamp_(fmt.min_exponent, fmt.emax + 1).sub_(fmt.mantissa_bits)
    up = ((offset - step) << shift).view(work)
    down = ((step + offset) << shift).view(work)
    q = a.mul_(up).round_().mul_(down).clamp_max_(fmt.max_value)
    q = q.copysign_(u.to(work)) if fmt.signed else q.masked_fill_(u < 0, 0.0)
    return q.to(u.dtype)


ElementFormat = Union[IntFormat, FloatFormat]


@dataclass(frozen=True)
class MxFormat:
    """An OCP MX format: blocks of ``block_size`` elements of ``element`` sharing an E8M0 scale."""

    element: ElementFormat
    block_size: int = 32

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise UsageError(f"block_size must be a positive integer, got {self.block_size!r}")
        if isinstance(self.element, IntFormat) and not self.element.signed:
            raise UsageError("MX integer elements are signed")

    @property
    def name(self) -> str:
        element = self.element
        if isinstance(element, IntFormat):
            base = f"mxint{element.bits}"
        else:
            base = f"mxfp{element.bits}" + ("" if element.bits == 4 else f"_e{element.exponent_bits}m{element.mantissa_bits}")
        return base if self.block_size == 32 else f"{base}_k{self.block_size}"

    @property
    def bits(self) -> int:
        """Bits per element, the shared scale not counted (it adds ``8 / block_size``)."""
        return self.element.bits

    @property
    def emax_elem(self) -> int:
        """Exponent of the element format's largest normal value (0 for integers, read as fixed point)."""
        return 0 if isinstance(self.element, IntFormat) else self.element.emax

    @property
    def _element_step(self) -> float:
        """The implicit scale of an integer element (``2**-(bits-2)``, 2**-6 for MXINT8); 1 for floats."""
        return 2.0 ** -(self.element.bits - 2) if isinstance(self.element, IntFormat) else 1.0

    def shared_exponents(self, blocks: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """The E8M0 exponent of each block (along ``dim``, kept as size 1): ``floor(log2 max|V|) -
        emax_elem`` in ``-127 .. 127``; -127 for an all-zero block."""
        return self._shared(blocks.abs().amax(dim=dim, keepdim=True))

    def _shared(self, amax: torch.Tensor) -> torch.Tensor:
        _, exponent = torch.frexp(amax)
        shared = (exponent - 1 - self.emax_elem).clamp(_E8M0_MIN, _E8M0_MAX)
        return torch.where(amax == 0, torch.full_like(shared, _E8M0_MIN), shared)

    def quantize_blocks(self, blocks: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Quantize-dequantize each block (along ``dim``, any length); a block holding inf or NaN is NaN.

        Computed in float32 (float64 for float64 input): the scales ``2**shared_exp`` and the
        element steps are powers of two whose products with the elements stay representable (down
        to 2**-143 for E5M2 elements under the smallest scale), so every step is exact.
        """
        work = blocks.to(_working_dtype(blocks))
        amax = work.abs().amax(dim=dim, keepdim=True)
        scale = exact_pow2(self._shared(amax), torch.float64).to(work.dtype) * self._element_step
        q = self.element.round(work / scale).mul_(scale)
        return q.masked_fill_(~torch.isfinite(amax), float("nan")).to(blocks.dtype)

    def quantize(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        """Quantize-dequantize ``x`` in blocks of consecutive elements along ``axis`` (the last block
        of a row may be shorter: it is padded with zeros, which never change a block's scale)."""
        axis = axis % x.dim()
        length = x.shape[axis]
        pad = (-length) % self.block_size
        if pad:
            x = torch.cat([x, x.new_zeros(x.shape[:axis] + (pad,) + x.shape[axis + 1 :])], dim=axis)
        shape = x.shape
        blocks = x.reshape(shape[:axis] + (-1, self.block_size) + shape[axis + 1 :])
        q = self.quantize_blocks(blocks, dim=axis + 1).reshape(shape)
        return q.narrow(axis, 0, length) if pad else q


NumberFormat = Union[IntFormat, FloatFormat, MxFormat]

_REGISTRY: dict[str, NumberFormat] = {}


def register_format(name: str, fmt: NumberFormat) -> NumberFormat:
    """Add ``fmt`` to the registry under ``name``; a name is registered once."""
    if name in _REGISTRY:
        raise ValueError(f"format {name!r} is already registered")
    _REGISTRY[name] = fmt
    return fmt


def format_names() -> tuple[str, ...]:
    """The registered format names, in registration order."""
    return tuple(_REGISTRY)


_MINIFLOAT = re.compile(r"^(u?)fp(\d+)_e(\d+)m(\d+)(?:_b(-?\d+))?$")


def get_format(name: str) -> NumberFormat:
    """The format called ``name``: a registered name, or a minifloat ``[u]fpN_eXmY[_bB]`` (N the total
    bits, ``u`` without sign bit, ``B`` the exponent bias; no infinities or NaNs). :class:`UsageError`
    naming the allowed values otherwise."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    match = _MINIFLOAT.match(name)
    if match:
        unsigned, total, exponent, mantissa, bias = match.groups()
        fmt = FloatFormat(int(exponent), int(mantissa), None if bias is None else int(bias), signed=not unsigned)
        if fmt.bits != int(total):
            raise UsageError(f"format {name!r}: e{exponent}m{mantissa} {'without' if unsigned else 'with'} sign has {fmt.bits} bits, not {total}")
        return fmt
    raise UsageError(
        f"unknown format {name!r}; allowed: {', '.join(_REGISTRY)}, or a minifloat [u]fpN_eXmY[_bBIAS] "
        f"(e.g. fp8_e3m4_b5, ufp8_e4m4)"
    )


for _bits in (4, 6, 8):
    register_format(f"int{_bits}", IntFormat(_bits))
register_format("fp8_e4m3", FloatFormat(4, 3, special="fn"))
register_format("fp8_e5m2", FloatFormat(5, 2, special="ieee"))
for _e, _m in ((3, 4), (2, 5), (2, 1), (2, 2), (3, 1), (3, 2), (2, 3), (3, 3), (4, 2)):
    _fmt = FloatFormat(_e, _m)
    register_format(_fmt.name, _fmt)
register_format("mxint8", MxFormat(IntFormat(8)))
register_format("mxfp8_e4m3", MxFormat(FloatFormat(4, 3, special="fn")))
register_format("mxfp8_e5m2", MxFormat(FloatFormat(5, 2, special="ieee")))
register_format("mxfp6_e3m2", MxFormat(FloatFormat(3, 2)))
register_format("mxfp6_e2m3", MxFormat(FloatFormat(2, 3)))
register_format("mxfp4", MxFormat(FloatFormat(2, 1)))
