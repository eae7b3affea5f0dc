"""The operator's view of a table: flows, ports per backend, counters and
status as plain data (lists, dicts, numbers, strings).

These are snapshots: the adapter calls them between two packets, in the
loop's own thread, so nothing here needs a lock; it formats them (tables,
JSON, Prometheus) elsewhere. ``now`` is the table's clock (monotonic) and
``wall`` the wall-clock time at that instant, so times can be shown as
dates.
"""

from __future__ import annotations

import heapq
from typing import Any, NamedTuple

from gateway.core.address import SCENARIO_NAMES, Backend, ip_str
from gateway.core.block import CHUNK_SHIFT
from gateway.core.flow import STATE_NAMES, Flow
from gateway.core.model import PROTO_NAMES
from gateway.core.table import TranslationTable
from gateway.core.tier import PORT_MIN


class FlowRecord(NamedTuple):
    """One flow as :func:`flow_records` copies it in the loop's thread (plain numbers)."""

    proto: int
    backend: int
    backend_port: int
    public: int
    public_port: int
    remote: int
    remote_port: int
    scenario: int
    state: int
    created: float
    last_seen: float
    pkts_out: int
    bytes_out: int
    pkts_in: int
    bytes_in: int
    inbound: bool
    #: The label of the security decision that admitted the flow ("" when none).
    rule: str


def _record(f: Flow) -> FlowRecord:
    d = f.decision
    return FlowRecord(
        f.proto, f.backend, f.backend_port, f.public, f.public_port, f.remote, f.remote_port, f.scenario,
        f.state, f.created, f.last_seen, f.pkts_out, f.bytes_out, f.pkts_in, f.bytes_in, f.inbound,
        d.label if d is not None else "",
    )  # fmt: skip


def flow_records(
    table: TranslationTable, backend: int | None = None, proto: int | None = None
) -> list[FlowRecord]:
    """A copy of every live flow (optionally of one backend or protocol) as tuples.

    This is the part that must run in the loop's thread, so it only copies;
    :func:`flow_rows` turns the copy into rows anywhere else.
    """
    out: list[FlowRecord] = []
    for p, d in table.inside.items():
        if proto is not None and p != proto:
            continue
        if backend is not None:
            be = table.backends.get(backend)
            flows_ = [f for f in be.flows if f.proto == p] if be is not None else []
        else:
            flows_ = list(d.values())
        out += [_record(f) for f in flows_]
    return out


def flow_rows(records: list[FlowRecord], now: float) -> list[dict[str, Any]]:
    """Rows for ``snatgw flows`` from :func:`flow_records`, oldest flow first."""
    rows = []
    for r in sorted(records, key=lambda r: r.created):
        rows.append(
            {
                "protocol": PROTO_NAMES[r.proto],
                "backend": ip_str(r.backend),
                "backend_port": r.backend_port,
                "public_ip": ip_str(r.public),
                "public_port": r.public_port,
                "remote": ip_str(r.remote),
                "remote_port": r.remote_port,
                "scenario": SCENARIO_NAMES[r.scenario],
                # "in": opened from the outside (docs/model.md, "Inbound").
                "direction": "in" if r.inbound else "out",
                "rule": r.rule,
                "state": STATE_NAMES[r.state],
                "age": round(now - r.created, 3),
                "idle": round(now - r.last_seen, 3),
                "packets_out": r.pkts_out,
                "bytes_out": r.bytes_out,
                "packets_in": r.pkts_in,
                "bytes_in": r.bytes_in,
            }
        )
    return rows


def flows(
    table: TranslationTable, now: float, backend: int | None = None, proto: int | None = None
) -> list[dict[str, Any]]:
    """Every live flow (optionally of one backend or protocol), oldest first."""
    return flow_rows(flow_records(table, backend, proto), now)


def _destination(dest: bytes) -> str:
    return f"{ip_str(int.from_bytes(dest[:4], 'big'))}:{int.from_bytes(dest[4:], 'big')}"


def backend_ports(be: Backend, now: float, wall: float, top: int = 3) -> dict[str, Any]:
    """One backend's port use (docs/model.md, "What the operator is told to do about exhaustion").

    ``in_use`` counts ports carrying at least one flow, per protocol (TCP,
    UDP and ICMP identifiers are separate spaces); ``top_destinations`` are
    the destinations holding the most ports, the usual culprit when a block
    runs out. An instance IP has no block: its backend keeps its own ports.
    """
    block = be.block
    in_use: dict[str, int] = {}
    peak: dict[str, int] = {}
    cands: list[tuple[int, str, str]] = []
    if block is not None:
        for p, inv in block.inventories.items():
            in_use[PROTO_NAMES[p]] = inv.in_use
            peak[PROTO_NAMES[p]] = inv.peak
            for dest, n in heapq.nlargest(top, inv.dest.items(), key=lambda kv: kv[1]):
                cands.append((n, PROTO_NAMES[p], _destination(dest)))
    else:
        per: dict[int, set[int]] = {}
        for f in be.flows:
            if f.public == be.address.ip:  # not an LB rule's inbound flow on a frontend port
                per.setdefault(f.proto, set()).add(f.public_port)
        for p, ports in per.items():
            in_use[PROTO_NAMES[p]] = len(ports)
    last = be.last_exhausted
    return {
        "backend": ip_str(be.ip),
        "scenario": SCENARIO_NAMES[be.scenario],
        "pool": be.pool,
        "public_ip": ip_str(be.address.ip),
        "block": [list(r) for r in block.ranges()] if block is not None else [],
        "allocated": block.size if block is not None else None,
        "in_use": in_use,
        "peak": peak,
        "flows": be.flow_count,
        "top_destinations": [
            {"protocol": p, "destination": d, "ports": n} for n, p, d in sorted(cands, reverse=True)[:top]
        ],
        "attempted": be.created + be.exhausted,
        "exhausted": be.exhausted,
        # New flows refused at a flow cap (docs/decisions.md, "Flow caps").
        "flow_limit_drops": be.refused,
        "last_exhausted": wall - (now - last) if be.exhausted else None,
    }


def ports(
    table: TranslationTable, now: float, wall: float, backend: int | None = None, top: int = 3
) -> list[dict[str, Any]]:
    """:func:`backend_ports` for every backend (or one), by address."""
    if backend is None:
        bes = sorted(table.backends.values(), key=lambda b: b.ip)
    else:
        bes = [table.backends[backend]] if backend in table.backends else []
    return [backend_ports(be, now, wall, top) for be in bes]


def stats(table: TranslationTable) -> dict[str, Any]:
    """Counters by name, live flows by protocol and state, and the SNAT connection counts."""
    c = table.counters_dict()
    by: dict[str, dict[str, int]] = {}
    for p, d in table.inside.items():
        states: dict[str, int] = {}
        for f in d.values():
            name = STATE_NAMES[f.state]
            states[name] = states.get(name, 0) + 1
        by[PROTO_NAMES[p]] = states
    failed = c["drop_exhausted"] + c["drop_no_public_address"]
    # Flows opened from the outside are no SNAT connections.
    snat = c["flows_created"] - c["inbound_flows_created"]
    return {
        "counters": c,
        "flows": by,
        "flows_total": table.flow_count(),
        "snat_connections": {"attempted": snat + failed, "failed": failed},
        "flows_ended": {k[len("flows_ended_") :]: v for k, v in c.items() if k.startswith("flows_ended_")},
        "drops": {k[len("drop_") :]: v for k, v in c.items() if k.startswith("drop_")},
        "tier_changes": table.tier_changes,
        "flow_limits": {"max_flows": table.model.max_flows,
                        "max_flows_per_backend": table.model.max_flows_per_backend},
    }


def status(table: TranslationTable) -> dict[str, Any]:
    """Public addresses (kind, backends, block size, tier) and pools with their frontend."""
    addresses = []
    for addr in table.addresses.values():
        addresses.append(
            {
                "public_ip": ip_str(addr.ip),
                "kind": str(addr.kind),
                "name": addr.name,
                "backends": len(addr.members),
                "block_size": addr.block_size or None,
                "tier": addr.tier or None,
            }
        )
    by_name = {a.name: a for a in table.addresses.values() if a.name}
    pools = []
    for pool in table.model.pools:
        fe = table.pool_frontend.get(pool.name, "")
        front = by_name.get(fe)
        pools.append(
            {
                "pool": pool.name,
                "frontend": fe,
                "public_ip": ip_str(front.ip) if front is not None else None,
                "members": len(pool.members),
                "backends_on_address": len(front.members) if front is not None else 0,
                "block_size": front.block_size if front is not None else None,
                "tier": front.tier if front is not None else None,
            }
        )
    return {"addresses": addresses, "pools": pools, "flows": table.flow_count(), "health": health(table)}


def health(
    table: TranslationTable, now: float | None = None, wall: float | None = None
) -> list[dict[str, Any]]:
    """Every probed (probe, member) pair (docs/model.md, "Health probes"): its
    state, since when (the table's clock; a wall time when ``now`` and ``wall``
    are given), its failures in a row and the LB rules that use it."""
    pools = {p.name: set(p.members) for p in table.model.pools}
    using: dict[tuple[str, int], list[str]] = {}
    for r in table.model.lb_rules:
        if r.probe:
            for m in sorted(pools.get(r.pool, ())):
                using.setdefault((r.probe, m), []).append(r.name)
    rows = []
    for (probe, member), h in table.health.pairs.items():
        since = h.since if now is None or wall is None else wall - (now - h.since)
        rows.append(
            {
                "probe": probe,
                "member": ip_str(member),
                "state": "up" if h.up else "down",
                "since": since,
                "failures": h.failures,
                "rules": using.get((probe, member), []),
            }
        )
    return rows


def rules(table: TranslationTable, backend: int | None = None) -> list[dict[str, Any]]:
    """``snatgw rules``: every rule that applies to ``backend`` (all backends: None),
    per direction in evaluation order, Azure's defaults included, with hit counts
    (docs/model.md, "Security groups")."""
    return [dict(r) for r in table.security.effective_rules(backend)]


def who(
    table: TranslationTable, public_ip: int, port: int, now: float, proto: int | None = None
) -> dict[str, Any]:
    """Who holds ``public_ip:port`` now: the backend whose block holds the port (an
    instance IP's backend holds every port of its address) and its live flows on it
    (``snatgw who``; RFC 6888 section 4 asks that a CGN can say this).

    ``holder`` is None with a ``reason`` when nobody does: not one of our
    addresses, an LB rule's frontend port, below the SNAT range, or a free
    chunk. ``proto`` only filters the flows: a block serves TCP, UDP and
    ICMP alike. Costs one pass over the address's members and the holder's
    flows (in the loop's thread).
    """
    out: dict[str, Any] = {
        "public_ip": ip_str(public_ip),
        "port": port,
        "protocol": PROTO_NAMES[proto] if proto is not None else None,
        "kind": None,
        "name": None,
        "holder": None,
        "reason": None,
        "flows": [],
    }
    addr = table.addresses.get(public_ip)
    if addr is None:
        out["reason"] = "not a public address of this gateway"
        return out
    out["kind"], out["name"] = str(addr.kind), addr.name
    holder: Backend | None = None
    layout = addr.layout
    if layout is None:
        holder = next(iter(addr.members.values()), None)
        if holder is None:
            out["reason"] = "instance IP without its backend"
    elif port in layout.excluded:
        out["reason"] = "frontend port of an LB rule: never in a block"
    elif port < PORT_MIN:
        out["reason"] = f"below {PORT_MIN}: never used for SNAT"
    else:
        chunk = port >> CHUNK_SHIFT
        holder = next(
            (b for b in addr.members.values() if b.block is not None and chunk in b.block.chunks), None
        )
        if holder is None:
            out["reason"] = "in no backend's block (free)"
    if holder is None:
        return out
    block = holder.block
    out["holder"] = {
        "backend": ip_str(holder.ip),
        "scenario": SCENARIO_NAMES[holder.scenario],
        "pool": holder.pool,
        "block": [list(r) for r in block.ranges()] if block is not None else [[0, 65535]],
        "allocated": block.size if block is not None else None,
        "flows": holder.flow_count,
    }
    mine = [f for f in holder.flows if f.public_port == port and (proto is None or f.proto == proto)]
    out["flows"] = flow_rows([_record(f) for f in mine], now)
    return out
