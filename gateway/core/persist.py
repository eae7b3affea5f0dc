"""The table as a state file: written at stop and every few seconds, read back at
start, so that a restart keeps every flow and its public port (issue 9, item 5).

Three steps, split by who may run them:

- :func:`snapshot` copies what must be saved into plain tuples. It reads the
  live table, so it runs in the packet loop's thread between two batches (like
  every other snapshot, ``PacketLoop.call``) and does nothing else: one C-level
  ``attrgetter`` per flow, so the loop pauses only for the copy.
- :func:`encode` turns a snapshot into the file's bytes (JSON). It touches no
  table, so it runs in another thread, and it encodes in chunks so that the
  loop gets the interpreter back between them.
- :func:`restore` reads the bytes back into a fresh table at start.

Times: the table's clock is monotonic and does not survive the process, so
the file holds the wall time of the snapshot and every time field of a flow
(:data:`TIME_FIELDS`) as an age at that moment. Restoring adds the wall time
that passed since (never negative: a clock that went back counts as no time),
so a flow that would have idled out meanwhile is not restored.

Flows are written generically (:func:`dataclasses.fields` of
:class:`~gateway.core.flow.Flow`, with the field names in the file), so a field
added to ``Flow`` with a default is saved without a change here and a file
written before it was added still loads. Fields that are references
(``block``, the timer wheel's slot) are not data: restore rebuilds them.

Restoring checks the whole file before it changes the table (a refused file
raises :class:`~gateway.core.errors.StateError` and leaves the table as it
was), then, per saved backend, whether the configuration still places it the
same way (same scenario and public address, or for a standalone backend a
default SNAT address that is still one); flows of backends that moved are
dropped and counted. Blocks get back the chunks they had, so every restored
flow keeps its public port; a flow whose port is no longer in its block (the
tier changed with the configuration) is dropped and counted.

Pure: no IO, ``now`` and ``wall`` are passed in.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import MISSING, dataclass, field, fields
from operator import attrgetter
from typing import Any

from gateway.core.address import Backend, PublicAddress, Scenario, ip_str
from gateway.core.block import CHUNK_SHIFT, CHUNKS, PORT_BYTES, PortBlock
from gateway.core.checksum import delta
from gateway.core.errors import StateError
from gateway.core.flow import Flow, TcpState, timeout_for
from gateway.core.model import PROTO_ICMP, PROTO_NAMES
from gateway.core.table import TranslationTable
from gateway.core.tier import ports_per_backend

#: What the file says it is; another value is refused.
FORMAT = "snatgw-state"
#: The layout of the file. Raise it when a reader of this version could not
#: read the new layout; adding a ``Flow`` field with a default needs no new version.
VERSION = 1
#: Flow fields holding a time of the table's monotonic clock (saved as ages).
TIME_FIELDS = frozenset({"created", "last_seen"})
#: Flow fields that are references to other objects; restore rebuilds them.
REFERENCE_FIELDS = frozenset({"block", "wheel_slot", "wheel_tick"})
#: Rows per chunk of :func:`encode_chunks` (about 0.5 ms of work): the saver
#: sleeps between chunks, so the loop thread never waits long for the interpreter.
ENCODE_CHUNK = 100

_SCALARS: dict[str, type] = {"int": int, "float": float, "bytes": bytes, "str": str, "bool": bool}


def _saved_fields() -> tuple[tuple[str, type], ...]:
    """(name, type) of every Flow field that is plain data, in declaration order."""
    out = []
    for f in fields(Flow):
        kind = _SCALARS.get(f.type if isinstance(f.type, str) else getattr(f.type, "__name__", ""))
        if f.name in REFERENCE_FIELDS or kind is None:
            continue
        out.append((f.name, kind))
    return tuple(out)


#: The Flow fields a state file holds.
FLOW_FIELDS = _saved_fields()
_NAMES = tuple(name for name, _ in FLOW_FIELDS)
_KIND = dict(FLOW_FIELDS)
#: Flow fields set when a flow is created and never written again (the
#: core assigns only ``last_seen``, ``timeout``, ``state``, ``fins`` and the
#: packet and byte counters later). Every other field, including any added to
#: ``Flow`` later, is copied in the loop's thread.
FIXED_FIELDS = frozenset({
    "proto", "scenario", "inside_key", "outside_key", "backend", "backend_port", "backend_b",
    "backend_port_b", "public", "public_port", "public_b", "public_port_b", "remote",
    "remote_port", "dest", "in2out_ip", "in2out_l4", "out2in_ip", "out2in_l4", "created",
})
_FIXED = tuple(n for n in _NAMES if n in FIXED_FIELDS)
_CHANGING = tuple(n for n in _NAMES if n not in FIXED_FIELDS)


def _getter(names: tuple[str, ...]) -> Any:
    """attrgetter that always returns a tuple (one name alone would give the value)."""
    get = attrgetter(*names)
    return get if len(names) > 1 else (lambda f: (get(f),))


_GET_FIXED = _getter(_FIXED)
_GET_CHANGING = _getter(_CHANGING)
_HEX = tuple(i for i, (_, kind) in enumerate(FLOW_FIELDS) if kind is bytes)
_INTS = tuple(i for i, (_, kind) in enumerate(FLOW_FIELDS) if kind is int)
_AGES = tuple(i for i, (name, _) in enumerate(FLOW_FIELDS) if name in TIME_FIELDS)
_REQUIRED = frozenset(
    f.name
    for f in fields(Flow)
    if f.default is MISSING and f.default_factory is MISSING and f.name not in REFERENCE_FIELDS
)


@dataclass(frozen=True, slots=True)
class BackendRecord:
    """Where a backend left: its scenario, public address and block chunks."""

    ip: int
    scenario: int
    public: int
    pool: str
    chunks: tuple[int, ...] | None


@dataclass(slots=True)
class Snapshot:
    """A copy of the table for :func:`encode`, taken in the loop's thread.

    At monotonic time ``now`` (wall time ``wall``) it lists the flows and the
    backends; :meth:`copy` then copies each flow's changing fields
    (:data:`FIXED_FIELDS` are the ones that never change) in slices, one
    ``PacketLoop.call`` each, so no single pause is long. The encoder's
    thread reads the fixed fields from the flows themselves: they are set
    when a flow is created and never written again. A flow that ends between
    two slices is still written (it lived at ``now``), one created after
    ``now`` waits for the next snapshot.
    """

    now: float
    wall: float
    backends: list[BackendRecord]
    pending: list[Flow]
    #: The changing fields of the flows copied so far, flow after flow, in one
    #: flat list: no object per flow survives the copy, so copying does not
    #: wake the cyclic garbage collector in the loop's thread.
    values: list[Any] = field(default_factory=list)
    copied: int = 0

    @property
    def done(self) -> bool:
        return self.copied == len(self.pending)

    def copy(self, limit: int | None = None) -> bool:
        """Copy the changing fields of up to ``limit`` more flows (all: None);
        True when every flow is copied. The loop's thread only."""
        start = self.copied
        stop = len(self.pending) if limit is None else min(len(self.pending), start + limit)
        get = _GET_CHANGING
        extend = self.values.extend
        for f in self.pending[start:stop]:
            extend(get(f))
        self.copied = stop
        return self.done

    def rows(self, start: int, stop: int) -> Iterator[list[Any]]:
        """The file's rows of copied flows ``start`` to ``stop`` (the encoder's thread)."""
        k = len(_CHANGING)
        values, pending, now = self.values, self.pending, self.now
        for i in range(start, min(stop, self.copied)):
            yield _row(pending[i], values[i * k : i * k + k], now)


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
    standalone_backends: int = 0
    #: Backends whose flows were dropped because their placement changed (at most 20 listed).
    changed_backends: list[int] = field(default_factory=list)


# --------------------------------------------------------------------------- writing


def begin(table: TranslationTable, now: float, wall: float) -> Snapshot:
    """Start a snapshot: the list of flows and the backends' placement (the loop's thread)."""
    flows = [f for fl in table.inside.values() for f in fl.values()]
    backends = [
        BackendRecord(
            be.ip,
            int(be.scenario),
            be.address.ip,
            be.pool,
            tuple(be.block.chunks) if be.block is not None else None,
        )
        for be in table.backends.values()
    ]
    return Snapshot(now, wall, backends, flows)


def snapshot(table: TranslationTable, now: float, wall: float) -> Snapshot:
    """A whole snapshot in one step (small tables, tests)."""
    snap = begin(table, now, wall)
    snap.copy()
    return snap


def _row(f: Flow, changing: list[Any], now: float) -> list[Any]:
    """One flow as the file's row: bytes as hex, times as ages at ``now`` (never negative:
    a flow copied in a later slice may have seen a packet after ``now``)."""
    values = dict(zip(_FIXED, _GET_FIXED(f), strict=True))
    values.update(zip(_CHANGING, changing, strict=True))
    row = [values[name] for name in _NAMES]
    for i in _HEX:
        row[i] = row[i].hex()
    for i in _INTS:  # an IntEnum (scenario, state) as a plain number
        row[i] = int(row[i])
    for i in _AGES:
        row[i] = max(0.0, now - row[i])
    return row


def _header(snap: Snapshot) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "wall": snap.wall,
        "flow_fields": list(_NAMES),
        "backends": [
            {
                "ip": b.ip,
                "scenario": b.scenario,
                "public": b.public,
                "pool": b.pool,
                "chunks": None if b.chunks is None else list(b.chunks),
            }
            for b in snap.backends
        ],
    }


def to_dict(snap: Snapshot) -> dict[str, Any]:
    """The file's content as a dict (what :func:`encode` writes as JSON)."""
    doc = _header(snap)
    doc["flows"] = list(snap.rows(0, snap.copied))
    return doc


def dump(table: TranslationTable, now: float, wall: float) -> dict[str, Any]:
    """The table as the file's content, in one step (tests, small tables)."""
    return to_dict(snapshot(table, now, wall))


def encode_chunks(snap: Snapshot) -> Iterator[bytes]:
    """The file's bytes, a chunk at a time (JSON, the same as ``json.dumps(to_dict(snap))``)."""
    head = json.dumps(_header(snap))
    yield (head[:-1] + ', "flows": [').encode()
    dumps = json.dumps
    for start in range(0, snap.copied, ENCODE_CHUNK):
        # One row at a time: a row's list dies at once, so the encoder never holds
        # thousands of containers that the collector would promote and then walk
        # in a full collection (which holds the interpreter for the loop too).
        text = ", ".join([dumps(row) for row in snap.rows(start, start + ENCODE_CHUNK)])
        yield ((", " if start else "") + text).encode()
    yield b"]}\n"


def encode(snap: Snapshot) -> bytes:
    """The file's bytes; for a thread other than the loop's."""
    return b"".join(encode_chunks(snap))


# --------------------------------------------------------------------------- reading


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
    if proto == PROTO_ICMP:
        l4_in = delta(backend_port_b, public_port_b)
        l4_out = delta(public_port_b, backend_port_b)
    else:
        l4_in = delta(backend_b + backend_port_b, public_b + public_port_b)
        l4_out = delta(public_b + public_port_b, backend_b + backend_port_b)
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
    missing = _REQUIRED - set(names)
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
        if n in _KIND and n not in TIME_FIELDS:
            by_kind.setdefault(_KIND[n], []).append((i, n))
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
            if type(v) is not _KIND[n]:
                raise _fail(f"flows[{r}].{n}: not a {_KIND[n].__name__}")
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


def restore(
    table: TranslationTable, data: bytes | str | dict[str, Any], now: float, wall: float
) -> RestoreSummary:
    """Put the flows of a state file back into ``table``, a table without flows.

    Raises :class:`StateError` (and changes nothing) when the file is not one
    this version wrote or contradicts itself. Otherwise every flow that is
    still within its timeout, whose backend is placed as before and whose port
    is still in that backend's block, is back under the same keys and port.
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
        timeout = timeout_for(v.get("state", TcpState.ACTIVE), timeouts)
        idle = sf.ages.get("last_seen", 0.0) + elapsed
        if idle >= timeout:
            summary.expired += 1
            continue
        live.setdefault(v["backend"], []).append((sf, timeout))

    alike: dict[int, BackendRecord] = {}
    for ip, group in live.items():
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
            addr.layout.size = ports_per_backend(count)
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
            if v["public"] != be.address.ip or v["scenario"] != be.scenario:
                summary.dropped_config += 1
                continue
            if v["inside_key"] in inside[proto] or v["outside_key"] in outside[proto]:
                summary.dropped_conflict += 1
                continue
            port = v["public_port"]
            # An instance IP's flow keeps the backend's own port; a PAT flow its block's.
            ok = port == v["backend_port"] if block is None else block.reserve(proto, port, v["dest"])
            if not ok:
                summary.dropped_port += 1
                continue
            kw: dict[str, Any] = {name: now - sf.ages.get(name, 0.0) - elapsed for name in TIME_FIELDS}
            kw.update(v)
            f = Flow(**kw, block=block)
            f.timeout = timeout
            table._add_flow(f, be)
            summary.restored += 1
    return summary


def summary_fields(summary: RestoreSummary) -> dict[str, Any]:
    """The summary as log fields (backend addresses as dotted quads)."""
    out = {f.name: getattr(summary, f.name) for f in fields(summary)}
    out["changed_backends"] = [ip_str(ip) for ip in summary.changed_backends]
    return out
