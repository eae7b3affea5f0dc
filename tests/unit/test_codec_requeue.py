"""Re-queue between workers without a kernel (docs/kernel.md, "Steering"): the codec reports
Mark.REQUEUED, the queue sends NF_QUEUE to the target worker's queue with the rewritten payload
and the packet's mark plus REQUEUED, and a packet is never handed on twice."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.adapters.kernel import NF_QUEUE, Hook, Mark, requeue_verdict
from gateway.adapters.loop import PacketLoop
from gateway.adapters.nfqueue import NetlinkQueue
from gateway.adapters.nfqueue.codec import packet_mark, parse
from gateway.core.verdict import REQUEUES, Verdict
from tests.unit.test_nfqueue_codec import QUEUE, decode_verdicts, pkt_msg

PAYLOAD = bytes(range(40))


@pytest.fixture
def fake_queue() -> Iterator[tuple[NetlinkQueue, socket.socket]]:
    """A NetlinkQueue on a socketpair (the other end plays the kernel), re-queueing to 20/22/24."""
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    q = NetlinkQueue.__new__(NetlinkQueue)
    q._attach(ours, QUEUE)
    q.requeue_to = (20, 22, 24)
    yield q, kernel
    q.close()
    kernel.close()


def _sent(kernel: socket.socket) -> list[Any]:
    out = []
    while True:
        try:
            out += decode_verdicts(kernel.recv(1 << 20, socket.MSG_DONTWAIT))
        except BlockingIOError:
            return out


def test_codec_adds_a_requeued_flag_to_the_hook() -> None:
    """Mark.REQUEUED adds Hook.REQUEUED (0x200), next to PRE_ROUTING_HAIRPIN; other marks do not."""
    for hook, mark, want in (
        (Hook.POST_ROUTING, Mark.INSIDE | Mark.REQUEUED, Hook.POST_ROUTING | Hook.REQUEUED),
        (Hook.PRE_ROUTING, Mark.HAIRPIN | Mark.REQUEUED, Hook.PRE_ROUTING_HAIRPIN | Hook.REQUEUED),
        (Hook.PRE_ROUTING, Mark.REQUEUED, Hook.PRE_ROUTING | Hook.REQUEUED),
        (Hook.POST_ROUTING, Mark.INSIDE, Hook.POST_ROUTING),
        (Hook.PRE_ROUTING, None, Hook.PRE_ROUTING),
    ):
        buf = pkt_msg(5, PAYLOAD, hook=hook, mark=mark)
        assert parse(buf, 0, len(buf)).hook == want
    assert Mark.REQUEUED & (Mark.INSIDE | Mark.HAIRPIN | Mark.TRANSLATED) == 0


def test_packet_mark_reads_the_whole_mark_and_never_raises() -> None:
    """packet_mark: the NFQA_MARK value (every bit), 0 without one, 0 on garbage."""
    buf = pkt_msg(5, PAYLOAD, mark=0x20000005)
    assert packet_mark(buf, 0, len(buf)) == 0x20000005
    buf = pkt_msg(5, PAYLOAD)
    assert packet_mark(buf, 0, len(buf)) == 0
    for cut in range(len(buf)):
        assert packet_mark(buf[:cut], 0, cut) == 0
    assert packet_mark(b"\xff" * 64, 0, 64) == 0 and packet_mark(b"", 0, 0) == 0


def test_requeue_sends_nf_queue_with_payload_and_mark(fake_queue: tuple[NetlinkQueue, socket.socket]) -> None:
    """REQUEUES[k]: one NF_QUEUE verdict to requeue_to[k] carrying the rewritten payload and the
    packet's mark | REQUEUED; the accepts before it are batched, the drop after it stays single."""
    q, kernel = fake_queue
    marks = {1: Mark.INSIDE, 2: Mark.INSIDE | 0x5, 3: None, 4: None}
    for pid, mark in marks.items():
        hook = Hook.POST_ROUTING if mark else Hook.PRE_ROUTING
        kernel.send(pkt_msg(pid, bytes([pid]) + PAYLOAD[1:], hook=hook, mark=mark))
    results = {1: Verdict.ACCEPT, 2: REQUEUES[1], 3: REQUEUES[2], 4: Verdict.DROP}

    def handler(p: memoryview, hook: int, info: int) -> int:
        pid = p[0]
        p[0] = 0xAA
        return results[pid]

    assert q.receive(handler) == 4
    v = _sent(kernel)
    assert [(m.mtype & 0xFF, m.pid) for m in v] == [(3, 1), (1, 2), (1, 3), (1, 4)]
    assert (v[1].verdict, v[1].mark) == (NF_QUEUE | 22 << 16, Mark.INSIDE | 0x5 | Mark.REQUEUED)
    assert v[1].payload == b"\xaa" + PAYLOAD[1:] and v[1].queue == QUEUE
    assert (v[2].verdict, v[2].mark, v[2].payload) == (
        requeue_verdict(24),
        Mark.REQUEUED,
        b"\xaa" + PAYLOAD[1:],
    )
    assert (v[3].verdict, v[3].payload) == (Verdict.DROP, None)
    assert q.misrouted == 0


def test_a_packet_is_never_handed_on_twice(fake_queue: tuple[NetlinkQueue, socket.socket]) -> None:
    """A REQUEUE for a packet that carries Mark.REQUEUED, or for a worker with no queue, is a drop."""
    q, kernel = fake_queue
    kernel.send(pkt_msg(1, PAYLOAD, hook=Hook.POST_ROUTING, mark=Mark.INSIDE | Mark.REQUEUED))
    kernel.send(pkt_msg(2, PAYLOAD, hook=Hook.POST_ROUTING, mark=Mark.INSIDE))
    assert q.receive(lambda p, h, i: REQUEUES[1] if h & Hook.REQUEUED else REQUEUES[3]) == 2
    v = _sent(kernel)
    assert [(m.pid, m.verdict, m.payload) for m in v] == [(1, Verdict.DROP, None), (2, Verdict.DROP, None)]
    assert q.misrouted == 2


def test_requeue_without_room_before_the_payload(fake_queue: tuple[NetlinkQueue, socket.socket]) -> None:
    """A message with no room for the header in front of its payload still re-queues correctly."""
    q, kernel = fake_queue
    kernel.send(pkt_msg(9, PAYLOAD, hook=Hook.PRE_ROUTING, ifindex=False))
    assert q.receive(lambda p, h, i: REQUEUES[0]) == 1
    (v,) = _sent(kernel)
    assert (v.pid, v.verdict, v.mark, v.payload) == (9, requeue_verdict(20), Mark.REQUEUED, PAYLOAD)


class _Table:
    """Records which entry point the loop called and answers a fixed verdict."""

    def __init__(self, verdict: int) -> None:
        self.verdict = verdict
        self.calls: list[str] = []
        self.misrouted = 0

    def __getattr__(self, name: str) -> Any:
        def entry(buf: memoryview, now: float) -> int:
            self.calls.append(name)
            return self.verdict

        return entry

    def count_misrouted(self) -> None:
        self.misrouted += 1


def _loop(table: _Table) -> PacketLoop:
    loop = PacketLoop.__new__(PacketLoop)
    loop.table = table  # type: ignore[assignment]
    loop.now = 0.0
    return loop


def test_loop_dispatches_handed_on_packets_and_drops_a_second_requeue() -> None:
    """Handed-on packets reach the same entry points, a hairpin's second half reaches
    hairpin_second; a REQUEUE for one of them is a drop counted as misrouted, while a
    REQUEUE for a packet not yet handed on goes back to the queue client."""
    udp = bytearray(PAYLOAD)
    cases = (
        (Hook.POST_ROUTING | Hook.REQUEUED, "in2out"),
        (Hook.PRE_ROUTING | Hook.REQUEUED, "out2in"),
        (Hook.PRE_ROUTING_HAIRPIN | Hook.REQUEUED, "hairpin_second"),
        (Hook.LOCAL_OUT | Hook.REQUEUED, "local_out"),
    )
    for hook, name in cases:
        t = _Table(Verdict.ACCEPT_MODIFIED)
        assert _loop(t)._nl_packet(memoryview(udp), hook, 0) == Verdict.ACCEPT_MODIFIED
        assert (t.calls, t.misrouted) == ([name], 0)
        t = _Table(REQUEUES[1])
        assert _loop(t)._nl_packet(memoryview(udp), hook, 0) == Verdict.DROP
        assert (t.calls, t.misrouted) == ([name], 1)
    for hook, name in (
        (Hook.POST_ROUTING, "in2out"),
        (Hook.PRE_ROUTING, "out2in"),
        (Hook.PRE_ROUTING_HAIRPIN, "hairpin"),
    ):
        t = _Table(REQUEUES[1])
        assert _loop(t)._nl_packet(memoryview(udp), hook, 0) == REQUEUES[1]
        assert (t.calls, t.misrouted) == ([name], 0)


def test_loop_refuses_workers_it_cannot_serve() -> None:
    """A worker index outside 0..workers-1, or several workers on the netfilterqueue client."""
    with pytest.raises(ValueError):
        PacketLoop(_Table(0), 10, worker=2, workers=2)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        PacketLoop(_Table(0), 10, client="netfilterqueue", worker=0, workers=2)  # type: ignore[arg-type]
