"""What the core decides for one packet, as the queue adapters act on it.

The values are the queue protocol's: 0 and 1 are the kernel's ``NF_DROP`` and
``NF_ACCEPT`` (docs/kernel.md, "Diverting packets"); 2 and 3 ask the adapter
to send the rewritten bytes back, 3 also with the "translated" mark that lets
return traffic through the FORWARD filter.
"""

from __future__ import annotations

from enum import IntEnum


class Verdict(IntEnum):
    """A packet's fate; the per-packet path returns the module-level aliases."""

    DROP = 0
    #: Unchanged (the queue client batches these; the core itself never returns it).
    ACCEPT = 1
    ACCEPT_MODIFIED = 2
    #: Modified, and marked as translated (out2in: the FORWARD filter lets only these in).
    ACCEPT_MODIFIED_MARK = 3
    #: Hand the packet, as rewritten so far, to worker ``v - REQUEUE``, which owns
    #: it (docs/decisions.md, "Workers"): the adapter re-queues it to that
    #: worker's queue (``NF_QUEUE`` verdict) with ``Mark.REQUEUED`` set, so it is
    #: never handed on twice. Only returned when the table runs as one of
    #: several workers (:mod:`gateway.core.shard`).
    REQUEUE = 4
    REQUEUE_1 = 5
    REQUEUE_2 = 6
    REQUEUE_3 = 7
    REQUEUE_4 = 8
    REQUEUE_5 = 9
    REQUEUE_6 = 10
    REQUEUE_7 = 11
    REQUEUE_8 = 12
    REQUEUE_9 = 13
    REQUEUE_10 = 14
    REQUEUE_11 = 15
    REQUEUE_12 = 16
    REQUEUE_13 = 17
    REQUEUE_14 = 18
    REQUEUE_15 = 19


#: Module-level names for the per-packet path: a global lookup is ten times
#: cheaper than ``Verdict.DROP`` (an enum class attribute).
DROP, ACCEPT, ACCEPT_MODIFIED, ACCEPT_MODIFIED_MARK = tuple(Verdict)[:4]
REQUEUE = Verdict.REQUEUE
#: ``REQUEUES[k]``: hand the packet to worker k.
REQUEUES: tuple[Verdict, ...] = tuple(v for v in Verdict if v >= Verdict.REQUEUE)
