"""Hairpinning: a backend reaching a public address of the gateway (RFC 4787 REQ-9,
RFC 5382 REQ-8; docs/model.md, "Hairpinning")."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.model import Distribution, InboundNatRule, LbRule, Pool, Probe
from gateway.core.packet import checksums_ok, describe
from gateway.core.table import TranslationTable
from gateway.core.verdict import ACCEPT_MODIFIED_MARK, DROP
from tests.unit.conftest import (
    DEFAULTS,
    FRONTEND,
    INSTANCE,
    INSTANCE_PUBLIC,
    POOL,
    STANDALONE,
    echo,
    inbound_model,
    ip,
    tcp,
    udp,
)


def hairpin(t: TranslationTable, pkt: bytearray, now: float = 0.0) -> tuple[str, int, str, int]:
    """Hairpin ``pkt`` (it must pass with valid checksums): its new src, sport, dst, dport."""
    assert t.hairpin(pkt, now) == ACCEPT_MODIFIED_MARK
    assert checksums_ok(pkt)
    s = describe(pkt)
    return s.src, s.sport, s.dst, s.dport


def test_a_standalone_reaches_an_lb_frontend_and_the_member_sees_its_public_address() -> None:
    """Standalone -> frontend:80 reaches a member:8080 from its default SNAT ip:port; the answer returns."""
    t = TranslationTable(inbound_model(), 0.0)
    src, sport, dst, dport = hairpin(t, tcp(STANDALONE, FRONTEND, 40000, 80))
    assert src in DEFAULTS and dst in POOL and dport == 8080
    back = hairpin(t, tcp(dst, src, 8080, sport, "SA"), 0.1)
    assert back == (FRONTEND, 80, STANDALONE, 40000)
    assert t.counters_dict()["hairpin_translated"] == 2


def test_hairpin_to_an_instance_ip_sees_the_senders_frontend_address() -> None:
    """A pool member reaching an instance IP arrives from the frontend and one of its block's ports."""
    t = TranslationTable(inbound_model(), 0.0)
    src, sport, dst, dport = hairpin(t, udp(POOL[0], INSTANCE_PUBLIC, 40000, 5000))
    assert (src, dst, dport) == (FRONTEND, INSTANCE, 5000) and sport >= 1024
    assert hairpin(t, udp(INSTANCE, FRONTEND, 5000, sport), 0.1) == (INSTANCE_PUBLIC, 5000, POOL[0], 40000)


def test_a_member_that_lands_on_itself_gets_its_own_connection_back() -> None:
    """With one member, a member reaching its own frontend is delivered to itself, from frontend:port."""
    m = inbound_model(pools=(Pool("web", (ip(POOL[0]),)),))
    t = TranslationTable(m, 0.0)
    src, sport, dst, dport = hairpin(t, tcp(POOL[0], FRONTEND, 40000, 80))
    assert (src, dst, dport) == (FRONTEND, POOL[0], 8080) and sport != 80
    assert hairpin(t, tcp(POOL[0], FRONTEND, 8080, sport, "SA"), 0.1) == (FRONTEND, 80, POOL[0], 40000)


def test_ping_an_instance_ip_from_the_inside() -> None:
    """An echo to an instance IP hairpins, and its reply comes back to the pinger's own id."""
    t = TranslationTable(inbound_model(), 0.0)
    src, ident, dst, _ = hairpin(t, echo(STANDALONE, INSTANCE_PUBLIC, 99))
    assert src in DEFAULTS and dst == INSTANCE
    back = hairpin(t, echo(INSTANCE, src, ident, reply=True), 0.1)
    assert (back[0], back[1], back[2]) == (INSTANCE_PUBLIC, 99, STANDALONE)


def test_hairpin_to_an_inbound_nat_rule() -> None:
    """A backend reaches another through an inbound NAT rule's port."""
    m = inbound_model(inbound_nat_rules=(InboundNatRule("ssh", "fe-web", "tcp", 50001, ip(POOL[1]), 22),))
    t = TranslationTable(m, 0.0)
    src, _sport, dst, dport = hairpin(t, tcp(INSTANCE, FRONTEND, 40000, 50001))
    assert (src, dst, dport) == (INSTANCE_PUBLIC, POOL[1], 22)


def test_unserved_destination_is_dropped_before_any_flow() -> None:
    """To a public address and port nothing serves: drop_no_flow, no outbound flow made."""
    t = TranslationTable(inbound_model(), 0.0)
    assert t.hairpin(tcp(STANDALONE, FRONTEND, 40000, 81), 0.0) == DROP
    assert t.hairpin(echo(STANDALONE, FRONTEND, 5), 0.0) == DROP
    assert t.counters_dict()["drop_no_flow"] == 2 and t.flow_count() == 0


def test_a_denied_destination_half_drops_the_packet() -> None:
    """The target's inbound_default deny drops the hairpinned packet, counted."""
    t = TranslationTable(inbound_model(inbound_default_allow=False), 0.0)
    assert t.hairpin(tcp(STANDALONE, FRONTEND, 40000, 80), 0.0) == DROP
    c = t.counters_dict()
    assert c["drop_security_denied"] == 1 and c["hairpin_translated"] == 0


def test_a_refused_destination_half_leaves_the_sender_no_flow_and_no_port() -> None:
    """A hairpin the target refuses (denied, all members down, a non-SYN toward no flow) ends
    the outbound flow its source half made for it at once: the sender holds no port for it."""
    t = TranslationTable(inbound_model(inbound_default_allow=False), 0.0)
    assert t.hairpin(tcp(POOL[0], FRONTEND, 40000, 80), 0.0) == DROP
    assert t.hairpin(udp(POOL[0], INSTANCE_PUBLIC, 40000, 53), 0.0) == DROP
    assert t.hairpin(echo(POOL[0], INSTANCE_PUBLIC, 7), 0.0) == DROP
    assert t.counters_dict()["drop_security_denied"] == 3
    assert t.flow_count() == 0
    assert all(inv.in_use == 0 for inv in t.backends[ip(POOL[0])].block.inventories.values())
    down = TranslationTable(
        inbound_model(
            probes=(Probe("p", "tcp", 8080),),
            lb_rules=(LbRule("http", "fe-web", "web", "tcp", 80, 8080, probe="p"),),
        ),
        0.0,
    )
    assert down.hairpin(tcp(INSTANCE, FRONTEND, 40000, 80), 0.0) == DROP
    assert down.hairpin(tcp(INSTANCE, FRONTEND, 40001, 80, "PA", b"x"), 0.0) == DROP
    c = down.counters_dict()
    assert c["drop_no_healthy_member"] == 1 and c["drop_no_flow"] == 1 and down.flow_count() == 0


def test_a_live_hairpin_connection_keeps_its_flows_when_one_packet_is_refused() -> None:
    """A refused packet on a live hairpin connection drops only that packet; no flow ends."""
    t = TranslationTable(inbound_model(), 0.0)
    src, sport, dst, _ = hairpin(t, tcp(INSTANCE, FRONTEND, 40000, 80))
    assert t.flow_count() == 2
    # An out-of-window RST (the target's half refuses it) leaves both flows alive.
    hairpin(t, tcp(dst, src, 8080, sport, "SA", seq=100, ack=1), 0.1)
    assert t.hairpin(tcp(INSTANCE, FRONTEND, 40000, 80, "R", seq=0x7FFF0000), 0.2) == DROP
    assert t.flow_count() == 2 and t.counters_dict()["drop_tcp_out_of_window"] == 1


def test_source_ip_affinity_holds_for_hairpinned_clients() -> None:
    """source_ip distribution hashes the sender's public address like any remote's."""
    m = inbound_model(lb_rules=(LbRule("h", "fe-web", "web", "tcp", 80, 8080, Distribution.SOURCE_IP),))
    t = TranslationTable(m, 0.0)
    assert len({hairpin(t, tcp(STANDALONE, FRONTEND, 40000 + i, 80))[2] for i in range(10)}) == 1


def _served_packets() -> st.SearchStrategy[bytes]:
    """Packets aimed at what the lab serves (frontend 80, instance IP, a NAT port), with bytes flipped."""
    bases = [
        bytes(tcp(STANDALONE, FRONTEND, 40000, 80)),
        bytes(udp(POOL[0], INSTANCE_PUBLIC, 40000, 53)),
        bytes(echo(STANDALONE, INSTANCE_PUBLIC, 9)),
        bytes(tcp("203.0.113.7", FRONTEND, 40000, 50001)),
        bytes(tcp("10.10.0.254", POOL[0], 40000, 8080)),
    ]
    return st.builds(
        lambda base, flips: bytes(b ^ dict(flips).get(i, 0) for i, b in enumerate(base)),
        st.sampled_from(bases),
        st.lists(st.tuples(st.integers(0, 60), st.integers(0, 255)), max_size=4),
    )


@settings(max_examples=300, deadline=None)
@given(_served_packets(), st.sampled_from(["hairpin", "out2in", "local_out", "in2out"]))
def test_inbound_entry_points_never_raise(data: bytes, entry: str) -> None:
    """hairpin, out2in (opening flows), local_out (probe SYNs) and in2out answer any mangled packet."""
    m = inbound_model(inbound_nat_rules=(InboundNatRule("ssh", "fe-web", "tcp", 50001, ip(POOL[1]), 22),))
    t = TranslationTable(m, 0.0)
    assert getattr(t, entry)(bytearray(data), 1.0) in (0, 1, 2, 3)


def test_an_instance_ip_backend_reaches_its_own_public_address_but_cannot_ping_it() -> None:
    """TCP from a backend to its own instance IP comes back to it (from that IP); a ping of its
    own instance IP is dropped and leaves no flow (the request and its flow would share a key)."""
    t = TranslationTable(inbound_model(), 0.0)
    assert hairpin(t, tcp(INSTANCE, INSTANCE_PUBLIC, 40000, 22)) == (INSTANCE_PUBLIC, 40000, INSTANCE, 22)
    back = hairpin(t, tcp(INSTANCE, INSTANCE_PUBLIC, 22, 40000, "SA"), 0.1)
    assert back == (INSTANCE_PUBLIC, 22, INSTANCE, 40000)
    assert t.flow_count() == 2
    assert t.hairpin(echo(INSTANCE, INSTANCE_PUBLIC, 5), 0.2) == DROP
    assert t.flow_count() == 2 and t.counters_dict()["drop_no_flow"] == 1
