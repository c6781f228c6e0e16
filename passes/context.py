"""What a running pass sees besides the graph: its options and its statistics."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


class Statistics:
    """Counters a pass (and the rewriter and driver it uses) increments.

    ``counters`` holds named totals (``ops created``, ``ops erased``, ``values merged``...);
    ``patterns`` counts successful applications per pattern name.  ``--stats`` prints both.
    """

    def __init__(self):
        self.counters: Counter[str] = Counter()
        self.patterns: Counter[str] = Counter()

    def bump(self, counter: str, n: int = 1) -> None:
        self.counters[counter] += n

    def merge(self, other: "Statistics") -> None:
        self.counters.update(other.counters)
        self.patterns.update(other.patterns)

    def __bool__(self) -> bool:
        return bool(self.counters) or bool(self.patterns)

    def __repr__(self) -> str:
        return f"Statistics({dict(self.counters)}, patterns={dict(self.patterns)})"


@dataclass
class PassContext:
    """Handed to every pass: ``ctx.options.group``, ``ctx.stats.bump("weights fused")``."""
    pass_name: str
    options: "Options" = None  # type: ignore[assignment]
    stats: Statistics = field(default_factory=Statistics)

    def __post_init__(self):
        if self.options is None:
            self.options = Options({})
        elif isinstance(self.options, dict):
            self.options = Options(self.options)


class Options:
    """Resolved option values, readable as attributes (``ctx.options.group``) or by key."""

    def __init__(self, values: dict[str, Any]):
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"no option '{name}' (options: "
                                 f"{', '.join(self._values) or 'none'})") from None

    def __setattr__(self, name, value):
        raise AttributeError("options are read-only")

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def __repr__(self) -> str:
        return f"Options({self._values})"
