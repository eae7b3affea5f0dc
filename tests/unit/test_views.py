"""The operator's views of a table (gateway/core/views.py): flows, ports per backend,
stats and status, as plain JSON-serialisable data."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from gateway.core import views
from gateway.core.model import PROTO_ICMP, PROTO_TCP, PROTO_UDP, LbRule, Pool, Timeouts
from gateway.core.table import TranslationTable
from gateway.core.verdict import ACCEPT_MODIFIED_MARK, DROP
from tests.unit.conftest import (
    DEFAULTS,
    FRONTEND,
    INSTANCE,
    INSTANCE_PUBLIC,
    POOL,
    SERVER,
    SERVER2,
    STANDALONE,
    echo,
    ip,
    lab_model,
    out,
    tcp,
    udp,
)

WALL = 1_700_000_000.0


def as_json(data: Any) -> Any:
    """``data`` must survive strict JSON (no NaN or infinities) unchanged."""
    return json.loads(json.dumps(data, allow_nan=False))


def members(n: int) -> tuple[str, ...]:
    return (*POOL, *(f"10.20.{i // 200}.{i % 200 + 1}" for i in range(n - len(POOL))))


def busy_table() -> TranslationTable:
    """One flow per scenario and protocol, at distinct times, one of them answered."""
    t = TranslationTable(lab_model(), 0.0)
    out(t, udp(POOL[0], SERVER, 40000, 5000, b"x" * 10), 1.0)
    out(t, tcp(POOL[1], SERVER, 40001, 443, "S"), 2.0)
    out(t, echo(POOL[2], SERVER, 77), 3.0)
    out(t, udp(INSTANCE, SERVER2, 40003, 53), 4.0)
    out(t, udp(STANDALONE, SERVER2, 40004, 53), 5.0)
    assert t.out2in(udp(SERVER, FRONTEND, 5000, 1024, b"y" * 20), 6.0) == ACCEPT_MODIFIED_MARK
    return t


# --------------------------------------------------------------------------- flows


def test_flows_lists_every_flow_oldest_first_with_all_fields() -> None:
    """flows() gives one record per live flow, oldest first, with addresses, ports, age, idle
    and per-direction packet and byte counts."""
    t = busy_table()
    rows = views.flows(t, 10.0)
    assert as_json(rows) == rows
    assert [r["backend"] for r in rows] == [POOL[0], POOL[1], POOL[2], INSTANCE, STANDALONE]
    first = rows[0]
    out_len = len(udp(POOL[0], SERVER, 40000, 5000, b"x" * 10))
    in_len = len(udp(SERVER, FRONTEND, 5000, 1024, b"y" * 20))
    assert first == {
        "protocol": "udp",
        "backend": POOL[0],
        "backend_port": 40000,
        "public_ip": FRONTEND,
        "public_port": 1024,
        "remote": SERVER,
        "remote_port": 5000,
        "scenario": "lb",
        "direction": "out",
        "rule": "no group",
        "state": "active",
        "age": 9.0,
        "idle": 4.0,
        "packets_out": 1,
        "bytes_out": out_len,
        "packets_in": 1,
        "bytes_in": in_len,
    }
    by_backend = {r["backend"]: r for r in rows}
    assert [by_backend[b]["protocol"] for b in (POOL[1], POOL[2])] == ["tcp", "icmp"]
    assert by_backend[POOL[2]]["backend_port"] == 77 and by_backend[POOL[2]]["remote_port"] == 0
    assert (by_backend[INSTANCE]["scenario"], by_backend[INSTANCE]["public_ip"]) == (
        "instance_ip",
        INSTANCE_PUBLIC,
    )
    assert by_backend[INSTANCE]["public_port"] == 40003
    assert by_backend[STANDALONE]["scenario"] == "default"
    assert by_backend[STANDALONE]["public_ip"] in DEFAULTS
    assert (by_backend[STANDALONE]["age"], by_backend[STANDALONE]["idle"]) == (5.0, 5.0)
    assert by_backend[POOL[1]]["packets_in"] == 0 and by_backend[POOL[1]]["bytes_in"] == 0


def test_flows_filters_by_backend_and_protocol() -> None:
    """flows() with backend and/or proto returns only the matching flows."""
    t = busy_table()
    out(t, tcp(POOL[0], SERVER, 40010, 80, "S"), 7.0)
    out(t, echo(POOL[0], SERVER, 5), 7.5)
    mine = views.flows(t, 10.0, backend=ip(POOL[0]))
    assert [(r["protocol"], r["backend_port"]) for r in mine] == [("udp", 40000), ("tcp", 40010), ("icmp", 5)]
    assert {r["backend"] for r in mine} == {POOL[0]}
    tcp_rows = views.flows(t, 10.0, proto=PROTO_TCP)
    assert [(r["backend"], r["backend_port"]) for r in tcp_rows] == [(POOL[1], 40001), (POOL[0], 40010)]
    assert [r["backend_port"] for r in views.flows(t, 10.0, backend=ip(POOL[0]), proto=PROTO_ICMP)] == [5]
    assert views.flows(t, 10.0, backend=ip(POOL[1]), proto=PROTO_UDP) == []
    assert views.flows(t, 10.0, backend=ip("10.99.0.1")) == []
    assert len(views.flows(t, 10.0, proto=PROTO_UDP)) == 3


def test_flows_name_tcp_states() -> None:
    """A TCP flow shows syn_sent, established, fin_wait, closed and reset as it goes."""
    t = TranslationTable(lab_model(), 0.0)

    def state(bport: int) -> str:
        [row] = [r for r in views.flows(t, 5.0, proto=PROTO_TCP) if r["backend_port"] == bport]
        return str(row["state"])

    sport, src, _ = out(t, tcp(POOL[0], SERVER, 40000, 80, "S"), 0.0)
    assert state(40000) == "syn_sent"
    t.out2in(tcp(SERVER, src, 80, sport, "SA"), 0.1)
    assert state(40000) == "established"
    out(t, tcp(POOL[0], SERVER, 40000, 80, "FA"), 0.2)
    assert state(40000) == "fin_wait"
    t.out2in(tcp(SERVER, src, 80, sport, "FA"), 0.3)
    assert state(40000) == "closed"
    sport2, _, _ = out(t, tcp(POOL[0], SERVER, 40001, 80, "S"), 0.4)
    t.out2in(tcp(SERVER, src, 80, sport2, "RA", ack=1), 0.5)
    assert state(40001) == "reset"
    out(t, tcp(POOL[0], SERVER, 40002, 80, "PA", b"data"), 0.6)
    assert state(40002) == "established"
    assert {r["state"] for r in views.flows(t, 5.0, proto=PROTO_UDP)} == set()


# --------------------------------------------------------------------------- ports


def test_ports_counts_in_use_per_protocol_peak_and_top_destinations() -> None:
    """ports() gives a backend's block, ports in use and peak per protocol, and the
    destinations holding the most ports, most first."""
    t = TranslationTable(lab_model(timeouts=Timeouts(tcp_rst_linger=1.0)), 0.0)
    for i in range(5):
        out(t, udp(POOL[0], SERVER, 40000 + i, 5000), 1.0)
    for i in range(3):
        out(t, udp(POOL[0], SERVER2, 41000 + i, 53), 1.0)
    out(t, udp(POOL[0], "203.0.113.7", 42000, 123), 1.0)
    for i in range(2):
        sport, src, _ = out(t, tcp(POOL[0], SERVER, 43000 + i, 443, "S"), 1.0)
        t.out2in(tcp(SERVER, src, 443, sport, "RA", ack=1), 2.0)
    out(t, echo(POOL[0], SERVER, 9), 1.0)
    before = views.ports(t, 2.0, WALL, backend=ip(POOL[0]))
    assert as_json(before) == before
    [p] = before
    assert p["in_use"] == {"udp": 9, "tcp": 2, "icmp": 1}
    assert p["peak"] == {"udp": 9, "tcp": 2, "icmp": 1}
    assert p["top_destinations"] == [
        {"protocol": "udp", "destination": f"{SERVER}:5000", "ports": 5},
        {"protocol": "udp", "destination": f"{SERVER2}:53", "ports": 3},
        {"protocol": "tcp", "destination": f"{SERVER}:443", "ports": 2},
    ]
    t.handle_timer(3.5)
    [p] = views.ports(t, 4.0, WALL, backend=ip(POOL[0]), top=5)
    assert p == {
        "backend": POOL[0],
        "scenario": "lb",
        "pool": "web",
        "public_ip": FRONTEND,
        "block": [[1024, 2047]],
        "allocated": 1024,
        "in_use": {"udp": 9, "tcp": 0, "icmp": 1},
        "peak": {"udp": 9, "tcp": 2, "icmp": 1},
        "flows": 10,
        "top_destinations": [
            {"protocol": "udp", "destination": f"{SERVER}:5000", "ports": 5},
            {"protocol": "udp", "destination": f"{SERVER2}:53", "ports": 3},
            {"protocol": "udp", "destination": "203.0.113.7:123", "ports": 1},
            {"protocol": "icmp", "destination": f"{SERVER}:0", "ports": 1},
        ],
        "attempted": 12,
        "exhausted": 0,
        "flow_limit_drops": 0,
        "last_exhausted": None,
    }
    [top1] = views.ports(t, 4.0, WALL, backend=ip(POOL[0]), top=1)
    assert top1["top_destinations"] == [{"protocol": "udp", "destination": f"{SERVER}:5000", "ports": 5}]


def test_ports_lists_every_backend_by_address_or_one() -> None:
    """ports() without a backend covers every known backend in address order; an unknown
    backend gives an empty list."""
    t = busy_table()
    rows = views.ports(t, 10.0, WALL)
    assert as_json(rows) == rows
    order = [*POOL, INSTANCE, STANDALONE]
    assert [r["backend"] for r in rows] == sorted(order, key=ip)
    by = {r["backend"]: r for r in rows}
    assert [by[b]["block"] for b in POOL] == [[[1024, 2047]], [[2048, 3071]], [[3072, 4095]]]
    assert by[STANDALONE]["scenario"] == "default" and by[STANDALONE]["pool"] == ""
    assert by[STANDALONE]["allocated"] == 1024 and by[STANDALONE]["in_use"] == {"udp": 1}
    assert views.ports(t, 10.0, WALL, backend=ip("10.99.0.1")) == []
    assert [r["backend"] for r in views.ports(t, 10.0, WALL, backend=ip(POOL[2]))] == [POOL[2]]


def test_ports_of_an_instance_ip_backend_count_its_own_ports() -> None:
    """An instance IP backend has no block: allocated None, in_use counts the distinct
    source ports its flows use."""
    t = TranslationTable(lab_model(), 0.0)
    out(t, udp(INSTANCE, SERVER, 40000, 53), 1.0)
    out(t, udp(INSTANCE, SERVER2, 40000, 53), 1.0)
    out(t, udp(INSTANCE, SERVER, 40001, 53), 1.0)
    out(t, tcp(INSTANCE, SERVER, 40000, 443, "S"), 1.0)
    [p] = views.ports(t, 2.0, WALL, backend=ip(INSTANCE))
    assert as_json(p) == p
    assert (p["scenario"], p["public_ip"], p["block"], p["allocated"]) == (
        "instance_ip",
        INSTANCE_PUBLIC,
        [],
        None,
    )
    assert p["in_use"] == {"udp": 2, "tcp": 1}
    assert p["peak"] == {} and p["top_destinations"] == []
    assert (p["flows"], p["attempted"], p["exhausted"]) == (4, 4, 0)


def test_ports_report_exhaustion_attempts_and_last_time_on_the_wall_clock() -> None:
    """After a block runs out, ports() counts attempted and exhausted flows and gives the
    last exhaustion as wall time (wall - (now - t))."""
    t = TranslationTable(lab_model(members=members(801)), 0.0)
    for i in range(32):
        out(t, udp(POOL[0], SERVER, 40000 + i, 5000), 1.0)
    for now in (5.0, 6.0, 7.25):
        assert t.in2out(udp(POOL[0], SERVER, 39000 + int(now), 5000), now) == DROP
    rows = views.ports(t, 10.0, WALL)
    assert as_json(rows) == rows
    [p] = [r for r in rows if r["backend"] == POOL[0]]
    assert p["allocated"] == 32 and p["block"] == [[1024, 1055]]
    assert p["in_use"] == {"udp": 32} and p["peak"] == {"udp": 32}
    assert (p["attempted"], p["exhausted"]) == (35, 3)
    assert p["last_exhausted"] == WALL - (10.0 - 7.25)
    assert p["top_destinations"] == [{"protocol": "udp", "destination": f"{SERVER}:5000", "ports": 32}]
    [other] = [r for r in rows if r["backend"] == POOL[1]]
    assert (other["attempted"], other["exhausted"], other["last_exhausted"]) == (0, 0, None)
    assert other["in_use"] == {} and other["allocated"] == 32


# --------------------------------------------------------------------------- stats


def test_stats_counts_flows_by_state_and_snat_connections() -> None:
    """stats() gives counters, live flows by protocol and state, and SNAT connections
    attempted (created + failed) and failed (exhausted + no public address)."""
    model = dataclasses.replace(lab_model(members=members(801)), default_snat=())
    t = TranslationTable(model, 0.0)
    for i in range(32):
        out(t, udp(POOL[0], SERVER, 40000 + i, 5000), 1.0)
    assert t.in2out(udp(POOL[0], SERVER, 39999, 5000), 1.0) == DROP
    assert t.in2out(udp(STANDALONE, SERVER, 40000, 5000), 1.0) == DROP
    assert t.in2out(udp(STANDALONE, SERVER, 40001, 5000), 1.0) == DROP
    sport, src, _ = out(t, tcp(POOL[1], SERVER, 40000, 443, "S"), 1.0)
    out(t, tcp(POOL[1], SERVER, 40001, 443, "S"), 1.0)
    t.out2in(tcp(SERVER, src, 443, sport, "SA"), 1.1)
    out(t, echo(POOL[2], SERVER, 1), 1.0)
    s = views.stats(t)
    assert as_json(s) == s
    assert s["flows"] == {
        "tcp": {"syn_sent": 1, "established": 1},
        "udp": {"active": 32},
        "icmp": {"active": 1},
    }
    assert s["flows_total"] == 35
    assert s["snat_connections"] == {"attempted": 35 + 3, "failed": 3}
    assert s["drops"]["exhausted"] == 1 and s["drops"]["no_public_address"] == 2
    assert s["counters"]["flows_created"] == 35
    assert s["counters"] == t.counters_dict()
    assert set(s["drops"]) == {k[len("drop_") :] for k in s["counters"] if k.startswith("drop_")}
    assert s["tier_changes"] == 0


def test_stats_counts_ended_flows_by_reason_and_tier_changes() -> None:
    """stats() splits ended flows into idle, closed, reclaimed and removed, and counts tier changes."""
    t = TranslationTable(lab_model(timeouts=Timeouts(idle=10.0, tcp_rst_linger=1.0)), 0.0)
    out(t, udp(POOL[0], SERVER, 40000, 5000), 0.0)
    sport, src, _ = out(t, tcp(POOL[1], SERVER, 40000, 443, "S"), 0.0)
    t.out2in(tcp(SERVER, src, 443, sport, "RA", ack=1), 0.5)
    t.handle_timer(2.0)
    out(t, udp(POOL[2], SERVER, 40000, 5000), 3.0)
    for i in range(600):
        out(t, udp(POOL[1], SERVER2, 20000 + i, 53), 3.0)
    t.handle_timer(10.5)
    ended = {"idle": 1, "closed": 1, "reclaimed": 0, "removed": 0, "early_drop": 0}
    assert views.stats(t)["flows_ended"] == ended
    t.reconfigure(lab_model(members=members(60)[1:], timeouts=Timeouts(idle=10.0, tcp_rst_linger=1.0)), 11.0)
    s = views.stats(t)
    assert as_json(s) == s
    assert s["flows_ended"] == {"idle": 1, "closed": 1, "reclaimed": 600 - 512, "removed": 0, "early_drop": 0}
    assert s["tier_changes"] == 1
    t.reconfigure(lab_model(members=POOL[1:], timeouts=Timeouts(idle=10.0, tcp_rst_linger=1.0)), 12.0)
    s = views.stats(t)
    assert s["flows_ended"] == {"idle": 1, "closed": 1, "reclaimed": 88, "removed": 0, "early_drop": 0}
    assert s["tier_changes"] == 2
    t.reconfigure(lab_model(members=(POOL[1],), timeouts=Timeouts(idle=10.0, tcp_rst_linger=1.0)), 13.0)
    s = views.stats(t)
    assert s["flows_ended"]["removed"] == 1
    assert s["flows_total"] == 512
    assert sum(s["flows_ended"].values()) + s["flows_total"] == s["counters"]["flows_created"]


# --------------------------------------------------------------------------- status


def test_status_lists_addresses_and_pools_with_tiers() -> None:
    """status() shows each public address with kind, backends, block size and tier, and each
    pool with its frontend; an instance IP has no block or tier."""
    t = busy_table()
    st = views.status(t)
    assert as_json(st) == st
    addrs = {a["public_ip"]: a for a in st["addresses"]}
    assert addrs[FRONTEND] == {
        "public_ip": FRONTEND,
        "kind": "frontend",
        "name": "fe-web",
        "backends": 3,
        "block_size": 1024,
        "tier": 1,
    }
    assert addrs[INSTANCE_PUBLIC] == {
        "public_ip": INSTANCE_PUBLIC,
        "kind": "instance_ip",
        "name": "",
        "backends": 1,
        "block_size": None,
        "tier": None,
    }
    assert {addrs[d]["kind"] for d in DEFAULTS} == {"default_snat"}
    assert sorted(addrs[d]["backends"] for d in DEFAULTS) == [0, 1]
    assert {(addrs[d]["block_size"], addrs[d]["tier"]) for d in DEFAULTS} == {(1024, 1)}
    assert st["pools"] == [
        {
            "pool": "web",
            "frontend": "fe-web",
            "public_ip": FRONTEND,
            "members": 3,
            "backends_on_address": 3,
            "block_size": 1024,
            "tier": 1,
        }
    ]
    assert st["flows"] == 5


def test_status_tier_follows_the_pool_size() -> None:
    """status() reports tier 1 for 1024-port blocks, 2 for 512, 3 for 256 ... 6 for 32."""
    t = TranslationTable(lab_model(), 0.0)
    for n, size, tier in (
        (3, 1024, 1),
        (60, 512, 2),
        (101, 256, 3),
        (201, 128, 4),
        (401, 64, 5),
        (801, 32, 6),
    ):
        t.reconfigure(lab_model(members=members(n)), float(n))
        st = views.status(t)
        assert as_json(st) == st
        [front] = [a for a in st["addresses"] if a["public_ip"] == FRONTEND]
        assert (front["backends"], front["block_size"], front["tier"]) == (n, size, tier)
        [pool] = st["pools"]
        assert (pool["members"], pool["backends_on_address"], pool["block_size"], pool["tier"]) == (
            n,
            n,
            size,
            tier,
        )


def test_status_pool_without_an_lb_rule_has_no_frontend() -> None:
    """A pool no LB rule names shows no frontend, address, block size or tier."""
    base = lab_model()
    model = dataclasses.replace(
        base,
        pools=(*base.pools, Pool("batch", (ip("10.10.4.1"),))),
        lb_rules=(*base.lb_rules, LbRule("dns", "fe-web", "web", "udp", 53, 53)),
    )
    t = TranslationTable(model, 0.0)
    st = views.status(t)
    assert as_json(st) == st
    assert [p["pool"] for p in st["pools"]] == ["web", "batch"]
    assert st["pools"][1] == {
        "pool": "batch",
        "frontend": "",
        "public_ip": None,
        "members": 1,
        "backends_on_address": 0,
        "block_size": None,
        "tier": None,
    }
    sport, src, _ = out(t, udp("10.10.4.1", SERVER, 40000, 5000), 1.0)
    assert src in DEFAULTS
    assert sum(a["backends"] for a in views.status(t)["addresses"] if a["kind"] == "default_snat") == 1


# --------------------------------------------------------------------------- who


def test_who_names_the_block_holder_and_its_live_flows_on_that_port() -> None:
    """who() on a pool member's port: the member, its block, and only the flows on that port."""
    t = busy_table()
    udp_flow = next(f for f in t.backends[ip(POOL[0])].flows)
    port = udp_flow.public_port
    r = as_json(views.who(t, ip(FRONTEND), port, 7.0))
    assert r["kind"] == "frontend" and r["name"] == "fe-web" and r["reason"] is None
    assert r["holder"] == {
        "backend": POOL[0], "scenario": "lb", "pool": "web", "block": [[1024, 2047]], "allocated": 1024,
        "flows": 1,
    }  # fmt: skip
    assert [(f["protocol"], f["public_port"], f["remote"]) for f in r["flows"]] == [("udp", port, SERVER)]
    assert views.who(t, ip(FRONTEND), port, 7.0, PROTO_TCP)["flows"] == []
    assert views.who(t, ip(FRONTEND), 2047, 7.0)["holder"]["backend"] == POOL[0]
    assert views.who(t, ip(FRONTEND), 2048, 7.0)["holder"]["backend"] == POOL[1]


def test_who_says_why_nobody_holds_a_port() -> None:
    """Not ours, an LB rule's frontend port, below 1024, a free chunk: holder None with a reason."""
    t = busy_table()
    cases = {
        ("203.0.113.1", 5000): "not a public address",
        (FRONTEND, 80): "frontend port of an LB rule",
        (FRONTEND, 1000): "below 1024",
        (FRONTEND, 60000): "in no backend's block",
    }
    for (addr, port), reason in cases.items():
        r = views.who(t, ip(addr), port, 7.0)
        assert r["holder"] is None and reason in r["reason"], (addr, port, r)


def test_who_on_an_instance_ip_and_a_standalone_backend() -> None:
    """An instance IP's backend holds every port; a standalone one its block on the default address."""
    t = busy_table()
    r = views.who(t, ip(INSTANCE_PUBLIC), 40003, 7.0)
    assert r["holder"]["backend"] == INSTANCE and r["holder"]["block"] == [[0, 65535]]
    assert [f["backend_port"] for f in r["flows"]] == [40003]
    assert views.who(t, ip(INSTANCE_PUBLIC), 9, 7.0)["flows"] == []
    sa = t.backends[ip(STANDALONE)]
    (f,) = sa.flows
    r = views.who(t, sa.address.ip, f.public_port, 7.0, PROTO_UDP)
    assert r["kind"] == "default_snat" and r["holder"]["backend"] == STANDALONE
    assert r["holder"]["scenario"] == "default" and len(r["flows"]) == 1
    assert r["public_ip"] in DEFAULTS
