"""The translation table: every flow of one gateway and the policy that creates
them (docs/model.md).

:class:`TranslationTable` is assembled from the jobs listed in
:mod:`gateway.core.state`. Adapters use, and only use:

- :meth:`~gateway.core.in2out.In2Out.in2out` and
  :meth:`~gateway.core.out2in.Out2In.out2in` for every packet: a mutable
  buffer and ``now`` in, a :class:`~gateway.core.verdict.Verdict` out, the
  packet rewritten in place; :meth:`TranslationTable.hairpin` for a packet
  from the inside to one of the gateway's public addresses, and
  :meth:`~gateway.core.icmp_error.IcmpErrors.local_out` for what the host
  itself sends (ICMP errors outside, health-probe SYNs inside);
- :meth:`~gateway.core.inbound.Inbound.probe_targets` and
  :meth:`~gateway.core.inbound.Inbound.probe_result` for the health prober;
- :meth:`get_timer` and :meth:`handle_timer` (aioquic's habit: the loop asks
  when the core next needs to wake);
- :meth:`~gateway.core.reconfigure.Reconfigure.reconfigure` for a reload;
- :attr:`events` (drained and logged by the adapter), :meth:`counters_dict`
  and the snapshots in :mod:`gateway.core.views`.
"""

from __future__ import annotations

from random import Random

from gateway.core.counters import COUNTER_NAMES, Counter
from gateway.core.events import Event
from gateway.core.header import Buffer, l4_offset
from gateway.core.icmp_error import ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, ZERO2
from gateway.core.in2out import In2Out
from gateway.core.model import PROTO_ICMP, PROTO_TCP, PROTO_UDP, GatewayModel
from gateway.core.out2in import Out2In
from gateway.core.verdict import DROP, Verdict


class TranslationTable(In2Out, Out2In):
    """All flows of one gateway, both directions, their timers and counters."""

    def __init__(self, model: GatewayModel, now: float, rng: Random | None = None) -> None:
        super().__init__(model, now, rng)
        self.reconfigure(model, now)

    def hairpin(self, buf: Buffer, now: float) -> Verdict:
        """A packet from the inside to a public address the gateway owns (RFC 4787
        REQ-9, RFC 5382 REQ-8; docs/model.md, "Hairpinning"), rewritten both ways.

        The source is translated as :meth:`in2out` would (the sender's own public
        address and port, its outbound flow created if need be), then the
        destination as :meth:`out2in` would (a live flow, or one opened through an
        LB rule, an inbound NAT rule or an instance IP), so the target sees the
        sender's public address exactly as a remote's. Its answer comes back the
        same way, through the target's flow and then the sender's. Either half
        failing drops the packet, counted by that half's reason; a packet that
        matches no flow toward a destination nothing serves is dropped
        (``drop_no_flow``) before an outbound flow is made for it.
        """
        n = len(buf)
        ihl = l4_offset(buf, n)
        if ihl < 0:
            self.counters[-ihl] += 1
            return DROP
        if not self._hairpin_served(buf, ihl):
            self.counters[Counter.DROP_NO_FLOW] += 1
            return DROP
        if self.in2out(buf, now) == DROP:
            return DROP
        verdict = self.out2in(buf, now)
        if verdict != DROP:
            self.counters[Counter.HAIRPIN_TRANSLATED] += 1
        return verdict

    def _hairpin_served(self, buf: Buffer, ihl: int) -> bool:
        """Whether a hairpinned packet can get through: its sender has a flow for
        it already (a reply, or a later packet), or its destination is served
        from the outside (TCP and UDP: an LB rule, an inbound NAT rule or an
        instance IP; an echo request: an instance IP). ICMP errors go on to the
        two halves, which translate them only about a live flow."""
        proto = buf[9]
        dst = int.from_bytes(buf[16:20], "big")
        if proto == PROTO_ICMP:
            typ = buf[ihl]
            if typ != ICMP_ECHO_REQUEST and typ != ICMP_ECHO_REPLY:
                return True
            key = bytes(buf[12:20]) + bytes(buf[ihl + 4 : ihl + 6]) + ZERO2
            return key in self._icmp_inside or (typ == ICMP_ECHO_REQUEST and dst in self.instance_inbound)
        if proto != PROTO_TCP and proto != PROTO_UDP:
            return True
        key = bytes(buf[12:20]) + bytes(buf[ihl : ihl + 4])
        if key in self.inside[proto]:
            return True
        port = buf[ihl + 2] << 8 | buf[ihl + 3]
        return (proto, dst, port) in self.inbound_index or dst in self.instance_inbound

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` next needs to run (None: nothing pending)."""
        due = self.wheel.next_deadline()
        if self._vacant:
            return self._vacant_due if due is None else min(due, self._vacant_due)
        return due

    def handle_timer(self, now: float) -> None:
        """End flows idle past their timeout, re-arm the ones that saw traffic, and
        release standalone backends that have had no flow for the idle timeout."""
        self._expire(now)
        if now >= self._vacant_due:
            self._release_vacant(now)

    def counters_dict(self) -> dict[str, int]:
        return dict(zip(COUNTER_NAMES, self.counters, strict=True))

    def flow_count(self) -> int:
        """Live flows (kept as a count by the one function that adds and the one that ends them)."""
        return self.flows_live

    def count_internal_error(self) -> None:
        """For adapters: a packet dropped because the core raised (a bug, never input)."""
        self.counters[Counter.DROP_INTERNAL] += 1


__all__ = ["Event", "TranslationTable"]
