"""Kernel numbers the adapters share: netfilter hooks, the packet marks our rules
set and test, and the queue's per-packet flags (docs/kernel.md).

Defined once here; the iptables rules, the queue codec and the packet loop all
import them.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag


class Hook(IntEnum):
    """Netfilter hook a queued packet came from (``enum nf_inet_hooks``).

    POSTROUTING carries in2out packets, PREROUTING out2in ones, LOCAL_OUT the
    ICMP errors the gateway host itself sends on the outside
    (docs/kernel.md, "Diverting packets", "ICMP errors from the host").
    """

    PRE_ROUTING = 0
    LOCAL_IN = 1
    FORWARD = 2
    LOCAL_OUT = 3
    POST_ROUTING = 4
    #: Not a kernel hook: what the queue clients report for a PREROUTING packet
    #: that carries :attr:`Mark.HAIRPIN` (from the inside to a public address,
    #: docs/kernel.md "Hairpin"). Above any u8 hook number, so it never collides.
    PRE_ROUTING_HAIRPIN = 0x100
    #: Not a hook: a flag the netlink client adds to the hook of a packet that
    #: carries :attr:`Mark.REQUEUED` (another worker handed it on,
    #: docs/kernel.md "Steering"). A hook with it never equals one above, so the
    #: loop's dispatch of the packets that were not handed on is unchanged.
    REQUEUED = 0x200


class Mark(IntEnum):
    """Bits of the packet mark (``skb->mark``) that snatgw's rules use."""

    #: Set by the gateway's verdict on translated out2in packets; the FORWARD
    #: filter lets only these go from the outside to the inside.
    TRANSLATED = 0x10000000
    #: Set in mangle PREROUTING on forwarded inside traffic; only these are
    #: queued for in2out in POSTROUTING.
    INSIDE = 0x20000000
    #: Set in mangle PREROUTING, just before the queue rule, on packets from the
    #: inside to one of the gateway's public addresses: the loop hands them to
    #: ``hairpin`` instead of ``out2in`` (docs/kernel.md, "Hairpin").
    HAIRPIN = 0x40000000
    #: Set by a worker's ``NF_QUEUE`` verdict when it hands a packet it does not
    #: own to the worker that does (docs/decisions.md, "Workers"): a packet that
    #: carries it is never handed on again (dropped as ``drop_misrouted``).
    REQUEUED = 0x08000000


#: ``NF_QUEUE`` (``linux/netfilter.h``): a verdict that queues the packet again,
#: to the queue number in its upper 16 bits (``NF_VERDICT_QBITS``), at the
#: same hook. With no listener there the kernel drops it (no bypass flag).
NF_QUEUE = 3


def requeue_verdict(queue: int) -> int:
    """The verdict that hands a packet to ``queue`` (``NF_QUEUE_NR(queue)``)."""
    return NF_QUEUE | (queue << 16)


class SkbInfo(IntFlag):
    """``NFQA_SKB_INFO`` flags (``linux/netfilter/nfnetlink_queue.h``)."""

    CSUMNOTREADY = 1
    GSO = 2
    CSUM_NOTVERIFIED = 4
