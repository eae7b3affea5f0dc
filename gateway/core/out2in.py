"""The per-packet path from the outside back to a backend (docs/model.md, "PAT").

Only a packet from the exact remote endpoint of a live flow is translated:
the 12-byte outside key (remote ip, public ip, remote port, public port, as
they sit in the packet) must name a flow. Everything else sent to a public
address is dropped and counted, never delivered to the gateway's own stack
or a backend (docs/kernel.md, "Diverting packets"). The verdict asks for the
"translated" mark, the only thing the FORWARD filter lets from the outside
to the inside.
"""

from __future__ import annotations

import struct

from gateway.core.checksum import apply
from gateway.core.counters import Counter
from gateway.core.header import Buffer, l4_offset
from gateway.core.icmp_error import ICMP_ECHO_REPLY, ICMP_ERRORS, ZERO2, IcmpErrors
from gateway.core.model import PROTO_ICMP, PROTO_TCP, PROTO_UDP
from gateway.core.verdict import ACCEPT_MODIFIED_MARK, DROP, Verdict

_H = struct.Struct("!H")
_UDP = struct.Struct("!HHHH")
_KEY = struct.Struct("12s").unpack_from

_C_OUT2IN = Counter.OUT2IN_TRANSLATED.value
_D_NO_FLOW = Counter.DROP_NO_FLOW.value


class Out2In(IcmpErrors):
    """Translating return packets."""

    def out2in(self, buf: Buffer, now: float) -> Verdict:
        """Translate a return packet to its backend, in place; drop it unless it
        comes from the exact remote endpoint of a live flow (or is an ICMP
        error about one)."""
        n = len(buf)
        ihl = l4_offset(buf, n)
        if ihl < 0:
            self.counters[-ihl] += 1
            return DROP
        proto = buf[9]
        if proto == PROTO_UDP:
            key = _KEY(buf, 12)[0] if ihl == 20 else bytes(buf[12:20]) + bytes(buf[ihl : ihl + 4])
            f = self._udp_outside.get(key)
            if f is None:
                self.counters[_D_NO_FLOW] += 1
                return DROP
            sp, _dp, ln, c = _UDP.unpack_from(buf, ihl)
            if c:
                c -= f.out2in_l4
                if c <= 0:
                    c += 0xFFFF
            _UDP.pack_into(buf, ihl, sp, f.backend_port, ln, c)
        elif proto == PROTO_TCP:
            key = _KEY(buf, 12)[0] if ihl == 20 else bytes(buf[12:20]) + bytes(buf[ihl : ihl + 4])
            f = self._tcp_outside.get(key)
            if f is None:
                self.counters[_D_NO_FLOW] += 1
                return DROP
            if buf[ihl + 13] & 7:
                self._tcp_flags(f, buf[ihl + 13], False, now)
            _H.pack_into(buf, ihl + 2, f.backend_port)
            c = (buf[ihl + 16] << 8 | buf[ihl + 17]) - f.out2in_l4
            if c < 0:
                c += 0xFFFF
            _H.pack_into(buf, ihl + 16, c)
        elif proto == PROTO_ICMP:
            return self._icmp_out2in(buf, ihl, n, now)
        else:
            self.counters[_D_NO_FLOW] += 1
            return DROP
        c = (buf[10] << 8 | buf[11]) - f.out2in_ip
        if c < 0:
            c += 0xFFFF
        _H.pack_into(buf, 10, c)
        buf[16:20] = f.backend_b
        f.last_seen = now
        f.pkts_in += 1
        f.bytes_in += n
        self.counters[_C_OUT2IN] += 1
        return ACCEPT_MODIFIED_MARK

    def _icmp_out2in(self, buf: Buffer, ihl: int, n: int, now: float) -> Verdict:
        """An echo reply to a live echo flow, or an error about a live flow."""
        typ = buf[ihl]
        if typ == ICMP_ECHO_REPLY:
            key = bytes(buf[12:20]) + ZERO2 + bytes(buf[ihl + 4 : ihl + 6])
            f = self._icmp_outside.get(key)
            if f is None:
                self.counters[_D_NO_FLOW] += 1
                return DROP
            f.last_seen = now
            f.pkts_in += 1
            f.bytes_in += n
            _H.pack_into(buf, 10, apply(buf[10] << 8 | buf[11], f.out2in_ip))
            buf[16:20] = f.backend_b
            buf[ihl + 4 : ihl + 6] = f.backend_port_b
            _H.pack_into(buf, ihl + 2, apply(buf[ihl + 2] << 8 | buf[ihl + 3], f.out2in_l4))
            self.counters[_C_OUT2IN] += 1
            return ACCEPT_MODIFIED_MARK
        if typ in ICMP_ERRORS:
            return self._icmp_error(buf, ihl, n, False)
        self.counters[_D_NO_FLOW] += 1
        return DROP
