"""nfnetlink_queue protocol handling of gateway.adapters.nlqueue, without a kernel.

parse_message() on crafted and random bytes (hypothesis), and
NetlinkQueue.receive() driven through an AF_UNIX SOCK_SEQPACKET socketpair
standing in for the netlink socket: what it sends back is decoded and checked
message by message. The real-kernel tests are in
tests/integration/test_nlqueue.py.
"""

from __future__ import annotations

import errno
import random
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.adapters import nlqueue
from gateway.adapters.nlqueue import (
    KIND_BAD,
    KIND_ERROR,
    KIND_OTHER,
    KIND_PACKET,
    KIND_TRUNCATED,
    KIND_UNUSABLE,
    MARK_TRANSLATED,
    SKBINFO_CSUMNOTREADY,
    SKBINFO_GSO,
    NetlinkQueue,
    parse_message,
)

QUEUE = 7
ADDR_A = "192.0.2.1"  # RFC 5737; the bytes only, nothing is sent
ADDR_B = "192.0.2.2"
NF_INET_LOCAL_OUT = 3
# ----------------------------------------------------------------------------


def _nla(atype: int, value: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(value), atype) + value + b"\0" * ((-len(value)) & 3)


def _pkt_msg(
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
    attrs = _nla(10, payload) if payload_first and payload is not None else b""
    attrs += _nla(1, struct.pack(">IHB", pid, 0x0800, hook))
    if ifindex:
        attrs += _nla(5, struct.pack(">I", 2))  # IFINDEX_OUTDEV, ignored
    if mark is not None:
        attrs += _nla(3, struct.pack(">I", mark))
    if cap_len is not None:
        attrs += _nla(13, struct.pack(">I", cap_len))
    if skbinfo is not None:
        attrs += _nla(14, struct.pack(">I", skbinfo))
    if payload is not None and not payload_first:
        attrs += _nla(10, payload)
    body = struct.pack("=BBH", socket.AF_INET, 0, socket.htons(QUEUE)) + attrs
    return struct.pack("=IHHII", 16 + len(body), 0x300, 0, 0, 0) + body


def _err_msg(err: int, seq: int = 0) -> bytes:
    inner = struct.pack("=IHHII", 32, 0x301, 1, seq, 0)
    return struct.pack("=IHHII", 36, 2, 0, seq, 0) + struct.pack("=i", -err) + inner


@dataclass
class Verdict:
    mtype: int
    verdict: int
    pid: int
    queue: int
    mark: int | None = None
    payload: bytes | None = None


def _decode_verdicts(data: bytes) -> list[Verdict]:
    """Decode a buffer of verdict messages the way the kernel walks it.

    netlink_rcv_skb() advances by NLMSG_ALIGN(nlmsg_len); attributes by
    NLA_ALIGN(nla_len). Strict: any inconsistency fails the test.
    """
    out: list[Verdict] = []
    off = 0
    while off < len(data):
        mlen, mtype, flags, _seq, _pid = struct.unpack_from("=IHHII", data, off)
        assert flags & 1, "NLM_F_REQUEST missing"
        assert mlen >= 20 and off + mlen <= len(data)
        fam, ver, res = struct.unpack_from("=BBH", data, off + 16)
        assert ver == 0
        v = Verdict(mtype, -1, -1, socket.ntohs(res))
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
# parse_message: crafted and random input
# ----------------------------------------------------------------------------


def test_parse_packet_message_fields() -> None:
    """A packet message yields its id, hook, skb info and payload span."""
    payload = bytes(range(61))  # odd length: exercises padding
    msg = _pkt_msg(0xDEADBEEF, payload, hook=4, skbinfo=SKBINFO_GSO | SKBINFO_CSUMNOTREADY)
    buf = b"\xff" * 8 + msg
    kind, nxt, pid, hook, info, poff, plen = parse_message(buf, 8, len(buf))
    assert (kind, pid, hook, info) == (KIND_PACKET, 0xDEADBEEF, 4, 3)
    assert nxt == len(buf)
    assert buf[poff : poff + plen] == payload


def test_parse_other_kinds() -> None:
    """Acks, errors, other messages and truncated packets are told apart."""
    ack = _err_msg(0)
    assert parse_message(ack, 0, len(ack))[:3] == (KIND_ERROR, len(ack), 0)
    enoent = _err_msg(errno.ENOENT)
    assert parse_message(enoent, 0, len(enoent))[:3] == (KIND_ERROR, len(enoent), errno.ENOENT)
    noop = struct.pack("=IHHII", 16, 1, 0, 0, 0)
    assert parse_message(noop, 0, 16)[:2] == (KIND_OTHER, 16)
    trunc = _pkt_msg(5, b"x" * 40, cap_len=1000)
    assert parse_message(trunc, 0, len(trunc))[:3] == (KIND_TRUNCATED, len(trunc), 5)
    nopl = _pkt_msg(6, None)
    assert parse_message(nopl, 0, len(nopl))[:3] == (KIND_UNUSABLE, len(nopl), 6)
    short = _pkt_msg(7, b"abcd")[:-2]  # nlmsg_len now larger than the data
    assert parse_message(short, 0, len(short))[:2] == (KIND_BAD, len(short))
    assert parse_message(b"", 0, 0)[0] == KIND_BAD
    assert parse_message(b"abc", 0, 3)[:2] == (KIND_BAD, 3)


def _walk(buf: bytes, off: int, end: int) -> int:
    """Walk all messages like receive() does; return how many were seen."""
    count = 0
    while off < end:
        res = parse_message(buf, off, end)
        assert len(res) == 7
        kind, nxt, pid, hook, info, poff, plen = res
        assert off < nxt <= end
        if kind in (KIND_PACKET, KIND_TRUNCATED):
            assert poff >= 0 and poff + plen <= end and plen > 0
            assert 0 <= pid < 1 << 32
        off = nxt
        count += 1
    return count


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=512))
def test_parse_random_bytes_never_raises(data: bytes) -> None:
    """Walking arbitrary bytes as netlink messages never raises."""
    _walk(data, 0, len(data))


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
    buf = bytearray(_pkt_msg(1, payload, skbinfo=1) + _err_msg(errno.EINVAL) + _pkt_msg(2, payload))
    for pos, val in flips:
        buf[pos % len(buf)] = val
    end = max(0, len(buf) - cut)
    _walk(bytes(buf), 0, end)


# ----------------------------------------------------------------------------
# receive() through a socketpair: verdict encoding and batching
# ----------------------------------------------------------------------------


@pytest.fixture
def fake_queue() -> Iterator[tuple[NetlinkQueue, socket.socket]]:
    # SEQPACKET keeps message boundaries like netlink, without the
    # max_dgram_qlen (10) limit of AF_UNIX datagram sockets.
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    kernel.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    q = NetlinkQueue.__new__(NetlinkQueue)
    q._attach(ours, QUEUE)
    yield q, kernel
    q.close()
    kernel.close()


def _kernel_reads(kernel: socket.socket) -> list[list[Verdict]]:
    sends: list[list[Verdict]] = []
    while True:
        try:
            data = kernel.recv(1 << 20, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return sends
        sends.append(_decode_verdicts(data))


def _udp_packet(tag: bytes, size: int = 0) -> bytes:
    data = tag + b"." * max(0, size - len(tag))
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28 + len(data), 0, 0, 64, 17, 0,
                     socket.inet_aton(ADDR_A), socket.inet_aton(ADDR_B))  # fmt: skip
    return ip + struct.pack("!HHHH", 1000, 9000, 8 + len(data), 0) + data


def test_receive_mixed_verdicts_one_send(fake_queue: tuple[NetlinkQueue, socket.socket]) -> None:
    """One drain answers every packet (drop, accept, mangled, marked) in one sendmsg."""
    q, kernel = fake_queue
    q.mark = 0x1234
    # results by packet id; a leading run of accepts collapses into one batch
    plan = {10: 1, 11: 1, 12: 2, 13: 1, 14: 0, 15: 3, 16: 7, 17: 1}
    for pid in plan:
        kernel.send(_pkt_msg(pid, _udp_packet(b"#%d" % pid, size=pid), skbinfo=1))

    seen: list[tuple[int, int, int]] = []

    def handler(p: memoryview, hook: int, info: int) -> int:
        pid = int(bytes(p[29:31]))
        seen.append((pid, hook, info))
        if plan[pid] in (2, 3):
            p[28:29] = b"M"
        return plan[pid]

    assert q.receive(handler) == len(plan)
    assert seen == [(pid, NF_INET_LOCAL_OUT, 1) for pid in plan]
    sends = _kernel_reads(kernel)
    assert len(sends) == 1, "all verdicts must go out in one sendmsg"
    got = [(v.mtype & 0xFF, v.verdict, v.pid, v.mark, v.payload) for v in sends[0]]
    assert all(v.queue == QUEUE for v in sends[0])
    m12 = b"M" + _udp_packet(b"#12", 12)[29:]
    m15 = b"M" + _udp_packet(b"#15", 15)[29:]
    assert got == [
        (3, 1, 11, None, None),  # NFQNL_MSG_VERDICT_BATCH accept <= 11
        (1, 1, 12, None, _udp_packet(b"#12", 12)[:28] + m12),
        (1, 1, 13, None, None),
        (1, 0, 14, None, None),
        (1, 1, 15, 0x1234, _udp_packet(b"#15", 15)[:28] + m15),
        (1, 0, 16, None, None),  # unknown result: fail closed
        (1, 1, 17, None, None),
    ]
    assert q.errors == 0 and q.dropped == 0


def test_receive_mangled_unusual_layouts(fake_queue: tuple[NetlinkQueue, socket.socket]) -> None:
    """Verdicts stay right when the header cannot be built in front of the payload."""
    q, kernel = fake_queue
    layouts = {
        1: {"ifindex": False},  # 36 bytes before the payload: in place for 2, not for 3
        2: {"ifindex": False},
        3: {"payload_first": True},  # no room at all
        4: {"payload_first": True},
        5: {},
    }
    results = {1: 2, 2: 3, 3: 2, 4: 3, 5: 2}
    for pid, kw in layouts.items():
        kernel.send(_pkt_msg(pid, _udp_packet(b"#%d" % pid, size=pid + 10), **kw))

    def handler(p: memoryview, hook: int, info: int) -> int:
        p[28] = ord("M")
        return results[int(bytes(p[29:30]))]

    assert q.receive(handler) == 5
    sends = _kernel_reads(kernel)
    assert len(sends) == 1
    for v in sends[0]:
        exp = bytearray(_udp_packet(b"#%d" % v.pid, size=v.pid + 10))
        exp[28] = ord("M")
        assert (v.mtype, v.verdict, v.payload) == (0x301, 1, bytes(exp))
        assert v.mark == (MARK_TRANSLATED if results[v.pid] == 3 else None)
    assert [v.pid for v in sends[0]] == [1, 2, 3, 4, 5]


def test_receive_accept_only_is_one_batch(fake_queue: tuple[NetlinkQueue, socket.socket]) -> None:
    """A run of plain accepts goes out as a single batch verdict."""
    q, kernel = fake_queue
    for pid in range(1, 101):
        kernel.send(_pkt_msg(pid, _udp_packet(b"a")))
    assert q.receive(lambda p, h, i: 1, limit=60) == 60
    assert q.receive(lambda p, h, i: 1, limit=60) == 40
    assert q.receive(lambda p, h, i: 1) == 0
    sends = _kernel_reads(kernel)
    assert [[(v.mtype & 0xFF, v.pid) for v in s] for s in sends] == [[(3, 60)], [(3, 100)]]


def test_receive_many_mangled_large_packets(
    fake_queue: tuple[NetlinkQueue, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """More mangled payload than the receive ring holds: verdicts stay correct.

    The ring is shrunk to hold two 64 KiB datagrams so that it wraps (pending
    verdicts flushed, ring reused) several times within one receive() call.
    """
    q, kernel = fake_queue
    monkeypatch.setattr(nlqueue, "_RING_SIZE", 2 * nlqueue._MAX_DGRAM + 4096)
    q._attach(q._sock, QUEUE)  # type: ignore[arg-type]
    kernel.setblocking(False)
    pkts = {pid: _udp_packet(b"%05d" % pid, 60_001 + pid) for pid in range(1, 41)}
    msgs = [_pkt_msg(pid, pkt, skbinfo=SKBINFO_GSO) for pid, pkt in pkts.items()]

    def handler(p: memoryview, hook: int, info: int) -> int:
        p[8] = 63  # TTL
        return 2

    total = rounds = 0
    verdicts: list[Verdict] = []
    while msgs or total < len(pkts):
        while msgs:
            try:
                kernel.send(msgs[0])
            except BlockingIOError:
                break
            msgs.pop(0)
        total += q.receive(handler, limit=1000)
        verdicts += [v for s in _kernel_reads(kernel) for v in s]
        rounds += 1
        assert rounds < 100
    assert total == len(pkts)
    assert [v.pid for v in verdicts] == list(pkts)
    for v in verdicts:
        exp = bytearray(pkts[v.pid])
        exp[8] = 63
        assert v.payload == bytes(exp)
    assert q.errors == 0


def test_receive_survives_malformed_and_counts(
    fake_queue: tuple[NetlinkQueue, socket.socket],
) -> None:
    """Malformed datagrams are counted and never stop the receive loop."""
    q, kernel = fake_queue
    kernel.send(b"\x01\x02\x03")
    kernel.send(_pkt_msg(1, b"x" * 50)[:-7])
    kernel.send(_err_msg(errno.ENOENT))
    kernel.send(_err_msg(0))
    kernel.send(_pkt_msg(2, None))  # unusable -> dropped with a verdict
    kernel.send(_pkt_msg(3, b"y" * 50, cap_len=9000))  # truncated -> dropped
    kernel.send(_pkt_msg(4, _udp_packet(b"ok")))
    rng = random.Random(7)
    for _ in range(200):
        kernel.send(rng.randbytes(rng.randrange(0, 120)))
    kernel.send(_pkt_msg(5, _udp_packet(b"ok")))
    calls: list[int] = []

    def handler(p: memoryview, hook: int, info: int) -> int:
        calls.append(len(p))
        return 1

    n = q.receive(handler, limit=10_000)
    assert n == 2 == len(calls)
    verdicts = [(v.mtype & 0xFF, v.verdict, v.pid) for s in _kernel_reads(kernel) for v in s]
    assert verdicts == [(1, 0, 2), (1, 0, 3), (1, 1, 4), (1, 1, 5)]
    assert q.dropped == 2 and q.truncated == 1
    assert q.errors >= 4  # 2 malformed + ENOENT + unusable (+ random junk)


def test_batch_accept_disabled_after_possible_orphans(
    fake_queue: tuple[NetlinkQueue, socket.socket],
) -> None:
    """After a message that may leave a packet without verdict: no more batches."""
    q, kernel = fake_queue
    kernel.send(_pkt_msg(1, _udp_packet(b"a")))
    kernel.send(_err_msg(errno.ENOENT))  # harmless: id already gone
    kernel.send(_pkt_msg(2, _udp_packet(b"a")))
    assert q.receive(lambda p, h, i: 1) == 2
    assert [(v.mtype & 0xFF, v.pid) for s in _kernel_reads(kernel) for v in s] == [(3, 2)]
    kernel.send(_pkt_msg(3, _udp_packet(b"a")))
    kernel.send(_pkt_msg(4, _udp_packet(b"a"))[:-9])  # packet 4 unreadable: stays queued
    kernel.send(_pkt_msg(5, _udp_packet(b"a")))
    assert q.receive(lambda p, h, i: 1) == 2
    kernel.send(_pkt_msg(6, _udp_packet(b"a")))
    assert q.receive(lambda p, h, i: 1) == 1
    verdicts = [(v.mtype & 0xFF, v.verdict, v.pid) for s in _kernel_reads(kernel) for v in s]
    # batch covers only 3 (before the bad message); 5 and 6 one by one
    assert verdicts == [(3, 1, 3), (1, 1, 5), (1, 1, 6)]
    assert q.errors == 2


def test_handler_exception_drops_its_packet_and_flushes(
    fake_queue: tuple[NetlinkQueue, socket.socket],
) -> None:
    """A raising handler drops its packet and the verdicts before it still go out."""
    q, kernel = fake_queue
    for pid in (1, 2, 3):
        kernel.send(_pkt_msg(pid, _udp_packet(b"z")))

    def handler(p: memoryview, hook: int, info: int) -> int:
        if len(calls) == 1:
            raise RuntimeError("boom")
        calls.append(1)
        return 1

    calls: list[int] = []
    with pytest.raises(RuntimeError):
        q.receive(handler)
    assert [(v.mtype & 0xFF, v.verdict, v.pid) for s in _kernel_reads(kernel) for v in s] == [
        (3, 1, 1),
        (1, 0, 2),
    ]
    calls.append(1)
    assert q.receive(handler) == 1


def test_closed_queue() -> None:
    """Closing is idempotent and a closed queue refuses to receive."""
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    q = NetlinkQueue.__new__(NetlinkQueue)
    q._attach(ours, QUEUE)
    q.close()
    q.close()
    kernel.close()
    assert q.fileno() == -1
    with pytest.raises(OSError):
        q.receive(lambda p, h, i: 1)


def test_constants_match_kernel_header() -> None:
    """The attribute and flag numbers used here are the kernel UAPI header's."""
    hdr = Path("/usr/include/linux/netfilter/nfnetlink_queue.h")
    assert hdr.exists(), "linux-libc-dev is not installed (make setup installs it)"
    text = hdr.read_text()
    flat = " ".join(text.split())
    for name in ("NFQA_SKB_CSUMNOTREADY (1 << 0)", "NFQA_SKB_GSO (1 << 1)",
                 "NFQA_SKB_CSUM_NOTVERIFIED (1 << 2)", "NFQA_CFG_F_GSO (1 << 2)"):  # fmt: skip
        assert name in flat
    enum = text.split("enum nfqnl_attr_type {")[1].split("}")[0]
    names = [ln.strip().split(",")[0] for ln in enum.splitlines() if ln.strip().startswith("NFQA")]
    assert names.index("NFQA_PACKET_HDR") == nlqueue._NFQA_PACKET_HDR
    assert names.index("NFQA_VERDICT_HDR") == nlqueue._NFQA_VERDICT_HDR
    assert names.index("NFQA_MARK") == nlqueue._NFQA_MARK
    assert names.index("NFQA_PAYLOAD") == nlqueue._NFQA_PAYLOAD
    assert names.index("NFQA_CAP_LEN") == nlqueue._NFQA_CAP_LEN
    assert names.index("NFQA_SKB_INFO") == nlqueue._NFQA_SKB_INFO


# ----------------------------------------------------------------------------
