"""A hierarchical timer wheel (Varghese & Lauck) with an injected clock.

Flows refresh their idle timer on every packet by storing ``last_seen``:
that is O(1) and touches no wheel. The wheel holds one deadline per flow;
when it fires, the table compares it with ``last_seen + timeout`` and either
ends the flow or schedules the remainder. Expiry therefore never scans the
flow table, and a busy flow costs one re-arm per timeout period.

Compact (docs/decisions.md, "Compact flows"): a slot is a list of entries and
an ``array`` of their ticks, so an armed entry costs 16 bytes and no object of
its own. An entry knows only which slot list holds its current deadline
(``wheel_slot``). Cancelling or re-arming leaves the old place in its list as
a stale entry, skipped when its slot comes round (its ``wheel_slot`` is
another list, or it was already fired from this one); when stale entries
outnumber a quarter of the armed ones (plus a floor) every slot is swept, so
they cost O(1) amortised per cancel and hold at most that many ended flows.
"""

from __future__ import annotations

import math
from array import array
from typing import Any, Protocol


class Timed(Protocol):
    """What the wheel needs from an entry: one slot it may write."""

    wheel_slot: list[Any] | None


_BITS = 6
_SLOTS = 1 << _BITS
_MASK = _SLOTS - 1
_LEVELS = 4
_SPAN1, _SPAN2, _SPAN3, _SPAN4 = (1 << (_BITS * k) for k in range(1, _LEVELS + 1))
#: Stale entries tolerated before a sweep, beyond a quarter of the armed count.
SWEEP_FLOOR = 4096


class TimerWheel:
    """Four levels of 64 slots; level 0 has ``tick``-second resolution."""

    def __init__(self, now: float, tick: float = 0.125) -> None:
        self.tick = tick
        self.current = math.floor(now / tick)
        self.levels: list[list[list[Any]]] = [[[] for _ in range(_SLOTS)] for _ in range(_LEVELS)]
        self.ticks: list[list[array[int]]] = [[array("q") for _ in range(_SLOTS)] for _ in range(_LEVELS)]
        #: Armed entries, and list places left behind by cancels and re-arms.
        self.count = 0
        self.stale = 0

    def schedule(self, entry: Timed, when: float) -> None:
        """Arm (or re-arm) ``entry`` to fire at ``when``, at tick resolution, never early."""
        if entry.wheel_slot is None:
            self.count += 1
        else:
            self.stale += 1
        t = math.ceil(when / self.tick)
        if t <= self.current:
            t = self.current + 1
        self._place(entry, t)
        if self.stale > SWEEP_FLOOR + (self.count >> 2):
            self.sweep()

    def _place(self, entry: Timed, t: int) -> None:
        # The level whose span holds the distance, unrolled (this runs once per new flow).
        d = t - self.current
        if d < _SPAN1:
            level, shift = 0, 0
        elif d < _SPAN2:
            level, shift = 1, _BITS
        elif d < _SPAN3:
            level, shift = 2, 2 * _BITS
        else:
            level, shift = 3, 3 * _BITS
            limit = self.current + _SPAN4 - 1
            if t > limit:
                t = limit
        i = (t >> shift) & _MASK
        slot = self.levels[level][i]
        slot.append(entry)
        self.ticks[level][i].append(t)
        entry.wheel_slot = slot

    def cancel(self, entry: Timed) -> None:
        if entry.wheel_slot is not None:
            entry.wheel_slot = None
            self.count -= 1
            self.stale += 1
            if self.stale > SWEEP_FLOOR + (self.count >> 2):
                self.sweep()

    def sweep(self) -> None:
        """Drop every stale entry (O(entries), run when they outnumber the bound)."""
        kept = 0
        for slots, ticks in zip(self.levels, self.ticks, strict=True):
            for i, slot in enumerate(slots):
                if not slot:
                    continue
                keep = [k for k, e in enumerate(slot) if e.wheel_slot is slot]
                if len(keep) != len(slot):
                    tk = ticks[i]
                    ticks[i] = array("q", [tk[k] for k in keep])
                    slot[:] = [slot[k] for k in keep]
                kept += len(slot)
        self.stale = kept - self.count

    def next_deadline(self) -> float | None:
        """When :meth:`advance` next has work: a due slot or a cascade; None if empty.
        A slot holding only stale entries may wake the loop for nothing, never late."""
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
        level0 = self.levels[0]
        ticks0 = self.ticks[0]
        while self.current < target and self.count:
            self.current += 1
            cur = self.current
            if not cur & _MASK:
                self._cascade(1)
            i = cur & _MASK
            slot = level0[i]
            if slot:
                n = 0
                for entry in slot:
                    if entry.wheel_slot is slot:
                        entry.wheel_slot = None
                        fired.append(entry)
                        n += 1
                self.count -= n
                self.stale -= len(slot) - n
                slot.clear()
                del ticks0[i][:]
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
        entries = slot[:]
        tks = self.ticks[level][idx]
        ticks = tks.tolist()
        slot.clear()
        del tks[:]
        # Newest first: an entry re-armed into the same slot has its current
        # deadline last; once placed, its older places here read as stale.
        for k in range(len(entries) - 1, -1, -1):
            entry = entries[k]
            if entry.wheel_slot is slot:
                self._place(entry, ticks[k])
            else:
                self.stale -= 1
