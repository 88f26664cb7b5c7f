"""Block kinds: one declarative definition per kind of block, and the concrete blocks made of them.

A :class:`BlockKind` (``mbv2``, ``resnet``, ...) declares once, as a tuple of :class:`Layer` s, the
main path of its blocks, what its expand ratio multiplies, and the default :class:`BlockOptions`
(activation, squeeze-and-excitation, residual rule, K3 depthwise). A :class:`BlockVariant` is a kind
with options: a hyperspace YAML names variants under ``block_types`` (``mbv2_k3: {kind: mbv2,
dw_k3: true, ...}``). A :class:`BlockSpec` is one concrete block of a network.

The static network (:mod:`spaceevo.nn.static`), the elastic supernet (:mod:`spaceevo.nn.elastic`),
MAC and parameter counting (:mod:`spaceevo.nn.cost`) and latency segments all build from
:meth:`BlockVariant.layers`, the residual rule from :meth:`BlockVariant.shortcut`: a new kind is one
:func:`register_block_kind` call here. Torch-free, so :mod:`spaceevo.space` can build on it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

#: Activations a block or the head may use.
ACTIVATIONS = ("relu", "relu6", "hswish", "swish", "none")

#: Residual rules: no shortcut; one on every block but a stage's first (inverted residuals);
#: one on every block, through a 1x1 projection where the shape changes (ResNet).
RESIDUALS = ("none", "after_first", "always")

#: What an expand ratio multiplies: the block's input width (inverted residuals), its output width
#: (ResNet bottlenecks), or nothing (``e0``).
EXPAND_OF = ("input", "output", "none")


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` without losing more than 10%."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def se_channels(channels: int) -> int:
    """Squeeze width of an SE gate on ``channels`` (a quarter, rounded to a multiple of 8)."""
    return make_divisible(channels / 4)


def conv_output_size(size: int, stride: int) -> int:
    """Spatial size after a 'same'-padded conv (odd kernel) with this stride."""
    return (size - 1) // stride + 1


def stacked_convs(kernel: int) -> int:
    """How many 3x3 depthwise convs realise a ``kernel`` x ``kernel`` one in a K3 variant."""
    return (kernel - 1) // 2


@dataclass(frozen=True)
class Layer:
    """One layer of a block's main path, by role: which widths it maps (``in``, ``mid``, ``out``),
    whether it uses the block's kernel (else 1x1), carries the block's stride, is depthwise, is
    followed by the block's activation, or is the SE gate on its ``cin`` width (kept only with the
    ``se`` option). ``stacked``: a depthwise k x k conv realised as ``stacked_convs(k)`` 3x3 ones."""

    cin: str
    cout: str
    spatial: bool = False
    strided: bool = False
    depthwise: bool = False
    act: bool = False
    se: bool = False
    stacked: bool = False


@dataclass(frozen=True)
class BlockOptions:
    """What a variant may change of its kind: the activation, whether the SE slot holds a gate, the
    residual rule (:data:`RESIDUALS`), and ``dw_k3``: the depthwise k x k conv as stacked 3x3 ones."""

    activation: str
    se: bool = False
    residual: str = "after_first"
    dw_k3: bool = False


#: YAML option keys of a variant, in :class:`BlockOptions` order.
OPTION_KEYS = tuple(f.name for f in fields(BlockOptions))


@dataclass(frozen=True)
class BlockKind:
    """The declaration of one kind of block; see the module docstring."""

    name: str
    summary: str
    body: tuple[Layer, ...]
    expand_of: str
    defaults: BlockOptions
    post_add_act: bool = False  # the activation also follows the residual add (ResNet)

    @property
    def has_se_slot(self) -> bool:
        return any(layer.se for layer in self.body)

    @property
    def has_depthwise(self) -> bool:
        return any(layer.depthwise and layer.spatial for layer in self.body)

    def allowed(self) -> dict[str, tuple]:
        """Allowed values of each option (the SE gate and K3 only where the body has their layer)."""
        return {
            "activation": ACTIVATIONS,
            "se": (False, True) if self.has_se_slot else (False,),
            "residual": RESIDUALS,
            "dw_k3": (False, True) if self.has_depthwise else (False,),
        }

    def variant(self, **options: object) -> "BlockVariant":
        """This kind with ``options`` (keys of :class:`BlockOptions`) replacing the defaults."""
        chosen = replace(self.defaults, **options)
        for key, allowed in self.allowed().items():
            if getattr(chosen, key) not in allowed:
                raise ValueError(f"{self.name}: {key}={getattr(chosen, key)!r} is not allowed; allowed: {allowed}")
        return BlockVariant(self, chosen)


@dataclass(frozen=True)
class BlockVariant:
    """A block kind with its options: what a hyperspace's block type builds."""

    kind: BlockKind
    options: BlockOptions

    @property
    def tag(self) -> str:
        """The variant's computation as a name: the kind, then each option that differs from the
        kind's default (``mbv3_se+swish+residual_always+k3``). Default variants are their kind's name,
        so latency-table keys of the built-in kinds never change."""
        defaults, options = self.kind.defaults, self.options
        parts = [self.kind.name]
        if options.activation != defaults.activation:
            parts.append(options.activation)
        if options.se != defaults.se:
            parts.append("se" if options.se else "no_se")
        if options.residual != defaults.residual:
            parts.append(f"residual_{options.residual}")
        if options.dw_k3:
            parts.append("k3")
        return "+".join(parts)

    @property
    def activation(self) -> str:
        return self.options.activation

    @property
    def se(self) -> bool:
        return self.options.se

    @property
    def expand_of(self) -> str:
        return self.kind.expand_of

    @property
    def post_add_activation(self) -> str:
        """What follows the residual add (always with the sum's quantization point)."""
        return self.activation if self.kind.post_add_act else "none"

    def layers(self) -> tuple[Layer, ...]:
        """The main path, in execution order: the SE slot only with ``se``, the depthwise spatial
        conv marked ``stacked`` with ``dw_k3``."""
        return tuple(
            replace(layer, stacked=self.options.dw_k3 and layer.depthwise and layer.spatial)
            for layer in self.kind.body
            if not layer.se or self.options.se
        )

    def mid_channels(self, in_channels: int, out_channels: int, expand: float) -> int:
        """Width of the expanded (hidden) feature map; 0 for blocks without expansion."""
        if self.expand_of == "input":
            return make_divisible(in_channels * expand)
        if self.expand_of == "output":
            return make_divisible(out_channels * expand)
        return 0

    def shortcut(self, position: int, in_channels: int, out_channels: int, stride: int) -> str:
        """``none``, ``identity`` or ``projection`` (1x1 conv) for the block at ``position`` of its stage."""
        residual = self.options.residual
        if residual == "none" or (residual == "after_first" and position == 0):
            return "none"
        return "identity" if stride == 1 and in_channels == out_channels else "projection"

    def spec(
        self, in_channels: int, out_channels: int, kernel: int, expand: float, stride: int, input_size: int, position: int
    ) -> "BlockSpec":
        """The concrete block at ``position`` of its stage (its shortcut follows from the residual rule)."""
        return BlockSpec(
            variant=self,
            in_channels=in_channels,
            out_channels=out_channels,
            kernel=kernel,
            expand=expand,
            stride=stride,
            input_size=input_size,
            shortcut=self.shortcut(position, in_channels, out_channels, stride),
        )


def format_number(value: float) -> str:
    """Print a ratio the way the published encodings do (``4.0``, ``0.5``, ``0`` for none)."""
    if value == 0:
        return "0"
    return repr(float(value))


@dataclass(frozen=True)
class BlockSpec:
    """One concrete block of a static network: everything needed to build, export, count or time it."""

    variant: BlockVariant
    in_channels: int
    out_channels: int
    kernel: int
    expand: float
    stride: int
    input_size: int  # spatial size (H = W) of the block's input
    shortcut: str  # "none", "identity" or "projection"

    @property
    def block_type(self) -> str:
        """The variant's :attr:`~BlockVariant.tag`."""
        return self.variant.tag

    @property
    def mid_channels(self) -> int:
        return self.variant.mid_channels(self.in_channels, self.out_channels, self.expand)

    @property
    def output_size(self) -> int:
        return conv_output_size(self.input_size, self.stride)

    def widths(self) -> dict[str, int]:
        """The width of each role a :class:`Layer` names."""
        return {"in": self.in_channels, "mid": self.mid_channels, "out": self.out_channels}

    @property
    def key(self) -> str:
        """Stable identity of the block's computation, the latency-table key."""
        return (
            f"{self.block_type}:i{self.in_channels}:o{self.out_channels}:k{self.kernel}"
            f":e{format_number(self.expand)}:s{self.stride}:h{self.input_size}:{self.shortcut}"
        )


# --------------------------------------------------------------------------------------------
# The registry

BLOCK_KINDS: dict[str, BlockKind] = {}


def register_block_kind(kind: BlockKind) -> BlockKind:
    """Add a kind to :data:`BLOCK_KINDS` (its name must be new); hyperspace YAMLs can then name it."""
    if kind.name in BLOCK_KINDS:
        raise ValueError(f"block kind {kind.name!r} is already registered")
    if kind.expand_of not in EXPAND_OF:
        raise ValueError(f"{kind.name}: expand_of {kind.expand_of!r}; allowed: {EXPAND_OF}")
    kind.variant()  # the defaults must be allowed options
    BLOCK_KINDS[kind.name] = kind
    return kind


def block_kind(name: str) -> BlockKind:
    """The registered kind called ``name``; ``KeyError`` names the registered ones."""
    try:
        return BLOCK_KINDS[name]
    except KeyError:
        raise KeyError(f"unknown block kind {name!r}; registered: {', '.join(BLOCK_KINDS)}") from None


_DUAL_SEPARABLE = (
    Layer("in", "in", spatial=True, strided=True, depthwise=True, act=True),
    Layer("in", "out", act=True),
    Layer("out", "out", spatial=True, depthwise=True, act=True),
    Layer("out", "out", act=True),
)
_INVERTED_RESIDUAL = (
    Layer("in", "mid", act=True),
    Layer("mid", "mid", spatial=True, strided=True, depthwise=True, act=True),
    Layer("mid", "mid", se=True),
    Layer("mid", "out"),
)
_BOTTLENECK = (
    Layer("in", "mid", act=True),
    Layer("mid", "mid", spatial=True, strided=True, act=True),
    Layer("mid", "out"),
    Layer("out", "out", se=True),
)
_FUSED = (
    Layer("in", "mid", spatial=True, strided=True, act=True),
    Layer("mid", "mid", se=True),
    Layer("mid", "out"),
)

register_block_kind(BlockKind(
    "conv", "plain conv + BN + activation (stems)",
    (Layer("in", "out", spatial=True, strided=True, act=True),), "none", BlockOptions("relu", residual="none"),
))
register_block_kind(BlockKind(
    "mbv1_dual", "two MobileNetV1 depthwise-separable convs", _DUAL_SEPARABLE, "none", BlockOptions("relu"),
))
register_block_kind(BlockKind(
    "mbv2", "MobileNetV2 inverted residual", _INVERTED_RESIDUAL, "input", BlockOptions("relu6"),
))
register_block_kind(BlockKind(
    "mbv3_se", "MobileNetV3 inverted residual with SE", _INVERTED_RESIDUAL, "input", BlockOptions("hswish", se=True),
))
register_block_kind(BlockKind(
    "resnet", "ResNet bottleneck", _BOTTLENECK, "output", BlockOptions("relu", residual="always"), post_add_act=True,
))
register_block_kind(BlockKind(
    "resnet_se", "ResNet bottleneck with SE", _BOTTLENECK, "output",
    BlockOptions("relu", se=True, residual="always"), post_add_act=True,
))
register_block_kind(BlockKind(
    "fused_mbconv", "EfficientNetV2 FusedMBConv", _FUSED, "input", BlockOptions("swish"),
))
