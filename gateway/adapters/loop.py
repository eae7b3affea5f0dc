"""The packet loop: NFQUEUE in, the core's verdicts out.

Two queue clients, chosen by ``gateway.queue_client``:

- ``netlink`` (default): :class:`~gateway.adapters.nlqueue.NetlinkQueue`
  on two queues (KERNEL_NOTES.md, "Whole GSO segments"). UDP and ICMP use the
  configured queue, where the kernel hands over MTU-sized packets with full
  checksums. TCP uses the next queue with ``NFQA_CFG_F_GSO``: whole GSO
  super-packets of up to 64 KiB, one Python round trip each instead of one per
  1448 bytes; the kernel recomputes the TCP checksum when it segments them,
  and small packets whose checksum is still partial get a full one here. Each
  drain sends all its verdicts in one ``sendmsg``.
- ``netfilterqueue``: the library, one queue for everything, one verdict
  syscall per packet and no GSO. Kept as the reference client and fallback.

Either direction arrives on the same queue; the netfilter hook tells them
apart (POSTROUTING: in2out, PREROUTING: out2in). The loop sleeps in
``select`` until a packet arrives or the core's next timer is due
(``get_timer`` / ``handle_timer``, as in aioquic), then drains the sockets.
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
from gateway.adapters.nlqueue import SKBINFO_CSUMNOTREADY, SKBINFO_GSO, NetlinkQueue
from gateway.core.packet import fill_l4_checksum
from gateway.core.table import ACCEPT_MODIFIED, ACCEPT_MODIFIED_MARK, DROP, TranslationTable

HOOK_POSTROUTING = 4
#: Longest sleep, so that signals and events are handled promptly without traffic.
MAX_SLEEP = 0.5
#: Packets handled per NetlinkQueue.receive call before the loop looks at timers.
BATCH = 256


class PacketLoop:
    """Binds the queues and runs the table until asked to stop."""

    def __init__(
        self,
        table: TranslationTable,
        queue: int,
        *,
        client: str = "netlink",
        max_len: int = 4096,
        rcvbuf: int = 16 << 20,
        on_events: Callable[[], None] = lambda: None,
    ) -> None:
        self.table = table
        self.now = time.monotonic()
        self.on_events = on_events
        self.stopping = False
        self.nfq: NetfilterQueue | None = None
        self.sock: socket.socket | None = None
        self.queues: list[NetlinkQueue] = []
        try:
            if client == "netfilterqueue":
                self.nfq = NetfilterQueue()
                self.nfq.bind(queue, self._nfq_packet, max_len=max_len, sock_len=rcvbuf)
                self.sock = socket.socket(fileno=self.nfq.get_fd())
                self.sock.setblocking(False)
            else:
                for num, gso in ((queue, False), (queue + 1, True)):
                    q = NetlinkQueue(num, gso=gso, max_len=max_len, rcvbuf=rcvbuf)
                    q.mark = MARK_TRANSLATED
                    self.queues.append(q)
        except OSError:
            self.close()
            raise

    def _nfq_packet(self, pkt: Any) -> None:
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

    def _nl_packet(self, payload: memoryview, hook: int, skbinfo: int) -> int:
        table = self.table
        try:
            if hook == HOOK_POSTROUTING:
                verdict = table.in2out(payload, self.now)
            else:
                verdict = table.out2in(payload, self.now)
            if verdict != DROP and skbinfo & SKBINFO_CSUMNOTREADY and not skbinfo & SKBINFO_GSO:
                fill_l4_checksum(payload)
        except Exception:  # as above: drop and count, never stop the loop
            table.count_internal_error()
            return DROP
        return verdict

    def stop(self, *_: Any) -> None:
        self.stopping = True

    def run(self) -> None:
        """Serve packets until :meth:`stop` (or SIGINT/SIGTERM) is called."""
        rfd, wfd = socket.socketpair()
        rfd.setblocking(False)
        wfd.setblocking(False)
        old_wakeup = signal.set_wakeup_fd(wfd.fileno())
        sel = selectors.DefaultSelector()
        sel.register(rfd, selectors.EVENT_READ)
        if self.sock is not None:
            sel.register(self.sock, selectors.EVENT_READ)
        for q in self.queues:
            sel.register(q.fileno(), selectors.EVENT_READ)
        nfq = self.nfq
        queues = self.queues
        handler = self._nl_packet
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
                if nfq is not None:
                    nfq.run(block=False)
                for q in queues:  # at most BATCH each, so a flood on one starves neither
                    q.receive(handler, BATCH)  # the other queue nor the timers
                table.handle_timer(time.monotonic())
                if table.events:
                    self.on_events()
        finally:
            signal.set_wakeup_fd(old_wakeup)
            sel.close()
            rfd.close()
            wfd.close()

    def close(self) -> None:
        """Unbind every queue; idempotent."""
        for q in self.queues:
            q.close()
        if self.nfq is not None:
            with contextlib.suppress(OSError):
                self.nfq.unbind()
        if self.sock is not None and self.sock.fileno() >= 0:
            self.sock.detach()
