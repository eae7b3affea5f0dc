"""``snatgw run`` with N > 1 workers: the supervisor (README, "Workers";
docs/decisions.md, "Workers: processes and the supervisor").

The supervisor forks N worker processes (:mod:`gateway.adapters.worker`)
right after the configuration is loaded, before any thread exists, and
waits until each says its queues are bound. Only then does it do what is
system-wide, in the order of a single gateway (:mod:`gateway.adapters.run`):
sysctls, the steering rules (``iptables.apply(..., workers=N, owners=...)``),
the public addresses, forwarding, the metrics endpoint and the control
socket, and ``gateway_ready``. Afterwards its main thread only waits, on
the workers' process sentinels and a signal wake-up socket:

- a worker that exits unasked: ``worker_died``, the addresses go and the
  guard goes in (fail closed), the other workers are stopped, forwarding
  and sysctls go back, exit 1;
- SIGTERM/SIGINT: every worker is told to stop (each saves its state), then
  the cleanup of a normal stop, exit 0;
- SIGHUP (and ``snatgw reload``): :meth:`Supervisor.reload`.

Every control command and every metrics scrape fans out to the workers over
their pipes and is merged (:mod:`gateway.merge`).
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import wait
from typing import Any

from structlog.typing import FilteringBoundLogger

from gateway import merge
from gateway.adapters import iptables, requests, system
from gateway.adapters.control import ControlServer, RequestError
from gateway.adapters.hostside import STATE_DIR, HostSide, host_defaults
from gateway.adapters.statefile import foreign_files, state_path
from gateway.adapters.worker import RECONFIGURE_TIMEOUT, queues_of
from gateway.adapters.workerpool import WorkerHandle, WorkerPool, signal_name
from gateway.config import GatewayConfig
from gateway.core.address import ip_str
from gateway.core.errors import ModelError
from gateway.core.shard import Shard, backend_owner
from gateway.core.table import TranslationTable


class _StoppedEarly(Exception):
    """SIGTERM or SIGINT before every worker was ready."""


class Supervisor(HostSide):
    """N workers and everything system-wide around them."""

    def __init__(
        self,
        cfg: GatewayConfig,
        log: FilteringBoundLogger,
        metrics: tuple[str, int] | None = None,
        control_socket: str | None = None,
    ) -> None:
        self.control_override = control_socket
        cfg = host_defaults(self._overridden(cfg))
        self.cfg = cfg
        self.count = cfg.workers
        self.log = log
        self.metrics = metrics if metrics is not None else cfg.metrics
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.reloads = {"applied": 0, "rejected": 0}
        self.control: ControlServer | None = None
        self.publics = list(cfg.model.public_addresses())
        self.tcp_queue = cfg.queue + 1
        self.stopping = False
        #: Set as the stop or the failure begins: no reload starts after it.
        self.closing = False
        self.hup = False
        self._reload_lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.pool = WorkerPool(cfg, log, self._wake_r, (self._wake_r, self._wake_w))
        self.workers = self.pool.workers
        self.ask_all = self.pool.ask_all

    def owners(self, cfg: GatewayConfig) -> dict[int, int]:
        """Instance public address -> the worker that owns its backend (all its traffic goes there)."""
        return {i.public: backend_owner(i.private, self.count) for i in cfg.model.instance_ips}

    # ------------------------------------------------------------------ signals

    def _on_stop(self, *_: Any) -> None:
        self.stopping = True

    def _on_hup(self, *_: Any) -> None:
        self.hup = True

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> int:
        """Start the workers, set the host up, serve until a stop or a worker's death."""
        cfg = self.cfg
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        old_wakeup = signal.set_wakeup_fd(self._wake_w.fileno())
        for path in foreign_files(state_path(cfg.state_file), self.count):
            self.log.info("state_ignored", path=str(path), workers=self.count,
                          reason="written by a gateway with another worker count")  # fmt: skip
        died: WorkerHandle | None = None
        stop_metrics = None
        control = None
        set_up = False
        try:
            self.pool.fork()
            if not self.pool.await_ready(lambda: self.stopping):
                raise _StoppedEarly
            control = self.control = ControlServer(
                cfg.control_socket, self.handle_request, cfg.control_group, cfg.control_mode,
                cfg.control_max_clients,
            )  # fmt: skip
            set_up = True
            self._hairpin_sysctls(cfg)
            iptables.apply(
                cfg.inside, cfg.outside, cfg.queue, self.publics, self.tcp_queue,
                probes=bool(cfg.model.probes), workers=self.count, owners=self.owners(cfg),
            )  # fmt: skip
            system.add_addresses(cfg.outside, self.publics)
            system.enable_forwarding(STATE_DIR)
            if self.metrics is not None:
                from gateway.adapters.metrics import serve

                stop_metrics = serve(*self.metrics, self.metrics_snapshot)
            control.start()
            self.log.info("gateway_ready", **self.describe())
            self._check_probe_source(cfg)
            self.ask_all("start")
            died = self._watch()
        except _StoppedEarly:
            pass  # SIGTERM while the workers started: nothing on the host to undo
        finally:
            self.closing = True
            if died is None and set_up and not self.stopping:
                died = next((h for h in self.workers if not h.process.is_alive()), None)
                if died is not None:  # it died while the rest was being set up
                    self.log.error("worker_died", worker=died.index, pid=died.pid,
                                   **signal_name(died.process.exitcode))  # fmt: skip
            if died is not None:
                # Fail closed at once: no public address is local while nothing queues it,
                # then the guard replaces every rule (docs/kernel.md, "Guard").
                system.remove_addresses(cfg.outside, self.publics)
                guarded = iptables.guard(cfg.inside, cfg.outside)
                self.log.error("gateway_failed_closed", worker=died.index, guard=guarded)
            # A control-socket reload under way ends (or rolls back) before the host is
            # put back: its rules and addresses would otherwise land after ours.
            with self._reload_lock:
                self._tear_down(died, set_up)
            if control is not None:
                control.close()
            if stop_metrics is not None:
                stop_metrics()
            signal.set_wakeup_fd(old_wakeup)
        counters = merge.stats([{"counters": h.final["counters"]} for h in self.workers if h.final])
        flows = sum(h.final["flows"] for h in self.workers if h.final)
        self.log.info("gateway_stopped", counters=counters.get("counters", {}), flows=flows,
                      workers=self.count, failed=died is not None)  # fmt: skip
        return 1 if died is not None else 0

    def _tear_down(self, died: WorkerHandle | None, set_up: bool) -> None:
        """Stop the workers and put the host back (the guard after a death, else as
        ``stopped`` says); with no reload running (the caller holds the reload lock)."""
        cfg = self.cfg
        if died is not None and set_up:
            # Again: a reload that was under way at the death may have put some back.
            system.remove_addresses(cfg.outside, self.publics)
            iptables.guard(cfg.inside, cfg.outside)
        self.pool.stop()
        if set_up:
            if died is None:
                system.remove_addresses(cfg.outside, self.publics)
            if died is None and cfg.stopped == "remove":
                system.restore_forwarding(STATE_DIR)
                iptables.remove()
            else:
                if died is None:
                    iptables.guard(cfg.inside, cfg.outside)
                system.restore_forwarding(STATE_DIR)
            system.restore_sysctls(STATE_DIR)

    def _watch(self) -> WorkerHandle | None:
        """Wait for a stop, a reload or a worker's death; the dead worker, or None."""
        sentinels = {h.process.sentinel: h for h in self.workers}
        while not self.stopping:
            ready = wait([*sentinels, self._wake_r], 0.5)
            for obj in ready:
                if obj is self._wake_r:
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(4096)
                    continue
                h = sentinels[obj]  # type: ignore[index]
                h.process.join(1)
                if self.stopping:
                    return None
                self.log.error("worker_died", worker=h.index, pid=h.pid, **signal_name(h.process.exitcode))
                return h
            if self.hup:
                self.hup = False
                self.reload("sighup")
        return None

    def describe(self, status: dict[str, Any] | None = None) -> dict[str, Any]:
        if status is None:
            status = merge.status(self.ask_all("status"))
        return {**self._describe(status), "workers": self.count, "worker_pids": [h.pid for h in self.workers]}

    # ------------------------------------------------------------------ reload

    def reload(self, source: str) -> dict[str, Any]:
        """Re-read the config, validate it for every worker's shard, swap the rules, then
        hand the new model to every worker; or reject it and keep the old one."""
        with self._reload_lock:
            if self.closing:
                return self._reject(source, "(system)", "the gateway is stopping")
            return self._reload(source)

    def _reload(self, source: str) -> dict[str, Any]:
        cfg = self.cfg
        began = time.monotonic()
        new = self._read_reload()
        if isinstance(new, tuple):
            return self._reject(source, *new)
        try:  # a throwaway table per shard: refused before anything is touched
            for i in range(self.count):
                TranslationTable(new.model, time.monotonic(), shard=Shard(i, self.count))
        except ModelError as e:
            return self._reject(source, e.key, e.problem)
        publics = list(new.model.public_addresses())
        added = [p for p in publics if p not in self.publics]
        gone = [p for p in self.publics if p not in publics]
        try:
            system.remove_addresses(cfg.outside, gone)
            jumps = iptables.apply(
                cfg.inside, cfg.outside, cfg.queue, publics, self.tcp_queue,
                probes=bool(new.model.probes), workers=self.count, owners=self.owners(new),
            )  # fmt: skip
            summaries = self.ask_all("reconfigure", {"config": new}, RECONFIGURE_TIMEOUT)
            system.add_addresses(cfg.outside, added)
        # RequestError: a worker answered with an error (its table refused the model, or it is
        # gone): rolled back like the rest, never out of reload() (from SIGHUP that stopped the gateway).
        except (OSError, RuntimeError, ModelError, TimeoutError, RequestError) as e:
            iptables.apply(
                cfg.inside, cfg.outside, cfg.queue, self.publics, self.tcp_queue,
                probes=bool(cfg.model.probes), workers=self.count, owners=self.owners(cfg),
            )  # fmt: skip
            with contextlib.suppress(Exception):  # back to the old model where the new one went
                self.ask_all("reconfigure", {"config": cfg}, RECONFIGURE_TIMEOUT)
            system.remove_addresses(cfg.outside, added)
            system.add_addresses(cfg.outside, gone)
            return self._reject(source, "(system)", str(e))
        self._check_probe_source(new)
        self.cfg = new
        self.publics = publics
        self.reloads["applied"] += 1
        fields = {"config": new.path, "source": source, **merge.reload_summary(summaries)}
        fields["public_ips_added"] = [ip_str(p) for p in added]
        fields["public_ips_removed"] = [ip_str(p) for p in gone]
        fields["rule_jumps_restored"] = jumps
        fields["took_ms"] = round((time.monotonic() - began) * 1000, 1)
        self.log.info("config_reloaded", **fields)
        return {"applied": True, **fields}

    # ------------------------------------------------------------------ operator's view

    def handle_request(self, request: dict[str, Any]) -> Any:
        """One control-socket request, checked once, fanned out to every worker and merged."""
        cmd, args = requests.parse(request)
        if cmd == "reload":
            return self.reload("control")
        if cmd == "status":
            return self._status()
        merger = _MERGERS[cmd]
        return merger(self.ask_all(cmd, args))

    def _status(self) -> dict[str, Any]:
        parts = self.ask_all("status")
        merged = merge.status(parts)
        now = time.monotonic()
        workers = [
            {"index": h.index, "pid": h.pid, "alive": h.process.is_alive(), "flows": p["flows"],
             "queues": h.queues or queues_of(self.cfg, h.index),
             "packets": p["counters"].get("in2out_translated", 0) + p["counters"].get("out2in_translated", 0)}
            for h, p in zip(self.workers, parts, strict=True)
        ]  # fmt: skip
        return {
            **self.describe(merged),
            **merged,
            "uptime": round(now - self.started, 3),
            "started": self.started_wall,
            "reloads": dict(self.reloads),
            "control": self.control.stats() if self.control is not None else None,
            "workers": workers,
            "worker_count": self.count,
        }

    def metrics_snapshot(self) -> dict[str, Any]:
        """One scrape: every worker's snapshot, merged, with the supervisor's own figures."""
        snap = merge.metrics(self.ask_all("metrics"))
        snap["reloads"] = dict(self.reloads)
        snap["started"] = self.started_wall
        return snap


#: How the answers of the workers to each view command become one.
_MERGERS: dict[str, Callable[[list[Any]], Any]] = {
    "flows": merge.flows, "ports": merge.ports, "rules": merge.rules, "stats": merge.stats, "who": merge.who,
}
