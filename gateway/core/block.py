"""Port blocks: a backend's preallocated, contiguous range of SNAT ports on
one public address, and how flows take ports from it (OUTBOUND_MODEL.md,
"PAT" and "Preallocation by pool size").

Allocation is endpoint-dependent, as the model asks: a port may carry
several flows as long as their destinations (protocol, ip, port) differ. A
new flow first takes the least recently released free port, so a port goes
back to the end of the line when its last flow ends and is not reused toward
the same destination sooner than necessary; only when no free port is left
does it share a port already in use toward other destinations. The search
for a shareable port is bounded by the block size (at most 1024 probes, and
none while a free port exists), so its cost never grows with the number of
flows.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway.core.tier import PORT_MAX, PORT_MIN

#: Two-byte big-endian encodings of every port, built once (a constant table).
PORT_BYTES: tuple[bytes, ...] = tuple(p.to_bytes(2, "big") for p in range(65536))


@dataclass(slots=True)
class Inventory:
    """One protocol's use of a block: TCP, UDP and ICMP count separately."""

    size: int
    refs: list[int] = field(default_factory=list)
    free: deque[int] = field(default_factory=deque)
    dest: dict[bytes, int] = field(default_factory=dict)
    cursor: int = 0
    in_use: int = 0
    peak: int = 0

    def __post_init__(self) -> None:
        if not self.refs:
            self.refs = [0] * self.size
            self.free = deque(range(self.size))


@dataclass(slots=True)
class PortBlock:
    """``size`` ports from ``start`` on ``public_ip``, owned by one backend."""

    public_ip: int
    start: int
    size: int
    inventories: dict[int, Inventory] = field(default_factory=dict)

    def inventory(self, proto: int) -> Inventory:
        inv = self.inventories.get(proto)
        if inv is None:
            inv = self.inventories[proto] = Inventory(self.size)
        return inv

    def allocate(self, proto: int, taken: Mapping[bytes, object], prefix: bytes, dest: bytes) -> int:
        """A port for a new flow toward ``dest``, or -1 when the block is exhausted for it.

        ``taken`` is the table's out2in map for ``proto``: ``prefix + port``
        (remote ip, public ip, remote port, public port) is in it when that
        port already carries a flow to this destination.
        """
        inv = self.inventory(proto)
        used = inv.dest.get(dest, 0)
        if used >= inv.size:
            return -1
        refs = inv.refs
        start = self.start
        if inv.free:
            off = inv.free.popleft()
        else:
            off = -1
            c = inv.cursor
            size = inv.size
            for _ in range(size):
                c += 1
                if c >= size:
                    c = 0
                if prefix + PORT_BYTES[start + c] not in taken:
                    off = c
                    break
            inv.cursor = c
            if off < 0:
                return -1
        if refs[off] == 0:
            inv.in_use += 1
            if inv.in_use > inv.peak:
                inv.peak = inv.in_use
        refs[off] += 1
        inv.dest[dest] = used + 1
        return start + off

    def release(self, proto: int, port: int, dest: bytes) -> None:
        """Give back ``port``'s use by one flow toward ``dest``."""
        inv = self.inventories[proto]
        off = port - self.start
        left = inv.dest[dest] - 1
        if left:
            inv.dest[dest] = left
        else:
            del inv.dest[dest]
        inv.refs[off] -= 1
        if inv.refs[off] == 0:
            inv.in_use -= 1
            inv.free.append(off)

    def shrink(self, new_size: int) -> None:
        """Keep the lower ``new_size`` ports (a pool grew into a higher tier).

        The caller has already ended every flow on the upper ports, so those
        ports are free and simply leave the inventories.
        """
        for inv in self.inventories.values():
            inv.refs = inv.refs[:new_size]
            inv.free = deque(o for o in inv.free if o < new_size)
            inv.size = new_size
            inv.cursor = 0
        self.size = new_size


@dataclass(slots=True)
class BlockLayout:
    """Where each backend's block lies on one public address.

    Blocks are aligned to their size from :data:`PORT_MIN`, so they are
    contiguous, disjoint and a halving keeps each block's lower half in place
    (flows there are untouched). A block never contains an excluded port
    (an LB rule's frontend port on this address).
    """

    size: int
    excluded: frozenset[int] = frozenset()
    starts: dict[int, int] = field(default_factory=dict)
    _free: deque[int] | None = None

    def _usable(self, start: int) -> bool:
        end = start + self.size
        return not any(start <= p < end for p in self.excluded)

    def free_starts(self) -> deque[int]:
        """Unowned block starts at the current size, lowest first (cached)."""
        if self._free is None:
            owned = set(self.starts.values())
            self._free = deque(
                s
                for s in range(PORT_MIN, PORT_MAX + 2 - self.size, self.size)
                if s not in owned and self._usable(s)
            )
        return self._free

    def assign(self, backend: int) -> int:
        """Start of a new block for ``backend``: the lowest free one, or -1 if none."""
        free = self.free_starts()
        if not free:
            return -1
        start = free.popleft()
        self.starts[backend] = start
        return start

    def halve(self) -> None:
        """Every block keeps its start and half its size; the upper halves go back."""
        self.size //= 2
        self._free = None
