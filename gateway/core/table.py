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
from gateway.core.flow import EndReason
from gateway.core.header import Buffer, l4_offset
from gateway.core.icmp_error import ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, ZERO2
from gateway.core.in2out import In2Out
from gateway.core.model import PROTO_ICMP, PROTO_TCP, PROTO_UDP, GatewayModel
from gateway.core.out2in import Out2In
from gateway.core.shard import Shard
from gateway.core.verdict import ACCEPT_MODIFIED, DROP, REQUEUE, Verdict


class TranslationTable(In2Out, Out2In):
    """All flows of one gateway, both directions, their timers and counters."""

    def __init__(
        self, model: GatewayModel, now: float, rng: Random | None = None, shard: Shard | None = None
    ) -> None:
        super().__init__(model, now, rng, shard)
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
        failing drops the packet, counted by that half's reason, and never
        leaves a flow behind for it: a packet that matches no flow of its sender
        is dropped before an outbound flow is made when its destination is
        served by nothing (``drop_no_flow``), by an LB rule with every member
        down (``drop_no_healthy_member``), or is a TCP segment other than a SYN
        (no flow of the target can match it, ``drop_no_flow``); when the
        target's half refuses it after all (its security groups, a flow cap),
        the outbound flow just made for it is ended at once
        (``flows_ended_closed``), so a refused hairpin holds no port.

        With several workers (docs/decisions.md, "Workers"), the sender's owner
        gets the packet (steered by source) and does the source half; when the
        destination half belongs to another worker the packet, rewritten so
        far, goes there (``REQUEUES[k]``), which does it in
        :meth:`hairpin_second`. A refusal there cannot end the outbound flow
        made here: it idles out. A sender this worker does not own is dropped
        (``drop_misrouted``): a re-queued hairpin is always a second half.
        """
        n = len(buf)
        ihl = l4_offset(buf, n)
        if ihl < 0:
            self.counters[-ihl] += 1
            return DROP
        if self._sharded and self._inside_owner(int.from_bytes(buf[12:16], "big")) >= 0:
            self.counters[Counter.DROP_MISROUTED] += 1
            return DROP
        proto = buf[9]
        key = self._hairpin_new_key(buf, ihl, proto)
        if key is None:
            return DROP
        verdict = self.in2out(buf, now)
        if verdict != ACCEPT_MODIFIED:
            if verdict >= REQUEUE:
                # An error from the sender quoting another worker's flow: a re-queued
                # hairpin is always a second half, so it cannot go there.
                self.counters[Counter.REQUEUED] -= 1
                self.counters[Counter.DROP_MISROUTED] += 1
            return DROP
        verdict = self.out2in(buf, now)
        if verdict >= REQUEUE:
            return verdict
        if verdict == DROP:
            if key:
                f = self.inside[proto].get(key)
                if f is not None:
                    self.end_flow(f, EndReason.CLOSED, now)
            return DROP
        self.counters[Counter.HAIRPIN_TRANSLATED] += 1
        return verdict

    def hairpin_second(self, buf: Buffer, now: float) -> Verdict:
        """The destination half of a hairpinned packet whose source half another
        worker did and handed here (docs/decisions.md, "Workers"): :meth:`out2in`
        alone, counted ``hairpin_translated`` when it goes through. Never hands
        the packet on again: one this worker does not own either is dropped
        (``drop_misrouted``). A refusal here cannot end the sender's outbound
        flow, which lives in the other worker: it idles out."""
        verdict = self.out2in(buf, now)
        if verdict >= REQUEUE:
            c = self.counters
            c[Counter.REQUEUED] -= 1
            c[Counter.DROP_MISROUTED] += 1
            return DROP
        if verdict != DROP:
            self.counters[Counter.HAIRPIN_TRANSLATED] += 1
        return verdict

    def _hairpin_new_key(self, buf: Buffer, ihl: int, proto: int) -> bytes | None:
        """Whether a hairpinned packet can get through, before anything is made for
        it: b"" when its sender has a flow for it already (a reply, a later
        packet) or it is an ICMP error (the two halves translate those only
        about a live flow); the inside key of the outbound flow the source half
        will make when its destination is served from the outside (TCP SYN and
        UDP: an LB rule with a member up, an inbound NAT rule or an instance IP;
        an echo request: an instance IP); None (counted) otherwise."""
        dst = int.from_bytes(buf[16:20], "big")
        c = self.counters
        if proto == PROTO_ICMP:
            typ = buf[ihl]
            if typ != ICMP_ECHO_REQUEST and typ != ICMP_ECHO_REPLY:
                return b""
            key = bytes(buf[12:20]) + bytes(buf[ihl + 4 : ihl + 6]) + ZERO2
            if key in self._icmp_inside:
                return b""
            if typ == ICMP_ECHO_REQUEST and dst in self.instance_inbound:
                return key
            c[Counter.DROP_NO_FLOW] += 1
            return None
        if proto != PROTO_TCP and proto != PROTO_UDP:
            return b""
        key = bytes(buf[12:20]) + bytes(buf[ihl : ihl + 4])
        if key in self.inside[proto]:
            return b""
        if proto == PROTO_TCP and buf[ihl + 13] & 0x17 != 0x02:
            c[Counter.DROP_NO_FLOW] += 1
            return None
        t = self.inbound_index.get((proto, dst, buf[ihl + 2] << 8 | buf[ihl + 3]))
        if t is not None:
            if t.healthy:
                return key
            c[Counter.DROP_NO_HEALTHY_MEMBER] += 1
            return None
        if dst in self.instance_inbound:
            return key
        c[Counter.DROP_NO_FLOW] += 1
        return None

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

    def count_misrouted(self) -> None:
        """For adapters: a packet handed on once already that its new worker does not
        own either (its core asked for a second re-queue), dropped, never bounced twice."""
        self.counters[Counter.DROP_MISROUTED] += 1


__all__ = ["Event", "TranslationTable"]
