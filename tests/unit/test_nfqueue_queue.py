"""NetlinkQueue.receive() of gateway.adapters.nfqueue.queue, without a kernel.

An AF_UNIX SOCK_SEQPACKET socketpair stands in for the netlink socket: what
receive() sends back is decoded (tests/unit/test_nfqueue_codec.py's decoder,
strict like the kernel) and checked message by message. The real-kernel tests
are in tests/integration/test_nfqueue.py.
"""

from __future__ import annotations

import errno
import random
import socket
import struct
from collections.abc import Iterator

import pytest

from gateway.adapters.kernel import Mark, SkbInfo
from gateway.adapters.nfqueue import NetlinkQueue
from gateway.adapters.nfqueue import queue as queue_mod
from gateway.adapters.nfqueue import verdicts as verdicts_mod
from gateway.adapters.nfqueue.codec import pack_mangled_header_into
from gateway.core.verdict import Verdict
from tests.unit.test_nfqueue_codec import NF_INET_LOCAL_OUT, QUEUE, Decoded, decode_verdicts, err_msg, pkt_msg

ADDR_A = "192.0.2.1"  # RFC 5737; the bytes only, nothing is sent
ADDR_B = "192.0.2.2"


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


def _kernel_raw(kernel: socket.socket) -> list[bytes]:
    sends: list[bytes] = []
    while True:
        try:
            sends.append(kernel.recv(1 << 20, socket.MSG_DONTWAIT))
        except BlockingIOError:
            return sends


def _kernel_reads(kernel: socket.socket) -> list[list[Decoded]]:
    return [decode_verdicts(data) for data in _kernel_raw(kernel)]


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
    plan = {10: Verdict.ACCEPT, 11: Verdict.ACCEPT, 12: Verdict.ACCEPT_MODIFIED, 13: Verdict.ACCEPT,
            14: Verdict.DROP, 15: Verdict.ACCEPT_MODIFIED_MARK, 16: 7, 17: Verdict.ACCEPT}  # fmt: skip
    for pid in plan:
        kernel.send(pkt_msg(pid, _udp_packet(b"#%d" % pid, size=pid), skbinfo=1))

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


def test_in_place_verdict_is_the_codec_layout(fake_queue: tuple[NetlinkQueue, socket.socket]) -> None:
    """The verdict built in place in the ring is byte for byte the codec's header + payload + padding."""
    q, kernel = fake_queue
    payloads = {1: _udp_packet(b"#1", 13), 2: _udp_packet(b"#2", 16)}
    for pid, p in payloads.items():
        kernel.send(pkt_msg(pid, p, skbinfo=1))
    results = {1: Verdict.ACCEPT_MODIFIED, 2: Verdict.ACCEPT_MODIFIED_MARK}
    assert q.receive(lambda p, h, i: results[int(bytes(p[29:30]))]) == 2
    expected = b""
    for pid, p in payloads.items():
        head = bytearray(44)
        size = pack_mangled_header_into(head, 0, QUEUE, pid, len(p), Mark.TRANSLATED if pid == 2 else None)
        expected += bytes(head[:size]) + p + b"\0" * ((-len(p)) & 3)
    assert _kernel_raw(kernel) == [expected]


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
        kernel.send(pkt_msg(pid, _udp_packet(b"#%d" % pid, size=pid + 10), **kw))

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
        assert v.mark == (Mark.TRANSLATED if results[v.pid] == 3 else None)
    assert [v.pid for v in sends[0]] == [1, 2, 3, 4, 5]


def test_receive_accept_only_is_one_batch(fake_queue: tuple[NetlinkQueue, socket.socket]) -> None:
    """A run of plain accepts goes out as a single batch verdict."""
    q, kernel = fake_queue
    for pid in range(1, 101):
        kernel.send(pkt_msg(pid, _udp_packet(b"a")))
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
    monkeypatch.setattr(queue_mod, "_RING_SIZE", 2 * queue_mod._MAX_DGRAM + 4096)
    q._attach(q._sock, QUEUE)  # type: ignore[arg-type]
    kernel.setblocking(False)
    pkts = {pid: _udp_packet(b"%05d" % pid, 60_001 + pid) for pid in range(1, 41)}
    msgs = [pkt_msg(pid, pkt, skbinfo=SkbInfo.GSO) for pid, pkt in pkts.items()]

    def handler(p: memoryview, hook: int, info: int) -> int:
        p[8] = 63  # TTL
        return 2

    total = rounds = 0
    verdicts: list[Decoded] = []
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


def test_receive_iov_limit_splits_sends(
    fake_queue: tuple[NetlinkQueue, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the iovec limit the pending verdicts go out and the drain goes on, in order."""
    q, kernel = fake_queue
    monkeypatch.setattr(verdicts_mod, "_IOV_LIMIT", 4)
    for pid in range(1, 12):
        kernel.send(pkt_msg(pid, _udp_packet(b"#%02d" % pid)))
    results = [2, 0, 2, 2, 1, 3, 2, 2, 2, 2, 0]
    assert q.receive(lambda p, h, i: results[int(bytes(p[29:31])) - 1]) == 11
    sends = _kernel_reads(kernel)
    assert len(sends) > 1
    got = [(v.pid, v.verdict, v.payload is not None) for s in sends for v in s]
    assert got == [(pid, int(r != 0), r in (2, 3)) for pid, r in enumerate(results, 1)]


def test_receive_survives_malformed_and_counts(
    fake_queue: tuple[NetlinkQueue, socket.socket],
) -> None:
    """Malformed datagrams are counted and never stop the receive loop."""
    q, kernel = fake_queue
    kernel.send(b"\x01\x02\x03")
    kernel.send(pkt_msg(1, b"x" * 50)[:-7])
    kernel.send(err_msg(errno.ENOENT))
    kernel.send(err_msg(0))
    kernel.send(pkt_msg(2, None))  # unusable -> dropped with a verdict
    kernel.send(pkt_msg(3, b"y" * 50, cap_len=9000))  # truncated -> dropped
    kernel.send(pkt_msg(4, _udp_packet(b"ok")))
    rng = random.Random(7)
    for _ in range(200):
        kernel.send(rng.randbytes(rng.randrange(0, 120)))
    kernel.send(pkt_msg(5, _udp_packet(b"ok")))
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
    kernel.send(pkt_msg(1, _udp_packet(b"a")))
    kernel.send(err_msg(errno.ENOENT))  # harmless: id already gone
    kernel.send(pkt_msg(2, _udp_packet(b"a")))
    assert q.receive(lambda p, h, i: 1) == 2
    assert [(v.mtype & 0xFF, v.pid) for s in _kernel_reads(kernel) for v in s] == [(3, 2)]
    kernel.send(pkt_msg(3, _udp_packet(b"a")))
    kernel.send(pkt_msg(4, _udp_packet(b"a"))[:-9])  # packet 4 unreadable: stays queued
    kernel.send(pkt_msg(5, _udp_packet(b"a")))
    assert q.receive(lambda p, h, i: 1) == 2
    kernel.send(pkt_msg(6, _udp_packet(b"a")))
    assert q.receive(lambda p, h, i: 1) == 1
    verdicts = [(v.mtype & 0xFF, v.verdict, v.pid) for s in _kernel_reads(kernel) for v in s]
    # batch covers only 3 (before the bad message); 5 and 6 one by one
    assert verdicts == [(3, 1, 3), (1, 1, 5), (1, 1, 6)]
    assert q.errors == 2


def test_refused_verdict_disables_batch(fake_queue: tuple[NetlinkQueue, socket.socket]) -> None:
    """A kernel error other than ENOENT for a verdict ends batching for good (the packet may be stuck)."""
    q, kernel = fake_queue
    kernel.send(pkt_msg(1, _udp_packet(b"a")))
    kernel.send(err_msg(errno.EINVAL))
    kernel.send(pkt_msg(2, _udp_packet(b"a")))
    assert q.receive(lambda p, h, i: 1) == 2
    kernel.send(pkt_msg(3, _udp_packet(b"a")))
    assert q.receive(lambda p, h, i: 1) == 1
    verdicts = [(v.mtype & 0xFF, v.pid) for s in _kernel_reads(kernel) for v in s]
    assert verdicts == [(3, 1), (1, 2), (1, 3)]
    assert q.errors == 1


def test_failed_send_is_counted_and_disables_batch(fake_queue: tuple[NetlinkQueue, socket.socket]) -> None:
    """A verdict send the socket refuses counts as an error and ends batching."""
    q, kernel = fake_queue
    kernel.send(pkt_msg(1, _udp_packet(b"a")))
    kernel.shutdown(socket.SHUT_RD)  # our sends now fail with EPIPE
    assert q.receive(lambda p, h, i: 1) == 1
    assert q.errors == 1
    assert q._writer.batch is False


def test_handler_exception_drops_its_packet_and_flushes(
    fake_queue: tuple[NetlinkQueue, socket.socket],
) -> None:
    """A raising handler drops its packet and the verdicts before it still go out."""
    q, kernel = fake_queue
    for pid in (1, 2, 3):
        kernel.send(pkt_msg(pid, _udp_packet(b"z")))

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


def test_default_mark_is_translated(fake_queue: tuple[NetlinkQueue, socket.socket]) -> None:
    """Without a mark set, ACCEPT_MODIFIED_MARK marks the packet Mark.TRANSLATED (what FORWARD lets in)."""
    q, kernel = fake_queue
    assert q.mark == Mark.TRANSLATED
    kernel.send(pkt_msg(1, _udp_packet(b"m")))
    assert q.receive(lambda p, h, i: Verdict.ACCEPT_MODIFIED_MARK) == 1
    assert [v.mark for s in _kernel_reads(kernel) for v in s] == [Mark.TRANSLATED]


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
