"""TCP tracking (docs/decisions.md, "TCP tracking"): a FIN or RST from the outside
counts only inside the backend's receive window (RFC 5961 sections 3 and 4, as
Linux conntrack applies them); the window is learnt from the backend's packets only."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from gateway.core.flow import MAX_WSCALE, Flow, TcpState, syn_wscale
from gateway.core.model import Timeouts
from gateway.core.table import TranslationTable
from gateway.core.verdict import ACCEPT_MODIFIED, ACCEPT_MODIFIED_MARK, DROP
from tests.unit.conftest import FRONTEND, POOL, SERVER, STANDALONE, ip, lab_model, out, tcp

B = POOL[0]
ISN = 1000  # the backend's initial sequence number
RISN = 5000  # the remote's
WIN = 1000  # the window the backend advertises (unscaled)


def table() -> TranslationTable:
    return TranslationTable(lab_model(timeouts=Timeouts(tcp_rst_linger=2.0)), 0.0, random.Random(1))


def connect(t: TranslationTable, wscale: int | None = 7, sport: int = 40000) -> tuple[int, Flow]:
    """SYN (with a window scale option unless None), SYN-ACK, ACK: returns the public port and the flow."""
    opts: list[tuple[str, object]] = [("MSS", 1460)] + ([("WScale", wscale)] if wscale is not None else [])
    port = out(t, tcp(B, SERVER, sport, 80, "S", seq=ISN, window=64240, options=opts), 0.0)[0]
    sa = tcp(SERVER, FRONTEND, 80, port, "SA", seq=RISN, ack=ISN + 1, options=[("WScale", 7)])
    assert t.out2in(sa, 0.1) == ACCEPT_MODIFIED_MARK
    out(t, tcp(B, SERVER, sport, 80, "A", seq=ISN + 1, ack=RISN + 1, window=WIN), 0.2)
    f = next(v for v in t._tcp_inside.values() if v.public_port == port)
    return port, f


def rst_from_outside(t: TranslationTable, port: int, seq: int, now: float = 1.0, flags: str = "RA") -> int:
    return t.out2in(tcp(SERVER, FRONTEND, 80, port, flags, seq=seq, ack=ISN + 1), now)


def test_out_of_window_rst_from_outside_is_dropped_counted_and_changes_nothing() -> None:
    """A RST far outside the backend's window is dropped as drop_tcp_out_of_window; the
    flow keeps its state, its idle clock and its port, and traffic goes on both ways."""
    t = table()
    port, f = connect(t)
    for seq in (RISN + 1 + 0x40000000, RISN - 5000, 0):
        assert rst_from_outside(t, port, seq, 5.0) == DROP
    assert t.counters_dict()["drop_tcp_out_of_window"] == 3
    assert f.state == TcpState.ESTABLISHED and f.last_seen == 0.2 and f.pkts_in == 1
    assert out(t, tcp(B, SERVER, 40000, 80, "PA", b"more", seq=ISN + 1, ack=RISN + 1), 6.0)[0] == port
    data = tcp(SERVER, FRONTEND, 80, port, "PA", b"reply", seq=RISN + 1, ack=ISN + 5)
    assert t.out2in(data, 6.1) == ACCEPT_MODIFIED_MARK
    t.handle_timer(60.0)
    assert t.flow_count() == 1


def test_in_window_rst_from_outside_ends_the_flow_after_the_rst_linger() -> None:
    """A RST at RCV.NXT, or anywhere up to RCV.NXT + window, is taken: RESET, port freed after the linger."""
    for seq in (RISN + 1, RISN + 1 + (WIN << 7)):
        t = table()
        port, f = connect(t)
        assert rst_from_outside(t, port, seq) == ACCEPT_MODIFIED_MARK
        assert f.state == TcpState.RESET
        t.handle_timer(3.5)
        assert t.flow_count() == 0 and t.counters_dict()["flows_ended_closed"] == 1


def test_rst_just_above_the_window_or_below_rcv_nxt_is_dropped() -> None:
    """The edges: RCV.NXT + window + 1 and RCV.NXT - 1 are both out (RFC 5961 section 3.2)."""
    t = table()
    port, f = connect(t)
    assert rst_from_outside(t, port, RISN + 2 + (WIN << 7)) == DROP
    assert rst_from_outside(t, port, RISN) == DROP
    assert f.state == TcpState.ESTABLISHED


def test_window_scale_comes_from_the_backends_syn() -> None:
    """Without a window scale option on the SYN the backend's window is unscaled: a RST
    beyond RCV.NXT + window is dropped that would pass with scaling."""
    t = table()
    port, f = connect(t, wscale=None)
    assert f.trk_scale == 0
    assert rst_from_outside(t, port, RISN + 1 + WIN + 1) == DROP
    assert rst_from_outside(t, port, RISN + 1 + WIN) == ACCEPT_MODIFIED_MARK


def test_window_is_the_largest_the_backend_advertised() -> None:
    """A window that shrinks does not shrink the bound (conntrack's max window): a RST
    inside the earlier, larger window still passes."""
    t = table()
    port, f = connect(t)
    out(t, tcp(B, SERVER, 40000, 80, "A", seq=ISN + 1, ack=RISN + 1, window=10), 0.3)
    assert f.trk_win == WIN
    assert rst_from_outside(t, port, RISN + 1 + (WIN << 7) - 1) == ACCEPT_MODIFIED_MARK


def test_fin_from_outside_only_inside_the_window() -> None:
    """A FIN far off is dropped and does not move the state; one in the window (also a
    retransmission a little below RCV.NXT) moves it to fin_wait."""
    t = table()
    port, f = connect(t)
    far = tcp(SERVER, FRONTEND, 80, port, "FA", seq=RISN + 0x7000_0000, ack=ISN + 1)
    assert t.out2in(far, 1.0) == DROP
    assert f.state == TcpState.ESTABLISHED and f.fins == 0
    again = tcp(SERVER, FRONTEND, 80, port, "FA", seq=RISN - 10, ack=ISN + 1)
    assert t.out2in(again, 1.1) == ACCEPT_MODIFIED_MARK
    assert f.state == TcpState.FIN_WAIT


def test_rst_in_syn_sent_must_acknowledge_the_syn() -> None:
    """Before the backend acknowledged anything, a RST counts only if it ACKs the
    backend's SYN (RFC 9293 section 3.10.7.3), whatever its sequence number; a FIN not at all."""
    t = table()
    port = out(t, tcp(B, SERVER, 40000, 80, "S", seq=ISN), 0.0)[0]
    f = next(iter(t._tcp_inside.values()))
    assert t.out2in(tcp(SERVER, FRONTEND, 80, port, "R", seq=123), 0.1) == DROP
    assert t.out2in(tcp(SERVER, FRONTEND, 80, port, "RA", seq=0, ack=ISN + 7), 0.1) == DROP
    assert t.out2in(tcp(SERVER, FRONTEND, 80, port, "FA", seq=9, ack=ISN + 1), 0.1) == DROP
    assert f.state == TcpState.SYN_SENT
    assert t.out2in(tcp(SERVER, FRONTEND, 80, port, "RA", seq=0, ack=ISN + 1), 0.2) == ACCEPT_MODIFIED_MARK
    assert f.state == TcpState.RESET
    assert t.counters_dict()["drop_tcp_out_of_window"] == 3


def test_sequence_numbers_wrap() -> None:
    """Windows across 2**32 work: RCV.NXT near the top, a RST just past zero is in."""
    t = table()
    port = out(t, tcp(B, SERVER, 40000, 80, "S", seq=ISN, options=[("WScale", 0)]), 0.0)[0]
    t.out2in(tcp(SERVER, FRONTEND, 80, port, "SA", seq=0xFFFF_FFF0, ack=ISN + 1), 0.1)
    out(t, tcp(B, SERVER, 40000, 80, "A", seq=ISN + 1, ack=0xFFFF_FFF1, window=WIN), 0.2)
    assert rst_from_outside(t, port, 0xFFFF_FFF0) == DROP
    assert rst_from_outside(t, port, 5) == ACCEPT_MODIFIED_MARK


def test_a_flow_picked_up_mid_connection_is_liberal_until_it_knows_the_scale() -> None:
    """A data segment from the inside with no flow (a gateway restart) opens an established
    flow; without the SYN the shift is taken as 14 (RFC 7323 maximum), yet a RST behind
    what the backend acknowledged is still dropped."""
    t = table()
    port = out(t, tcp(B, SERVER, 40000, 80, "PA", b"data", seq=ISN, ack=RISN, window=WIN), 0.0)[0]
    f = next(iter(t._tcp_inside.values()))
    assert f.state == TcpState.ESTABLISHED and f.trk_scale == MAX_WSCALE and f.trk_ack == RISN
    assert rst_from_outside(t, port, RISN - 1) == DROP
    assert rst_from_outside(t, port, RISN + (WIN << MAX_WSCALE)) == ACCEPT_MODIFIED_MARK


def test_rst_and_fin_from_the_backend_are_taken_as_they_are() -> None:
    """The backend is the endpoint: its own RST ends the flow whatever the sequence number."""
    t = table()
    _port, f = connect(t)
    assert t.in2out(tcp(B, SERVER, 40000, 80, "R", seq=77), 1.0) == ACCEPT_MODIFIED
    assert f.state == TcpState.RESET


def test_syn_retransmission_keeps_its_first_mapping() -> None:
    """A retransmitted SYN (same 4-tuple) uses the flow and public port of the first, with random ports."""
    t = TranslationTable(lab_model(random_ports=True), 0.0, random.Random(7))
    first = out(t, tcp(B, SERVER, 40000, 80, "S", seq=ISN), 0.0)
    for now in (1.0, 3.0, 7.0):
        assert out(t, tcp(B, SERVER, 40000, 80, "S", seq=ISN), now) == first
    assert t.flow_count() == 1 and t.counters_dict()["flows_created"] == 1


def test_reopened_flow_learns_the_new_connection() -> None:
    """A SYN from the backend on a reset flow reopens it with the new ISN: a RST must ack that one."""
    t = table()
    port, f = connect(t)
    assert rst_from_outside(t, port, RISN + 1) == ACCEPT_MODIFIED_MARK
    assert out(t, tcp(B, SERVER, 40000, 80, "S", seq=90000), 1.5)[0] == port
    assert f.state == TcpState.SYN_SENT and f.trk_isn == 90001 and f.trk_ack == -1
    assert t.out2in(tcp(SERVER, FRONTEND, 80, port, "RA", ack=ISN + 1), 1.6) == DROP
    assert t.out2in(tcp(SERVER, FRONTEND, 80, port, "RA", ack=90001), 1.7) == ACCEPT_MODIFIED_MARK


def test_bare_ack_rst_or_syn_ack_from_inside_without_a_flow_takes_no_port() -> None:
    """Packets that cannot open a connection are dropped (drop_tcp_no_flow): no flow, no
    port, not even a block for a new standalone source."""
    t = table()
    for src in (B, STANDALONE):
        for flags in ("A", "R", "RA", "SA"):
            assert t.in2out(tcp(src, SERVER, 40000, 80, flags, seq=1, ack=1), 0.0) == DROP
    assert t.counters_dict()["drop_tcp_no_flow"] == 8
    assert t.flow_count() == 0 and t.counters_dict()["flows_created"] == 0
    be = t.backends[ip(B)]
    assert be.block is not None and not be.block.inventories
    assert ip(STANDALONE) not in t.backends


def test_a_gso_super_packet_is_one_segment_to_the_tracker() -> None:
    """A 60 KB segment from the outside with FIN, in the window, passes; the backend's
    GSO segments update the window like small ones."""
    t = table()
    port, f = connect(t)
    out(t, tcp(B, SERVER, 40000, 80, "PA", b"x" * 60000, seq=ISN + 1, ack=RISN + 1, window=3000), 0.3)
    assert f.trk_win == 3000
    big = tcp(SERVER, FRONTEND, 80, port, "FPA", b"y" * 60000, seq=RISN + 1, ack=ISN + 60001)
    assert t.out2in(big, 0.4) == ACCEPT_MODIFIED_MARK
    assert f.state == TcpState.FIN_WAIT


@given(st.binary(max_size=40))
def test_window_scale_parser_never_raises(options: bytes) -> None:
    """Any option bytes give a shift from 0 to 14 and never an exception."""
    hdr = bytearray(20) + bytearray(options)
    assert 0 <= syn_wscale(hdr, 0, len(hdr)) <= MAX_WSCALE


def test_a_syn_whose_data_offset_overruns_the_packet_is_translated_not_crashed() -> None:
    """A SYN claiming 60 header bytes in a 40-byte packet: the option walk stops at the
    end of the packet (shift 0), the flow opens, nothing raises (drop_internal stays 0)."""
    t = table()
    syn = tcp(B, SERVER, 40000, 80, "S", seq=ISN)
    syn[32] = 0xF0  # data offset 15 words
    assert t.in2out(syn, 0.0) == ACCEPT_MODIFIED
    f = next(iter(t._tcp_inside.values()))
    assert f.trk_scale == 0 and t.counters_dict()["drop_internal"] == 0


def test_a_syn_ack_that_does_not_ack_the_backends_syn_is_dropped() -> None:
    """In syn_sent a SYN-ACK from the outside must acknowledge the backend's SYN; a forged
    one is dropped (drop_tcp_out_of_window) and leaves the flow in syn_sent, so a RST
    after it still has to ack the SYN."""
    t = table()
    port = out(t, tcp(B, SERVER, 40000, 80, "S", seq=ISN), 0.0)[0]
    f = next(iter(t._tcp_inside.values()))
    assert t.out2in(tcp(SERVER, FRONTEND, 80, port, "SA", seq=RISN, ack=ISN + 99), 0.1) == DROP
    assert t.out2in(tcp(SERVER, FRONTEND, 80, port, "S", seq=RISN), 0.1) == DROP
    assert f.state == TcpState.SYN_SENT
    assert t.out2in(tcp(SERVER, FRONTEND, 80, port, "RA", seq=RISN, ack=ISN + 99), 0.2) == DROP
    assert t.out2in(tcp(SERVER, FRONTEND, 80, port, "SA", seq=RISN, ack=ISN + 1), 0.3) == ACCEPT_MODIFIED_MARK
    assert f.state == TcpState.ESTABLISHED
    assert t.counters_dict()["drop_tcp_out_of_window"] == 3
