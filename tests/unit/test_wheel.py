"""The hierarchical timer wheel fires entries on time, never early, at any distance."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.wheel import SWEEP_FLOOR, TimerWheel


@dataclass(eq=False)
class Entry:
    when: float
    wheel_slot: list[Any] | None = None


@settings(deadline=None, max_examples=60)
@given(st.lists(st.floats(0.01, 30000.0), min_size=1, max_size=40), st.floats(3.0, 900.0))
def test_fires_each_entry_once_not_early_and_within_a_tick(delays: list[float], step: float) -> None:
    """Entries come out once, no earlier than due and no later than one tick past the step."""
    w = TimerWheel(now=100.0)
    entries = [Entry(100.0 + d) for d in delays]
    for e in entries:
        w.schedule(e, e.when)
    now = 100.0
    fired: dict[int, float] = {}
    while len(fired) < len(entries):
        now += step
        for e in w.advance(now):
            assert id(e) not in fired
            fired[id(e)] = now
            assert e.when <= now + 1e-9
            assert now - e.when <= step + w.tick + 1e-9
    assert w.count == 0


def test_fine_steps_fire_within_one_tick() -> None:
    """Advancing tick by tick, an entry due in 100 s fires within one tick of its time."""
    w = TimerWheel(now=0.0)
    e = Entry(100.0)
    w.schedule(e, 100.0)
    now = 0.0
    while not w.advance(now):
        now += 0.05
    assert 100.0 <= now <= 100.0 + w.tick + 1e-9


def test_cancel_and_reschedule() -> None:
    """A cancelled entry never fires; rescheduling moves it."""
    w = TimerWheel(now=0.0)
    a, b = Entry(5.0), Entry(5.0)
    w.schedule(a, 5.0)
    w.schedule(b, 5.0)
    w.cancel(a)
    w.schedule(b, 300.0)
    assert w.advance(10.0) == []
    assert w.advance(300.2) == [b]


def test_next_deadline_tells_the_loop_when_to_wake() -> None:
    """next_deadline is None when empty and never later than the first due entry."""
    w = TimerWheel(now=0.0)
    assert w.next_deadline() is None
    e = Entry(3.0)
    w.schedule(e, 3.0)
    t = w.next_deadline()
    assert t is not None and t <= 3.0


def test_rearming_into_the_same_slot_fires_at_the_latest_deadline_once() -> None:
    """Two deadlines of one entry in one coarse slot: it fires once, at the later one."""
    w = TimerWheel(now=0.0)
    e = Entry(20.0)
    w.schedule(e, 20.0)
    w.schedule(e, 21.0)
    assert w.count == 1 and w.stale == 1
    assert w.advance(20.5) == []
    assert w.advance(21.2) == [e]
    assert w.count == 0 and w.stale == 0


def test_stale_entries_stay_bounded_under_rearms_and_cancels() -> None:
    """Places left by re-arms and cancels are swept once they pass the bound; the live
    entries still fire, each once, and the cancelled ones never."""
    w = TimerWheel(now=0.0)
    keep = [Entry(0.0) for _ in range(100)]
    for rnd in range(200):
        for i, e in enumerate(keep):
            w.schedule(e, 50.0 + rnd + i * 0.01)
        gone = Entry(0.0)
        w.schedule(gone, 60.0)
        w.cancel(gone)
        assert w.stale <= SWEEP_FLOOR + (w.count >> 2) + 1
    fired = w.advance(10000.0)
    assert sorted(map(id, fired)) == sorted(map(id, keep))
    assert w.count == 0


@settings(deadline=None, max_examples=80)
@given(
    st.lists(
        st.tuples(st.integers(0, 7), st.sampled_from(["arm", "cancel", "advance"]), st.floats(0.2, 600.0)),
        min_size=1,
        max_size=80,
    ),
    st.integers(0, 3),
)
def test_rearms_cancels_and_sweeps_fire_each_armed_entry_once_at_its_last_deadline(
    ops: list[tuple[int, str, float]], floor: int
) -> None:
    """Any mix of arming, re-arming, cancelling and advancing, with sweeps as often as
    every few stale places: an entry fires once, not before its latest deadline and
    within a tick of it (or of the step that passed it), and a cancelled one never."""
    import gateway.core.wheel as wheel_mod

    saved = wheel_mod.SWEEP_FLOOR
    wheel_mod.SWEEP_FLOOR = floor
    try:
        w = TimerWheel(now=0.0)
        entries = [Entry(0.0) for _ in range(8)]
        due: dict[int, float] = {}
        now = 0.0
        for k, op, x in ops:
            e = entries[k]
            if op == "arm":
                e.when = now + x
                w.schedule(e, e.when)
                due[k] = e.when
            elif op == "cancel":
                w.cancel(e)
                due.pop(k, None)
            else:
                step = min(x, 50.0)
                now += step
                for f in w.advance(now):
                    j = entries.index(f)
                    assert j in due, "fired while not armed"
                    assert due[j] <= now + 1e-9
                    assert now - due.pop(j) <= step + w.tick + 1e-9
            assert w.count == len(due)
        now += 1e6
        fired = [entries.index(f) for f in w.advance(now)]
        assert sorted(fired) == sorted(due)
        assert w.count == 0
    finally:
        wheel_mod.SWEEP_FLOOR = saved
