"""The state file's core (gateway.core.persist): dump, restore, ageing, refusals."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.core import persist, restore
from gateway.core.errors import StateError
from gateway.core.flow import EndReason, Flow, TcpState
from gateway.core.model import PROTO_TCP, PROTO_UDP, Timeouts
from gateway.core.packet import describe
from gateway.core.table import TranslationTable
from gateway.core.verdict import DROP
from tests.unit.conftest import (
    FRONTEND,
    INSTANCE,
    POOL,
    SERVER,
    SERVER2,
    STANDALONE,
    echo,
    holds,
    lab_model,
    out,
    tcp,
    udp,
)


def mappings(table: TranslationTable) -> dict[tuple[int, bytes], tuple[bytes, int, int]]:
    """Every flow as inside key -> (outside key, public ip, public port)."""
    return {
        (proto, k): (f.outside_key, f.public, f.public_port)
        for proto, flows in table.inside.items()
        for k, f in flows.items()
    }


def busy_table(now: float = 100.0) -> TranslationTable:
    """Flows of every scenario and protocol, some on shared ports, one in FIN_WAIT."""
    t = TranslationTable(lab_model(), now=0.0)
    for i in range(5):
        out(t, udp(POOL[0], SERVER, 40000 + i, 5000), now)
        out(t, tcp(POOL[1], SERVER2, 41000 + i, 80), now)
    out(t, udp(INSTANCE, SERVER, 5555, 53), now)
    out(t, udp(STANDALONE, SERVER, 6000, 53), now)
    out(t, udp("10.10.3.2", SERVER, 6001, 53), now)
    out(t, echo(POOL[2], SERVER, 77), now)
    out(t, tcp(POOL[0], SERVER, 42000, 443, "FA"), now)
    return t


def restored(data: Any, now: float = 5.0, wall: float = 1010.0, model: Any = None) -> tuple[
    TranslationTable, restore.RestoreSummary
]:
    t = TranslationTable(model or lab_model(), now=0.0)
    return t, restore.restore(t, data, now, wall)


def test_every_saved_field_reads_off_a_flow_and_builds_it_again() -> None:
    """Each name in the file is a Flow attribute, and Flow(**saved values) is the same flow."""
    t = busy_table()
    assert set(persist._NAMES) >= persist.FIXED_FIELDS | persist.REQUIRED_FIELDS
    for fl in t.inside.values():
        for f in fl.values():
            values = {name: getattr(f, name) for name in persist._NAMES}
            g = Flow(**values, block=f.block)
            assert {name: getattr(g, name) for name in persist._NAMES} == values


def test_a_file_written_before_compact_flows_loads_whole() -> None:
    """A state file of the dataclass Flow (same version, same field names) restores every flow
    with its keys and public port, and a file written now has the same field list."""
    data = (Path(__file__).parent / "data" / "state_v1_dataclass_flow.json").read_text()
    t, summary = restored(data, now=5.0, wall=1001.0)
    doc = json.loads(data)
    assert summary.restored == summary.saved == len(doc["flows"]) > 0
    names = doc["flow_fields"]
    want = {(r[names.index("inside_key")], r[names.index("outside_key")], r[names.index("public_port")])
            for r in doc["flows"]}
    flows = [f for fl in t.inside.values() for f in fl.values()]
    got = {(f.inside_key.hex(), f.outside_key.hex(), f.public_port) for f in flows}
    assert got == want
    assert persist.dump(t, 5.0, 1001.0)["flow_fields"] == names


def test_a_snapshot_copied_in_slices_equals_one_copied_at_once() -> None:
    """The loop copies a big table in slices (short pauses); the file is the same."""
    t = busy_table()
    snap = persist.begin(t, 100.0, 1000.0)
    steps = 0
    while not snap.copy(limit=4):
        steps += 1
    assert steps == (t.flow_count() - 1) // 4
    assert persist.to_dict(snap) == persist.dump(t, 100.0, 1000.0)


def test_round_trip_keeps_every_mapping_port_and_block() -> None:
    """Dump then restore into a fresh table: same keys, public ports, blocks and standalone placement."""
    t = busy_table()
    data = json.loads(persist.encode(persist.snapshot(t, 100.0, 1000.0)))
    assert data == persist.dump(t, 100.0, 1000.0)
    t2, s = restored(data)
    assert mappings(t2) == mappings(t)
    assert s.restored == t.flow_count() and s.expired == s.dropped_config == s.dropped_port == 0
    assert s.standalone_backends == 2 and s.age == 10.0
    for ip, be in t.backends.items():
        be2 = t2.backends[ip]
        assert be2.address.ip == be.address.ip and be2.scenario == be.scenario
        assert (be2.block and be2.block.chunks) == (be.block and be.block.chunks)
        assert len(be2.flows) == len(be.flows)
    fin = [f for f in t2.inside[PROTO_TCP].values() if f.backend_port == 42000][0]
    assert fin.state == TcpState.FIN_WAIT
    # The restored ports are taken: the next flow to the same destination gets another one.
    used = {f.public_port for f in t2.inside[PROTO_UDP].values() if f.remote_port == 5000}
    sport, _src, _ = out(t2, udp(POOL[0], SERVER, 40100, 5000), 6.0)
    assert sport not in used
    # Return traffic of a restored flow goes back to its backend.
    f0 = next(iter(t2.backends[int.from_bytes(bytes([10, 10, 1, 1]), "big")].flows))
    reply = udp(SERVER, FRONTEND, f0.remote_port, f0.public_port) if f0.proto == PROTO_UDP else None
    if reply is not None:
        assert t2.out2in(reply, 6.0) != DROP
        assert describe(reply).dst == POOL[0]


def test_a_file_of_the_release_before_inbound_flows_still_restores() -> None:
    """A state file without the ``inbound`` and ``idle`` columns (written before issue 10)
    restores every flow as an outbound one with the table's own timeout."""
    t = busy_table()
    data = json.loads(persist.encode(persist.snapshot(t, 100.0, 1000.0)))
    names = data["flow_fields"]
    gone = {names.index("inbound"), names.index("idle")}
    data["flow_fields"] = [n for i, n in enumerate(names) if i not in gone]
    data["flows"] = [[x for i, x in enumerate(row) if i not in gone] for row in data["flows"]]
    t2, s = restored(data)
    assert mappings(t2) == mappings(t) and s.restored == t.flow_count() and s.dropped_denied == 0
    assert not any(f.inbound or f.idle for d in t2.inside.values() for f in d.values())


def test_ageing_by_wall_clock_expires_and_keeps_the_rest() -> None:
    """Idle age plus the wall time the gateway was down decides; the rest keeps its remaining time."""
    t = TranslationTable(lab_model(timeouts=Timeouts(idle=60.0)), now=0.0)
    out(t, udp(POOL[0], SERVER, 40000, 5000), 0.0)  # idle 50 s at the dump
    out(t, udp(POOL[0], SERVER, 40001, 5000), 40.0)  # idle 10 s
    data = persist.dump(t, 50.0, 1000.0)
    t2, s = restored(data, now=7.0, wall=1030.0, model=lab_model(timeouts=Timeouts(idle=60.0)))
    assert (s.restored, s.expired, s.age) == (1, 1, 30.0)
    f = next(iter(t2.inside[PROTO_UDP].values()))
    assert f.backend_port == 40001 and f.last_seen == pytest.approx(7.0 - 40.0)
    t2.handle_timer(7.0 + 19.0)
    assert t2.flow_count() == 1
    t2.handle_timer(7.0 + 20.5)
    assert t2.flow_count() == 0


def test_wall_clock_going_back_counts_as_no_time() -> None:
    """A wall clock set back between stop and start ages nothing (never a negative age)."""
    t = busy_table()
    _t2, s = restored(persist.dump(t, 100.0, 1000.0), wall=900.0)
    assert s.age == 0.0 and s.restored == t.flow_count()


def test_backend_placed_differently_loses_its_flows_counted() -> None:
    """A pool member that left the pool (now standalone) and a changed default address: flows dropped."""
    t = busy_table()
    data = persist.dump(t, 100.0, 1000.0)
    model = lab_model(members=POOL[1:], defaults=("198.51.100.31",))
    t2, s = restored(data, model=model)
    gone = len(t.backends[_ip(POOL[0])].flows) + len(t.backends[_ip(STANDALONE)].flows)
    assert s.dropped_config == gone
    assert _ip(POOL[0]) in s.changed_backends and _ip(STANDALONE) in s.changed_backends
    assert not t2.backends.get(_ip(STANDALONE))
    assert s.restored == t.flow_count() - gone
    fields_ = restore.summary_fields(s)
    assert POOL[0] in fields_["changed_backends"]


def test_a_port_outside_the_new_block_is_dropped() -> None:
    """After a tier change that halves the block, flows on the reclaimed half are dropped and counted."""
    t = TranslationTable(lab_model(members=POOL[:1]), now=0.0)
    be = t.backends[_ip(POOL[0])]
    assert be.block is not None
    ports = [out(t, udp(POOL[0], SERVER, 30000 + i, 5000), 1.0)[0] for i in range(1024)]
    assert len(set(ports)) == 1024
    data = persist.dump(t, 2.0, 1000.0)
    many = tuple(f"10.10.9.{i}" for i in range(1, 52))  # 52 members: the next tier, 512 ports
    t2, s = restored(data, model=lab_model(members=(POOL[0], *many)))
    assert s.restored == 512 and s.dropped_port == 512
    block = t2.backends[_ip(POOL[0])].block
    assert all(holds(block, f.public_port) for f in t2.inside[PROTO_UDP].values())


def test_blocks_come_back_even_when_the_fresh_layout_differs() -> None:
    """A standalone backend whose chunks a fresh table would give elsewhere gets its own back."""
    t = TranslationTable(lab_model(), now=0.0)
    out(t, udp("10.10.3.2", SERVER, 1, 53), 0.0)  # placed first: the first block
    out(t, udp(STANDALONE, SERVER, 1, 53), 0.0)
    t.end_flow(next(iter(t.backends[_ip("10.10.3.2")].flows)), EndReason.CLOSED)
    data = persist.dump(t, 1.0, 1000.0)
    t2, s = restored(data)
    assert s.restored == 1 and s.standalone_backends == 1
    before = t.backends[_ip(STANDALONE)]
    after = t2.backends[_ip(STANDALONE)]
    assert before.block is not None and after.block is not None
    assert after.block.chunks == before.block.chunks and after.address.ip == before.address.ip
    assert mappings(t2) == mappings(t)


def _ip(s: str) -> int:
    return int.from_bytes(bytes(int(x) for x in s.split(".")), "big")


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[]", "not a JSON object"),
        (b'{"format": "other"}', "not a snatgw-state"),
        (b'{"format": "snatgw-state", "version": 2}', "version 2"),
        (b'{"format": "snatgw-state", "version": 1, "wall": "x"}', "wall"),
        (b'{"format": "snatgw-state", "version": 1, "wall": 1, "backends": [], "flow_fields": []}',
         "missing"),
    ],
)
def test_unreadable_files_raise_state_error(data: bytes, problem: str) -> None:
    """Missing pieces, another format or another version: StateError saying which."""
    with pytest.raises(StateError, match=problem):
        restored(data)


def test_a_self_contradicting_flow_refuses_the_whole_file_and_changes_nothing() -> None:
    """A flow whose key does not match its ports: the file is refused before the table changes."""
    t = busy_table()
    data = persist.dump(t, 100.0, 1000.0)
    i = data["flow_fields"].index("public_port")
    data["flows"][-1][i] ^= 1
    t2 = TranslationTable(lab_model(), now=0.0)
    with pytest.raises(StateError, match="does not match"):
        restore.restore(t2, data, 5.0, 1010.0)
    assert t2.flow_count() == 0 and not any(b.scenario == 3 for b in t2.backends.values())


def test_restore_needs_an_empty_table() -> None:
    """Restoring on top of live flows would double-book ports: refused."""
    t = busy_table()
    with pytest.raises(StateError):
        restore.restore(t, persist.dump(t, 100.0, 1000.0), 101.0, 1001.0)


# --------------------------------------------------------------------------- properties

_SOURCES = (*POOL, INSTANCE, STANDALONE, "10.10.3.2", "10.10.3.3")
_flow = st.tuples(
    st.sampled_from(_SOURCES),
    st.sampled_from((SERVER, SERVER2)),
    st.integers(1024, 65535),
    st.sampled_from((53, 80, 443, 5000)),
    st.sampled_from(("udp", "tcp", "echo")),
    st.floats(0.0, 300.0),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flows=st.lists(_flow, max_size=60), down=st.floats(0.0, 30.0))
def test_dump_then_restore_gives_the_same_mappings(flows: list[Any], down: float) -> None:
    """Random flows: what survives the downtime comes back with the same mapping, the rest expired."""
    model = lab_model(timeouts=Timeouts(idle=200.0))
    t = TranslationTable(model, now=0.0)
    for src, dst, sport, dport, kind, when in flows:
        pkt = udp(src, dst, sport, dport) if kind == "udp" else (
            tcp(src, dst, sport, dport) if kind == "tcp" else echo(src, dst, sport & 0xFFFF))
        t.in2out(pkt, when)
    t.events.clear()
    now = 300.0
    t2 = TranslationTable(model, now=0.0)
    s = restore.restore(t2, persist.encode(persist.snapshot(t, now, 5000.0)), 1.0, 5000.0 + down)
    want = {k: v for k, v in mappings(t).items() if _alive(t, k, now + down)}
    assert mappings(t2) == want
    assert s.restored == len(want) and s.restored + s.expired == t.flow_count()
    for proto, fl in t2.inside.items():  # the inventories count what the flows hold
        for f in fl.values():
            if f.block is not None:
                assert f.block.inventories[proto].refs[f.block.offset(f.public_port)] > 0


def _alive(t: TranslationTable, key: tuple[int, bytes], now: float) -> bool:
    f = t.inside[key[0]][key[1]]
    return f.last_seen + f.timeout > now


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=200))
def test_fuzz_random_bytes_raise_only_state_error(raw: bytes) -> None:
    """Garbage bytes: StateError and nothing else."""
    with pytest.raises(StateError):
        restored(raw)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_damaged_files_raise_only_state_error_or_restore(data: st.DataObject) -> None:
    """A valid file with one value, row or section replaced at random: StateError or a restore."""
    doc = persist.dump(_FUZZ_TABLE, 100.0, 1000.0)
    where = data.draw(st.sampled_from(("top", "backend", "flow", "row")))
    value = data.draw(_json)
    if where == "top":
        doc[data.draw(st.sampled_from(sorted(doc)))] = value
    elif where == "backend":
        b = data.draw(st.sampled_from(doc["backends"]))
        b[data.draw(st.sampled_from(sorted(b)))] = value
    elif where == "flow":
        row = data.draw(st.sampled_from(doc["flows"]))
        row[data.draw(st.integers(0, len(row) - 1))] = value
    else:
        doc["flows"][data.draw(st.integers(0, len(doc["flows"]) - 1))] = value
    text = json.dumps(doc).encode()
    with contextlib.suppress(StateError):  # anything else fails the test
        restored(text)


_FUZZ_TABLE = busy_table()


def test_snapshot_rows_are_copies() -> None:
    """The snapshot holds values, not flows: later packets do not change what is written."""
    t = busy_table()
    snap = persist.snapshot(t, 100.0, 1000.0)
    f = next(iter(t.inside[PROTO_UDP].values()))
    f.last_seen = 150.0
    f.pkts_out += 10
    doc = persist.to_dict(snap)
    i = doc["flow_fields"].index("pkts_out")
    assert max(r[i] for r in doc["flows"]) < f.pkts_out


# --------------------------------------------------------------------------- the adapter's file


class _Log:
    """Collects structlog-style calls: (level, event, fields)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **kw: self.calls.append((level, event, kw))


def test_state_path_is_the_configured_one_or_systemds_state_directory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A configured path wins, "" means none, unset follows $STATE_DIRECTORY (else none)."""
    from pathlib import Path

    from gateway.adapters.statefile import state_path

    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    assert state_path(None) is None and state_path("") is None
    assert state_path("/x/s.json") == Path("/x/s.json")
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/snatgw")
    assert state_path(None) == Path("/var/lib/snatgw/state.json")
    assert state_path("") is None


def test_stop_save_and_start_restore_through_the_file(tmp_path: Any) -> None:
    """The adapter writes atomically (mode 0600, no temp file left) and reads it back, one event each."""
    from gateway.adapters import statefile

    path = tmp_path / "d" / "state.json"
    t = busy_table(now=time.monotonic())  # the adapter reads the real clocks
    log = _Log()
    saver = statefile.StateSaver(t, None, log, lambda: (path, 5.0))  # type: ignore[arg-type]
    saver.stop_and_save()
    assert [c[1] for c in log.calls] == ["state_saved"] and log.calls[0][2]["flows"] == t.flow_count()
    assert (path.stat().st_mode & 0o777) == 0o600 and sorted(p.name for p in path.parent.iterdir()) == [
        "state.json"
    ]
    t2 = TranslationTable(lab_model(), now=0.0)
    statefile.restore(t2, path, log)
    assert log.calls[-1][1] == "state_restored" and log.calls[-1][2]["restored"] == t.flow_count()
    assert {k: v[1:] for k, v in mappings(t2).items()} == {k: v[1:] for k, v in mappings(t).items()}


@pytest.mark.parametrize(("content", "level", "reason"), [
    (None, "info", "missing"),
    (b"\x00garbage", "warning", "refused: not JSON"),
    (b'{"format": "snatgw-state", "version": 2}', "warning", "refused: version 2"),
])
def test_a_missing_or_bad_file_is_one_event_and_an_empty_table(
    tmp_path: Any, content: bytes | None, level: str, reason: str
) -> None:
    """Missing, garbage, another version: one state_not_restored event, nothing raised, no flows."""
    from gateway.adapters import statefile

    path = tmp_path / "state.json"
    if content is not None:
        path.write_bytes(content)
    log = _Log()
    t = TranslationTable(lab_model(), now=0.0)
    statefile.restore(t, path, log)
    assert len(log.calls) == 1
    got_level, event, kw = log.calls[0]
    assert (got_level, event) == (level, "state_not_restored") and kw["reason"].startswith(reason)
    assert t.flow_count() == 0
