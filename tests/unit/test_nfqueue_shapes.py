"""ShapeCache: the shape-cached parse of packet messages gives what parse_message gives."""

from __future__ import annotations

import random
import struct

from gateway.adapters.nfqueue.codec import Kind, parse_message
from gateway.adapters.nfqueue.shapes import MAX_SHAPES, ShapeCache
from tests.unit.test_nfqueue_codec import err_msg, nla, pkt_msg

HOOKS = (1, 3, 4)


def _variants(rng: random.Random) -> bytes:
    """A packet message of one of a few layouts, or something that is not one."""
    pick = rng.randrange(10)
    payload = bytes(rng.randrange(256) for _ in range(rng.choice((1, 3, 28, 64, 92, 1500))))
    pid = rng.randrange(1 << 32)
    if pick == 0:
        return pkt_msg(pid, payload, cap_len=len(payload) + rng.choice((-1, 0, 1, 500)))
    if pick == 1:
        return err_msg(rng.choice((0, 2, 22)))
    if pick == 2:  # an attribute after the payload: not a shape the cache may answer
        msg = pkt_msg(pid, payload, mark=0x20000000)
        extra = nla(14, struct.pack(">I", 3))
        return struct.pack("=I", len(msg) + len(extra)) + msg[4:] + extra
    if pick == 3:
        return pkt_msg(pid, None, mark=0x40000000)
    if pick == 4:  # the rarer layouts
        return pkt_msg(pid, payload, hook=rng.choice(HOOKS), mark=rng.choice((0x40000000, 0x60000000)),
                       skbinfo=rng.choice((None, 1, 3)), ifindex=rng.random() < 0.5)
    return pkt_msg(pid, payload, hook=rng.choice((1, 4)), mark=rng.choice((None, 0x20000000)))


def test_shape_cache_agrees_with_parse_message_on_mixed_streams() -> None:
    """Over a random stream of layouts, marks, hooks and kinds, every result equals the walk's."""
    rng = random.Random(11)
    cache = ShapeCache()
    for _ in range(4000):
        msg = bytearray(b"\xee" * rng.randrange(0, 9) + _variants(rng))
        off = len(msg) - len(msg.lstrip(b"\xee"))
        end = len(msg) - rng.choice((0, 0, 0, 1, 5)) if rng.random() < 0.1 else len(msg)
        assert cache.parse(msg, off, end) == parse_message(msg, off, end)
    assert cache.hits > 1000
    assert len(cache.shapes) <= MAX_SHAPES


def test_a_known_shape_answers_without_the_walk_and_reads_the_new_id_and_length() -> None:
    """The second message of a layout is a hit with its own packet id and payload span."""
    cache = ShapeCache()
    a = bytearray(pkt_msg(1, b"x" * 92, hook=4, mark=0x20000000, skbinfo=1))
    b = bytearray(pkt_msg(99, b"y" * 93, hook=4, mark=0x20000000, skbinfo=1))
    assert cache.parse(a, 0, len(a)) == parse_message(a, 0, len(a))
    got = cache.parse(b, 0, len(b))
    assert (cache.hits, cache.misses) == (1, 1)
    assert got == parse_message(b, 0, len(b))
    assert got[2] == 99 and bytes(b[got[5] : got[5] + got[6]]) == b"y" * 93


def test_a_different_mark_is_a_different_shape_so_the_hairpin_hook_is_never_reused() -> None:
    """The mark is part of the shape: a hairpin-marked packet never takes a plain one's hook."""
    cache = ShapeCache()
    plain = bytearray(pkt_msg(1, b"x" * 40, hook=0, mark=0x20000000))
    hairpin = bytearray(pkt_msg(2, b"x" * 40, hook=0, mark=0x40000000))
    cache.parse(plain, 0, len(plain))
    assert cache.parse(hairpin, 0, len(hairpin)) == parse_message(hairpin, 0, len(hairpin))
    assert cache.parse(hairpin, 0, len(hairpin))[3] & 0x100


def test_truncated_packets_never_become_a_shape() -> None:
    """A message with NFQA_CAP_LEN is always walked: truncation depends on the length."""
    cache = ShapeCache()
    for n in (40, 41, 40):
        msg = bytearray(pkt_msg(n, b"x" * n, cap_len=40))
        got = cache.parse(msg, 0, len(msg))
        assert got == parse_message(msg, 0, len(msg))
    assert cache.shapes == [] and cache.hits == 0
    assert cache.parse(bytearray(pkt_msg(5, b"x" * 40, cap_len=90)), 0, 64)[0] is not Kind.PACKET


def test_random_bytes_after_a_learned_shape_agree_with_the_walk() -> None:
    """Garbage and mutated messages give the walk's answer (the fast path never guesses)."""
    rng = random.Random(5)
    cache = ShapeCache()
    base = bytearray(pkt_msg(7, b"z" * 64, hook=4, mark=0x20000000))
    cache.parse(base, 0, len(base))
    for _ in range(3000):
        msg = bytearray(base)
        for _ in range(rng.randrange(1, 4)):
            msg[rng.randrange(len(msg))] = rng.randrange(256)
        if rng.random() < 0.2:
            msg = bytearray(rng.randbytes(rng.randrange(0, 200)))
        end = rng.randrange(0, len(msg) + 1) if rng.random() < 0.2 else len(msg)
        assert cache.parse(msg, 0, end) == parse_message(msg, 0, end)
