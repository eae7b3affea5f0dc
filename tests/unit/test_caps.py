"""Flow caps with early drop (RFC 6888 REQ-5; docs/decisions.md, "Flow caps") and
random ports inside a block (RFC 6056; docs/decisions.md, "Port choice"), with an
injected clock and an injected random source."""

from __future__ import annotations

import dataclasses
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core import views
from gateway.core.block import PortBlock
from gateway.core.events import fields as event_fields
from gateway.core.flow import EndReason
from gateway.core.model import GatewayModel
from gateway.core.shard import Shard, backend_owner
from gateway.core.table import TranslationTable
from gateway.core.verdict import ACCEPT_MODIFIED_MARK, DROP
from tests.unit.conftest import DEFAULTS, FRONTEND, POOL, SERVER, first_port, holds, ip, lab_model, out, udp

A, B = POOL[0], POOL[1]


def capped(per_backend: int = 10, total: int = 1000) -> TranslationTable:
    model = dataclasses.replace(lab_model(), max_flows_per_backend=per_backend, max_flows=total)
    return TranslationTable(model, 0.0, random.Random(3))


def send(t: TranslationTable, src: str, sport: int, now: float = 0.0, reply: bool = False) -> int:
    """One UDP flow from ``src``; with ``reply`` the server answers it. Returns its verdict's port or -1."""
    pkt = udp(src, SERVER, sport, 5000)
    if t.in2out(pkt, now) == DROP:
        return -1
    port = int.from_bytes(pkt[20:22], "big")
    if reply:
        assert t.out2in(udp(SERVER, FRONTEND, 5000, port), now) == ACCEPT_MODIFIED_MARK
    return port


def limit_events(t: TranslationTable) -> list[dict[str, object]]:
    return [event_fields(e) for e in t.events if e.name == "flow_limit_reached"]


def test_at_the_backend_cap_the_oldest_unreplied_flow_makes_room() -> None:
    """Early drop: at max_flows_per_backend a new flow ends the backend's oldest flow
    that never saw a reply (flows_ended_early_drop); replied flows are kept."""
    t = capped(per_backend=10)
    replied = [send(t, A, 30000 + i, 0.0, reply=True) for i in range(5)]
    quiet = [send(t, A, 31000 + i, 1.0 + i) for i in range(5)]
    assert send(t, A, 32000, 9.0) > 0
    c = t.counters_dict()
    assert c["flows_ended_early_drop"] == 1 and c["drop_flow_limit"] == 0
    assert t.out2in(udp(SERVER, FRONTEND, 5000, quiet[0]), 9.1) == DROP, "the oldest quiet flow went"
    for p in replied + quiet[1:]:
        assert t.out2in(udp(SERVER, FRONTEND, 5000, p), 9.2) == ACCEPT_MODIFIED_MARK
    assert len(t.backends[ip(A)].flows) == 10


def test_at_the_backend_cap_with_every_flow_replied_new_flows_are_refused() -> None:
    """No unreplied flow: the new flow is dropped (drop_flow_limit), counted on the
    backend, and one flow_limit_reached per backend per minute says so, with the
    number suppressed since."""
    t = capped(per_backend=4)
    ports = [send(t, A, 30000 + i, 0.0, reply=True) for i in range(4)]
    for i in range(5):
        assert send(t, A, 40000 + i, 1.0 + i) == -1
    assert send(t, B, 40000, 6.0) > 0, "another backend is not affected"
    assert t.counters_dict()["drop_flow_limit"] == 5
    (ev,) = limit_events(t)
    assert ev == {"backend": A, "public_ip": FRONTEND, "protocol": "udp", "limit": "backend",
                  "max_flows": 4, "flows": 4, "suppressed": 0}  # fmt: skip
    assert send(t, A, 40010, 61.0) == -1
    assert [e["suppressed"] for e in limit_events(t)] == [0, 4]
    row = views.ports(t, 61.0, 1000.0, backend=ip(A))[0]
    assert row["flow_limit_drops"] == 6 and row["flows"] == 4
    assert views.stats(t)["flow_limits"] == {"max_flows": 1000, "max_flows_per_backend": 4}
    assert t.out2in(udp(SERVER, FRONTEND, 5000, ports[0]), 62.0) == ACCEPT_MODIFIED_MARK


def test_early_drop_work_is_bounded() -> None:
    """Early drop looks at no more than 64 of the oldest not-yet-replied flows; replied
    ones it meets leave that line for good, so the next attempt gets further."""
    t = capped(per_backend=100)
    for i in range(70):
        send(t, A, 30000 + i, 0.0, reply=True)
    for i in range(30):
        send(t, A, 31000 + i, 1.0)
    be = t.backends[ip(A)]
    assert send(t, A, 32000, 2.0) == -1, "64 replied flows scanned, none dropped"
    assert be.drop_from == 64, "the next attempt starts past the replied ones"
    assert send(t, A, 32001, 2.0) > 0, "the next attempt reaches the quiet flows"
    assert t.counters_dict()["flows_ended_early_drop"] == 1


def test_a_flood_at_the_global_cap_takes_room_from_the_biggest_backend() -> None:
    """At max_flows another backend's new flow early-drops from the backend holding the
    most flows, not from itself; the flooding backend's own new flows only replace its own."""
    t = capped(per_backend=1000, total=50)
    for i in range(50):
        assert send(t, A, 30000 + i, 0.0) > 0
    for i in range(5):
        assert send(t, B, 40000 + i, 1.0, reply=True) > 0
    assert len(t.backends[ip(A)].flows) == 45 and len(t.backends[ip(B)].flows) == 5
    assert send(t, A, 30100, 2.0) > 0
    assert len(t.backends[ip(A)].flows) == 45 and t.flows_live == 50
    assert t.counters_dict()["drop_flow_limit"] == 0


def test_at_the_global_cap_with_nothing_to_drop_new_flows_are_refused_as_global() -> None:
    """When every flow has seen a reply, a new flow at max_flows is refused; the event says
    ``global`` and the cap."""
    t = capped(per_backend=1000, total=6)
    for i in range(6):
        send(t, A, 30000 + i, 0.0, reply=True)
    assert send(t, B, 40000, 1.0) == -1
    (ev,) = limit_events(t)
    assert (ev["backend"], ev["limit"], ev["max_flows"], ev["flows"]) == (B, "global", 6, 0)
    t.handle_timer(300.0)  # every flow idles out
    assert t.flows_live == 0 and send(t, B, 40000, 301.0) > 0


def test_changed_caps_apply_to_new_flows_after_a_reload() -> None:
    """A reload that lowers a cap ends nothing; the next new flow meets the new cap."""
    t = capped(per_backend=10)
    for i in range(5):
        send(t, A, 30000 + i, 0.0, reply=True)
    t.reconfigure(dataclasses.replace(t.model, max_flows_per_backend=5), 1.0)
    assert t.flow_count() == 5 and send(t, A, 31000, 1.0) == -1


def test_random_ports_are_drawn_from_the_block_and_depend_only_on_the_seed() -> None:
    """With an injected random source the choice is reproducible; another seed gives
    other ports; every port lies in the backend's block; nothing repeats."""

    def ports(seed: int) -> list[int]:
        t = TranslationTable(lab_model(random_ports=True), 0.0, random.Random(seed))
        got = [out(t, udp(A, SERVER, 30000 + i, 5000))[0] for i in range(50)]
        assert all(holds(t.backends[ip(A)].block, p) for p in got)
        return got

    assert ports(1) == ports(1)
    assert ports(1) != ports(2)
    assert len(set(ports(1))) == 50
    assert sorted(ports(1)) != ports(1), "not handed out in block order"


def test_first_port_is_spread_over_the_older_half_of_the_block() -> None:
    """Over many tables the first port of a fresh 1024 block takes hundreds of values
    (about 9 bits: the older half of the free line)."""
    firsts = set()
    for seed in range(400):
        t = TranslationTable(lab_model(random_ports=True), 0.0, random.Random(seed))
        firsts.add(out(t, udp(A, SERVER, 30000, 5000))[0] - first_port(t.backends[ip(A)].block))
    assert len(firsts) > 250 and max(firsts) < 512


def test_a_freed_port_waits_in_the_younger_half_of_the_free_line() -> None:
    """Random choice keeps the reuse guarantee: a freed port goes to the back of the line
    and is drawn only once it is in the older half. With 16 never-used ports ahead of it
    and nothing freed after it, it is not drawn before 15 of them are taken."""
    for seed in range(50):
        block = PortBlock(0, [64])
        rng = random.Random(seed)
        held = [block.allocate(17, {}, b"", b"d%d" % i, rng) for i in range(16)]
        block.release(17, held[0], b"d0")
        nxt = [block.allocate(17, {}, b"", b"e%d" % i, rng) for i in range(15)]
        assert held[0] not in nxt, seed


def test_sequential_ports_without_random_ports() -> None:
    """random_ports = false: ports in block order, least recently freed first."""
    t = TranslationTable(lab_model(random_ports=False), 0.0, random.Random(1))
    got = [out(t, udp(A, SERVER, 30000 + i, 5000))[0] for i in range(3)]
    assert got == [1024, 1025, 1026]


def test_default_model_has_documented_caps() -> None:
    """Defaults: 65536 flows per backend, 262144 in all, random ports (README, "Configuration")."""
    m = GatewayModel(default_snat=(ip(DEFAULTS[0]),))
    assert (m.max_flows_per_backend, m.max_flows, m.random_ports) == (65536, 262144, True)


MANY = tuple(f"10.10.{9 + i // 250}.{i % 250 + 1}" for i in range(801))  # 32-port blocks


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32), st.lists(st.tuples(st.booleans(), st.integers(0, 3), st.integers(0, 40)),
                                       max_size=120))
def test_random_ports_never_give_one_destination_a_port_twice(
    seed: int, ops: list[tuple[bool, int, int]]
) -> None:
    """Whatever the seed and the order of opens and closes, two live flows toward one
    destination never share a public port, and every port lies in the block (32 ports:
    they run out toward one destination and come back)."""
    t = TranslationTable(lab_model(members=MANY, random_ports=True), 0.0, random.Random(seed))
    be_ip = ip("10.10.9.1")
    for now, (close, dst, sport) in enumerate(ops):
        pkt = udp("10.10.9.1", f"198.51.100.{2 + dst}", 30000 + sport, 5000)
        if close:
            be = t.backends[be_ip]
            for f in list(be.flows)[:1]:
                t.end_flow(f, EndReason.IDLE, float(now))
        else:
            t.in2out(pkt, float(now))
        be = t.backends[be_ip]
        seen = [(f.dest, f.public_port) for f in be.flows]
        assert len(seen) == len(set(seen))
        assert all(holds(be.block, p) for _d, p in seen)


def test_early_drop_starts_the_vacancy_clock_of_a_standalone_backend_at_that_moment() -> None:
    """A standalone backend whose only flow was early-dropped keeps its block until
    idle_timeout after the drop (the vacancy clock starts when the last flow ended)."""
    t = capped(per_backend=1)
    send(t, "10.10.3.1", 30000, 0.0)
    be = t.backends[ip("10.10.3.1")]
    (f,) = be.flows
    t._early_drop(be, 50.0)
    assert be.vacant_since == 50.0 and t.get_timer() == 50.0 + 240.0
    t.handle_timer(50.0 + 239.0)
    assert ip("10.10.3.1") in t.backends
    t.handle_timer(50.0 + 240.0)
    assert ip("10.10.3.1") not in t.backends


def test_a_backends_list_of_flows_drops_ended_ones_as_it_goes() -> None:
    """Churn on one backend: its list holds at most a quarter more than its live flows
    (plus 16), and ``flows`` lists exactly the live ones."""
    t = capped(per_backend=1000)
    be = None
    for rnd in range(20):
        for i in range(50):
            send(t, A, 20000 + rnd * 50 + i, float(rnd))
        be = t.backends[ip(A)]
        for f in be.flows[:40]:
            t.end_flow(f, EndReason.CLOSED, float(rnd))
        assert len(be.flow_list) <= be.flow_count + (be.flow_count >> 2) + 16
    assert be is not None
    live = [f for fl in t.inside.values() for f in fl.values()]
    assert sorted(map(id, be.flows)) == sorted(map(id, live)) and be.flow_count == len(live) == 200


def test_each_of_n_workers_caps_its_own_table_at_its_share_of_max_flows() -> None:
    """With N workers max_flows is shared: a worker's table refuses (``global``) past
    ceil(max_flows / N) flows of its own backends, so N workers hold about max_flows."""
    model = dataclasses.replace(lab_model(), max_flows_per_backend=1000, max_flows=10)
    n = 3
    w = backend_owner(ip(A), n)
    t = TranslationTable(model, 0.0, random.Random(3), Shard(w, n))
    for i in range(4):  # ceil(10 / 3)
        assert send(t, A, 30000 + i, 0.0, reply=True) > 0
    assert send(t, A, 30100, 1.0) == -1
    (ev,) = limit_events(t)
    assert (ev["limit"], ev["max_flows"]) == ("global", 4)
    assert t.flows_live == 4 and t.counters_dict()["drop_flow_limit"] == 1
