"""``snatgw run``: set the host up, serve packets, answer the operator, put
everything back.

:class:`Gateway` ties the adapters around one translation table: the packet
loop, iptables, addresses and sysctls, the health prober, the control
socket, the metrics endpoint and reload (SIGHUP or ``snatgw reload``).
Everything that touches the table runs in the loop's thread: requests from
other threads go through :meth:`PacketLoop.call`, probe results through
:meth:`PacketLoop.post`.

Two model fields the config may leave empty are the host's to fill, before
the table is built and at every reload: ``address_space`` (the VirtualNetwork
tag: the inside interface's IPv4 prefixes) and ``probe_source`` (the
AzureLoadBalancer address: the inside interface's first address).
"""

from __future__ import annotations

import signal
import time
from typing import Any

from structlog.typing import FilteringBoundLogger

from gateway.adapters import iptables, requests, system
from gateway.adapters.control import ControlServer
from gateway.adapters.hostside import STATE_DIR, HostSide, host_defaults
from gateway.adapters.loop import PacketLoop
from gateway.adapters.prober import Prober
from gateway.adapters.statefile import StateSaver, foreign_files, state_path
from gateway.adapters.statefile import restore as restore_state
from gateway.config import GatewayConfig
from gateway.core import views
from gateway.core.address import ip_str
from gateway.core.errors import ModelError
from gateway.core.events import fields
from gateway.core.table import TranslationTable


class Gateway(HostSide):
    """One running gateway in this network namespace."""

    def __init__(
        self,
        cfg: GatewayConfig,
        log: FilteringBoundLogger,
        metrics: tuple[str, int] | None = None,
        control_socket: str | None = None,
    ) -> None:
        #: ``--control-socket`` over the file's value; a reload keeps it.
        self.control_override = control_socket
        cfg = host_defaults(self._overridden(cfg))
        self.cfg = cfg
        self.log = log
        self.metrics = metrics if metrics is not None else cfg.metrics
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.reloads = {"applied": 0, "rejected": 0}
        #: The control socket once :meth:`run` opened it (its counters go into ``status``).
        self.control: ControlServer | None = None
        self.table = TranslationTable(cfg.model, self.started)
        # Flows of the last run keep their ports (README, "Restarts and upgrades").
        restore_state(self.table, state_path(cfg.state_file), log)
        for path in foreign_files(state_path(cfg.state_file), 1):
            log.info("state_ignored", path=str(path), workers=1,
                     reason="written by a gateway with another worker count")  # fmt: skip
        self.table.announce_blocks()  # the port-block log says what the restored table holds
        self.publics = list(cfg.model.public_addresses())
        self.tcp_queue = cfg.queue + 1 if cfg.queue_client == "netlink" else None
        self.loop = PacketLoop(
            self.table,
            cfg.queue,
            client=cfg.queue_client,
            max_len=cfg.queue_maxlen,
            on_events=self.flush_events,
            on_hup=self._on_hup,
        )
        self.saver = StateSaver(
            self.table, self.loop, log, lambda: (state_path(self.cfg.state_file), self.cfg.state_interval)
        )
        self.prober = Prober(self._probe_report, cfg.model.probe_source)

    def _probe_report(self, probe: str, member: int, ok: bool) -> None:
        """A result from the prober's thread: applied in the loop's (no table access here)."""
        table = self.table
        self.loop.post(lambda: table.probe_result(probe, member, ok, time.monotonic()))

    def _on_hup(self) -> None:
        self.reload("sighup")

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> int:
        """Serve until SIGINT or SIGTERM; always removes what it added."""
        cfg = self.cfg
        signal.signal(signal.SIGTERM, self.loop.stop)
        signal.signal(signal.SIGINT, self.loop.stop)
        signal.signal(signal.SIGHUP, self.loop.request_reload)
        try:
            control = self.control = ControlServer(
                cfg.control_socket, self.handle_request, cfg.control_group, cfg.control_mode,
                cfg.control_max_clients,
            )  # fmt: skip
        except (OSError, RuntimeError):
            self.loop.close()
            raise
        stop_metrics = None
        try:
            self._hairpin_sysctls(cfg)
            probes = bool(cfg.model.probes)
            iptables.apply(cfg.inside, cfg.outside, cfg.queue, self.publics, self.tcp_queue, probes=probes)
            # After the rules, removed before the guard: a public address is never
            # local while nothing queues it (the host's own services would answer).
            system.add_addresses(cfg.outside, self.publics)
            system.enable_forwarding(STATE_DIR)
            if self.metrics is not None:
                from gateway.adapters.metrics import serve

                stop_metrics = serve(*self.metrics, self.metrics_snapshot)
            control.start()
            self.log.info("gateway_ready", **self.describe())
            self.saver.start()
            self._check_probe_source(cfg)
            self.prober.set_targets(self.table.probe_targets(), cfg.model.probe_source)
            self.prober.start()
            self.loop.run()
            self.saver.stop_and_save()
        finally:
            self.prober.stop()
            system.remove_addresses(cfg.outside, self.publics)
            # stopped = "block": the guard replaces the rules in one commit, then
            # forwarding goes back to the operator's value; "remove": forwarding
            # first, then every rule (docs/kernel.md, "Guard").
            if self.cfg.stopped == "remove":
                system.restore_forwarding(STATE_DIR)
                iptables.remove()
            else:
                iptables.guard(cfg.inside, cfg.outside)
                system.restore_forwarding(STATE_DIR)
            system.restore_sysctls(STATE_DIR)
            control.close()
            if stop_metrics is not None:
                stop_metrics()
            self.loop.close()
            self.flush_events()
        self.log.info("gateway_stopped", counters=self.table.counters_dict(), flows=self.table.flow_count())
        return 0

    def flush_events(self) -> None:
        for ev in self.table.events:
            getattr(self.log, ev.level)(ev.name, **fields(ev))
        self.table.events.clear()

    def describe(self) -> dict[str, Any]:
        return self._describe(views.status(self.table))

    # ------------------------------------------------------------------ reload

    def reload(self, source: str) -> dict[str, Any]:
        """Re-read the config file and apply it, or reject it and keep the old one.

        Runs in the loop's thread (SIGHUP sets a flag the loop acts on;
        ``snatgw reload`` arrives through :meth:`PacketLoop.call`). The rules
        are swapped atomically (no moment without them); an address that goes
        leaves the interface before the swap and one that comes joins it after,
        so no public address is ever local to the host while nothing queues it.
        """
        cfg = self.cfg
        began = time.monotonic()
        new = self._read_reload()
        if isinstance(new, tuple):
            return self._reject(source, *new)
        probes = bool(new.model.probes)
        publics = list(new.model.public_addresses())
        added = [p for p in publics if p not in self.publics]
        gone = [p for p in self.publics if p not in publics]
        # A public address is never local while no rule queues it: one that goes
        # leaves the interface before the swap, one that comes joins it after.
        try:
            system.remove_addresses(cfg.outside, gone)
            jumps = iptables.apply(
                cfg.inside, cfg.outside, cfg.queue, publics, self.tcp_queue, probes=probes
            )
            summary = self.table.reconfigure(new.model, time.monotonic())
            system.add_addresses(cfg.outside, added)
        except (OSError, RuntimeError, ModelError) as e:
            had = bool(cfg.model.probes)
            iptables.apply(cfg.inside, cfg.outside, cfg.queue, self.publics, self.tcp_queue, probes=had)
            system.remove_addresses(cfg.outside, added)
            system.add_addresses(cfg.outside, gone)
            return self._reject(source, "(system)", str(e))
        self._check_probe_source(new)
        self.prober.set_targets(self.table.probe_targets(), new.model.probe_source)
        self.cfg = new
        self.publics = publics
        self.reloads["applied"] += 1
        self.flush_events()
        fields = {"config": new.path, "source": source, **summary}
        fields["public_ips_added"] = [ip_str(p) for p in added]
        fields["public_ips_removed"] = [ip_str(p) for p in gone]
        fields["rule_jumps_restored"] = jumps
        fields["took_ms"] = round((time.monotonic() - began) * 1000, 1)
        self.log.info("config_reloaded", **fields)
        return {"applied": True, **fields}

    # ------------------------------------------------------------------ operator's view

    def handle_request(self, request: dict[str, Any]) -> Any:
        """Answer one control-socket request (in the control thread; the data
        comes from the loop's thread)."""
        cmd, args = requests.parse(request)
        if cmd == "status":
            return self.loop.call(self._status)
        if cmd == "reload":
            return self.loop.call(lambda: self.reload("control"))
        return requests.view(self.table, self.loop.call, cmd, args)

    def _status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            **self.describe(),
            **views.status(self.table),
            "health": views.health(self.table, now, time.time()),
            "uptime": round(now - self.started, 3),
            "started": self.started_wall,
            "reloads": dict(self.reloads),
            "control": self.control.stats() if self.control is not None else None,
        }

    def metrics_snapshot(self) -> dict[str, Any]:
        """Everything one scrape needs, taken in the loop's thread."""
        from gateway.adapters.metrics import security_counts

        def take() -> dict[str, Any]:
            return {
                "stats": views.stats(self.table),
                "ports": views.ports(self.table, time.monotonic(), time.time(), top=0),
                "status": views.status(self.table),
                "security": security_counts(self.table.security),
                "health": views.health(self.table),
                "latency": (list(self.loop.latency), self.loop.latency_sum),
                "reloads": dict(self.reloads),
                "started": self.started_wall,
            }

        result: dict[str, Any] = self.loop.call(take)
        return result


def run(
    cfg: GatewayConfig,
    log: FilteringBoundLogger,
    metrics: tuple[str, int] | None = None,
    control_socket: str | None = None,
) -> int:
    """Run the gateway in this network namespace until SIGINT or SIGTERM: one process
    with ``workers = 1``, else a supervisor and its workers (README, "Workers")."""
    for name in (cfg.inside, cfg.outside):
        system.interface_index(name)
    if cfg.workers > 1:
        from gateway.adapters.supervisor import Supervisor

        return Supervisor(cfg, log, metrics, control_socket).run()
    return Gateway(cfg, log, metrics, control_socket).run()
