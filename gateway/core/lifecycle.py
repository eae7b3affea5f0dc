"""A flow's life: created with both keys, moved through the TCP states, refreshed,
expired and ended (docs/model.md, "PAT", "Exhaustion" and "Idle timeout").

:meth:`FlowLifecycle._add_flow` is the only way a flow starts and
:meth:`FlowLifecycle.end_flow` the only way one ends: each adds or removes both
keys, the port and the timer together (VPP NAT44-ED's rule that a session
owns both of its keys). Refreshing is one store of ``last_seen`` on the
per-packet path; the timer wheel compares it when the flow's deadline comes
round, so a busy flow costs one re-arm per timeout period.
"""

from __future__ import annotations

from gateway.core.address import Backend, Scenario, ip_str
from gateway.core.block import PORT_BYTES
from gateway.core.checksum import delta
from gateway.core.counters import END_COUNTER, Counter
from gateway.core.events import SnatPortExhausted, SnatPortsHighWater
from gateway.core.flow import EndReason, Flow, TcpState, first_state, tcp_next_state, timeout_for
from gateway.core.model import PROTO_ICMP, PROTO_NAMES, PROTO_TCP
from gateway.core.state import Buffer, TableState

#: Re-arm ``snat_ports_high_water`` once use falls this share of the block below the mark.
HIGH_WATER_HYSTERESIS = 0.1
_ZERO2 = b"\0\0"


class FlowLifecycle(TableState):
    """Starting, ending and expiring flows."""

    def _create_flow(
        self, buf: Buffer, ihl: int, proto: int, key: bytes, be: Backend, now: float
    ) -> Flow | None:
        """The flow for ``be``'s first packet toward a destination: a port from its
        block (endpoint-dependent, docs/model.md "PAT") or, for an instance IP,
        its own port; None (counted, with an event) when no port is free."""
        backend_b = bytes(buf[12:16])
        remote_b = bytes(buf[16:20])
        if proto == PROTO_ICMP:
            backend_port_b = bytes(buf[ihl + 4 : ihl + 6])
            remote_port_b = _ZERO2
        else:
            backend_port_b = bytes(buf[ihl : ihl + 2])
            remote_port_b = bytes(buf[ihl + 2 : ihl + 4])
        public_b = be.address.ip.to_bytes(4, "big")
        outside = self.outside[proto]
        block = be.block
        dest = remote_b + remote_port_b
        prefix = remote_b + public_b + remote_port_b
        if block is None:
            public_port_b = backend_port_b
            if prefix + public_port_b in outside:
                self._exhausted(be, proto, dest, now)
                return None
        else:
            port = block.allocate(proto, outside, prefix, dest)
            if port < 0:
                self._exhausted(be, proto, dest, now)
                return None
            public_port_b = PORT_BYTES[port]
            inv = block.inventories[proto]
            if inv.high_armed and inv.in_use >= self.model.high_water * inv.size:
                self._high_water(be, proto, inv.in_use, inv.size)
                inv.high_armed = False
        if proto == PROTO_ICMP:
            in2out_l4 = delta(backend_port_b, public_port_b)
            out2in_l4 = delta(public_port_b, backend_port_b)
        else:
            in2out_l4 = delta(backend_b + backend_port_b, public_b + public_port_b)
            out2in_l4 = delta(public_b + public_port_b, backend_b + backend_port_b)
        f = Flow(
            proto=proto,
            scenario=be.scenario,
            backend=be.ip,
            backend_port=int.from_bytes(backend_port_b, "big"),
            public=be.address.ip,
            public_port=int.from_bytes(public_port_b, "big"),
            remote=int.from_bytes(remote_b, "big"),
            remote_port=int.from_bytes(remote_port_b, "big"),
            inside_key=key,
            outside_key=prefix + public_port_b,
            dest=dest,
            block=block,
            public_b=public_b,
            public_port_b=public_port_b,
            backend_b=backend_b,
            backend_port_b=backend_port_b,
            in2out_ip=delta(backend_b, public_b),
            in2out_l4=in2out_l4,
            out2in_ip=delta(public_b, backend_b),
            out2in_l4=out2in_l4,
            created=now,
            last_seen=now,
            timeout=self.timeouts.idle,
        )
        if proto == PROTO_TCP:
            f.state = first_state(buf[ihl + 13])
        self._add_flow(f, be)
        return f

    def _add_flow(self, f: Flow, be: Backend) -> None:
        """Insert both keys of ``f`` and arm its timer: the only way a flow starts."""
        self.inside[f.proto][f.inside_key] = f
        self.outside[f.proto][f.outside_key] = f
        be.flows.add(f)
        be.created += 1
        self.wheel.schedule(f, f.last_seen + f.timeout)
        self.counters[Counter.FLOWS_CREATED] += 1

    def end_flow(self, f: Flow, reason: EndReason) -> None:
        """Remove both keys of ``f``, free its port and cancel its timer: the only
        way a flow ends. A standalone backend left without flows starts its
        vacancy clock (docs/model.md, "Resizing")."""
        if self.inside[f.proto].get(f.inside_key) is not f:
            return
        del self.inside[f.proto][f.inside_key]
        del self.outside[f.proto][f.outside_key]
        self.wheel.cancel(f)
        block = f.block
        if block is not None:
            block.release(f.proto, f.public_port, f.dest)
            inv = block.inventories[f.proto]
            if not inv.high_armed and inv.in_use < (self.model.high_water - HIGH_WATER_HYSTERESIS) * inv.size:
                inv.high_armed = True
        be = self.backends.get(f.backend)
        if be is not None:
            be.flows.discard(f)
            if not be.flows and be.scenario == Scenario.DEFAULT:
                be.vacant_since = f.last_seen
                self._vacant[be.ip] = be
                self._vacant_due = min(self._vacant_due, f.last_seen + self.timeouts.idle)
        self.counters[END_COUNTER[reason]] += 1

    def _tcp_flags(self, f: Flow, flags: int, in2out: bool, now: float) -> None:
        """Apply a FIN, SYN or RST to ``f``'s state (the rules: :func:`tcp_next_state`)."""
        state, fins = tcp_next_state(f.state, f.fins, flags, in2out)
        f.fins = fins
        if state == f.state:
            return
        f.state = state
        f.timeout = timeout_for(state, self.timeouts)
        self.wheel.schedule(f, now + f.timeout)

    def _expire(self, now: float) -> None:
        """End flows idle past their timeout; re-arm the ones that saw traffic."""
        for f in self.wheel.advance(now):
            deadline = f.last_seen + f.timeout
            if deadline > now:
                self.wheel.schedule(f, deadline)
            elif f.state in (TcpState.CLOSED, TcpState.RESET):
                self.end_flow(f, EndReason.CLOSED)
            else:
                self.end_flow(f, EndReason.IDLE)

    def _exhausted(self, be: Backend, proto: int, dest: bytes, now: float) -> None:
        """Count a failed flow and emit a rate-limited ``snat_port_exhausted`` event."""
        self.counters[Counter.DROP_EXHAUSTED] += 1
        be.exhausted += 1
        be.last_exhausted = now
        if now - be.last_event < self.model.exhaustion_event_interval:
            be.suppressed += 1
            return
        self.events.append(
            SnatPortExhausted(
                backend=ip_str(be.ip),
                public_ip=ip_str(be.address.ip),
                protocol=PROTO_NAMES.get(proto, str(proto)),
                destination=f"{ip_str(int.from_bytes(dest[:4], 'big'))}:{int.from_bytes(dest[4:], 'big')}",
                block_size=be.block.size if be.block is not None else 0,
                suppressed=be.suppressed,
            )
        )
        be.last_event = now
        be.suppressed = 0

    def _high_water(self, be: Backend, proto: int, in_use: int, size: int) -> None:
        self.events.append(
            SnatPortsHighWater(
                backend=ip_str(be.ip),
                public_ip=ip_str(be.address.ip),
                protocol=PROTO_NAMES.get(proto, str(proto)),
                ports_in_use=in_use,
                block_size=size,
                threshold=self.model.high_water,
            )
        )
