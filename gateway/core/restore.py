"""Reading a state file back into a fresh table at start (the other half of
:mod:`gateway.core.persist`, which says what the file holds).

The whole file is checked before the table changes: a refused file raises
:class:`~gateway.core.errors.StateError` and leaves the table as it was. Then,
per saved backend, the configuration must still place it the same way (same
scenario and public address, or for a standalone backend a default SNAT
address that is still one); flows of backends that moved are dropped and
counted. Blocks get back the chunks they had, so every restored flow keeps
its public port; a flow whose port is no longer in its block (the tier
changed with the configuration) is dropped and counted. An inbound flow
needs no block; it needs the rule (LB rule, inbound NAT rule, instance IP)
that delivered it to still deliver its public address and port to its
backend and port. Every flow is then asked again of the current security
groups and dropped if they deny it: the file does not say which rules
admitted it, so a restore fails closed (docs/decisions.md, "Restore re-checks
the rules"). Member health is not saved: probed members start down. With several
workers each restores its own file, keeping only the flows of backends it
owns and ports in its slice (the worker count may have changed since): the
others are dropped and counted (``dropped_not_owned``, ``dropped_port``).

Pure: no IO, ``now`` and ``wall`` are passed in.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from typing import Any

from gateway.core.address import Backend, PublicAddress, Scenario, ip_str
from gateway.core.block import CHUNK_SHIFT, CHUNKS, PORT_BYTES, PortBlock
from gateway.core.checksum import delta
from gateway.core.errors import StateError
from gateway.core.flow import Flow, TcpState, l4_deltas, timeout_for
from gateway.core.model import PROTO_ICMP, PROTO_NAMES
from gateway.core.persist import FIELD_KINDS, FORMAT, REQUIRED_FIELDS, TIME_FIELDS, VERSION, BackendRecord
from gateway.core.security import Decision
from gateway.core.table import TranslationTable


@dataclass(slots=True)
class RestoreSummary:
    """What :func:`restore` did with a file (logged as ``state_restored``)."""

    #: Seconds of wall time between the snapshot and the restore.
    age: float = 0.0
    saved: int = 0
    restored: int = 0
    #: Flows that idled out (or whose linger ended) while the gateway was down.
    expired: int = 0
    #: Flows of backends the configuration no longer places the same way.
    dropped_config: int = 0
    #: Flows whose public port is no longer in their backend's block.
    dropped_port: int = 0
    #: Flows whose keys collide with a flow restored before them.
    dropped_conflict: int = 0
    #: Flows the security groups of the current configuration deny (fail closed).
    dropped_denied: int = 0
    #: Flows of backends another worker owns (the worker count changed since the
    #: snapshot, docs/decisions.md "Workers"); a flow whose port left this
    #: worker's slice counts in ``dropped_port``.
    dropped_not_owned: int = 0
    standalone_backends: int = 0
    #: Backends whose flows were dropped because their placement changed (at most 20 listed).
    changed_backends: list[int] = field(default_factory=list)


@dataclass(slots=True)
class _SavedFlow:
    values: dict[str, Any]
    #: Seconds since each time field at the snapshot.
    ages: dict[str, float]


def _fail(problem: str) -> StateError:
    return StateError(problem)


def _number(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise _fail(f"{what}: not a finite number")
    return float(v)


def _int(v: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _fail(f"{what}: not an integer from {lo} to {hi}")
    return v


def _parse_backends(raw: Any) -> dict[int, BackendRecord]:
    if not isinstance(raw, list):
        raise _fail("backends: not a list")
    out: dict[int, BackendRecord] = {}
    for i, b in enumerate(raw):
        what = f"backends[{i}]"
        if not isinstance(b, dict):
            raise _fail(f"{what}: not an object")
        ip = _int(b.get("ip"), f"{what}.ip", 0, 0xFFFFFFFF)
        scenario = _int(b.get("scenario"), f"{what}.scenario", 1, 3)
        public = _int(b.get("public"), f"{what}.public", 0, 0xFFFFFFFF)
        pool = b.get("pool", "")
        if not isinstance(pool, str):
            raise _fail(f"{what}.pool: not a string")
        chunks_raw = b.get("chunks")
        chunks: tuple[int, ...] | None = None
        if chunks_raw is not None:
            if not isinstance(chunks_raw, list):
                raise _fail(f"{what}.chunks: not a list")
            chunks = tuple(_int(c, f"{what}.chunks", 0, CHUNKS - 1) for c in chunks_raw)
        if ip in out:
            raise _fail(f"{what}: backend listed twice")
        out[ip] = BackendRecord(ip, scenario, public, pool, chunks)
    return out


def _check_flow(v: dict[str, Any], what: str) -> None:
    """The flow's keys, bytes and checksum deltas must be what its numbers say
    (as :meth:`~gateway.core.lifecycle.FlowLifecycle._create_flow` builds them),
    so that a damaged file cannot put a key in the table that no packet carries
    or a delta that corrupts checksums."""
    proto = v["proto"]
    if proto not in PROTO_NAMES:
        raise _fail(f"{what}.proto: {proto} is not translated")
    for name, lo, hi in _RANGES:
        if not lo <= v[name] <= hi:
            raise _fail(f"{what}.{name}: not from {lo} to {hi}")
    try:
        TcpState(v.get("state", TcpState.ACTIVE))
    except ValueError:
        raise _fail(f"{what}.state: {v.get('state')!r} is not a TCP state") from None
    backend_b = v["backend"].to_bytes(4, "big")
    public_b = v["public"].to_bytes(4, "big")
    remote_b = v["remote"].to_bytes(4, "big")
    backend_port_b = PORT_BYTES[v["backend_port"]]
    public_port_b = PORT_BYTES[v["public_port"]]
    remote_port_b = PORT_BYTES[v["remote_port"]]
    if proto == PROTO_ICMP and v["remote_port"]:
        raise _fail(f"{what}.remote_port: an ICMP flow has none")
    l4_in, l4_out = l4_deltas(proto, backend_b, backend_port_b, public_b, public_port_b)
    expect = {
        "backend_b": backend_b,
        "public_b": public_b,
        "backend_port_b": backend_port_b,
        "public_port_b": public_port_b,
        "dest": remote_b + remote_port_b,
        "inside_key": backend_b + remote_b + backend_port_b + remote_port_b,
        "outside_key": remote_b + public_b + remote_port_b + public_port_b,
        "in2out_ip": delta(backend_b, public_b),
        "out2in_ip": delta(public_b, backend_b),
        "in2out_l4": l4_in,
        "out2in_l4": l4_out,
    }
    for name, want in expect.items():
        if name in v and v[name] != want:
            raise _fail(f"{what}.{name}: does not match the flow's addresses and ports")
    if v["timeout"] < 0:
        raise _fail(f"{what}.timeout: negative")
    if v.get("idle", 0.0) < 0:
        raise _fail(f"{what}.idle: negative")


#: Integer fields whose range the restore relies on.
_RANGES = (
    ("backend", 0, 0xFFFFFFFF),
    ("public", 0, 0xFFFFFFFF),
    ("remote", 0, 0xFFFFFFFF),
    ("backend_port", 0, 0xFFFF),
    ("public_port", 0, 0xFFFF),
    ("remote_port", 0, 0xFFFF),
    ("scenario", 1, 3),
)


def _parse_flows(names: Any, rows: Any) -> list[_SavedFlow]:
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise _fail("flow_fields: not a list of names")
    if len(set(names)) != len(names):
        raise _fail("flow_fields: a name is listed twice")
    missing = REQUIRED_FIELDS - set(names)
    if missing:
        raise _fail(f"flow_fields: missing {', '.join(sorted(missing))}")
    if not isinstance(rows, list):
        raise _fail("flows: not a list")
    width = len(names)
    # Grouped by kind, checked with ``type() is`` (JSON gives int, float, str,
    # bool, list, dict or None; a bool is no int here); messages are built only
    # on failure: a file holds 100,000 flows.
    ages = [(i, n) for i, n in enumerate(names) if n in TIME_FIELDS]
    by_kind: dict[type, list[tuple[int, str]]] = {}
    for i, n in enumerate(names):
        if n in FIELD_KINDS and n not in TIME_FIELDS:
            by_kind.setdefault(FIELD_KINDS[n], []).append((i, n))
    ints, floats = by_kind.get(int, []), [*ages, *by_kind.get(float, [])]
    hexes, others = by_kind.get(bytes, []), [(i, n) for k in (str, bool) for i, n in by_kind.get(k, [])]
    isfinite = math.isfinite
    out = []
    for r, row in enumerate(rows):
        if type(row) is not list or len(row) != width:
            raise _fail(f"flows[{r}]: not a list of {width} values")
        values: dict[str, Any] = {}
        for i, n in ints:
            v = row[i]
            if type(v) is not int:
                raise _fail(f"flows[{r}].{n}: not an integer")
            values[n] = v
        for i, n in floats:
            v = row[i]
            if (type(v) is not float and type(v) is not int) or not isfinite(v):
                raise _fail(f"flows[{r}].{n}: not a finite number")
            values[n] = float(v)
        for i, n in hexes:
            v = row[i]
            try:
                values[n] = bytes.fromhex(v)
            except (TypeError, ValueError):
                raise _fail(f"flows[{r}].{n}: not a hex string") from None
        for i, n in others:
            v = row[i]
            if type(v) is not FIELD_KINDS[n]:
                raise _fail(f"flows[{r}].{n}: not a {FIELD_KINDS[n].__name__}")
            values[n] = v
        _check_flow(values, f"flows[{r}]")
        out.append(_SavedFlow(values, {n: values.pop(n) for _, n in ages}))
    return out


def parse(data: bytes | str | dict[str, Any]) -> tuple[float, dict[int, BackendRecord], list[_SavedFlow]]:
    """Check a whole file: (wall time, backends, flows); raises :class:`StateError`."""
    if isinstance(data, bytes | str):
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise _fail(f"not JSON: {e}") from None
    else:
        doc = data
    if not isinstance(doc, dict):
        raise _fail("not a JSON object")
    if doc.get("format") != FORMAT:
        raise _fail(f"not a {FORMAT} file")
    version = doc.get("version")
    if version != VERSION or isinstance(version, bool):
        raise _fail(f"version {version!r}; this gateway reads version {VERSION}")
    wall = _number(doc.get("wall"), "wall")
    backends = _parse_backends(doc.get("backends"))
    flows = _parse_flows(doc.get("flow_fields"), doc.get("flows"))
    return wall, backends, flows


# --------------------------------------------------------------------------- restoring


def _placed_alike(table: TranslationTable, rec: BackendRecord | None, ip: int) -> bool:
    """Whether the configuration places backend ``ip`` as it was when saved."""
    if rec is None:
        return False
    be = table.backends.get(ip)
    if be is not None:
        return int(be.scenario) == rec.scenario and be.address.ip == rec.public
    if rec.scenario != Scenario.DEFAULT:
        return False
    return any(a.ip == rec.public and a.layout is not None for a in table.defaults)


def _lay_out(table: TranslationTable, addr: PublicAddress, saved: dict[int, BackendRecord]) -> None:
    """Give every block on ``addr`` the chunks it had (as far as they are free and
    the tier allows), then fill up blocks that are short from the free chunks."""
    layout = addr.layout
    assert layout is not None
    members = sorted(addr.members.values(), key=lambda b: b.ip)
    for be in members:
        if be.block is not None:
            layout.give(be.block.chunks)
    want = layout.size >> CHUNK_SHIFT
    used = layout.used
    chosen: dict[int, list[int]] = {}
    for be in members:
        rec = saved.get(be.ip)
        mine: list[int] = []
        if rec is not None and rec.chunks is not None:
            for c in rec.chunks[:want]:
                if not used[c]:
                    used[c] = 1
                    mine.append(c)
        chosen[be.ip] = mine
    for be in members:
        mine = chosen[be.ip]
        if len(mine) < want:
            mine += layout.take(want - len(mine), mine[-1] if mine else -1) or []
        be.block = PortBlock(addr.ip, mine)


def _opening(table: TranslationTable, v: dict[str, Any]) -> bool | None:
    """Whether the configuration still delivers a saved inbound flow's public address
    and port to its backend and port: None if not (the flow is dropped), else the
    ``opening`` its security check takes (a classic endpoint)."""
    proto, public, backend = v["proto"], v["public"], v["backend"]
    t = table.inbound_index.get((proto, public, v["public_port"])) if proto != PROTO_ICMP else None
    if t is not None:
        if backend in t.members and v["backend_port"] == t.backend_port:
            return t.opening
        return None
    if table.instance_inbound.get(public) == backend and v["backend_port"] == v["public_port"]:
        return False
    return None


def _recheck(table: TranslationTable, v: dict[str, Any], inbound: bool, opening: bool) -> Decision:
    """A saved flow asked again of the current security groups (fail closed: the
    file says nothing about the rules that admitted it)."""
    sec = table.security
    if inbound:
        return sec.inbound(
            v["backend"], v["proto"], v["remote"], v["remote_port"], v["backend"], v["backend_port"],
            opening=opening,
        )  # fmt: skip
    backend = v["backend"]
    return sec.outbound(backend, v["proto"], backend, v["backend_port"], v["remote"], v["remote_port"])


def restore(
    table: TranslationTable, data: bytes | str | dict[str, Any], now: float, wall: float
) -> RestoreSummary:
    """Put the flows of a state file back into ``table``, a table without flows.

    Raises :class:`StateError` (and changes nothing) when the file is not one
    this version wrote or contradicts itself. Otherwise every flow that is
    still within its timeout, whose backend is placed as before and whose port
    is still in that backend's block (an inbound flow: whose LB rule, inbound
    NAT rule or instance IP still delivers it), and that the current security
    groups allow, is back under the same keys and port. Member health is not
    saved: every probed member starts down.
    """
    if table.flow_count():
        raise StateError("restore needs a table without flows (it runs at start)")
    saved_wall, backends, flows = parse(data)
    summary = RestoreSummary(saved=len(flows))
    elapsed = max(0.0, wall - saved_wall)
    summary.age = round(elapsed, 3)
    timeouts = table.timeouts

    live: dict[int, list[tuple[_SavedFlow, float]]] = {}
    for sf in flows:
        v = sf.values
        timeout = timeout_for(v.get("state", TcpState.ACTIVE), timeouts, v.get("idle", 0.0))
        idle = sf.ages.get("last_seen", 0.0) + elapsed
        if idle >= timeout:
            summary.expired += 1
            continue
        live.setdefault(v["backend"], []).append((sf, timeout))

    alike: dict[int, BackendRecord] = {}
    shard = table.shard
    for ip, group in live.items():
        if not shard.owns_backend(ip):
            summary.dropped_not_owned += len(group)
            continue
        rec = backends.get(ip)
        if rec is not None and _placed_alike(table, rec, ip):
            alike[ip] = rec
        else:
            summary.dropped_config += len(group)
            if len(summary.changed_backends) < 20:
                summary.changed_backends.append(ip)

    # Standalone backends go back on their default address, which takes the tier
    # for its new member count (a fresh table has none there yet).
    standalone: dict[int, list[BackendRecord]] = {}
    for ip, rec in alike.items():
        if ip not in table.backends:
            standalone.setdefault(rec.public, []).append(rec)
    for pub, recs in standalone.items():
        addr = table.addresses[pub]
        assert addr.layout is not None
        count = len(addr.members) + len(recs)
        if not addr.members:
            addr.layout.size = table._default_size(addr, count)
        for rec in sorted(recs, key=lambda r: r.ip):
            table._add_backend(Backend(rec.ip, Scenario.DEFAULT, addr, None))
            summary.standalone_backends += 1
    for addr in table.addresses.values():
        if addr.layout is not None and addr.members:
            _lay_out(table, addr, alike)

    inside, outside = table.inside, table.outside
    for ip in sorted(alike):
        be = table.backends[ip]
        block = be.block
        for sf, timeout in live[ip]:
            v = sf.values
            proto = v["proto"]
            inbound = v.get("inbound", False)
            opening = _opening(table, v) if inbound else False
            if opening is None or (
                not inbound and (v["public"] != be.address.ip or v["scenario"] != be.scenario)
            ):
                summary.dropped_config += 1
                continue
            if v["inside_key"] in inside[proto] or v["outside_key"] in outside[proto]:
                summary.dropped_conflict += 1
                continue
            decision = _recheck(table, v, inbound, opening)
            if not decision.allowed:
                summary.dropped_denied += 1
                continue
            port = v["public_port"]
            # An instance IP's flow keeps the backend's own port; a PAT flow its block's;
            # an inbound flow the frontend's (or instance IP's) port the remote chose.
            if inbound:
                ok = True
            elif block is None:
                ok = port == v["backend_port"]
            else:
                ok = block.reserve(proto, port, v["dest"])
            if not ok:
                summary.dropped_port += 1
                continue
            kw: dict[str, Any] = {name: now - sf.ages.get(name, 0.0) - elapsed for name in TIME_FIELDS}
            kw.update(v)
            f = Flow(**kw, block=None if inbound else block, decision=decision)
            f.timeout = timeout
            table._add_flow(f, be)
            summary.restored += 1
    return summary


def summary_fields(summary: RestoreSummary) -> dict[str, Any]:
    """The summary as log fields (backend addresses as dotted quads)."""
    out = {f.name: getattr(summary, f.name) for f in fields(summary)}
    out["changed_backends"] = [ip_str(ip) for ip in summary.changed_backends]
    return out
