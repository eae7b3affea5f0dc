"""What the single gateway (:mod:`gateway.adapters.run`) and the supervisor of N
workers (:mod:`gateway.adapters.supervisor`) do alike on the host's side: fill
in the host's defaults, read a configuration for a reload and refuse it
before anything is touched, warn about an unusable probe source, and describe
themselves in ``gateway_ready`` and ``status``.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from structlog.typing import FilteringBoundLogger

from gateway.adapters import system
from gateway.config import ConfigError, GatewayConfig, load
from gateway.core.address import ip_str

#: Where state that must survive a crash is kept (one file per network namespace).
STATE_DIR = Path("/run/snatgw")


def host_defaults(cfg: GatewayConfig) -> GatewayConfig:
    """``cfg`` with ``address_space`` and ``probe_source`` filled in from the inside
    interface where the config left them empty (docs/model.md, "Security groups")."""
    model = cfg.model
    space = model.address_space or system.inside_prefixes(cfg.inside)
    source = model.probe_source or system.first_address(cfg.inside)
    if space == model.address_space and source == model.probe_source:
        return cfg
    return replace(cfg, model=replace(model, address_space=space, probe_source=source))


def cidrs(span: tuple[int, int]) -> Iterator[ipaddress.IPv4Network]:
    """An inclusive address range as the fewest CIDR blocks."""
    lo, hi = span
    return ipaddress.summarize_address_range(ipaddress.IPv4Address(lo), ipaddress.IPv4Address(hi))


class HostSide:
    """The reload bookkeeping and self-description both kinds of ``snatgw run`` share."""

    cfg: GatewayConfig
    log: FilteringBoundLogger
    control_override: str | None
    metrics: tuple[str, int] | None
    publics: list[int]
    tcp_queue: int | None
    reloads: dict[str, int]

    def _overridden(self, cfg: GatewayConfig) -> GatewayConfig:
        """``cfg`` with ``--control-socket`` over the file's value (a reload keeps it)."""
        if self.control_override is None:
            return cfg
        return replace(cfg, control_socket=self.control_override)

    def _read_reload(self) -> GatewayConfig | tuple[str, str]:
        """The configuration a reload would apply, host defaults filled in; or the
        (key, problem) it is refused for, found before anything is touched."""
        cfg = self.cfg
        try:
            new = self._overridden(load(cfg.path))
        except ConfigError as e:
            return e.key, e.problem
        restart = cfg.restart_keys(new)
        if restart:
            return restart[0], "changing it needs a restart (the old value stays)"
        for key, name in (("gateway.inside", new.inside), ("gateway.outside", new.outside)):
            try:
                system.interface_index(name)
            except LookupError as e:
                return key, str(e)
        return host_defaults(new)

    def _reject(self, source: str, key: str, problem: str) -> dict[str, Any]:
        self.reloads["rejected"] += 1
        fields = {"config": self.cfg.path, "source": source, "key": key, "problem": problem}
        self.log.error("config_rejected", **fields)
        return {"applied": False, **fields}

    def _hairpin_sysctls(self, cfg: GatewayConfig) -> None:
        """Before the rules: a hairpinned packet needs ``accept_local`` from its first
        (recorded and put back at stop); strict ``rp_filter`` still drops them, so say so."""
        system.set_sysctls(STATE_DIR, system.hairpin_sysctls(cfg.inside))
        if system.strict_rp_filter(cfg.inside):
            self.log.warning(
                "hairpin_blocked_by_rp_filter", interface=cfg.inside,
                problem="strict reverse-path filtering (rp_filter 1) drops hairpinned packets; "
                "set net.ipv4.conf.all.rp_filter and the inside interface's to 2 (loose) or 0",
            )  # fmt: skip

    def _check_probe_source(self, cfg: GatewayConfig) -> None:
        """Warn when probes cannot be sent from ``probe_source`` (not an address of this
        host): every probe then fails and its members stay down."""
        source = cfg.model.probe_source
        if not cfg.model.probes or not source:
            return
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((ip_str(source), 0))
            except OSError as e:
                self.log.warning(
                    "probe_source_unusable", probe_source=ip_str(source),
                    problem=f"cannot bind a probe socket to it ({e.strerror}); every probe will fail",
                )  # fmt: skip

    def _describe(self, status: dict[str, Any]) -> dict[str, Any]:
        """The configuration and host facts ``gateway_ready`` and ``status`` show;
        ``status``: the table's (or the workers' merged) status view."""
        cfg = self.cfg
        return {
            "config": cfg.path,
            "queue": cfg.queue,
            "tcp_queue": self.tcp_queue,
            "queue_client": cfg.queue_client,
            "inside": cfg.inside,
            "outside": cfg.outside,
            "public_ips": [ip_str(a) for a in self.publics],
            "pools": {p["pool"]: {k: v for k, v in p.items() if k != "pool"} for p in status["pools"]},
            "idle_timeout": cfg.model.timeouts.idle,
            "address_space": [str(n) for span in cfg.model.address_space for n in cidrs(span)],
            "probe_source": ip_str(cfg.model.probe_source) if cfg.model.probe_source else None,
            "inbound_default": "allow" if cfg.model.inbound_default_allow else "deny",
            "control_socket": cfg.control_socket,
            "metrics": f"{self.metrics[0]}:{self.metrics[1]}" if self.metrics else None,
        }
