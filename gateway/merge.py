"""The operator's view of N workers as one gateway (README, "Workers";
docs/decisions.md, "Workers: processes and the supervisor").

Each worker answers a control command from its own table, in the shape
:mod:`gateway.core.views` gives it; the supervisor merges the N answers
here. Pure functions of plain data (lists, dicts, numbers, strings).

How each kind of row merges, and why:

- **counters, flow counts, histograms** add up: every packet and every
  flow is handled by exactly one worker;
- **per-backend rows** (``ports``, ``health``) come from the worker that
  owns the backend (:func:`gateway.core.shard.backend_owner`): only that
  worker's table lays its block and holds its flows; another worker's row
  for the same backend is an idle copy (and its health is that worker's own
  prober's opinion, which steers only that worker's choices);
- **per-address rows** (``status`` addresses and pools) are combined: the
  backends on an address are the union of the members each worker reports
  (``members``), block size and tier the largest any worker reports (a
  worker with none of the address's backends reports none);
- **flows** are concatenated, each row saying its ``worker``;
- **security rule hits** add up per rule, denials per backend and rule;
- a **reload** summary adds up backends and flows (each worker places its
  own) and takes the largest of the other counts (every worker applies the
  same model), with each worker's own summary alongside.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from gateway.core.shard import backend_owner

Rows = list[dict[str, Any]]


def _ip(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


def _owner(text: str, count: int) -> int:
    return backend_owner(_ip(text), count)


def _add(into: dict[str, Any], other: dict[str, Any]) -> None:
    """``into`` += ``other``, key by key, numbers added and dicts merged likewise."""
    for k, v in other.items():
        if isinstance(v, dict):
            _add(into.setdefault(k, {}), v)
        elif isinstance(v, bool) or not isinstance(v, int | float):
            into.setdefault(k, v)
        else:
            into[k] = into.get(k, 0) + v


def flows(parts: Sequence[Rows]) -> Rows:
    """Every worker's flows, each row with its ``worker``, oldest first."""
    rows = [{**row, "worker": i} for i, part in enumerate(parts) for row in part]
    rows.sort(key=lambda r: -r.get("age", 0.0))
    return rows


def owned(parts: Sequence[Rows], key: str) -> Rows:
    """Per-backend rows (``key`` holds the backend address): the owner's row of each
    backend, by address. A backend no owner reports (a standalone backend the owner has
    not seen) falls back to the first worker that has it."""
    count = len(parts)
    chosen: dict[str, dict[str, Any]] = {}
    for i, part in enumerate(parts):
        for row in part:
            b = row[key]
            if _owner(b, count) == i or b not in chosen:
                chosen[b] = row
    return [chosen[b] for b in sorted(chosen, key=_ip)]


def ports(parts: Sequence[Rows]) -> Rows:
    """``snatgw ports``: each backend's row from its owner."""
    return owned(parts, "backend")


def health(parts: Sequence[Rows]) -> Rows:
    """Probe health: each (probe, member) row from the member's owner."""
    count = len(parts)
    chosen: dict[tuple[str, str], dict[str, Any]] = {}
    for i, part in enumerate(parts):
        for row in part:
            k = (row["probe"], row["member"])
            if _owner(row["member"], count) == i or k not in chosen:
                chosen[k] = row
    return [chosen[k] for k in sorted(chosen, key=lambda k: (k[0], _ip(k[1])))]


def stats(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``snatgw stats``: every count added up; ``flow_limits`` are the configured caps
    (the same in every worker); ``tier_changes`` the most any worker counted (every
    worker places every address, so each sees the same changes)."""
    out: dict[str, Any] = {}
    for part in parts:
        _add(out, {k: v for k, v in part.items() if k not in ("flow_limits", "tier_changes")})
    out["tier_changes"] = max((p.get("tier_changes", 0) for p in parts), default=0)
    out["flow_limits"] = dict(parts[0].get("flow_limits", {})) if parts else {}
    return out


def _combine(rows: Sequence[dict[str, Any]], keys: Sequence[str], members: int | None) -> dict[str, Any]:
    """One per-address row from every worker's: block size and tier the largest reported."""
    out = dict(rows[0])
    for k in keys:
        values = [r[k] for r in rows if r.get(k) is not None]
        out[k] = max(values) if values else None
    if members is not None:
        out["backends" if "backends" in out else "backends_on_address"] = members
    return out


def _members(parts: Sequence[dict[str, Any]]) -> dict[str, set[str]]:
    union: dict[str, set[str]] = {}
    for part in parts:
        for ip, ms in part.get("members", {}).items():
            union.setdefault(ip, set()).update(ms)
    return union


def status(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What ``views.status`` says for the whole gateway. Each part may carry
    ``members`` ({public_ip: [backend, ...]} of that worker's table), from which the
    backends per address are counted once each."""
    union = _members(parts)
    addresses: dict[str, list[dict[str, Any]]] = {}
    for part in parts:
        for a in part["addresses"]:
            addresses.setdefault(a["public_ip"], []).append(a)
    pools: dict[str, list[dict[str, Any]]] = {}
    for part in parts:
        for p in part["pools"]:
            pools.setdefault(p["pool"], []).append(p)
    addr_rows = []
    for ip, rows in addresses.items():
        n = len(union[ip]) if ip in union else max(r["backends"] for r in rows)
        addr_rows.append(_combine(rows, ("block_size", "tier"), n))
    pool_rows = []
    for prows in pools.values():
        front = prows[0].get("public_ip")
        n = len(union[front]) if front in union else max(r["backends_on_address"] for r in prows)
        pool_rows.append(_combine(prows, ("block_size", "tier"), n))
    return {
        "addresses": addr_rows,
        "pools": pool_rows,
        "flows": sum(p["flows"] for p in parts),
        "health": health([p.get("health", []) for p in parts]),
    }


def _rule_key(r: dict[str, Any]) -> tuple[Any, ...]:
    return (r.get("backend"), r.get("group"), r.get("attached"), r.get("direction"), r.get("name"))


def rules(parts: Sequence[Rows]) -> Rows:
    """``snatgw rules``: the first worker's rows (every worker has the same policy) with
    each rule's hits added up over the workers."""
    hits: dict[tuple[Any, ...], int] = {}
    for part in parts:
        for r in part:
            k = _rule_key(r)
            hits[k] = hits.get(k, 0) + int(r.get("hits", 0))
    return [{**r, "hits": hits[_rule_key(r)]} for r in (parts[0] if parts else [])]


def who(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``snatgw who``: the answer of the worker that holds the port (only its table has the
    block there; the others see a free chunk), else the first worker's reason."""
    for i, part in enumerate(parts):
        if part.get("holder") is not None:
            return {**part, "worker": i}
    return dict(parts[0]) if parts else {}


def security(parts: Sequence[dict[str, Rows]]) -> dict[str, Rows]:
    """Security hit and denial rows (metrics) added up per rule and per backend and rule."""
    hits: dict[tuple[str, str, str], int] = {}
    denials: dict[tuple[str, str, str, str], int] = {}
    for part in parts:
        for h in part.get("hits", []):
            k = (h["group"], h["direction"], h["rule"])
            hits[k] = hits.get(k, 0) + h["hits"]
        for d in part.get("denials", []):
            dk = (d["backend"], d["group"], d["rule"], d["direction"])
            denials[dk] = denials.get(dk, 0) + d["flows"]
    return {
        "hits": [{"group": g, "direction": d, "rule": r, "hits": n} for (g, d, r), n in hits.items()],
        "denials": [
            {"backend": b, "group": g, "rule": r, "direction": d, "flows": n}
            for (b, g, r, d), n in denials.items()
        ],
    }


def latency(parts: Sequence[tuple[Sequence[int], float]]) -> tuple[list[int], float]:
    """Loop latency histograms added bucket by bucket, and their sums."""
    if not parts:
        return [], 0.0
    counts = [0] * len(parts[0][0])
    total = 0.0
    for bucket_counts, s in parts:
        for j, n in enumerate(bucket_counts):
            counts[j] += n
        total += s
    return counts, total


#: Reload counts of what each worker holds alone (its own backends and flows): added up.
_OWN = frozenset({"backends_added", "backends_removed", "flows_ended"})


def reload_summary(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A reload's counts for the gateway: backends and flows added up (each worker places
    only its own), the rest (addresses, tier changes: every worker applies the same
    model) the largest any worker reports; each worker's own summary under ``workers``."""
    out: dict[str, Any] = dict(parts[0]) if parts else {}
    keys = dict.fromkeys(k for p in parts for k, v in p.items() if isinstance(v, int))
    for k in keys:
        values = [int(p.get(k, 0)) for p in parts]
        out[k] = sum(values) if k in _OWN else max(values)
    out["workers"] = [dict(p) for p in parts]
    return out


def metrics(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The snapshot one Prometheus scrape turns into families, for the whole gateway, with
    ``per_worker`` rows (worker, flows, packets) for the per-worker gauges."""
    per_worker = []
    for i, p in enumerate(parts):
        c = p["stats"]["counters"]
        per_worker.append({
            "worker": i,
            "flows": p["stats"]["flows_total"],
            "packets": c.get("in2out_translated", 0) + c.get("out2in_translated", 0),
        })  # fmt: skip
    return {
        "stats": stats([p["stats"] for p in parts]),
        "ports": ports([p["ports"] for p in parts]),
        "status": status([p["status"] for p in parts]),
        "security": security([p["security"] for p in parts]),
        "health": health([p["health"] for p in parts]),
        "latency": latency([(p["latency"][0], p["latency"][1]) for p in parts]),
        "per_worker": per_worker,
    }
