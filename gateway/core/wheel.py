"""A hierarchical timer wheel (Varghese & Lauck) with an injected clock.

Flows refresh their idle timer on every packet by storing ``last_seen``:
that is O(1) and touches no wheel. The wheel holds one deadline per flow;
when it fires, the table compares it with ``last_seen + timeout`` and either
ends the flow or schedules the remainder. Expiry therefore never scans the
flow table, and a busy flow costs one re-arm per timeout period.
"""

from __future__ import annotations

import math
from typing import Any, Protocol


class Timed(Protocol):
    """What the wheel needs from an entry: two slots it may write."""

    wheel_slot: dict[Any, None] | None
    wheel_tick: int


_BITS = 6
_SLOTS = 1 << _BITS
_MASK = _SLOTS - 1
_LEVELS = 4


class TimerWheel:
    """Four levels of 64 slots; level 0 has ``tick``-second resolution."""

    def __init__(self, now: float, tick: float = 0.125) -> None:
        self.tick = tick
        self.current = math.floor(now / tick)
        self.levels: list[list[dict[Any, None]]] = [[{} for _ in range(_SLOTS)] for _ in range(_LEVELS)]
        self.count = 0

    def schedule(self, entry: Timed, when: float) -> None:
        """Arm (or re-arm) ``entry`` to fire at ``when``, at tick resolution, never early."""
        if entry.wheel_slot is not None:
            del entry.wheel_slot[entry]
            self.count -= 1
        t = math.ceil(when / self.tick)
        if t <= self.current:
            t = self.current + 1
        self._place(entry, t)
        self.count += 1

    def _place(self, entry: Timed, t: int) -> None:
        d = t - self.current
        level = 0
        while level < _LEVELS - 1 and d >= 1 << (_BITS * (level + 1)):
            level += 1
        limit = self.current + (1 << (_BITS * _LEVELS)) - 1
        if t > limit:
            t = limit
        slot = self.levels[level][(t >> (_BITS * level)) & _MASK]
        slot[entry] = None
        entry.wheel_slot = slot
        entry.wheel_tick = t

    def cancel(self, entry: Timed) -> None:
        if entry.wheel_slot is not None:
            del entry.wheel_slot[entry]
            entry.wheel_slot = None
            self.count -= 1

    def next_deadline(self) -> float | None:
        """When :meth:`advance` next has work: a due slot or a cascade; None if empty."""
        if not self.count:
            return None
        level0 = self.levels[0]
        cur = self.current
        for k in range(1, _SLOTS - (cur & _MASK)):
            if level0[(cur + k) & _MASK]:
                return (cur + k) * self.tick
        return ((cur | _MASK) + 1) * self.tick

    def advance(self, now: float) -> list[Any]:
        """Move the wheel to ``now`` and return every entry whose tick has come."""
        target = math.floor(now / self.tick)
        fired: list[Any] = []
        if not self.count:
            if target > self.current:
                self.current = target
            return fired
        while self.current < target and self.count:
            self.current += 1
            cur = self.current
            if not cur & _MASK:
                self._cascade(1)
            slot = self.levels[0][cur & _MASK]
            if slot:
                for entry in slot:
                    entry.wheel_slot = None
                    fired.append(entry)
                self.count -= len(slot)
                slot.clear()
        if self.current < target:
            self.current = target
        return fired

    def _cascade(self, level: int) -> None:
        cur = self.current
        idx = (cur >> (_BITS * level)) & _MASK
        if not idx and level + 1 < _LEVELS:
            self._cascade(level + 1)
        slot = self.levels[level][idx]
        if not slot:
            return
        entries = list(slot)
        slot.clear()
        for entry in entries:
            self._place(entry, entry.wheel_tick)
