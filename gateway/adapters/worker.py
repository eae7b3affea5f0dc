"""One worker process of an N-worker gateway (README, "Workers";
docs/decisions.md, "Workers: processes and the supervisor").

A worker is forked by the supervisor (:mod:`gateway.adapters.supervisor`)
after the configuration is loaded. It owns everything on the per-packet
path for its share of the traffic and nothing system-wide:

- its own :class:`~gateway.core.table.TranslationTable` built with
  ``Shard(index, count)`` (docs/decisions.md, "Workers"), restored from its
  own state file (:func:`~gateway.adapters.statefile.worker_path`) and saved
  there by its own :class:`~gateway.adapters.statefile.StateSaver`;
- its queue pair (``queue + 2*index`` and ``queue + 2*index + 1``), bound by
  :class:`~gateway.adapters.loop.PacketLoop` with ``worker=index``;
- its own :class:`~gateway.adapters.prober.Prober` over every probe target
  (each worker picks LB rule members from its own view of their health).

The supervisor talks to it over one duplex pipe
(:func:`multiprocessing.Pipe`): the worker says ``("ready", info)`` once its
queues are bound, then answers requests ``(id, command, args)`` with ``(id,
ok, value)`` from one thread that takes each snapshot in the loop's thread
(:meth:`PacketLoop.call`), and says ``("stopped", info)`` as it exits.

It stops when the supervisor says so (``stop``), when the pipe reaches EOF,
or on SIGTERM once its supervisor is gone (``PR_SET_PDEATHSIG`` sends that
when the supervisor dies, even by SIGKILL). A SIGTERM or SIGINT while the
supervisor lives is ignored: systemd's default KillMode and a terminal's
Ctrl-C signal every process of the group, and a worker that stopped on its
own would look like a crash to the supervisor. Its rules stay behind either
way: without a reader the kernel drops the queued packets (fail closed).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from structlog.typing import FilteringBoundLogger

from gateway.adapters import requests
from gateway.adapters.loop import PacketLoop
from gateway.adapters.prober import Prober
from gateway.adapters.statefile import StateSaver, state_path, worker_path
from gateway.adapters.statefile import restore as restore_state
from gateway.config import GatewayConfig
from gateway.core import views
from gateway.core.address import ip_str
from gateway.core.events import fields
from gateway.core.shard import Shard
from gateway.core.table import TranslationTable

#: prctl(2) option: the signal this process gets when its parent dies.
PR_SET_PDEATHSIG = 1
#: How long a reload's reconfigure may hold the loop (the supervisor waits as long).
RECONFIGURE_TIMEOUT = 120.0


def die_with_parent(parent: int) -> bool:
    """Ask the kernel for SIGTERM when the supervisor dies; False when it is gone already."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    return os.getppid() == parent


def queues_of(cfg: GatewayConfig, index: int) -> list[int]:
    """Worker ``index``'s queue numbers (UDP/ICMP, then TCP with GSO)."""
    first = cfg.queue + 2 * index
    return [first, first + 1] if cfg.queue_client == "netlink" else [first]


class Worker:
    """The table, loop, saver and prober of one worker, and its end of the pipe."""

    def __init__(
        self, cfg: GatewayConfig, index: int, count: int, conn: Connection, log: FilteringBoundLogger
    ) -> None:
        self.cfg = cfg
        self.index = index
        self.count = count
        self.conn = conn
        self.log = log
        self._send_lock = threading.Lock()
        self.shard = Shard(index, count)
        now = time.monotonic()
        self.table = TranslationTable(cfg.model, now, shard=self.shard)
        restore_state(self.table, self.state_file(), log)
        self.table.announce_blocks()
        self.loop = PacketLoop(
            self.table, cfg.queue, client=cfg.queue_client, max_len=cfg.queue_maxlen,
            on_events=self.flush_events, worker=index, workers=count,
        )  # fmt: skip
        self.saver = StateSaver(
            self.table, self.loop, log, lambda: (self.state_file(), self.cfg.state_interval)
        )
        self.prober = Prober(self._probe_report, cfg.model.probe_source)

    def state_file(self) -> Path | None:
        return worker_path(state_path(self.cfg.state_file), self.index, self.count)

    def _probe_report(self, probe: str, member: int, ok: bool) -> None:
        table = self.table
        self.loop.post(lambda: table.probe_result(probe, member, ok, time.monotonic()))

    def flush_events(self) -> None:
        for ev in self.table.events:
            getattr(self.log, ev.level)(ev.name, **fields(ev))
        self.table.events.clear()

    def send(self, message: Any) -> None:
        """One message to the supervisor (from the answering thread or at exit)."""
        with self._send_lock:
            self.conn.send(message)

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> int:
        """Serve until the supervisor says stop (or is gone); save the state; say so."""
        self.send(("ready", {"pid": os.getpid(), "flows": self.table.flow_count(),
                             "queues": queues_of(self.cfg, self.index)}))  # fmt: skip
        threading.Thread(target=self._serve_pipe, name="snatgw-worker-pipe", daemon=True).start()
        self.saver.start()
        # No gc.freeze() here: PacketLoop.run freezes the start-up objects itself.
        try:
            self.loop.run()
            self.saver.stop_and_save()
        finally:
            self.prober.stop()
            self.loop.close()
            self.flush_events()
        info = {"counters": self.table.counters_dict(), "flows": self.table.flow_count()}
        self.log.info("worker_stopped", **info)
        with contextlib.suppress(OSError, ValueError):
            self.send(("stopped", info))
        return 0

    def stop(self) -> None:
        """Stop the loop from any thread (and wake it, so it does not finish its sleep)."""
        self.loop.stop()
        self.loop.post(lambda: None)

    def on_signal(self, parent: int) -> None:
        """SIGTERM/SIGINT: stop only if the supervisor is gone (see the module's docstring)."""
        if os.getppid() != parent:
            self.stop()

    # ------------------------------------------------------------------ the pipe

    def _serve_pipe(self) -> None:
        """Answer the supervisor's requests one at a time; EOF means it is gone."""
        while True:
            try:
                req_id, command, args = self.conn.recv()
            except (EOFError, OSError):
                self.stop()
                return
            try:
                value = self.answer(command, args)
                reply: tuple[Any, ...] = (req_id, True, value)
            except Exception as e:  # the supervisor shows it; the worker carries on
                reply = (req_id, False, str(e) or type(e).__name__)
            try:
                self.send(reply)
            except (OSError, ValueError):
                self.stop()
                return

    def answer(self, command: str, args: dict[str, Any]) -> Any:
        """One command, answered from the table in the loop's thread."""
        table = self.table
        call = self.loop.call
        if command == "stop":
            self.stop()
            return True
        if command == "start":
            # After the supervisor put the rules in place, as a single gateway does.
            self.prober.set_targets(call(table.probe_targets), self.cfg.model.probe_source)
            self.prober.start()
            return True
        if command in requests.VIEW_COMMANDS:
            return requests.view(table, call, command, args)
        if command == "status":
            return call(self._status)
        if command == "metrics":
            return call(self._metrics)
        if command == "reconfigure":
            return call(lambda: self._reconfigure(args["config"]), RECONFIGURE_TIMEOUT)
        raise ValueError(f"unknown worker command {command!r}")

    def _members(self) -> dict[str, list[str]]:
        """The backends each address has in this worker's table (merge.status counts them once)."""
        return {ip_str(a.ip): [ip_str(b) for b in a.members] for a in self.table.addresses.values()}

    def _status(self) -> dict[str, Any]:
        status = views.status(self.table)
        status["health"] = views.health(self.table, time.monotonic(), time.time())
        status["members"] = self._members()
        status["counters"] = self.table.counters_dict()
        return status

    def _metrics(self) -> dict[str, Any]:
        from gateway.adapters.metrics import security_counts

        table = self.table
        status = views.status(table)
        status["members"] = self._members()
        return {
            "stats": views.stats(table),
            "ports": views.ports(table, time.monotonic(), time.time(), top=0),
            "status": status,
            "security": security_counts(table.security),
            "health": views.health(table),
            "latency": (list(self.loop.latency), self.loop.latency_sum),
        }

    def _reconfigure(self, cfg: GatewayConfig) -> dict[str, int]:
        """A reload's new model (the supervisor validated it and swapped the rules)."""
        summary: dict[str, int] = self.table.reconfigure(cfg.model, time.monotonic())
        self.cfg = cfg
        self.prober.set_targets(self.table.probe_targets(), cfg.model.probe_source)
        self.flush_events()
        return summary


def main(
    cfg: GatewayConfig,
    index: int,
    count: int,
    conn: Connection,
    inherited: list[Connection],
    log: FilteringBoundLogger,
    parent: int,
) -> int:
    """The worker process's body (the target of the supervisor's fork)."""
    signal.set_wakeup_fd(-1)  # the supervisor's wake-up socket is not ours
    for c in inherited:  # the supervisor's ends of the other workers' pipes: their EOF is theirs
        c.close()
    log = log.bind(worker=index)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not die_with_parent(parent):
        return 1
    try:
        worker = Worker(cfg, index, count, conn, log)
    except Exception as e:  # the supervisor logs why and stops the rest
        with contextlib.suppress(OSError, ValueError):
            conn.send(("failed", {"error": str(e) or type(e).__name__}))
        return 1
    handler = lambda *_: worker.on_signal(parent)  # noqa: E731
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    if os.getppid() != parent:  # gone while the table was being built
        worker.stop()
    return worker.run()
