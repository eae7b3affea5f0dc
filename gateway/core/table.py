"""The translation table: in2out and out2in for every packet, flows with both
keys, port blocks, the timer wheel and the counters (OUTBOUND_MODEL.md).

The per-packet entry points :meth:`TranslationTable.in2out` and
:meth:`TranslationTable.out2in` take the IPv4 packet as a mutable buffer and
``now``. They rewrite addresses, ports and checksums in place and return a
verdict; they never raise for bad input, never log and allocate little more
than the lookup key. Everything rare (a new flow, a TCP FIN or RST, ICMP
errors, exhaustion) is in methods of its own.

Adapters drain :attr:`TranslationTable.events` (exhaustion, tier changes,
reclaimed ports) and log them; they read :attr:`counters` for metrics.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from gateway.core.block import CHUNK_SHIFT, PORT_BYTES, PortBlock
from gateway.core.checksum import apply, checksum, delta
from gateway.core.flow import (
    END_CLOSED,
    END_IDLE,
    END_RECLAIMED,
    END_REMOVED,
    TCP_ACK,
    TCP_CLOSED,
    TCP_ESTABLISHED,
    TCP_RESET,
    TCP_SYN,
    TCP_SYN_SENT,
    Flow,
    tcp_next_state,
    timeout_for,
)
from gateway.core.frontend import KIND_FRONTEND, KIND_INSTANCE_IP, PublicAddress, new_pat_address
from gateway.core.model import PROTO_ICMP, PROTO_NAMES, PROTO_TCP, PROTO_UDP, GatewayModel
from gateway.core.pool import (
    SCENARIO_DEFAULT,
    SCENARIO_INSTANCE_IP,
    Backend,
    ip_str,
    pick_default,
    plan,
)
from gateway.core.tier import ports_per_backend
from gateway.core.wheel import TimerWheel

# Verdicts, as the adapters act on them.
DROP = 0
ACCEPT = 1
ACCEPT_MODIFIED = 2
#: Accept the modified packet and mark it, so that the FORWARD filter lets it
#: from the outside to the inside (only translated return traffic may pass).
ACCEPT_MODIFIED_MARK = 3

# Counters: one list, indexed by these constants (cheap on the per-packet path).
COUNTER_NAMES = (
    "in2out_translated",
    "out2in_translated",
    "icmp_error_in2out",
    "icmp_error_out2in",
    "flows_created",
    "flows_ended_idle",
    "flows_ended_closed",
    "flows_ended_reclaimed",
    "flows_ended_removed",
    "drop_malformed",
    "drop_fragment",
    "drop_unsupported",
    "drop_no_flow",
    "drop_exhausted",
    "drop_no_public_address",
    "drop_internal",
)
(
    C_IN2OUT,
    C_OUT2IN,
    C_ICMP_ERR_IN2OUT,
    C_ICMP_ERR_OUT2IN,
    C_FLOWS_CREATED,
    C_ENDED_IDLE,
    C_ENDED_CLOSED,
    C_ENDED_RECLAIMED,
    C_ENDED_REMOVED,
    D_MALFORMED,
    D_FRAGMENT,
    D_UNSUPPORTED,
    D_NO_FLOW,
    D_EXHAUSTED,
    D_NO_ADDRESS,
    D_INTERNAL,
) = range(len(COUNTER_NAMES))

_END_COUNTER = {
    END_IDLE: C_ENDED_IDLE,
    END_CLOSED: C_ENDED_CLOSED,
    END_RECLAIMED: C_ENDED_RECLAIMED,
    END_REMOVED: C_ENDED_REMOVED,
}
#: Re-arm ``snat_ports_high_water`` once use falls this share of the block below the mark.
HIGH_WATER_HYSTERESIS = 0.1

_ICMP_ERRORS = frozenset((3, 4, 5, 11, 12))
_ICMP_ECHO_REQUEST = 8
_ICMP_ECHO_REPLY = 0
_ZERO2 = b"\0\0"

#: A packet as the adapters hand it over: writable, indexable, sliceable.
Buffer = bytearray | memoryview

_H = struct.Struct("!H")
_HI = struct.Struct("!H4s")
_UDP = struct.Struct("!HHHH")
_KEY = struct.Struct("12s").unpack_from


@dataclass(slots=True)
class Event:
    """Something the operator should hear about; the adapter logs it by ``name``."""

    name: str
    fields: dict[str, Any] = field(default_factory=dict)


#: Shortest transport header per IP protocol number (0: not looked at here).
_L4_MIN = [0] * 256
_L4_MIN[PROTO_TCP] = 20
_L4_MIN[PROTO_UDP] = 8
_L4_MIN[PROTO_ICMP] = 8


def _l4_offset(buf: Buffer, n: int) -> int:
    """Where the transport header starts, or minus the drop counter that applies.

    An unfragmented IPv4 packet whose header and transport header fit in
    ``n`` bytes gives its header length; anything else is malformed or a
    fragment (this gateway translates neither).
    """
    if n < 28 or buf[0] >> 4 != 4:
        return -D_MALFORMED
    ihl = (buf[0] & 15) << 2
    if ihl < 20 or n < ihl + _L4_MIN[buf[9]]:
        return -D_MALFORMED
    if buf[6] & 0x3F or buf[7]:
        return -D_FRAGMENT
    return ihl


class TranslationTable:
    """All flows of one gateway and the policy that creates them."""

    def __init__(self, model: GatewayModel, now: float) -> None:
        self.model = model
        self.timeouts = model.timeouts
        self.addresses: dict[int, PublicAddress] = {}
        self.backends: dict[int, Backend] = {}
        self.defaults: list[PublicAddress] = []
        self.pool_frontend: dict[str, str] = {}
        self.wheel = TimerWheel(now)
        self.counters = [0] * len(COUNTER_NAMES)
        self.events: list[Event] = []
        self.tier_changes = 0
        #: Standalone backends whose last flow ended, and the earliest time one may go.
        self._vacant: dict[int, Backend] = {}
        self._vacant_due = float("inf")
        self.inbound: dict[int, dict[bytes, Flow]] = {PROTO_TCP: {}, PROTO_UDP: {}, PROTO_ICMP: {}}
        self.outbound: dict[int, dict[bytes, Flow]] = {PROTO_TCP: {}, PROTO_UDP: {}, PROTO_ICMP: {}}
        self._tcp_in = self.inbound[PROTO_TCP]
        self._udp_in = self.inbound[PROTO_UDP]
        self._tcp_out = self.outbound[PROTO_TCP]
        self._udp_out = self.outbound[PROTO_UDP]
        self.reconfigure(model, now)

    # ------------------------------------------------------------------ in2out

    def in2out(self, buf: Buffer, now: float) -> int:
        """Translate a packet from a backend toward the outside, in place."""
        n = len(buf)
        ihl = _l4_offset(buf, n)
        if ihl < 0:
            self.counters[-ihl] += 1
            return DROP
        proto = buf[9]
        if proto == PROTO_UDP:
            key = _KEY(buf, 12)[0] if ihl == 20 else bytes(buf[12:20]) + bytes(buf[ihl : ihl + 4])
            f = self._udp_in.get(key)
            if f is None:
                f = self._new_flow(buf, ihl, proto, key, now)
                if f is None:
                    return DROP
            _sp, dp, ln, c = _UDP.unpack_from(buf, ihl)
            if c:
                c -= f.d_l4
                if c <= 0:
                    c += 0xFFFF
            _UDP.pack_into(buf, ihl, f.pport, dp, ln, c)
        elif proto == PROTO_TCP:
            key = _KEY(buf, 12)[0] if ihl == 20 else bytes(buf[12:20]) + bytes(buf[ihl : ihl + 4])
            f = self._tcp_in.get(key)
            if f is None:
                f = self._new_flow(buf, ihl, proto, key, now)
                if f is None:
                    return DROP
            if buf[ihl + 13] & 7:
                self._tcp_flags(f, buf[ihl + 13], True, now)
            _H.pack_into(buf, ihl, f.pport)
            c = (buf[ihl + 16] << 8 | buf[ihl + 17]) - f.d_l4
            if c < 0:
                c += 0xFFFF
            _H.pack_into(buf, ihl + 16, c)
        elif proto == PROTO_ICMP:
            return self._icmp_in2out(buf, ihl, n, now)
        else:
            self.counters[D_UNSUPPORTED] += 1
            return DROP
        c = (buf[10] << 8 | buf[11]) - f.d_ip
        if c < 0:
            c += 0xFFFF
        _HI.pack_into(buf, 10, c, f.public_b)
        f.last_seen = now
        f.pkts_out += 1
        f.bytes_out += n
        self.counters[C_IN2OUT] += 1
        return ACCEPT_MODIFIED

    # ------------------------------------------------------------------ out2in

    def out2in(self, buf: Buffer, now: float) -> int:
        """Translate a return packet to its backend, in place; drop it unless it
        comes from the exact remote endpoint of a live flow (or is an ICMP
        error about one)."""
        n = len(buf)
        ihl = _l4_offset(buf, n)
        if ihl < 0:
            self.counters[-ihl] += 1
            return DROP
        proto = buf[9]
        if proto == PROTO_UDP:
            key = _KEY(buf, 12)[0] if ihl == 20 else bytes(buf[12:20]) + bytes(buf[ihl : ihl + 4])
            f = self._udp_out.get(key)
            if f is None:
                self.counters[D_NO_FLOW] += 1
                return DROP
            sp, _dp, ln, c = _UDP.unpack_from(buf, ihl)
            if c:
                c -= f.r_l4
                if c <= 0:
                    c += 0xFFFF
            _UDP.pack_into(buf, ihl, sp, f.bport, ln, c)
        elif proto == PROTO_TCP:
            key = _KEY(buf, 12)[0] if ihl == 20 else bytes(buf[12:20]) + bytes(buf[ihl : ihl + 4])
            f = self._tcp_out.get(key)
            if f is None:
                self.counters[D_NO_FLOW] += 1
                return DROP
            if buf[ihl + 13] & 7:
                self._tcp_flags(f, buf[ihl + 13], False, now)
            _H.pack_into(buf, ihl + 2, f.bport)
            c = (buf[ihl + 16] << 8 | buf[ihl + 17]) - f.r_l4
            if c < 0:
                c += 0xFFFF
            _H.pack_into(buf, ihl + 16, c)
        elif proto == PROTO_ICMP:
            return self._icmp_out2in(buf, ihl, n, now)
        else:
            self.counters[D_NO_FLOW] += 1
            return DROP
        c = (buf[10] << 8 | buf[11]) - f.r_ip
        if c < 0:
            c += 0xFFFF
        _H.pack_into(buf, 10, c)
        buf[16:20] = f.backend_b
        f.last_seen = now
        f.pkts_in += 1
        f.bytes_in += n
        self.counters[C_OUT2IN] += 1
        return ACCEPT_MODIFIED_MARK

    # ------------------------------------------------------------------ ICMP

    def _icmp_in2out(self, buf: Buffer, ihl: int, n: int, now: float) -> int:
        typ = buf[ihl]
        if typ == _ICMP_ECHO_REQUEST:
            key = bytes(buf[12:20]) + bytes(buf[ihl + 4 : ihl + 6]) + _ZERO2
            f = self.inbound[PROTO_ICMP].get(key)
            if f is None:
                f = self._new_flow(buf, ihl, PROTO_ICMP, key, now)
                if f is None:
                    return DROP
            f.last_seen = now
            f.pkts_out += 1
            f.bytes_out += n
            _HI.pack_into(buf, 10, apply(buf[10] << 8 | buf[11], f.d_ip), f.public_b)
            buf[ihl + 4 : ihl + 6] = f.pport_b
            _H.pack_into(buf, ihl + 2, apply(buf[ihl + 2] << 8 | buf[ihl + 3], f.d_l4))
            self.counters[C_IN2OUT] += 1
            return ACCEPT_MODIFIED
        if typ in _ICMP_ERRORS:
            return self._icmp_error(buf, ihl, n, inbound=True)
        self.counters[D_UNSUPPORTED] += 1
        return DROP

    def _icmp_out2in(self, buf: Buffer, ihl: int, n: int, now: float) -> int:
        typ = buf[ihl]
        if typ == _ICMP_ECHO_REPLY:
            key = bytes(buf[12:20]) + _ZERO2 + bytes(buf[ihl + 4 : ihl + 6])
            f = self.outbound[PROTO_ICMP].get(key)
            if f is None:
                self.counters[D_NO_FLOW] += 1
                return DROP
            f.last_seen = now
            f.pkts_in += 1
            f.bytes_in += n
            _H.pack_into(buf, 10, apply(buf[10] << 8 | buf[11], f.r_ip))
            buf[16:20] = f.backend_b
            buf[ihl + 4 : ihl + 6] = f.bport_b
            _H.pack_into(buf, ihl + 2, apply(buf[ihl + 2] << 8 | buf[ihl + 3], f.r_l4))
            self.counters[C_OUT2IN] += 1
            return ACCEPT_MODIFIED_MARK
        if typ in _ICMP_ERRORS:
            return self._icmp_error(buf, ihl, n, inbound=False)
        self.counters[D_NO_FLOW] += 1
        return DROP

    def _icmp_error(self, buf: Buffer, ihl: int, n: int, inbound: bool) -> int:
        """Translate an ICMP error about a live flow, embedded header included
        (RFC 5508 section 7; RFC 1812 section 4.3.2.3 on what is quoted).

        From the outside the error quotes our translated outbound packet
        (public -> remote); from the inside a backend's error quotes a
        translated return packet (remote -> backend). Either way the quoted
        header names the flow; the outer address, the quoted address and
        port and every checksum are rewritten, and the ICMP checksum, which
        covers the quote, is recomputed.
        """
        i = ihl + 8
        if n < i + 20 or buf[i] >> 4 != 4:
            self.counters[D_MALFORMED] += 1
            return DROP
        iihl = (buf[i] & 15) << 2
        l4 = i + iihl
        if iihl < 20 or n < l4 + 8:
            self.counters[D_MALFORMED] += 1
            return DROP
        iproto = buf[i + 9]
        if iproto in (PROTO_TCP, PROTO_UDP):
            ports = bytes(buf[l4 + 2 : l4 + 4]) + bytes(buf[l4 : l4 + 2])
            port_at = l4 + 2 if inbound else l4
        elif iproto == PROTO_ICMP and buf[l4] in (_ICMP_ECHO_REQUEST, _ICMP_ECHO_REPLY):
            ident = bytes(buf[l4 + 4 : l4 + 6])
            ports = ident + _ZERO2 if inbound else _ZERO2 + ident
            port_at = l4 + 4
        else:
            self.counters[D_UNSUPPORTED] += 1
            return DROP
        flows = self.inbound[iproto] if inbound else self.outbound[iproto]
        f = flows.get(bytes(buf[i + 16 : i + 20]) + bytes(buf[i + 12 : i + 16]) + ports)
        if f is None:
            self.counters[D_NO_FLOW] += 1
            return DROP
        if inbound:
            if bytes(buf[12:16]) != f.backend_b:
                self.counters[D_NO_FLOW] += 1
                return DROP
            d_ip, d_l4 = f.d_ip, f.d_l4
            _HI.pack_into(buf, 10, apply(buf[10] << 8 | buf[11], d_ip), f.public_b)
            _H.pack_into(buf, i + 10, apply(buf[i + 10] << 8 | buf[i + 11], d_ip))
            buf[i + 16 : i + 20] = f.public_b
            buf[port_at : port_at + 2] = f.pport_b
        else:
            if bytes(buf[16:20]) != f.public_b:
                self.counters[D_NO_FLOW] += 1
                return DROP
            d_ip, d_l4 = f.r_ip, f.r_l4
            _H.pack_into(buf, 10, apply(buf[10] << 8 | buf[11], d_ip))
            buf[16:20] = f.backend_b
            _H.pack_into(buf, i + 10, apply(buf[i + 10] << 8 | buf[i + 11], d_ip))
            buf[i + 12 : i + 16] = f.backend_b
            buf[port_at : port_at + 2] = f.bport_b
        if iproto == PROTO_UDP:
            ic = l4 + 6
            if buf[ic] or buf[ic + 1]:
                c = apply(buf[ic] << 8 | buf[ic + 1], d_l4)
                _H.pack_into(buf, ic, c or 0xFFFF)
        elif iproto == PROTO_TCP:
            ic = l4 + 16
            if n >= ic + 2:
                _H.pack_into(buf, ic, apply(buf[ic] << 8 | buf[ic + 1], d_l4))
        else:
            ic = l4 + 2
            _H.pack_into(buf, ic, apply(buf[ic] << 8 | buf[ic + 1], d_l4))
        buf[ihl + 2] = 0
        buf[ihl + 3] = 0
        _H.pack_into(buf, ihl + 2, checksum(memoryview(buf)[ihl:n]))
        if inbound:
            self.counters[C_ICMP_ERR_IN2OUT] += 1
            return ACCEPT_MODIFIED
        self.counters[C_ICMP_ERR_OUT2IN] += 1
        return ACCEPT_MODIFIED_MARK

    # ------------------------------------------------------------------ flows

    def _new_flow(self, buf: Buffer, ihl: int, proto: int, key: bytes, now: float) -> Flow | None:
        """Create the flow for a first outbound packet (scenario policy, port
        allocation); None (counted) when there is no address or no port."""
        src = int.from_bytes(buf[12:16], "big")
        be = self.backends.get(src)
        if be is None:
            be = self._add_standalone(src, now)
            if be is None:
                self.counters[D_NO_ADDRESS] += 1
                return None
        backend_b = bytes(buf[12:16])
        remote_b = bytes(buf[16:20])
        if proto == PROTO_ICMP:
            bport_b = bytes(buf[ihl + 4 : ihl + 6])
            rport_b = _ZERO2
        else:
            bport_b = bytes(buf[ihl : ihl + 2])
            rport_b = bytes(buf[ihl + 2 : ihl + 4])
        public_b = be.address.ip.to_bytes(4, "big")
        outbound = self.outbound[proto]
        block = be.block
        dest = remote_b + rport_b
        prefix = remote_b + public_b + rport_b
        if block is None:
            pport_b = bport_b
            if prefix + pport_b in outbound:
                self._exhausted(be, proto, remote_b, rport_b, now)
                return None
        else:
            port = block.allocate(proto, outbound, prefix, dest)
            if port < 0:
                self._exhausted(be, proto, remote_b, rport_b, now)
                return None
            pport_b = PORT_BYTES[port]
            inv = block.inventories[proto]
            if inv.high_armed and inv.in_use >= self.model.high_water * inv.size:
                self._high_water(be, proto, inv.in_use, inv.size)
                inv.high_armed = False
        out_key = prefix + pport_b
        d_ip = delta(backend_b, public_b)
        if proto == PROTO_ICMP:
            d_l4 = delta(bport_b, pport_b)
            r_l4 = delta(pport_b, bport_b)
        else:
            d_l4 = delta(backend_b + bport_b, public_b + pport_b)
            r_l4 = delta(public_b + pport_b, backend_b + bport_b)
        f = Flow(
            proto=proto,
            scenario=be.scenario,
            backend=src,
            bport=int.from_bytes(bport_b, "big"),
            public=be.address.ip,
            pport=int.from_bytes(pport_b, "big"),
            remote=int.from_bytes(remote_b, "big"),
            rport=int.from_bytes(rport_b, "big"),
            in_key=key,
            out_key=out_key,
            dest=dest,
            block=block,
            public_b=public_b,
            pport_b=pport_b,
            backend_b=backend_b,
            bport_b=bport_b,
            d_ip=d_ip,
            d_l4=d_l4,
            r_ip=delta(public_b, backend_b),
            r_l4=r_l4,
            created=now,
            last_seen=now,
            timeout=self.timeouts.idle,
        )
        if proto == PROTO_TCP:
            flags = buf[ihl + 13]
            f.state = TCP_SYN_SENT if flags & (TCP_SYN | TCP_ACK) == TCP_SYN else TCP_ESTABLISHED
        self._add_flow(f, be)
        return f

    def _add_flow(self, f: Flow, be: Backend) -> None:
        """Insert both keys of ``f`` and arm its timer: the only way a flow starts."""
        self.inbound[f.proto][f.in_key] = f
        self.outbound[f.proto][f.out_key] = f
        be.flows.add(f)
        be.created += 1
        self.wheel.schedule(f, f.last_seen + f.timeout)
        self.counters[C_FLOWS_CREATED] += 1

    def end_flow(self, f: Flow, reason: str) -> None:
        """Remove both keys of ``f``, free its port and cancel its timer: the only
        way a flow ends."""
        if self.inbound[f.proto].get(f.in_key) is not f:
            return
        del self.inbound[f.proto][f.in_key]
        del self.outbound[f.proto][f.out_key]
        self.wheel.cancel(f)
        block = f.block
        if block is not None:
            block.release(f.proto, f.pport, f.dest)
            inv = block.inventories[f.proto]
            if not inv.high_armed and inv.in_use < (self.model.high_water - HIGH_WATER_HYSTERESIS) * inv.size:
                inv.high_armed = True
        be = self.backends.get(f.backend)
        if be is not None:
            be.flows.discard(f)
            if not be.flows and be.scenario == SCENARIO_DEFAULT:
                be.vacant_since = f.last_seen
                self._vacant[be.ip] = be
                self._vacant_due = min(self._vacant_due, f.last_seen + self.timeouts.idle)
        self.counters[_END_COUNTER[reason]] += 1

    def _tcp_flags(self, f: Flow, flags: int, outbound: bool, now: float) -> None:
        state, fins = tcp_next_state(f.state, f.fins, flags, outbound)
        f.fins = fins
        if state == f.state:
            return
        f.state = state
        f.timeout = timeout_for(state, self.timeouts)
        self.wheel.schedule(f, now + f.timeout)

    def _exhausted(self, be: Backend, proto: int, remote_b: bytes, rport_b: bytes, now: float) -> None:
        """Count a failed flow and emit a rate-limited ``snat_port_exhausted`` event."""
        self.counters[D_EXHAUSTED] += 1
        be.exhausted += 1
        be.last_exhausted = now
        if now - be.last_event < self.model.exhaustion_event_interval:
            be.suppressed += 1
            return
        self.events.append(
            Event(
                "snat_port_exhausted",
                {
                    "backend": ip_str(be.ip),
                    "public_ip": ip_str(be.address.ip),
                    "protocol": PROTO_NAMES.get(proto, str(proto)),
                    "destination": f"{ip_str(int.from_bytes(remote_b, 'big'))}:"
                    f"{int.from_bytes(rport_b, 'big')}",
                    "block_size": be.block.size if be.block is not None else 0,
                    "suppressed": be.suppressed,
                },
            )
        )
        be.last_event = now
        be.suppressed = 0

    def _high_water(self, be: Backend, proto: int, in_use: int, size: int) -> None:
        self.events.append(
            Event(
                "snat_ports_high_water",
                {
                    "backend": ip_str(be.ip),
                    "public_ip": ip_str(be.address.ip),
                    "protocol": PROTO_NAMES.get(proto, str(proto)),
                    "ports_in_use": in_use,
                    "block_size": size,
                    "threshold": self.model.high_water,
                },
            )
        )

    # ------------------------------------------------------------------ scenario 3

    def _add_standalone(self, src: int, now: float) -> Backend | None:
        """Give a backend seen for the first time a default SNAT address and a block.

        The address's tier counts the standalone backends assigned to it; when
        this one pushes it into a higher tier every block on it halves first
        (OUTBOUND_MODEL.md, "Resizing").
        """
        addr = pick_default(self.defaults)
        if addr is None or addr.layout is None:
            return None
        self._resize(addr, addr.size_for(len(addr.members) + 1), len(addr.members) + 1)
        chunks = addr.layout.take(addr.layout.size >> CHUNK_SHIFT)
        if chunks is None:
            return None
        be = Backend(src, SCENARIO_DEFAULT, addr, PortBlock(addr.ip, chunks))
        addr.members[src] = be
        self.backends[src] = be
        return be

    # ------------------------------------------------------------------ configuration

    def reconfigure(self, model: GatewayModel, now: float) -> dict[str, int]:
        """Apply a (new) configuration, keeping every flow it does not affect.

        Raises :class:`~gateway.core.errors.ModelError` before changing
        anything when the model is not valid. Otherwise, in this order
        (OUTBOUND_MODEL.md, "Resizing"): public addresses that go end all
        their flows; backends that leave or change scenario or address end
        theirs; each PAT address moves to the tier of its new member count
        (a higher tier halves every block there and ends the flows on the
        reclaimed ports, a lower one grows the blocks and ends nothing); new
        backends get blocks. Returns counts for the ``config_reloaded`` event.
        """
        p = plan(model)
        before = self._ended_total()
        summary = dict.fromkeys(
            ("addresses_added", "addresses_removed", "backends_added", "backends_removed", "tier_changes"), 0
        )
        for ip, addr in list(self.addresses.items()):
            ap = p.addresses.get(ip)
            if ap is None or ap.kind != addr.kind:
                summary["backends_removed"] += self._remove_address(addr)
                summary["addresses_removed"] += 1
            else:
                addr.name = ap.name
        gone: dict[int, list[Backend]] = {}
        for bip, be in self.backends.items():
            pl = p.placements.get(bip)
            if be.scenario == SCENARIO_DEFAULT:
                stale = pl is not None
            else:
                stale = pl is None or pl.scenario != be.scenario or pl.public_ip != be.address.ip
            if stale:
                gone.setdefault(be.address.ip, []).append(be)
            elif pl is not None:
                be.pool = pl.pool
        for ip, bes in gone.items():
            self._drop_backends(self.addresses[ip], bes, "backend_removed")
            summary["backends_removed"] += len(bes)
        for ip, ap in p.addresses.items():
            if ip not in self.addresses:
                if ap.kind == KIND_INSTANCE_IP:
                    self.addresses[ip] = PublicAddress(ip, ap.kind)
                else:
                    n = len(p.members(ip))
                    self.addresses[ip] = new_pat_address(ip, ap.kind, ap.name, ap.excluded, n)
                summary["addresses_added"] += 1
        for ip, addr in self.addresses.items():
            if addr.layout is None:
                continue
            ap = p.addresses[ip]
            if ap.excluded != addr.layout.excluded:
                self._exclude(addr, ap.excluded)
            count = len(p.members(ip)) if addr.kind == KIND_FRONTEND else len(addr.members)
            if self._resize(addr, ports_per_backend(count), count):
                summary["tier_changes"] += 1
        for bip in sorted(p.placements):
            if bip in self.backends:
                continue
            pl = p.placements[bip]
            addr = self.addresses[pl.public_ip]
            block = None
            if pl.scenario != SCENARIO_INSTANCE_IP and addr.layout is not None:
                chunks = addr.layout.take(addr.layout.size >> CHUNK_SHIFT) or []
                block = PortBlock(addr.ip, chunks)
            be = Backend(bip, pl.scenario, addr, block, pl.pool)
            addr.members[bip] = be
            self.backends[bip] = be
            summary["backends_added"] += 1
        self.defaults = [self.addresses[ip] for ip in p.defaults]
        self.pool_frontend = p.pool_frontend
        if model.timeouts != self.timeouts:
            for d in self.inbound.values():
                for f in d.values():
                    f.timeout = timeout_for(f.state, model.timeouts)
                    self.wheel.schedule(f, f.last_seen + f.timeout)
        self.model = model
        self.timeouts = model.timeouts
        summary["flows_ended"] = self._ended_total() - before
        return summary

    def _ended_total(self) -> int:
        return sum(self.counters[c] for c in _END_COUNTER.values())

    def _remove_backend(self, be: Backend) -> int:
        """End every flow of ``be`` and give its block back; returns how many flows ended."""
        ended = len(be.flows)
        for f in list(be.flows):
            self.end_flow(f, END_REMOVED)
        addr = be.address
        if be.block is not None and addr.layout is not None:
            addr.layout.give(be.block.chunks)
        addr.members.pop(be.ip, None)
        self.backends.pop(be.ip, None)
        return ended

    def _drop_backends(self, addr: PublicAddress, backends: list[Backend], reason: str) -> None:
        """Remove ``backends`` of ``addr`` (their flows end, their blocks go back) and
        say so in one ``ports_reclaimed`` event."""
        flows = ports = 0
        for be in backends:
            ports += be.block.size if be.block is not None else 0
            flows += self._remove_backend(be)
        self._reclaimed(addr, reason, flows, ports, len(backends))

    def _remove_address(self, addr: PublicAddress) -> int:
        """End every flow through ``addr`` and forget it; returns how many backends it had."""
        backends = list(addr.members.values())
        self._drop_backends(addr, backends, "address_removed")
        del self.addresses[addr.ip]
        return len(backends)

    def _reclaimed(self, addr: PublicAddress, reason: str, flows: int, ports: int, backends: int) -> None:
        self.events.append(
            Event(
                "ports_reclaimed",
                {
                    "public_ip": ip_str(addr.ip),
                    "name": addr.name,
                    "reason": reason,
                    "backends": backends,
                    "ports": ports,
                    "flows_ended": flows,
                },
            )
        )

    def _end_on_chunks(self, be: Backend, chunks: set[int]) -> int:
        """End ``be``'s flows on ports of ``chunks`` (reclaimed); returns how many."""
        block = be.block
        doomed = [f for f in be.flows if f.block is block and f.pport >> CHUNK_SHIFT in chunks]
        for f in doomed:
            self.end_flow(f, END_RECLAIMED)
        return len(doomed)

    def _resize(self, addr: PublicAddress, size: int, backends: int) -> bool:
        """Move ``addr`` to the tier whose block size is ``size``; False if it is there.

        Smaller blocks keep their first chunks and the flows there; larger
        ones append chunks, next to the block when they are free.
        """
        layout = addr.layout
        assert layout is not None
        old = layout.size
        if size == old:
            return False
        layout.size = size
        self.tier_changes += 1
        want = size >> CHUNK_SHIFT
        flows = ports = 0
        members = sorted(addr.members.values(), key=lambda b: b.ip)
        for be in members:
            block = be.block
            if block is None:
                continue
            if len(block.chunks) > want:
                leaving = block.chunks[want:]
                flows += self._end_on_chunks(be, set(leaving))
                block.retile(block.chunks[:want])
                layout.give(leaving)
                ports += len(leaving) << CHUNK_SHIFT
            elif len(block.chunks) < want:
                extra = layout.take(want - len(block.chunks), block.chunks[-1] if block.chunks else -1)
                if extra is not None:
                    block.retile(block.chunks + extra)
        self.events.append(
            Event(
                "pool_tier_changed",
                {
                    "public_ip": ip_str(addr.ip),
                    "name": addr.name,
                    "kind": addr.kind,
                    "backends": backends,
                    "old_block_size": old,
                    "new_block_size": size,
                    "tier": addr.tier,
                },
            )
        )
        if size < old:
            self._reclaimed(addr, "tier_change", flows, ports, len(members))
        return True

    def _exclude(self, addr: PublicAddress, excluded: frozenset[int]) -> None:
        """New excluded ports (an LB rule's frontend port) take their chunk out of
        any block holding it; the block gets a free chunk in its place."""
        layout = addr.layout
        assert layout is not None
        newly = layout.set_excluded(excluded)
        flows = ports = backends = 0
        for be in addr.members.values():
            block = be.block
            hit = newly & set(block.chunks) if block is not None else set()
            if block is None or not hit:
                continue
            backends += 1
            flows += self._end_on_chunks(be, hit)
            ports += len(hit) << CHUNK_SHIFT
            kept = [c for c in block.chunks if c not in hit]
            block.retile(kept + (layout.take(len(hit)) or []))
        if ports:
            self._reclaimed(addr, "port_excluded", flows, ports, backends)

    # ------------------------------------------------------------------ timers

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` next needs to run (None: nothing pending)."""
        due = self.wheel.next_deadline()
        if self._vacant:
            return self._vacant_due if due is None else min(due, self._vacant_due)
        return due

    def handle_timer(self, now: float) -> None:
        """End flows idle past their timeout; re-arm the ones that saw traffic;
        release standalone backends that have had no flow for the idle timeout."""
        for f in self.wheel.advance(now):
            deadline = f.last_seen + f.timeout
            if deadline > now:
                self.wheel.schedule(f, deadline)
            else:
                self.end_flow(f, END_CLOSED if f.state in (TCP_CLOSED, TCP_RESET) else END_IDLE)
        if now >= self._vacant_due:
            self._release_vacant(now)

    def _release_vacant(self, now: float) -> None:
        """Give the blocks of long-silent standalone backends back to their default
        address, which may then fall to a lower tier and grow every other block
        (OUTBOUND_MODEL.md, "Resizing": a shrinking pool ends no flow).

        A backend that speaks again later is placed afresh, like a new one.
        """
        idle = self.timeouts.idle
        released: dict[int, list[Backend]] = {}
        due = float("inf")
        for ip, be in list(self._vacant.items()):
            since = be.vacant_since
            if be.flows or since is None or self.backends.get(ip) is not be:
                del self._vacant[ip]
                be.vacant_since = None
            elif since + idle <= now:
                del self._vacant[ip]
                released.setdefault(be.address.ip, []).append(be)
            else:
                due = min(due, since + idle)
        self._vacant_due = due
        for ip, bes in released.items():
            addr = self.addresses[ip]
            self._drop_backends(addr, bes, "backend_idle")
            if addr.layout is not None:
                count = len(addr.members)
                self._resize(addr, ports_per_backend(count), count)

    # ------------------------------------------------------------------ views

    def counters_dict(self) -> dict[str, int]:
        return dict(zip(COUNTER_NAMES, self.counters, strict=True))

    def flow_count(self) -> int:
        return sum(len(d) for d in self.inbound.values())

    def count_internal_error(self) -> None:
        """For adapters: a packet dropped because the core raised (a bug, never input)."""
        self.counters[D_INTERNAL] += 1


__all__ = [
    "ACCEPT",
    "ACCEPT_MODIFIED",
    "ACCEPT_MODIFIED_MARK",
    "COUNTER_NAMES",
    "DROP",
    "Event",
    "TranslationTable",
]
