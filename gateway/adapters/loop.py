"""The packet loop: NFQUEUE in, the core's verdicts out.

Two queue clients, chosen by ``gateway.queue_client``:

- ``netlink`` (default): :class:`~gateway.adapters.nfqueue.NetlinkQueue`
  on two queues (docs/kernel.md, "Whole GSO segments"). UDP and ICMP use the
  configured queue, where the kernel hands over MTU-sized packets with full
  checksums. TCP uses the next queue with ``NFQA_CFG_F_GSO``: whole GSO
  super-packets of up to 64 KiB, one Python round trip each instead of one per
  1448 bytes; the kernel recomputes the TCP checksum when it segments them,
  and small packets whose checksum is still partial get a full one here. Each
  drain sends all its verdicts in one ``sendmsg``.
- ``netfilterqueue``: the library, one queue for everything, one verdict
  syscall per packet and no GSO. Kept as the reference client and fallback.

Either direction arrives on the same queue; the netfilter hook tells them
apart (POSTROUTING: in2out, PREROUTING: out2in, LOCAL_OUT: an ICMP error the
host itself sends on the outside or a probe SYN toward the inside,
``local_out``). A PREROUTING packet from the inside to a public address
carries ``Mark.HAIRPIN``, set by the rule just before its queue rule; both
clients report it as ``Hook.PRE_ROUTING_HAIRPIN`` and it goes to ``hairpin``
(docs/kernel.md, "Hairpin").

With several workers (docs/kernel.md, "Steering") each worker's loop binds
its own pair, ``queue + 2 * worker`` and the next, and its table may answer
``REQUEUES[k]`` for a packet worker k owns: the queue client hands the
packet on to worker k's queue of the same kind with ``Mark.REQUEUED`` added.
A packet that arrives with that mark is reported with ``Hook.REQUEUED`` in
its hook and goes the slower way (:meth:`PacketLoop._requeued`): its hairpin
half is ``hairpin_second``, and a second REQUEUE drops it as misrouted. The
loop sleeps in
``select`` until a packet arrives or the core's next timer is due
(``get_timer`` / ``handle_timer``, as in aioquic), then drains the sockets.

Other threads (the control socket, the metrics endpoint) never touch the
table: they hand a function to :meth:`PacketLoop.call`, which the loop runs
between two batches and whose result (a snapshot of plain data) it hands
back. No lock is held across packets, and a snapshot is consistent.
"""

from __future__ import annotations

import contextlib
import gc
import select
import signal
import socket
import threading
import time
from bisect import bisect_left
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any

from netfilterqueue import NetfilterQueue

from gateway.adapters.kernel import Hook, Mark, SkbInfo
from gateway.adapters.nfqueue import NetlinkQueue
from gateway.core.packet import fill_l4_checksum
from gateway.core.table import TranslationTable
from gateway.core.verdict import ACCEPT, ACCEPT_MODIFIED, ACCEPT_MODIFIED_MARK, DROP, REQUEUE, Verdict

#: Plain ints for the per-packet handler (an IntFlag ``&`` builds a new member each time).
_POST_ROUTING = int(Hook.POST_ROUTING)
_PRE_ROUTING = int(Hook.PRE_ROUTING)
_REQUEUED = int(Hook.REQUEUED)
_LOCAL_OUT = int(Hook.LOCAL_OUT)
_HAIRPIN = int(Hook.PRE_ROUTING_HAIRPIN)
_HAIRPIN_MARK = int(Mark.HAIRPIN)
_CSUMNOTREADY = int(SkbInfo.CSUMNOTREADY)
_GSO = int(SkbInfo.GSO)
#: Longest sleep, so that signals and events are handled promptly without traffic.
MAX_SLEEP = 0.5
#: Packets handled per NetlinkQueue.receive call before the loop looks at timers.
BATCH = 256
#: Seconds between two gc.freeze() calls (see PacketLoop.run).
FREEZE_EVERY = 10.0
#: Upper bounds (seconds) of the loop latency histogram: the time one pass
#: takes to handle the packets that woke it.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class _Call:
    """A function another thread wants run in the loop, and its outcome."""

    __slots__ = ("fn", "done", "value", "error")

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None


class PacketLoop:
    """Binds the queues and runs the table until asked to stop.

    ``worker`` of ``workers`` picks the queue pair (``queue + 2 * worker``,
    ``+ 1``) and where REQUEUE verdicts go; the netfilterqueue client has one
    queue and no re-queue, so it runs one worker only.
    """

    def __init__(
        self,
        table: TranslationTable,
        queue: int,
        *,
        client: str = "netlink",
        max_len: int = 4096,
        rcvbuf: int = 16 << 20,
        on_events: Callable[[], None] = lambda: None,
        on_hup: Callable[[], None] = lambda: None,
        worker: int = 0,
        workers: int = 1,
    ) -> None:
        if not 0 <= worker < workers or (workers > 1 and client == "netfilterqueue"):
            raise ValueError(f"worker {worker} of {workers} with the {client} client")
        self.table = table
        self.worker = worker
        self.workers = workers
        self.now = time.monotonic()
        self.on_events = on_events
        self.on_hup = on_hup
        self.stopping = False
        self.hup = False
        self._closed = False
        self._calls: SimpleQueue[_Call] = SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        #: Counts per :data:`LATENCY_BUCKETS` bucket (the last one: above them all) and their sum.
        self.latency = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.nfq: NetfilterQueue | None = None
        self.sock: socket.socket | None = None
        self.queues: list[NetlinkQueue] = []
        self._nl_packet = self._bind_handler()  # type: ignore[method-assign,assignment]
        try:
            if client == "netfilterqueue":
                self.nfq = NetfilterQueue()
                self.nfq.bind(queue, self._nfq_packet, max_len=max_len, sock_len=rcvbuf)
                self.sock = socket.socket(fileno=self.nfq.get_fd())
                self.sock.setblocking(False)
            else:
                base = queue + 2 * worker
                for num, gso in ((base, False), (base + 1, True)):
                    # Worker k's queue of the same kind: what REQUEUES[k] hands a packet to.
                    to = [queue + 2 * k + gso for k in range(workers)] if workers > 1 else []
                    q = NetlinkQueue(num, gso=gso, max_len=max_len, rcvbuf=rcvbuf, requeue_to=to)
                    self.queues.append(q)
        except OSError:
            self.close()
            raise

    def _nfq_packet(self, pkt: Any) -> None:
        table = self.table
        try:
            buf = bytearray(pkt.get_payload())
            hook = pkt.hook
            if hook == _POST_ROUTING:
                verdict = table.in2out(buf, self.now)
            elif hook == _LOCAL_OUT:
                verdict = table.local_out(buf, self.now)
            elif pkt.get_mark() & _HAIRPIN_MARK:
                verdict = table.hairpin(buf, self.now)
            else:
                verdict = table.out2in(buf, self.now)
        except Exception:  # a bug in the core must not stop the loop: drop, count
            table.count_internal_error()
            pkt.drop()
            return
        if verdict == ACCEPT_MODIFIED:
            pkt.set_payload(bytes(buf))
            pkt.accept()
        elif verdict == ACCEPT:
            pkt.accept()
        elif verdict == ACCEPT_MODIFIED_MARK:
            pkt.set_payload(bytes(buf))
            pkt.set_mark(Mark.TRANSLATED)
            pkt.accept()
        else:
            pkt.drop()

    def _nl_packet(self, payload: memoryview, hook: int, skbinfo: int) -> int:
        """The netlink client's handler: dispatch by hook, drop and count what raises.

        A loop made by ``__init__`` has this replaced on the instance by the
        same function with the table's entry points bound once
        (:meth:`_bind_handler`, one call and a few lookups less per packet).
        """
        return self._bind_handler()(payload, hook, skbinfo)

    def _bind_handler(self) -> Callable[[memoryview, int, int], int]:
        """:meth:`_nl_packet` for the current table, as a closure (per-packet path)."""
        table = self.table
        in2out, out2in, hairpin, local_out = table.in2out, table.out2in, table.hairpin, table.local_out
        count_internal_error = table.count_internal_error
        requeued = self._requeued
        loop = self

        def handle(payload: memoryview, hook: int, skbinfo: int) -> int:
            try:
                if hook == _POST_ROUTING:
                    verdict = in2out(payload, loop.now)
                elif hook == _PRE_ROUTING:
                    verdict = out2in(payload, loop.now)
                elif hook == _HAIRPIN:
                    verdict = hairpin(payload, loop.now)
                elif hook == _LOCAL_OUT:
                    verdict = local_out(payload, loop.now)
                else:
                    verdict = requeued(payload, hook)
                if verdict and skbinfo & _CSUMNOTREADY and not skbinfo & _GSO:  # DROP is 0
                    fill_l4_checksum(payload)
            except Exception:  # as in _nfq_packet: drop and count, never stop the loop
                count_internal_error()
                return DROP
            return verdict

        return handle

    def _requeued(self, payload: memoryview, hook: int) -> Verdict:
        """A packet another worker handed on (``Hook.REQUEUED`` in ``hook``; the
        kernel's other hooks never reach the loop).

        Dispatched like the rest, except that the second half of a hairpin
        (``PRE_ROUTING_HAIRPIN``) is ``hairpin_second``: the sender's worker
        did the first. A REQUEUE now is dropped and counted, never handed on
        again (docs/kernel.md, "Steering").
        """
        table = self.table
        hook &= ~_REQUEUED
        if hook == _POST_ROUTING:
            verdict = table.in2out(payload, self.now)
        elif hook == _HAIRPIN:
            verdict = table.hairpin_second(payload, self.now)
        elif hook == _LOCAL_OUT:
            verdict = table.local_out(payload, self.now)
        else:
            verdict = table.out2in(payload, self.now)
        if verdict >= REQUEUE:
            table.count_misrouted()
            return DROP
        return verdict

    def stop(self, *_: Any) -> None:
        self.stopping = True

    def request_reload(self, *_: Any) -> None:
        """SIGHUP handler: the loop calls ``on_hup`` at its next pass."""
        self.hup = True

    def call(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Run ``fn`` in the loop between two batches and return its result.

        For other threads. Raises TimeoutError if the loop does not get to it
        in ``timeout`` seconds, and whatever ``fn`` raised.
        """
        c = _Call(fn)
        self._calls.put(c)
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")
        deadline = time.monotonic() + timeout
        while not c.done.wait(0.1):
            if self._closed:
                raise TimeoutError("the gateway is stopping")
            if time.monotonic() > deadline:
                raise TimeoutError("the packet loop did not answer")
        if c.error is not None:
            raise c.error
        return c.value

    def post(self, fn: Callable[[], Any]) -> None:
        """Have ``fn`` run in the loop between two batches, without waiting for it.

        For results other threads hand to the core (the prober's): the loop
        runs them in order; what ``fn`` returns is dropped, an exception is
        counted as ``drop_internal`` (a bug, as in the packet path). Calls
        posted after the loop stopped are never run.
        """
        table = self.table

        def guarded() -> None:
            try:
                fn()
            except Exception:
                table.count_internal_error()

        self._calls.put(_Call(guarded))
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _run_calls(self) -> None:
        calls = self._calls
        while not calls.empty():
            c = calls.get_nowait()
            try:
                c.value = c.fn()
            except Exception as e:  # handed back to the caller's thread
                c.error = e
            c.done.set()

    def run(self) -> None:
        """Serve packets until :meth:`stop` (or SIGINT/SIGTERM) is called.

        Long-lived objects (the model, the table, its flows) are moved out of the
        collector's reach with ``gc.freeze()`` at start and every
        :data:`FREEZE_EVERY` seconds after a young-generation collection: a full
        collection over a table of 500k flow objects took 0.35 s (measured,
        issue 11), a pause on the packet path. Frozen objects are still freed by
        reference counting; only a cycle that survived the young collections
        before a freeze is never collected.
        """
        gc.collect()
        gc.freeze()
        next_freeze = time.monotonic() + FREEZE_EVERY
        rfd, wfd = self._wake_r, self._wake_w
        # Only the main thread may set a wakeup fd; in another thread (a test's) stop()
        # takes effect within MAX_SLEEP.
        main = threading.current_thread() is threading.main_thread()
        old_wakeup = signal.set_wakeup_fd(wfd.fileno()) if main else -1
        # epoll itself rather than selectors (a Python layer per wake-up), and only the
        # queues it reports are drained: an empty drain ends in a BlockingIOError.
        sel = select.epoll()
        wake_fd = rfd.fileno()
        sel.register(wake_fd, select.EPOLLIN)
        if self.sock is not None:
            sel.register(self.sock.fileno(), select.EPOLLIN)
        by_fd = {q.fileno(): q for q in self.queues}
        for fd in by_fd:
            sel.register(fd, select.EPOLLIN)
        poll = sel.poll
        nfq = self.nfq
        handler = self._nl_packet
        table = self.table
        latency = self.latency
        try:
            while not self.stopping:
                now = time.monotonic()
                due = table.get_timer()
                timeout = MAX_SLEEP if due is None else min(MAX_SLEEP, max(0.0, due - now))
                busy = False
                ready = []
                for fd, _ in poll(timeout):
                    if fd == wake_fd:
                        with contextlib.suppress(BlockingIOError):
                            rfd.recv(4096)
                    else:
                        busy = True
                        if fd in by_fd:
                            ready.append(by_fd[fd])
                self.now = start = time.monotonic()
                if nfq is not None:
                    nfq.run(block=False)
                for q in ready:  # at most BATCH each, so a flood on one starves neither
                    q.receive(handler, BATCH)  # the other queue nor the timers
                if busy:
                    took = time.monotonic() - start
                    latency[bisect_left(LATENCY_BUCKETS, took)] += 1
                    self.latency_sum += took
                table.handle_timer(time.monotonic())
                if start > next_freeze:
                    next_freeze = start + FREEZE_EVERY
                    gc.collect(1)
                    gc.freeze()
                if self.hup:
                    self.hup = False
                    self.on_hup()
                if not self._calls.empty():
                    self._run_calls()
                if table.events:
                    self.on_events()
        finally:
            if main:
                signal.set_wakeup_fd(old_wakeup)
            sel.close()
            self._closed = True
            self._run_calls()

    def close(self) -> None:
        """Unbind every queue; idempotent."""
        for q in self.queues:
            q.close()
        if self.nfq is not None:
            with contextlib.suppress(OSError):
                self.nfq.unbind()
        if self.sock is not None and self.sock.fileno() >= 0:
            self.sock.detach()
        self._wake_r.close()
        self._wake_w.close()
