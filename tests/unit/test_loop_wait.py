"""PacketLoop.run waits in epoll and drains only the queues it reports ready."""

from __future__ import annotations

import socket
import threading
import time
from queue import SimpleQueue
from typing import Any

from gateway.adapters.loop import LATENCY_BUCKETS, PacketLoop


class FakeQueue:
    """A queue whose socket is one end of a socketpair; receive() reads what is there."""

    def __init__(self) -> None:
        self.ours, self.kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.ours.setblocking(False)
        self.drains = 0
        self.packets = 0

    def fileno(self) -> int:
        return self.ours.fileno()

    def receive(self, handler: Any, limit: int = 256) -> int:
        self.drains += 1
        n = 0
        while n < limit:
            try:
                self.ours.recv(2048)
            except BlockingIOError:
                break
            n += 1
        self.packets += n
        return n

    def close(self) -> None:
        self.ours.close()
        self.kernel.close()


class IdleTable:
    """The table calls the loop makes between batches, doing nothing."""

    events: list[Any] = []

    def get_timer(self) -> float | None:
        return None

    def handle_timer(self, now: float) -> None:
        return None


def _loop(queues: list[FakeQueue]) -> PacketLoop:
    loop = PacketLoop.__new__(PacketLoop)
    loop.table = IdleTable()  # type: ignore[assignment]
    loop.now = 0.0
    loop.stopping = loop.hup = loop._closed = False
    loop._calls = SimpleQueue()
    loop._wake_r, loop._wake_w = socket.socketpair()
    loop._wake_r.setblocking(False)
    loop.on_events = loop.on_hup = lambda: None
    loop.latency = [0] * (len(LATENCY_BUCKETS) + 1)
    loop.latency_sum = 0.0
    loop.nfq = None
    loop.sock = None
    loop.queues = queues  # type: ignore[assignment]
    return loop


def test_only_the_queue_with_packets_is_drained_and_an_idle_one_never_is() -> None:
    """Packets on one queue are all handled; the other queue's receive is never called."""
    busy, idle = FakeQueue(), FakeQueue()
    loop = _loop([idle, busy])
    t = threading.Thread(target=loop.run)
    t.start()
    try:
        for _ in range(50):
            busy.kernel.send(b"p")
        deadline = time.monotonic() + 10
        while busy.packets < 50 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        loop.stopping = True
        loop._wake_w.send(b"\0")
        t.join(10)
    assert not t.is_alive()
    assert busy.packets == 50 and busy.drains >= 1
    assert idle.drains == 0
    for q in (busy, idle):
        q.close()
