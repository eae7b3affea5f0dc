"""The supervisor's side of its workers (docs/decisions.md, "Workers: processes and
the supervisor"): fork them, wait for each to say its queues are bound, ask them all at
once over their pipes, and stop them.

Each worker has one duplex :func:`multiprocessing.Pipe`. Requests ``(id, command,
args)`` go out under a lock; one reader thread per worker hands each answer ``(id, ok,
value)`` to whoever waits for that id, so a late answer (after a timeout) never reaches
the wrong caller; the worker's last message, ``("stopped", info)``, carries its final
counters, and the pipe's EOF fails whatever still waits.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

from structlog.typing import FilteringBoundLogger

from gateway.adapters.control import RequestError
from gateway.adapters.worker import main as worker_main
from gateway.config import GatewayConfig

#: How long the workers may take to build their tables and bind their queues.
READY_TIMEOUT = 120.0
#: How long a worker may take to stop and save its state before it is killed.
STOP_TIMEOUT = 15.0
#: How long one request to a worker may take.
ASK_TIMEOUT = 20.0


#: Longest log line still written with one ``write``.
LINE_CHUNK = 1 << 20


def one_write_per_line(stream: Any) -> None:
    """Make every log line one ``write`` on the shared stderr, so the supervisor's and the
    workers' lines never interleave within a line. ``print`` writes the line and its newline
    separately, which become two writes when stderr is unbuffered (``PYTHONUNBUFFERED``);
    with line buffering and no write-through they leave together at the newline."""
    if isinstance(stream, io.TextIOWrapper):
        stream.reconfigure(line_buffering=True, write_through=False)
        setattr(stream, "_CHUNK_SIZE", LINE_CHUNK)  # noqa: B010 (the text layer's buffer size)


@dataclass(slots=True, eq=False)
class WorkerHandle:
    """The supervisor's side of one worker: its process, its pipe and the requests in
    flight on it (answered by id, so a late answer never reaches the wrong caller)."""

    index: int
    process: BaseProcess
    conn: Connection
    pid: int = 0
    queues: list[int] = field(default_factory=list)
    final: dict[str, Any] | None = None
    _pending: dict[int, list[Any]] = field(default_factory=dict)
    _next: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _gone: bool = False
    #: Set once the pipe reached EOF (after the worker's last message, ``stopped``).
    closed: threading.Event = field(default_factory=threading.Event)
    #: Whether the reader thread (which sets ``closed``) was started.
    reading: bool = False

    def start_reader(self) -> None:
        self.reading = True
        threading.Thread(target=self._read, name=f"snatgw-pipe-{self.index}", daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                break
            if msg[0] == "stopped":
                self.final = msg[1]
                continue
            req_id, ok, value = msg
            with self._lock:
                waiter = self._pending.pop(req_id, None)
            if waiter is not None:
                waiter[1:] = [ok, value]
                waiter[0].set()
        with self._lock:
            self._gone = True
            for waiter in self._pending.values():
                waiter[0].set()
            self._pending.clear()
        self.closed.set()

    def send(self, command: str, args: dict[str, Any] | None = None) -> list[Any]:
        """Send one request; returns its waiter (event, ok, value)."""
        waiter: list[Any] = [threading.Event(), False, f"worker {self.index} is gone"]
        with self._lock:
            if self._gone:
                waiter[0].set()
                return waiter
            self._next += 1
            req_id = self._next
            self._pending[req_id] = waiter
            try:
                self.conn.send((req_id, command, args or {}))
            except (OSError, ValueError):
                self._pending.pop(req_id, None)
                waiter[0].set()
        return waiter

    def result(self, waiter: list[Any], timeout: float = ASK_TIMEOUT) -> Any:
        if not waiter[0].wait(timeout):
            raise TimeoutError(f"worker {self.index} did not answer")
        if not waiter[1]:
            raise RequestError(f"worker {self.index}: {waiter[2]}")
        return waiter[2]


def signal_name(code: int | None) -> dict[str, Any]:
    if code is not None and code < 0:
        try:
            return {"signal": signal.Signals(-code).name}
        except ValueError:
            return {"signal": -code}
    return {"exit_code": code}


class WorkerPool:
    """N forked workers and their pipes."""

    def __init__(
        self, cfg: GatewayConfig, log: FilteringBoundLogger, wake: socket.socket,
        inherited: tuple[Any, ...] = (),
    ) -> None:  # fmt: skip
        self.cfg = cfg
        self.count = cfg.workers
        self.log = log
        #: Readable when a signal arrived (the supervisor's wake-up socket).
        self.wake = wake
        #: The supervisor's own descriptors each worker closes first.
        self.inherited = inherited
        self.workers: list[WorkerHandle] = []

    def fork(self) -> None:
        """Fork the workers (no thread runs yet, so the children inherit a quiet process)."""
        ctx = multiprocessing.get_context("fork")
        one_write_per_line(sys.stderr)
        parent = os.getpid()
        for i in range(self.count):
            mine, theirs = ctx.Pipe(duplex=True)
            inherited = [h.conn for h in self.workers] + list(self.inherited)
            proc = ctx.Process(
                target=_child, name=f"snatgw-worker-{i}", daemon=True,
                args=(self.cfg, i, self.count, theirs, inherited, self.log, parent),
            )  # fmt: skip
            sys.stdout.flush()
            sys.stderr.flush()
            proc.start()
            theirs.close()
            self.workers.append(WorkerHandle(i, proc, mine, pid=proc.pid or 0))

    def await_ready(self, stopping: Callable[[], bool]) -> bool:
        """Each worker's ready message (False: asked to stop meanwhile); RuntimeError when
        one fails, dies or takes too long."""
        deadline = time.monotonic() + READY_TIMEOUT
        waiting = {h.conn: h for h in self.workers}
        while waiting:
            if stopping():
                return False
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"workers {sorted(h.index for h in waiting.values())} not ready "
                                   f"within {READY_TIMEOUT:g} s")  # fmt: skip
            sentinels = {h.process.sentinel: h for h in waiting.values()}
            for obj in wait([*waiting, *sentinels, self.wake], min(left, 0.5)):
                if obj is self.wake:
                    with contextlib.suppress(OSError):
                        self.wake.recv(4096)
                    continue
                h = waiting.get(obj) if isinstance(obj, Connection) else sentinels.get(obj)  # type: ignore[arg-type]
                if h is None or h.conn not in waiting:
                    continue
                try:
                    kind, info = h.conn.recv()
                except (EOFError, OSError):
                    h.process.join(1)
                    raise RuntimeError(f"worker {h.index} exited while starting "
                                       f"({signal_name(h.process.exitcode)})") from None  # fmt: skip
                if kind != "ready":
                    raise RuntimeError(f"worker {h.index}: {info.get('error')}")
                h.pid, h.queues = info["pid"], info["queues"]
                del waiting[h.conn]
        for h in self.workers:
            h.start_reader()
        return True

    def ask_all(
        self, command: str, args: dict[str, Any] | None = None, timeout: float = ASK_TIMEOUT
    ) -> list[Any]:
        """Every worker's answer to one request, asked of all at once."""
        waiters = [(h, h.send(command, args)) for h in self.workers]
        deadline = time.monotonic() + timeout
        return [h.result(w, max(0.0, deadline - time.monotonic())) for h, w in waiters]

    def stop(self) -> None:
        """Tell each live worker to stop (it saves its state), kill it after the bound."""
        for h in self.workers:
            if h.process.is_alive():
                h.send("stop")
        deadline = time.monotonic() + STOP_TIMEOUT
        for h in self.workers:
            h.process.join(max(0.0, deadline - time.monotonic()))
            if h.process.is_alive():
                self.log.error("worker_killed", worker=h.index, pid=h.pid,
                               problem=f"did not stop within {STOP_TIMEOUT:g} s")  # fmt: skip
                h.process.kill()
                h.process.join(5)
            if h.reading:  # its last message (final counters) read before its pipe's EOF
                h.closed.wait(2)


def _child(
    cfg: GatewayConfig,
    index: int,
    count: int,
    conn: Connection,
    inherited: list[Any],
    log: FilteringBoundLogger,
    parent: int,
) -> None:
    """The forked worker: its exit code is the worker's."""
    sys.exit(worker_main(cfg, index, count, conn, inherited, log, parent))
