"""Latency budgets a user can give without knowing the device: ``--latency-budget auto``.

A budget in milliseconds means something only on one device: 0.8 ms is "the largest subnet" on one
CPU and "a mid-sized one" on another. With ``auto`` (the default of ``spaceevo extract`` and
``spaceevo run``) N budgets are spread over this device's predicted INT8 latency range:

* a candidate space (``extract``, and ``run`` once the space is known): the range of its smallest
  and largest subnets at every resolution, from the latency predictor, i.e. the space's true range;
* a hyperspace (``run``, before the space search has chosen a space): the range over a sample of
  its candidate spaces (the homogeneous ones at their smallest, middle and largest width windows,
  and :data:`SAMPLED_SPACES` random ones), from the *largest* of their smallest subnets (so every
  budget is above the smallest subnet of every sampled space and the extraction finds subnets
  whatever space the search picks) to the *median* of their largest subnets (a typical space's
  largest subnet; a budget above the chosen space's largest subnet deploys that subnet).

The budgets are ``low + (high - low) * i / N`` for i = 1..N: strictly above the smallest subnet, the
last at the top of the range, each rounded to 3 significant digits (more when needed to stay inside
the range and distinct). Everything here is a pure function of the predictor, so a resumed command
chooses the same budgets.
"""

from __future__ import annotations

import math
import random
import statistics
import sys
from dataclasses import asdict, dataclass
from typing import Any, Callable, Literal, Sequence

from spaceevo.errors import UsageError
from spaceevo.space import Architecture, CandidateSpace, Hyperspace, Subnet

AUTO = "auto"
DEFAULT_COUNT = 3
SAMPLED_SPACES = 64
"""Random candidate spaces sampled (besides the homogeneous ones) for a hyperspace's range."""

LatencyBudgets = Sequence[float] | Literal["auto"]


@dataclass(frozen=True)
class LatencyRange:
    """Predicted INT8 latencies (ms): budgets are spread over (``low_ms``, ``high_ms``];
    ``smallest_ms`` is the smallest latency any subnet reaches (below it no budget can be met)."""

    low_ms: float
    high_ms: float
    smallest_ms: float
    source: str


@dataclass(frozen=True)
class BudgetChoice:
    """The latency budgets of a command: given by the user, or chosen from ``range`` (``auto``)."""

    budgets_ms: tuple[float, ...]
    auto: bool
    range: LatencyRange | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "latency_budgets_ms": list(self.budgets_ms),
            "auto": self.auto,
            "range": None if self.range is None else asdict(self.range),
        }

    def describe(self) -> str:
        """The line printed when the budgets were chosen automatically."""
        text = f"latency budgets ({'auto' if self.auto else 'given'}): {', '.join(f'{b:g}' for b in self.budgets_ms)} ms"
        if self.auto and self.range is not None:
            text += (
                f", spread over ({self.range.low_ms:.4g}, {self.range.high_ms:.4g}] ms of predicted INT8 latency "
                f"on this device ({self.range.source})"
            )
        return text


# ---- parsing and checking -------------------------------------------------------------------------


def parse_latency_budgets(texts: Sequence[str] | None) -> LatencyBudgets:
    """``--latency-budget`` as given on the command line: absent or ``auto``, else numbers of ms."""
    if not texts or list(texts) == [AUTO]:
        return AUTO
    try:
        values = [float(t) for t in texts]
    except ValueError:
        raise UsageError(
            f"--latency-budget takes 'auto' or positive numbers of ms, got {' '.join(texts)}"
        ) from None
    return check_budgets(values)


def check_budgets(budgets_ms: Sequence[float]) -> list[float]:
    """Finite, positive and distinct budgets; a :class:`UsageError` naming ``--latency-budget`` otherwise."""
    budgets = [float(b) for b in budgets_ms]
    if not budgets:
        raise UsageError("--latency-budget needs at least one number of ms, or 'auto'")
    bad = [b for b in budgets if not (0 < b < math.inf)]
    if bad:
        raise UsageError(
            f"--latency-budget must be positive finite numbers of ms (0 < MS < inf), or 'auto'; got "
            f"{' '.join(f'{b:g}' for b in bad)}"
        )
    repeated = sorted({b for b in budgets if budgets.count(b) > 1})
    if repeated:
        raise UsageError(f"--latency-budget lists {', '.join(f'{b:g}' for b in repeated)} ms more than once")
    return budgets


def check_count(count: int | None, budgets: LatencyBudgets) -> int:
    """The number of automatic budgets (``--num-budgets``; only with ``auto``)."""
    if count is None:
        return DEFAULT_COUNT
    if budgets != AUTO:
        raise UsageError("--num-budgets is only for --latency-budget auto (the default); give either")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise UsageError(f"--num-budgets must be an integer >= 1, got {count!r}")
    return count


# ---- ranges ----------------------------------------------------------------------------------------


def space_latency_range(
    space: CandidateSpace, predict_ms: Callable[[Subnet], float]
) -> tuple[tuple[float, Subnet], tuple[float, Subnet]]:
    """(predicted ms, subnet) of the smallest and of the largest subnet, over every resolution."""
    resolutions = space.hyperspace.resolutions
    smallest = min(((predict_ms(s), s) for s in map(space.min_subnet, resolutions)), key=lambda p: p[0])
    largest = max(((predict_ms(s), s) for s in map(space.max_subnet, resolutions)), key=lambda p: p[0])
    return smallest, largest


def candidate_space_range(space: CandidateSpace, predict_ms: Callable[[Subnet], float]) -> LatencyRange:
    """The true range of a candidate space: its smallest to its largest subnet."""
    (low, _), (high, _) = space_latency_range(space, predict_ms)
    return LatencyRange(low, high, low, f"smallest to largest subnet of {space.encoding}")


def sampled_spaces(hyperspace: Hyperspace, count: int = SAMPLED_SPACES, seed: int = 0) -> list[CandidateSpace]:
    """The homogeneous spaces at their smallest, middle and largest windows, and ``count`` random ones."""
    spaces: dict[str, CandidateSpace] = {}
    for homogeneous in hyperspace.homogeneous_spaces():
        for pick in (lambda n: 0, lambda n: (n - 1) // 2, lambda n: n - 1):
            windows = tuple(pick(len(s.windows)) for s in hyperspace.searchable_stages)
            space = CandidateSpace(hyperspace, homogeneous.block_digits, windows)
            spaces[space.encoding] = space
    rng = random.Random(f"budgets:{seed}")
    for _ in range(count):
        space = hyperspace.random_candidate_space(rng)
        spaces[space.encoding] = space
    return list(spaces.values())


def hyperspace_range(
    hyperspace: Hyperspace, predict: Callable[[Architecture], float], count: int = SAMPLED_SPACES, seed: int = 0
) -> LatencyRange:
    """The range budgets are spread over before a space is chosen (see the module docstring)."""
    spaces = sampled_spaces(hyperspace, count, seed)
    lows, highs = [], []
    for space in spaces:
        (low, _), (high, _) = space_latency_range(space, lambda s, space=space: predict(space.resolve(s)))
        lows.append(low)
        highs.append(high)
    low, high = max(lows), statistics.median(highs)
    if high <= low:
        high = max(highs)
    return LatencyRange(
        low, high, min(lows),
        f"{len(spaces)} sampled candidate spaces of {hyperspace.name}: the largest of their smallest subnets to "
        f"the median of their largest",
    )


def spread_budgets(latency_range: LatencyRange, count: int) -> list[float]:
    """``count`` budgets ``low + (high - low) * i / count`` (i = 1..count), rounded to 3 significant
    digits (more where needed to stay in (low, high] and distinct)."""
    low, high = latency_range.low_ms, latency_range.high_ms
    if not high > low:
        return [high]
    budgets: list[float] = []
    for i in range(1, count + 1):
        value = low + (high - low) * i / count
        budgets.append(_round_within(value, max([low, *budgets]), high))
    return budgets


def _round_within(value: float, above: float, high: float) -> float:
    """``value`` with as few significant digits (at least 3) as keep it in (above, high]."""
    for digits in range(3, 16):
        exponent = math.floor(math.log10(value)) - digits + 1
        scaled = value / 10.0**exponent
        for rounding in (round, math.floor, math.ceil):
            rounded = float(f"{rounding(scaled + (1e-9 if rounding is math.floor else 0.0))}e{exponent}")
            if above < rounded <= high:
                return rounded
    return value


def choose_budgets(requested: LatencyBudgets, count: int, latency_range: LatencyRange, show: bool = True) -> BudgetChoice:
    """The user's budgets, or ``count`` spread over ``latency_range`` (printed on stderr when ``show``)."""
    if requested != AUTO:
        return BudgetChoice(tuple(check_budgets(requested)), False, latency_range)
    choice = BudgetChoice(tuple(spread_budgets(latency_range, count)), True, latency_range)
    if show:
        print(f"spaceevo: {choice.describe()}", file=sys.stderr)
    return choice
