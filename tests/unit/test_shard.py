"""N tables built with ``shard=Shard(i, N)`` behave as one gateway (docs/decisions.md,
"Workers"): each packet goes to the worker a pure copy of the kernel's steering
rules picks, a ``REQUEUE`` is followed once, and every flow lives in its owner only."""

from __future__ import annotations

from dataclasses import dataclass, field
from random import Random

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.block import CHUNK_SHIFT
from gateway.core.counters import Counter
from gateway.core.flow import Flow
from gateway.core.model import (
    PROTO_ICMP,
    PROTO_TCP,
    PROTO_UDP,
    Distribution,
    Frontend,
    GatewayModel,
    InboundNatRule,
    InstanceIp,
    LbRule,
    Pool,
    Probe,
)
from gateway.core.packet import checksums_ok, describe
from gateway.core.shard import Shard, backend_owner, backend_slots, slice_chunks, slice_ports
from gateway.core.table import TranslationTable
from gateway.core.verdict import ACCEPT_MODIFIED, ACCEPT_MODIFIED_MARK, REQUEUE, Verdict
from tests.unit.conftest import echo, ip, tcp, udp

FE_WEB = "198.51.100.10"
FE_API = "198.51.100.11"
INST_PUBLIC = "198.51.100.20"
INST = "10.10.2.3"
DEFAULTS = ("198.51.100.30", "198.51.100.31")
WEB = tuple(f"10.10.1.{i}" for i in range(1, 7))
API = tuple(f"10.10.4.{i}" for i in range(1, 5))
NAT_BACKEND = "10.10.5.7"
PROBE = Probe("web-probe", "tcp", 8080, number_of_probes=1)
#: Inside sources of every scenario: pool members, the instance IP's backend, the
#: inbound NAT rule's backend, standalone sources.
BACKENDS = WEB + API + (INST, NAT_BACKEND) + tuple(f"10.10.3.{i}" for i in (1, 2, 5, 14, 15, 16, 33, 250))
COUNTS = (1, 2, 3, 4)


def shard_model() -> GatewayModel:
    """Two frontends with pools spread over the workers, an LB rule per protocol kind,
    an inbound NAT rule, an instance IP and two default SNAT addresses."""
    return GatewayModel(
        frontends=(Frontend("fe-web", ip(FE_WEB)), Frontend("fe-api", ip(FE_API))),
        pools=(Pool("web", tuple(ip(m) for m in WEB)), Pool("api", tuple(ip(m) for m in API))),
        lb_rules=(
            LbRule("http", "fe-web", "web", "tcp", 80, 8080, probe="web-probe"),
            LbRule("dns", "fe-web", "web", "udp", 5353, 53),
            LbRule("api", "fe-api", "api", "all", 443, 8443, Distribution.SOURCE_IP),
        ),
        inbound_nat_rules=(InboundNatRule("ssh", "fe-web", "tcp", 2222, ip(NAT_BACKEND), 22),),
        instance_ips=(InstanceIp(ip(INST), ip(INST_PUBLIC)),),
        default_snat=tuple(ip(d) for d in DEFAULTS),
        probes=(PROBE,),
        inbound_default_allow=True,
    )


def _slot_worker(addr: str, n: int) -> int:
    """``-m u32 --u32 "12&0xF=v1,v2,..."`` (or the same on the destination): the worker
    whose ``backend_slots`` hold the address's low four bits."""
    low = ip(addr) & 0xF
    (w,) = [i for i in range(n) if low in backend_slots(i, n)]
    return w


def _slice_worker(port: int, n: int) -> int:
    """``--dport lo:hi`` (or the echo identifier's u32 range): the worker whose slice holds it."""
    (w,) = [i for i in range(n) if slice_ports(i, n)[0] <= port <= slice_ports(i, n)[1]]
    return w


@dataclass
class Gateway:
    """N workers, each a whole table for its shard, and the kernel's steering in between."""

    n: int
    model: GatewayModel = field(default_factory=shard_model)
    tables: list[TranslationTable] = field(default_factory=list)
    #: Every (way, first worker, final worker) a packet took.
    trips: list[tuple[str, int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tables = [
            TranslationTable(self.model, 0.0, Random(i), Shard(i, self.n)) for i in range(self.n)
        ]
        for t in self.tables:
            for m in WEB:
                t.probe_result(PROBE.name, ip(m), True, 0.0)
        self.pat = {ip(FE_WEB), ip(FE_API)} | {ip(d) for d in DEFAULTS}
        self.instances = {i.public: i.private for i in self.model.instance_ips}

    def steer(self, way: str, pkt: bytearray) -> int:
        """The worker the iptables steering rules of the contract send ``pkt`` to."""
        s = describe(pkt)
        if way in ("in2out", "hairpin"):
            return _slot_worker(s.src, self.n)
        if way == "local_out":
            return 0
        dst = ip(s.dst)
        if dst in self.instances:
            return backend_owner(self.instances[dst], self.n)
        if dst in self.pat:
            if s.proto in (PROTO_TCP, PROTO_UDP) and s.dport >= 1024:
                return _slice_worker(s.dport, self.n)
            if s.proto == PROTO_ICMP and s.icmp_type == 0 and s.sport >= 1024:
                return _slice_worker(s.sport, self.n)
        return _slot_worker(s.src, self.n)

    def send(self, way: str, pkt: bytearray, now: float = 1.0) -> tuple[int, Verdict]:
        """Deliver ``pkt`` to its steered worker, follow one REQUEUE; (final worker, verdict)."""
        first = w = self.steer(way, pkt)
        v = self._call(w, way, pkt, now)
        if v >= REQUEUE:
            w = v - REQUEUE
            assert w != first, "re-queued to itself"
            assert self.n > 1, "one worker re-queued"
            v = self._call(w, "hairpin_second" if way == "hairpin" else way, pkt, now)
            assert v < REQUEUE, "re-queued twice"
        self.trips.append((way, first, w))
        return w, v

    def _call(self, w: int, way: str, pkt: bytearray, now: float) -> Verdict:
        verdict: Verdict = getattr(self.tables[w], way)(pkt, now)
        return verdict

    def flows(self) -> list[tuple[int, Flow]]:
        """Every live flow with its worker."""
        return [(w, f) for w, t in enumerate(self.tables) for fl in t.inside.values() for f in fl.values()]

    def holders(self, backend: str, proto: int, backend_port: int, remote: str) -> list[int]:
        """The workers holding a flow of ``backend``'s port with ``remote``."""
        want = (ip(backend), proto, backend_port, ip(remote))
        return [w for w, f in self.flows() if (f.backend, f.proto, f.backend_port, f.remote) == want]

    def check(self) -> None:
        """Whole-gateway invariants: flows and blocks only at their owner, blocks in the
        owner's slice and disjoint, no (public, port, destination) handed out twice."""
        seen: set[tuple[int, int, int, int, int]] = set()
        for w, f in self.flows():
            assert backend_owner(f.backend, self.n) == w
            k = (f.proto, f.public, f.public_port, f.remote, f.remote_port)
            assert k not in seen, "two flows share a public port toward one destination"
            seen.add(k)
        lo, hi = 0, 0
        taken: dict[int, set[int]] = {}
        for w, t in enumerate(self.tables):
            lo, hi = slice_chunks(w, self.n)
            for be in t.backends.values():
                assert backend_owner(be.ip, self.n) == w
                if be.block is None:
                    continue
                chunks = set(be.block.chunks)
                assert all(lo <= c < hi for c in chunks), "a block outside its worker's slice"
                mine = taken.setdefault(be.address.ip, set())
                assert not mine & chunks, "two blocks share a chunk"
                mine |= chunks
        if self.n == 1:
            assert self.tables[0].counters[Counter.REQUEUED] == 0

    def requeued(self) -> int:
        return sum(t.counters[Counter.REQUEUED] for t in self.tables)


def reply_to(pkt: bytearray, flags: str = "SA") -> bytearray:
    """The answer to a translated packet: addresses and ports swapped."""
    s = describe(pkt)
    if s.proto == PROTO_TCP:
        return tcp(s.dst, s.src, s.dport, s.sport, flags, seq=100)
    if s.proto == PROTO_UDP:
        return udp(s.dst, s.src, s.dport, s.sport)
    return echo(s.dst, s.src, s.sport, reply=s.icmp_type == 8)


def first_packet(proto: str, src: str, dst: str, sport: int, dport: int) -> bytearray:
    if proto == "tcp":
        return tcp(src, dst, sport, dport)
    if proto == "udp":
        return udp(src, dst, sport, dport)
    return echo(src, dst, sport)


#: A remote's (or a hairpinning backend's) source port.
PORTS = st.integers(1024, 65535)
outbound = st.tuples(
    st.sampled_from(BACKENDS),
    st.integers(1, 254),
    st.integers(1, 65535),
    st.integers(1, 65535),
    st.sampled_from(("tcp", "udp", "icmp")),
)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(COUNTS), st.lists(outbound, min_size=1, max_size=12))
def test_outbound_flows_live_at_the_owner_and_their_replies_come_back_there(
    n: int, conns: list[tuple[str, int, int, int, str]]
) -> None:
    """Each outbound flow is made by its backend's owner only; the reply, steered by
    port slice (or instance IP), reaches that worker and is translated back."""
    gw = Gateway(n)
    for backend, r, sport, dport, proto in conns:
        remote = f"203.0.113.{r}"
        pkt = first_packet(proto, backend, remote, sport, dport)
        w, v = gw.send("in2out", pkt)
        assert v == ACCEPT_MODIFIED and w == backend_owner(ip(backend), n)
        assert checksums_ok(pkt)
        p = PROTO_TCP if proto == "tcp" else PROTO_UDP if proto == "udp" else PROTO_ICMP
        holders = gw.holders(backend, p, sport, remote)
        assert holders and set(holders) == {w}
        back = reply_to(pkt)
        w2, v2 = gw.send("out2in", back)
        assert (w2, v2) == (w, ACCEPT_MODIFIED_MARK)
        s = describe(back)
        assert (s.dst, s.dport if p != PROTO_ICMP else s.sport) == (backend, sport)
        assert checksums_ok(back)
    gw.check()


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(COUNTS), st.lists(st.tuples(st.integers(1, 254), PORTS), max_size=9))
def test_lb_flows_open_at_the_member_owner_and_survive_other_members_health(
    n: int, clients: list[tuple[int, int]]
) -> None:
    """A SYN to an LB rule opens its flow at the owner of the member it goes to; the
    member's answer and the client's later packets reach that worker, also after
    another member went down."""
    gw = Gateway(n)
    opened = []
    for c, sport in clients:
        client = f"192.0.2.{c}"
        syn = tcp(client, FE_WEB, sport, 80)
        w, v = gw.send("out2in", syn)
        if v != ACCEPT_MODIFIED_MARK:
            continue  # the same client and port twice: its flow is there already
        member = describe(syn).dst
        assert member in WEB and w == backend_owner(ip(member), n)
        holders = gw.holders(member, PROTO_TCP, 8080, client)
        assert holders and set(holders) == {w}
        sa = reply_to(syn)
        w2, v2 = gw.send("in2out", sa)
        s = describe(sa)
        assert (w2, v2, s.src, s.sport, s.dst, s.dport) == (w, ACCEPT_MODIFIED, FE_WEB, 80, client, sport)
        opened.append((client, sport, member, w))
    for client, sport, member, w in opened:
        other = next(m for m in WEB if m != member)
        for t in gw.tables:
            t.probe_result(PROBE.name, ip(other), False, 2.0)
        ack = tcp(client, FE_WEB, sport, 80, "A", seq=1, ack=101)
        assert gw.send("out2in", ack, 2.0) == (w, ACCEPT_MODIFIED_MARK)
        assert describe(ack).dst == member
        for t in gw.tables:
            t.probe_result(PROBE.name, ip(other), True, 3.0)
    gw.check()


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(COUNTS), st.integers(1, 254), PORTS, st.sampled_from(("udp", "tcp")))
def test_udp_lb_rule_source_ip_rule_and_nat_rule(n: int, c: int, sport: int, proto: str) -> None:
    """An LB rule on a port inside the SNAT slices (steered by port, then re-queued), a
    source_ip rule on a second frontend and an inbound NAT rule open at the owner."""
    gw = Gateway(n)
    client = f"192.0.2.{c}"
    dns = udp(client, FE_WEB, sport, 5353)
    w, v = gw.send("out2in", dns)
    member = describe(dns).dst
    assert v == ACCEPT_MODIFIED_MARK and member in WEB and w == backend_owner(ip(member), n)
    api = first_packet(proto, client, FE_API, sport, 443)
    w, v = gw.send("out2in", api)
    member = describe(api).dst
    assert v == ACCEPT_MODIFIED_MARK and member in API and w == backend_owner(ip(member), n)
    assert gw.send("in2out", reply_to(api)) == (w, ACCEPT_MODIFIED)
    ssh = tcp(client, FE_WEB, sport, 2222)
    w, v = gw.send("out2in", ssh)
    assert (v, describe(ssh).dst, w) == (ACCEPT_MODIFIED_MARK, NAT_BACKEND, backend_owner(ip(NAT_BACKEND), n))
    back = reply_to(ssh)
    assert gw.send("in2out", back) == (w, ACCEPT_MODIFIED)
    assert describe(back).src == FE_WEB
    ping = echo(client, INST_PUBLIC, sport)
    w, v = gw.send("out2in", ping)
    assert (v, describe(ping).dst, w) == (ACCEPT_MODIFIED_MARK, INST, backend_owner(ip(INST), n))
    assert gw.send("in2out", reply_to(ping)) == (w, ACCEPT_MODIFIED)
    gw.check()


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from(COUNTS),
    st.sampled_from(BACKENDS),
    st.integers(1024, 65535),
    st.sampled_from(((FE_WEB, 80, WEB), (FE_WEB, 2222, (NAT_BACKEND,)), (INST_PUBLIC, 7000, (INST,)))),
)
def test_hairpin_both_ways_across_workers(
    n: int, sender: str, sport: int, target: tuple[str, int, tuple[str, ...]]
) -> None:
    """A backend's SYN to a public address reaches the target (its second half at the
    target's owner when that is another worker) and the answer finds the sender."""
    public, port, served = target
    gw = Gateway(n)
    syn = tcp(sender, public, sport, port)
    w, v = gw.send("hairpin", syn)
    s = describe(syn)
    if s.dst == sender or v != ACCEPT_MODIFIED_MARK:
        # A target hairpinning to itself through its own address: not this property.
        assert sender in served
        return
    assert s.dst in served
    assert w == backend_owner(ip(s.dst), n)
    sender_public, sender_port = s.src, s.sport
    assert sender_public != sender
    sa = reply_to(syn)
    w2, v2 = gw.send("hairpin", sa)
    r = describe(sa)
    assert (v2, r.dst, r.dport, r.src, r.sport) == (ACCEPT_MODIFIED_MARK, sender, sport, public, port)
    assert w2 == backend_owner(ip(sender), n)
    assert (sender_public, sender_port) != (public, port)
    translated = sum(t.counters[Counter.HAIRPIN_TRANSLATED] for t in gw.tables)
    assert translated == 2
    gw.check()


def test_one_worker_never_requeues() -> None:
    """With ``Shard(0, 1)`` every kind of packet is handled where it lands."""
    gw = Gateway(1)
    for i, b in enumerate(BACKENDS):
        pkt = udp(b, "203.0.113.9", 4000 + i, 53)
        assert gw.send("in2out", pkt)[1] == ACCEPT_MODIFIED
        assert gw.send("out2in", reply_to(pkt))[1] == ACCEPT_MODIFIED_MARK
        assert gw.send("out2in", tcp(f"192.0.2.{i + 1}", FE_WEB, 5000 + i, 80))[1] == ACCEPT_MODIFIED_MARK
        assert gw.send("hairpin", tcp(b, FE_API, 6000 + i, 443))[0] == 0
    assert gw.requeued() == 0
    gw.check()


def test_blocks_of_every_worker_lie_in_its_slice() -> None:
    """Every configured backend has a block at its owner only, inside the owner's slice."""
    for n in COUNTS:
        gw = Gateway(n)
        for b in WEB + API:
            (owner,) = [w for w, t in enumerate(gw.tables) if ip(b) in t.backends]
            assert owner == backend_owner(ip(b), n)
            block = gw.tables[owner].backends[ip(b)].block
            assert block is not None and block.size == 1024
            lo, hi = slice_ports(owner, n)
            assert all(lo <= c << CHUNK_SHIFT <= hi for c in block.chunks)
        gw.check()


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(COUNTS), st.sets(st.sampled_from(WEB)), st.lists(st.integers(1, 254), max_size=8))
def test_lb_flows_go_only_to_healthy_members_whichever_are_down(
    n: int, down: set[str], clients: list[int]
) -> None:
    """With any members down, a new connection goes to a healthy member at its owner (or
    is dropped when none is up) and the client's next packet reaches that worker."""
    gw = Gateway(n)
    for t in gw.tables:
        for m in down:
            t.probe_result(PROBE.name, ip(m), False, 0.5)
    for i, c in enumerate(clients):
        client = f"192.0.2.{c}"
        syn = tcp(client, FE_WEB, 10000 + i, 80)
        w, v = gw.send("out2in", syn)
        if len(down) == len(WEB):
            assert v != ACCEPT_MODIFIED_MARK
            continue
        member = describe(syn).dst
        assert v == ACCEPT_MODIFIED_MARK and member not in down and w == backend_owner(ip(member), n)
        ack = tcp(client, FE_WEB, 10000 + i, 80, "A", seq=1, ack=1)
        assert gw.send("out2in", ack) == (w, ACCEPT_MODIFIED_MARK)
    gw.check()
