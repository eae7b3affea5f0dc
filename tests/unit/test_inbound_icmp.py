"""ICMP errors about flows opened from the outside and about hairpinned flows, both ways
and from the host (RFC 5508 section 7; docs/model.md, "Inbound", "Hairpinning")."""

from __future__ import annotations

import ipaddress

from scapy.layers.inet import ICMP, IP, IPerror, TCPerror, UDPerror

from gateway.core.packet import checksums_ok
from gateway.core.table import TranslationTable
from gateway.core.verdict import ACCEPT_MODIFIED, ACCEPT_MODIFIED_MARK, DROP
from tests.unit.conftest import (
    CLIENT,
    FRONTEND,
    INSTANCE,
    INSTANCE_PUBLIC,
    POOL,
    STANDALONE,
    echo,
    inbound_model,
    tcp,
    udp,
)

GW_OUT = "198.51.100.1"
BACKENDS = [ipaddress.IPv4Address(a).packed for a in (*POOL, INSTANCE, STANDALONE)]


def _private_inside(buf: bytes | bytearray) -> bool:
    """Whether a backend's address appears anywhere in the packet's bytes."""
    return any(a in bytes(buf) for a in BACKENDS)


def _error(src: str, dst: str, quoted: bytes | bytearray, typ: int = 3, code: int = 3) -> bytearray:
    return bytearray(bytes(IP(src=src, dst=dst) / ICMP(type=typ, code=code) / bytes(quoted)))


def test_backend_error_about_an_inbound_udp_flow_leaves_quoting_the_public_tuple() -> None:
    """A port unreachable from an instance-IP backend about a datagram it got from the
    internet leaves from the instance IP quoting instance IP:port, no private address."""
    t = TranslationTable(inbound_model(), 0.0)
    got = udp(CLIENT, INSTANCE_PUBLIC, 40000, 5000)
    assert t.out2in(got, 0.0) == ACCEPT_MODIFIED_MARK
    err = _error(INSTANCE, CLIENT, got)
    assert t.in2out(err, 0.1) == ACCEPT_MODIFIED and checksums_ok(err)
    p = IP(bytes(err))
    assert (p.src, p[IPerror].src) == (INSTANCE_PUBLIC, CLIENT)
    assert (p[IPerror].dst, p[UDPerror].dport) == (INSTANCE_PUBLIC, 5000)
    assert not _private_inside(err)


def test_remote_error_about_an_lb_flows_reply_reaches_the_member() -> None:
    """An error from the remote about a member's SYN-ACK (quoting frontend:80) reaches that
    member quoting its own address and backend port."""
    t = TranslationTable(inbound_model(), 0.0)
    syn = tcp(CLIENT, FRONTEND, 40000, 80)
    assert t.out2in(syn, 0.0) == ACCEPT_MODIFIED_MARK
    member = IP(bytes(syn)).dst
    sa = tcp(member, CLIENT, 8080, 40000, "SA", seq=7)
    assert t.in2out(sa, 0.1) == ACCEPT_MODIFIED
    err = _error(CLIENT, FRONTEND, sa, code=1)
    assert t.out2in(err, 0.2) == ACCEPT_MODIFIED_MARK and checksums_ok(err)
    p = IP(bytes(err))
    assert (p.dst, p[IPerror].src, p[TCPerror].sport) == (member, member, 8080)


def test_host_error_about_an_inbound_packet_quotes_the_frontend() -> None:
    """The host's own error on the outside about a packet it forwarded to a member quotes
    frontend:80, never the member."""
    t = TranslationTable(inbound_model(), 0.0)
    syn = tcp(CLIENT, FRONTEND, 40000, 80)
    assert t.out2in(syn, 0.0) == ACCEPT_MODIFIED_MARK
    err = _error(GW_OUT, CLIENT, syn, typ=11, code=0)
    assert _private_inside(err)
    assert t.local_out(err, 0.1) == ACCEPT_MODIFIED and checksums_ok(err)
    p = IP(bytes(err))
    assert (p[IPerror].dst, p[TCPerror].dport) == (FRONTEND, 80) and not _private_inside(err)


def test_error_about_a_hairpinned_flow_comes_back_through_both_halves() -> None:
    """A port unreachable from the target of a hairpinned datagram reaches the sender from the
    instance IP, quoting what the sender sent (its own address and port, the instance IP)."""
    t = TranslationTable(inbound_model(), 0.0)
    d = udp(STANDALONE, INSTANCE_PUBLIC, 40000, 5000)
    assert t.hairpin(d, 0.0) == ACCEPT_MODIFIED_MARK
    err = _error(INSTANCE, IP(bytes(d)).src, d)
    assert t.hairpin(err, 0.1) == ACCEPT_MODIFIED_MARK and checksums_ok(err)
    p = IP(bytes(err))
    assert (p.src, p.dst) == (INSTANCE_PUBLIC, STANDALONE)
    assert (p[IPerror].src, p[UDPerror].sport, p[IPerror].dst, p[UDPerror].dport) == (
        STANDALONE, 40000, INSTANCE_PUBLIC, 5000,
    )  # fmt: skip


def test_an_error_naming_no_hairpinned_flow_is_dropped() -> None:
    """An error hairpinned toward a public address, quoting nothing live, is dropped (no flow made)."""
    t = TranslationTable(inbound_model(), 0.0)
    forged = _error(INSTANCE, FRONTEND, udp(FRONTEND, INSTANCE, 1111, 5000))
    assert t.hairpin(forged, 0.0) == DROP and t.flow_count() == 0


def test_errors_are_not_subject_to_security_rules_but_need_their_flow() -> None:
    """With inbound_default deny, an error about a live outbound flow still reaches its backend."""
    t = TranslationTable(inbound_model(inbound_default_allow=False), 0.0)
    req = echo(INSTANCE, CLIENT, 9)
    assert t.in2out(req, 0.0) == ACCEPT_MODIFIED
    err = _error(CLIENT, INSTANCE_PUBLIC, req, typ=11, code=0)
    assert t.out2in(err, 0.1) == ACCEPT_MODIFIED_MARK
    assert t.counters_dict()["drop_security_denied"] == 0
