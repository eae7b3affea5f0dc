"""Reading the TOML configuration into a :class:`~gateway.core.model.GatewayModel`.

Every problem is reported as one :class:`ConfigError` naming the file, the
key and the problem, before anything on the system is touched (the CLI
prints it as one line and exits 2).
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway import config_inbound as inbound
from gateway.config_reader import ConfigError, Reader
from gateway.core.errors import ModelError
from gateway.core.model import (
    Frontend,
    GatewayModel,
    InstanceIp,
    Pool,
    RoleKind,
    Timeouts,
)
from gateway.core.scenario import plan
from gateway.core.shard import MAX_WORKERS
from gateway.core.tier import MAX_BACKENDS_PER_ADDRESS

DEFAULT_CONTROL_SOCKET = "/run/snatgw/snatgw.sock"
#: Keys a reload cannot change: they need a restart.
RESTART_KEYS = (
    "inside",
    "outside",
    "queue",
    "queue_maxlen",
    "queue_client",
    "control_socket",
    "control_group",
    "control_mode",
    "control_max_clients",
    "metrics",
    "workers",
)


def parse_endpoint(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) as (host, port); ValueError says what is wrong."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not HOST:PORT")
    return host, int(port)


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """The whole configuration: where the gateway sits, and the model."""

    path: str
    inside: str
    outside: str
    queue: int
    model: GatewayModel
    queue_maxlen: int = 4096
    #: "netlink": our client, UDP/ICMP on ``queue`` and TCP with GSO on ``queue + 1``;
    #: "netfilterqueue": the library, everything on ``queue``.
    queue_client: str = "netlink"
    #: The control socket ``snatgw flows|ports|stats|status|reload`` talk to.
    control_socket: str = DEFAULT_CONTROL_SOCKET
    #: Group allowed to use the control socket (mode 0660); None: root only (0600).
    control_group: str | None = None
    #: ``(host, port)`` of the Prometheus endpoint; None: off.
    metrics: tuple[str, int] | None = None
    #: What a clean stop leaves: "block" (the guard rules stay: nothing from the inside
    #: leaves, nothing unsolicited gets in) or "remove" (every rule goes). A crash always
    #: leaves the guard (docs/kernel.md, "Guard").
    stopped: str = "block"
    #: Permission bits of the control socket; None: 0660 with ``control_group``, else 0600.
    #: Who may connect may run the read-only commands; ``reload`` needs uid 0 regardless.
    control_mode: int | None = None
    #: Control connections open at once; more are refused with an error line.
    control_max_clients: int = 256
    #: The state file the table is saved to at stop and every ``state_interval``
    #: seconds, and restored from at start (README, "Restarts and upgrades").
    #: None: ``$STATE_DIRECTORY/state.json`` when systemd sets it (the unit's
    #: StateDirectory=), else none; "": none.
    state_file: str | None = None
    state_interval: float = 5.0
    #: Worker processes (README, "Workers"): 1 is the single-process gateway of
    #: before; more run under a supervisor, each with its own queue pair
    #: (``queue + 2*i``, ``queue + 2*i + 1``) and its share of the table.
    workers: int = 1

    def restart_keys(self, other: GatewayConfig) -> list[str]:
        """Keys whose change a reload cannot apply (they need a restart)."""
        return [f"gateway.{n}" for n in RESTART_KEYS if getattr(self, n) != getattr(other, n)]


_SECTIONS = {
    "gateway",
    "frontends",
    "pools",
    "lb_rules",
    "instance_ips",
    "default_snat",
    "probes",
    "inbound_nat_rules",
    "security_groups",
    "cloud_services",
}
_GATEWAY_KEYS = {
    "inside",
    "outside",
    "queue",
    "queue_maxlen",
    "queue_client",
    "idle_timeout",
    "tcp_fin_linger",
    "tcp_rst_linger",
    "exhaustion_event_interval",
    "high_water",
    "max_flows",
    "max_flows_per_backend",
    "random_ports",
    "control_socket",
    "control_group",
    "control_mode",
    "control_max_clients",
    "metrics",
    "stopped",
    "state_file",
    "log_flows",
    "state_interval",
    "address_space",
    "inbound_default",
    "probe_source",
    "workers",
}


def auto_workers(cpus: int | None = None) -> int:
    """``workers = "auto"``: one worker per CPU, at most :data:`MAX_WORKERS`."""
    n = cpus if cpus is not None else os.cpu_count()
    return max(1, min(n or 1, MAX_WORKERS))


def _workers(r: Reader, value: Any, queue: int, client: str, cpus: int | None) -> int:
    """``gateway.workers``: "auto" or 1..16, checked against the queue client and the
    queue numbers it needs (worker i: ``queue + 2*i`` and ``queue + 2*i + 1``)."""
    if value == "auto":
        # The library client has one queue and no steering: auto means one worker there.
        if client == "netfilterqueue":
            return 1
        return max(1, min(auto_workers(cpus), (65536 - queue) // 2))
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        raise r.fail("gateway.workers", f'{value!r} is not "auto" or an integer from 1 to {MAX_WORKERS}')
    if value > 1 and client == "netfilterqueue":
        raise r.fail("gateway.workers", 'more than one worker needs queue_client = "netlink"')
    if value > 1 and queue + 2 * value - 1 > 65535:
        raise r.fail(
            "gateway.workers",
            f"{value} workers need queues {queue} to {queue + 2 * value - 1}; the last must be at most 65535",
        )
    return value


def parse(text: str, path: str, cpus: int | None = None) -> GatewayConfig:
    """Validate ``text`` (TOML) and build the configuration; raise ConfigError.
    ``cpus``: what ``workers = "auto"`` counts (default: this machine's CPUs)."""
    r = Reader(path)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise r.fail("(syntax)", str(e)) from None
    r.table(doc, "", _SECTIONS, {"gateway"})
    gw = r.table(doc["gateway"], "gateway", _GATEWAY_KEYS, {"inside", "outside"})
    inside = r.string(gw["inside"], "gateway.inside")
    outside = r.string(gw["outside"], "gateway.outside")
    if len(inside) > 15 or len(outside) > 15:
        raise r.fail(
            "gateway.inside" if len(inside) > 15 else "gateway.outside",
            "interface names have at most 15 characters",
        )
    if inside == outside:
        raise r.fail("gateway.outside", "must differ from gateway.inside")
    queue = r.integer(gw.get("queue", 0), "gateway.queue", 0, 65535)
    maxlen = r.integer(gw.get("queue_maxlen", 4096), "gateway.queue_maxlen", 16, 65536)
    client = gw.get("queue_client", "netlink")
    if client not in ("netlink", "netfilterqueue"):
        raise r.fail("gateway.queue_client", f"{client!r} is not one of netlink, netfilterqueue")
    if client == "netlink" and queue == 65535:
        raise r.fail("gateway.queue", "must be below 65535 with queue_client netlink (TCP uses queue + 1)")
    workers = _workers(r, gw.get("workers", "auto"), queue, client, cpus)
    timeouts = Timeouts(
        idle=r.seconds(gw.get("idle_timeout", 240), "gateway.idle_timeout"),
        tcp_fin_linger=r.seconds(gw.get("tcp_fin_linger", 10), "gateway.tcp_fin_linger"),
        tcp_rst_linger=r.seconds(gw.get("tcp_rst_linger", 2), "gateway.tcp_rst_linger"),
    )
    interval = r.seconds(gw.get("exhaustion_event_interval", 10), "gateway.exhaustion_event_interval")
    high = gw.get("high_water", 0.8)
    if isinstance(high, bool) or not isinstance(high, int | float) or not 0 < high <= 1:
        raise r.fail("gateway.high_water", "must be a share of the block above 0 and at most 1 (0.8 is 80%)")
    max_flows = r.integer(gw.get("max_flows", 262144), "gateway.max_flows", 1, 16_777_216)
    max_per_backend = r.integer(
        gw.get("max_flows_per_backend", 65536), "gateway.max_flows_per_backend", 1, 16_777_216
    )
    random_ports = gw.get("random_ports", True)
    if not isinstance(random_ports, bool):
        raise r.fail("gateway.random_ports", "must be true or false")
    control = gw.get("control_socket", DEFAULT_CONTROL_SOCKET)
    if not isinstance(control, str) or not control.startswith("/") or len(control.encode()) > 107:
        raise r.fail("gateway.control_socket", "must be an absolute path of at most 107 bytes")
    group = gw.get("control_group")
    if group is not None:
        group = r.string(group, "gateway.control_group")
    mode = _control_mode(r, gw.get("control_mode"))
    max_clients = r.integer(gw.get("control_max_clients", 256), "gateway.control_max_clients", 1, 4096)
    stopped = gw.get("stopped", "block")
    if stopped not in ("block", "remove"):
        raise r.fail("gateway.stopped", f"{stopped!r} is not one of block, remove")
    state_file = gw.get("state_file")
    if state_file is not None and not (isinstance(state_file, str) and state_file[:1] in ("", "/")):
        raise r.fail("gateway.state_file", 'must be an absolute path, or "" for none')
    state_interval = r.seconds(gw.get("state_interval", 5), "gateway.state_interval")
    metrics = None
    if "metrics" in gw:
        try:
            metrics = parse_endpoint(r.string(gw["metrics"], "gateway.metrics"))
        except ValueError as e:
            raise r.fail("gateway.metrics", str(e)) from None

    address_space = inbound.address_space(r, gw.get("address_space"))
    inbound_default = gw.get("inbound_default", "deny")
    if inbound_default not in ("deny", "allow"):
        raise r.fail("gateway.inbound_default", f"{inbound_default!r} is not one of deny, allow")
    probe_source = r.ip(gw["probe_source"], "gateway.probe_source") if "probe_source" in gw else 0

    publics: dict[int, str] = {}

    def claim(ip: int, key: str) -> None:
        if ip in publics:
            raise r.fail(key, f"{ipaddress.IPv4Address(ip)} is already used by {publics[ip]}")
        publics[ip] = key

    frontends: list[Frontend] = []
    for k, t, name in r.named_tables(doc, "frontends", {"name", "ip"}, "frontend"):
        ip = r.ip(t["ip"], f"{k}.ip")
        claim(ip, f"{k}.ip")
        frontends.append(Frontend(name, ip))

    pools: list[Pool] = []
    for k, t, name in r.named_tables(doc, "pools", {"name", "members"}, "pool"):
        raw = r.array(t["members"], f"{k}.members")
        if len(raw) > MAX_BACKENDS_PER_ADDRESS:
            raise r.fail(
                f"{k}.members", f"{len(raw)} members, at most {MAX_BACKENDS_PER_ADDRESS} are allowed"
            )
        members: list[int] = []
        for j, m in enumerate(raw):
            ip = r.ip(m, f"{k}.members[{j}]")
            if ip in members:
                raise r.fail(f"{k}.members[{j}]", f"{m} is listed twice")
            members.append(ip)
        pools.append(Pool(name, tuple(members)))

    ports = inbound.FrontendPorts(r)
    classic = inbound.cloud_services(r, doc, frontends, pools, claim, ports)
    frontends += classic.frontends
    pools += classic.pools
    probes = inbound.probes(r, doc)
    taken = {x.name for x in classic.rules}
    rules = classic.rules + inbound.lb_rules(r, doc, frontends, pools, probes, ports, taken)
    nat_rules = inbound.inbound_nat_rules(r, doc, frontends, ports)

    instances: list[InstanceIp] = []
    privates: set[int] = set()
    for i, item in enumerate(r.array(doc.get("instance_ips", []), "instance_ips")):
        k = f"instance_ips[{i}]"
        t = r.table(item, k, {"private", "public"}, {"private", "public"})
        priv = r.ip(t["private"], f"{k}.private")
        if priv in privates:
            raise r.fail(f"{k}.private", f"{t['private']} already has an instance IP")
        privates.add(priv)
        pub = r.ip(t["public"], f"{k}.public")
        claim(pub, f"{k}.public")
        instances.append(InstanceIp(priv, pub))
    for ip, key, kind in classic.instances:
        if kind != RoleKind.VM and ip in privates:
            raise r.fail(
                key,
                f"{ipaddress.IPv4Address(ip)} has an instance public IP (instance_ips), "
                f"which a {kind} role instance cannot have (only kind vm)",
            )

    defaults: list[int] = []
    if "default_snat" in doc:
        t = r.table(doc["default_snat"], "default_snat", {"ips"}, {"ips"})
        for j, a in enumerate(r.array(t["ips"], "default_snat.ips")):
            ip = r.ip(a, f"default_snat.ips[{j}]")
            claim(ip, f"default_snat.ips[{j}]")
            defaults.append(ip)

    backends = privates | {x.backend for x in nat_rules} | {ip for ip, _, _ in classic.instances}
    for ip, key in publics.items():
        if ip in backends or any(ip in p.members for p in pools):
            raise r.fail(key, f"{ipaddress.IPv4Address(ip)} is both public and a backend")

    groups = inbound.security_groups(r, doc, pools)

    model = GatewayModel(
        frontends=tuple(frontends),
        pools=tuple(pools),
        lb_rules=tuple(rules),
        instance_ips=tuple(instances),
        default_snat=tuple(defaults),
        timeouts=timeouts,
        exhaustion_event_interval=interval,
        high_water=float(high),
        log_flows=_boolean(r, gw.get("log_flows", False), "gateway.log_flows"),
        max_flows=max_flows,
        max_flows_per_backend=max_per_backend,
        random_ports=random_ports,
        probes=probes,
        inbound_nat_rules=nat_rules,
        security_groups=groups,
        cloud_services=classic.services,
        address_space=address_space,
        inbound_default_allow=inbound_default == "allow",
        probe_source=probe_source,
    )
    try:
        plan(model)
    except ModelError as e:
        raise r.fail(e.key, e.problem) from None
    return GatewayConfig(
        path, inside, outside, queue, model, maxlen, client, control, group, metrics,
        stopped=stopped,
        state_file=state_file, state_interval=state_interval,
        control_mode=mode, control_max_clients=max_clients, workers=workers,
    )  # fmt: skip


def _boolean(r: Reader, value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise r.fail(key, "must be true or false")
    return value


def _control_mode(r: Reader, value: Any) -> int | None:
    """``control_mode``: an integer (TOML ``0o660``) or an octal string (``"0660"``) with
    read and write for the owner and nothing beyond rwx bits."""
    if value is None:
        return None
    mode = value
    if isinstance(value, str):
        try:
            mode = int(value, 8)
        except ValueError:
            mode = None
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o777 or mode & 0o600 != 0o600:
        raise r.fail("gateway.control_mode", f"{value!r} is not a socket mode with owner read/write ("
                     '"0600", "0660" or "0666")')
    return mode


def load(path: str | Path) -> GatewayConfig:
    """Read and validate the file at ``path``; raise ConfigError (also if unreadable)."""
    p = str(path)
    try:
        text = Path(p).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(p, "(file)", f"cannot read: {e}") from None
    return parse(text, p)
