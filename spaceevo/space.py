"""Hyperspaces, candidate spaces and subnets, with their string encodings.

A *hyperspace* (one YAML file in ``search_spaces/``) offers, for every searchable stage, several block
types and several width windows. A *candidate space* picks one block type and one width window per
searchable stage (``tiny-1111-0000``). A *subnet* picks depth, and per block kernel, width and expand
ratio, plus the input resolution (``d1#2#..._k3#..._w16#..._e0#..._r32``).

This module imports nothing else of spaceevo's but :mod:`spaceevo.errors` and the torch-free block
declarations of :mod:`spaceevo.blocks`: everything else is built on the concrete :class:`BlockSpec`
lists that :meth:`CandidateSpace.resolve` returns. A block type of a hyperspace is a named variant of
a registered block kind (:data:`spaceevo.blocks.BLOCK_KINDS`) with options.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from importlib import resources
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import yaml

from spaceevo.blocks import ACTIVATIONS, BLOCK_KINDS, OPTION_KEYS, BlockSpec, BlockVariant, format_number
from spaceevo.errors import ConfigError, EncodingError, UsageError

SEARCH_SPACES_DIR = Path(str(resources.files("spaceevo.search_spaces")))


# --------------------------------------------------------------------------------------------
# Hyperspace description (validated YAML)


@dataclass(frozen=True)
class BlockTypeSpec:
    """One block type of a hyperspace: a named variant of a block kind, with its elastic choices."""

    name: str
    digit: int
    kernels: tuple[int, ...]
    expand_ratios: tuple[float, ...]
    variant: BlockVariant


@dataclass(frozen=True)
class StageSpec:
    """A stage of the hyperspace: fixed (one block type) or searchable (several)."""

    name: str
    searchable: bool
    block_types: tuple[str, ...]
    widths: tuple[int, ...]
    window: int
    depths: tuple[int, ...]
    stride: int
    kernels: tuple[int, ...] | None = None
    expand_ratios: tuple[float, ...] | None = None
    fixed_block: BlockTypeSpec | None = None

    @property
    def windows(self) -> list[tuple[int, ...]]:
        """Width windows: every run of ``window`` consecutive widths, in order."""
        return [self.widths[i : i + self.window] for i in range(len(self.widths) - self.window + 1)]


@dataclass(frozen=True)
class HeadSpec:
    """Classifier head: 1x1 conv to ``widths[0]``, global pool, 1x1 conv to ``widths[1]``, linear."""

    widths: tuple[int, int]
    activation: str


@dataclass(frozen=True)
class Hyperspace:
    """A validated hyperspace: the set of candidate spaces a space search explores."""

    name: str
    in_channels: int
    resolutions: tuple[int, ...]
    num_classes: int
    block_types: dict[str, BlockTypeSpec] = field(hash=False)
    stages: tuple[StageSpec, ...]
    head: HeadSpec
    source: str = ""
    raw: dict = field(default_factory=dict, compare=False, repr=False, hash=False)

    @property
    def searchable_stages(self) -> list[StageSpec]:
        return [s for s in self.stages if s.searchable]

    @property
    def block_type_by_digit(self) -> dict[int, BlockTypeSpec]:
        return {b.digit: b for b in self.block_types.values()}

    @property
    def digest(self) -> str:
        """Short content hash: artifacts record it so a changed YAML is never mixed up."""
        text = json.dumps(self.raw, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def stage_block_types(self, stage: StageSpec) -> list[BlockTypeSpec]:
        return [self.block_types[name] for name in stage.block_types]

    def candidate_space(self, encoding: str) -> "CandidateSpace":
        """Parse ``<name>-<block digits>-<window digits>`` into a candidate space of this hyperspace."""
        return CandidateSpace.parse(encoding, self)

    def all_candidate_spaces(self) -> Iterable["CandidateSpace"]:
        """Every candidate space, in digit order (only for small hyperspaces)."""
        import itertools

        choices = []
        for stage in self.searchable_stages:
            digits = [self.block_types[b].digit for b in stage.block_types]
            choices.append(digits)
        windows = [range(len(s.windows)) for s in self.searchable_stages]
        for blocks in itertools.product(*choices):
            for wins in itertools.product(*windows):
                yield CandidateSpace(self, tuple(blocks), tuple(wins))

    def homogeneous_spaces(self) -> list["CandidateSpace"]:
        """The spaces with one block type everywhere (every window at its middle), seeds of evolution."""
        spaces = []
        for block in sorted(self.block_types.values(), key=lambda b: b.digit):
            if not all(block.name in s.block_types for s in self.searchable_stages):
                continue
            digits = tuple(block.digit for _ in self.searchable_stages)
            windows = tuple((len(s.windows) - 1) // 2 for s in self.searchable_stages)
            spaces.append(CandidateSpace(self, digits, windows))
        return spaces

    def random_candidate_space(self, rng: random.Random) -> "CandidateSpace":
        blocks = tuple(
            self.block_types[rng.choice(s.block_types)].digit for s in self.searchable_stages
        )
        windows = tuple(rng.randrange(len(s.windows)) for s in self.searchable_stages)
        return CandidateSpace(self, blocks, windows)


# --------------------------------------------------------------------------------------------
# Candidate spaces, subnets and resolved architectures


@dataclass(frozen=True)
class StageChoices:
    """What one stage of a candidate space allows: a single block type and its elastic ranges."""

    name: str
    block_type: BlockTypeSpec
    widths: tuple[int, ...]
    depths: tuple[int, ...]
    kernels: tuple[int, ...]
    expand_ratios: tuple[float, ...]
    stride: int
    searchable: bool


@dataclass(frozen=True)
class BlockChoice:
    """Kernel size, output width and expand ratio of one block of a subnet."""

    kernel: int
    width: int
    expand: float


@dataclass(frozen=True)
class Subnet:
    """Depth per stage, (kernel, width, expand) per block, and the input resolution."""

    stages: tuple[tuple[BlockChoice, ...], ...]
    resolution: int

    @property
    def depths(self) -> tuple[int, ...]:
        return tuple(len(blocks) for blocks in self.stages)

    def encode(self) -> str:
        blocks = [b for stage in self.stages for b in stage]
        return "_".join(
            [
                "d" + "#".join(str(d) for d in self.depths),
                "k" + "#".join(str(b.kernel) for b in blocks),
                "w" + "#".join(str(b.width) for b in blocks),
                "e" + "#".join(format_number(b.expand) for b in blocks),
                f"r{self.resolution}",
            ]
        )

    def __str__(self) -> str:
        return self.encode()


@dataclass(frozen=True)
class Architecture:
    """A subnet resolved against its candidate space: the list of concrete blocks and the head."""

    space: "CandidateSpace"
    subnet: Subnet
    stages: tuple[tuple[BlockSpec, ...], ...]
    head: HeadSpec
    in_channels: int
    num_classes: int

    @property
    def blocks(self) -> list[BlockSpec]:
        return [b for stage in self.stages for b in stage]

    @property
    def resolution(self) -> int:
        return self.subnet.resolution

    @property
    def final_channels(self) -> int:
        return self.stages[-1][-1].out_channels

    @property
    def final_size(self) -> int:
        return self.stages[-1][-1].output_size


@dataclass(frozen=True)
class CandidateSpace:
    """One block type and one width window per searchable stage of a hyperspace."""

    hyperspace: Hyperspace
    block_digits: tuple[int, ...]
    window_digits: tuple[int, ...]

    def __post_init__(self) -> None:
        searchable = self.hyperspace.searchable_stages
        if len(self.block_digits) != len(searchable) or len(self.window_digits) != len(searchable):
            raise EncodingError(
                f"candidate space '{self.encoding}' of '{self.hyperspace.name}' needs {len(searchable)} block "
                f"digits and {len(searchable)} window digits, one per searchable stage "
                f"({', '.join(s.name for s in searchable)}), got {len(self.block_digits)} and {len(self.window_digits)}"
            )
        by_digit = self.hyperspace.block_type_by_digit
        for stage, digit, window in zip(searchable, self.block_digits, self.window_digits):
            allowed = sorted(self.hyperspace.block_types[name].digit for name in stage.block_types)
            if digit not in allowed:
                names = ", ".join(f"{d}={by_digit[d].name}" for d in allowed)
                raise EncodingError(
                    f"'{self.encoding}': block type digit {digit} is not allowed in {stage.name} of "
                    f"'{self.hyperspace.name}'; allowed: {names}"
                )
            if not 0 <= window < len(stage.windows):
                raise EncodingError(
                    f"'{self.encoding}': width window digit {window} is out of range in {stage.name} of "
                    f"'{self.hyperspace.name}'; allowed: 0..{len(stage.windows) - 1} "
                    f"(windows {', '.join(str(list(w)) for w in stage.windows)})"
                )

    # ---- encoding ----------------------------------------------------------------------------
    @property
    def encoding(self) -> str:
        return "-".join(
            [
                self.hyperspace.name,
                "".join(str(d) for d in self.block_digits),
                "".join(str(d) for d in self.window_digits),
            ]
        )

    def __str__(self) -> str:
        return self.encoding

    @classmethod
    def parse(cls, encoding: str, hyperspace: Hyperspace) -> "CandidateSpace":
        parts = encoding.strip().rsplit("-", 2)
        if len(parts) != 3 or parts[0] != hyperspace.name:
            raise EncodingError(
                f"'{encoding}' is not a candidate space of '{hyperspace.name}': expected "
                f"'{hyperspace.name}-<block digits>-<window digits>', e.g. "
                f"'{hyperspace.homogeneous_spaces()[0].encoding if hyperspace.homogeneous_spaces() else hyperspace.name}'"
            )
        _, blocks, windows = parts
        if not (blocks.isdigit() and windows.isdigit()):
            count = len(hyperspace.searchable_stages)
            raise EncodingError(
                f"'{encoding}': the block and window fields must be digits, {count} each (one per searchable "
                f"stage), e.g. '{hyperspace.name}-{'0' * count}-{'0' * count}'"
            )
        return cls(hyperspace, tuple(int(c) for c in blocks), tuple(int(c) for c in windows))

    # ---- per-stage choices -------------------------------------------------------------------
    @property
    def stages(self) -> list[StageChoices]:
        result = []
        digits = iter(zip(self.block_digits, self.window_digits))
        for stage in self.hyperspace.stages:
            if stage.searchable:
                block_digit, window_digit = next(digits)
                block = self.hyperspace.block_type_by_digit[block_digit]
                widths = stage.windows[window_digit]
            else:
                block = stage.fixed_block
                widths = stage.widths
            result.append(
                StageChoices(
                    name=stage.name,
                    block_type=block,
                    widths=tuple(widths),
                    depths=stage.depths,
                    kernels=stage.kernels or block.kernels,
                    expand_ratios=stage.expand_ratios or block.expand_ratios,
                    stride=stage.stride,
                    searchable=stage.searchable,
                )
            )
        return result

    # ---- subnets -----------------------------------------------------------------------------
    def max_subnet(self, resolution: int | None = None) -> Subnet:
        return Subnet(
            tuple(
                tuple(BlockChoice(max(s.kernels), max(s.widths), max(s.expand_ratios)) for _ in range(max(s.depths)))
                for s in self.stages
            ),
            resolution or max(self.hyperspace.resolutions),
        )

    def min_subnet(self, resolution: int | None = None) -> Subnet:
        return Subnet(
            tuple(
                tuple(BlockChoice(min(s.kernels), min(s.widths), min(s.expand_ratios)) for _ in range(min(s.depths)))
                for s in self.stages
            ),
            resolution or min(self.hyperspace.resolutions),
        )

    def random_subnet(self, rng: random.Random) -> Subnet:
        stages = []
        for s in self.stages:
            depth = rng.choice(s.depths)
            stages.append(
                tuple(
                    BlockChoice(rng.choice(s.kernels), rng.choice(s.widths), rng.choice(s.expand_ratios))
                    for _ in range(depth)
                )
            )
        return Subnet(tuple(stages), rng.choice(self.hyperspace.resolutions))

    def subnet(self, text: str) -> Subnet:
        """Parse a subnet string (or ``max``/``min``) and check it fits this space."""
        text = text.strip()
        if text == "max":
            return self.max_subnet()
        if text == "min":
            return self.min_subnet()
        subnet = parse_subnet(text, self)
        self.check_subnet(subnet)
        return subnet

    def check_depth_count(self, count: int) -> None:
        """Raise :class:`EncodingError` unless ``count`` depths (field d) give one per stage."""
        stages = self.stages
        if count != len(stages):
            raise EncodingError(
                f"subnet has {count} depths (field d) but {self.encoding} has {len(stages)} stages "
                f"({', '.join(s.name for s in stages)}): give one depth per stage"
            )

    def check_subnet(self, subnet: Subnet) -> None:
        """Raise :class:`EncodingError` naming the first field that does not fit this space."""
        stages = self.stages
        self.check_depth_count(len(subnet.stages))
        if subnet.resolution not in self.hyperspace.resolutions:
            raise EncodingError(
                f"resolution r{subnet.resolution} (field r) is not allowed in {self.encoding}; "
                f"allowed: {list(self.hyperspace.resolutions)}"
            )
        index = 0
        for stage, blocks in zip(stages, subnet.stages):
            if len(blocks) not in stage.depths:
                raise EncodingError(
                    f"depth {len(blocks)} of {stage.name} (field d) is not allowed in "
                    f"{self.encoding}; allowed: {list(stage.depths)}"
                )
            for position, block in enumerate(blocks):
                where = f"block {index} ({stage.name}, block {position}, {stage.block_type.name})"
                for letter, value, allowed in (
                    ("k", block.kernel, stage.kernels),
                    ("w", block.width, stage.widths),
                    ("e", block.expand, stage.expand_ratios),
                ):
                    if value not in allowed:
                        shown = "[" + ", ".join(format_number(a) if letter == "e" else str(a) for a in allowed) + "]"
                        raise EncodingError(
                            f"{letter}{format_number(value) if letter == 'e' else value} of {where} "
                            f"(field {letter}) is not allowed in {self.encoding}; allowed: {shown}"
                        )
                index += 1

    def resolve(self, subnet: Subnet) -> Architecture:
        """Turn a subnet into its concrete blocks (input widths, strides, sizes, shortcuts)."""
        self.check_subnet(subnet)
        in_channels = self.hyperspace.in_channels
        size = subnet.resolution
        resolved = []
        for stage, blocks in zip(self.stages, subnet.stages):
            specs = []
            for position, choice in enumerate(blocks):
                spec = stage.block_type.variant.spec(
                    in_channels, choice.width, choice.kernel, choice.expand,
                    stage.stride if position == 0 else 1, size, position,
                )
                specs.append(spec)
                in_channels = choice.width
                size = spec.output_size
            resolved.append(tuple(specs))
        return Architecture(
            space=self,
            subnet=subnet,
            stages=tuple(resolved),
            head=self.hyperspace.head,
            in_channels=self.hyperspace.in_channels,
            num_classes=self.hyperspace.num_classes,
        )


def parse_subnet(text: str, space: CandidateSpace | None = None) -> Subnet:
    """Parse ``d…_k…_w…_e…_r…`` (fields ``#``-separated). With a ``space``, the number of depths is
    checked against its stages first, so a missing or extra depth is blamed on field d; the values
    themselves are checked by :meth:`CandidateSpace.check_subnet`."""
    fields: dict[str, str] = {}
    for part in text.strip().split("_"):
        if not part or part[0] not in "dkwer" or part[0] in fields:
            raise EncodingError(
                f"subnet '{text}' is malformed at '{part}': expected fields d, k, w, e, r "
                f"separated by '_', e.g. 'd1#2_k3#3#5_w16#24#24_e0#4.0#6.0_r32'"
            )
        fields[part[0]] = part[1:]
    missing = [f for f in "dkwer" if f not in fields]
    if missing:
        raise EncodingError(f"subnet '{text}' lacks field(s) {', '.join(missing)}")

    def numbers(letter: str, kind: type) -> list:
        try:
            return [kind(v) for v in fields[letter].split("#")]
        except ValueError:
            raise EncodingError(
                f"field {letter} of subnet '{text}' must be '#'-separated {kind.__name__} values, "
                f"got '{fields[letter]}'"
            ) from None

    depths = numbers("d", int)
    kernels = numbers("k", int)
    widths = numbers("w", int)
    expands = numbers("e", float)
    try:
        resolution = int(fields["r"])
    except ValueError:
        raise EncodingError(f"field r of subnet '{text}' must be an integer, got '{fields['r']}'") from None
    if space is not None:
        space.check_depth_count(len(depths))
    if min(depths) < 1:
        raise EncodingError(f"field d of subnet '{text}' holds depth {min(depths)}; every depth must be at least 1")
    total = sum(depths)
    counts = {"k": len(kernels), "w": len(widths), "e": len(expands)}
    wrong = [letter for letter, count in counts.items() if count != total]
    if len(wrong) == 3 and len(set(counts.values())) == 1:
        raise EncodingError(
            f"field d of subnet '{text}' adds up to {total} blocks ({fields['d']}), but field k, field w "
            f"and field e have {counts['k']} values each, one per block: the depths must add up to {counts['k']}"
        )
    if wrong:
        letter = wrong[0]
        raise EncodingError(
            f"field {letter} of subnet '{text}' has {counts[letter]} values but the depths "
            f"(field d) add up to {total} blocks: give one value per block"
        )
    stages, index = [], 0
    for depth in depths:
        stages.append(
            tuple(BlockChoice(kernels[i], widths[i], expands[i]) for i in range(index, index + depth))
        )
        index += depth
    return Subnet(tuple(stages), resolution)


# --------------------------------------------------------------------------------------------
# YAML loading with line numbers


def _load_yaml(path: Path) -> tuple[dict, dict[tuple, int]]:
    """Load a YAML mapping and the 1-based line of every key and list item, keyed by its path."""
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read ({error.strerror})") from None
    try:
        data = yaml.safe_load(text)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(f"{path}{where}: malformed YAML: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}, line 1: a hyperspace must be a mapping with keys name, input, stages, head")
    lines: dict[tuple, int] = {}

    def walk(n: yaml.Node, key_path: tuple) -> None:
        if isinstance(n, yaml.MappingNode):
            for key_node, value_node in n.value:
                lines[key_path + (key_node.value,)] = key_node.start_mark.line + 1
                walk(value_node, key_path + (key_node.value,))
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                lines[key_path + (i,)] = item.start_mark.line + 1
                walk(item, key_path + (i,))

    walk(node, ())
    return data, lines


@dataclass(frozen=True)
class _Rule:
    """Which numbers a YAML field allows, and how an error message names them."""

    allows: Callable[[Any], bool]
    allowed: str


AT_LEAST_1 = _Rule(lambda v: v >= 1, "integers at least 1")
ODD_KERNELS = _Rule(lambda v: v >= 1 and v % 2 == 1, "odd integers at least 1 (1, 3, 5, 7, ...)")
EXPAND_RATIOS = _Rule(lambda v: v > 0, "numbers greater than 0")
NO_EXPANSION = _Rule(lambda v: v == 0, "[0]")
CLASSES = _Rule(lambda v: v >= 2, "an integer at least 2")


def _expand_rule(variant: BlockVariant) -> _Rule:
    """Expand ratios a block type allows: none for blocks without expansion, positive for the rest."""
    return NO_EXPANSION if variant.expand_of == "none" else EXPAND_RATIOS


#: Kernels a K3 variant allows: its depthwise k x k conv is (k - 1) / 2 stacked 3x3 convs.
K3_KERNELS = _Rule(lambda v: v >= 3 and v % 2 == 1, "odd integers at least 3 (3, 5, 7, ...) for a dw_k3 block")


class _Fields:
    """Reads typed fields from one YAML mapping and reports errors with file, line and key."""

    def __init__(self, path: Path, lines: dict[tuple, int], data: dict, key_path: tuple):
        self.path, self.lines, self.data, self.key_path = path, lines, data, key_path

    def where(self, key: Any | None = None) -> str:
        full = self.key_path + ((key,) if key is not None else ())
        line = self.lines.get(full) or self.lines.get(self.key_path)
        dotted = ".".join(str(k) for k in full) or "<top level>"
        return f"{self.path}" + (f", line {line}" if line else "") + f", key '{dotted}'"

    def error(self, key: Any | None, message: str) -> ConfigError:
        return ConfigError(f"{self.where(key)}: {message}")

    def check_keys(self, allowed: Sequence[str]) -> None:
        for key in self.data:
            if key not in allowed:
                raise self.error(key, f"unknown key; allowed keys: {', '.join(allowed)}")

    def get(
        self, key: str, kind: type, default: Any = ..., choices: Sequence | None = None, rule: _Rule | None = None
    ) -> Any:
        if key not in self.data:
            if default is ...:
                raise self.error(None, f"missing key '{key}'")
            return default
        value = self.data[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise self.error(key, f"expected {kind.__name__}, got {value!r}")
        if choices is not None and value not in choices:
            raise self.error(key, f"{value!r} is not allowed; allowed: {', '.join(map(str, choices))}")
        self.check(key, value, rule)
        return value

    def get_list(self, key: str, kind: type, default: Any = ..., rule: _Rule | None = None) -> tuple:
        """A non-empty list of ``kind``; numbers must be finite and, with a ``rule``, allowed by it."""
        raw = self.get(key, list, default)
        if raw is None:
            return None
        if not raw:
            raise self.error(key, "must not be empty")
        values = []
        for item in raw:
            if kind is float and isinstance(item, int) and not isinstance(item, bool):
                item = float(item)
            if not isinstance(item, kind) or isinstance(item, bool):
                raise self.error(key, f"expected a list of {kind.__name__}, got item {item!r}")
            self.check(key, item, rule)
            values.append(item)
        return tuple(values)

    def check(self, key: str, value: Any, rule: _Rule | None) -> None:
        """Raise naming the key and the allowed values if ``value`` is a non-finite number or breaks ``rule``."""
        if isinstance(value, float) and not math.isfinite(value):
            raise self.error(key, f"{value!r} is not allowed; allowed: finite numbers")
        if rule is not None and not rule.allows(value):
            raise self.error(key, f"{value!r} is not allowed; allowed: {rule.allowed}")

    def child(self, key: Any) -> "_Fields":
        value = self.data.get(key) if isinstance(self.data, dict) else None
        if not isinstance(value, dict):
            raise self.error(key, "expected a mapping")
        return _Fields(self.path, self.lines, value, self.key_path + (key,))


def load_hyperspace(name_or_path: str | Path) -> Hyperspace:
    """Load a hyperspace by name (``tiny``, ``onnxw``, ``mobilew``, ``mobilenetv3``) or YAML path and validate it."""
    path = resolve_hyperspace_path(name_or_path)
    data, lines = _load_yaml(path)
    return _parse_hyperspace(path, data, lines)


def available_hyperspaces() -> list[str]:
    return sorted(p.stem for p in SEARCH_SPACES_DIR.glob("*.yaml"))


def resolve_hyperspace_path(name_or_path: str | Path) -> Path:
    text = str(name_or_path)
    if text.endswith((".yaml", ".yml")) or "/" in text:
        path = Path(text)
        if not path.exists():
            raise ConfigError(f"{path}: no such hyperspace file")
        return path
    path = SEARCH_SPACES_DIR / f"{text}.yaml"
    if not path.exists():
        raise UsageError(
            f"unknown hyperspace '{text}'; available: {', '.join(available_hyperspaces())} "
            f"(or give a path to a YAML file)"
        )
    return path


#: Keys of a block type (besides ``digit`` and ``kind``): its elastic choices and variant options.
_VARIANT_KEYS = ("kernels", "expand_ratios", *OPTION_KEYS)


def _variant(fields: _Fields, kind_name: str, base: BlockVariant | None = None) -> BlockVariant:
    """The variant of ``kind_name`` (or ``base``) with the option keys present in ``fields``."""
    kind = BLOCK_KINDS[kind_name] if base is None else base.kind
    options = {}
    for key, allowed in kind.allowed().items():
        if key in fields.data:
            value_type = bool if isinstance(allowed[0], bool) else str
            options[key] = fields.get(key, value_type, choices=allowed)
    start = kind.defaults if base is None else base.options
    return kind.variant(**{**asdict(start), **options})


def _check_choices(
    fields: _Fields, what: str, variant: BlockVariant, kernels: tuple | None, expands: tuple | None
) -> None:
    """Raise naming the key unless the kernels and expand ratios given fit ``variant``."""
    rules = [("kernels", kernels, K3_KERNELS)] if variant.options.dw_k3 else []
    for key, values, rule in rules + [("expand_ratios", expands, _expand_rule(variant))]:
        for value in values or ():
            if not rule.allows(value):
                raise fields.error(key, f"{value!r} is not allowed for {what}; allowed: {rule.allowed}")


def _block_type(
    fields: _Fields, name: str, digit: int, variant: BlockVariant, declared: BlockTypeSpec | None
) -> BlockTypeSpec:
    """A block type from the ``kernels`` and ``expand_ratios`` in ``fields`` (else ``declared``'s)."""
    kernels = fields.get_list("kernels", int, None, rule=ODD_KERNELS) or (declared.kernels if declared else None)
    if kernels is None:
        raise fields.error(None, f"'{name}' needs 'kernels' (the block type is not declared under block_types)")
    expands = fields.get_list("expand_ratios", float, None) or (declared.expand_ratios if declared else None)
    if expands is None and variant.expand_of != "none":
        raise fields.error(None, f"'{name}' needs 'expand_ratios'")
    expands = expands or (0.0,)
    _check_choices(fields, f"block type '{name}'", variant, kernels, expands)
    return BlockTypeSpec(name=name, digit=digit, kernels=kernels, expand_ratios=expands, variant=variant)


def _fixed_block(fields: _Fields, name: str, declared: BlockTypeSpec | None) -> BlockTypeSpec:
    """The block of a fixed stage: a declared block type or a kind, with the stage's option keys."""
    variant = _variant(fields, name, declared.variant if declared else None)
    return _block_type(fields, name, -1, variant, declared)


def _parse_hyperspace(path: Path, data: dict, lines: dict[tuple, int]) -> Hyperspace:
    top = _Fields(path, lines, data, ())
    top.check_keys(["name", "description", "input", "num_classes", "block_types", "stages", "head"])
    name = top.get("name", str)
    if not name or "-" in name:
        raise top.error("name", "must be a non-empty name without '-' (it starts every encoding)")
    top.get("description", str, "")  # free text: only its type is checked

    inp = top.child("input")
    inp.check_keys(["channels", "resolutions"])
    in_channels = inp.get("channels", int, rule=AT_LEAST_1)
    resolutions = inp.get_list("resolutions", int, rule=AT_LEAST_1)
    num_classes = top.get("num_classes", int, rule=CLASSES)

    block_types: dict[str, BlockTypeSpec] = {}
    raw_blocks = top.get("block_types", dict)
    blocks_fields = top.child("block_types")
    digits_seen: dict[int, str] = {}
    for block_name in raw_blocks:
        bf = blocks_fields.child(block_name)
        bf.check_keys(["digit", "kind", *_VARIANT_KEYS])
        if "kind" in bf.data:
            kind_name = bf.get("kind", str, choices=list(BLOCK_KINDS))
        elif block_name in BLOCK_KINDS:
            kind_name = block_name
        else:
            raise blocks_fields.error(
                block_name,
                f"unknown block type '{block_name}'; allowed: {', '.join(BLOCK_KINDS)} "
                f"(or any name with 'kind: <one of these>')",
            )
        digit = bf.get("digit", int)
        if digit in digits_seen or not 0 <= digit <= 9:
            raise bf.error("digit", f"digit {digit} must be 0-9 and unique (also used by {digits_seen.get(digit)})")
        digits_seen[digit] = block_name
        block_types[block_name] = _block_type(bf, block_name, digit, _variant(bf, kind_name), None)

    raw_stages = top.get("stages", list)
    stages = []
    for index in range(len(raw_stages)):
        sf = _Fields(path, lines, raw_stages[index], ("stages", index))
        if not isinstance(raw_stages[index], dict):
            raise sf.error(None, "each stage must be a mapping")
        searchable = "block" not in sf.data
        stage_keys = ["name", "block_types", "block", "widths", "window", "depths", "stride"]
        sf.check_keys(stage_keys + ["kernels", "expand_ratios"] + (list(OPTION_KEYS) if not searchable else []))
        stage_name = sf.get("name", str, f"stage{index}")
        if searchable:
            names = tuple(sf.get_list("block_types", str))
            for n in names:
                if n not in block_types:
                    raise sf.error(
                        "block_types",
                        f"unknown block type '{n}'; allowed: {', '.join(block_types)} "
                        f"(declared under block_types)",
                    )
        else:
            allowed = list(BLOCK_KINDS) + [n for n in block_types if n not in BLOCK_KINDS]
            names = (sf.get("block", str, choices=allowed),)
        widths = sf.get_list("widths", int, rule=AT_LEAST_1)
        if list(widths) != sorted(set(widths)):
            raise sf.error("widths", "widths must be strictly increasing")
        window = sf.get("window", int, len(widths) if not searchable else ...)
        if not 1 <= window <= len(widths):
            raise sf.error("window", f"window {window} must be between 1 and the number of widths ({len(widths)})")
        depths = sf.get_list("depths", int, rule=AT_LEAST_1)
        stride = sf.get("stride", int, choices=[1, 2])
        kernels = sf.get_list("kernels", int, None, rule=ODD_KERNELS)
        expands = sf.get_list("expand_ratios", float, None)
        fixed = None
        if searchable:
            for n in names:
                _check_choices(sf, f"block type '{n}'", block_types[n].variant, kernels, expands)
        else:
            fixed = _fixed_block(sf, names[0], block_types.get(names[0]))
        stages.append(
            StageSpec(
                name=stage_name,
                searchable=searchable,
                block_types=names,
                widths=widths,
                window=window,
                depths=depths,
                stride=stride,
                kernels=kernels,
                expand_ratios=expands,
                fixed_block=fixed,
            )
        )
    if not any(s.searchable for s in stages):
        raise top.error("stages", "a hyperspace needs at least one searchable stage (with block_types)")

    hf = top.child("head")
    hf.check_keys(["widths", "activation"])
    head_widths = hf.get_list("widths", int, rule=AT_LEAST_1)
    if len(head_widths) != 2:
        raise hf.error("widths", "the head takes exactly two widths: [final_expand, feature_mix]")
    head = HeadSpec(widths=(head_widths[0], head_widths[1]), activation=hf.get("activation", str, "relu", choices=ACTIVATIONS))
    return Hyperspace(
        name=name,
        in_channels=in_channels,
        resolutions=resolutions,
        num_classes=num_classes,
        block_types=block_types,
        stages=tuple(stages),
        head=head,
        source=str(path),
        raw=data,
    )


def load_space(text: str) -> Hyperspace | CandidateSpace:
    """Resolve a ``--space`` argument: a hyperspace name or YAML path, a candidate-space encoding of
    a shipped hyperspace (``tiny-1111-0000``), or ``PATH.yaml:ENCODING`` for a space of a hyperspace
    defined in a YAML file of one's own."""
    text = text.strip()
    path, colon, encoding = text.rpartition(":")
    if colon and path.endswith((".yaml", ".yml")):
        return load_hyperspace(path).candidate_space(encoding)
    if not text.endswith((".yaml", ".yml")) and "-" in text and "/" not in text:
        name = text.split("-", 1)[0]
        return load_hyperspace(name).candidate_space(text)
    return load_hyperspace(text)


def require_candidate_space(space: Hyperspace | CandidateSpace, what: str) -> CandidateSpace:
    if isinstance(space, CandidateSpace):
        return space
    example = space.homogeneous_spaces()[0].encoding if space.homogeneous_spaces() else f"{space.name}-..."
    raise UsageError(
        f"{what} needs a candidate space (one block type and width window per stage), "
        f"not the hyperspace '{space.name}'; e.g. --space {example}"
    )
