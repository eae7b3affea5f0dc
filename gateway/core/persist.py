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
- :func:`gateway.core.restore.restore` reads the bytes back into a fresh
  table at start (a module of its own: checking a file is half the work).

Times: the table's clock is monotonic and does not survive the process, so
the file holds the wall time of the snapshot and every time field of a flow
(:data:`TIME_FIELDS`) as an age at that moment. Restoring adds the wall time
that passed since (never negative: a clock that went back counts as no time),
so a flow that would have idled out meanwhile is not restored.

Flows are written by field name (:data:`FLOW_FIELDS`, with the names in the
file), the same names and order as when ``Flow`` was a dataclass with one slot
each: the compact ``Flow`` (docs/decisions.md, "Compact flows") derives some of
them from its keys and packs others, behind properties of the same names, so a
file written before it loads and a file written now loads in the version
before. A name added to the list later needs a default in ``Flow.__init__``;
a file written before it was added still loads. References (``block``, the
timer wheel's slot, ``decision``) are not data: restore rebuilds them.

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
from collections.abc import Iterator
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

from gateway.core.flow import Flow
from gateway.core.table import TranslationTable

#: What the file says it is; another value is refused.
FORMAT = "snatgw-state"
#: The layout of the file. Raise it when a reader of this version could not
#: read the new layout; adding a ``Flow`` field with a default needs no new version.
VERSION = 1
#: Flow fields holding a time of the table's monotonic clock (saved as ages).
TIME_FIELDS = frozenset({"created", "last_seen"})
#: Rows per chunk of :func:`encode_chunks` (about 0.5 ms of work): the saver
#: sleeps between chunks, so the loop thread never waits long for the interpreter.
ENCODE_CHUNK = 100

#: The Flow fields a state file holds, (name, type) in the file's order (version 1).
FLOW_FIELDS: tuple[tuple[str, type], ...] = (
    ("proto", int), ("scenario", int), ("inside_key", bytes), ("outside_key", bytes),
    ("backend", int), ("backend_port", int), ("backend_b", bytes), ("backend_port_b", bytes),
    ("public", int), ("public_port", int), ("public_b", bytes), ("public_port_b", bytes),
    ("remote", int), ("remote_port", int), ("dest", bytes), ("in2out_ip", int), ("in2out_l4", int),
    ("out2in_ip", int), ("out2in_l4", int), ("created", float), ("last_seen", float),
    ("timeout", float), ("state", int), ("fins", int), ("pkts_out", int), ("pkts_in", int),
    ("bytes_out", int), ("bytes_in", int), ("trk_ack", int), ("trk_win", int), ("trk_scale", int),
    ("trk_isn", int), ("inbound", bool), ("idle", float),
)  # fmt: skip
_NAMES = tuple(name for name, _ in FLOW_FIELDS)
FIELD_KINDS = dict(FLOW_FIELDS)
#: Flow fields set when a flow is created and never written again (the
#: core assigns only ``last_seen``, ``timeout``, ``state``, ``fins`` and the
#: packet and byte counters later). Every other field, including any added to
#: the list later, is copied in the loop's thread.
FIXED_FIELDS = frozenset({
    "proto", "scenario", "inside_key", "outside_key", "backend", "backend_port", "backend_b",
    "backend_port_b", "public", "public_port", "public_b", "public_port_b", "remote",
    "remote_port", "dest", "in2out_ip", "in2out_l4", "out2in_ip", "out2in_l4", "created",
    "inbound", "idle",
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
#: The fields ``Flow.__init__`` has no default for (a file must hold them).
REQUIRED_FIELDS = frozenset({
    "proto", "scenario", "inside_key", "outside_key", "backend", "backend_port", "backend_b",
    "backend_port_b", "public", "public_port", "public_b", "public_port_b", "remote",
    "remote_port", "dest", "in2out_ip", "in2out_l4", "out2in_ip", "out2in_l4", "created",
    "last_seen", "timeout",
})


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
