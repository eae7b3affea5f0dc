"""Reading the TOML configuration into a :class:`~gateway.core.model.GatewayModel`.

Every problem is reported as one :class:`ConfigError` naming the file, the
key and the problem, before anything on the system is touched (the CLI
prints it as one line and exits 2).
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from gateway.core.errors import ModelError
from gateway.core.model import (
    AddressTerm,
    CloudService,
    Direction,
    Distribution,
    Endpoint,
    Frontend,
    GatewayModel,
    InboundNatRule,
    InstanceIp,
    LbRule,
    Pool,
    Probe,
    Role,
    RoleKind,
    SecurityGroup,
    SecurityRule,
    Span,
    Tag,
    Timeouts,
)
from gateway.core.scenario import plan
from gateway.core.tier import MAX_BACKENDS_PER_ADDRESS

_T = TypeVar("_T")


class ConfigError(Exception):
    """A configuration file the gateway refuses, with where and why."""

    def __init__(self, path: str, key: str, problem: str) -> None:
        super().__init__(f"{path}: {key}: {problem}")
        self.path = path
        self.key = key
        self.problem = problem


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
}


class _Reader:
    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(self.path, key, problem)

    def table(self, value: Any, key: str, allowed: set[str], required: set[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, "must be a table")
        for k in value:
            if k not in allowed:
                raise self.fail(f"{key}.{k}" if key else k, "unknown key")
        for k in sorted(required):
            if k not in value:
                raise self.fail(f"{key}.{k}" if key else k, "missing")
        return value

    def named_tables(
        self,
        doc: dict[str, Any],
        section: str,
        keys: set[str],
        what: str = "",
        optional: frozenset[str] = frozenset(),
        parent: str = "",
    ) -> Iterator[tuple[str, dict[str, Any], str]]:
        """Each table of the array ``section`` (all of ``keys``, any of ``optional``,
        nothing else) with its key path and its ``name``; with ``what``, a name used
        twice is an error. ``parent``: the key path of ``doc`` when it is nested."""
        seen: set[str] = set()
        path = f"{parent}.{section}" if parent else section
        for i, item in enumerate(self.array(doc.get(section, []), path)):
            k = f"{path}[{i}]"
            t = self.table(item, k, keys | optional, keys)
            name = self.string(t["name"], f"{k}.name")
            if what and name in seen:
                raise self.fail(f"{k}.name", f"{what} {name!r} is defined twice")
            seen.add(name)
            yield k, t, name

    def array(self, value: Any, key: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(key, "must be an array")
        return value

    def string(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(key, "must be a non-empty string")
        return value

    def ip(self, value: Any, key: str) -> int:
        try:
            addr = ipaddress.IPv4Address(value) if isinstance(value, str) else None
        except ValueError:
            addr = None
        if addr is None:
            raise self.fail(key, f"{value!r} is not an IPv4 address")
        if (
            addr.is_unspecified
            or addr.is_multicast
            or addr.is_loopback
            or addr == ipaddress.IPv4Address("255.255.255.255")
        ):
            raise self.fail(key, f"{value} cannot be used here")
        return int(addr)

    def integer(self, value: Any, key: str, lo: int, hi: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise self.fail(key, f"must be an integer from {lo} to {hi}")
        return value

    def seconds(self, value: Any, key: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 86400:
            raise self.fail(key, "must be a number of seconds above 0 and at most 86400")
        return float(value)


def parse(text: str, path: str) -> GatewayConfig:
    """Validate ``text`` (TOML) and build the configuration; raise ConfigError."""
    r = _Reader(path)
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

    address_space = _address_space(r, gw.get("address_space"))
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

    ports = _FrontendPorts(r)
    classic = _cloud_services(r, doc, frontends, pools, claim, ports)
    frontends += classic.frontends
    pools += classic.pools
    probes = _probes(r, doc)
    taken = {x.name for x in classic.rules}
    rules = classic.rules + _lb_rules(r, doc, frontends, pools, probes, ports, taken)
    nat_rules = _inbound_nat_rules(r, doc, frontends, ports)

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

    groups = _security_groups(r, doc, pools)

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
        control_mode=mode, control_max_clients=max_clients,
    )  # fmt: skip


#: Security-rule keywords as Azure spells them too (Tcp, Inbound, Allow, Any): any case.
_RULE_PROTOCOLS = {"tcp": 6, "udp": 17, "icmp": 1, "*": 0, "any": 0}
_DIRECTIONS = {"inbound": Direction.INBOUND, "outbound": Direction.OUTBOUND}
_ACCESS = {"allow": True, "deny": False}
#: Service tags, any case; the classic model's VIRTUAL_NETWORK and AZURE_LOADBALANCER too.
_TAGS = {
    "*": Tag.ANY,
    "any": Tag.ANY,
    "internet": Tag.INTERNET,
    "virtualnetwork": Tag.VIRTUAL_NETWORK,
    "virtual_network": Tag.VIRTUAL_NETWORK,
    "azureloadbalancer": Tag.AZURE_LOAD_BALANCER,
    "azure_loadbalancer": Tag.AZURE_LOAD_BALANCER,
}
_PORT_RANGE = re.compile(r"(\d{1,5})(?:-(\d{1,5}))?")
_ALL_PORTS: tuple[Span, ...] = ((0, 65535),)
#: An lb_rule's idle timeout in seconds: Azure's upper bound (30 minutes); below
#: Azure's 4 minutes is allowed, as for ``[gateway] idle_timeout`` (docs/decisions.md).
LB_IDLE_MAX = 1800
_RULE_REQUIRED = {"name", "priority", "direction", "access", "protocol"}
_RULE_OPTIONAL = frozenset({"source", "destination", "source_ports", "destination_ports"})


def _keyword(
    r: _Reader, value: Any, key: str, choices: dict[str, _T], shown: str, any_case: bool = True
) -> _T:
    """``value`` looked up in ``choices``; ``any_case`` for the security rules' keywords,
    which Azure spells capitalised (Tcp, Inbound, Allow)."""
    word = value.lower() if isinstance(value, str) and any_case else value
    if not isinstance(word, str) or word not in choices:
        raise r.fail(key, f"{value!r} is not one of {shown}")
    return choices[word]


def _cidr(r: _Reader, value: str, key: str) -> Span:
    """An address or CIDR prefix as the inclusive range it covers (host bits must be 0)."""
    try:
        net = ipaddress.IPv4Network(value)
    except ValueError as e:
        raise r.fail(key, f"{value!r} is not an address or CIDR prefix ({e})") from None
    return int(net.network_address), int(net.broadcast_address)


def _address_space(r: _Reader, value: Any) -> tuple[Span, ...]:
    """``[gateway] address_space``: the VirtualNetwork tag; () when absent (the adapter
    fills in the inside interface's prefixes)."""
    if value is None:
        return ()
    items = r.array(value, "gateway.address_space")
    if not items:
        raise r.fail("gateway.address_space", "must list at least one CIDR prefix (leave it out for "
                     "the inside interface's prefixes)")  # fmt: skip
    spans: list[Span] = []
    for j, item in enumerate(items):
        key = f"gateway.address_space[{j}]"
        spans.append(_cidr(r, r.string(item, key), key))
    return tuple(spans)


def _address_terms(r: _Reader, value: Any, key: str) -> tuple[AddressTerm, ...]:
    """A rule's source or destination: "*", a tag, an address, a CIDR prefix, or a list."""
    items, keys = (value, [f"{key}[{j}]" for j in range(len(value))]) if isinstance(value, list) else (
        [value], [key])  # fmt: skip
    if not items:
        raise r.fail(key, "must not be an empty list")
    terms: list[AddressTerm] = []
    for item, k in zip(items, keys, strict=True):
        text = r.string(item, k)
        tag = _TAGS.get(text.lower())
        if tag is not None:
            terms.append(tag)
        elif text[0].isdigit():
            terms.append(_cidr(r, text, k))
        else:
            raise r.fail(k, f"unknown tag {text!r} (Internet, VirtualNetwork, AzureLoadBalancer, *, "
                         "an address or a CIDR prefix)")  # fmt: skip
    return tuple(terms)


def _port_spans(r: _Reader, value: Any, key: str) -> tuple[Span, ...]:
    """A rule's ports: "*", "80", "1024-65535", an integer, or a list of these."""
    items, keys = (value, [f"{key}[{j}]" for j in range(len(value))]) if isinstance(value, list) else (
        [value], [key])  # fmt: skip
    if not items:
        raise r.fail(key, "must not be an empty list")
    spans: list[Span] = []
    for item, k in zip(items, keys, strict=True):
        if isinstance(item, str) and item.strip() in ("*", "any", "Any"):
            spans.append((0, 65535))
            continue
        lo = hi = -1
        if isinstance(item, int) and not isinstance(item, bool):
            lo = hi = item
        elif isinstance(item, str) and (m := _PORT_RANGE.fullmatch(item.strip())):
            lo = int(m[1])
            hi = int(m[2]) if m[2] is not None else lo
        if not 0 <= lo <= hi <= 65535:
            raise r.fail(k, f"bad port range {item!r}: use \"*\", a port or LOW-HIGH with "
                         "0 <= LOW <= HIGH <= 65535")  # fmt: skip
        spans.append((lo, hi))
    return tuple(spans)


def _security_rules(r: _Reader, group: dict[str, Any], parent: str) -> tuple[SecurityRule, ...]:
    """A group's own rules (docs/model.md, "Security groups"); Azure's default rules are
    the core's to add. Priorities 100..4096, unique per direction, as in Azure."""
    rules: list[SecurityRule] = []
    taken: dict[tuple[Direction, int], str] = {}
    for k, t, name in r.named_tables(group, "rules", _RULE_REQUIRED, "rule", _RULE_OPTIONAL, parent):
        priority = r.integer(t["priority"], f"{k}.priority", 100, 4096)
        direction = _keyword(r, t["direction"], f"{k}.direction", _DIRECTIONS, "inbound, outbound")
        other = taken.get((direction, priority))
        if other is not None:
            raise r.fail(
                f"{k}.priority",
                f"priority {priority} is already used by {direction} rule {other!r} of this group",
            )
        taken[(direction, priority)] = name
        rules.append(
            SecurityRule(
                name=name,
                priority=priority,
                direction=direction,
                allow=_keyword(r, t["access"], f"{k}.access", _ACCESS, "allow, deny"),
                protocol=_keyword(r, t["protocol"], f"{k}.protocol", _RULE_PROTOCOLS, "tcp, udp, icmp, *"),
                sources=_address_terms(r, t.get("source", "*"), f"{k}.source"),
                source_ports=_port_spans(r, t.get("source_ports", "*"), f"{k}.source_ports"),
                destinations=_address_terms(r, t.get("destination", "*"), f"{k}.destination"),
                destination_ports=_port_spans(r, t.get("destination_ports", "*"), f"{k}.destination_ports"),
            )
        )
    return tuple(rules)


def _security_groups(r: _Reader, doc: dict[str, Any], pools: list[Pool]) -> tuple[SecurityGroup, ...]:
    """``[[security_groups]]``: each group's rules and attachments. A backend may have one
    NIC group (by address or pool) and one subnet group (by prefix); more is an error."""
    members = {p.name: p.members for p in pools}
    nic: dict[int, str] = {}
    subnets: list[tuple[Span, str, str]] = []
    groups: list[SecurityGroup] = []
    keys = frozenset({"attach", "rules"})
    for k, t, name in r.named_tables(doc, "security_groups", {"name"}, "security group", keys):
        g_pools: list[str] = []
        g_backends: list[int] = []
        g_prefixes: list[Span] = []
        mine: dict[int, tuple[str, str]] = {}
        listed: set[str] = set()
        for j, item in enumerate(r.array(t.get("attach", []), f"{k}.attach")):
            ak = f"{k}.attach[{j}]"
            text = r.string(item, ak)
            if text in listed:
                raise r.fail(ak, f"{text!r} is listed twice")
            listed.add(text)
            if text in members:
                g_pools.append(text)
                for m in members[text]:
                    mine.setdefault(m, (ak, f"{ipaddress.IPv4Address(m)} (pool {text!r})"))
            elif not text[0].isdigit():
                raise r.fail(ak, f"no pool named {text!r} (nor is it an address or a CIDR prefix)")
            elif "/" in text:
                span = _cidr(r, text, ak)
                for other, cidr, owner in subnets:
                    if owner != name and span[0] <= other[1] and other[0] <= span[1]:
                        raise r.fail(ak, f"{text} overlaps {cidr} of security group {owner!r}: "
                                     "a backend has at most one subnet group")  # fmt: skip
                subnets.append((span, text, name))
                g_prefixes.append(span)
            else:
                ip = r.ip(text, ak)
                g_backends.append(ip)
                mine.setdefault(ip, (ak, text))
        for ip, (ak, what) in mine.items():
            if ip in nic:
                raise r.fail(
                    ak, f"{what} already has the NIC group {nic[ip]!r}: a backend has at most one NIC group"
                )
            nic[ip] = name
        rules = _security_rules(r, t, k)
        groups.append(SecurityGroup(name, rules, tuple(g_pools), tuple(g_backends), tuple(g_prefixes)))
    return tuple(groups)


class _FrontendPorts:
    """Which rule holds each frontend port, per protocol ("all" holds tcp and udp): two
    rules on one frontend, port and protocol are an error."""

    def __init__(self, r: _Reader) -> None:
        self.r = r
        self.held: dict[tuple[str, int], list[tuple[str, str]]] = {}

    def hold(self, frontend: str, proto: str, port: int, key: str, who: str) -> None:
        here = self.held.setdefault((frontend, port), [])
        for other, by in here:
            if other == proto or "all" in (other, proto):
                raise self.r.fail(
                    key, f"port {port}/{proto} of frontend {frontend!r} overlaps {by} ({port}/{other})"
                )
        here.append((proto, who))


@dataclass(slots=True)
class _Classic:
    """Classic cloud services and what they turn into in the model's own words."""

    services: tuple[CloudService, ...]
    frontends: list[Frontend]
    pools: list[Pool]
    rules: list[LbRule]
    #: Every role instance: (address, its key, the role's kind).
    instances: list[tuple[int, str, RoleKind]]


def _cloud_services(
    r: _Reader,
    doc: dict[str, Any],
    frontends: list[Frontend],
    pools: list[Pool],
    claim: Callable[[int, str], None],
    ports: _FrontendPorts,
) -> _Classic:
    """``[[cloud_services]]`` (docs/model.md, "Classic cloud services"): the VIP becomes a
    frontend named after the service, tiered by all of the service's instances; each
    role with endpoints a pool ``service/role``; each endpoint an opening LB rule
    ``service/role/tcp80``. A role without endpoints gets nothing: default SNAT."""
    out = _Classic((), [], [], [], [])
    fe_names = {f.name for f in frontends}
    pool_names = {p.name for p in pools}
    owner: dict[int, str] = {}
    services: list[CloudService] = []
    roles_key = frozenset({"roles"})
    for k, t, name in r.named_tables(doc, "cloud_services", {"name", "vip"}, "cloud service", roles_key):
        if name in fe_names:
            raise r.fail(f"{k}.name", f"{name!r} is already a frontend's name (the VIP becomes a frontend "
                         "named after its service)")  # fmt: skip
        vip = r.ip(t["vip"], f"{k}.vip")
        claim(vip, f"{k}.vip")
        roles: list[Role] = []
        role_keys = {"name", "kind", "instances"}
        for rk, rt, rname in r.named_tables(t, "roles", role_keys, "role", frozenset({"endpoints"}), k):
            kinds = {v.value: v for v in RoleKind}
            kind = _keyword(r, rt["kind"], f"{rk}.kind", kinds, "web, worker, vm", any_case=False)
            ips: list[int] = []
            for j, item in enumerate(r.array(rt["instances"], f"{rk}.instances")):
                ik = f"{rk}.instances[{j}]"
                ip = r.ip(item, ik)
                if ip in owner:
                    raise r.fail(ik, f"{item} is already an instance of role {owner[ip]!r}")
                owner[ip] = f"{name}/{rname}"
                ips.append(ip)
                out.instances.append((ip, ik, kind))
            eps: list[Endpoint] = []
            ep_keys = {"protocol", "public_port", "local_port"}
            for e, item in enumerate(r.array(rt.get("endpoints", []), f"{rk}.endpoints")):
                ek = f"{rk}.endpoints[{e}]"
                et = r.table(item, ek, ep_keys, ep_keys)
                proto = et["protocol"]
                if proto not in ("tcp", "udp"):
                    raise r.fail(f"{ek}.protocol", f"{proto!r} is not one of tcp, udp")
                public = r.integer(et["public_port"], f"{ek}.public_port", 1, 65535)
                local = r.integer(et["local_port"], f"{ek}.local_port", 1, 65535)
                ports.hold(name, proto, public, f"{ek}.public_port", ek)
                eps.append(Endpoint(proto, public, local))
            roles.append(Role(rname, kind, tuple(ips), tuple(eps)))
            if not eps:
                continue
            pool = f"{name}/{rname}"
            if pool in pool_names:
                raise r.fail(f"{rk}.name", f"its pool {pool!r} clashes with a pool of that name")
            pool_names.add(pool)
            out.pools.append(Pool(pool, tuple(ips)))
            for ep in eps:
                rule = f"{pool}/{ep.protocol}{ep.public_port}"
                out.rules.append(
                    LbRule(rule, name, pool, ep.protocol, ep.public_port, ep.local_port, opening=True)
                )
        total = sum(len(role.instances) for role in roles)
        if total > MAX_BACKENDS_PER_ADDRESS:
            raise r.fail(f"{k}.roles", f"{total} instances, at most {MAX_BACKENDS_PER_ADDRESS} are allowed "
                         "behind one VIP")  # fmt: skip
        fe_names.add(name)
        out.frontends.append(Frontend(name, vip, tier_backends=total))
        services.append(CloudService(name, vip, tuple(roles)))
    out.services = tuple(services)
    return out


def _probes(r: _Reader, doc: dict[str, Any]) -> tuple[Probe, ...]:
    """``[[probes]]`` (docs/model.md, "Health probes")."""
    probes: list[Probe] = []
    optional = frozenset({"path", "interval", "number_of_probes"})
    for k, t, name in r.named_tables(doc, "probes", {"name", "protocol", "port"}, "probe", optional):
        proto = t["protocol"]
        if proto not in ("tcp", "http"):
            raise r.fail(f"{k}.protocol", f"{proto!r} is not one of tcp, http")
        port = r.integer(t["port"], f"{k}.port", 1, 65535)
        path = t.get("path", "/")
        if "path" in t and proto != "http":
            raise r.fail(f"{k}.path", "only an http probe has a path")
        if not isinstance(path, str) or not path.startswith("/") or not all("!" <= c <= "~" for c in path):
            raise r.fail(f"{k}.path", "must start with / and hold no spaces or control characters")
        interval = t.get("interval", 5)
        if isinstance(interval, bool) or not isinstance(interval, int | float) or not 1 <= interval <= 3600:
            raise r.fail(f"{k}.interval", "must be a number of seconds from 1 to 3600")
        count = r.integer(t.get("number_of_probes", 2), f"{k}.number_of_probes", 1, 100)
        probes.append(Probe(name, proto, port, path, float(interval), count))
    return tuple(probes)


def _lb_rules(
    r: _Reader,
    doc: dict[str, Any],
    frontends: list[Frontend],
    pools: list[Pool],
    probes: tuple[Probe, ...],
    ports: _FrontendPorts,
    taken: set[str],
) -> list[LbRule]:
    """``[[lb_rules]]``; ``taken``: names of the rules cloud-service endpoints became."""
    rules: list[LbRule] = []
    fe_names = {f.name for f in frontends}
    pool_names = {p.name for p in pools}
    probe_names = {p.name for p in probes}
    rule_keys = {"name", "frontend", "pool", "protocol", "frontend_port", "backend_port"}
    optional = frozenset({"distribution", "probe", "idle_timeout"})
    for k, t, name in r.named_tables(doc, "lb_rules", rule_keys, "lb rule", optional):
        if name in taken:
            raise r.fail(f"{k}.name", f"lb rule {name!r} is also the name of a cloud-service endpoint's rule")
        fe = r.string(t["frontend"], f"{k}.frontend")
        if fe not in fe_names:
            raise r.fail(f"{k}.frontend", f"no frontend named {fe!r}")
        pool = r.string(t["pool"], f"{k}.pool")
        if pool not in pool_names:
            raise r.fail(f"{k}.pool", f"no pool named {pool!r}")
        proto = r.string(t["protocol"], f"{k}.protocol")
        if proto not in ("tcp", "udp", "all"):
            raise r.fail(f"{k}.protocol", f"{proto!r} is not one of tcp, udp, all")
        fport = r.integer(t["frontend_port"], f"{k}.frontend_port", 1, 65535)
        bport = r.integer(t["backend_port"], f"{k}.backend_port", 1, 65535)
        ports.hold(fe, proto, fport, f"{k}.frontend_port", f"{k} {name!r}")
        dist = _keyword(
            r, t.get("distribution", "default"), f"{k}.distribution",
            {d.value: d for d in Distribution}, "default, source_ip, source_ip_protocol", any_case=False,
        )  # fmt: skip
        probe = ""
        if "probe" in t:
            probe = r.string(t["probe"], f"{k}.probe")
            if probe not in probe_names:
                raise r.fail(f"{k}.probe", f"no probe named {probe!r}")
        idle = t.get("idle_timeout", 240)
        if isinstance(idle, bool) or not isinstance(idle, int | float) or not 1 <= idle <= LB_IDLE_MAX:
            raise r.fail(f"{k}.idle_timeout", f"must be a number of seconds from 1 to {LB_IDLE_MAX}")
        rules.append(LbRule(name, fe, pool, proto, fport, bport, dist, probe, float(idle)))
    return rules


def _inbound_nat_rules(
    r: _Reader, doc: dict[str, Any], frontends: list[Frontend], ports: _FrontendPorts
) -> tuple[InboundNatRule, ...]:
    """``[[inbound_nat_rules]]``: one frontend port forwarded to one backend's port."""
    rules: list[InboundNatRule] = []
    fe_names = {f.name for f in frontends}
    keys = {"name", "frontend", "protocol", "frontend_port", "backend", "backend_port"}
    for k, t, name in r.named_tables(doc, "inbound_nat_rules", keys, "inbound NAT rule"):
        fe = r.string(t["frontend"], f"{k}.frontend")
        if fe not in fe_names:
            raise r.fail(f"{k}.frontend", f"no frontend named {fe!r}")
        proto = t["protocol"]
        if proto not in ("tcp", "udp"):
            raise r.fail(f"{k}.protocol", f"{proto!r} is not one of tcp, udp")
        fport = r.integer(t["frontend_port"], f"{k}.frontend_port", 1, 65535)
        backend = r.ip(t["backend"], f"{k}.backend")
        bport = r.integer(t["backend_port"], f"{k}.backend_port", 1, 65535)
        ports.hold(fe, proto, fport, f"{k}.frontend_port", f"{k} {name!r}")
        rules.append(InboundNatRule(name, fe, proto, fport, backend, bport))
    return tuple(rules)


def _boolean(r: _Reader, value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise r.fail(key, "must be true or false")
    return value


def _control_mode(r: _Reader, value: Any) -> int | None:
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
