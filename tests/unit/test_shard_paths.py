"""Workers' less common paths (docs/decisions.md, "Workers"): ICMP errors and the host's
own errors about a flow of another worker, the LB member choice, hairpin hand-offs,
tiers fitted to a slice and restoring a file written with another worker count."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address
from random import Random

import pytest
from scapy.layers.inet import ICMP, IP

from gateway.core import persist, restore
from gateway.core.block import CHUNK_SHIFT
from gateway.core.counters import Counter
from gateway.core.model import Direction, Frontend, GatewayModel, LbRule, Pool, SecurityGroup, Tag
from gateway.core.packet import checksums_ok, describe
from gateway.core.shard import Shard, backend_owner, slice_ports
from gateway.core.table import TranslationTable
from gateway.core.tier import ports_per_backend
from gateway.core.verdict import (
    ACCEPT,
    ACCEPT_MODIFIED,
    ACCEPT_MODIFIED_MARK,
    DROP,
    REQUEUES,
)
from tests.unit.conftest import echo, ip, rule, tcp, udp
from tests.unit.test_shard import (
    API,
    BACKENDS,
    FE_WEB,
    INST,
    INST_PUBLIC,
    WEB,
    Gateway,
    reply_to,
    shard_model,
)

ROUTER = "192.0.2.77"
REMOTE = "203.0.113.5"


def icmp_error(src: str, dst: str, quoted: bytearray, typ: int = 11, code: int = 0) -> bytearray:
    """An ICMP error from ``src`` to ``dst`` quoting the header and 8 bytes of ``quoted``."""
    return bytearray(bytes(IP(src=src, dst=dst) / ICMP(type=typ, code=code) / bytes(quoted[:28])))


def quoted(pkt: bytearray) -> tuple[str, str, int, int]:
    """The quoted packet's (src, dst, sport, dport) inside an error."""
    q = bytes(pkt[28:56])
    return (
        str(IPv4Address(q[12:16])), str(IPv4Address(q[16:20])),
        int.from_bytes(q[20:22], "big"), int.from_bytes(q[22:24], "big"),
    )  # fmt: skip


@pytest.mark.parametrize("n", [2, 3, 4])
def test_outside_errors_about_a_flow_reach_its_owner(n: int) -> None:
    """A router's time-exceeded about an outbound packet of any backend, steered by the
    router's address, is handed to the flow's owner and translated to the backend."""
    gw = Gateway(n)
    for i, b in enumerate(BACKENDS):
        for pkt in (udp(b, REMOTE, 3000 + i, 53), echo(b, REMOTE, 3000 + i)):
            w, v = gw.send("in2out", pkt)
            assert v == ACCEPT_MODIFIED
            s = describe(pkt)
            err = icmp_error(ROUTER, s.src, pkt)
            assert gw.send("out2in", err) == (w, ACCEPT_MODIFIED_MARK)
            assert describe(err).dst == b and quoted(err)[0] == b and checksums_ok(err)
    assert gw.requeued() > 0


@pytest.mark.parametrize("n", [2, 3, 4])
def test_inside_and_host_errors_about_a_return_packet_reach_its_owner(n: int) -> None:
    """A backend's port-unreachable landing on another worker, and the host's own error
    (OUTPUT, worker 0) quoting a translated return packet, are handed to the owner."""
    gw = Gateway(n)
    for i, b in enumerate(BACKENDS):
        pkt = udp(b, REMOTE, 3000 + i, 53)
        w, _v = gw.send("in2out", pkt)
        back = reply_to(pkt)
        assert gw.send("out2in", back)[0] == w
        wrong = (w + 1) % n
        err = icmp_error(b, REMOTE, back, 3, 3)
        assert gw.tables[wrong].in2out(err, 1.0) == REQUEUES[w]
        assert gw.tables[w].in2out(err, 1.0) == ACCEPT_MODIFIED
        assert quoted(err)[1] == describe(pkt).src
        host = icmp_error("198.51.100.1", REMOTE, back, 11)
        assert gw.send("local_out", host) == (w, ACCEPT_MODIFIED)
        assert quoted(host)[1:] == (describe(pkt).src, 53, describe(pkt).sport)


@pytest.mark.parametrize("n", [2, 4])
def test_host_error_about_a_foreign_backend_without_a_flow_never_leaves(n: int) -> None:
    """A host error quoting a backend another worker owns (a standalone one worker 0
    has never seen) goes to that owner, which suppresses it: no private address leaves."""
    gw = Gateway(n)
    b = next(x for x in BACKENDS if backend_owner(ip(x), n) != 0 and x.startswith("10.10.3."))
    pkt = udp(b, REMOTE, 3000, 53)
    w, _v = gw.send("in2out", pkt)
    err = icmp_error("198.51.100.1", REMOTE, udp(REMOTE, b, 53, 4444), 11)
    assert gw.send("local_out", err) == (w, DROP)
    assert gw.tables[w].counters[Counter.DROP_LOCAL_ICMP_NO_FLOW] == 1
    err = icmp_error("198.51.100.1", REMOTE, udp(REMOTE, "198.51.100.1", 53, 4444), 11)
    assert gw.send("local_out", err)[1] == ACCEPT


@pytest.mark.parametrize("n", [2, 3, 4])
def test_lb_members_are_those_one_worker_picks_while_all_are_up(n: int) -> None:
    """With every member up, N workers send each new connection to the member one
    worker would (the hash over all members), and every member gets some."""
    one, many = Gateway(1), Gateway(n)
    seen = set()
    for i in range(120):
        a, b = (tcp(f"192.0.2.{i % 200 + 1}", FE_WEB, 20000 + i, 80) for _ in range(2))
        assert one.send("out2in", a)[1] == ACCEPT_MODIFIED_MARK
        assert many.send("out2in", b)[1] == ACCEPT_MODIFIED_MARK
        assert describe(a).dst == describe(b).dst
        seen.add(describe(b).dst)
    assert seen == set(WEB)


def test_lb_rule_with_the_dispatch_worker_down_goes_to_the_next_worker() -> None:
    """The dispatch worker's members all down: the next worker with a member up opens
    the flow, to one of its own; all down: dropped, no_healthy_member."""
    gw = Gateway(2)
    owned0 = [m for m in WEB if backend_owner(ip(m), 2) == 0]
    for t in gw.tables:
        for m in owned0:
            t.probe_result("web-probe", ip(m), False, 1.0)
    for i in range(20):
        syn = tcp(f"192.0.2.{i + 1}", FE_WEB, 30000 + i, 80)
        assert gw.send("out2in", syn) == (1, ACCEPT_MODIFIED_MARK)
        assert describe(syn).dst not in owned0
    for t in gw.tables:
        for m in WEB:
            t.probe_result("web-probe", ip(m), False, 2.0)
    assert gw.send("out2in", tcp("192.0.2.99", FE_WEB, 30099, 80))[1] == DROP
    assert sum(t.counters[Counter.DROP_NO_HEALTHY_MEMBER] for t in gw.tables) == 1


def test_hairpin_second_never_hands_on_and_a_foreign_sender_is_misrouted() -> None:
    """``hairpin_second`` on a worker that owns not the destination half drops it
    (drop_misrouted, not requeued); ``hairpin`` from a sender another worker owns too."""
    gw = Gateway(2)
    w0 = next(m for m in WEB if backend_owner(ip(m), 2) == 0)
    w1 = next(m for m in WEB if backend_owner(ip(m), 2) == 1)
    pkt = udp(w1, REMOTE, 4000, 53)
    assert gw.send("in2out", pkt) == (1, ACCEPT_MODIFIED)
    public_port = describe(pkt).sport
    t0, t1 = gw.tables
    assert t0.hairpin_second(udp(REMOTE, FE_WEB, 53, public_port), 1.0) == DROP
    assert (t0.counters[Counter.DROP_MISROUTED], t0.counters[Counter.REQUEUED]) == (1, 0)
    assert t1.hairpin_second(udp(REMOTE, FE_WEB, 53, public_port), 1.0) == ACCEPT_MODIFIED_MARK
    assert t1.counters[Counter.HAIRPIN_TRANSLATED] == 1
    assert t1.hairpin(tcp(w0, FE_WEB, 5001, 80), 1.0) == DROP
    assert t1.counters[Counter.DROP_MISROUTED] == 1 and t1.flow_count() == 1


def crowded_model(n_members: int, step: int) -> GatewayModel:
    """One frontend whose members all have the same low address bits when ``step`` is 16."""
    members = tuple(ip("10.20.0.0") + step * (i + 1) for i in range(n_members))
    return GatewayModel(
        frontends=(Frontend("fe", ip(FE_WEB)),),
        pools=(Pool("p", members),),
        lb_rules=(LbRule("r", "fe", "p", "tcp", 80, 8080),),
        default_snat=(ip("198.51.100.30"),),
    )


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16])
def test_frontend_tier_shrinks_until_its_own_blocks_fit_the_slice(n: int) -> None:
    """50 members all owned by worker 0: the tier of 50 (1024 ports) with one worker,
    halved until 50 blocks fit worker 0's slice with more; every block allocated."""
    t = TranslationTable(crowded_model(50, 16), 0.0, shard=Shard(0, n))
    lo, hi = slice_ports(0, n)
    room = (hi + 1 - lo) // 32
    want = 1024
    while want > 32 and 50 * want // 32 > room:
        want //= 2
    assert t.addresses[ip(FE_WEB)].block_size == want
    assert len(t.backends) == 50
    for be in t.backends.values():
        assert be.block is not None and be.block.size == want
        assert all(lo <= c << CHUNK_SHIFT <= hi for c in be.block.chunks)
    for i in range(1, n):
        other = TranslationTable(crowded_model(50, 16), 0.0, shard=Shard(i, n))
        assert not other.backends and other.addresses[ip(FE_WEB)].block_size == 1024


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_default_snat_tier_counts_local_backends_times_workers(n: int) -> None:
    """Standalone sources take the tier of (this worker's count x workers) on the default
    address, and only their owner places them."""
    tables = [TranslationTable(crowded_model(1, 1), 0.0, Random(i), Shard(i, n)) for i in range(n)]
    srcs = [f"10.30.{i // 250}.{i % 250 + 1}" for i in range(60)]
    for i, s in enumerate(srcs):
        w = backend_owner(ip(s), n)
        for k, t in enumerate(tables):
            v = t.in2out(udp(s, REMOTE, 1000 + i, 53), 1.0)
            assert v == (ACCEPT_MODIFIED if k == w else REQUEUES[w])
    for t in tables:
        addr = t.addresses[ip("198.51.100.30")]
        local = len(addr.members)
        assert addr.block_size == ports_per_backend(local * n)
        assert all(backend_owner(b, n) == t.shard.index for b in addr.members)
    assert sum(len(t.addresses[ip("198.51.100.30")].members) for t in tables) == len(srcs)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_restore_keeps_only_owned_flows_in_the_slice(n: int) -> None:
    """A file written by one worker, read by N: each keeps its backends' flows whose
    port lies in its slice; the rest is counted (dropped_not_owned, dropped_port)."""
    one = Gateway(1)
    for i, b in enumerate(BACKENDS):
        for k in range(3):
            one.send("in2out", udp(b, REMOTE, 2000 + 10 * i + k, 53), 1.0)
    one.send("out2in", tcp("192.0.2.8", FE_WEB, 5555, 80), 1.0)
    data = persist.dump(one.tables[0], 2.0, 1000.0)
    saved = one.tables[0].flow_count()
    kept = 0
    for w in range(n):
        t = TranslationTable(shard_model(), 0.0, shard=Shard(w, n))
        s = restore.restore(t, data, 3.0, 1001.0)
        assert s.saved == saved
        owned = sum(1 for _w, f in one.flows() if backend_owner(f.backend, n) == w)
        assert s.dropped_not_owned == saved - owned
        assert s.restored + s.dropped_port + s.dropped_config == owned
        lo, hi = slice_ports(w, n)
        for fl in t.inside.values():
            for f in fl.values():
                assert backend_owner(f.backend, n) == w
                assert f.inbound or f.block is None or lo <= f.public_port <= hi
        assert "dropped_not_owned" in restore.summary_fields(s)
        kept += s.restored
    assert 0 < kept <= saved


def test_one_worker_restore_counts_nothing_as_not_owned() -> None:
    """``Shard(0, 1)`` owns every saved flow."""
    gw = Gateway(1)
    gw.send("in2out", udp(WEB[0], REMOTE, 2000, 53))
    t = TranslationTable(replace(shard_model()), 0.0)
    s = restore.restore(t, persist.dump(gw.tables[0], 2.0, 1000.0), 3.0, 1001.0)
    assert (s.restored, s.dropped_not_owned) == (1, 0)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_hairpinned_icmp_error_finds_the_sender_across_workers(n: int) -> None:
    """A target's port-unreachable about a hairpinned datagram goes back through both
    halves (the target's worker, then the sender's) with the quote put back."""
    gw = Gateway(n)
    sender = next(b for b in BACKENDS if backend_owner(ip(b), n) != backend_owner(ip(INST), n))
    pkt = udp(sender, INST_PUBLIC, 4321, 7000)
    w, v = gw.send("hairpin", pkt)
    assert (w, v, describe(pkt).dst) == (backend_owner(ip(INST), n), ACCEPT_MODIFIED_MARK, INST)
    err = icmp_error(INST, describe(pkt).src, pkt, 3, 3)
    w, v = gw.send("hairpin", err)
    assert (w, v) == (backend_owner(ip(sender), n), ACCEPT_MODIFIED_MARK)
    assert describe(err).dst == sender and describe(err).src == INST_PUBLIC
    assert quoted(err) == (sender, INST_PUBLIC, 4321, 7000)
    assert checksums_ok(err)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_any_worker_judges_a_probe_syn_to_any_member(n: int) -> None:
    """Probe SYNs are stateless: every worker drops one a group denies, members it does
    not own included, and passes it without such a group."""
    no_lb = rule("no-lb", 100, Direction.INBOUND, False, src=(Tag.AZURE_LOAD_BALANCER,))
    deny = SecurityGroup("nsg", (no_lb,), pools=("web", "api"))
    for groups, want in (((), ACCEPT), ((deny,), DROP)):
        model = replace(shard_model(), security_groups=groups, probe_source=ip("10.10.0.254"))
        for w in range(n):
            t = TranslationTable(model, 0.0, shard=Shard(w, n))
            for m in WEB + API:
                assert t.local_out(tcp("10.10.0.254", m, 33000, 8080), 1.0) == want


@pytest.mark.parametrize("n", [2, 3])
def test_reload_places_new_members_at_their_owner_only(n: int) -> None:
    """A reload that adds members gives each a block at its owner (in its slice) and
    nowhere else, and keeps the live flows of the others."""
    gw = Gateway(n)
    pkts = [udp(m, REMOTE, 7000, 53) for m in WEB]
    for p in pkts:
        gw.send("in2out", p)
    before = sum(t.flow_count() for t in gw.tables)
    extra = tuple(f"10.10.1.{i}" for i in range(7, 12))
    web = Pool("web", tuple(ip(m) for m in WEB + extra))
    model = replace(shard_model(), pools=(web, shard_model().pools[1]))
    for t in gw.tables:
        t.reconfigure(model, 2.0)
    gw.check()
    assert sum(t.flow_count() for t in gw.tables) == before
    for m in extra:
        assert [w for w, t in enumerate(gw.tables) if ip(m) in t.backends] == [backend_owner(ip(m), n)]
