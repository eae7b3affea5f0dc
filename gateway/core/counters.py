"""The table's counters, drop reasons among them, defined once (VPP's habit: every
drop is a named, counted reason).

The per-packet path indexes a plain ``list[int]`` with these values (cheap);
the operator's view, metrics and events read them by ``name``.
"""

from __future__ import annotations

from enum import IntEnum

from gateway.core.flow import EndReason


class Counter(IntEnum):
    """Index into :attr:`TranslationTable.counters`; the lower-case name is the public name."""

    IN2OUT_TRANSLATED = 0
    OUT2IN_TRANSLATED = 1
    ICMP_ERROR_IN2OUT = 2
    ICMP_ERROR_OUT2IN = 3
    FLOWS_CREATED = 4
    FLOWS_ENDED_IDLE = 5
    FLOWS_ENDED_CLOSED = 6
    FLOWS_ENDED_RECLAIMED = 7
    FLOWS_ENDED_REMOVED = 8
    #: Not an IPv4 packet with a whole transport header.
    DROP_MALFORMED = 9
    #: A fragment (docs/kernel.md, "Pitfalls": the queue sees them one by one).
    DROP_FRAGMENT = 10
    #: A protocol or ICMP type the gateway does not translate from the inside.
    DROP_UNSUPPORTED = 11
    #: From the outside, and no live flow matches it.
    DROP_NO_FLOW = 12
    #: The backend has no free port for this destination (docs/model.md, "Exhaustion").
    DROP_EXHAUSTED = 13
    #: A new standalone backend and no default SNAT address with room.
    DROP_NO_PUBLIC_ADDRESS = 14
    #: The core raised: a bug, never input (the adapter drops the packet and counts it).
    DROP_INTERNAL = 15
    #: A FIN or RST from the outside outside the backend's receive window (RFC 5961;
    #: :func:`gateway.core.flow.in_window`): the flow is not touched.
    DROP_TCP_OUT_OF_WINDOW = 16
    #: From the inside, no flow, and a TCP packet that cannot open one: a bare ACK, a
    #: RST, a SYN-ACK (docs/decisions.md, "TCP tracking"); it takes no port.
    DROP_TCP_NO_FLOW = 17
    #: A new flow refused: its backend (or the gateway) is at its flow cap and no
    #: flow without a reply could be dropped to make room (docs/decisions.md, "Flow caps").
    DROP_FLOW_LIMIT = 18
    #: Flows ended by early drop, to make room under a flow cap.
    FLOWS_ENDED_EARLY_DROP = 19
    #: An ICMP type never forwarded either way: redirect, source quench, router
    #: advertisement/solicitation, timestamp, information, address mask, and any
    #: other that is neither echo nor a translated error (RFC 5508 section 8,
    #: docs/decisions.md "ICMP errors").
    DROP_ICMP_TYPE = 20
    #: An ICMP error whose ICMP checksum is wrong (RFC 792); never given a new one.
    DROP_BAD_CHECKSUM = 21
    #: An ICMP error the gateway host itself sent on the outside quoting a backend
    #: that has no flow for it: suppressed, so no private address leaves.
    DROP_LOCAL_ICMP_NO_FLOW = 22
    #: ICMP errors the gateway host itself sent about a translated return packet,
    #: whose quote was put back to the public address and port (``local_out``).
    ICMP_ERROR_LOCAL_OUT = 23
    #: A new flow a security group (or ``inbound_default``) denies; it takes no port
    #: (docs/model.md, "Security groups"; per backend and rule in the policy's counts).
    DROP_SECURITY_DENIED = 24
    #: A new inbound flow to an LB rule whose members are all down (docs/model.md,
    #: "Health probes").
    DROP_NO_HEALTHY_MEMBER = 25
    #: Flows opened from the outside (LB rules, inbound NAT rules, instance IPs) and
    #: hairpinned packets.
    INBOUND_FLOWS_CREATED = 26
    HAIRPIN_TRANSLATED = 27
    #: Packets this worker handed to the worker that owns them (docs/decisions.md, "Workers").
    REQUEUED = 28
    #: A packet handed on once already that its new worker does not own either
    #: (the workers disagree, e.g. for a moment during a reload): dropped, never bounced twice.
    DROP_MISROUTED = 29


#: Public counter names, in index order (``snatgw stats``, ``gateway_stopped``, metrics).
COUNTER_NAMES: tuple[str, ...] = tuple(c.name.lower() for c in Counter)

#: The counter each way of ending a flow bumps.
END_COUNTER: dict[str, Counter] = {
    EndReason.IDLE: Counter.FLOWS_ENDED_IDLE,
    EndReason.CLOSED: Counter.FLOWS_ENDED_CLOSED,
    EndReason.RECLAIMED: Counter.FLOWS_ENDED_RECLAIMED,
    EndReason.REMOVED: Counter.FLOWS_ENDED_REMOVED,
    EndReason.EARLY_DROP: Counter.FLOWS_ENDED_EARLY_DROP,
}
