"""The packet loop: NFQUEUE (netfilterqueue) in, the core's verdicts out.

One queue carries both directions; the netfilter hook tells them apart
(POSTROUTING: in2out, PREROUTING: out2in). The loop sleeps in ``select`` on
the queue's socket until a packet arrives or the core's next timer is due
(``get_timer`` / ``handle_timer``, as in aioquic), then drains the socket.
"""

from __future__ import annotations

import contextlib
import selectors
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

from netfilterqueue import NetfilterQueue

from gateway.adapters.iptables import MARK_TRANSLATED
from gateway.core.table import ACCEPT_MODIFIED, ACCEPT_MODIFIED_MARK, TranslationTable

HOOK_POSTROUTING = 4
#: Longest sleep, so that signals and events are handled promptly without traffic.
MAX_SLEEP = 0.5


class PacketLoop:
    """Binds the queue and runs the table until asked to stop."""

    def __init__(
        self,
        table: TranslationTable,
        queue: int,
        *,
        max_len: int = 4096,
        rcvbuf: int = 8 << 20,
        on_events: Callable[[], None] = lambda: None,
    ) -> None:
        self.table = table
        self.queue = queue
        self.now = time.monotonic()
        self.on_events = on_events
        self.stopping = False
        self.nfq = NetfilterQueue()
        self.nfq.bind(queue, self._packet, max_len=max_len, sock_len=rcvbuf)
        self.sock = socket.socket(fileno=self.nfq.get_fd())
        self.sock.setblocking(False)

    def _packet(self, pkt: Any) -> None:
        table = self.table
        try:
            buf = bytearray(pkt.get_payload())
            if pkt.hook == HOOK_POSTROUTING:
                verdict = table.in2out(buf, self.now)
            else:
                verdict = table.out2in(buf, self.now)
        except Exception:  # a bug in the core must not stop the loop: drop, count
            table.count_internal_error()
            pkt.drop()
            return
        if verdict == ACCEPT_MODIFIED:
            pkt.set_payload(bytes(buf))
            pkt.accept()
        elif verdict == ACCEPT_MODIFIED_MARK:
            pkt.set_payload(bytes(buf))
            pkt.set_mark(MARK_TRANSLATED)
            pkt.accept()
        else:
            pkt.drop()

    def stop(self, *_: Any) -> None:
        self.stopping = True

    def run(self) -> None:
        """Serve packets until :meth:`stop` (or SIGINT/SIGTERM) is called."""
        rfd, wfd = socket.socketpair()
        rfd.setblocking(False)
        wfd.setblocking(False)
        old_wakeup = signal.set_wakeup_fd(wfd.fileno())
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ)
        sel.register(rfd, selectors.EVENT_READ)
        table = self.table
        try:
            while not self.stopping:
                now = time.monotonic()
                due = table.get_timer()
                timeout = MAX_SLEEP if due is None else min(MAX_SLEEP, max(0.0, due - now))
                for key, _ in sel.select(timeout):
                    if key.fileobj is rfd:
                        with contextlib.suppress(BlockingIOError):
                            rfd.recv(4096)
                self.now = time.monotonic()
                self.nfq.run(block=False)
                table.handle_timer(time.monotonic())
                if table.events:
                    self.on_events()
        finally:
            signal.set_wakeup_fd(old_wakeup)
            sel.close()
            rfd.close()
            wfd.close()

    def close(self) -> None:
        try:
            self.nfq.unbind()
        finally:
            self.sock.detach()
