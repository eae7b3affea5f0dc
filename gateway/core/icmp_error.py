"""ICMP errors about a live flow, translated both ways with the header they quote
(RFC 5508 section 7; RFC 1812 section 4.3.2.3 on what is quoted).

An out2in error quotes our translated in2out packet (public -> remote); an
in2out error from a backend quotes a translated return packet (remote ->
backend). Either way the quoted header names the flow. The outer address, the
quoted address and port and the quoted checksums are rewritten with the
flow's deltas; the ICMP checksum, which covers the quote, is recomputed.
"""

from __future__ import annotations

from gateway.core.checksum import apply, checksum
from gateway.core.counters import Counter
from gateway.core.header import H_IP, Buffer, H
from gateway.core.model import PROTO_ICMP, PROTO_TCP, PROTO_UDP
from gateway.core.placement import Placement
from gateway.core.verdict import ACCEPT_MODIFIED, ACCEPT_MODIFIED_MARK, DROP, Verdict

#: ICMP types that are errors quoting a packet (RFC 792): unreachable, source
#: quench, redirect, time exceeded, parameter problem.
ICMP_ERRORS = frozenset((3, 4, 5, 11, 12))
ICMP_ECHO_REQUEST = 8
ICMP_ECHO_REPLY = 0
ZERO2 = b"\0\0"


class IcmpErrors(Placement):
    """The ICMP error translation both per-packet paths hand errors to."""

    def _icmp_error(self, buf: Buffer, ihl: int, n: int, in2out: bool) -> Verdict:
        """Translate an ICMP error about a live flow; drop (counted) anything else."""
        i = ihl + 8
        if n < i + 20 or buf[i] >> 4 != 4:
            self.counters[Counter.DROP_MALFORMED] += 1
            return DROP
        iihl = (buf[i] & 15) << 2
        l4 = i + iihl
        if iihl < 20 or n < l4 + 8:
            self.counters[Counter.DROP_MALFORMED] += 1
            return DROP
        iproto = buf[i + 9]
        if iproto in (PROTO_TCP, PROTO_UDP):
            ports = bytes(buf[l4 + 2 : l4 + 4]) + bytes(buf[l4 : l4 + 2])
            port_at = l4 + 2 if in2out else l4
        elif iproto == PROTO_ICMP and buf[l4] in (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY):
            ident = bytes(buf[l4 + 4 : l4 + 6])
            ports = ident + ZERO2 if in2out else ZERO2 + ident
            port_at = l4 + 4
        else:
            self.counters[Counter.DROP_UNSUPPORTED] += 1
            return DROP
        # The quote runs the other way: its destination and source make our key.
        flows = self.inside[iproto] if in2out else self.outside[iproto]
        f = flows.get(bytes(buf[i + 16 : i + 20]) + bytes(buf[i + 12 : i + 16]) + ports)
        if f is None:
            self.counters[Counter.DROP_NO_FLOW] += 1
            return DROP
        if in2out:
            if bytes(buf[12:16]) != f.backend_b:
                self.counters[Counter.DROP_NO_FLOW] += 1
                return DROP
            d_ip, d_l4 = f.in2out_ip, f.in2out_l4
            H_IP.pack_into(buf, 10, apply(buf[10] << 8 | buf[11], d_ip), f.public_b)
            H.pack_into(buf, i + 10, apply(buf[i + 10] << 8 | buf[i + 11], d_ip))
            buf[i + 16 : i + 20] = f.public_b
            buf[port_at : port_at + 2] = f.public_port_b
        else:
            if bytes(buf[16:20]) != f.public_b:
                self.counters[Counter.DROP_NO_FLOW] += 1
                return DROP
            d_ip, d_l4 = f.out2in_ip, f.out2in_l4
            H.pack_into(buf, 10, apply(buf[10] << 8 | buf[11], d_ip))
            buf[16:20] = f.backend_b
            H.pack_into(buf, i + 10, apply(buf[i + 10] << 8 | buf[i + 11], d_ip))
            buf[i + 12 : i + 16] = f.backend_b
            buf[port_at : port_at + 2] = f.backend_port_b
        if iproto == PROTO_UDP:
            ic = l4 + 6
            if buf[ic] or buf[ic + 1]:
                c = apply(buf[ic] << 8 | buf[ic + 1], d_l4)
                H.pack_into(buf, ic, c or 0xFFFF)
        elif iproto == PROTO_TCP:
            ic = l4 + 16
            if n >= ic + 2:
                H.pack_into(buf, ic, apply(buf[ic] << 8 | buf[ic + 1], d_l4))
        else:
            ic = l4 + 2
            H.pack_into(buf, ic, apply(buf[ic] << 8 | buf[ic + 1], d_l4))
        buf[ihl + 2] = 0
        buf[ihl + 3] = 0
        H.pack_into(buf, ihl + 2, checksum(memoryview(buf)[ihl:n]))
        if in2out:
            self.counters[Counter.ICMP_ERROR_IN2OUT] += 1
            return ACCEPT_MODIFIED
        self.counters[Counter.ICMP_ERROR_OUT2IN] += 1
        return ACCEPT_MODIFIED_MARK
