"""The per-packet path from a backend toward the outside (docs/model.md, "PAT").

One dict lookup on a 12-byte inside key cut from the headers (source and
destination address, source and destination port as they sit in the
packet), then the source address and port and the checksums are rewritten
in place with the flow's precomputed RFC 1624 deltas. A packet without a
flow goes to :meth:`~gateway.core.placement.Placement._new_flow`, or, when
its source belongs to another worker, to that worker first
(:mod:`gateway.core.dispatch`); an ICMP error to
:mod:`gateway.core.icmp_error`. Nothing here logs or raises for bad input;
the only objects made per packet are the key (a ``bytes``) and, for a
packet with IP options, the slices it is joined from.
"""

from __future__ import annotations

from gateway.core.checksum import apply
from gateway.core.counters import Counter
from gateway.core.flow import TCP_ACK_WIN, Flow
from gateway.core.header import H_IP, HEAD, KEY, UDP_HEADER, Buffer, H, l4_offset
from gateway.core.icmp_error import (
    ICMP_ECHO_REPLY,
    ICMP_ECHO_REQUEST,
    ICMP_ERRORS,
    ZERO2,
    IcmpErrors,
    icmp_checksum_ok,
)
from gateway.core.model import PROTO_ICMP, PROTO_TCP, PROTO_UDP
from gateway.core.verdict import ACCEPT_MODIFIED, DROP, Verdict

_C_IN2OUT = Counter.IN2OUT_TRANSLATED.value
_D_UNSUPPORTED = Counter.DROP_UNSUPPORTED.value
_D_TCP_NO_FLOW = Counter.DROP_TCP_NO_FLOW.value
_D_BAD_CHECKSUM = Counter.DROP_BAD_CHECKSUM.value


class In2Out(IcmpErrors):
    """Translating packets from backends."""

    def in2out(self, buf: Buffer, now: float) -> Verdict:
        """Translate a packet from a backend toward the outside, in place."""
        n = len(buf)
        # What l4_offset answers for a 20-byte header, unfragmented, with room for any
        # transport header (n >= 40), checked inline; every other packet asks it.
        if n >= 40 and (h := HEAD(buf, 0))[0] == 0x45 and not h[1] & 0x3FFF:
            _v, _fr, proto, ipc, key, _ln, c = h
            ihl = 20
            if proto == PROTO_UDP and (f := self._udp_inside.get(key)) is not None:
                # A UDP packet of a live flow, written from the one unpack (as below).
                if c:
                    c -= f.in2out_l4
                    if c <= 0:
                        c += 0xFFFF
                H.pack_into(buf, 20, f.public_port)
                H.pack_into(buf, 26, c)
                ipc -= f.in2out_ip
                if ipc < 0:
                    ipc += 0xFFFF
                H_IP.pack_into(buf, 10, ipc, f.public_b)
                f.last_seen = now
                f.pkts_out += 1
                f.bytes_out += n
                self.counters[_C_IN2OUT] += 1
                return ACCEPT_MODIFIED
        else:
            ihl = l4_offset(buf, n)
            if ihl < 0:
                self.counters[-ihl] += 1
                return DROP
            # The flow key of TCP and UDP (ICMP makes its own): addresses, then ports.
            key = KEY(buf, 12)[0] if ihl == 20 else bytes(buf[12:20]) + bytes(buf[ihl : ihl + 4])
            proto = buf[9]
        if proto == PROTO_UDP:
            f = self._udp_inside.get(key)
            if f is None:
                if self._sharded and (w := self._inside_owner(int.from_bytes(buf[12:16], "big"))) >= 0:
                    return self._requeue(w)
                f = self._new_flow(buf, ihl, proto, key, now)
                if f is None:
                    return DROP
            _sp, dp, ln, c = UDP_HEADER.unpack_from(buf, ihl)
            if c:
                c -= f.in2out_l4
                if c <= 0:
                    c += 0xFFFF
            UDP_HEADER.pack_into(buf, ihl, f.public_port, dp, ln, c)
        elif proto == PROTO_TCP:
            f = self._tcp_inside.get(key)
            if f is None:
                if self._sharded and (w := self._inside_owner(int.from_bytes(buf[12:16], "big"))) >= 0:
                    return self._requeue(w)
                f = self._new_tcp_flow(buf, ihl, n, key, now)
                if f is None:
                    return DROP
            # The backend's window (flow.in_window): a plain ACK stores two ints;
            # SYN, FIN, RST and odd flags take the slow path.
            ack, fl, win = TCP_ACK_WIN(buf, ihl + 8)
            if fl & 0x17 == 0x10:
                f.trk_ack = ack
                if win > f.trk_win:
                    f.trk_win = win
            else:
                self._tcp_in2out_flags(f, buf, ihl, now)
            H.pack_into(buf, ihl, f.public_port)
            c = (buf[ihl + 16] << 8 | buf[ihl + 17]) - f.in2out_l4
            if c < 0:
                c += 0xFFFF
            H.pack_into(buf, ihl + 16, c)
        elif proto == PROTO_ICMP:
            return self._icmp_in2out(buf, ihl, n, now)
        else:
            self.counters[_D_UNSUPPORTED] += 1
            return DROP
        c = (buf[10] << 8 | buf[11]) - f.in2out_ip
        if c < 0:
            c += 0xFFFF
        H_IP.pack_into(buf, 10, c, f.public_b)
        f.last_seen = now
        f.pkts_out += 1
        f.bytes_out += n
        self.counters[_C_IN2OUT] += 1
        return ACCEPT_MODIFIED

    def _new_tcp_flow(self, buf: Buffer, ihl: int, n: int, key: bytes, now: float) -> Flow | None:
        """A flow for a backend's TCP packet that matches none, if the packet can open
        one: a SYN (a new connection), or a segment with data or a FIN (a
        connection under way, picked up after a restart). A bare ACK, a RST or a
        SYN-ACK cannot: dropped and counted, no port taken (docs/decisions.md,
        "TCP tracking")."""
        flags = buf[ihl + 13]
        if flags & 0x16 != 0x02 and (
            flags & 0x06 or not (flags & 0x01 or n > ihl + ((buf[ihl + 12] >> 4) << 2))
        ):
            self.counters[_D_TCP_NO_FLOW] += 1
            return None
        return self._new_flow(buf, ihl, PROTO_TCP, key, now)

    def _icmp_in2out(self, buf: Buffer, ihl: int, n: int, now: float) -> Verdict:
        """An echo request (its identifier is translated like a port), an echo reply
        to a ping opened from the outside, or an error. An echo with a wrong ICMP
        checksum is dropped before it can open a flow (``drop_bad_checksum``, RFC
        792; the incremental update would pass it on)."""
        typ = buf[ihl]
        if typ in (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY):
            if not icmp_checksum_ok(buf, ihl, n):
                self.counters[_D_BAD_CHECKSUM] += 1
                return DROP
            key = bytes(buf[12:20]) + bytes(buf[ihl + 4 : ihl + 6]) + ZERO2
            f = self._icmp_inside.get(key)
            if f is None:
                if self._sharded and (w := self._inside_owner(int.from_bytes(buf[12:16], "big"))) >= 0:
                    return self._requeue(w)
                if typ == ICMP_ECHO_REPLY:
                    # A reply only answers a ping opened from the outside (an instance IP).
                    self.counters[_D_UNSUPPORTED] += 1
                    return DROP
                f = self._new_flow(buf, ihl, PROTO_ICMP, key, now)
                if f is None:
                    return DROP
            elif f.inbound != (typ == ICMP_ECHO_REPLY):
                # A flow carries requests one way only: no reply on the backend's own
                # ping, no request on one opened from the outside (same identifier).
                self.counters[_D_UNSUPPORTED] += 1
                return DROP
            f.last_seen = now
            f.pkts_out += 1
            f.bytes_out += n
            H_IP.pack_into(buf, 10, apply(buf[10] << 8 | buf[11], f.in2out_ip), f.public_b)
            buf[ihl + 4 : ihl + 6] = f.public_port_b
            H.pack_into(buf, ihl + 2, apply(buf[ihl + 2] << 8 | buf[ihl + 3], f.in2out_l4))
            self.counters[_C_IN2OUT] += 1
            return ACCEPT_MODIFIED
        if typ in ICMP_ERRORS:
            return self._icmp_error(buf, ihl, n, True)
        self.counters[_D_UNSUPPORTED] += 1
        return DROP
