"""The per-packet path from the outside back to a backend (docs/model.md, "PAT").

Only a packet from the exact remote endpoint of a live flow is translated:
the 12-byte outside key (remote ip, public ip, remote port, public port, as
they sit in the packet) must name a flow. Everything else sent to a public
address is dropped and counted, never delivered to the gateway's own stack
or a backend (docs/kernel.md, "Diverting packets"). The verdict asks for the
"translated" mark, the only thing the FORWARD filter lets from the outside
to the inside.

A packet that matches no flow may open one when an LB rule, an inbound NAT
rule or an instance IP serves its destination
(:meth:`~gateway.core.inbound.Inbound._open_inbound`), or belong to another
worker, which it is handed to (:mod:`gateway.core.dispatch`); both branches
are taken only after the dict lookup missed, so a live flow's packet costs
what it did.
"""

from __future__ import annotations

from gateway.core.checksum import apply
from gateway.core.counters import Counter
from gateway.core.header import HEAD, KEY, UDP_HEADER, UDP_PORT_ON, Buffer, H, l4_offset
from gateway.core.icmp_error import ICMP_ECHO_REQUEST, ICMP_ERRORS, ZERO2, IcmpErrors, icmp_checksum_ok
from gateway.core.model import PROTO_ICMP, PROTO_TCP, PROTO_UDP
from gateway.core.verdict import ACCEPT_MODIFIED_MARK, DROP, Verdict

_C_OUT2IN = Counter.OUT2IN_TRANSLATED.value
_D_NO_FLOW = Counter.DROP_NO_FLOW.value
_D_BAD_CHECKSUM = Counter.DROP_BAD_CHECKSUM.value


class Out2In(IcmpErrors):
    """Translating return packets."""

    def out2in(self, buf: Buffer, now: float) -> Verdict:
        """Translate a return packet to its backend, in place; drop it unless it
        comes from the exact remote endpoint of a live flow (or is an ICMP
        error about one)."""
        n = len(buf)
        # l4_offset's answer for a plain 20-byte header, inline (as in In2Out.in2out).
        if n >= 40 and (h := HEAD(buf, 0))[0] == 0x45 and not h[1] & 0x3FFF:
            _v, _fr, proto, ipc, key, ln, c = h
            ihl = 20
            if proto == PROTO_UDP and (f := self._udp_outside.get(key)) is not None:
                # A UDP packet of a live flow, written from the one unpack (as below).
                if c:
                    c = (c - f.out2in_l4 - 1) % 0xFFFF + 1
                UDP_PORT_ON.pack_into(buf, 22, f.backend_port, ln, c)
                ipc -= f.out2in_ip
                if ipc < 0:
                    ipc += 0xFFFF
                H.pack_into(buf, 10, ipc)
                buf[16:20] = f.backend_b
                self.counters[_C_OUT2IN] += 1
                f.last_seen = now
                f.pkts_in += 1
                f.bytes_in += n
                return ACCEPT_MODIFIED_MARK
        else:
            ihl = l4_offset(buf, n)
            if ihl < 0:
                self.counters[-ihl] += 1
                return DROP
            # The flow key of TCP and UDP (ICMP makes its own): addresses, then ports.
            key = KEY(buf, 12)[0] if ihl == 20 else bytes(buf[12:20]) + bytes(buf[ihl : ihl + 4])
            proto = buf[9]
        if proto == PROTO_UDP:
            f = self._udp_outside.get(key)
            if f is None:
                if self._sharded and (w := self._outside_owner(PROTO_UDP, key[:4], key[4:8], key[8:12])) >= 0:
                    return self._requeue(w)
                f = self._open_inbound(buf, ihl, PROTO_UDP, key, now)
                if f is None:
                    return DROP
            sp, _dp, ln, c = UDP_HEADER.unpack_from(buf, ihl)
            if c:  # 0: sent without a checksum (RFC 768); stays 0, a result lands in 1..0xFFFF
                c = (c - f.out2in_l4 - 1) % 0xFFFF + 1
            UDP_HEADER.pack_into(buf, ihl, sp, f.backend_port, ln, c)
        elif proto == PROTO_TCP:
            f = self._tcp_outside.get(key)
            if f is None:
                if self._sharded and (w := self._outside_owner(PROTO_TCP, key[:4], key[4:8], key[8:12])) >= 0:
                    return self._requeue(w)
                f = self._open_inbound(buf, ihl, PROTO_TCP, key, now)
                if f is None:
                    return DROP
            if buf[ihl + 13] & 7 and not self._tcp_out2in_flags(f, buf, ihl, now):
                return DROP
            H.pack_into(buf, ihl + 2, f.backend_port)
            c = (buf[ihl + 16] << 8 | buf[ihl + 17]) - f.out2in_l4
            if c < 0:
                c += 0xFFFF
            H.pack_into(buf, ihl + 16, c)
        else:
            return self._icmp_out2in(buf, ihl, n, now)
        c = (buf[10] << 8 | buf[11]) - f.out2in_ip
        if c < 0:
            c += 0xFFFF
        H.pack_into(buf, 10, c)
        buf[16:20] = f.backend_b
        self.counters[_C_OUT2IN] += 1
        f.last_seen = now
        f.pkts_in += 1
        f.bytes_in += n
        return ACCEPT_MODIFIED_MARK

    def _icmp_out2in(self, buf: Buffer, ihl: int, n: int, now: float) -> Verdict:
        """An echo reply to a backend's own ping flow, an echo request to an instance
        IP (a flow opened from the outside, or a later request of it), or an error
        about a live flow; any other protocol has no flow here. An echo with a
        wrong ICMP checksum is dropped (``drop_bad_checksum``): it opens and
        refreshes nothing."""
        typ = buf[ihl]
        if buf[9] == PROTO_ICMP and typ in ICMP_ERRORS:
            return self._icmp_error(buf, ihl, n, False)
        if buf[9] != PROTO_ICMP:
            self.counters[_D_NO_FLOW] += 1
            return DROP
        key = bytes(buf[12:20]) + ZERO2 + bytes(buf[ihl + 4 : ihl + 6])
        f = self._icmp_outside.get(key)
        # A flow carries requests one way and replies the other: from the outside,
        # a request rides only a ping opened from the outside (or opens one to an
        # instance IP, docs/model.md "Inbound"), a reply only the backend's own.
        if f is None:
            if self._sharded and (w := self._outside_owner(PROTO_ICMP, key[:4], key[4:8], key[8:12])) >= 0:
                return self._requeue(w)
            if typ != ICMP_ECHO_REQUEST:
                self.counters[_D_NO_FLOW] += 1
                return DROP
            if not icmp_checksum_ok(buf, ihl, n):
                self.counters[_D_BAD_CHECKSUM] += 1
                return DROP
            f = self._open_inbound(buf, ihl, PROTO_ICMP, key, now)
            if f is None:
                return DROP
        elif f.inbound != (typ == ICMP_ECHO_REQUEST):
            self.counters[_D_NO_FLOW] += 1
            return DROP
        elif not icmp_checksum_ok(buf, ihl, n):
            self.counters[_D_BAD_CHECKSUM] += 1
            return DROP
        buf[16:20] = f.backend_b
        H.pack_into(buf, 10, apply(buf[10] << 8 | buf[11], f.out2in_ip))
        buf[ihl + 4 : ihl + 6] = f.backend_port_b
        H.pack_into(buf, ihl + 2, apply(buf[ihl + 2] << 8 | buf[ihl + 3], f.out2in_l4))
        f.last_seen = now
        f.pkts_in += 1
        f.bytes_in += n
        self.counters[_C_OUT2IN] += 1
        return ACCEPT_MODIFIED_MARK
