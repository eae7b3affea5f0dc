"""The configuration of the inbound side and the security groups (issue 10):
security groups and their rules, probes, LB rules, inbound NAT rules, classic
cloud services and the ``[gateway]`` keys they use; called by
:func:`gateway.config.parse` (docs/decisions.md, "Configuration of the inbound side").
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from gateway.config_reader import Reader
from gateway.core.model import (
    AddressTerm,
    CloudService,
    Direction,
    Distribution,
    Endpoint,
    Frontend,
    InboundNatRule,
    LbRule,
    Pool,
    Probe,
    Role,
    RoleKind,
    SecurityGroup,
    SecurityRule,
    Span,
    Tag,
)
from gateway.core.tier import MAX_BACKENDS_PER_ADDRESS

_T = TypeVar("_T")


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
    r: Reader, value: Any, key: str, choices: dict[str, _T], shown: str, any_case: bool = True
) -> _T:
    """``value`` looked up in ``choices``; ``any_case`` for the security rules' keywords,
    which Azure spells capitalised (Tcp, Inbound, Allow)."""
    word = value.lower() if isinstance(value, str) and any_case else value
    if not isinstance(word, str) or word not in choices:
        raise r.fail(key, f"{value!r} is not one of {shown}")
    return choices[word]


def _cidr(r: Reader, value: str, key: str) -> Span:
    """An address or CIDR prefix as the inclusive range it covers (host bits must be 0)."""
    try:
        net = ipaddress.IPv4Network(value)
    except ValueError as e:
        raise r.fail(key, f"{value!r} is not an address or CIDR prefix ({e})") from None
    return int(net.network_address), int(net.broadcast_address)


def address_space(r: Reader, value: Any) -> tuple[Span, ...]:
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


def _address_terms(r: Reader, value: Any, key: str) -> tuple[AddressTerm, ...]:
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


def _port_spans(r: Reader, value: Any, key: str) -> tuple[Span, ...]:
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


def _security_rules(r: Reader, group: dict[str, Any], parent: str) -> tuple[SecurityRule, ...]:
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


def security_groups(r: Reader, doc: dict[str, Any], pools: list[Pool]) -> tuple[SecurityGroup, ...]:
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


class FrontendPorts:
    """Which rule holds each frontend port, per protocol ("all" holds tcp and udp): two
    rules on one frontend, port and protocol are an error."""

    def __init__(self, r: Reader) -> None:
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


def cloud_services(
    r: Reader,
    doc: dict[str, Any],
    frontends: list[Frontend],
    pools: list[Pool],
    claim: Callable[[int, str], None],
    ports: FrontendPorts,
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


def probes(r: Reader, doc: dict[str, Any]) -> tuple[Probe, ...]:
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


def lb_rules(
    r: Reader,
    doc: dict[str, Any],
    frontends: list[Frontend],
    pools: list[Pool],
    probes: tuple[Probe, ...],
    ports: FrontendPorts,
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


def inbound_nat_rules(
    r: Reader, doc: dict[str, Any], frontends: list[Frontend], ports: FrontendPorts
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
