"""The security-group engine (gateway/core/security.py): Azure NSG semantics, compiled."""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core import security
from gateway.core.events import FlowDenied, InboundNotOpened, fields
from gateway.core.model import (
    AddressTerm,
    Direction,
    GatewayModel,
    InboundNatRule,
    InstanceIp,
    LbRule,
    Pool,
    SecurityGroup,
    SecurityRule,
    Span,
    Tag,
)
from gateway.core.security import DENIAL_EVENT_INTERVAL, Decision, SecurityPolicy

IN, OUT = Direction.INBOUND, Direction.OUTBOUND
TCP, UDP, ICMP, GRE = 6, 17, 1, 47
ANY_PORT: tuple[Span, ...] = ((0, 65535),)


def ip(s: str) -> int:
    return int(ipaddress.IPv4Address(s))


def net(s: str) -> Span:
    n = ipaddress.IPv4Network(s)
    return (int(n.network_address), int(n.broadcast_address))


SPACE = (net("10.10.0.0/16"),)
PROBE = ip("10.10.0.254")
WEB1, WEB2, LONE = ip("10.10.1.1"), ip("10.10.1.2"), ip("10.10.3.7")
OUTSIDE = ip("203.0.113.5")
SERVER = ip("198.51.100.2")


def rule(
    name: str,
    priority: int,
    direction: Direction = OUT,
    allow: bool = True,
    protocol: int = 0,
    src: Sequence[AddressTerm] = (Tag.ANY,),
    sports: Sequence[Span] = ANY_PORT,
    dst: Sequence[AddressTerm] = (Tag.ANY,),
    dports: Sequence[Span] = ANY_PORT,
) -> SecurityRule:
    return SecurityRule(
        name, priority, direction, allow, protocol, tuple(src), tuple(sports), tuple(dst), tuple(dports)
    )


def model(*groups: SecurityGroup, **kw: object) -> GatewayModel:
    base: dict[str, object] = {
        "pools": (Pool("web", (WEB1, WEB2)),),
        "security_groups": groups,
        "address_space": SPACE,
        "probe_source": PROBE,
    }
    base.update(kw)
    return GatewayModel(**base)  # type: ignore[arg-type]


def names(d: Decision) -> list[tuple[str, str]]:
    return [(r.group, r.name) for r in d.rules]


def nic(*rules: SecurityRule, name: str = "nic") -> SecurityGroup:
    return SecurityGroup(name, rules, pools=("web",))


def subnet(*rules: SecurityRule, name: str = "sub") -> SecurityGroup:
    return SecurityGroup(name, rules, prefixes=(net("10.10.0.0/16"),))


# -- default rules --------------------------------------------------------------------


def test_allow_vnet_inbound() -> None:
    """Inside the address space to inside is allowed by AllowVnetInBound."""
    p = SecurityPolicy(model(nic()))
    d = p.inbound(WEB1, TCP, ip("10.10.9.9"), 5000, WEB1, 22)
    assert d.allowed and names(d) == [("nic", "AllowVnetInBound")]
    assert d.rules[0].default and d.rules[0].priority == 65000


def test_allow_azure_load_balancer_inbound() -> None:
    """The probe source outside the address space is allowed by AllowAzureLoadBalancerInBound."""
    probe = ip("192.0.2.254")
    p = SecurityPolicy(model(nic(), probe_source=probe))
    d = p.inbound(WEB1, TCP, probe, 5000, WEB1, 80)
    assert d.allowed and names(d) == [("nic", "AllowAzureLoadBalancerInBound")]


def test_deny_all_inbound() -> None:
    """An Internet source reaching a grouped backend with no rule of its own is denied."""
    p = SecurityPolicy(model(nic()))
    d = p.inbound(WEB1, TCP, OUTSIDE, 5000, WEB1, 80)
    assert not d.allowed and names(d) == [("nic", "DenyAllInBound")]


def test_allow_vnet_outbound() -> None:
    """A flow toward the address space is allowed by AllowVnetOutBound, before the Internet rule."""
    p = SecurityPolicy(model(nic()))
    d = p.outbound(WEB1, UDP, WEB1, 5000, ip("10.10.7.7"), 53)
    assert d.allowed and names(d) == [("nic", "AllowVnetOutBound")]


def test_allow_internet_outbound() -> None:
    """A flow toward the Internet is allowed by AllowInternetOutBound."""
    p = SecurityPolicy(model(nic()))
    d = p.outbound(WEB1, TCP, WEB1, 5000, SERVER, 443)
    assert d.allowed and names(d) == [("nic", "AllowInternetOutBound")]


def test_deny_all_outbound() -> None:
    """A source outside the address space toward a destination inside it is neither VNet nor
    Internet traffic: DenyAllOutBound."""
    outsider = ip("10.20.0.1")
    p = SecurityPolicy(model(SecurityGroup("o", backends=(outsider,))))
    d = p.outbound(outsider, TCP, outsider, 1, ip("10.10.7.7"), 80)
    assert not d.allowed and names(d) == [("o", "DenyAllOutBound")]
    assert d.rules[0].priority == 65500 and d.rules[0].default


def test_no_address_space_makes_everything_internet() -> None:
    """An empty address_space leaves VirtualNetwork empty and Internet everything."""
    p = SecurityPolicy(model(nic(), address_space=()))
    assert names(p.outbound(WEB1, TCP, WEB1, 1, ip("10.10.7.7"), 80)) == [("nic", "AllowInternetOutBound")]


def test_deny_all_outbound_is_last() -> None:
    """A group's own rules come first, in priority order, then the three outbound defaults."""
    p = SecurityPolicy(model(nic(rule("block-internet", 200, allow=False, dst=(Tag.INTERNET,)))))
    assert names(p.outbound(WEB1, TCP, WEB1, 1, SERVER, 80)) == [("nic", "block-internet")]
    rows = [r for r in p.effective_rules(WEB1) if r["direction"] == "outbound"]
    assert [r["name"] for r in rows] == [
        "block-internet",
        "AllowVnetOutBound",
        "AllowInternetOutBound",
        "DenyAllOutBound",
    ]


# -- priorities, tags, protocols ---------------------------------------------------------


def test_lower_priority_number_wins() -> None:
    """First match by priority wins, whatever the order the rules were written in."""
    p = SecurityPolicy(
        model(
            nic(
                rule("allow-smtp", 200, dst=(Tag.INTERNET,), dports=((25, 25),)),
                rule("deny-smtp", 100, allow=False, protocol=TCP, dst=(Tag.INTERNET,), dports=((25, 25),)),
            )
        )
    )
    assert names(p.outbound(WEB1, TCP, WEB1, 1, SERVER, 25)) == [("nic", "deny-smtp")]
    assert names(p.outbound(WEB1, UDP, WEB1, 1, SERVER, 25)) == [("nic", "allow-smtp")]
    assert names(p.outbound(WEB1, TCP, WEB1, 1, SERVER, 26)) == [("nic", "AllowInternetOutBound")]


def test_tags_resolve() -> None:
    """Internet is outside address_space, VirtualNetwork inside, AzureLoadBalancer the probe source."""
    p = SecurityPolicy(
        model(
            nic(
                rule("alb", 100, IN, False, src=(Tag.AZURE_LOAD_BALANCER,)),
                rule("vnet", 110, IN, False, src=(Tag.VIRTUAL_NETWORK,)),
                rule("inet", 120, IN, True, src=(Tag.INTERNET,)),
            )
        )
    )
    assert names(p.inbound(WEB1, TCP, PROBE, 1, WEB1, 80)) == [("nic", "alb")]
    assert names(p.inbound(WEB1, TCP, ip("10.10.0.1"), 1, WEB1, 80)) == [("nic", "vnet")]
    assert names(p.inbound(WEB1, TCP, ip("10.11.0.1"), 1, WEB1, 80)) == [("nic", "inet")]
    assert names(p.inbound(WEB1, TCP, ip("10.9.255.255"), 1, WEB1, 80)) == [("nic", "inet")]


def test_address_lists_and_port_ranges() -> None:
    """A rule's address list and port ranges match on every listed range, inclusive at both ends."""
    p = SecurityPolicy(
        model(
            nic(
                rule(
                    "some",
                    100,
                    allow=False,
                    dst=(net("192.0.2.0/24"), (ip("198.51.100.1"), ip("198.51.100.3"))),
                    dports=((80, 80), (1024, 2048)),
                )
            )
        )
    )
    deny = [(ip("192.0.2.255"), 80), (ip("198.51.100.3"), 1024), (ip("192.0.2.0"), 2048)]
    allow = [
        (ip("198.51.100.4"), 80),
        (ip("192.0.2.1"), 81),
        (ip("192.0.2.1"), 2049),
        (ip("192.0.1.255"), 80),
    ]
    for dst, port in deny:
        assert not p.outbound(WEB1, TCP, WEB1, 1, dst, port).allowed
    for dst, port in allow:
        assert p.outbound(WEB1, TCP, WEB1, 1, dst, port).allowed


def test_source_ports() -> None:
    """Source port ranges are matched on the flow's source port."""
    p = SecurityPolicy(model(nic(rule("low", 100, allow=False, sports=((0, 1023),)))))
    assert not p.outbound(WEB1, UDP, WEB1, 1023, SERVER, 53).allowed
    assert p.outbound(WEB1, UDP, WEB1, 1024, SERVER, 53).allowed


def test_icmp_matches_only_portless_rules() -> None:
    """ICMP (and any other portless protocol) matches a rule only when both its port ranges are "*"."""
    p = SecurityPolicy(
        model(
            nic(
                rule("deny-80", 100, allow=False, dports=((80, 80),)),
                rule("deny-icmp", 110, allow=False, protocol=ICMP),
            )
        )
    )
    assert names(p.outbound(WEB1, ICMP, WEB1, 80, SERVER, 80)) == [("nic", "deny-icmp")]
    assert names(p.outbound(WEB1, TCP, WEB1, 80, SERVER, 80)) == [("nic", "deny-80")]
    assert names(p.outbound(WEB1, GRE, WEB1, 0, SERVER, 80)) == [("nic", "AllowInternetOutBound")]


def test_no_probe_source_leaves_the_tag_empty() -> None:
    """probe_source 0 (not filled in) makes AzureLoadBalancer match nothing, not 0.0.0.0."""
    p = SecurityPolicy(model(nic(), probe_source=0, address_space=()))
    assert names(p.inbound(WEB1, TCP, 0, 1, WEB1, 80)) == [("nic", "DenyAllInBound")]


# -- which groups and in which order ------------------------------------------------------


def test_no_group() -> None:
    """No group: outbound allowed ("no group"), inbound follows inbound_default, an opening is allowed."""
    deny = SecurityPolicy(model())
    assert deny.outbound(WEB1, TCP, WEB1, 1, SERVER, 80) == Decision(True, (), "no group")
    assert deny.inbound(WEB1, TCP, OUTSIDE, 1, WEB1, 80) == Decision(False, (), "inbound_default")
    assert deny.inbound(WEB1, TCP, OUTSIDE, 1, WEB1, 80, opening=True) == Decision(True, (), "opening")
    allow = SecurityPolicy(model(inbound_default_allow=True))
    assert allow.inbound(WEB1, TCP, OUTSIDE, 1, WEB1, 80) == Decision(True, (), "inbound_default")
    assert deny.hits == []


def test_opening_still_follows_groups() -> None:
    """A classic endpoint is open unless a group denies it: a group's DenyAllInBound still applies."""
    p = SecurityPolicy(model(nic()))
    assert not p.inbound(WEB1, TCP, OUTSIDE, 1, WEB1, 80, opening=True).allowed


def test_groups_of() -> None:
    """A pool or address attachment is the NIC group, a prefix the subnet group (standalone too)."""
    p = SecurityPolicy(
        model(
            nic(),
            SecurityGroup("one", backends=(ip("10.10.2.1"),)),
            SecurityGroup("sub", prefixes=(net("10.10.0.0/16"),)),
            SecurityGroup("narrow", prefixes=(net("10.10.3.0/24"),)),
        )
    )
    assert p.groups_of(WEB1) == ("sub", "nic")
    assert p.groups_of(ip("10.10.2.1")) == ("sub", "one")
    assert p.groups_of(LONE) == ("narrow", None)
    assert p.groups_of(ip("10.10.4.1")) == ("sub", None)
    assert p.groups_of(ip("10.11.0.1")) == (None, None)


def test_nic_and_subnet_both_allow_in_azure_order() -> None:
    """Inbound meets the subnet group first, outbound the NIC group first; both must allow, a deny stops."""
    p = SecurityPolicy(
        model(
            nic(
                rule("nic-http", 100, IN, protocol=TCP, dports=((80, 80),)),
                rule("nic-no-dns", 100, OUT, False, dports=((53, 53),)),
            ),
            subnet(
                rule("sub-http", 100, IN, protocol=TCP, dports=((80, 81),)),
                rule("sub-no-ntp", 100, OUT, False, dports=((123, 123),)),
            ),
        )
    )
    d = p.inbound(WEB1, TCP, OUTSIDE, 1, WEB1, 80)
    assert d.allowed and names(d) == [("sub", "sub-http"), ("nic", "nic-http")]
    d = p.inbound(WEB1, TCP, OUTSIDE, 1, WEB1, 81)
    assert not d.allowed and names(d) == [("sub", "sub-http"), ("nic", "DenyAllInBound")]
    d = p.inbound(WEB1, TCP, OUTSIDE, 1, WEB1, 82)
    assert not d.allowed and names(d) == [("sub", "DenyAllInBound")]
    d = p.outbound(WEB1, UDP, WEB1, 1, SERVER, 53)
    assert not d.allowed and names(d) == [("nic", "nic-no-dns")]
    d = p.outbound(WEB1, UDP, WEB1, 1, SERVER, 123)
    assert not d.allowed and names(d) == [("nic", "AllowInternetOutBound"), ("sub", "sub-no-ntp")]
    d = p.outbound(WEB1, UDP, WEB1, 1, SERVER, 124)
    assert d.allowed and names(d) == [("nic", "AllowInternetOutBound"), ("sub", "AllowInternetOutBound")]
    assert d.label == "nic/AllowInternetOutBound,sub/AllowInternetOutBound"


def test_standalone_lookup_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Standalone sources are looked up by prefix and cached; the cache is cleared when full."""
    monkeypatch.setattr(security, "CACHE_LIMIT", 4)
    p = SecurityPolicy(model(subnet()))
    for i in range(10):
        assert p.outbound(LONE + i, TCP, LONE + i, 1, SERVER, 80).allowed
        assert len(p._cache) <= 4
    assert p.groups_of(LONE + 3) == ("sub", None)


# -- hits, denials, interning, reload -------------------------------------------------------


def test_hits_count_every_deciding_rule() -> None:
    """Each rule that decided a flow (allowed or denied) counts one hit; the evaluation does the counting."""
    p = SecurityPolicy(model(nic(rule("deny-25", 100, allow=False, dports=((25, 25),))), subnet()))
    for _ in range(3):
        p.outbound(WEB1, TCP, WEB1, 1, SERVER, 25)
    p.outbound(WEB1, TCP, WEB1, 1, SERVER, 80)
    by = {(r.group, r.direction, r.name): p.hits[r.index] for r in p.refs}
    assert by[("nic", OUT, "deny-25")] == 3
    assert by[("nic", OUT, "AllowInternetOutBound")] == 1
    assert by[("sub", OUT, "AllowInternetOutBound")] == 1
    assert sum(p.hits) == 5


def test_decisions_are_interned() -> None:
    """The same deciding rules give the very same Decision object (a flow keeps a pointer)."""
    p = SecurityPolicy(model(nic(), subnet()))
    a = p.outbound(WEB1, TCP, WEB1, 1, SERVER, 80)
    b = p.outbound(WEB2, UDP, WEB2, 7, ip("192.0.2.9"), 53)
    assert a is b
    c = p.inbound(WEB1, TCP, OUTSIDE, 1, WEB1, 80)
    assert c is p.inbound(WEB2, UDP, OUTSIDE, 9, WEB2, 9)
    assert p.outbound(LONE, TCP, LONE, 1, SERVER, 80) is p.outbound(LONE, TCP, LONE, 2, SERVER, 81)


def test_record_denial_counts_and_gates_events() -> None:
    """Denials count per backend and rule; one event per backend and rule per minute, with suppressed."""
    p = SecurityPolicy(model(nic(rule("deny-25", 100, allow=False, protocol=TCP, dports=((25, 25),)))))
    d = p.outbound(WEB1, TCP, WEB1, 1, SERVER, 25)
    e = p.record_denial(WEB1, d, SERVER, 25, TCP, 100.0)
    assert e == FlowDenied("10.10.1.1", "nic", "deny-25", "outbound", "tcp", "198.51.100.2", 25, 0)
    assert fields(e)["rule"] == "deny-25" and e.name == "flow_denied" and e.level == "warning"
    assert p.record_denial(WEB1, d, SERVER, 25, TCP, 130.0) is None
    assert p.record_denial(WEB1, d, SERVER, 25, TCP, 100.0 + DENIAL_EVENT_INTERVAL - 0.001) is None
    other = p.record_denial(WEB2, d, SERVER, 25, TCP, 130.0)
    assert other is not None and other.backend == "10.10.1.2" and other.suppressed == 0
    late = p.record_denial(WEB1, d, SERVER, 25, TCP, 100.0 + DENIAL_EVENT_INTERVAL)
    assert late is not None and late.suppressed == 2
    index = d.rules[0].index
    assert p.denials == {(WEB1, index): 4, (WEB2, index): 1}


def test_denials_of_many_sources_stay_bounded_in_memory_and_events() -> None:
    """Denied flows from more sources than DENIAL_KEYS_LIMIT (an inside host spoofing addresses
    of a subnet group): past the limit they count under backend 0.0.0.0 and share one event gate
    per rule, so counts, gates and events stay bounded; known backends keep their own rows."""
    p = SecurityPolicy(model(subnet(rule("deny-25", 100, allow=False, protocol=TCP, dports=((25, 25),)))))
    limit = security.DENIAL_KEYS_LIMIT
    base = ip("10.10.0.0")
    events = 0
    for i in range(limit + 500):
        src = base + 1 + i
        d = p.outbound(src, TCP, src, 1, SERVER, 25)
        events += p.record_denial(src, d, SERVER, 25, TCP, 100.0) is not None
    index = d.rules[0].index
    assert len(p.denials) == limit + 1 and len(p._gates) == limit + 1
    assert p.denials[(0, index)] == 500 and events == limit + 1
    assert sum(p.denials.values()) == limit + 500
    first = base + 1
    assert p.record_denial(first, d, SERVER, 25, TCP, 200.0) is not None
    assert p.denials[(first, index)] == 2


def test_record_denial_without_group() -> None:
    """A denial by inbound_default counts under rule index -1 and names inbound_default."""
    p = SecurityPolicy(model())
    d = p.inbound(WEB1, UDP, OUTSIDE, 9, WEB1, 53)
    e = p.record_denial(WEB1, d, OUTSIDE, 53, UDP, 0.0)
    assert e is not None and (e.group, e.rule, e.direction) == ("", "inbound_default", "inbound")
    assert p.denials == {(WEB1, -1): 1}


def test_reload_carries_counts_of_rules_that_stay() -> None:
    """Hits, denials and the event gate of a rule with the same group, direction and name survive a reload."""
    old = SecurityPolicy(
        model(
            nic(
                rule("deny-25", 100, allow=False, dports=((25, 25),)),
                rule("gone", 200, allow=False, dports=((26, 26),)),
            )
        )
    )
    d25 = old.outbound(WEB1, TCP, WEB1, 1, SERVER, 25)
    old.record_denial(WEB1, d25, SERVER, 25, TCP, 0.0)
    d26 = old.outbound(WEB1, TCP, WEB1, 1, SERVER, 26)
    old.record_denial(WEB1, d26, SERVER, 26, TCP, 0.0)
    old.outbound(WEB1, TCP, WEB1, 1, SERVER, 80)
    new = SecurityPolicy(
        model(
            subnet(),
            nic(
                rule("new-first", 50, allow=False, dports=((22, 22),)),
                rule("deny-25", 300, allow=False, dports=((25, 25),)),
            ),
        ),
        old,
    )
    by = {(r.group, r.direction, r.name): new.hits[r.index] for r in new.refs}
    assert by[("nic", OUT, "deny-25")] == 1
    assert by[("nic", OUT, "AllowInternetOutBound")] == 1
    assert by[("nic", OUT, "new-first")] == 0
    assert sum(new.hits) == 2
    index = next(r.index for r in new.refs if r.name == "deny-25")
    assert new.denials == {(WEB1, index): 1}
    # The gate carried over too: the next denial within the minute is held back.
    d = new.outbound(WEB1, TCP, WEB1, 1, SERVER, 25)
    assert new.record_denial(WEB1, d, SERVER, 25, TCP, 30.0) is None


# -- views ------------------------------------------------------------------------------------


def test_effective_rules_for_one_backend() -> None:
    """Rows: every applicable rule per direction in evaluation order, defaults included, as written, hits."""
    p = SecurityPolicy(
        model(
            nic(
                rule(
                    "web",
                    100,
                    IN,
                    protocol=TCP,
                    src=(Tag.INTERNET, net("192.0.2.0/24")),
                    dports=((80, 80), (8000, 8080)),
                )
            ),
            subnet(
                rule(
                    "no-smtp",
                    4000,
                    OUT,
                    False,
                    protocol=TCP,
                    dst=((ip("198.51.100.1"), ip("198.51.100.9")),),
                    dports=((25, 25),),
                )
            ),
        )
    )
    p.inbound(WEB1, TCP, OUTSIDE, 1, WEB1, 80)
    rows = p.effective_rules(WEB1)
    order = [(r["direction"], r["group"], r["attached"], r["name"]) for r in rows]
    assert order == [
        ("inbound", "sub", "subnet", "AllowVnetInBound"),
        ("inbound", "sub", "subnet", "AllowAzureLoadBalancerInBound"),
        ("inbound", "sub", "subnet", "DenyAllInBound"),
        ("inbound", "nic", "nic", "web"),
        ("inbound", "nic", "nic", "AllowVnetInBound"),
        ("inbound", "nic", "nic", "AllowAzureLoadBalancerInBound"),
        ("inbound", "nic", "nic", "DenyAllInBound"),
        ("outbound", "nic", "nic", "AllowVnetOutBound"),
        ("outbound", "nic", "nic", "AllowInternetOutBound"),
        ("outbound", "nic", "nic", "DenyAllOutBound"),
        ("outbound", "sub", "subnet", "no-smtp"),
        ("outbound", "sub", "subnet", "AllowVnetOutBound"),
        ("outbound", "sub", "subnet", "AllowInternetOutBound"),
        ("outbound", "sub", "subnet", "DenyAllOutBound"),
    ]
    web = rows[3]
    assert web == {
        "backend": "10.10.1.1",
        "group": "nic",
        "attached": "nic",
        "direction": "inbound",
        "priority": 100,
        "name": "web",
        "access": "allow",
        "protocol": "tcp",
        "source": "Internet, 192.0.2.0/24",
        "source_ports": "*",
        "destination": "*",
        "destination_ports": "80, 8000-8080",
        "hits": 0,
        "default": False,
    }
    assert rows[2]["hits"] == 1, "the subnet group denied first"
    assert rows[0]["hits"] == 0 and rows[0]["default"] is True and rows[0]["source"] == "VirtualNetwork"
    assert rows[10]["destination"] == "198.51.100.1-198.51.100.9" and rows[10]["access"] == "deny"


def test_effective_rules_for_all() -> None:
    """Without a backend: every configured backend's rows, then groups no configured backend meets."""
    p = SecurityPolicy(
        model(
            nic(),
            SecurityGroup("far", prefixes=(net("10.20.0.0/16"),)),
            instance_ips=(InstanceIp(ip("10.10.2.1"), ip("198.51.100.20")),),
        )
    )
    rows = p.effective_rules()
    assert [r["backend"] for r in rows] == ["10.10.1.1"] * 6 + ["10.10.1.2"] * 6 + [""] * 6
    assert {r["group"] for r in rows if r["backend"] == ""} == {"far"}
    assert all(r["attached"] == "subnet" for r in rows if r["group"] == "far")
    assert p.effective_rules(ip("10.10.2.1")) == []


def test_effective_rules_write_addresses_as_the_operator_did() -> None:
    """An address is shown bare, a prefix as CIDR (0.0.0.0/0 too: only the tag is "*"), a range a-b."""
    terms = (
        (ip("192.0.2.9"), ip("192.0.2.9")),
        (0, 0xFFFFFFFF),
        net("10.0.0.0/8"),
        (ip("10.0.0.1"), ip("10.0.0.2")),
    )
    p = SecurityPolicy(model(nic(rule("mix", 100, dst=terms, sports=((1024, 65535),), dports=((53, 53),)))))
    mix = next(r for r in p.effective_rules(WEB1) if r["name"] == "mix")
    assert mix["destination"] == "192.0.2.9, 0.0.0.0/0, 10.0.0.0/8, 10.0.0.1-10.0.0.2"
    assert (mix["source"], mix["source_ports"], mix["destination_ports"]) == ("*", "1024-65535", "53")


def test_effective_rules_of_a_standalone_source() -> None:
    """A source no configuration names shows its subnet group's rules; one no group covers shows none."""
    p = SecurityPolicy(model(subnet(rule("x", 100, IN))))
    rows = p.effective_rules(LONE)
    assert {r["attached"] for r in rows} == {"subnet"} and rows[0]["backend"] == "10.10.3.7"
    assert len(rows) == 7
    assert p.effective_rules(ip("10.99.0.1")) == []


# -- unopened ---------------------------------------------------------------------------------


def lb(name: str = "http", port: int = 8080, protocol: str = "tcp", opening: bool = False) -> LbRule:
    return LbRule(name, "fe", "web", protocol, 80, port, opening=opening)


def test_unopened_without_groups_follows_inbound_default() -> None:
    """No group, inbound_default deny: every lb_rule member, NAT rule and instance IP reported."""
    kw: dict[str, object] = {
        "lb_rules": (lb(), lb("ep", 9000, opening=True)),
        "inbound_nat_rules": (InboundNatRule("ssh", "fe", "tcp", 50001, WEB1, 22),),
        "instance_ips": (InstanceIp(LONE, ip("198.51.100.20")),),
    }
    deny = SecurityPolicy(model(**kw)).unopened()
    assert deny == [
        InboundNotOpened("lb_rule", "http", "10.10.1.1", 8080, "tcp"),
        InboundNotOpened("lb_rule", "http", "10.10.1.2", 8080, "tcp"),
        InboundNotOpened("inbound_nat_rule", "ssh", "10.10.1.1", 22, "tcp"),
        InboundNotOpened("instance_ip", "198.51.100.20", "10.10.3.7", 0, "*"),
    ]
    assert fields(deny[0])["name"] == "http"
    assert SecurityPolicy(model(inbound_default_allow=True, **kw)).unopened() == []


def test_unopened_with_groups() -> None:
    """A path is reported when no Internet source and port could pass every group covering its backend."""
    groups = (
        nic(rule("http", 100, IN, protocol=TCP, src=(net("192.0.2.0/24"),), dports=((8080, 8080),))),
        SecurityGroup("lone", (rule("vnet-only", 100, IN, src=(Tag.VIRTUAL_NETWORK,)),), backends=(LONE,)),
    )
    p = SecurityPolicy(
        model(
            *groups,
            lb_rules=(lb(), lb("dns", 53, "udp"), lb("both", 8080, "all"), lb("ep", 9000, opening=True)),
            inbound_nat_rules=(InboundNatRule("ssh", "fe", "tcp", 50001, WEB1, 22),),
            instance_ips=(InstanceIp(LONE, ip("198.51.100.20")),),
        )
    )
    got = {(e.kind, e.rule_name, e.backend, e.protocol) for e in p.unopened()}
    assert got == {
        ("lb_rule", "dns", "10.10.1.1", "udp"),
        ("lb_rule", "dns", "10.10.1.2", "udp"),
        ("lb_rule", "both", "10.10.1.1", "udp"),
        ("lb_rule", "both", "10.10.1.2", "udp"),
        ("endpoint", "ep", "10.10.1.1", "tcp"),
        ("endpoint", "ep", "10.10.1.2", "tcp"),
        ("inbound_nat_rule", "ssh", "10.10.1.1", "tcp"),
        ("instance_ip", "198.51.100.20", "10.10.3.7", "*"),
    }


def test_unopened_needs_an_internet_source_past_both_groups() -> None:
    """Opened only if one Internet source passes the subnet and the NIC group together."""
    inside_only = SecurityPolicy(
        model(nic(rule("inside", 100, IN, src=(net("10.10.0.0/24"),))), lb_rules=(lb(),))
    )
    assert len(inside_only.unopened()) == 2
    disjoint = SecurityPolicy(
        model(
            nic(rule("a", 100, IN, src=(net("192.0.2.0/25"),))),
            subnet(rule("b", 100, IN, src=(net("192.0.2.128/25"),))),
            lb_rules=(lb(),),
        )
    )
    assert len(disjoint.unopened()) == 2
    overlap = SecurityPolicy(
        model(
            nic(rule("a", 100, IN, src=(net("192.0.2.0/25"),), sports=((1000, 2000),))),
            subnet(
                rule("b0", 90, IN, False, sports=((1000, 1999),)),
                rule("b", 100, IN, src=(net("192.0.2.64/26"),)),
            ),
            lb_rules=(lb(),),
        )
    )
    assert overlap.unopened() == []


# -- the compiled engine against a plain reference ------------------------------------------

DEFAULTS = (
    ("AllowVnetInBound", IN, True, (Tag.VIRTUAL_NETWORK,), (Tag.VIRTUAL_NETWORK,)),
    ("AllowAzureLoadBalancerInBound", IN, True, (Tag.AZURE_LOAD_BALANCER,), (Tag.ANY,)),
    ("DenyAllInBound", IN, False, (Tag.ANY,), (Tag.ANY,)),
    ("AllowVnetOutBound", OUT, True, (Tag.VIRTUAL_NETWORK,), (Tag.VIRTUAL_NETWORK,)),
    ("AllowInternetOutBound", OUT, True, (Tag.ANY,), (Tag.INTERNET,)),
    ("DenyAllOutBound", OUT, False, (Tag.ANY,), (Tag.ANY,)),
)


def naive(
    m: GatewayModel, backend: int, direction: Direction, flow: tuple[int, int, int, int, int]
) -> tuple[bool, list[tuple[str, str]]]:
    """Azure's evaluation written out plainly: no compilation, no ranges merged."""
    proto, src, sport, dst, dport = flow

    def in_space(x: int) -> bool:
        return any(s <= x <= e for s, e in m.address_space)

    def addr(terms: Sequence[AddressTerm], x: int) -> bool:
        for t in terms:
            if (
                t == Tag.ANY
                or (t == Tag.INTERNET and not in_space(x))
                or (t == Tag.VIRTUAL_NETWORK and in_space(x))
            ):
                return True
            if t == Tag.AZURE_LOAD_BALANCER and m.probe_source and x == m.probe_source:
                return True
            if not isinstance(t, Tag) and t[0] <= x <= t[1]:
                return True
        return False

    def every_port(spans: Sequence[Span]) -> bool:
        covered = 0
        for s, e in sorted(spans):
            if s > covered:
                return False
            covered = max(covered, e + 1)
        return covered > 65535

    def match(r: SecurityRule) -> bool:
        if r.protocol not in (0, proto):
            return False
        if proto not in (TCP, UDP) and not (every_port(r.source_ports) and every_port(r.destination_ports)):
            return False
        return (
            addr(r.sources, src)
            and any(s <= sport <= e for s, e in r.source_ports)
            and addr(r.destinations, dst)
            and any(s <= dport <= e for s, e in r.destination_ports)
        )

    pools = {p.name for p in m.pools if backend in p.members}
    nic_g = [g for g in m.security_groups if backend in g.backends or pools & set(g.pools)]
    sub_g = [g for g in m.security_groups if any(s <= backend <= e for s, e in g.prefixes)]
    order = nic_g + sub_g if direction == OUT else sub_g + nic_g
    if not order:
        return (True, []) if direction == OUT else (m.inbound_default_allow, [])
    decided: list[tuple[str, str]] = []
    for g in order:
        rules = sorted((r for r in g.rules if r.direction == direction), key=lambda r: r.priority)
        rules += [
            rule(n, 65000, d, a, 0, s, ANY_PORT, t, ANY_PORT) for n, d, a, s, t in DEFAULTS if d == direction
        ]
        first = next(r for r in rules if match(r))
        decided.append((g.name, first.name))
        if not first.allow:
            return False, decided
    return True, decided


ADDRS = [ip(a) for a in ("0.0.0.0", "10.10.0.0", "10.10.0.5", "10.10.1.1", "10.10.255.255", "10.11.0.0",
                         "192.0.2.0", "192.0.2.7", "192.0.2.8", "255.255.255.255")]  # fmt: skip
PORTS = [0, 1, 2, 53, 54, 1023, 1024, 65534, 65535]
address = st.one_of(st.sampled_from(ADDRS), st.sampled_from(ADDRS).map(lambda a: min(a + 1, 0xFFFFFFFF)))
port = st.sampled_from(PORTS)


def spans(values: st.SearchStrategy[int]) -> st.SearchStrategy[tuple[Span, ...]]:
    return st.lists(st.tuples(values, values).map(lambda t: (min(t), max(t))), min_size=1, max_size=3).map(
        tuple
    )


term = st.one_of(st.sampled_from(list(Tag)), st.tuples(address, address).map(lambda t: (min(t), max(t))))
terms = st.lists(term, min_size=1, max_size=3).map(tuple)
ports = st.one_of(st.just(ANY_PORT), spans(port))


@st.composite
def groups(draw: st.DrawFn, name: str, attach: dict[str, object]) -> SecurityGroup:
    n = draw(st.integers(0, 6))
    prios = draw(st.lists(st.integers(100, 4096), min_size=n, max_size=n, unique=True))
    rules = tuple(
        SecurityRule(
            f"{name}{i}",
            p,
            draw(st.sampled_from([IN, OUT])),
            draw(st.booleans()),
            draw(st.sampled_from([0, 0, ICMP, TCP, UDP])),
            draw(terms),
            draw(ports),
            draw(terms),
            draw(ports),
        )
        for i, p in enumerate(prios)
    )
    return SecurityGroup(name, rules, **attach)  # type: ignore[arg-type]


@st.composite
def scenarios(draw: st.DrawFn) -> GatewayModel:
    gs = []
    choices: list[dict[str, object] | None] = [None, {"pools": ("web",)}, {"backends": (WEB1,)}]
    nic_attach = draw(st.sampled_from(choices))
    if nic_attach is not None:
        gs.append(draw(groups("n", nic_attach)))
    if draw(st.booleans()):
        gs.append(draw(groups("s", {"prefixes": (net("10.10.0.0/16"),)})))
    return GatewayModel(
        pools=(Pool("web", (WEB1,)),),
        security_groups=tuple(gs),
        address_space=draw(st.sampled_from([(), SPACE, (net("10.10.0.0/16"), net("192.0.2.0/29"))])),
        probe_source=draw(st.sampled_from([0, PROBE, ip("192.0.2.7")])),
        inbound_default_allow=draw(st.booleans()),
    )


flows = st.tuples(st.sampled_from([ICMP, TCP, UDP, GRE]), address, port, address, port)


@settings(max_examples=200, deadline=None)
@given(scenarios(), st.lists(st.tuples(st.sampled_from([IN, OUT]), flows), min_size=1, max_size=20))
def test_compiled_equals_naive(
    m: GatewayModel, cases: list[tuple[Direction, tuple[int, int, int, int, int]]]
) -> None:
    """The bit-vector tables decide every flow as plain first-match evaluation does, same rules."""
    p = SecurityPolicy(m)
    for backend in (WEB1, ip("10.10.0.5")):
        for direction, flow in cases:
            d = p.outbound(backend, *flow) if direction == OUT else p.inbound(backend, *flow)
            assert (d.allowed, names(d)) == naive(m, backend, direction, flow)


def internet_sample(m: GatewayModel) -> list[int]:
    """One address on each side of every edge the generated rules and tags can have, outside the space
    (0.0.0.0 too when it is not the probe source: ``probe_source = 0`` means none)."""
    near = {a for x in [*ADDRS, PROBE] for a in (x - 1, x, x + 1, x + 2) if 0 <= a <= 0xFFFFFFFF}
    return sorted(
        a for a in near
        if (a != m.probe_source or not m.probe_source) and not any(s <= a <= e for s, e in m.address_space)
    )


PORT_SAMPLE = sorted({q for x in PORTS for q in (x, x + 1) if q <= 65535})


@settings(max_examples=60, deadline=None)
@given(scenarios())
def test_unopened_agrees_with_brute_force(m: GatewayModel) -> None:
    """unopened() reports an lb_rule's protocol exactly when no Internet flow of a dense sample passes."""
    m = dataclasses.replace(m, lb_rules=(lb("r", 53, "all"),))
    p = SecurityPolicy(m)
    reported = {e.protocol for e in p.unopened()}
    internet = internet_sample(m)
    for proto, pname in ((TCP, "tcp"), (UDP, "udp")):
        reachable = any(naive(m, WEB1, IN, (proto, a, q, WEB1, 53))[0] for a in internet for q in PORT_SAMPLE)
        assert (pname in reported) == (not reachable)


@settings(max_examples=30, deadline=None)
@given(scenarios())
def test_unopened_instance_ip_agrees_with_brute_force(m: GatewayModel) -> None:
    """An instance IP is reported exactly when no Internet flow of any protocol, port or source passes
    (the sample is asked of the compiled policy, which test_compiled_equals_naive holds to the reference)."""
    m = dataclasses.replace(m, instance_ips=(InstanceIp(WEB1, ip("198.51.100.20")),))
    p = SecurityPolicy(m)
    reported = [e.kind for e in p.unopened()] == ["instance_ip"]
    reachable = any(
        p.inbound(WEB1, proto, a, q, WEB1, d).allowed
        for proto in (ICMP, TCP, UDP)
        for a in internet_sample(m)
        for q in PORT_SAMPLE
        for d in PORT_SAMPLE
    )
    assert reported == (not reachable)
