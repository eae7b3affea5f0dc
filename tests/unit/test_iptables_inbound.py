"""The rule set for issue 10: hairpin is marked then queued from the inside, probe SYNs are
queued from OUTPUT, and the guard, the commit per table and fail-closed queueing stay."""

from __future__ import annotations

from gateway.adapters.iptables import ruleset
from gateway.adapters.kernel import Hook, Mark
from gateway.adapters.nfqueue.codec import NFQA_MARK, parse

PUB = 0xC633640A  # 198.51.100.10


def _table(text: str, name: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index(f"*{name}")
    return lines[start + 1 : lines.index("COMMIT", start)]


def test_hairpin_is_untracked_marked_then_queued_with_tcp_on_the_gso_queue() -> None:
    """From the inside to a public address: notrack in raw; in mangle the HAIRPIN mark just
    before the queue rules (TCP to the GSO queue, the rest to the plain one)."""
    text = ruleset("in0", "out0", 3, [PUB], tcp_queue=4)
    assert "-A SNATGW-PRE -i in0 -d 198.51.100.10/32 -j CT --notrack" in _table(text, "raw")
    mangle = _table(text, "mangle")
    mark = "-A SNATGW-PRE -i in0 -d 198.51.100.10/32 -j MARK --set-xmark 0x40000000/0x40000000"
    i = mangle.index(mark)
    assert mangle[i + 1] == "-A SNATGW-PRE -i in0 -d 198.51.100.10/32 -p tcp -j NFQUEUE --queue-num 4"
    assert mangle[i + 2] == "-A SNATGW-PRE -i in0 -d 198.51.100.10/32 -j NFQUEUE --queue-num 3"
    assert Mark.HAIRPIN == 0x40000000 and Mark.HAIRPIN & (Mark.INSIDE | Mark.TRANSLATED) == 0


def test_a_public_source_from_the_outside_is_dropped_first_in_raw() -> None:
    """A packet on the outside claiming a public address as its source is dropped in raw, before
    any rule that would queue it; the guard alone has no such rule (nothing is public then)."""
    raw = _table(ruleset("in0", "out0", 3, [PUB], tcp_queue=4), "raw")
    drop = "-A SNATGW-PRE -i out0 -s 198.51.100.10/32 -j DROP"
    assert raw.index(drop) < raw.index("-A SNATGW-PRE -i out0 -d 198.51.100.10/32 -j CT --notrack")
    assert next(ln for ln in raw if ln.startswith("-A ")) == drop
    assert "-s 198.51.100.10/32" not in ruleset("in0", "out0", 3, [PUB], translate=False)


def test_probe_syns_are_queued_from_output_only_with_probes() -> None:
    """With probes the host's SYNs to the inside go to the plain queue (full checksums); without, nothing."""
    syn = "-A SNATGW-OUT -o in0 -p tcp -m tcp --syn -j NFQUEUE --queue-num 3"
    assert syn in _table(ruleset("in0", "out0", 3, [PUB], tcp_queue=4, probes=True), "mangle")
    assert syn not in ruleset("in0", "out0", 3, [PUB], tcp_queue=4)


def test_guard_order_commits_and_fail_closed_are_kept() -> None:
    """SNATGW-POST before SNATGW-GUARD, three commits, no bypass; the guard alone queues nothing."""
    text = ruleset("in0", "out0", 3, [PUB], tcp_queue=4, probes=True)
    assert text.count("COMMIT") == 3 and "--queue-bypass" not in text
    inserts = [ln for ln in _table(text, "mangle") if ln.startswith("-I POSTROUTING")]
    assert inserts == ["-I POSTROUTING 1 -j SNATGW-GUARD", "-I POSTROUTING 1 -j SNATGW-POST"]
    guard = ruleset("in0", "out0", 0, [PUB], translate=False, probes=True)
    assert "NFQUEUE" not in guard and "HAIRPIN" not in guard and "0x40000000" not in guard
    for line in text.splitlines():
        if line.startswith(("-A", "-I")):
            assert line.split()[1].startswith("SNATGW-") or "-j SNATGW-" in line


def _packet_message(hook: int, mark: int | None) -> bytes:
    """A NFQNL_MSG_PACKET with a packet header, an optional mark and a 20-byte payload."""
    import struct

    def attr(t: int, v: bytes) -> bytes:
        return struct.pack("=HH", 4 + len(v), t) + v + b"\0" * (-len(v) % 4)

    attrs = attr(1, struct.pack(">IHB", 7, 0x0800, hook) + b"\0")
    if mark is not None:
        attrs += attr(NFQA_MARK, struct.pack(">I", mark))
    attrs += attr(10, bytes(20))
    body = struct.pack("=BBH", 0, 0, 0) + attrs
    return struct.pack("=IHHII", 16 + len(body), 0x300, 0, 0, 0) + body


def test_codec_reports_the_hairpin_mark_as_its_own_hook() -> None:
    """A PREROUTING packet with Mark.HAIRPIN in its mark comes out as PRE_ROUTING_HAIRPIN;
    other marks and unmarked packets keep their hook."""
    for mark, want in (
        (None, Hook.PRE_ROUTING),
        (Mark.TRANSLATED, Hook.PRE_ROUTING),
        (Mark.HAIRPIN, Hook.PRE_ROUTING_HAIRPIN),
        (Mark.HAIRPIN | 0x5, Hook.PRE_ROUTING_HAIRPIN),
    ):
        buf = _packet_message(Hook.PRE_ROUTING, mark)
        m = parse(buf, 0, len(buf))
        assert (m.packet_id, m.hook, m.payload_len) == (7, want, 20)
    buf = _packet_message(Hook.POST_ROUTING, Mark.INSIDE)
    assert parse(buf, 0, len(buf)).hook == Hook.POST_ROUTING
