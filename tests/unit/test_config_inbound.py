"""Issue 10's configuration: security groups, probes, LB-rule options, inbound NAT rules,
classic cloud services and the [gateway] keys they need, from TOML to the model."""

from __future__ import annotations

import contextlib
import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config import ConfigError, GatewayConfig, load, parse
from gateway.core.model import Direction, Distribution, RoleKind, Tag
from gateway.core.scenario import plan
from gateway.core.table import TranslationTable
from gateway.lab.configtext import toml_value

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "examples"
PATH = "/etc/snatgw/x.toml"

BASE = """\
[gateway]
inside = "in0"
outside = "out0"

[[frontends]]
name = "fe"
ip = "198.51.100.10"

[[pools]]
name = "web"
members = ["10.10.1.1", "10.10.1.2"]

[[pools]]
name = "api"
members = ["10.10.4.1"]

[[lb_rules]]
name = "http"
frontend = "fe"
pool = "web"
protocol = "tcp"
frontend_port = 80
backend_port = 8080

[[instance_ips]]
private = "10.10.2.1"
public = "198.51.100.20"

[default_snat]
ips = ["198.51.100.30"]
"""


def n(s: str) -> int:
    return int(ipaddress.IPv4Address(s))


def table(header: str, **keys: Any) -> str:
    """``[[header]]`` with ``keys`` (a None value leaves the key out)."""
    body = "".join(f"{k} = {toml_value(v)}\n" for k, v in keys.items() if v is not None)
    return f"\n[[{header}]]\n{body}"


def rule(**keys: Any) -> str:
    """A security rule; name r1, priority 100, inbound allow tcp unless given."""
    d: dict[str, Any] = {
        "name": "r1",
        "priority": 100,
        "direction": "inbound",
        "access": "allow",
        "protocol": "tcp",
    }
    d.update(keys)
    return table("security_groups.rules", **d)


def group(name: str = "g", attach: Any = ("web",), *rules: str, **extra: Any) -> str:
    return table("security_groups", name=name, attach=attach, **extra) + "".join(rules)


def gw(text: str, extra: str) -> str:
    """``extra`` lines added to [gateway]."""
    return text.replace('outside = "out0"\n', f'outside = "out0"\n{extra}\n', 1)


def ok(extra: str = "", base: str = BASE) -> GatewayConfig:
    return parse(base + extra, PATH)


def fails(extra: str, base: str = BASE) -> str:
    """The one-line message parse refuses ``base + extra`` with."""
    with pytest.raises(ConfigError) as exc:
        parse(base + extra, PATH)
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg == f"{PATH}: {exc.value.key}: {exc.value.problem}"
    return msg


def msg(key: str, problem: str) -> str:
    return f"{PATH}: {key}: {problem}"


# --------------------------------------------------------------------------- examples


def test_inbound_and_classic_examples_load() -> None:
    """deploy/examples/inbound.toml and classic.toml are valid and use every new section."""
    m = load(EXAMPLES / "inbound.toml").model
    assert m.probes and m.inbound_nat_rules and len(m.security_groups) == 3
    assert m.address_space == ((n("10.10.0.0"), n("10.10.255.255")),)
    c = load(EXAMPLES / "classic.toml").model
    assert [s.name for s in c.cloud_services] == ["shop"]


# --------------------------------------------------------------------------- [gateway]


def test_gateway_keys_default_to_what_the_adapter_fills_in() -> None:
    """Without the keys: no address space, inbound denied, probe source 0."""
    m = ok().model
    assert (m.address_space, m.inbound_default_allow, m.probe_source) == ((), False, 0)


def test_gateway_keys_are_read() -> None:
    """address_space as inclusive spans, inbound_default allow, probe_source as an address."""
    text = gw(
        BASE,
        'address_space = ["10.10.0.0/16", "192.168.5.7"]\ninbound_default = "allow"\n'
        'probe_source = "10.10.0.1"',
    )
    m = parse(text, PATH).model
    assert m.address_space == ((n("10.10.0.0"), n("10.10.255.255")), (n("192.168.5.7"), n("192.168.5.7")))
    assert m.inbound_default_allow is True and m.probe_source == n("10.10.0.1")
    assert parse(gw(BASE, 'inbound_default = "deny"'), PATH).model.inbound_default_allow is False


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            'address_space = ["10.10.0.1/16"]',
            msg(
                "gateway.address_space[0]",
                "'10.10.0.1/16' is not an address or CIDR prefix (10.10.0.1/16 has host bits set)",
            ),
        ),
        (
            "address_space = []",
            msg(
                "gateway.address_space",
                "must list at least one CIDR prefix (leave it out for the inside interface's prefixes)",
            ),
        ),
        ('address_space = "10.10.0.0/16"', msg("gateway.address_space", "must be an array")),
        ("address_space = [16]", msg("gateway.address_space[0]", "must be a non-empty string")),
        ('inbound_default = "Deny"', msg("gateway.inbound_default", "'Deny' is not one of deny, allow")),
        ('probe_source = "10.10.0.300"', msg("gateway.probe_source", "'10.10.0.300' is not an IPv4 address")),
    ],
)
def test_bad_gateway_keys(line: str, expected: str) -> None:
    """Each new [gateway] key names itself and the problem."""
    with pytest.raises(ConfigError) as exc:
        parse(gw(BASE, line), PATH)
    assert str(exc.value) == expected


# --------------------------------------------------------------------------- security groups


def test_security_group_maps_to_the_model() -> None:
    """Attach entries split into pools, backends and prefixes; a rule's fields are read
    with Azure's spellings and the defaults ("*") for what it leaves out."""
    text = group(
        "web-nsg",
        ["web", "10.10.2.1", "10.10.3.0/24"],
        rule(
            name="in",
            priority=100,
            direction="Inbound",
            access="Allow",
            protocol="Tcp",
            source=["Internet", "10.20.0.0/16", "8.8.8.8"],
            source_ports="1024-65535",
            destination="VirtualNetwork",
            destination_ports=["80", 443, "8000-8099"],
        ),
        rule(
            name="out",
            priority=100,
            direction="outbound",
            access="deny",
            protocol="*",
            destination="azureloadbalancer",
        ),
        rule(
            name="u",
            priority=200,
            direction="OUTBOUND",
            access="DENY",
            protocol="Udp",
            source="any",
            destination="AZURE_LOADBALANCER",
            destination_ports="*",
        ),
        rule(name="i", priority=300, protocol="icmp", source="VIRTUAL_NETWORK", destination_ports=7),
        rule(name="a", priority=310, protocol="Any", source="*", destination="INTERNET"),
    )
    (g,) = ok(text).model.security_groups
    assert (g.name, g.pools, g.backends, g.prefixes) == (
        "web-nsg",
        ("web",),
        (n("10.10.2.1"),),
        ((n("10.10.3.0"), n("10.10.3.255")),),
    )
    r_in, r_out, r_u, r_i, r_a = g.rules
    assert (r_in.name, r_in.priority, r_in.direction, r_in.allow, r_in.protocol) == (
        "in",
        100,
        Direction.INBOUND,
        True,
        6,
    )
    assert r_in.sources == (Tag.INTERNET, (n("10.20.0.0"), n("10.20.255.255")), (n("8.8.8.8"), n("8.8.8.8")))
    assert r_in.source_ports == ((1024, 65535),)
    assert r_in.destinations == (Tag.VIRTUAL_NETWORK,)
    assert r_in.destination_ports == ((80, 80), (443, 443), (8000, 8099))
    assert (r_out.direction, r_out.allow, r_out.protocol) == (Direction.OUTBOUND, False, 0)
    assert r_out.sources == (Tag.ANY,) and r_out.source_ports == ((0, 65535),)
    assert r_out.destinations == (Tag.AZURE_LOAD_BALANCER,) and r_out.destination_ports == ((0, 65535),)
    assert (r_u.protocol, r_u.sources, r_u.destinations) == (17, (Tag.ANY,), (Tag.AZURE_LOAD_BALANCER,))
    assert (r_i.protocol, r_i.sources, r_i.destination_ports) == (1, (Tag.VIRTUAL_NETWORK,), ((7, 7),))
    assert (r_a.protocol, r_a.destinations) == (0, (Tag.INTERNET,))


def test_group_without_attach_or_rules_is_allowed() -> None:
    """A group attached to nothing and with only Azure's default rules loads (Azure allows both)."""
    (g,) = ok(table("security_groups", name="empty")).model.security_groups
    assert (g.rules, g.pools, g.backends, g.prefixes) == ((), (), (), ())


def test_same_priority_in_both_directions_is_fine() -> None:
    """Priorities are unique per direction, as in Azure."""
    text = group(
        "g", ["web"], rule(name="a", priority=100), rule(name="b", priority=100, direction="outbound")
    )
    assert len(ok(text).model.security_groups[0].rules) == 2


def test_one_nic_and_one_subnet_group_per_backend_are_fine() -> None:
    """A backend may have a NIC group and a subnet group; one group may list a backend
    by pool and by address, and overlapping prefixes of one group are allowed."""
    text = group("nic", ["web", "10.10.1.1"]) + group("subnet", ["10.10.0.0/16", "10.10.1.0/24"])
    assert [g.name for g in ok(text).model.security_groups] == ["nic", "subnet"]


R0 = "security_groups[0].rules[0]"
ONE_SUBNET = ": a backend has at most one subnet group"
R1 = "security_groups[0].rules[1]"
TAGS = "(Internet, VirtualNetwork, AzureLoadBalancer, *, an address or a CIDR prefix)"
PORTS = 'use "*", a port or LOW-HIGH with 0 <= LOW <= HIGH <= 65535'


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        # unknown tag
        (group("g", ["web"], rule(source="Interne")), msg(f"{R0}.source", f"unknown tag 'Interne' {TAGS}")),
        (
            group("g", ["web"], rule(destination=["Internet", "Storage"])),
            msg(f"{R0}.destination[1]", f"unknown tag 'Storage' {TAGS}"),
        ),
        (
            group("g", ["web"], rule(source="10.0.0.300")),
            msg(
                f"{R0}.source",
                "'10.0.0.300' is not an address or CIDR prefix "
                "(Octet 300 (> 255) not permitted in '10.0.0.300')",
            ),
        ),
        (group("g", ["web"], rule(source=[])), msg(f"{R0}.source", "must not be an empty list")),
        (group("g", ["web"], rule(source=5)), msg(f"{R0}.source", "must be a non-empty string")),
        # priority out of range or duplicated
        (
            group("g", ["web"], rule(priority=99)),
            msg(f"{R0}.priority", "must be an integer from 100 to 4096"),
        ),
        (
            group("g", ["web"], rule(priority=4097)),
            msg(f"{R0}.priority", "must be an integer from 100 to 4096"),
        ),
        (
            group("g", ["web"], rule(priority=65000)),
            msg(f"{R0}.priority", "must be an integer from 100 to 4096"),
        ),
        (
            group("g", ["web"], rule(name="a"), rule(name="b")),
            msg(f"{R1}.priority", "priority 100 is already used by inbound rule 'a' of this group"),
        ),
        # bad port range
        (
            group("g", ["web"], rule(destination_ports="80-70")),
            msg(f"{R0}.destination_ports", f"bad port range '80-70': {PORTS}"),
        ),
        (
            group("g", ["web"], rule(source_ports="70000")),
            msg(f"{R0}.source_ports", f"bad port range '70000': {PORTS}"),
        ),
        (
            group("g", ["web"], rule(destination_ports=["80", "x"])),
            msg(f"{R0}.destination_ports[1]", f"bad port range 'x': {PORTS}"),
        ),
        (
            group("g", ["web"], rule(destination_ports=-1)),
            msg(f"{R0}.destination_ports", f"bad port range -1: {PORTS}"),
        ),
        (
            group("g", ["web"], rule(destination_ports=True)),
            msg(f"{R0}.destination_ports", f"bad port range True: {PORTS}"),
        ),
        (
            group("g", ["web"], rule(destination_ports="80-")),
            msg(f"{R0}.destination_ports", f"bad port range '80-': {PORTS}"),
        ),
        (
            group("g", ["web"], rule(destination_ports=[])),
            msg(f"{R0}.destination_ports", "must not be an empty list"),
        ),
        # keywords
        (
            group("g", ["web"], rule(direction="in")),
            msg(f"{R0}.direction", "'in' is not one of inbound, outbound"),
        ),
        (
            group("g", ["web"], rule(access="permit")),
            msg(f"{R0}.access", "'permit' is not one of allow, deny"),
        ),
        (
            group("g", ["web"], rule(protocol="esp")),
            msg(f"{R0}.protocol", "'esp' is not one of tcp, udp, icmp, *"),
        ),
        (group("g", ["web"], rule(protocol=6)), msg(f"{R0}.protocol", "6 is not one of tcp, udp, icmp, *")),
        # attach
        (
            group("g", ["webb"]),
            msg(
                "security_groups[0].attach[0]", "no pool named 'webb' (nor is it an address or a CIDR prefix)"
            ),
        ),
        (group("g", ["web", "web"]), msg("security_groups[0].attach[1]", "'web' is listed twice")),
        (
            group("g", ["10.10.1.300"]),
            msg("security_groups[0].attach[0]", "'10.10.1.300' is not an IPv4 address"),
        ),
        (
            group("g", ["10.10.1.1/16"]),
            msg(
                "security_groups[0].attach[0]",
                "'10.10.1.1/16' is not an address or CIDR prefix (10.10.1.1/16 has host bits set)",
            ),
        ),
        (group("g", "web"), msg("security_groups[0].attach", "must be an array")),
        # two NIC groups on one backend
        (
            group("a", ["10.10.2.1"]) + group("b", ["10.10.2.1"]),
            msg(
                "security_groups[1].attach[0]",
                "10.10.2.1 already has the NIC group 'a': a backend has at most one NIC group",
            ),
        ),
        (
            group("a", ["web"]) + group("b", ["web"]),
            msg(
                "security_groups[1].attach[0]",
                "10.10.1.1 (pool 'web') already has the NIC group 'a': a backend has at most one NIC group",
            ),
        ),
        (
            group("a", ["10.10.1.2"]) + group("b", ["api", "web"]),
            msg(
                "security_groups[1].attach[1]",
                "10.10.1.2 (pool 'web') already has the NIC group 'a': a backend has at most one NIC group",
            ),
        ),
        (
            group("a", ["web"]) + group("b", ["10.10.1.1"]),
            msg(
                "security_groups[1].attach[0]",
                "10.10.1.1 already has the NIC group 'a': a backend has at most one NIC group",
            ),
        ),
        # two subnet groups covering one address
        (
            group("a", ["10.10.0.0/16"]) + group("b", ["10.10.3.0/25"]),
            msg(
                "security_groups[1].attach[0]",
                "10.10.3.0/25 overlaps 10.10.0.0/16 of security group 'a'" + ONE_SUBNET,
            ),
        ),
        (
            group("a", ["10.10.3.0/24"]) + group("b", ["10.10.4.0/24", "10.10.3.7/32"]),
            msg(
                "security_groups[1].attach[1]",
                "10.10.3.7/32 overlaps 10.10.3.0/24 of security group 'a'" + ONE_SUBNET,
            ),
        ),
        # names and keys
        (
            group("g", ["web"]) + group("g", ["api"]),
            msg("security_groups[1].name", "security group 'g' is defined twice"),
        ),
        (
            group("g", ["web"], rule(name="a"), rule(name="a", priority=200)),
            msg(f"{R1}.name", "rule 'a' is defined twice"),
        ),
        (group("g", ["web"], colour="red"), msg("security_groups[0].colour", "unknown key")),
        (group("g", ["web"], rule(sources="*")), msg(f"{R0}.sources", "unknown key")),
        (group("g", ["web"], rule(priority=None)), msg(f"{R0}.priority", "missing")),
        (table("security_groups", attach=["web"]), msg("security_groups[0].name", "missing")),
    ],
)
def test_bad_security_group(extra: str, expected: str) -> None:
    """Every security-group mistake is one line naming file, key and problem."""
    assert fails(extra) == expected


# --------------------------------------------------------------------------- probes and lb_rules


def test_probe_defaults_and_values() -> None:
    """A tcp probe gets path /, interval 5, 2 probes; an http probe keeps its path."""
    text = table("probes", name="t", protocol="tcp", port=8080)
    text += table(
        "probes", name="h", protocol="http", port=80, path="/health?x=1", interval=1.5, number_of_probes=100
    )
    t, h = ok(text).model.probes
    assert (t.name, t.protocol, t.port, t.path, t.interval, t.number_of_probes) == (
        "t",
        "tcp",
        8080,
        "/",
        5.0,
        2,
    )
    assert (h.protocol, h.path, h.interval, h.number_of_probes) == ("http", "/health?x=1", 1.5, 100)


def test_lb_rule_options() -> None:
    """distribution, probe and idle_timeout are read; without them: default, none, 240 s."""
    text = table("probes", name="p", protocol="tcp", port=8080)
    text += table(
        "lb_rules",
        name="dns",
        frontend="fe",
        pool="api",
        protocol="udp",
        frontend_port=53,
        backend_port=53,
        distribution="source_ip_protocol",
        probe="p",
        idle_timeout=1800,
    )
    text += table(
        "lb_rules",
        name="ssh",
        frontend="fe",
        pool="api",
        protocol="tcp",
        frontend_port=22,
        backend_port=22,
        distribution="source_ip",
        idle_timeout=1,
    )
    http, dns, ssh = ok(text).model.lb_rules
    assert (http.distribution, http.probe, http.idle_timeout, http.opening) == (
        Distribution.DEFAULT,
        "",
        240.0,
        False,
    )
    assert (dns.distribution, dns.probe, dns.idle_timeout) == (Distribution.SOURCE_IP_PROTOCOL, "p", 1800.0)
    assert (ssh.distribution, ssh.idle_timeout) == (Distribution.SOURCE_IP, 1.0)


def lb(**keys: Any) -> str:
    d: dict[str, Any] = {
        "name": "x",
        "frontend": "fe",
        "pool": "api",
        "protocol": "tcp",
        "frontend_port": 81,
        "backend_port": 81,
    }
    d.update(keys)
    return table("lb_rules", **d)


PROBE = table("probes", name="p", protocol="tcp", port=8080)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            table("probes", name="p", protocol="https", port=443),
            msg("probes[0].protocol", "'https' is not one of tcp, http"),
        ),
        (
            table("probes", name="p", protocol="tcp", port=0),
            msg("probes[0].port", "must be an integer from 1 to 65535"),
        ),
        (
            table("probes", name="p", protocol="tcp", port=80, path="/"),
            msg("probes[0].path", "only an http probe has a path"),
        ),
        (
            table("probes", name="p", protocol="http", port=80, path="health"),
            msg("probes[0].path", "must start with / and hold no spaces or control characters"),
        ),
        (
            table("probes", name="p", protocol="http", port=80, path="/a b"),
            msg("probes[0].path", "must start with / and hold no spaces or control characters"),
        ),
        (
            table("probes", name="p", protocol="tcp", port=80, interval=0.5),
            msg("probes[0].interval", "must be a number of seconds from 1 to 3600"),
        ),
        (
            table("probes", name="p", protocol="tcp", port=80, interval=True),
            msg("probes[0].interval", "must be a number of seconds from 1 to 3600"),
        ),
        (
            table("probes", name="p", protocol="tcp", port=80, number_of_probes=0),
            msg("probes[0].number_of_probes", "must be an integer from 1 to 100"),
        ),
        (
            table("probes", name="p", protocol="tcp", port=80, number_of_probes=101),
            msg("probes[0].number_of_probes", "must be an integer from 1 to 100"),
        ),
        (PROBE + PROBE, msg("probes[1].name", "probe 'p' is defined twice")),
        (
            table("probes", name="p", protocol="tcp", port=80, timeout=3),
            msg("probes[0].timeout", "unknown key"),
        ),
        (table("probes", name="p", protocol="tcp"), msg("probes[0].port", "missing")),
        (
            lb(distribution="round_robin"),
            msg(
                "lb_rules[1].distribution",
                "'round_robin' is not one of default, source_ip, source_ip_protocol",
            ),
        ),
        (lb(probe="nope"), msg("lb_rules[1].probe", "no probe named 'nope'")),
        (PROBE + lb(probe=""), msg("lb_rules[1].probe", "must be a non-empty string")),
        (lb(idle_timeout=0), msg("lb_rules[1].idle_timeout", "must be a number of seconds from 1 to 1800")),
        (
            lb(idle_timeout=1801),
            msg("lb_rules[1].idle_timeout", "must be a number of seconds from 1 to 1800"),
        ),
        (
            lb(idle_timeout="4m"),
            msg("lb_rules[1].idle_timeout", "must be a number of seconds from 1 to 1800"),
        ),
        (lb(name="http"), msg("lb_rules[1].name", "lb rule 'http' is defined twice")),
        (lb(weight=2), msg("lb_rules[1].weight", "unknown key")),
    ],
)
def test_bad_probe_or_lb_rule(extra: str, expected: str) -> None:
    """Probe and LB-rule mistakes name their key."""
    assert fails(extra) == expected


# --------------------------------------------------------------------------- inbound NAT rules


def nat(**keys: Any) -> str:
    d: dict[str, Any] = {
        "name": "ssh",
        "frontend": "fe",
        "protocol": "tcp",
        "frontend_port": 50001,
        "backend": "10.10.1.1",
        "backend_port": 22,
    }
    d.update(keys)
    return table("inbound_nat_rules", **d)


def test_inbound_nat_rule_maps_and_keeps_its_port_out_of_blocks() -> None:
    """An inbound NAT rule becomes the model's record; its frontend port (whatever the
    protocol) is excluded from every block on that address, like an LB rule's."""
    cfg = ok(
        nat() + nat(name="dns", protocol="udp", frontend_port=50002, backend="10.10.9.9", backend_port=53)
    )
    a, b = cfg.model.inbound_nat_rules
    assert (a.name, a.frontend, a.protocol, a.frontend_port, a.backend, a.backend_port) == (
        "ssh",
        "fe",
        "tcp",
        50001,
        n("10.10.1.1"),
        22,
    )
    assert (b.protocol, b.backend) == ("udp", n("10.10.9.9"))
    p = plan(cfg.model)
    assert p.addresses[n("198.51.100.10")].excluded == frozenset({80, 50001, 50002})
    t = TranslationTable(cfg.model, 0.0)
    layout = t.addresses[n("198.51.100.10")].layout
    assert layout is not None and {80, 50001, 50002} <= layout.excluded
    for be in t.backends.values():
        if be.block is not None and be.address.ip == n("198.51.100.10"):
            assert not {80 >> 5, 50001 >> 5, 50002 >> 5} & set(be.block.chunks)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (nat(frontend="nope"), msg("inbound_nat_rules[0].frontend", "no frontend named 'nope'")),
        (nat(protocol="all"), msg("inbound_nat_rules[0].protocol", "'all' is not one of tcp, udp")),
        (nat(backend="10.10.1"), msg("inbound_nat_rules[0].backend", "'10.10.1' is not an IPv4 address")),
        (
            nat(backend="198.51.100.30"),
            msg("default_snat.ips[0]", "198.51.100.30 is both public and a backend"),
        ),
        (
            nat(frontend_port=0),
            msg("inbound_nat_rules[0].frontend_port", "must be an integer from 1 to 65535"),
        ),
        (
            nat(backend_port=65536),
            msg("inbound_nat_rules[0].backend_port", "must be an integer from 1 to 65535"),
        ),
        (
            nat() + nat(frontend_port=50002),
            msg("inbound_nat_rules[1].name", "inbound NAT rule 'ssh' is defined twice"),
        ),
        (nat(backend=None), msg("inbound_nat_rules[0].backend", "missing")),
        (nat(pool="web"), msg("inbound_nat_rules[0].pool", "unknown key")),
    ],
)
def test_bad_inbound_nat_rule(extra: str, expected: str) -> None:
    """Inbound NAT rule mistakes name their key."""
    assert fails(extra) == expected


# --------------------------------------------------------------------------- frontend ports


def test_tcp_and_udp_rules_may_share_a_frontend_port() -> None:
    """A tcp and a udp rule on one frontend port are fine (LB rules and NAT rules alike)."""
    text = (
        lb(name="u80", protocol="udp", frontend_port=80)
        + nat(frontend_port=53)
        + nat(name="u", protocol="udp", frontend_port=53)
    )
    cfg = ok(text)
    assert len(cfg.model.lb_rules) == 2 and len(cfg.model.inbound_nat_rules) == 2


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            lb(frontend_port=80),
            msg(
                "lb_rules[1].frontend_port",
                "port 80/tcp of frontend 'fe' overlaps lb_rules[0] 'http' (80/tcp)",
            ),
        ),
        (
            lb(protocol="all", frontend_port=80),
            msg(
                "lb_rules[1].frontend_port",
                "port 80/all of frontend 'fe' overlaps lb_rules[0] 'http' (80/tcp)",
            ),
        ),
        (
            lb(protocol="all", frontend_port=53) + lb(name="y", protocol="udp", frontend_port=53),
            msg(
                "lb_rules[2].frontend_port", "port 53/udp of frontend 'fe' overlaps lb_rules[1] 'x' (53/all)"
            ),
        ),
        (
            nat(frontend_port=80),
            msg(
                "inbound_nat_rules[0].frontend_port",
                "port 80/tcp of frontend 'fe' overlaps lb_rules[0] 'http' (80/tcp)",
            ),
        ),
        (
            nat() + nat(name="b"),
            msg(
                "inbound_nat_rules[1].frontend_port",
                "port 50001/tcp of frontend 'fe' overlaps inbound_nat_rules[0] 'ssh' (50001/tcp)",
            ),
        ),
    ],
)
def test_overlapping_frontend_ports(extra: str, expected: str) -> None:
    """Two rules on one frontend, port and protocol ("all" covers tcp and udp) are refused."""
    assert fails(extra) == expected


# --------------------------------------------------------------------------- cloud services


def service(name: str = "shop", vip: str = "198.51.100.40", **extra: Any) -> str:
    return table("cloud_services", name=name, vip=vip, **extra)


def role(name: str = "web", kind: str = "web", instances: Any = ("10.10.5.1",), **extra: Any) -> str:
    return table("cloud_services.roles", name=name, kind=kind, instances=instances, **extra)


HAS_IP = (
    "10.10.2.1 has an instance public IP (instance_ips), which a {} role instance cannot have (only kind vm)"
)
HTTP = [{"protocol": "tcp", "public_port": 80, "local_port": 8080}]


def test_cloud_service_maps_to_frontend_pools_and_opening_rules() -> None:
    """The VIP becomes a frontend tiered by every instance; a role with endpoints a pool
    service/role with one opening LB rule per endpoint; a role without endpoints nothing."""
    text = service() + role(
        "web",
        "web",
        ["10.10.5.1", "10.10.5.2"],
        endpoints=[*HTTP, {"protocol": "udp", "public_port": 53, "local_port": 5353}],
    )
    text += role("jobs", "worker", ["10.10.6.1", "10.10.6.2", "10.10.6.3"])
    text += role(
        "box", "vm", ["10.10.2.1"], endpoints=[{"protocol": "tcp", "public_port": 2222, "local_port": 22}]
    )
    m = ok(text).model
    fe = m.frontends[-1]
    assert (fe.name, fe.ip, fe.tier_backends) == ("shop", n("198.51.100.40"), 6)
    assert [(p.name, p.members) for p in m.pools[2:]] == [
        ("shop/web", (n("10.10.5.1"), n("10.10.5.2"))),
        ("shop/box", (n("10.10.2.1"),)),
    ]
    generated = [r for r in m.lb_rules if r.opening]
    assert [(r.name, r.frontend, r.pool, r.protocol, r.frontend_port, r.backend_port) for r in generated] == [
        ("shop/web/tcp80", "shop", "shop/web", "tcp", 80, 8080),
        ("shop/web/udp53", "shop", "shop/web", "udp", 53, 5353),
        ("shop/box/tcp2222", "shop", "shop/box", "tcp", 2222, 22),
    ]
    (svc,) = m.cloud_services
    assert (svc.name, svc.vip, [r.name for r in svc.roles]) == (
        "shop",
        n("198.51.100.40"),
        ["web", "jobs", "box"],
    )
    assert svc.roles[1].kind == RoleKind.WORKER and svc.roles[1].endpoints == ()
    assert svc.roles[0].endpoints[1].local_port == 5353
    p = plan(m)
    assert p.placements[n("10.10.5.1")].public_ip == n("198.51.100.40")
    assert n("10.10.6.1") not in p.placements, "a role without endpoints is left to default SNAT"
    assert p.placements[n("10.10.2.1")].public_ip == n("198.51.100.20"), "a vm's instance IP wins"
    assert p.tier_count(n("198.51.100.40")) == 6 and p.addresses[n("198.51.100.40")].excluded == {
        80,
        53,
        2222,
    }


def test_vip_is_tiered_by_all_instances_of_the_service() -> None:
    """60 instances, 2 with endpoints: the VIP is in the 51-100 tier (512 ports per block),
    not the 1024 that its 2 members alone would get; the table sizes the blocks so."""
    workers = [f"10.10.6.{i}" for i in range(1, 59)]
    text = service() + role("web", "web", ["10.10.5.1", "10.10.5.2"], endpoints=HTTP)
    text += role("jobs", "worker", workers)
    m = ok(text).model
    t = TranslationTable(m, 0.0)
    vip = t.addresses[n("198.51.100.40")]
    assert vip.layout is not None and vip.layout.size == 512
    assert t.backends[n("10.10.5.1")].block is not None
    assert t.backends[n("10.10.5.1")].block.size == 512  # type: ignore[union-attr]


def test_a_reload_moves_the_vip_tier_when_the_service_grows() -> None:
    """A 51st instance (a worker, no endpoints) moves the VIP to 512-port blocks on reload,
    and the 50th leaving moves it back: the tier follows the service, not the pool."""

    def model(workers: int) -> Any:
        text = service() + role("web", "web", ["10.10.5.1", "10.10.5.2"], endpoints=HTTP)
        return ok(text + role("jobs", "worker", [f"10.10.6.{i}" for i in range(1, workers + 1)])).model

    t = TranslationTable(model(48), 0.0)
    vip = t.addresses[n("198.51.100.40")]
    assert vip.layout is not None and vip.layout.size == 1024
    t.reconfigure(model(49), 1.0)
    assert vip.layout.size == 512
    assert t.backends[n("10.10.5.2")].block.size == 512  # type: ignore[union-attr]
    t.reconfigure(model(48), 1000.0)
    assert vip.layout.size == 1024


def test_room_check_uses_the_vip_tier() -> None:
    """50 instances whose endpoints exclude 420 chunks do not fit with 1024-port blocks;
    one more instance without endpoints moves the VIP to 512 and they fit."""
    web = [f"10.10.5.{i}" for i in range(1, 51)]
    eps = [{"protocol": "tcp", "public_port": 1024 + 32 * i, "local_port": 80} for i in range(420)]
    text = service() + role("web", "web", web, endpoints=eps)
    assert fails(text) == msg("frontends[shop]", "the blocks of 50 backends do not fit in 1024-65535")
    assert ok(text + role("jobs", "worker", ["10.10.6.1"])).model.frontends[-1].tier_backends == 51


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            service(name="fe"),
            msg(
                "cloud_services[0].name",
                "'fe' is already a frontend's name (the VIP becomes a frontend named after its service)",
            ),
        ),
        (
            service(vip="198.51.100.10"),
            msg("cloud_services[0].vip", "198.51.100.10 is already used by frontends[0].ip"),
        ),
        (
            service() + service(vip="198.51.100.41"),
            msg("cloud_services[1].name", "cloud service 'shop' is defined twice"),
        ),
        (
            service() + role() + role(instances=["10.10.5.2"]),
            msg("cloud_services[0].roles[1].name", "role 'web' is defined twice"),
        ),
        (
            service() + role(kind="Web"),
            msg("cloud_services[0].roles[0].kind", "'Web' is not one of web, worker, vm"),
        ),
        (
            service() + role(kind="paas"),
            msg("cloud_services[0].roles[0].kind", "'paas' is not one of web, worker, vm"),
        ),
        (
            service() + role() + role("b", instances=["10.10.5.1"]),
            msg(
                "cloud_services[0].roles[1].instances[0]",
                "10.10.5.1 is already an instance of role 'shop/web'",
            ),
        ),
        (
            service() + role() + service("other", "198.51.100.41") + role(),
            msg(
                "cloud_services[1].roles[0].instances[0]",
                "10.10.5.1 is already an instance of role 'shop/web'",
            ),
        ),
        (
            service() + role(instances=["10.10.5.1", "10.10.2.1"]),
            msg(
                "cloud_services[0].roles[0].instances[1]",
                HAS_IP.format("web"),
            ),
        ),
        (
            service() + role(kind="worker", instances=["10.10.2.1"]),
            msg(
                "cloud_services[0].roles[0].instances[0]",
                HAS_IP.format("worker"),
            ),
        ),
        (
            service() + role(instances=["198.51.100.30"]),
            msg("default_snat.ips[0]", "198.51.100.30 is both public and a backend"),
        ),
        (
            service() + role(endpoints=[{"protocol": "all", "public_port": 80, "local_port": 80}]),
            msg("cloud_services[0].roles[0].endpoints[0].protocol", "'all' is not one of tcp, udp"),
        ),
        (
            service() + role(endpoints=[{"protocol": "tcp", "public_port": 80}]),
            msg("cloud_services[0].roles[0].endpoints[0].local_port", "missing"),
        ),
        (
            service() + role(endpoints=[{"protocol": "tcp", "public_port": 80, "local_port": 80, "x": 1}]),
            msg("cloud_services[0].roles[0].endpoints[0].x", "unknown key"),
        ),
        (
            service() + role(endpoints=[*HTTP, *HTTP]),
            msg(
                "cloud_services[0].roles[0].endpoints[1].public_port",
                "port 80/tcp of frontend 'shop' overlaps cloud_services[0].roles[0].endpoints[0] (80/tcp)",
            ),
        ),
        (
            service() + role(endpoints=HTTP) + nat(frontend="shop", frontend_port=80),
            msg(
                "inbound_nat_rules[0].frontend_port",
                "port 80/tcp of frontend 'shop' overlaps cloud_services[0].roles[0].endpoints[0] (80/tcp)",
            ),
        ),
        (
            service(name="shop")
            + role(name="web", endpoints=HTTP)
            + table("pools", name="shop/web", members=["10.10.7.1"]),
            msg("cloud_services[0].roles[0].name", "its pool 'shop/web' clashes with a pool of that name"),
        ),
        (
            service() + role(endpoints=HTTP) + lb(name="shop/web/tcp80"),
            msg(
                "lb_rules[1].name",
                "lb rule 'shop/web/tcp80' is also the name of a cloud-service endpoint's rule",
            ),
        ),
        (
            service() + role(instances=[f"10.10.{5 + i // 250}.{i % 250 + 1}" for i in range(1001)]),
            msg("cloud_services[0].roles", "1001 instances, at most 1000 are allowed behind one VIP"),
        ),
        (service(region="west"), msg("cloud_services[0].region", "unknown key")),
        (service() + role(instances=None), msg("cloud_services[0].roles[0].instances", "missing")),
    ],
)
def test_bad_cloud_service(extra: str, expected: str) -> None:
    """Cloud-service mistakes name their key."""
    assert fails(extra) == expected


def test_an_lb_rule_may_use_a_vip_and_a_group_may_attach_a_role_pool() -> None:
    """The names a cloud service brings (frontend ``shop``, pool ``shop/web``) are usable."""
    text = service() + role(endpoints=HTTP) + lb(frontend="shop", pool="shop/web", frontend_port=443)
    text += group("g", ["shop/web"])
    m = ok(text).model
    assert m.lb_rules[-1].frontend == "shop" and m.security_groups[0].pools == ("shop/web",)


def test_plan_problems_still_raise_config_errors() -> None:
    """A model the scenario policy refuses (over 1000 backends on one frontend) is a ConfigError."""
    a = [f"10.20.{i // 250}.{i % 250 + 1}" for i in range(600)]
    b = [f"10.30.{i // 250}.{i % 250 + 1}" for i in range(600)]
    text = table("pools", name="a", members=a) + table("pools", name="b", members=b)
    text += lb(pool="a") + lb(name="y", pool="b", frontend_port=82)
    assert fails(text) == msg("frontends[fe]", "1202 backends share 198.51.100.10, at most 1000 are allowed")


# --------------------------------------------------------------------------- fuzz

_JUNK = st.recursive(
    st.one_of(
        st.integers(-(2**40), 2**40),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(st.characters(codec="utf-8"), max_size=12),
        st.booleans(),
        st.sampled_from(
            [
                "*",
                "Internet",
                "internet",
                "10.10.1.1",
                "10.10.0.0/16",
                "10.10.1.1/16",
                "80-90",
                "90-80",
                "tcp",
                "udp",
                "all",
                "http",
                "web",
                "api",
                "fe",
                "shop",
                "inbound",
                "Allow",
                "/",
                "vm",
                "Any",
                "",
                "٣",
            ]
        ),
    ),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["protocol", "x"]), inner, max_size=2)
    ),
    max_leaves=6,
)
#: A valid table of each new section; the fuzz changes or removes some of its keys.
_RULE = {
    "name": "r",
    "priority": 100,
    "direction": "inbound",
    "access": "allow",
    "protocol": "tcp",
    "source": "*",
    "destination": "Internet",
    "source_ports": "*",
    "destination_ports": "80",
}
_ENDPOINT = {"protocol": "tcp", "public_port": 81, "local_port": 8080}
_ROLE = {"name": "web", "kind": "web", "instances": ["10.10.5.1"], "endpoints": [_ENDPOINT]}
_ROLE_B = {
    "name": "b",
    "kind": "vm",
    "instances": ["10.10.6.1"],
    "endpoints": [{**_ENDPOINT, "public_port": 82}],
}
_NAT = {
    "name": "n",
    "frontend": "fe",
    "protocol": "tcp",
    "frontend_port": 50001,
    "backend": "10.10.1.1",
    "backend_port": 22,
}
_TEMPLATES: dict[str, dict[str, Any]] = {
    "security_groups": {"name": "g", "attach": ["web", "10.10.2.1"],
                        "rules": [_RULE, {**_RULE, "name": "s", "priority": 110}]},
    "probes": {"name": "p", "protocol": "http", "port": 80, "path": "/", "interval": 5,
               "number_of_probes": 2},
    "inbound_nat_rules": _NAT,
    "cloud_services": {"name": "shop", "vip": "198.51.100.40", "roles": [_ROLE, _ROLE_B]},
}  # fmt: skip
_NESTED = {"rules": list(_RULE), "roles": list(_ROLE)}


@st.composite
def _mutated(draw: st.DrawFn, template: dict[str, Any]) -> dict[str, Any]:
    """``template`` with one to three keys (its own or a nested table's) set to junk or removed."""
    t = json.loads(json.dumps(template))
    for _ in range(draw(st.integers(1, 3))):
        target: dict[str, Any] = t
        key: str
        nested = [
            (k, x) for k in t if k in _NESTED and isinstance(t[k], list) for x in t[k] if isinstance(x, dict)
        ]
        if draw(st.booleans()) and nested:
            inner, target = draw(st.sampled_from(nested))
            key = draw(st.sampled_from([*_NESTED[inner], "junk"]))
        else:
            key = draw(st.sampled_from([*t, "junk"]))
        if draw(st.integers(0, 4)) == 0:
            target.pop(key, None)
        else:
            target[key] = draw(_JUNK)
    return t


@st.composite
def _sections(draw: st.DrawFn) -> str:
    """One of the new sections (an inline array of tables), a [gateway] key, or lb_rule options."""
    section = draw(st.sampled_from([*_TEMPLATES, "lb_rules", "gateway"]))
    if section == "gateway":
        key = draw(st.sampled_from(["address_space", "inbound_default", "probe_source"]))
        return f"{key} = {toml_value(draw(_JUNK))}"
    if section == "lb_rules":
        extra = draw(
            st.dictionaries(st.sampled_from(["distribution", "probe", "idle_timeout"]), _JUNK, max_size=3)
        )
        return json.dumps(extra)  # merged into lb_rules[0] below
    items = [draw(_mutated(_TEMPLATES[section])) for _ in range(draw(st.integers(1, 2)))]
    return f"{section} = {toml_value(items)}"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_sections(), min_size=1, max_size=3))
def test_junk_in_the_new_tables_raises_only_config_errors(parts: list[str]) -> None:
    """Whatever the new sections hold, parse accepts it or raises ConfigError, nothing else."""
    with contextlib.suppress(ConfigError):
        parse(_fuzz_text(parts), PATH)


def _fuzz_text(parts: list[str]) -> str:
    head, _, rest = BASE.partition("\n[[frontends]]")
    arrays: dict[str, str] = {}
    lb_extra: dict[str, Any] = {}
    for part in parts:
        if part.startswith("{"):
            lb_extra.update(json.loads(part))
        elif part.split(" = ")[0] in _TEMPLATES:
            arrays[part.split(" = ")[0]] = part
        else:
            head += part + "\n"
    lb_lines = "".join(f"{k} = {toml_value(v)}\n" for k, v in lb_extra.items())
    rest = ("\n[[frontends]]" + rest).replace("backend_port = 8080\n", "backend_port = 8080\n" + lb_lines, 1)
    # Root-level arrays (inline tables) come before the first table header.
    return "".join(a + "\n" for a in arrays.values()) + head + rest


def test_fuzz_templates_are_valid() -> None:
    """The fuzz starts from valid tables, so its changes reach past the first check."""
    parts = [f"{k} = {toml_value([t])}" for k, t in _TEMPLATES.items()]
    m = parse(_fuzz_text(parts), PATH).model
    assert m.security_groups and m.probes and m.inbound_nat_rules and m.cloud_services
