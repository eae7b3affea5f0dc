"""ICMP the gateway must not pass as it is: the host's own errors quoting a backend
(``local_out``), types that are never forwarded, bad checksums and forged errors."""

from __future__ import annotations

import ipaddress

from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, UDPerror

from gateway.core.icmp_error import icmp_checksum_ok
from gateway.core.packet import checksums_ok
from gateway.core.table import TranslationTable
from gateway.core.verdict import ACCEPT, ACCEPT_MODIFIED, DROP
from tests.unit.conftest import FRONTEND, INSTANCE, POOL, SERVER, STANDALONE, echo, out, tcp, udp

GW_OUT = "198.51.100.1"


#: Every backend address of the lab model, as it sits in a packet.
BACKENDS = [ipaddress.IPv4Address(a).packed for a in (*POOL, INSTANCE, STANDALONE)]
SERVER2_ALT = str(ipaddress.IPv4Address(SERVER) + 7)


def _private_inside(buf: bytes) -> bool:
    """Whether a backend's address appears anywhere in the packet's bytes."""
    return any(a in bytes(buf) for a in BACKENDS)


def _returned(table: TranslationTable, backend: str, sport: int, dport: int) -> tuple[bytearray, int]:
    """A UDP flow backend:sport -> SERVER:dport and its return packet as the host
    forwards it (rewritten to the backend); also the public port."""
    pport, src, _ = out(table, udp(backend, SERVER, sport, dport))
    ret = udp(SERVER, src, dport, pport, b"z" * 40)
    assert table.out2in(ret, 0.1) != DROP
    return ret, pport


def test_host_time_exceeded_about_a_return_packet_quotes_the_public_tuple(table: TranslationTable) -> None:
    """TTL exceeded from the host about a rewritten return packet leaves quoting the
    public address and port, with valid checksums and no private address anywhere."""
    ret, pport = _returned(table, POOL[0], 40000, 5000)
    err = bytearray(bytes(IP(src=GW_OUT, dst=SERVER) / ICMP(type=11, code=0) / bytes(ret)))
    assert _private_inside(err)
    assert table.local_out(err, 0.2) == ACCEPT_MODIFIED
    assert checksums_ok(err)
    got = IP(bytes(err))
    assert got.src == GW_OUT and got[IPerror].dst == FRONTEND and got[UDPerror].dport == pport
    assert got[IPerror].chksum == IPerror(bytes(got[IPerror])).chksum
    assert not _private_inside(err)
    assert table.counters_dict()["icmp_error_local_out"] == 1


def test_host_frag_needed_about_tcp_and_echo_is_translated(table: TranslationTable) -> None:
    """Fragmentation needed about a TCP return segment and an echo reply quote the public tuple."""
    pport, src, _ = out(table, tcp(POOL[1], SERVER, 40001, 80, "S"))
    ret = tcp(SERVER, src, 80, pport, "SA", ack=1, payload=b"y" * 100)
    assert table.out2in(ret, 0.1) != DROP
    frag_needed = ICMP(type=3, code=4, nexthopmtu=1280)
    err = bytearray(bytes(IP(src=GW_OUT, dst=SERVER) / frag_needed / bytes(ret)[:48]))
    assert table.local_out(err, 0.2) == ACCEPT_MODIFIED
    assert checksums_ok(err) and not _private_inside(err)
    ping = echo(STANDALONE, SERVER, 99)
    assert table.in2out(ping, 0.0) == ACCEPT_MODIFIED
    pub, ident = IP(bytes(ping)).src, IP(bytes(ping))[ICMP].id
    rep = echo(SERVER, pub, ident, reply=True)
    assert table.out2in(rep, 0.1) != DROP
    err = bytearray(bytes(IP(src=GW_OUT, dst=SERVER) / ICMP(type=3, code=1) / bytes(rep)))
    assert table.local_out(err, 0.2) == ACCEPT_MODIFIED
    assert checksums_ok(err) and not _private_inside(err)


def test_host_error_quoting_a_backend_without_a_flow_is_suppressed(table: TranslationTable) -> None:
    """A host error quoting a backend with no flow is dropped; one about the host's own
    traffic (no backend in the quote) passes unchanged."""
    quoted = bytes(IP(src=SERVER, dst=POOL[2]) / UDP(sport=5000, dport=1234))
    err = bytearray(bytes(IP(src=GW_OUT, dst=SERVER) / ICMP(type=11) / quoted))
    assert table.local_out(err, 0.0) == DROP
    assert table.counters_dict()["drop_local_icmp_no_flow"] == 1
    own = bytearray(
        bytes(
            IP(src=GW_OUT, dst=SERVER)
            / ICMP(type=3, code=3)
            / bytes(IP(src=SERVER, dst=GW_OUT) / UDP(sport=5000, dport=9))
        )
    )
    before = bytes(own)
    assert table.local_out(own, 0.0) == ACCEPT and bytes(own) == before
    plain = bytearray(bytes(IP(src=GW_OUT, dst=SERVER) / ICMP(type=8)))
    assert table.local_out(plain, 0.0) == ACCEPT


def test_redirects_and_other_types_are_dropped_by_name_both_ways(table: TranslationTable) -> None:
    """Redirect, source quench, router advertisement, timestamp and address mask are
    dropped and counted as drop_icmp_type, from either side, even about a live flow."""
    ret, _ = _returned(table, POOL[0], 40000, 5000)
    pport, src, _ = out(table, udp(POOL[0], SERVER, 40002, 5000))
    quoted = bytes(IP(src=src, dst=SERVER) / UDP(sport=pport, dport=5000))
    for typ in (5, 4, 9, 10, 13, 17):
        buf = bytearray(bytes(IP(src=SERVER, dst=FRONTEND) / ICMP(type=typ) / quoted))
        assert table.out2in(buf, 0.3) == DROP
        buf = bytearray(bytes(IP(src=POOL[0], dst=SERVER) / ICMP(type=typ) / bytes(ret)))
        assert table.in2out(buf, 0.3) == DROP
    assert table.counters_dict()["drop_icmp_type"] == 12


def test_errors_with_a_bad_checksum_are_dropped_both_ways(table: TranslationTable) -> None:
    """An ICMP error with a wrong ICMP checksum is dropped and counted, never re-checksummed."""
    ret, _ = _returned(table, POOL[0], 40000, 5000)
    pport, src, _ = out(table, udp(POOL[0], SERVER, 40003, 5000))
    quoted = bytes(IP(src=src, dst=SERVER) / UDP(sport=pport, dport=5000))
    good_in = bytes(IP(src=SERVER, dst=FRONTEND) / ICMP(type=3, code=3) / quoted)
    good_out = bytes(IP(src=POOL[0], dst=SERVER) / ICMP(type=3, code=3) / bytes(ret))
    for good, way in ((good_in, table.out2in), (good_out, table.in2out)):
        bad = bytearray(good)
        bad[22] ^= 0x5A  # the ICMP checksum's second byte
        assert way(bad, 0.3) == DROP
        assert way(bytearray(good), 0.3) != DROP, "the control: the same error, good checksum"
    assert table.counters_dict()["drop_bad_checksum"] == 2


def test_forged_errors_naming_tuples_that_do_not_exist_are_dropped(table: TranslationTable) -> None:
    """Errors from outside quoting a public ip:port with no flow, or another remote, are
    dropped (drop_no_flow); the same error about the real flow passes (the control)."""
    pport, src, _ = out(table, udp(POOL[0], SERVER, 40004, 5000))
    forged = [
        IP(src=src, dst=SERVER) / UDP(sport=pport + 1, dport=5000),  # no such port
        IP(src=src, dst=SERVER2_ALT) / UDP(sport=pport, dport=5000),  # another remote
        IP(src=src, dst=SERVER) / TCP(sport=pport, dport=5000),  # another protocol
    ]
    for q in forged:
        buf = bytearray(bytes(IP(src=SERVER, dst=FRONTEND) / ICMP(type=3, code=3) / bytes(q)))
        assert table.out2in(buf, 0.3) == DROP
    assert table.counters_dict()["drop_no_flow"] == 3
    real = IP(src=src, dst=SERVER) / UDP(sport=pport, dport=5000)
    buf = bytearray(bytes(IP(src=SERVER, dst=FRONTEND) / ICMP(type=3, code=3) / bytes(real)))
    assert table.out2in(buf, 0.3) != DROP


def test_icmp_checksum_check_accepts_good_and_refuses_bad_messages() -> None:
    """icmp_checksum_ok (for errors here, offered to the echo paths) tells a right ICMP
    checksum from a wrong one, odd lengths included."""
    for payload in (b"", b"x", b"ping" * 10 + b"!"):
        good = bytearray(bytes(IP(src=SERVER, dst=FRONTEND) / ICMP(type=0, id=7) / payload))
        assert icmp_checksum_ok(good, 20, len(good))
        good[-1 if payload else 21] ^= 0x01
        assert not icmp_checksum_ok(good, 20, len(good))
