"""Port-block logging (RFC 6888 section 4, RFC 7422): the core's port_block_* events
and the log-based answer to "who held public ip:port at time T" (gateway/who.py)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from gateway import who
from gateway.core.events import PortBlockAllocated, PortBlockReleased, PortBlockResized
from gateway.core.events import fields as event_fields
from gateway.core.flow import EndReason
from gateway.core.model import LbRule, Pool, Timeouts
from gateway.core.table import TranslationTable
from tests.unit.conftest import (
    DEFAULTS,
    FRONTEND,
    INSTANCE,
    INSTANCE_PUBLIC,
    POOL,
    SERVER,
    ip,
    lab_model,
    out,
    tcp,
    udp,
)

T0 = 1_764_650_000.0  # wall time of the table's clock 0 in these tests


def block_events(t: TranslationTable, since: int = 0) -> list[dict[str, Any]]:
    return [
        {"event": e.name, **event_fields(e)}
        for e in t.events[since:]
        if isinstance(e, PortBlockAllocated | PortBlockResized | PortBlockReleased)
    ]


class Log:
    """What the adapter writes: each event as a JSON line with the time it was logged."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def drain(self, t: TranslationTable, now: float) -> None:
        for e in t.events:
            self.write(now, e.name, event_fields(e))
        t.events.clear()

    def write(self, now: float, event: str, keys: dict[str, Any] | None = None) -> None:
        rec = {**(keys or {}), "event": event, "level": "info", "timestamp": who.iso(T0 + now)}
        self.lines.append(json.dumps(rec))

    def who(self, public_ip: str, port: int, at: float) -> dict[str, Any]:
        return who.who_at(who.records(self.lines), public_ip, port, T0 + at)


# --------------------------------------------------------------------------- events


def test_start_allocates_a_block_per_configured_backend_and_instance_ips_hold_all_ports() -> None:
    """At start each pool member gets a port_block_allocated with its range; an instance IP all ports."""
    t = TranslationTable(lab_model(), 0.0)
    evs = {e["backend"]: e for e in block_events(t)}
    assert set(evs) == {*POOL, INSTANCE}
    assert evs[POOL[0]] == {
        "event": "port_block_allocated", "backend": POOL[0], "public_ip": FRONTEND,
        "ranges": ((1024, 2047),), "size": 1024, "scenario": "lb", "pool": "web",
    }  # fmt: skip
    assert evs[POOL[1]]["ranges"] == ((2048, 3071),)
    assert evs[INSTANCE]["public_ip"] == INSTANCE_PUBLIC and evs[INSTANCE]["ranges"] == ((0, 65535),)
    assert all(e["scenario"] == "instance_ip" for e in evs.values() if e["backend"] == INSTANCE)


def test_a_tier_move_logs_each_resized_block_and_a_release_logs_the_block_given_back() -> None:
    """The 51st standalone backend halves 50 blocks (50 port_block_resized, old and new ranges);
    a reload that drops a pool member logs port_block_released with the reason."""
    t = TranslationTable(lab_model(defaults=(DEFAULTS[0],)), 0.0)
    for i in range(1, 51):
        out(t, udp(f"10.10.5.{i}", SERVER, 40000, 5000), 1.0)
    since = len(t.events)
    out(t, udp("10.10.5.51", SERVER, 40000, 5000), 2.0)
    evs = block_events(t, since)
    resized = [e for e in evs if e["event"] == "port_block_resized"]
    assert len(resized) == 50
    first = next(e for e in resized if e["backend"] == "10.10.5.1")
    assert first == {
        "event": "port_block_resized", "backend": "10.10.5.1", "public_ip": DEFAULTS[0],
        "ranges": ((1024, 1535),), "size": 512, "old_ranges": ((1024, 2047),), "old_size": 1024,
        "reason": "tier_change",
    }  # fmt: skip
    (alloc,) = [e for e in evs if e["event"] == "port_block_allocated"]
    assert alloc["backend"] == "10.10.5.51" and alloc["size"] == 512 and alloc["scenario"] == "default"

    since = len(t.events)
    t.reconfigure(dataclasses.replace(lab_model(), pools=(Pool("web", (ip(POOL[0]),)),)), 3.0)
    released = [e for e in block_events(t, since) if e["event"] == "port_block_released"]
    assert {e["backend"] for e in released} == {POOL[1], POOL[2]}
    assert all(e["reason"] == "backend_removed" and e["size"] == 1024 for e in released)


def test_an_excluded_port_logs_the_block_that_lost_its_chunk() -> None:
    """An LB rule port moved into a block: that block's port_block_resized says port_excluded."""
    t = TranslationTable(lab_model(), 0.0)
    since = len(t.events)
    moved = dataclasses.replace(lab_model(), lb_rules=(LbRule("http", "fe-web", "web", "tcp", 1030, 8080),))
    t.reconfigure(moved, 1.0)
    (ev,) = block_events(t, since)
    assert (ev["event"], ev["backend"], ev["reason"]) == ("port_block_resized", POOL[0], "port_excluded")
    assert ev["old_ranges"] == ((1024, 2047),) and ev["size"] == 1024
    assert not any(lo <= 1030 <= hi for lo, hi in ev["ranges"])


# --------------------------------------------------------------------------- log lookup


def test_who_at_follows_a_standalone_block_through_allocation_release_and_reuse() -> None:
    """10.10.3.1 holds 1024-2047 from its first packet until its release; then 10.10.3.2 does."""
    log = Log()
    t = TranslationTable(lab_model(defaults=(DEFAULTS[0],), timeouts=Timeouts(idle=60.0)), 0.0)
    log.write(0.0, "gateway_ready")
    log.drain(t, 0.0)
    out(t, tcp("10.10.3.1", SERVER, 40000, 80, "S"), 10.0)
    log.drain(t, 10.0)
    out(t, tcp("10.10.3.1", SERVER, 40000, 80, "R"), 11.0)
    t.handle_timer(20.0)
    t.handle_timer(200.0)  # released: 60 s after its last flow, however that is counted
    log.drain(t, 200.0)
    assert ip("10.10.3.1") not in t.backends
    out(t, udp("10.10.3.2", SERVER, 40000, 53), 300.0)
    log.drain(t, 300.0)

    assert log.who(DEFAULTS[0], 1500, 5.0)["holder"] is None
    held = log.who(DEFAULTS[0], 1500, 50.0)
    assert held["holder"] == {
        "backend": "10.10.3.1", "since": who.iso(T0 + 10.0), "until": who.iso(T0 + 200.0),
        "event": "port_block_allocated", "end_event": "port_block_released",
    }  # fmt: skip
    gap = log.who(DEFAULTS[0], 1500, 250.0)
    assert gap["holder"] is None
    assert gap["previous"]["backend"] == "10.10.3.1" and gap["next"]["backend"] == "10.10.3.2"
    now = log.who(DEFAULTS[0], 2047, 400.0)["holder"]
    assert now["backend"] == "10.10.3.2" and now["until"] is None
    assert log.who(DEFAULTS[0], 2048, 400.0)["holder"] is None, "outside every block"
    assert log.who(FRONTEND, 1024, 1.0)["holder"]["backend"] == POOL[0]
    assert log.who(INSTANCE_PUBLIC, 40000, 1.0)["holder"]["backend"] == INSTANCE


def test_who_at_sees_the_upper_half_leave_a_block_at_a_tier_change() -> None:
    """After a halving, the upper half of a block is no longer its backend's (resized, not released)."""
    log = Log()
    t = TranslationTable(lab_model(defaults=(DEFAULTS[0],)), 0.0)
    for i in range(1, 52):
        out(t, udp(f"10.10.5.{i}", SERVER, 40000, 5000), float(i))
        log.drain(t, float(i))
    assert log.who(DEFAULTS[0], 2000, 10.0)["holder"]["backend"] == "10.10.5.1"
    after = log.who(DEFAULTS[0], 2000, 60.0)
    assert after["holder"] is None or after["holder"]["backend"] == "10.10.5.51", after
    assert after["previous"]["backend"] == "10.10.5.1", after
    assert after["previous"]["end_event"] == "port_block_resized"
    assert after["previous"]["until"] == who.iso(T0 + 51.0)
    assert log.who(DEFAULTS[0], 1500, 60.0)["holder"]["backend"] == "10.10.5.1"


def test_a_restart_ends_every_holding_even_without_a_release_line() -> None:
    """A crash leaves no release; the next gateway_ready closes what the old run held."""
    lines = [
        json.dumps({"event": "port_block_allocated", "backend": "10.10.3.1", "public_ip": DEFAULTS[0],
                    "ranges": [[1024, 2047]], "size": 1024, "timestamp": "2026-12-02T04:00:00Z"}),
        "Traceback (most recent call last): not JSON",
        json.dumps({"event": "gateway_ready", "timestamp": "2026-12-02T05:00:00Z"}),
        json.dumps({"event": "port_block_allocated", "backend": "10.10.3.9", "public_ip": DEFAULTS[0],
                    "ranges": [[1024, 2047]], "size": 1024, "timestamp": "2026-12-02T05:00:01Z"}),
    ]  # fmt: skip
    recs = list(who.records(lines))
    assert len(recs) == 3
    at = who.parse_time
    assert who.who_at(recs, DEFAULTS[0], 1024, at("2026-12-02T04:30:00Z"))["holder"]["backend"] == "10.10.3.1"
    assert who.who_at(recs, DEFAULTS[0], 1024, at("2026-12-02T05:00:00.5Z"))["holder"] is None
    assert who.who_at(recs, DEFAULTS[0], 1024, at("2026-12-02T06:00:00+01:00"))["holder"] is None
    assert who.who_at(recs, DEFAULTS[0], 1024, at("2026-12-02T05:30:00Z"))["holder"]["backend"] == "10.10.3.9"
    assert who.who_at(recs, DEFAULTS[0], 1024, at(str(at("2026-12-02T05:30:00Z"))))["holder"] is not None
    assert who.who_at(recs, "198.51.100.99", 1024, at("2026-12-02T05:30:00Z"))["intervals"] == 0


def test_parse_time_takes_unix_seconds_and_iso_and_refuses_the_rest() -> None:
    """Unix seconds and ISO 8601 (Z or offset) parse; anything else is a ValueError naming it."""
    assert who.parse_time("1764650000") == 1764650000.0
    assert who.parse_time("2025-12-02T04:33:20Z") == 1764650000.0
    assert who.parse_time("2025-12-02T05:33:20+01:00") == 1764650000.0
    with pytest.raises(ValueError, match="yesterday"):
        who.parse_time("yesterday")



def test_announce_blocks_replaces_queued_block_events_with_the_blocks_as_they_stand() -> None:
    """After a restore re-lays blocks out without events, announce_blocks logs each backend's
    block as it is now, once, and keeps every other queued event."""
    t = TranslationTable(lab_model(defaults=(DEFAULTS[0],)), 0.0)
    out(t, udp("10.10.3.1", SERVER, 40000, 53), 1.0)
    queued_other = [e for e in t.events if e.name not in who.BLOCK_EVENTS]
    be = t.backends[ip(POOL[0])]
    assert be.block is not None
    be.block.retile([be.block.chunks[0] + 100])  # as a restore might lay it out
    t.announce_blocks()
    evs = block_events(t)
    assert [e["backend"] for e in evs] == sorted({*POOL, INSTANCE, "10.10.3.1"}, key=ip)
    assert next(e for e in evs if e["backend"] == POOL[0])["ranges"] == ((4224, 4255),)
    assert [e for e in t.events if e.name not in who.BLOCK_EVENTS] == queued_other


# --------------------------------------------------------------------------- per-flow logging


def test_flows_are_not_logged_unless_log_flows_is_on() -> None:
    """By default a flow's start and end add no event; port blocks are the record."""
    t = TranslationTable(lab_model(), 0.0)
    out(t, udp(POOL[0], SERVER, 40000, 5000), 1.0)
    t.handle_timer(1000.0)
    assert t.flow_count() == 0
    assert not [e for e in t.events if e.name in who.FLOW_EVENTS]


def test_log_flows_logs_each_flow_once_at_start_and_end_and_who_lists_the_flows_then() -> None:
    """With log_flows a flow gets flow_created and one flow_ended (reason, counts), and
    `who --at` lists the flows that were on the port at that time."""
    t = TranslationTable(dataclasses.replace(lab_model(), log_flows=True), 0.0)
    log = Log()
    log.write(0.0, "gateway_ready")
    log.drain(t, 0.0)
    pub_port = out(t, udp(POOL[0], SERVER, 40000, 5000), 1.0)[0]
    log.drain(t, 1.0)
    (f,) = t.backends[ip(POOL[0])].flows
    created = {"protocol": "udp", "backend": POOL[0], "backend_port": 40000, "public_ip": FRONTEND,
               "public_port": pub_port, "remote": SERVER, "remote_port": 5000}  # fmt: skip
    assert [event_fields(e) for e in t.events] == []
    assert json.loads(log.lines[-1]) == {**created, "event": "flow_created", "level": "info",
                                         "timestamp": who.iso(T0 + 1.0)}  # fmt: skip
    t.end_flow(f, EndReason.REMOVED)
    t.end_flow(f, EndReason.REMOVED)
    ended = [event_fields(e) for e in t.events if e.name == "flow_ended"]
    assert ended == [{**created, "reason": "removed", "duration": 0.0, "packets_out": 1,
                      "bytes_out": f.bytes_out, "packets_in": 0, "bytes_in": 0}]  # fmt: skip
    log.drain(t, 30.0)
    assert [(x["backend_port"], x["since"]) for x in log.who(FRONTEND, pub_port, 10.0)["flows"]] == [
        (40000, who.iso(T0 + 1.0))
    ]
    assert log.who(FRONTEND, pub_port, 40.0)["flows"] == []
    assert log.who(FRONTEND, pub_port, 0.5)["flows"] == []
