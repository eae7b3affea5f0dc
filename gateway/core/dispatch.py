"""Which worker a packet without a flow here belongs to, when the gateway runs
several (docs/decisions.md, "Workers"; ownership in :mod:`gateway.core.shard`).

The kernel steers most packets straight to their owner; what it cannot tell
apart (an LB rule's frontend port, an inbound NAT rule, an ICMP error, a
packet the steering rules send by the remote's address) reaches some worker,
whose core works the owner out here and answers ``REQUEUES[k]``. Everything
here runs only after a flow lookup missed, and only with several workers
(``_sharded``): a live flow's packet costs what it did, and one worker never
comes here at all.

- An inside source: the owner of that backend.
- From the outside, by what serves the destination, in the order
  :meth:`~gateway.core.inbound.Inbound._open_inbound` looks: an inbound NAT
  rule goes to the owner of its backend; an LB rule to its *dispatch worker*
  (:func:`lb_dispatch`); an instance IP to the owner of its backend; a port of
  a PAT address to the worker whose slice holds it (an echo reply: its
  identifier). Anything else (a port below 1024 no rule holds) stays here and
  is dropped as today.

LB dispatch: the rule's distribution hash (the tuple
:func:`~gateway.core.inbound.pick_member` hashes) modulo **all** configured
members in address order names a member, whose owner is the dispatch worker;
if that worker owns no healthy member of the rule, the next worker
(cyclically) that does. The dispatch worker takes the member the hash named
when it is up, else one of its own healthy members
(:func:`~gateway.core.inbound.pick_own_member`): with every member up, a flow
goes to the member one worker would pick. Hashing over all members, not the
healthy ones, keeps the worker of a flow fixed while other members come and
go, so a flow's later packets, sent by the remote's address to any worker,
find it. Every worker probes every member (its own whole health book), so all
of them compute the same worker; should two disagree for a moment (a probe
result seen by one first), the packet is handed on to a worker that hands it
on again, which the adapter drops (``drop_misrouted``): a SYN the client
retries.
"""

from __future__ import annotations

from gateway.core.counters import Counter
from gateway.core.inbound import Inbound, InboundTarget, distribution_hash
from gateway.core.model import PROTO_ICMP
from gateway.core.shard import backend_owner, port_owner
from gateway.core.verdict import REQUEUES, Verdict

_C_REQUEUED = Counter.REQUEUED.value


def lb_dispatch(t: InboundTarget, count: int, proto: int, remote: bytes, public: bytes, ports: bytes) -> int:
    """The worker that opens an LB rule's new flow from ``remote`` (and finds its
    later packets): see the module. -1 when no worker owns a healthy member
    (any worker drops it, ``drop_no_healthy_member``). ``ports`` is the
    remote's port then the frontend port, as on the wire."""
    up = t.up
    if not up:
        return -1
    members = t.members
    n = len(members)
    pick = 0 if n == 1 else distribution_hash(t.distribution, proto, remote, public, ports) % n
    w = backend_owner(members[pick], count)
    for _ in range(count):
        if up >> w & 1:
            return w
        w = w + 1 if w + 1 < count else 0
    return -1


class Dispatch(Inbound):
    """The owner of a packet no flow here matches, and handing it on."""

    def _requeue(self, worker: int) -> Verdict:
        """Hand the packet, as it stands, to ``worker`` (counted ``requeued``)."""
        self.counters[_C_REQUEUED] += 1
        return REQUEUES[worker]

    def _inside_owner(self, backend: int) -> int:
        """The worker owning inside address ``backend``; -1 when it is this one."""
        w = backend_owner(backend, self.shard.count)
        return -1 if w == self.shard.index else w

    def _outside_owner(self, proto: int, remote: bytes, public: bytes, ports: bytes) -> int:
        """The worker owning what a packet from ``remote`` to ``public`` would open or
        ride (``ports``: remote port then public port, an echo's 0 then its
        identifier); -1 when it is this one or nobody (dropped here as today)."""
        shard = self.shard
        pub = int.from_bytes(public, "big")
        port = ports[2] << 8 | ports[3]
        w = -1
        t = self.inbound_index.get((proto, pub, port)) if proto != PROTO_ICMP else None
        if t is not None:
            if t.kind == "lb_rule":
                w = lb_dispatch(t, shard.count, proto, remote, public, ports)
            else:
                w = backend_owner(t.members[0], shard.count)
        else:
            backend = self.instance_inbound.get(pub, -1)
            if backend >= 0:
                w = backend_owner(backend, shard.count)
            else:
                addr = self.addresses.get(pub)
                if addr is not None and addr.layout is not None:
                    w = port_owner(port, shard.count)
        return -1 if w == shard.index else w
