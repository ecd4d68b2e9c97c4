"""Config values and their ranges: the error a bad value raises, and the bounds numbers must keep."""

from __future__ import annotations

import dataclasses
import math

from tpullm.errors import UserError


class ConfigError(UserError):
    """A config value that cannot work; the message names the field and the fix."""


@dataclasses.dataclass(frozen=True)
class Bound:
    """The finite numbers a config value may take: between low and high, each end open or closed."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def holds(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        if self.high == math.inf:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


POSITIVE, NON_NEGATIVE, AT_LEAST_ONE = Bound(0, low_open=True), Bound(0), Bound(1)
FRACTION, BELOW_ONE = Bound(0, 1), Bound(0, 1, high_open=True)


def check_bound(key: str, value, bound: Bound, default) -> None:
    """Raises ConfigError naming `key`, its range and a value that works (`default`) unless `bound` holds."""
    if not bound.holds(value):
        raise ConfigError(
            f"{key}={value!r} must be {bound} and finite; set e.g. --config.{key}={default!r} (the default)"
        )
