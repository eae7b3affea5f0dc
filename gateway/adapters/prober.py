"""Health probes: one thread that checks every (probe, member) target on its
probe's interval (docs/model.md, "Health probes"; issue 10).

- ``tcp``: a TCP connection to ``member:port`` that opens within the
  timeout;
- ``http``: that connection, then ``GET path HTTP/1.1`` with a ``Host``
  header, answered with status 200 within the same timeout (from the
  attempt's start).

The timeout is ``min(interval, PROBE_TIMEOUT)``: never longer than the
interval, so one target has at most one probe in flight and attempts keep
their cadence (docs/decisions.md, "Probe timeout").

Every socket is bound to the AzureLoadBalancer address (``probe_source``),
so the SYN leaves with the source the backends' security rules see as the
AzureLoadBalancer tag; the gateway's own OUTPUT rule queues that SYN to
``local_out``, which holds it to the backend's inbound rules (a group that
denies the tag makes the probe time out, as the article warns).

The prober never touches the table. Each result goes to ``report(probe,
member, ok)``, called in this thread; :class:`~gateway.adapters.run.Gateway`
makes that a :meth:`~gateway.adapters.loop.PacketLoop.post`, so the loop
applies results between two batches. One thread, non-blocking sockets and a
selector: a hundred targets cost one thread and at most a hundred sockets.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from gateway.core.model import Probe

#: Longest a probe may take, in seconds (shorter when the interval is).
PROBE_TIMEOUT = 2.0
#: Bytes of an HTTP answer read before giving up on finding its status line.
MAX_STATUS_LINE = 4096
#: Longest the thread sleeps, so that stop and new targets are seen promptly.
MAX_SLEEP = 0.5

Report = Callable[[str, int, bool], None]


def timeout_for(probe: Probe) -> float:
    """How long one attempt of ``probe`` may take."""
    return min(probe.interval, PROBE_TIMEOUT)


def http_request(probe: Probe, member: int) -> bytes:
    """The request an http probe sends (RFC 9112: Host is mandatory in HTTP/1.1)."""
    host = f"{ipaddress.IPv4Address(member)}:{probe.port}"
    return (
        f"GET {probe.path or '/'} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: snatgw-probe\r\n"
        "Connection: close\r\n\r\n"
    ).encode("ascii")


def status_ok(data: bytes) -> bool | None:
    """Whether an HTTP answer's status line says 200; None while the line is incomplete."""
    line, sep, _ = data.partition(b"\r\n")
    if not sep:
        return None if len(data) < MAX_STATUS_LINE else False
    parts = line.split(None, 2)
    return len(parts) >= 2 and parts[0].startswith(b"HTTP/1.") and parts[1] == b"200"


@dataclass(slots=True, eq=False)
class _Target:
    """One member of one probe, its schedule and its attempt in flight."""

    probe: Probe
    member: int
    due: float
    sock: socket.socket | None = None
    deadline: float = 0.0
    connected: bool = False
    request: bytes = b""
    answer: bytearray = field(default_factory=bytearray)

    @property
    def key(self) -> tuple[str, int]:
        return (self.probe.name, self.member)


class Prober:
    """Probes targets in a thread of its own until :meth:`stop`."""

    def __init__(self, report: Report, source: int = 0, clock: Callable[[], float] = time.monotonic) -> None:
        self.report = report
        self.source = source
        self.clock = clock
        self._lock = threading.Lock()
        self._pending: tuple[list[tuple[Probe, int]], int] | None = None
        self._targets: dict[tuple[str, int], _Target] = {}
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        self.thread = threading.Thread(target=self._run, name="snatgw-prober", daemon=True)
        #: Attempts started and finished (plain ints, read by tests and the operator's view).
        self.started = 0
        self.finished = 0

    # ------------------------------------------------------------------ other threads

    def set_targets(self, targets: Iterable[tuple[Probe, int]], source: int | None = None) -> None:
        """Probe these (probe, member) pairs from now on (start and every reload).

        A target that stays (same probe name and member) keeps its schedule
        unless its probe changed; one that goes has its attempt abandoned
        without a report; a new one is probed at once.
        """
        with self._lock:
            self._pending = (list(targets), self.source if source is None else source)
        self._wake()

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the thread and close every socket; idempotent. Reports nothing more."""
        self._stopping.set()
        self._wake()
        if self.thread.is_alive():
            self.thread.join(timeout)
        for t in self._targets.values():
            self._close(t)
        with contextlib.suppress(OSError, ValueError, KeyError):
            self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        sel = self._sel
        while not self._stopping.is_set():
            self._take_targets()
            now = self.clock()
            for t in self._targets.values():
                if t.sock is None and t.due <= now:
                    self._begin(t, now)
            soonest = min(
                (t.deadline if t.sock is not None else t.due for t in self._targets.values()),
                default=now + MAX_SLEEP,
            )
            for key, _ in sel.select(max(0.0, min(MAX_SLEEP, soonest - self.clock()))):
                if key.fileobj is self._wake_r:
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(4096)
                    continue
                t = key.data
                if isinstance(t, _Target) and t.sock is not None:
                    self._progress(t)
            if self._stopping.is_set():
                break
            now = self.clock()
            for t in self._targets.values():
                if t.sock is not None and t.deadline <= now:
                    self._finish(t, False)

    def _take_targets(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return
        targets, self.source = pending
        now = self.clock()
        new: dict[tuple[str, int], _Target] = {}
        for probe, member in targets:
            old = self._targets.pop((probe.name, member), None)
            if old is not None and old.probe == probe:
                new[old.key] = old
                continue
            if old is not None:
                self._close(old)
            new[(probe.name, member)] = _Target(probe, member, now)
        for gone in self._targets.values():
            self._close(gone)
        self._targets = new

    def _begin(self, t: _Target, now: float) -> None:
        """Start one attempt: a non-blocking connect from the probe source."""
        probe = t.probe
        # Keep the cadence: the next attempt is one interval after this one was due.
        t.due = max(t.due + probe.interval, now)
        t.deadline = now + timeout_for(probe)
        t.connected = False
        t.answer.clear()
        t.request = http_request(probe, t.member) if probe.protocol == "http" else b""
        self.started += 1
        try:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except OSError:
            self._result(t, False)
            return
        t.sock = s
        try:
            s.setblocking(False)
            if self.source:
                s.bind((str(ipaddress.IPv4Address(self.source)), 0))
            rc = s.connect_ex((str(ipaddress.IPv4Address(t.member)), probe.port))
        except OSError:
            self._finish(t, False)
            return
        if rc not in (0, errno.EINPROGRESS):
            self._finish(t, False)
            return
        self._sel.register(s, selectors.EVENT_WRITE, t)
        if rc == 0:
            self._progress(t)

    def _progress(self, t: _Target) -> None:
        """The socket is writable (connect finished) or readable (the HTTP answer)."""
        s = t.sock
        assert s is not None
        if not t.connected:
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
                self._finish(t, False)
                return
            t.connected = True
            if not t.request:
                self._finish(t, True)
                return
            try:
                s.send(t.request)  # a few hundred bytes into an empty send buffer
            except OSError:
                self._finish(t, False)
                return
            self._sel.modify(s, selectors.EVENT_READ, t)
            return
        try:
            chunk = s.recv(MAX_STATUS_LINE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._finish(t, False)
            return
        t.answer += chunk
        ok = status_ok(bytes(t.answer))
        if ok is None and not chunk:
            ok = False  # closed before the status line
        if ok is not None:
            self._finish(t, ok)

    def _finish(self, t: _Target, ok: bool) -> None:
        self._close(t)
        self._result(t, ok)

    def _result(self, t: _Target, ok: bool) -> None:
        self.finished += 1
        with contextlib.suppress(Exception):  # the loop is gone (stopping): nothing to tell
            self.report(t.probe.name, t.member, ok)

    def _close(self, t: _Target) -> None:
        s, t.sock = t.sock, None
        if s is None:
            return
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._sel.unregister(s)
        s.close()  # a normal close (FIN), as Azure's TCP probe ends with a four-way close
