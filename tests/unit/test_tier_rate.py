"""Tier changes of a default SNAT address are rate-limited (issue 9, item 8): a move into
a higher tier happens whenever a new backend needs it; a move back into a lower tier
(growing every block) waits until the address has held its tier for idle_timeout.
Every test drives the core's clock by hand."""

from __future__ import annotations

import dataclasses

from gateway.core.events import fields as event_fields
from gateway.core.model import Pool, Timeouts
from gateway.core.table import TranslationTable
from tests.unit.conftest import DEFAULTS, POOL, SERVER, ip, lab_model, out, tcp, udp

IDLE = 1000.0
ADDR = ip(DEFAULTS[0])
A = "10.10.5.1"  # opens one TCP connection and resets it at once
NEWCOMER = "10.10.5.51"  # the 51st standalone backend: pushes the address to 512-port blocks
STAYING = tuple(f"10.10.5.{i}" for i in range(2, 51))


def block_size(t: TranslationTable) -> int:
    return t.addresses[ADDR].block_size


def tier_moves(t: TranslationTable) -> list[tuple[int, int]]:
    return [
        (int(e["old_block_size"]), int(e["new_block_size"]))
        for e in (event_fields(ev) for ev in t.events if ev.name == "pool_tier_changed")
        if e["public_ip"] == DEFAULTS[0]
    ]


def keep_alive(t: TranslationTable, now: float) -> None:
    """One packet on each staying backend's (and the newcomer's) UDP flow."""
    for b in (*STAYING, NEWCOMER):
        out(t, udp(b, SERVER, 40000, 5000), now)


def crowded(a_at: float, newcomer_at: float) -> TranslationTable:
    """A default address with A (TCP, reset at once), 49 staying backends and the newcomer."""
    t = TranslationTable(lab_model(defaults=(DEFAULTS[0],), timeouts=Timeouts(idle=IDLE)), 0.0)
    out(t, tcp(A, SERVER, 40000, 80, "S"), a_at)
    out(t, tcp(A, SERVER, 40000, 80, "R"), a_at)
    for b in STAYING:
        out(t, udp(b, SERVER, 40000, 5000), a_at)
    t.handle_timer(a_at + 5.0)  # A's flow is gone: A is vacant from about a_at
    assert block_size(t) == 1024
    out(t, udp(NEWCOMER, SERVER, 40000, 5000), newcomer_at)
    assert block_size(t) == 512, "a move into a higher tier is never held back"
    return t


def test_a_release_right_after_a_move_up_waits_until_the_address_held_its_tier_for_idle_timeout() -> None:
    """A's release falls due ~100 s after the newcomer moved the address up; A stays (vacant) and
    the blocks stay at 512 until 1000 s after the move, then A goes and they grow."""
    t = crowded(a_at=0.0, newcomer_at=900.0)
    keep_alive(t, 950.0)
    t.handle_timer(1050.0)  # A has been vacant for more than idle_timeout
    assert ip(A) in t.backends, "releasing A now would grow the address 150 s after it moved up"
    assert block_size(t) == 512 and tier_moves(t) == [(1024, 512)]
    due = t.get_timer()
    assert due is not None and due <= 900.0 + IDLE
    keep_alive(t, 1800.0)
    t.handle_timer(900.0 + IDLE - 1.0)
    assert ip(A) in t.backends and block_size(t) == 512
    t.handle_timer(900.0 + IDLE + 0.5)
    assert ip(A) not in t.backends
    assert block_size(t) == 1024 and tier_moves(t) == [(1024, 512), (512, 1024)]
    assert all(
        be.block is not None and be.block.size == 1024 for be in t.backends.values() if be.scenario == 3
    )
    assert t.counters_dict()["flows_ended_reclaimed"] == 0, "growing ends no flow"


def test_a_backend_that_returns_while_its_release_waits_keeps_its_block_and_nothing_flaps() -> None:
    """A speaks again while its release is held back: it keeps its block, no tier moves at all."""
    t = crowded(a_at=0.0, newcomer_at=900.0)
    keep_alive(t, 950.0)
    t.handle_timer(1050.0)
    block = t.backends[ip(A)].block
    out(t, udp(A, SERVER, 40001, 5000), 1100.0)
    assert t.backends[ip(A)].block is block
    keep_alive(t, 1800.0)
    t.handle_timer(2000.0)
    assert ip(A) in t.backends and block_size(t) == 512
    assert tier_moves(t) == [(1024, 512)]


def grown_back() -> TranslationTable:
    """The newcomer moves the address up at 10 s; A is busy until 900 s and released about
    1000 s later, long after the move: the address grows back at once."""
    t = crowded(a_at=0.0, newcomer_at=10.0)
    keep_alive(t, 800.0)
    out(t, tcp(A, SERVER, 40002, 80, "S"), 900.0)
    out(t, tcp(A, SERVER, 40002, 80, "R"), 900.0)
    t.handle_timer(905.0)  # A's flow is gone: vacant from about 900
    keep_alive(t, 1700.0)
    t.handle_timer(1850.0)
    assert ip(A) in t.backends and block_size(t) == 512
    t.handle_timer(2000.0)  # due by ~1905 however vacancy is counted; the move was 1990 s ago
    return t


def test_a_release_long_after_the_last_move_grows_the_address_at_once() -> None:
    """A release more than idle_timeout after the last move grows the blocks in the same pass."""
    t = grown_back()
    assert ip(A) not in t.backends
    assert block_size(t) == 1024 and tier_moves(t) == [(1024, 512), (512, 1024)]


def test_moves_up_are_never_delayed_even_right_after_a_move_down() -> None:
    """Just after growing back to 1024, the next newcomer halves the blocks again at once."""
    t = grown_back()
    assert block_size(t) == 1024
    out(t, udp("10.10.6.1", SERVER, 40000, 5000), 2000.5)
    assert block_size(t) == 512
    assert tier_moves(t) == [(1024, 512), (512, 1024), (1024, 512)]


def test_a_reload_is_not_rate_limited() -> None:
    """The operator's pool resizes apply at once, whatever the last move was."""
    t = TranslationTable(lab_model(), 0.0)
    fe = t.addresses[ip("198.51.100.10")]
    big = (*POOL, *(f"10.20.0.{i}" for i in range(1, 60)))
    t.reconfigure(dataclasses.replace(lab_model(), pools=(Pool("web", tuple(ip(m) for m in big)),)), 1.0)
    assert fe.block_size == 512
    t.reconfigure(lab_model(), 2.0)
    assert fe.block_size == 1024
