"""ICMP errors about a live flow, translated both ways with the header they quote
(RFC 5508 section 7; RFC 1812 section 4.3.2.3 on what is quoted), and the ones the
gateway host itself sends (``local_out``).

An out2in error quotes our translated in2out packet (public -> remote); an
in2out error from a backend quotes a translated return packet (remote ->
backend). Either way the quoted header names the flow. The outer address, the
quoted address and port and the quoted checksums are rewritten with the
flow's deltas; the ICMP checksum, which covers the quote, is recomputed.

An error the gateway host sends on the outside about a return packet it has
already rewritten (TTL exceeded, fragmentation needed toward a smaller inside
MTU, host unreachable) quotes the backend's private address and port
(docs/kernel.md, "Pitfalls"). :meth:`IcmpErrors.local_out` gets those from
mangle OUTPUT and puts the quote back to the flow's public address and port;
the outer source stays the host's own outside address (the router that
really sent it, as RFC 5508 section 7.2 wants the error to stay meaningful
to the remote, which matches it by the quote). A quote naming a backend
without a flow is suppressed, so no private address leaves.

Hygiene (RFC 5508 section 8, RFC 6918): only destination unreachable, time
exceeded and parameter problem are translated. Redirect, source quench and
every other type that is neither echo nor one of those is dropped and counted
(``drop_icmp_type``) in both directions; an error whose ICMP checksum is
wrong is dropped and counted (``drop_bad_checksum``), never given a new one.
"""

from __future__ import annotations

from gateway.core.checksum import apply, checksum, ones_sum
from gateway.core.counters import Counter
from gateway.core.dispatch import Dispatch
from gateway.core.header import H_IP, Buffer, H, l4_offset
from gateway.core.model import PROTO_ICMP, PROTO_TCP, PROTO_UDP
from gateway.core.verdict import ACCEPT, ACCEPT_MODIFIED, ACCEPT_MODIFIED_MARK, DROP, Verdict

ICMP_ECHO_REQUEST = 8
ICMP_ECHO_REPLY = 0
#: The errors that are translated (RFC 792): destination unreachable, time
#: exceeded, parameter problem.
TRANSLATED_ERRORS = frozenset((3, 11, 12))
#: Every ICMP type other than echo: the per-packet paths hand these to
#: :meth:`IcmpErrors._icmp_error`, which translates :data:`TRANSLATED_ERRORS`
#: and drops the rest by name (redirect 5, source quench 4, router
#: advertisement/solicitation 9/10, timestamp 13/14, information 15/16,
#: address mask 17/18, ...).
ICMP_ERRORS = frozenset(range(256)) - {ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY}
ZERO2 = b"\0\0"

def icmp_checksum_ok(buf: Buffer, ihl: int, n: int) -> bool:
    """Whether the ICMP checksum over ``buf[ihl:n]`` is right (RFC 792: the one's
    complement sum of the whole message, checksum included, is all ones).

    For the echo paths too: an echo with a bad checksum must be dropped
    (``drop_bad_checksum``), not passed with an adjusted one.
    """
    return ones_sum(memoryview(buf)[ihl:n]) == 0xFFFF


#: How :meth:`IcmpErrors._icmp_error` was reached.
_OUT2IN, _IN2OUT, _LOCAL_OUT = 0, 1, 2


class IcmpErrors(Dispatch):
    """The ICMP error translation both per-packet paths hand errors to, and
    the entry point for the host's own errors."""

    def local_out(self, buf: Buffer, now: float) -> Verdict:
        """A packet the gateway host itself sends (mangle OUTPUT): an ICMP error on
        the outside, or a TCP SYN toward a backend on the inside (a health probe).

        An error that quotes a translated return packet leaves quoting the
        flow's public address and port; one quoting a backend without a flow
        is dropped (``drop_local_icmp_no_flow``); one that quotes nothing of
        ours (the host's own business) is accepted unchanged. A SYN is held to
        the backend's inbound security rules (:meth:`_local_syn`).
        """
        n = len(buf)
        ihl = l4_offset(buf, n)
        if ihl < 0:
            self.counters[-ihl] += 1
            return DROP
        proto = buf[9]
        if proto == PROTO_TCP and buf[ihl + 13] & 0x17 == 0x02:
            return self._local_syn(buf, ihl, now)
        if proto != PROTO_ICMP or buf[ihl] not in ICMP_ERRORS:
            return ACCEPT
        return self._icmp_error(buf, ihl, n, _LOCAL_OUT)

    def _local_syn(self, buf: Buffer, ihl: int, now: float) -> Verdict:
        """A SYN the gateway host sends toward a backend: a health probe (from the
        AzureLoadBalancer address) meets the backend's inbound security rules as
        any flow to it would, so a group that denies that tag makes the probe
        fail, as the article warns (docs/model.md, "Health probes"). Denied by a
        rule: dropped (``drop_security_denied``, per backend and rule). A backend
        no group covers is not held to ``inbound_default``, which is about the
        outside (Azure probes a backend without a group). Anything else,
        and a SYN to an address that is no backend, passes unchanged."""
        dst = int.from_bytes(buf[16:20], "big")
        if dst not in self.backends and dst not in self.health.members and dst not in self._foreign:
            return ACCEPT
        src = int.from_bytes(buf[12:16], "big")
        sport = buf[ihl] << 8 | buf[ihl + 1]
        dport = buf[ihl + 2] << 8 | buf[ihl + 3]
        d = self.security.inbound(dst, PROTO_TCP, src, sport, dst, dport)
        if d.allowed or not d.rules:
            return ACCEPT
        self._deny(dst, d, src, dport, PROTO_TCP, now)
        return DROP

    def _icmp_error(self, buf: Buffer, ihl: int, n: int, way: int) -> Verdict:
        """Translate an ICMP error about a live flow; drop (counted) anything else.

        ``way`` is 1 (or True) for in2out, 0 (False) for out2in, 2 for local_out.
        """
        if buf[ihl] not in TRANSLATED_ERRORS:
            self.counters[Counter.DROP_ICMP_TYPE] += 1
            return DROP
        if not icmp_checksum_ok(buf, ihl, n):
            self.counters[Counter.DROP_BAD_CHECKSUM] += 1
            return DROP
        in2out = way != _OUT2IN
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
        elif way == _LOCAL_OUT:
            return self._local_unknown(buf, i)
        else:
            self.counters[Counter.DROP_UNSUPPORTED] += 1
            return DROP
        # The quote runs the other way: its destination and source make our key.
        flows = self.inside[iproto] if in2out else self.outside[iproto]
        f = flows.get(bytes(buf[i + 16 : i + 20]) + bytes(buf[i + 12 : i + 16]) + ports)
        if f is None:
            if way == _LOCAL_OUT:
                return self._local_unknown(buf, i)
            if self._sharded:
                # The quote names the flow's owner: its backend (in2out), or what
                # its public address and port belong to (out2in).
                if in2out:
                    w = self._inside_owner(int.from_bytes(buf[i + 16 : i + 20], "big"))
                else:
                    quoted_dst, quoted_src = bytes(buf[i + 16 : i + 20]), bytes(buf[i + 12 : i + 16])
                    w = self._outside_owner(iproto, quoted_dst, quoted_src, ports)
                if w >= 0:
                    return self._requeue(w)
            self.counters[Counter.DROP_NO_FLOW] += 1
            return DROP
        if way == _LOCAL_OUT:
            # The outer header is the host's own (source: its outside address).
            d_ip, d_l4 = f.in2out_ip, f.in2out_l4
            H.pack_into(buf, i + 10, apply(buf[i + 10] << 8 | buf[i + 11], d_ip))
            buf[i + 16 : i + 20] = f.public_b
            buf[port_at : port_at + 2] = f.public_port_b
        elif in2out:
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
        if way == _LOCAL_OUT:
            self.counters[Counter.ICMP_ERROR_LOCAL_OUT] += 1
            return ACCEPT_MODIFIED
        if in2out:
            self.counters[Counter.ICMP_ERROR_IN2OUT] += 1
            return ACCEPT_MODIFIED
        self.counters[Counter.ICMP_ERROR_OUT2IN] += 1
        return ACCEPT_MODIFIED_MARK

    def _local_unknown(self, buf: Buffer, i: int) -> Verdict:
        """A host error whose quote names no flow: suppressed if the quoted
        destination is a backend, left alone otherwise (the host's own traffic).
        With several workers, one whose quoted destination another worker owns
        goes to that worker, which alone knows whether it is a backend with a
        flow (a standalone backend is known to its owner only)."""
        dst = int.from_bytes(buf[i + 16 : i + 20], "big")
        if self._sharded:
            w = self._inside_owner(dst)
            if w >= 0:
                return self._requeue(w)
        if dst in self.backends:
            self.counters[Counter.DROP_LOCAL_ICMP_NO_FLOW] += 1
            return DROP
        return ACCEPT
