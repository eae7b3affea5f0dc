"""Which worker owns what, when the gateway runs N workers (docs/decisions.md,
"Workers").

Every worker holds a whole table of its own for part of the traffic, and no
worker ever looks at another's: the two directions of a flow must therefore
reach the same worker. Ownership is a pure function of numbers the kernel
can read off a packet, so iptables steers most packets straight to their
owner, and a worker that gets a packet it does not own hands it on (the
``REQUEUE`` verdicts, :mod:`gateway.core.verdict`):

- a **backend** (an inside source address) belongs to worker
  ``(ip & 15) % count``: the low four bits of the address, which iptables'
  ``u32`` match reads (in2out steering), and which spread consecutive
  addresses of a pool round-robin over the workers;
- the **SNAT ports** of every PAT address (1024-65535, in 32-port chunks)
  are cut into ``count`` contiguous slices; worker ``i`` lays its backends'
  blocks only in slice ``i``, so a return packet's destination port names
  its owner (out2in steering, ``--dport lo:hi``);
- what neither names (an LB rule's frontend port, an instance IP, an inbound
  NAT rule, an ICMP error) is owned by the worker of the backend it is for,
  which the core works out and re-queues to.

With one worker (the default on a one-core machine) the shard is
``Shard(0, 1)``: it owns everything and nothing is ever re-queued.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.core.tier import PORT_MAX, PORT_MIN

#: Most workers one gateway runs (the backend function has 16 classes).
MAX_WORKERS = 16
#: Backends are owned by the low bits of their address: this many classes.
SLOTS = 16
_CHUNK_SHIFT = 5
_FIRST_CHUNK = PORT_MIN >> _CHUNK_SHIFT
_END_CHUNK = (PORT_MAX + 1) >> _CHUNK_SHIFT


def backend_owner(ip: int, count: int) -> int:
    """The worker that owns inside source ``ip`` (its in2out packets, its blocks, its flows)."""
    return (ip & (SLOTS - 1)) % count


def backend_slots(index: int, count: int) -> list[int]:
    """The values of ``ip & 15`` worker ``index`` owns (what its ``u32`` steering rule matches)."""
    return [s for s in range(SLOTS) if s % count == index]


def slice_chunks(index: int, count: int) -> tuple[int, int]:
    """Worker ``index``'s slice of the SNAT ports as 32-port chunks ``[first, end)``."""
    span = _END_CHUNK - _FIRST_CHUNK
    return _FIRST_CHUNK + span * index // count, _FIRST_CHUNK + span * (index + 1) // count


def slice_ports(index: int, count: int) -> tuple[int, int]:
    """Worker ``index``'s slice of the SNAT ports as an inclusive (first, last) port range."""
    first, end = slice_chunks(index, count)
    return first << _CHUNK_SHIFT, (end << _CHUNK_SHIFT) - 1


def port_owner(port: int, count: int) -> int:
    """The worker whose slice holds SNAT port ``port``; -1 below :data:`PORT_MIN`."""
    if port < PORT_MIN:
        return -1
    span = _END_CHUNK - _FIRST_CHUNK
    chunk = port >> _CHUNK_SHIFT
    w = (chunk - _FIRST_CHUNK) * count // span
    # Integer division may land one short of the slice that starts at ``chunk``.
    while w + 1 < count and slice_chunks(w + 1, count)[0] <= chunk:
        w += 1
    return w


@dataclass(frozen=True, slots=True)
class Shard:
    """This worker's place among ``count`` workers."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_WORKERS or not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index} of {self.count}")

    @property
    def alone(self) -> bool:
        """One worker: owns everything, never re-queues."""
        return self.count == 1

    def owns_backend(self, ip: int) -> bool:
        return self.count == 1 or backend_owner(ip, self.count) == self.index

    def excluded_ports(self) -> frozenset[int]:
        """The SNAT ports outside this worker's slice (empty with one worker):
        its layouts treat them as the operator's excluded ports."""
        if self.count == 1:
            return frozenset()
        lo, hi = slice_ports(self.index, self.count)
        return frozenset(p for p in range(PORT_MIN, PORT_MAX + 1) if not lo <= p <= hi)
