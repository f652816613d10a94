"""What every search shares: the property's rows, the deadline, the attack, the counterexample, the frontier.

`Search` holds the state both branch-and-bound searches (`input_bab`, `relu_bab`) need and ends them with
`finish(status)`; `Arrays` is a dataclass of parallel arrays (one row per box or domain) and `Frontier` keeps
the undecided rows, popped by smallest `score`; `CallSizer` sizes bound calls to the clock.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from ..attack import Attack
from ..vnnlib import Property
from .network import Network

# Bound graphs compute in float32 without outward rounding: demand a little more than > 0 to refute.
ABSOLUTE_SLACK, RELATIVE_SLACK = 1e-6, 1e-5
# Bound calls are sized to take about this long, so the clock is checked often enough to honour timeouts.
CALL_SECONDS = 0.2
MAX_CHUNK = 16384
FRONTIER_BYTES = 1 << 28
# Attacks during branch and bound take at most this share of the time, on this many boxes at a time.
ATTACK_SHARE = 0.2
ATTACK_BOXES = 64


class Search:
    """The property, network and deadline of one verify call, with its attack and what it has found so far.

    The rows of the unsafe set: `matrix`/`offset` (margins c·y - d; a conjunct is refuted on a box once one
    of its rows has a positive lower bound), `membership[row, conjunct]`, and `mixtures` (averaged rows that
    alpha-CROWN may learn, `Property.rows_with_mixtures`).
    """

    def __init__(self, prop: Property, network: Network, deadline: float):
        self.prop, self.network, self.deadline = prop, network, deadline
        self.matrix, self.offset, rows, self.mixtures = prop.rows_with_mixtures()
        self.membership = np.zeros((len(self.offset), len(prop.unsafe)), dtype=bool)
        for k, indices in enumerate(rows):
            self.membership[indices, k] = True
        self.has_rows = len(self.offset) > 0
        self.attack = Attack(network.differentiable, self.matrix, self.offset, self.membership)
        self.counterexample: tuple[np.ndarray, np.ndarray] | None = None
        self.boxes_bounded = 0
        self.attack_seconds = 0.0
        self.started = time.monotonic()

    def start_clock(self) -> None:
        """Attacks get their share of the time from here on (bound graphs built before do not count)."""
        self.started = time.monotonic()

    def past_deadline(self) -> bool:
        return time.monotonic() > self.deadline

    def finish(self, status: str) -> tuple[str, tuple | None, int]:
        """(status, counterexample, boxes bounded): a confirmed counterexample always wins."""
        if self.counterexample is not None:
            return "violated", self.counterexample, self.boxes_bounded
        return status, None, self.boxes_bounded

    def attack_due(self) -> bool:
        return self.attack_seconds <= ATTACK_SHARE * (time.monotonic() - self.started)

    def attack_boxes(self, lower, upper, alive, budget: float, **settings) -> bool:
        """Attack the boxes for at most `budget` of the remaining time; True when a counterexample is confirmed."""
        began = time.monotonic()
        deadline = began + budget * max(0.0, self.deadline - began)
        points, objective = self.attack.run(lower, upper, alive, deadline, **settings)
        for index in np.argsort(objective)[:8]:
            if objective[index] > 0 or self.confirm(points[index]):
                break
        self.attack_seconds += time.monotonic() - began
        return self.counterexample is not None

    def confirm(self, x: np.ndarray) -> bool:
        found = self.network.confirm(self.prop, x)
        if found is not None and self.counterexample is None:
            self.counterexample = found
        return self.counterexample is not None

    def conjunct_without_rows(self, lower, upper, alive) -> bool:
        """A conjunct with no output rows is met by every output: any input of its box is a counterexample."""
        empty = ~self.membership.any(axis=0)
        for box in np.flatnonzero((alive & empty).any(axis=1)):
            self.confirm(0.5 * (lower[box] + upper[box]))
        return self.counterexample is not None


class CallSizer:
    """Slices of a batch sized so that one bound call takes about CALL_SECONDS: the clock is checked often
    enough to honour timeouts, and calls stay large enough to amortise their overhead."""

    def __init__(self, size: int = 64, seconds: float = CALL_SECONDS):
        self.size, self.seconds = size, seconds

    def slices(self, total: int, deadline: float):
        """Consecutive slices over range(total); a None (and no more) once the deadline has passed. Each full
        slice's call time, measured until the next one is asked for, rescales the size."""
        start = 0
        while start < total:
            if time.monotonic() > deadline:
                yield None
                return
            part = slice(start, min(start + self.size, total))
            began = time.monotonic()
            yield part
            if part.stop - part.start == self.size:
                seconds = max(time.monotonic() - began, 1e-4)
                self.size = int(np.clip(self.size * self.seconds / seconds, 8, MAX_CHUNK))
            start = part.stop


@dataclasses.dataclass
class Arrays:
    """Parallel arrays, one row per box or domain (subclasses name the fields)."""

    def __len__(self) -> int:
        return len(getattr(self, dataclasses.fields(self)[0].name))

    def take(self, index) -> "Arrays":
        return type(self)(**{f.name: getattr(self, f.name)[index] for f in dataclasses.fields(self)})

    @classmethod
    def concat(cls, parts: list["Arrays"]) -> "Arrays":
        return cls(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(cls)})


class Frontier:
    """Undecided boxes or domains (`Arrays` with a `score` field), popped smallest score first."""

    def __init__(self, items: Arrays):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def push(self, items: Arrays) -> None:
        self.items = type(self.items).concat([self.items, items])

    def pop(self, count: int) -> Arrays:
        chosen = self._closest(count)
        taken = self.items.take(chosen)
        rest = np.ones(len(self), dtype=bool)
        rest[chosen] = False
        self.items = self.items.take(rest)
        return taken

    def closest(self, count: int) -> Arrays:
        return self.items.take(self._closest(count))

    def _closest(self, count: int) -> np.ndarray:
        values = self.items.score
        if count >= len(values):
            return np.arange(len(values))
        return np.argpartition(values, count)[:count]
