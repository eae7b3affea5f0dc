"""Port blocks: a backend's preallocated SNAT ports on one public address, and
how flows take ports from them (docs/model.md, "PAT" and "Preallocation by
pool size").

A block is made of 32-port chunks (32 is the smallest block the tiers
prescribe). At first every block is one contiguous run, laid out from
:data:`PORT_MIN` in backend order. Chunks are what a resize moves: growing
into a higher tier keeps each block's first half and gives the rest back;
shrinking into a lower tier appends chunks, next to the block when they are
free and elsewhere when they are not, so no port that carries a flow ever
leaves its block ("no existing flow is affected").

Allocation is endpoint-dependent, as the model asks: a port may carry
several flows as long as their destinations (protocol, ip, port) differ. A
new flow takes a free port picked at random among the older half of the
free line (RFC 6056 section 3, RFC 7857 section 9: a port an outsider cannot
guess), and a port goes back to the end of the line when its last flow ends,
so it is not reused toward the same destination before at least half of the
other free ports have been handed out (docs/decisions.md, "Port choice").
Without a random source (``random_ports = false``) the head of the line is
taken: least recently released first, the order of earlier versions. Only
when no free port is left does a flow share a port already in use toward
other destinations. The search for a shareable port is bounded by the block
size (at most 1024 probes, from a random start, and none while a free port
exists), so its cost never grows with the number of flows.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from random import Random

from gateway.core.tier import PORT_MAX, PORT_MIN

#: Two-byte big-endian encodings of every port, built once (a constant table).
PORT_BYTES: tuple[bytes, ...] = tuple(p.to_bytes(2, "big") for p in range(65536))

#: Ports per chunk, the unit blocks are made of and resized by.
CHUNK = 32
CHUNK_SHIFT = 5
#: Chunk numbers are ``port >> CHUNK_SHIFT``; these are the usable ones.
FIRST_CHUNK = PORT_MIN >> CHUNK_SHIFT
CHUNKS = (PORT_MAX + 1) >> CHUNK_SHIFT


@dataclass(slots=True)
class Inventory:
    """One protocol's use of a block: TCP, UDP and ICMP count separately.

    ``high_armed`` is False between a ``snat_ports_high_water`` event and the
    moment use falls back below the re-arm mark (no event storm around the
    threshold).
    """

    size: int
    refs: list[int] = field(default_factory=list)
    free: deque[int] = field(default_factory=deque)
    dest: dict[bytes, int] = field(default_factory=dict)
    cursor: int = 0
    in_use: int = 0
    peak: int = 0
    high_armed: bool = True

    def __post_init__(self) -> None:
        if not self.refs:
            self.refs = [0] * self.size
            self.free = deque(range(self.size))


@dataclass(slots=True)
class PortBlock:
    """The ports of ``chunks`` on ``public_ip``, owned by one backend.

    Offsets count ports through the chunks in order, so offset ``o`` is port
    ``chunks[o // 32] * 32 + o % 32``.
    """

    public_ip: int
    chunks: list[int]
    inventories: dict[int, Inventory] = field(default_factory=dict)
    size: int = 0
    _pos: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.size = len(self.chunks) << CHUNK_SHIFT
        self._pos = {c: i for i, c in enumerate(self.chunks)}

    def port(self, off: int) -> int:
        return self.chunks[off >> CHUNK_SHIFT] << CHUNK_SHIFT | off & (CHUNK - 1)

    def offset(self, port: int) -> int:
        return self._pos[port >> CHUNK_SHIFT] << CHUNK_SHIFT | port & (CHUNK - 1)

    def ranges(self) -> list[tuple[int, int]]:
        """The block as (first, last) port ranges, lowest first, adjacent chunks merged."""
        out: list[tuple[int, int]] = []
        for c in sorted(self.chunks):
            lo, hi = c << CHUNK_SHIFT, (c << CHUNK_SHIFT) + CHUNK - 1
            if out and out[-1][1] + 1 == lo:
                out[-1] = (out[-1][0], hi)
            else:
                out.append((lo, hi))
        return out

    def inventory(self, proto: int) -> Inventory:
        inv = self.inventories.get(proto)
        if inv is None:
            inv = self.inventories[proto] = Inventory(self.size)
        return inv

    def allocate(
        self, proto: int, taken: Mapping[bytes, object], prefix: bytes, dest: bytes, rng: Random | None = None
    ) -> int:
        """A port for a new flow toward ``dest``, or -1 when the block is exhausted for it.

        ``taken`` is the table's out2in map for ``proto``: ``prefix + port``
        (remote ip, public ip, remote port, public port) is in it when that
        port already carries a flow to this destination. With ``rng`` the
        port is drawn from the older half of the free line (swapped to its
        head, then taken: O(1) for a deque of at most 1024), and the search
        for a shared port starts at a random offset; without, the line's head.
        """
        inv = self.inventory(proto)
        used = inv.dest.get(dest, 0)
        if used >= inv.size:
            return -1
        refs = inv.refs
        free = inv.free
        if free:
            if rng is not None and len(free) > 1:
                i = rng.randrange((len(free) + 1) >> 1)
                if i:
                    free[0], free[i] = free[i], free[0]
            off = free.popleft()
        else:
            off = -1
            c = inv.cursor if rng is None else rng.randrange(inv.size)
            size = inv.size
            for _ in range(size):
                c += 1
                if c >= size:
                    c = 0
                if prefix + PORT_BYTES[self.port(c)] not in taken:
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
        return self.port(off)

    def release(self, proto: int, port: int, dest: bytes) -> None:
        """Give back ``port``'s use by one flow toward ``dest``."""
        inv = self.inventories[proto]
        off = self.offset(port)
        left = inv.dest[dest] - 1
        if left:
            inv.dest[dest] = left
        else:
            del inv.dest[dest]
        inv.refs[off] -= 1
        if inv.refs[off] == 0:
            inv.in_use -= 1
            inv.free.append(off)

    def retile(self, chunks: list[int]) -> None:
        """Make the block ``chunks`` (a resize or a chunk swap).

        Chunks that stay keep their ports' use; the caller has already ended
        every flow on chunks that leave, so they carry nothing. Ports of new
        chunks join the end of the free line.
        """
        remap = {c: i for i, c in enumerate(chunks)}
        size = len(chunks) << CHUNK_SHIFT
        for inv in self.inventories.values():
            refs = [0] * size
            keep: list[int] = []
            for old in inv.free:
                c = self.chunks[old >> CHUNK_SHIFT]
                if c in remap:
                    keep.append(remap[c] << CHUNK_SHIFT | old & (CHUNK - 1))
            for i, c in enumerate(self.chunks):
                pos = remap.get(c)
                if pos is not None:
                    base_old, base_new = i << CHUNK_SHIFT, pos << CHUNK_SHIFT
                    refs[base_new : base_new + CHUNK] = inv.refs[base_old : base_old + CHUNK]
            added = [c for c in chunks if c not in self._pos]
            for c in added:
                base = remap[c] << CHUNK_SHIFT
                keep.extend(range(base, base + CHUNK))
            inv.refs = refs
            inv.free = deque(keep)
            inv.size = size
            inv.cursor = 0
        self.chunks = list(chunks)
        self._pos = remap
        self.size = size

    def reserve(self, proto: int, port: int, dest: bytes) -> bool:
        """Take ``port`` for one flow toward ``dest``, as :meth:`allocate` would
        have: a flow restored from the state file keeps the port it had on the
        wire (:mod:`gateway.core.persist`). False (nothing taken) if ``port`` is
        not in the block. Start-up only: leaving the free line costs a scan of it.
        """
        if port >> CHUNK_SHIFT not in self._pos:
            return False
        inv = self.inventory(proto)
        off = self.offset(port)
        if inv.refs[off] == 0:
            inv.free.remove(off)
            inv.in_use += 1
            if inv.in_use > inv.peak:
                inv.peak = inv.in_use
        inv.refs[off] += 1
        inv.dest[dest] = inv.dest.get(dest, 0) + 1
        return True


@dataclass(slots=True)
class BlockLayout:
    """Which chunks of one public address are owned, and the address's block size.

    Chunks below :data:`PORT_MIN`, chunks holding an excluded port (an LB
    rule's frontend port on this address) and chunks outside ``span`` (this
    worker's slice of the ports when the gateway runs several,
    :mod:`gateway.core.shard`) are never handed out. ``excluded`` stays the
    operator's alone: the slice is no exclusion anyone configured.
    """

    size: int
    excluded: frozenset[int] = frozenset()
    used: bytearray = field(default_factory=lambda: bytearray(CHUNKS))
    #: The chunks ``[first, end)`` blocks may use (all of them with one worker).
    span: tuple[int, int] = (FIRST_CHUNK, CHUNKS)

    def __post_init__(self) -> None:
        lo, hi = self.span
        self.used[:lo] = b"\1" * lo
        self.used[hi:] = b"\1" * (CHUNKS - hi)
        for p in self.excluded:
            self.used[p >> CHUNK_SHIFT] = 1

    def free_chunks(self) -> int:
        return self.used.count(0)

    def room(self) -> int:
        """How many chunks blocks could hold at most: the span less excluded chunks."""
        lo, hi = self.span
        return hi - lo - len({c for p in self.excluded if lo <= (c := p >> CHUNK_SHIFT) < hi})

    def take(self, count: int, after: int = -1) -> list[int] | None:
        """``count`` free chunks, now owned; None (and nothing taken) if too few are free.

        Prefers, in order: the chunks right after chunk ``after`` (a block
        growing in place), the lowest contiguous run, the lowest free chunks.
        """
        if count <= 0:
            return []
        run = bytes(count)
        if after >= 0 and self.used[after + 1 : after + 1 + count] == run:
            first = after + 1
        else:
            first = self.used.find(run)
        if first >= 0:
            chunks = list(range(first, first + count))
        else:
            chunks = []
            i = self.used.find(0)
            while i >= 0 and len(chunks) < count:
                chunks.append(i)
                i = self.used.find(0, i + 1)
            if len(chunks) < count:
                return None
        for c in chunks:
            self.used[c] = 1
        return chunks

    def give(self, chunks: Iterable[int]) -> None:
        """Chunks a block no longer owns go back."""
        ex = {p >> CHUNK_SHIFT for p in self.excluded}
        lo, hi = self.span
        for c in chunks:
            if c not in ex and lo <= c < hi:
                self.used[c] = 0

    def set_excluded(self, excluded: frozenset[int]) -> set[int]:
        """Change the excluded ports; returns the chunks that became excluded
        (the caller moves any block off them first)."""
        old = {p >> CHUNK_SHIFT for p in self.excluded}
        new = {p >> CHUNK_SHIFT for p in excluded}
        self.excluded = excluded
        lo, hi = self.span
        for c in old - new:
            if lo <= c < hi:
                self.used[c] = 0
        for c in new - old:
            self.used[c] = 1
        return new - old
