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
        self.block = PortBlock(0xC6336410, start, size)
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
    h = Harness(size=4)
    for _ in range(4):
        h.open(_dest(0))
    assert h.block.inventory(UDP).in_use == 4
    assert 2048 <= h.open(_dest(1)) < 2052
    assert h.block.inventory(UDP).in_use == 4


def test_freed_ports_go_to_the_back_of_the_line() -> None:
    """A port released now is handed out only after every other free port."""
    h = Harness(size=8)
    first = h.open(_dest(0))
    h.close(_dest(0), first)
    seen = [h.open(_dest(0)) for _ in range(8)]
    assert seen[-1] == first
    assert first not in seen[:-1]


def test_shrink_keeps_lower_half() -> None:
    """Halving a block keeps its start and its lower ports."""
    h = Harness(size=8)
    h.block.shrink(4)
    ports = [h.open(_dest(0)) for _ in range(5)]
    assert sorted(ports[:4]) == [2048, 2049, 2050, 2051]
    assert ports[4] == -1


def test_layout_is_contiguous_aligned_and_skips_excluded_ports() -> None:
    """Blocks are laid out from 1024 upward, disjoint, and never contain an excluded port."""
    layout = BlockLayout(1024, frozenset({2500}))
    starts = [layout.assign(i) for i in range(3)]
    assert starts == [1024, 3072, 4096]
    layout.halve()
    assert layout.assign(99) == 1536
