"""The nfnetlink_queue wire format of gateway.adapters.nfqueue.codec, without a kernel.

parse_message() on crafted input and fuzzed with hypothesis (random bytes,
corrupted real messages, generated messages with wrong lengths and
attributes): it never raises and always moves forward. The packers are
decoded the way the kernel walks a buffer. The message builders and the
decoder here are also used by tests/unit/test_nfqueue_queue.py; the
real-kernel tests are in tests/integration/test_nfqueue.py.
"""

from __future__ import annotations

import errno
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.adapters.kernel import Hook, Mark, SkbInfo
from gateway.adapters.nfqueue import codec
from gateway.adapters.nfqueue.codec import (
    Kind,
    Message,
    pack_batch_into,
    pack_bind,
    pack_mangled_header_into,
    pack_unbind,
    pack_verdict,
    parse,
    parse_message,
)
from gateway.core.verdict import Verdict

QUEUE = 7
NF_INET_LOCAL_OUT = Hook.LOCAL_OUT

# ----------------------------------------------------------------------------
# builders and a strict decoder (shared with test_nfqueue_queue.py)
# ----------------------------------------------------------------------------


def nla(atype: int, value: bytes) -> bytes:
    """One attribute, padded like nla_put() does."""
    return struct.pack("=HH", 4 + len(value), atype) + value + b"\0" * ((-len(value)) & 3)


def pkt_msg(
    pid: int,
    payload: bytes | None,
    *,
    hook: int = NF_INET_LOCAL_OUT,
    skbinfo: int | None = None,
    cap_len: int | None = None,
    mark: int | None = None,
    ifindex: bool = True,
    payload_first: bool = False,
) -> bytes:
    """An NFQNL_MSG_PACKET as the kernel builds it (attribute order included).

    ``ifindex=False`` / ``payload_first=True`` build layouts the kernel does
    not produce (too little room before the payload for an in-place verdict).
    """
    attrs = nla(10, payload) if payload_first and payload is not None else b""
    attrs += nla(1, struct.pack(">IHB", pid, 0x0800, hook))
    if ifindex:
        attrs += nla(5, struct.pack(">I", 2))  # IFINDEX_OUTDEV, ignored
    if mark is not None:
        attrs += nla(3, struct.pack(">I", mark))
    if cap_len is not None:
        attrs += nla(13, struct.pack(">I", cap_len))
    if skbinfo is not None:
        attrs += nla(14, struct.pack(">I", skbinfo))
    if payload is not None and not payload_first:
        attrs += nla(10, payload)
    body = struct.pack("=BBH", socket.AF_INET, 0, socket.htons(QUEUE)) + attrs
    return struct.pack("=IHHII", 16 + len(body), 0x300, 0, 0, 0) + body


def err_msg(err: int, seq: int = 0) -> bytes:
    """An NLMSG_ERROR (0: an ack) echoing only the request's header (NETLINK_CAP_ACK)."""
    inner = struct.pack("=IHHII", 32, 0x301, 1, seq, 0)
    return struct.pack("=IHHII", 36, 2, 0, seq, 0) + struct.pack("=i", -err) + inner


@dataclass
class Decoded:
    """One verdict message as the kernel would read it."""

    mtype: int
    verdict: int
    pid: int
    queue: int
    mark: int | None = None
    payload: bytes | None = None


def decode_verdicts(data: bytes) -> list[Decoded]:
    """Decode a buffer of verdict messages the way the kernel walks it.

    netlink_rcv_skb() advances by NLMSG_ALIGN(nlmsg_len); attributes by
    NLA_ALIGN(nla_len). Strict: any inconsistency fails the test.
    """
    out: list[Decoded] = []
    off = 0
    while off < len(data):
        mlen, mtype, flags, _seq, _pid = struct.unpack_from("=IHHII", data, off)
        assert flags & 1, "NLM_F_REQUEST missing"
        assert mlen >= 20 and off + mlen <= len(data)
        fam, ver, res = struct.unpack_from("=BBH", data, off + 16)
        assert ver == 0
        v = Decoded(mtype, -1, -1, socket.ntohs(res))
        a = off + 20
        while a < off + mlen:
            alen, atype = struct.unpack_from("=HH", data, a)
            assert alen >= 4 and a + alen <= off + mlen
            val = data[a + 4 : a + alen]
            if atype == 2:
                v.verdict, v.pid = struct.unpack(">II", val)
            elif atype == 3:
                (v.mark,) = struct.unpack(">I", val)
            elif atype == 10:
                v.payload = bytes(val)
            else:
                raise AssertionError(f"unexpected attribute {atype}")
            a += (alen + 3) & ~3
        out.append(v)
        off += (mlen + 3) & ~3
    return out


# ----------------------------------------------------------------------------
# parse_message: crafted input
# ----------------------------------------------------------------------------


def test_parse_packet_message_fields() -> None:
    """A packet message yields its id, hook, skb info and payload span."""
    payload = bytes(range(61))  # odd length: exercises padding
    msg = pkt_msg(0xDEADBEEF, payload, hook=Hook.POST_ROUTING, skbinfo=SkbInfo.GSO | SkbInfo.CSUMNOTREADY)
    buf = b"\xff" * 8 + msg
    kind, nxt, pid, hook, info, poff, plen = parse_message(buf, 8, len(buf))
    assert (kind, pid, hook, info) == (Kind.PACKET, 0xDEADBEEF, 4, 3)
    assert nxt == len(buf)
    assert buf[poff : poff + plen] == payload
    assert parse(buf, 8, len(buf)) == Message(kind, nxt, pid, hook, info, poff, plen)


def test_parse_other_kinds() -> None:
    """Acks, errors, other messages and truncated packets are told apart."""
    ack = err_msg(0)
    assert parse_message(ack, 0, len(ack))[:3] == (Kind.ERROR, len(ack), 0)
    enoent = err_msg(errno.ENOENT)
    assert parse_message(enoent, 0, len(enoent))[:3] == (Kind.ERROR, len(enoent), errno.ENOENT)
    noop = struct.pack("=IHHII", 16, 1, 0, 0, 0)
    assert parse_message(noop, 0, 16)[:2] == (Kind.OTHER, 16)
    trunc = pkt_msg(5, b"x" * 40, cap_len=1000)
    assert parse_message(trunc, 0, len(trunc))[:3] == (Kind.TRUNCATED, len(trunc), 5)
    nopl = pkt_msg(6, None)
    assert parse_message(nopl, 0, len(nopl))[:3] == (Kind.UNUSABLE, len(nopl), 6)
    short = pkt_msg(7, b"abcd")[:-2]  # nlmsg_len now larger than the data
    assert parse_message(short, 0, len(short))[:2] == (Kind.BAD, len(short))
    assert parse_message(b"", 0, 0)[0] == Kind.BAD
    assert parse_message(b"abc", 0, 3)[:2] == (Kind.BAD, 3)


def test_parse_kinds_are_the_enum_members() -> None:
    """Every kind returned is a Kind member itself (the queue compares them by identity)."""
    msgs = [pkt_msg(1, b"p"), err_msg(0), struct.pack("=IHHII", 16, 1, 0, 0, 0), b"junk",
            pkt_msg(2, b"x" * 40, cap_len=1000), pkt_msg(3, None)]  # fmt: skip
    kinds = [parse_message(m, 0, len(m))[0] for m in msgs]
    assert kinds == [Kind.PACKET, Kind.ERROR, Kind.OTHER, Kind.BAD, Kind.TRUNCATED, Kind.UNUSABLE]
    assert all(type(k) is Kind for k in kinds)


def test_error_seq_matches_request() -> None:
    """An error reply is matched to its request by the echoed header's seq."""
    msg = err_msg(errno.EPERM, seq=42)
    m = parse(msg, 0, len(msg))
    assert (m.kind, m.packet_id) == (Kind.ERROR, errno.EPERM)
    assert codec.error_seq(msg, 0, m.next_off) == 42
    assert codec.error_seq(msg[:24], 0, 24) is None


# ----------------------------------------------------------------------------
# parse_message: fuzzing
# ----------------------------------------------------------------------------


def walk(buf: bytes | bytearray, off: int, end: int) -> int:
    """Walk all messages like receive() does, checking every record; return how many."""
    count = 0
    while off < end:
        res = parse_message(buf, off, end)
        assert len(res) == 7
        kind, nxt, pid, hook, info, poff, plen = res
        assert type(kind) is Kind
        assert off < nxt <= end
        if kind in (Kind.PACKET, Kind.TRUNCATED):
            assert poff >= 0 and poff + plen <= end and plen > 0
            assert 0 <= pid < 1 << 32
            assert poff >= off + 24  # past nlmsghdr, nfgenmsg and the attribute header
        if kind is Kind.UNUSABLE:
            assert (poff, plen) == (0, 0) and 0 <= pid < 1 << 32
        off = nxt
        count += 1
    return count


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=512))
def test_parse_random_bytes_never_raises(data: bytes) -> None:
    """Walking arbitrary bytes as netlink messages never raises."""
    walk(data, 0, len(data))


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.binary(min_size=1, max_size=300),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
    st.integers(0, 64),
)
def test_parse_mutated_messages_never_raises(
    payload: bytes, flips: list[tuple[int, int]], cut: int
) -> None:
    """Corrupted and cut real messages never make the parser raise."""
    buf = bytearray(pkt_msg(1, payload, skbinfo=1) + err_msg(errno.EINVAL) + pkt_msg(2, payload))
    for pos, val in flips:
        buf[pos % len(buf)] = val
    end = max(0, len(buf) - cut)
    walk(bytes(buf), 0, end)


_ATTR_TYPES = st.sampled_from([1, 2, 3, 5, 10, 13, 14, 0, 0x4000 | 10, 0x8000 | 1, 0x3FFF, 0xFFFF])


@st.composite
def _attributes(draw: st.DrawFn) -> bytes:
    """Attributes of a packet message, each with a length that may lie."""
    out = b""
    for atype in draw(st.lists(_ATTR_TYPES, max_size=8)):
        value = draw(st.binary(max_size=24))
        true_len = 4 + len(value)
        nla_len = draw(st.one_of(st.just(true_len), st.integers(0, 0xFFFF), st.integers(0, 8)))
        out += struct.pack("=HH", nla_len, atype) + value + b"\0" * draw(st.integers(0, 3))
    return out


@st.composite
def _messages(draw: st.DrawFn) -> bytes:
    """A datagram of plausible netlink messages with corrupted lengths and attributes."""
    out = b""
    for _ in range(draw(st.integers(1, 4))):
        mtype = draw(st.sampled_from([0x300, 0x300, 2, 1, 3, 0x301, draw(st.integers(0, 0xFFFF))]))
        if mtype == 2:
            body = struct.pack("=i", draw(st.integers(-(2**31), 2**31 - 1)))
            body += draw(st.binary(max_size=20))
        else:
            body = struct.pack("=BBH", socket.AF_INET, 0, socket.htons(QUEUE)) + draw(_attributes())
        true_len = 16 + len(body)
        mlen = draw(st.one_of(st.just(true_len), st.integers(0, 0xFFFFFFFF), st.integers(0, 40),
                              st.integers(max(0, true_len - 8), true_len + 8)))  # fmt: skip
        out += struct.pack("=IHHII", mlen, mtype, 0, 0, 0) + body
        out += b"\0" * draw(st.integers(0, 3))
    return out


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_messages(), st.integers(0, 7), st.integers(0, 7))
def test_parse_generated_corrupt_messages_never_raise(data: bytes, lead: int, cut: int) -> None:
    """Messages with lying nlmsg_len / nla_len / attribute types never raise and always progress."""
    buf = b"\xaa" * lead + data
    walk(buf, lead, max(lead, len(buf) - cut))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64), st.integers(-70, 70), st.integers(-70, 70))
def test_parse_any_offsets_never_raise(data: bytes, off: int, end: int) -> None:
    """Offsets outside the buffer (negative, past the end, end before off) give BAD, never raise."""
    kind, nxt, *_ = parse_message(data, off, end)
    assert nxt > off
    if off < end:
        assert nxt <= end
    if off < 0 or end > len(data) or end - off < 16:
        assert kind is Kind.BAD


# ----------------------------------------------------------------------------
# packers
# ----------------------------------------------------------------------------


def test_pack_verdict_and_batch() -> None:
    """A simple verdict and a batch verdict carry type, queue, verdict and id."""
    v = decode_verdicts(pack_verdict(QUEUE, 0x01020304, Verdict.DROP))
    assert [(d.mtype, d.queue, d.verdict, d.pid) for d in v] == [(0x301, QUEUE, 0, 0x01020304)]
    buf = bytearray(64)
    end = pack_batch_into(buf, 0, QUEUE, 99)
    end = pack_batch_into(buf, end, QUEUE, 100, Verdict.DROP)
    v = decode_verdicts(bytes(buf[:end]))
    got = [(d.mtype, d.queue, d.verdict, d.pid) for d in v]
    assert got == [(0x303, QUEUE, 1, 99), (0x303, QUEUE, 0, 100)]


def test_pack_mangled_header_with_and_without_mark() -> None:
    """A mangled verdict is its header followed by the payload and padding to 4 bytes."""
    payload = b"\x45" + bytes(20)
    pad = b"\0" * ((-len(payload)) & 3)
    for mark in (None, Mark.TRANSLATED):
        buf = bytearray(64)
        size = pack_mangled_header_into(buf, 0, QUEUE, 77, len(payload), mark)
        assert size == (36 if mark is None else 44)
        (v,) = decode_verdicts(bytes(buf[:size]) + payload + pad)
        assert (v.mtype, v.queue, v.verdict, v.pid, v.mark, v.payload) == (
            0x301, QUEUE, 1, 77, mark, payload,
        )  # fmt: skip


def test_pack_bind_and_unbind() -> None:
    """The bind message asks for an ack and carries command, copy mode, length and flags."""
    msg = pack_bind(QUEUE, 5, copy_range=0xFFFF, max_len=4096, gso=True)
    mlen, mtype, flags, seq, _ = struct.unpack_from("=IHHII", msg)
    assert (mlen, mtype, flags, seq) == (len(msg), 0x302, 0x1 | 0x4, 5)
    assert struct.unpack_from("=BBH", msg, 16) == (socket.AF_UNSPEC, 0, socket.htons(QUEUE))
    attrs = {}
    a = 20
    while a < len(msg):
        alen, atype = struct.unpack_from("=HH", msg, a)
        attrs[atype] = msg[a + 4 : a + alen]
        a += (alen + 3) & ~3
    assert attrs[1] == bytes([1, 0, 0, 0])  # NFQNL_CFG_CMD_BIND
    assert struct.unpack(">IB", attrs[2]) == (codec.MAX_COPY_RANGE, 2)  # clamped, COPY_PACKET
    assert struct.unpack(">I", attrs[3]) == (4096,)
    assert struct.unpack(">I", attrs[4]) == (1 | 4,)  # mask: FAIL_OPEN | GSO
    assert struct.unpack(">I", attrs[5]) == (4,)
    assert struct.unpack(">I", pack_bind(QUEUE, 1, copy_range=100, max_len=1, fail_open=True)[-4:]) == (1,)
    unbind = pack_unbind(QUEUE)
    assert struct.unpack_from("=IHH", unbind) == (len(unbind), 0x302, 0x1)
    assert unbind[20:] == struct.pack("=HH", 8, 1) + bytes([2, 0, 0, 0])


def test_constants_match_kernel_header() -> None:
    """The attribute and flag numbers used here are the kernel UAPI header's."""
    hdr = Path("/usr/include/linux/netfilter/nfnetlink_queue.h")
    assert hdr.exists(), "linux-libc-dev is not installed (make setup installs it)"
    text = hdr.read_text()
    flat = " ".join(text.split())
    for name in ("NFQA_SKB_CSUMNOTREADY (1 << 0)", "NFQA_SKB_GSO (1 << 1)",
                 "NFQA_SKB_CSUM_NOTVERIFIED (1 << 2)", "NFQA_CFG_F_GSO (1 << 2)"):  # fmt: skip
        assert name in flat
    assert (SkbInfo.CSUMNOTREADY, SkbInfo.GSO, SkbInfo.CSUM_NOTVERIFIED) == (1 << 0, 1 << 1, 1 << 2)
    assert codec.NFQA_CFG_F_GSO == 1 << 2
    enum = text.split("enum nfqnl_attr_type {")[1].split("}")[0]
    names = [ln.strip().split(",")[0] for ln in enum.splitlines() if ln.strip().startswith("NFQA")]
    assert names.index("NFQA_PACKET_HDR") == codec.NFQA_PACKET_HDR
    assert names.index("NFQA_VERDICT_HDR") == codec.NFQA_VERDICT_HDR
    assert names.index("NFQA_MARK") == codec.NFQA_MARK
    assert names.index("NFQA_PAYLOAD") == codec.NFQA_PAYLOAD
    assert names.index("NFQA_CAP_LEN") == codec.NFQA_CAP_LEN
    assert names.index("NFQA_SKB_INFO") == codec.NFQA_SKB_INFO
