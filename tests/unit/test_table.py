"""The translation table, packet by packet, with an injected clock."""

from __future__ import annotations

from scapy.layers.inet import ICMP, IP, UDP, IPerror, UDPerror

from gateway.core.events import fields as event_fields
from gateway.core.model import Timeouts
from gateway.core.packet import checksums_ok, describe, fill_l4_checksum
from gateway.core.table import TranslationTable
from gateway.core.verdict import ACCEPT_MODIFIED, ACCEPT_MODIFIED_MARK, DROP
from tests.unit.conftest import (
    DEFAULTS,
    FRONTEND,
    INSTANCE,
    INSTANCE_PUBLIC,
    POOL,
    SERVER,
    SERVER2,
    STANDALONE,
    echo,
    first_port,
    lab_model,
    out,
    tcp,
    udp,
)


def test_scenario_2_pool_member_uses_frontend_and_its_block(table: TranslationTable) -> None:
    """A pool member named by an LB rule leaves with the frontend address, from its own block."""
    sport, src, _ = out(table, udp(POOL[1], SERVER, 40000, 5000))
    assert src == FRONTEND
    assert 2048 <= sport < 3072


def test_scenario_1_instance_ip_keeps_the_source_port(table: TranslationTable) -> None:
    """A backend with an instance IP leaves with it and keeps its own port."""
    sport, src, _ = out(table, tcp(INSTANCE, SERVER, 40001, 80))
    assert (src, sport) == (INSTANCE_PUBLIC, 40001)


def test_scenario_3_standalone_gets_a_default_address(table: TranslationTable) -> None:
    """Any other inside source leaves with a default SNAT address, ports from 1024 up."""
    sport, src, _ = out(table, udp(STANDALONE, SERVER, 40002, 5000))
    assert src in DEFAULTS
    assert 1024 <= sport < 2048


def test_precedence_instance_ip_over_pool() -> None:
    """A pool member that also has an instance IP uses the instance IP (1 over 2)."""
    t = TranslationTable(lab_model(members=(*POOL, INSTANCE)), 0.0)
    _, src, _ = out(t, udp(INSTANCE, SERVER, 1111, 53))
    assert src == INSTANCE_PUBLIC


def test_return_traffic_is_translated_back_and_marked(table: TranslationTable) -> None:
    """A reply from the exact remote endpoint reaches the backend's address and port."""
    sport, src, _ = out(table, udp(POOL[0], SERVER, 40000, 5000))
    back = udp(SERVER, src, 5000, sport, b"reply")
    assert table.out2in(back, 1.0) == ACCEPT_MODIFIED_MARK
    assert checksums_ok(back)
    s = describe(back)
    assert (s.dst, s.dport) == (POOL[0], 40000)


def test_return_traffic_from_another_endpoint_is_dropped(table: TranslationTable) -> None:
    """Only the remote endpoint of a live flow gets through; others are dropped and counted."""
    sport, src, _ = out(table, udp(POOL[0], SERVER, 40000, 5000))
    for pkt in (
        udp(SERVER2, src, 5000, sport),
        udp(SERVER, src, 5001, sport),
        tcp(SERVER, src, 5000, sport, "SA"),
        udp(SERVER, src, 5000, sport + 1),
    ):
        assert table.out2in(pkt, 1.0) == DROP
    assert table.counters_dict()["drop_no_flow"] == 4


def test_same_destination_needs_a_new_port_other_destinations_may_share(table: TranslationTable) -> None:
    """Endpoint-dependent PAT: a second flow to one destination takes another port;
    ports are reused toward other destinations when the block is full."""
    a, _, _ = out(table, udp(POOL[0], SERVER, 40000, 5000))
    b, _, _ = out(table, udp(POOL[0], SERVER, 40001, 5000))
    assert a != b
    small = TranslationTable(lab_model(members=tuple(f"10.10.9.{i}" for i in range(1, 201))), 0.0)
    ports = {out(small, udp("10.10.9.1", SERVER, 30000 + i, 5000))[0] for i in range(256)}
    assert len(ports) == 256
    assert small.in2out(udp("10.10.9.1", SERVER, 39999, 5000), 0.0) == DROP
    other, _, _ = out(small, udp("10.10.9.1", SERVER2, 39999, 5000))
    assert other in ports


def test_exhaustion_drops_counts_and_emits_rate_limited_event() -> None:
    """With no free port for a destination the new flow fails, old ones keep working,
    and one snat_port_exhausted event names backend, address, destination and block size."""
    t = TranslationTable(lab_model(members=tuple(f"10.10.9.{i}" for i in range(1, 201))), 0.0)
    first = out(t, udp("10.10.9.1", SERVER, 30000, 5000))[0]
    for i in range(1, 256):
        out(t, udp("10.10.9.1", SERVER, 30000 + i, 5000))
    for _ in range(5):
        assert t.in2out(udp("10.10.9.1", SERVER, 40000, 5000), 1.0) == DROP
    assert t.counters_dict()["drop_exhausted"] == 5
    [ev] = [e for e in t.events if e.name == "snat_port_exhausted"]
    assert event_fields(ev)["backend"] == "10.10.9.1"
    assert event_fields(ev)["public_ip"] == FRONTEND
    assert event_fields(ev)["destination"] == f"{SERVER}:5000"
    assert event_fields(ev)["block_size"] == 256
    back = udp(SERVER, FRONTEND, 5000, first)
    assert t.out2in(back, 2.0) == ACCEPT_MODIFIED_MARK


def test_idle_flow_expires_and_keepalive_refreshes() -> None:
    """Idle flows lose their port after the idle timeout; any packet either way resets it."""
    t = TranslationTable(lab_model(timeouts=Timeouts(idle=4.0)), 0.0)
    sport, src, _ = out(t, udp(POOL[0], SERVER, 40000, 5000), 0.0)
    for now in (3.0, 6.0, 9.0):
        assert t.out2in(udp(SERVER, src, 5000, sport), now) == ACCEPT_MODIFIED_MARK
        t.handle_timer(now)
    t.handle_timer(12.9)
    assert t.flow_count() == 1
    t.handle_timer(13.2)
    assert t.flow_count() == 0
    assert t.counters_dict()["flows_ended_idle"] == 1
    assert t.out2in(udp(SERVER, src, 5000, sport), 13.3) == DROP


def test_get_timer_never_later_than_the_next_expiry() -> None:
    """The loop can sleep until get_timer() without missing an expiry."""
    t = TranslationTable(lab_model(timeouts=Timeouts(idle=4.0)), 0.0)
    assert t.get_timer() is None
    out(t, udp(POOL[0], SERVER, 40000, 5000), 0.0)
    now = 0.0
    while t.flow_count():
        due = t.get_timer()
        assert due is not None and due > now
        now = due
        t.handle_timer(now)
    assert 4.0 <= now <= 4.25


def test_tcp_fin_both_ways_frees_port_after_linger() -> None:
    """FIN from both sides ends the flow after tcp_fin_linger, not the idle timeout."""
    t = TranslationTable(lab_model(timeouts=Timeouts(idle=240, tcp_fin_linger=3)), 0.0)
    sport, src, _ = out(t, tcp(POOL[0], SERVER, 40000, 80, "S"), 0.0)
    t.out2in(tcp(SERVER, src, 80, sport, "SA"), 0.1)
    out(t, tcp(POOL[0], SERVER, 40000, 80, "FA"), 1.0)
    t.out2in(tcp(SERVER, src, 80, sport, "FA"), 1.1)
    out(t, tcp(POOL[0], SERVER, 40000, 80, "A"), 1.2)
    t.handle_timer(4.0)
    assert t.flow_count() == 1
    t.handle_timer(4.5)
    assert t.flow_count() == 0
    assert t.counters_dict()["flows_ended_closed"] == 1


def test_tcp_rst_frees_port_after_short_linger() -> None:
    """A RST ends the flow after tcp_rst_linger."""
    t = TranslationTable(lab_model(timeouts=Timeouts(idle=240, tcp_rst_linger=1)), 0.0)
    sport, src, _ = out(t, tcp(POOL[0], SERVER, 40000, 80, "S"), 0.0)
    assert t.out2in(tcp(SERVER, src, 80, sport, "RA", ack=1), 0.5) == ACCEPT_MODIFIED_MARK
    t.handle_timer(1.7)
    assert t.flow_count() == 0


def test_icmp_echo_uses_identifier_as_port(table: TranslationTable) -> None:
    """Ping is translated with its identifier in the port's role, and the reply comes back."""
    req = echo(POOL[0], SERVER, 777)
    assert table.in2out(req, 0.0) == ACCEPT_MODIFIED
    assert checksums_ok(req)
    s = describe(req)
    assert s.src == FRONTEND and 1024 <= s.sport < 2048
    rep = echo(SERVER, FRONTEND, s.sport, reply=True)
    assert table.out2in(rep, 0.1) == ACCEPT_MODIFIED_MARK
    assert checksums_ok(rep)
    r = describe(rep)
    assert (r.dst, r.sport) == (POOL[0], 777)


def test_icmp_error_from_outside_is_translated_with_its_embedded_header(table: TranslationTable) -> None:
    """A port unreachable about a live flow reaches the backend with the quoted header restored."""
    pkt = udp(POOL[0], SERVER, 40000, 5999, b"x" * 20)
    table.in2out(pkt, 0.0)
    quoted = bytes(pkt)
    err = IP(src=SERVER, dst=FRONTEND) / ICMP(type=3, code=3) / quoted
    buf = bytearray(bytes(err))
    assert table.out2in(buf, 0.1) == ACCEPT_MODIFIED_MARK
    assert checksums_ok(buf)
    got = IP(bytes(buf))
    assert got.dst == POOL[0]
    inner = got[IPerror]
    assert inner.src == POOL[0] and inner[UDPerror].sport == 40000
    assert table.counters_dict()["icmp_error_out2in"] == 1


def test_icmp_error_from_a_router_about_a_flow_is_translated(table: TranslationTable) -> None:
    """Time exceeded from any router on the path is translated if it quotes a live flow."""
    pkt = tcp(POOL[0], SERVER, 40000, 80, "S")
    table.in2out(pkt, 0.0)
    err = IP(src="203.0.113.9", dst=FRONTEND) / ICMP(type=11, code=0) / bytes(pkt)[:28]
    buf = bytearray(bytes(err))
    assert table.out2in(buf, 0.1) == ACCEPT_MODIFIED_MARK
    got = IP(bytes(buf))
    assert got.dst == POOL[0] and got[IPerror].src == POOL[0]


def test_icmp_error_about_no_flow_is_dropped(table: TranslationTable) -> None:
    """An ICMP error quoting a tuple we never sent is dropped."""
    quoted = bytes(IP(src=FRONTEND, dst=SERVER) / UDP(sport=1500, dport=53))
    buf = bytearray(bytes(IP(src=SERVER, dst=FRONTEND) / ICMP(type=3, code=3) / quoted))
    assert table.out2in(buf, 0.0) == DROP


def test_icmp_error_from_a_backend_is_translated_outward(table: TranslationTable) -> None:
    """A backend's port unreachable about a return packet leaves with the public address
    and the quoted destination rewritten to the public ip:port."""
    sport, src, _ = out(table, udp(POOL[0], SERVER, 40000, 5000))
    ret = udp(SERVER, src, 5000, sport)
    table.out2in(ret, 0.1)
    err = bytearray(bytes(IP(src=POOL[0], dst=SERVER) / ICMP(type=3, code=3) / bytes(ret)))
    assert table.in2out(err, 0.2) == ACCEPT_MODIFIED
    assert checksums_ok(err)
    got = IP(bytes(err))
    assert got.src == FRONTEND
    assert got[IPerror].dst == FRONTEND and got[UDPerror].dport == sport


def test_untranslatable_inside_packets_are_dropped(table: TranslationTable) -> None:
    """Fragments, other protocols and non-echo ICMP from the inside are dropped, never passed."""
    frag = bytearray(bytes(IP(src=POOL[0], dst=SERVER, flags="MF") / UDP(sport=1, dport=2) / (b"x" * 8)))
    gre = bytearray(bytes(IP(src=POOL[0], dst=SERVER, proto=47) / (b"\0" * 8)))
    ts = bytearray(bytes(IP(src=POOL[0], dst=SERVER) / ICMP(type=13)))
    assert [table.in2out(p, 0.0) for p in (frag, gre, ts)] == [DROP, DROP, DROP]
    c = table.counters_dict()
    assert (c["drop_fragment"], c["drop_unsupported"], c["drop_icmp_type"]) == (1, 1, 1)


def test_default_address_grows_a_tier_and_halves_blocks() -> None:
    """The 51st standalone backend on a default address halves every block there;
    flows on the reclaimed upper halves end and an event says so."""
    t = TranslationTable(lab_model(defaults=(DEFAULTS[0],)), 0.0)
    kept = []
    for i in range(1, 51):
        kept.append(out(t, udp(f"10.10.5.{i}", SERVER, 40000, 5000))[0])
    first_block = t.backends[0x0A0A0501].block
    assert first_block is not None and first_block.size == 1024
    for i in range(600):
        out(t, udp("10.10.5.1", SERVER, 20000 + i, 5000))
    out(t, udp("10.10.5.99", SERVER, 40000, 5000))
    assert first_block.size == 512
    names = [e.name for e in t.events]
    assert "pool_tier_changed" in names and "ports_reclaimed" in names
    assert t.counters_dict()["flows_ended_reclaimed"] == 601 - 512
    for ip_, be in t.backends.items():
        if be.block is not None and be.address.ip == first_block.public_ip:
            assert be.block.size == 512
            lo = first_port(be.block)
            assert all(lo <= f.public_port < lo + 512 for f in be.flows), ip_


def test_translation_works_in_place_on_a_memoryview(table: TranslationTable) -> None:
    """The netlink queue hands the core a memoryview into its ring; rewriting works the same."""
    ring = bytearray(200)
    pkt = udp(POOL[0], SERVER, 40000, 5000)
    ring[50 : 50 + len(pkt)] = pkt
    view = memoryview(ring)[50 : 50 + len(pkt)]
    assert table.in2out(view, 0.0) == ACCEPT_MODIFIED
    assert checksums_ok(view)
    assert describe(view).src == FRONTEND


def test_partial_checksum_is_completed() -> None:
    """A packet queued with only its pseudo-header sum gets a full transport checksum."""
    for pkt in (tcp(POOL[0], SERVER, 40000, 80, "S", b"abc"), udp(POOL[0], SERVER, 1, 2, b"odd")):
        pkt[-1] ^= 0xFF
        assert not checksums_ok(pkt)
        fill_l4_checksum(pkt)
        assert checksums_ok(pkt)
