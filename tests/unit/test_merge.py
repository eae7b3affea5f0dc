"""Merging N workers' answers into the gateway's one view (gateway/merge.py): counts
add up, per-backend rows come from the owner, per-address rows are combined, flows say
their worker."""

from __future__ import annotations

from typing import Any

from gateway import merge


def _flow(backend: str, age: float) -> dict[str, Any]:
    return {"backend": backend, "age": age, "protocol": "udp"}


def test_flows_concatenated_with_worker_oldest_first() -> None:
    """Every worker's flows appear once, each row naming its worker, oldest first."""
    rows = merge.flows([[_flow("10.10.1.2", 1.0)], [_flow("10.10.1.1", 5.0), _flow("10.10.1.3", 0.5)]])
    assert [(r["backend"], r["worker"]) for r in rows] == [
        ("10.10.1.1", 1),
        ("10.10.1.2", 0),
        ("10.10.1.3", 1),
    ]


def _port_row(backend: str, flows: int) -> dict[str, Any]:
    return {"backend": backend, "flows": flows, "public_ip": "198.51.100.30"}


def test_ports_row_from_the_owner() -> None:
    """A backend's port row is its owner's ((ip & 15) % N), whatever the others hold."""
    w0 = [_port_row("10.10.1.1", 0), _port_row("10.10.1.2", 7)]
    w1 = [_port_row("10.10.1.1", 4), _port_row("10.10.1.2", 0)]
    rows = merge.ports([w0, w1])
    assert [(r["backend"], r["flows"]) for r in rows] == [("10.10.1.1", 4), ("10.10.1.2", 7)]


def test_ports_sorted_by_address_and_unowned_kept() -> None:
    """Rows are in address order (10.10.1.10 after 10.10.1.9); a backend only a
    non-owner reports is still shown."""
    rows = merge.ports([[_port_row("10.10.1.10", 1)], [_port_row("10.10.1.9", 2)]])
    assert [r["backend"] for r in rows] == ["10.10.1.9", "10.10.1.10"]


def _stats(created: int, udp_active: int, tier: int) -> dict[str, Any]:
    return {
        "counters": {"flows_created": created, "drop_misrouted": 0, "requeued": 1},
        "flows": {"udp": {"active": udp_active}},
        "flows_total": udp_active,
        "snat_connections": {"attempted": created, "failed": 0},
        "flows_ended": {"idle": 1},
        "drops": {"misrouted": 0},
        "tier_changes": tier,
        "flow_limits": {"max_flows": 100, "max_flows_per_backend": 10},
    }


def test_stats_add_up() -> None:
    """Counters, flows by state, totals and drops add up; caps are the configured ones."""
    s = merge.stats([_stats(3, 2, 1), _stats(4, 5, 1)])
    assert s["counters"] == {"flows_created": 7, "drop_misrouted": 0, "requeued": 2}
    assert s["flows"] == {"udp": {"active": 7}}
    assert s["flows_total"] == 7
    assert s["snat_connections"] == {"attempted": 7, "failed": 0}
    assert s["flows_ended"] == {"idle": 2}
    assert s["tier_changes"] == 1
    assert s["flow_limits"] == {"max_flows": 100, "max_flows_per_backend": 10}


def _status(members: list[str], block: int | None, flows: int) -> dict[str, Any]:
    return {
        "addresses": [
            {
                "public_ip": "198.51.100.10",
                "kind": "frontend",
                "name": "fe-web",
                "backends": len(members),
                "block_size": block,
                "tier": 1 if block else None,
            }
        ],
        "pools": [
            {
                "pool": "web",
                "frontend": "fe-web",
                "public_ip": "198.51.100.10",
                "members": 3,
                "backends_on_address": len(members),
                "block_size": block,
                "tier": 1 if block else None,
            }
        ],
        "flows": flows,
        "health": [],
        "members": {"198.51.100.10": members},
    }


def test_status_addresses_combined() -> None:
    """Backends on an address are counted once over the workers; block size and tier
    are those reported; flows add up."""
    s = merge.status([
        _status(["10.10.1.2"], 1024, 2),
        _status(["10.10.1.1", "10.10.1.3"], 1024, 5),
    ])  # fmt: skip
    (addr,) = s["addresses"]
    assert (addr["backends"], addr["block_size"], addr["tier"]) == (3, 1024, 1)
    (pool,) = s["pools"]
    assert (pool["backends_on_address"], pool["block_size"]) == (3, 1024)
    assert s["flows"] == 7


def test_status_same_members_everywhere_not_doubled() -> None:
    """Workers that each list every member still count each backend once."""
    all3 = ["10.10.1.1", "10.10.1.2", "10.10.1.3"]
    s = merge.status([_status(all3, 1024, 0), _status(all3, None, 0)])
    assert s["addresses"][0]["backends"] == 3
    assert s["addresses"][0]["block_size"] == 1024


def _health(member: str, state: str) -> dict[str, Any]:
    return {"probe": "p", "member": member, "state": state, "since": 0.0, "failures": 0, "rules": []}


def test_health_from_the_members_owner() -> None:
    """A member's probe health is the view of the worker that owns the member."""
    rows = merge.health([
        [_health("10.10.1.1", "down"), _health("10.10.1.2", "up")],
        [_health("10.10.1.1", "up"), _health("10.10.1.2", "down")],
    ])  # fmt: skip
    assert [(r["member"], r["state"]) for r in rows] == [("10.10.1.1", "up"), ("10.10.1.2", "up")]


def test_rules_hits_add_up() -> None:
    """A rule's hits are the sum over the workers; rows keep the first worker's order."""
    row = {
        "backend": "10.10.1.1",
        "group": "g",
        "attached": "nic",
        "direction": "inbound",
        "name": "r1",
        "hits": 2,
    }
    rows = merge.rules([[row], [{**row, "hits": 3}]])
    assert rows == [{**row, "hits": 5}]


def test_who_from_the_holder() -> None:
    """who: the worker whose table holds the port answers; otherwise the first reason."""
    free = {"holder": None, "reason": "in no backend's block (free)", "flows": []}
    held = {"holder": {"backend": "10.10.1.1"}, "reason": None, "flows": [1]}
    assert merge.who([free, held])["holder"] == {"backend": "10.10.1.1"}
    assert merge.who([free, held])["worker"] == 1
    assert merge.who([free, free])["reason"] == "in no backend's block (free)"


def test_security_and_latency_add_up() -> None:
    """Security hits and denials add up per rule; latency histograms bucket by bucket."""
    part = {
        "hits": [{"group": "g", "direction": "inbound", "rule": "r", "hits": 2}],
        "denials": [{"backend": "10.10.1.1", "group": "g", "rule": "r", "direction": "inbound", "flows": 1}],
    }
    sec = merge.security([part, part])
    assert sec["hits"][0]["hits"] == 4
    assert sec["denials"][0]["flows"] == 2
    assert merge.latency([([1, 2, 0], 0.5), ([0, 1, 3], 0.25)]) == ([1, 3, 3], 0.75)


def test_reload_summary_largest_with_each() -> None:
    """A reload adds up backends (each worker places its own), takes the largest of the
    other counts, and keeps each worker's summary."""
    s = merge.reload_summary(
        [{"backends_added": 2, "tier_changes": 0}, {"backends_added": 1, "tier_changes": 1}]
    )
    assert (s["backends_added"], s["tier_changes"]) == (3, 1)
    assert len(s["workers"]) == 2


def test_metrics_per_worker_rows() -> None:
    """The metrics snapshot has one row per worker with its flows and packets."""
    part = {
        "stats": {**_stats(1, 2, 0), "counters": {"in2out_translated": 5, "out2in_translated": 4}},
        "ports": [],
        "status": _status([], None, 2),
        "security": {"hits": [], "denials": []},
        "health": [],
        "latency": ([1], 0.1),
    }
    snap = merge.metrics([part, part])
    assert snap["per_worker"] == [
        {"worker": 0, "flows": 2, "packets": 9},
        {"worker": 1, "flows": 2, "packets": 9},
    ]
    assert snap["stats"]["counters"]["in2out_translated"] == 10
