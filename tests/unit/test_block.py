"""Port blocks: endpoint-dependent allocation inside the block, LRU reuse, exhaustion."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.block import PORT_BYTES, BlockLayout, PortBlock

UDP = 17


def _dest(i: int) -> bytes:
    return bytes([198, 51, 100, i % 250]) + (5000 + i // 250).to_bytes(2, "big")


class Harness:
    """Plays the translation table's out2in map for one public address."""

    def __init__(self, start: int = 2048, size: int = 32) -> None:
        self.block = PortBlock(0xC6336410, list(range(start >> 5, (start + size) >> 5)))
        self.taken: dict[bytes, int] = {}

    def open(self, dest: bytes) -> int:
        prefix = dest[:4] + b"\xc63d\x10" + dest[4:]
        port = self.block.allocate(UDP, self.taken, prefix, dest)
        if port >= 0:
            key = prefix + PORT_BYTES[port]
            assert key not in self.taken
            self.taken[key] = port
        return port

    def close(self, dest: bytes, port: int) -> None:
        prefix = dest[:4] + b"\xc63d\x10" + dest[4:]
        del self.taken[prefix + PORT_BYTES[port]]
        self.block.release(UDP, port, dest)


@settings(max_examples=60)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 5)), max_size=300))
def test_never_same_port_and_destination_twice_and_never_outside(ops: list[tuple[bool, int]]) -> None:
    """Whatever opens and closes happen, a (port, destination) pair is held once and
    every port is inside the block."""
    h = Harness()
    live: list[tuple[bytes, int]] = []
    for is_open, d in ops:
        dest = _dest(d)
        if is_open or not live:
            port = h.open(dest)
            if port < 0:
                assert sum(1 for x, _ in live if x == dest) == 32
                continue
            assert 2048 <= port < 2048 + 32
            assert (dest, port) not in live
            live.append((dest, port))
        else:
            dest, port = live.pop(d % len(live))
            h.close(dest, port)


def test_one_destination_gets_as_many_flows_as_ports() -> None:
    """A block of N ports holds N concurrent flows to one destination, and no more."""
    h = Harness(size=32)
    ports = [h.open(_dest(0)) for _ in range(32)]
    assert sorted(ports) == list(range(2048, 2080))
    assert h.open(_dest(0)) == -1


def test_other_destinations_share_ports_once_all_are_in_use() -> None:
    """When every port is in use, flows to other destinations still get one."""
    h = Harness(size=32)
    for _ in range(32):
        h.open(_dest(0))
    assert h.block.inventory(UDP).in_use == 32
    assert 2048 <= h.open(_dest(1)) < 2080
    assert h.block.inventory(UDP).in_use == 32


def test_freed_ports_go_to_the_back_of_the_line() -> None:
    """A port released now is handed out only after every other free port."""
    h = Harness(size=32)
    first = h.open(_dest(0))
    h.close(_dest(0), first)
    seen = [h.open(_dest(0)) for _ in range(32)]
    assert seen[-1] == first
    assert first not in seen[:-1]


def test_retile_to_fewer_chunks_keeps_the_first_ports_and_their_use() -> None:
    """Halving a block keeps its first chunks, the flows there and their counts."""
    h = Harness(size=64)
    held = [h.open(_dest(0)) for _ in range(10)]
    h.block.retile(h.block.chunks[:1])
    assert h.block.size == 32 and h.block.inventory(UDP).in_use == 10
    more = [h.open(_dest(0)) for _ in range(23)]
    assert sorted(held + more[:22]) == list(range(2048, 2080))
    assert more[22] == -1


def test_retile_to_more_chunks_adds_free_ports_after_the_old_ones() -> None:
    """A grown block hands out its new ports after the ones it already had free,
    and a port in use before stays in use."""
    h = Harness(size=32)
    busy = h.open(_dest(0))
    h.block.retile(h.block.chunks + [200])
    assert h.block.ranges() == [(2048, 2079), (6400, 6431)]
    got = [h.open(_dest(0)) for _ in range(63)]
    assert busy not in got and got[-32:] == list(range(6400, 6432))
    assert h.open(_dest(0)) == -1
    h.close(_dest(0), 6410)
    assert h.open(_dest(0)) == 6410


def test_layout_hands_out_runs_extends_in_place_and_skips_excluded_ports() -> None:
    """Blocks are laid out from 1024 upward as contiguous runs that never hold an
    excluded port; a growing block extends in place when it can, else anywhere."""
    layout = BlockLayout(1024, frozenset({2500}))
    a = layout.take(32)
    assert a is not None and a[0] << 5 == 1024
    b = layout.take(32)
    assert b is not None and b[0] << 5 == 2528  # the first run past chunk 2496-2527
    layout.give(a[16:])
    assert layout.take(16, after=a[15]) == a[16:]
    used = layout.free_chunks()
    assert layout.take(used + 1) is None and layout.free_chunks() == used
    assert 2500 >> 5 not in (layout.take(used) or [])


def test_ranges_merge_adjacent_chunks() -> None:
    """A block is shown as merged port ranges, lowest first."""
    block = PortBlock(1, [40, 33, 32, 34])
    assert block.ranges() == [(1024, 1055 + 64), (1280, 1311)]
    assert 1100 >> 5 in block.chunks and 1200 >> 5 not in block.chunks
