"""A flow's life: created with both keys, moved through the TCP states, refreshed,
expired and ended (docs/model.md, "PAT", "Exhaustion" and "Idle timeout").

:meth:`FlowLifecycle._add_flow` is the only way a flow starts and
:meth:`FlowLifecycle.end_flow` the only way one ends: each adds or removes both
keys, the port and the timer together (VPP NAT44-ED's rule that a session
owns both of its keys). Refreshing is one store of ``last_seen`` on the
per-packet path; the timer wheel compares it when the flow's deadline comes
round, so a busy flow costs one re-arm per timeout period.

Flow caps (RFC 6888 REQ-5, docs/decisions.md "Flow caps") are checked here,
once per new flow: at a cap the oldest flow of the backend that never saw a
reply is ended to make room (Linux conntrack's early drop), else the new
flow is refused. TCP FIN and RST from the outside are checked against the
backend's receive window first (:func:`~gateway.core.flow.in_window`).
"""

from __future__ import annotations

from gateway.core.address import Backend, Scenario, ip_str
from gateway.core.block import PORT_BYTES
from gateway.core.counters import END_COUNTER, Counter
from gateway.core.events import FlowLimitReached, SnatPortExhausted, SnatPortsHighWater
from gateway.core.flow import (
    INBOUND_BIT,
    INT16,
    LIVE_BIT,
    MAX_WSCALE,
    PROTO_OF,
    TCP_TRACK,
    UNKNOWN,
    EndReason,
    Flow,
    TcpState,
    first_state,
    in_window,
    new_flow,
    syn_wscale,
    tcp_next_state,
    timeout_for,
)
from gateway.core.model import PROTO_NAMES, PROTO_TCP
from gateway.core.security import Decision
from gateway.core.state import Buffer, TableState
from gateway.core.tcp import (
    F_ACK,
    F_FIN,
    F_RST,
    F_SYN,
    S_ACTIVE,
    S_SYN_RECEIVED,
    S_SYN_SENT,
)

#: Re-arm ``snat_ports_high_water`` once use falls this share of the block below the mark.
HIGH_WATER_HYSTERESIS = 0.1
_C_FLOWS_CREATED = Counter.FLOWS_CREATED.value
_CLOSED, _IDLE = EndReason.CLOSED, EndReason.IDLE
_DEFAULT = Scenario.DEFAULT
#: At most one ``flow_limit_reached`` per backend per this many seconds.
FLOW_LIMIT_EVENT_INTERVAL = 60.0
#: Early drop looks at most this many of a backend's oldest flows not yet seen
#: replied (bounded work per new flow, as conntrack's early_drop scans a bounded
#: number of buckets).
EARLY_DROP_SCAN = 64
#: The backend holding the most flows is looked for at most once per this many
#: seconds while the table is at ``max_flows`` (a scan of every backend).
HOG_RESCAN = 1.0
_STATE_OPEN = (TcpState.SYN_SENT, TcpState.CLOSED, TcpState.RESET)
_STATE_ENDED = (TcpState.CLOSED, TcpState.RESET)


def _replied(f: Flow) -> bool:
    """Whether a flow saw a reply, so early drop never ends it (conntrack's "assured").
    A flow the backend opened: the remote answered. One opened from the outside:
    the backend answered and, for TCP, the remote spoke again after its SYN (its
    handshake ACK): a spoofed SYN flood that the backend answers with SYN-ACKs
    to nowhere stays droppable, as conntrack keeps SYN_RECV unassured."""
    if not f.inbound:
        return f.pkts_in > 0
    return f.pkts_out > 0 and (f.proto != PROTO_TCP or f.pkts_in > 1)


class FlowLifecycle(TableState):
    """Starting, ending and expiring flows."""

    def _create_flow(
        self, buf: Buffer, ihl: int, proto: int, key: bytes, be: Backend, now: float,
        decision: Decision | None = None,
    ) -> Flow | None:
        """The flow for ``be``'s first packet toward a destination: a port from its
        block (endpoint-dependent, docs/model.md "PAT") or, for an instance IP,
        its own port; None (counted, with an event) when no port is free or a
        flow cap refuses it. ``decision``: the security verdict that admitted it,
        kept on the flow."""
        model = self.model
        # Under both caps ``_admit`` is True: it is called only near one.
        cap = -(-model.max_flows // self.shard.count)
        if (be.flow_count >= model.max_flows_per_backend or self.flows_live >= cap) and not self._admit(
            be, proto, now
        ):
            return None
        # The inside key holds all four, as the wire writes them (an echo's identifier
        # as the source port, 0 as the destination's).
        backend_b, remote_b, backend_port_b, remote_port_b = key[:4], key[4:8], key[8:10], key[10:12]
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
            port = block.allocate(proto, outside, prefix, dest, self.rng if self.model.random_ports else None)
            if port < 0:
                self._exhausted(be, proto, dest, now)
                return None
            public_port_b = PORT_BYTES[port]
            inv = block.inventories[proto]
            if inv.high_armed and inv.in_use >= self.model.high_water * inv.size:
                self._high_water(be, proto, inv.in_use, inv.size)
                inv.high_armed = False
        f = new_flow(
            proto=proto,
            scenario=be.scenario,
            backend_b=backend_b,
            backend_port_b=backend_port_b,
            public_b=public_b,
            public_port_b=public_port_b,
            remote_b=remote_b,
            remote_port_b=remote_port_b,
            inside_key=key,
            outside_key=prefix + public_port_b,
            block=block,
            now=now,
            timeout=self.timeouts.idle,
            decision=decision,
            state=first_state(buf[ihl + 13]) if proto == PROTO_TCP else S_ACTIVE,
        )
        # A TCP flow learns the backend's window from this first packet in ``in2out``
        # right after (its only caller's next step), as from any later one.
        self._add_flow(f, be)
        return f

    def _add_flow(self, f: Flow, be: Backend) -> None:
        """Insert both keys of ``f`` and arm its timer: the only way a flow starts."""
        bits = f._bits  # the packed fields read at once (``proto``, ``inbound``, ``live``)
        proto = PROTO_OF[bits & 3]
        self.inside[proto][f.inside_key] = f
        self.outside[proto][f.outside_key] = f
        ips = self._ip_bytes
        f.backend_b = ips.setdefault(f.backend_b, f.backend_b)
        f.public_b = ips.setdefault(f.public_b, f.public_b)
        f._bits = INT16[bits | LIVE_BIT]
        be.flow_list.append(f)
        be.flow_count += 1
        self.flows_live += 1
        if not bits & INBOUND_BIT:
            be.created += 1
        self.wheel.schedule(f, f.last_seen + f.timeout)
        self.counters[_C_FLOWS_CREATED] += 1

    def end_flow(self, f: Flow, reason: EndReason, now: float | None = None) -> None:
        """Remove both keys of ``f``, free its port and cancel its timer: the only
        way a flow ends. A standalone backend left without flows starts its
        vacancy clock at ``now``, the moment the flow ended (docs/model.md,
        "Resizing"; without ``now``, the table's last timer tick or the flow's
        last packet, whichever is later)."""
        bits = f._bits  # ``live`` and ``proto`` read at once
        if not bits & LIVE_BIT:
            return
        if now is None:
            now = max(f.last_seen, self.wheel.current * self.wheel.tick)
        proto = PROTO_OF[bits & 3]
        f._bits = INT16[bits & ~LIVE_BIT]
        self.flows_live -= 1
        del self.inside[proto][f.inside_key]
        del self.outside[proto][f.outside_key]
        self.wheel.cancel(f)
        block = f.block
        if block is not None:
            block.release(proto, f.public_port, f.dest)
            inv = block.inventories[proto]
            if not inv.high_armed and inv.in_use < (self.model.high_water - HIGH_WATER_HYSTERESIS) * inv.size:
                inv.high_armed = True
        be = self.backends.get(int.from_bytes(f.backend_b, "big"))
        if be is not None:
            n = be.flow_count = be.flow_count - 1
            if len(be.flow_list) > n + (n >> 2) + 16:
                be.compact()
            if not n and be.scenario == _DEFAULT:
                be.vacant_since = now
                self._vacant[be.ip] = be
                self._vacant_due = min(self._vacant_due, now + self.timeouts.idle)
        self.counters[END_COUNTER[reason]] += 1

    def _track_in2out(self, f: Flow, buf: Buffer, ihl: int) -> None:
        """Learn the backend's window from one of its packets (never from the outside).

        An ACK stores its acknowledgement number and raises the largest window
        seen; a SYN without ACK starts (or restarts, on a reopened flow) the
        connection: its sequence + 1, its window shift, nothing acknowledged yet.
        """
        seq, ack, doff, flags, win = TCP_TRACK(buf, ihl + 4)
        if flags & F_SYN:
            if not flags & (F_ACK | F_RST) and f.state in _STATE_OPEN:
                f.trk_isn = (seq + 1) & 0xFFFFFFFF
                f.trk_scale = syn_wscale(buf, ihl, (doff >> 4) << 2)
                f.trk_ack = UNKNOWN
                f.trk_win = 0
            elif f.state == S_SYN_RECEIVED and flags & F_ACK and not flags & F_RST:
                # The backend answers a flow opened from the outside: its SYN-ACK
                # announces its window shift and acknowledges the remote's SYN.
                f.trk_scale = syn_wscale(buf, ihl, (doff >> 4) << 2)
                f.trk_ack = ack
                f.trk_win = win
            return
        if flags & F_ACK and not flags & F_RST:
            f.trk_ack = ack
            if win > f.trk_win:
                f.trk_win = win

    def _tcp_in2out_flags(self, f: Flow, buf: Buffer, ihl: int, now: float) -> None:
        """A backend's packet that is not a plain ACK: learn from it, then move the state."""
        flags = buf[ihl + 13]
        state = f.state
        if flags & F_SYN and state in _STATE_ENDED:
            self._tcp_flags(f, flags, True, now)
            self._track_in2out(f, buf, ihl)
            return
        self._track_in2out(f, buf, ihl)
        # A backend's SYN moves no state but SYN-RECEIVED's (tcp_next_state): the SYN
        # of every connection it opens costs no state-change call.
        if flags & (F_FIN | F_RST) or (flags & F_SYN and state == S_SYN_RECEIVED):
            self._tcp_flags(f, flags, True, now)

    def _tcp_out2in_flags(self, f: Flow, buf: Buffer, ihl: int, now: float) -> bool:
        """A FIN, SYN or RST from the outside; False (counted, flow untouched) when a
        FIN or RST lies outside the backend's window (:func:`in_window`), or when,
        while the backend waits for a SYN-ACK, a SYN does not acknowledge the
        backend's SYN (RFC 9293 section 3.10.7.3: not acceptable; a forged one
        would otherwise open the flow before its window is known)."""
        flags = buf[ihl + 13]
        if flags & (F_FIN | F_RST):
            seq, ack, _doff, _flags, _win = TCP_TRACK(buf, ihl + 4)
            if not in_window(f, flags, seq, ack):
                self.counters[Counter.DROP_TCP_OUT_OF_WINDOW] += 1
                return False
        elif f.state == S_SYN_SENT and f.trk_isn >= 0:
            seq, ack, _doff, _flags, _win = TCP_TRACK(buf, ihl + 4)
            if not flags & F_ACK or ack != f.trk_isn:
                self.counters[Counter.DROP_TCP_OUT_OF_WINDOW] += 1
                return False
        self._tcp_flags(f, flags, False, now)
        return True

    def _tcp_flags(self, f: Flow, flags: int, in2out: bool, now: float) -> None:
        """Apply a FIN, SYN or RST to ``f``'s state (the rules: :func:`tcp_next_state`)."""
        old_state, old_fins = f.state, f.fins
        state, fins = tcp_next_state(old_state, old_fins, flags, in2out, f.inbound)
        if fins != old_fins:
            f.fins = fins
        if state == old_state:
            return
        f.state = state
        old_timeout = f.timeout
        timeout = f.timeout = timeout_for(state, self.timeouts, f.idle)
        if state == S_SYN_RECEIVED:
            # The remote reopened a closed inbound flow: a new connection, nothing
            # of the backend's window known yet.
            f.trk_ack, f.trk_win, f.trk_scale, f.trk_isn = UNKNOWN, 0, MAX_WSCALE, UNKNOWN
        if timeout < old_timeout:
            # Only a shorter timeout (a linger) needs an earlier deadline: the one armed
            # is never later than ``now`` + the old timeout, and when it fires ``_expire``
            # re-arms at ``last_seen + timeout`` (a move to a state with the same or a
            # longer timeout costs no wheel entry).
            self.wheel.schedule(f, now + timeout)

    def _expire(self, now: float) -> None:
        """End flows idle past their timeout; re-arm the ones that saw traffic."""
        for f in self.wheel.advance(now):
            deadline = f.last_seen + f.timeout
            if deadline > now:
                self.wheel.schedule(f, deadline)
            elif f.state in _STATE_ENDED:
                self.end_flow(f, _CLOSED, deadline)
            else:
                self.end_flow(f, _IDLE, deadline)

    def _admit(self, be: Backend, proto: int, now: float) -> bool:
        """Whether ``be`` may open one more flow under the flow caps (docs/decisions.md,
        "Flow caps"; RFC 6888 REQ-5).

        At ``max_flows_per_backend`` the backend's oldest flow without a reply
        makes room. At ``max_flows`` (a worker's share of it: ``max_flows / N``,
        docs/decisions.md "Workers") room is made in the backend holding the
        most flows, not the newcomer's, so one backend's flood cannot starve
        the others; failing that, in the newcomer's own. Otherwise refused.
        """
        model = self.model
        if be.flow_count >= model.max_flows_per_backend:
            if self._early_drop(be, now):
                return True
            self._refuse(be, proto, "backend", model.max_flows_per_backend, now)
            return False
        # With N workers each holds its share of the cap (its own table is all it sees).
        cap = -(-model.max_flows // self.shard.count)
        if self.flows_live < cap:
            return True
        hog = self._hog
        if hog is None or now - self._hog_at >= HOG_RESCAN or hog.flow_count < be.flow_count:
            hog = self._hog = max(self.backends.values(), key=lambda b: b.flow_count, default=be)
            self._hog_at = now
        if self._early_drop(hog, now) or (hog is not be and self._early_drop(be, now)):
            return True
        self._refuse(be, proto, "global", cap, now)
        return False

    def _early_drop(self, be: Backend, now: float) -> bool:
        """End ``be``'s oldest flow that never saw a reply; False if none among the
        next :data:`EARLY_DROP_SCAN` of its flows from ``be.drop_from`` (replied and
        ended ones met on the way are passed for good: a reply is never taken back)."""
        line = be.flow_list
        i = be.drop_from
        end = min(len(line), i + EARLY_DROP_SCAN)
        while i < end:
            f = line[i]
            i += 1
            if f.live and not _replied(f):
                be.drop_from = i
                self.end_flow(f, EndReason.EARLY_DROP, now)
                return True
        be.drop_from = i
        return False

    def _deny(self, backend: int, decision: Decision, remote: int, port: int, proto: int, now: float) -> None:
        """Count a new flow a security group (or ``inbound_default``) denied, per
        backend and rule in the policy, with its rate-limited ``flow_denied`` event
        (docs/model.md, "Security groups"). ``remote``/``port``: the far side and the
        backend's port (inbound), the destination and its port (outbound)."""
        self.counters[Counter.DROP_SECURITY_DENIED] += 1
        ev = self.security.record_denial(backend, decision, remote, port, proto, now)
        if ev is not None:
            self.events.append(ev)

    def _refuse(self, be: Backend, proto: int, limit: str, cap: int, now: float) -> None:
        """Count a new flow refused at a cap; at most one ``flow_limit_reached`` per
        backend per :data:`FLOW_LIMIT_EVENT_INTERVAL`."""
        self.counters[Counter.DROP_FLOW_LIMIT] += 1
        be.refused += 1
        gate = be.refused_events
        if not gate.admit(now, FLOW_LIMIT_EVENT_INTERVAL):
            return
        self.events.append(
            FlowLimitReached(
                backend=ip_str(be.ip),
                public_ip=ip_str(be.address.ip),
                protocol=PROTO_NAMES.get(proto, str(proto)),
                limit=limit,
                max_flows=cap,
                flows=be.flow_count,
                suppressed=gate.suppressed,
            )
        )
        gate.sent(now)

    def _exhausted(self, be: Backend, proto: int, dest: bytes, now: float) -> None:
        """Count a failed flow and emit a rate-limited ``snat_port_exhausted`` event."""
        self.counters[Counter.DROP_EXHAUSTED] += 1
        be.exhausted += 1
        be.last_exhausted = now
        gate = be.exhausted_events
        if not gate.admit(now, self.model.exhaustion_event_interval):
            return
        self.events.append(
            SnatPortExhausted(
                backend=ip_str(be.ip),
                public_ip=ip_str(be.address.ip),
                protocol=PROTO_NAMES.get(proto, str(proto)),
                destination=f"{ip_str(int.from_bytes(dest[:4], 'big'))}:{int.from_bytes(dest[4:], 'big')}",
                block_size=be.block.size if be.block is not None else 0,
                suppressed=gate.suppressed,
            )
        )
        gate.sent(now)

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
