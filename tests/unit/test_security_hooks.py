"""Where the table asks the security groups: every new flow both ways, probe SYNs, reloads and restores
(docs/model.md, "Security groups")."""

from __future__ import annotations

from gateway.core import persist, restore, views
from gateway.core.events import FlowDenied
from gateway.core.model import PROTO_TCP, PROTO_UDP, Direction, SecurityGroup, SecurityRule, Tag
from gateway.core.packet import describe
from gateway.core.table import TranslationTable
from gateway.core.verdict import ACCEPT, DROP
from tests.unit.conftest import (
    CLIENT,
    FRONTEND,
    INSTANCE,
    INSTANCE_PUBLIC,
    POOL,
    SERVER,
    STANDALONE,
    deliver,
    inbound_model,
    ip,
    out,
    rule,
    tcp,
    udp,
)

PROBE_SOURCE = "10.10.0.254"


def web_group(*rules: SecurityRule) -> SecurityGroup:
    """A NIC group on the pool "web"."""
    return SecurityGroup("web-nsg", rules, pools=("web",))


def test_outbound_deny_drops_takes_no_port_and_says_so_once_a_minute() -> None:
    """A denied outbound flow is dropped and counted before any port is taken; one event per minute."""
    g = web_group(rule("no-smtp", 100, Direction.OUTBOUND, False, PROTO_TCP, dports=((25, 25),)))
    t = TranslationTable(inbound_model(security_groups=(g,)), 0.0)
    for i in range(3):
        assert t.in2out(tcp(POOL[0], SERVER, 40000 + i, 25), float(i)) == DROP
    assert t.counters_dict()["drop_security_denied"] == 3 and t.flow_count() == 0
    be = t.backends[ip(POOL[0])]
    assert be.block is not None and all(inv.in_use == 0 for inv in be.block.inventories.values())
    evs = [e for e in t.events if isinstance(e, FlowDenied)]
    assert len(evs) == 1 and (evs[0].rule, evs[0].port, evs[0].remote) == ("no-smtp", 25, SERVER)
    out(t, tcp(POOL[0], SERVER, 40010, 443), 3.0)
    assert t.in2out(tcp(POOL[0], SERVER, 40011, 25), 61.0) == DROP
    assert len([e for e in t.events if isinstance(e, FlowDenied)]) == 2


def test_a_denied_standalone_is_not_even_placed() -> None:
    """An uncovered-by-NIC standalone denied by a subnet group gets no default address or block."""
    g = SecurityGroup(
        "sub",
        (rule("none-out", 100, Direction.OUTBOUND, False),),
        prefixes=((ip("10.10.3.0"), ip("10.10.3.255")),),
    )
    t = TranslationTable(inbound_model(security_groups=(g,)), 0.0)
    assert t.in2out(udp(STANDALONE, SERVER, 1000, 53), 0.0) == DROP
    assert ip(STANDALONE) not in t.backends


def test_the_flow_keeps_its_decision_and_later_packets_ask_nothing() -> None:
    """The admitting decision is on the flow; later packets do not count rule hits."""
    t = TranslationTable(inbound_model(security_groups=(web_group(),)), 0.0)
    out(t, udp(POOL[0], SERVER, 1000, 53))
    (f,) = t.inside[PROTO_UDP].values()
    assert f.decision is not None and f.decision.label == "web-nsg/AllowInternetOutBound"
    hits = list(t.security.hits)
    for i in range(5):
        out(t, udp(POOL[0], SERVER, 1000, 53), 0.1 * i)
    assert t.security.hits == hits


def test_inbound_rule_sees_the_backend_port_and_allows_through_a_group() -> None:
    """An inbound allow on the backend port (8080, not the frontend's 80) admits an LB flow."""
    g = web_group(rule("web-in", 100, Direction.INBOUND, True, PROTO_TCP, dports=((8080, 8080),)))
    t = TranslationTable(inbound_model(inbound_default_allow=False, security_groups=(g,)), 0.0)
    deliver(t, tcp(CLIENT, FRONTEND, 40000, 80))
    (f,) = t.inside[PROTO_TCP].values()
    assert f.inbound and f.decision is not None and f.decision.label == "web-nsg/web-in"
    assert [r["rule"] for r in views.flows(t, 1.0)] == ["web-nsg/web-in"]


def test_instance_ip_inbound_denied_by_a_group() -> None:
    """A group on the instance denying inbound UDP stops it; TCP still reaches it."""
    g = SecurityGroup(
        "inst",
        (
            rule("no-udp", 100, Direction.INBOUND, False, PROTO_UDP),
            rule("any-in", 200, Direction.INBOUND, True, src=(Tag.INTERNET,)),
        ),
        backends=(ip(INSTANCE),),
    )
    t = TranslationTable(inbound_model(inbound_default_allow=False, security_groups=(g,)), 0.0)
    assert t.out2in(udp(CLIENT, INSTANCE_PUBLIC, 40000, 53), 0.0) == DROP
    assert deliver(t, tcp(CLIENT, INSTANCE_PUBLIC, 40000, 22)) == (INSTANCE, 22)
    assert t.counters_dict()["drop_security_denied"] == 1


def test_probe_syn_meets_the_backends_inbound_rules() -> None:
    """A probe SYN from the AzureLoadBalancer address passes by default; a group denying it drops it."""
    deny = web_group(rule("no-lb", 100, Direction.INBOUND, False, src=(Tag.AZURE_LOAD_BALANCER,)))
    for groups, want in (((web_group(),), ACCEPT), ((deny,), DROP)):
        t = TranslationTable(inbound_model(security_groups=groups, probe_source=ip(PROBE_SOURCE)), 0.0)
        syn = tcp(PROBE_SOURCE, POOL[0], 33000, 8080)
        assert t.local_out(syn, 0.0) == want
        assert describe(syn).dst == POOL[0]
        assert t.counters_dict()["drop_security_denied"] == (1 if want == DROP else 0)


def test_probe_syn_to_an_uncovered_backend_or_no_backend_passes() -> None:
    """inbound_default is about the outside: probes to uncovered backends pass; other SYNs are the host's."""
    t = TranslationTable(inbound_model(inbound_default_allow=False, probe_source=ip(PROBE_SOURCE)), 0.0)
    assert t.local_out(tcp(PROBE_SOURCE, POOL[0], 33000, 8080), 0.0) == ACCEPT
    assert t.local_out(tcp(PROBE_SOURCE, "10.10.9.9", 33000, 22), 0.0) == ACCEPT
    assert t.local_out(tcp(PROBE_SOURCE, POOL[0], 33000, 8080, "A"), 0.0) == ACCEPT


def test_reload_applies_new_rules_to_new_flows_only() -> None:
    """A reload that denies outbound UDP leaves the live flow running and denies a new one."""
    t = TranslationTable(inbound_model(), 0.0)
    sport, _, _ = out(t, udp(POOL[0], SERVER, 1000, 53))
    g = web_group(rule("no-udp", 100, Direction.OUTBOUND, False, PROTO_UDP))
    t.reconfigure(inbound_model(security_groups=(g,)), 1.0)
    assert out(t, udp(POOL[0], SERVER, 1000, 53), 2.0)[0] == sport
    assert t.in2out(udp(POOL[0], SERVER, 1001, 53), 2.0) == DROP
    assert t.security.hits[t.security.refs.index(next(r for r in t.security.refs if r.name == "no-udp"))] == 1


def test_a_reload_forgets_the_group_lookups_of_standalone_sources() -> None:
    """A standalone seen with no group, then a reload that attaches a subnet group denying it:
    its live flow runs on, its next new flow is denied (the old lookup was not kept)."""
    t = TranslationTable(inbound_model(), 0.0)
    sport, _, _ = out(t, udp(STANDALONE, SERVER, 1000, 53))
    g = SecurityGroup(
        "sub",
        (rule("none-out", 100, Direction.OUTBOUND, False),),
        prefixes=((ip("10.10.3.0"), ip("10.10.3.255")),),
    )
    t.reconfigure(inbound_model(security_groups=(g,)), 1.0)
    assert out(t, udp(STANDALONE, SERVER, 1000, 53), 2.0)[0] == sport
    assert t.in2out(udp(STANDALONE, SERVER, 1001, 53), 2.0) == DROP
    assert t.counters_dict()["drop_security_denied"] == 1


def test_restore_asks_the_current_rules_again() -> None:
    """A saved outbound flow the new groups deny is not restored (fail closed); an allowed one is."""
    t = TranslationTable(inbound_model(), 0.0)
    out(t, udp(POOL[0], SERVER, 1000, 53))
    out(t, tcp(POOL[1], SERVER, 1000, 443))
    doc = persist.dump(t, 1.0, 1000.0)
    g = web_group(rule("no-udp", 100, Direction.OUTBOUND, False, PROTO_UDP))
    t2 = TranslationTable(inbound_model(security_groups=(g,)), 2.0)
    s = restore.restore(t2, doc, 2.0, 1001.0)
    assert (s.restored, s.dropped_denied) == (1, 1)
    (f,) = t2.inside[PROTO_TCP].values()
    assert f.decision is not None and f.decision.allowed


def test_rules_view_lists_effective_rules_with_defaults() -> None:
    """rules(table, backend) is the policy's effective rules: own rules then Azure's six defaults."""
    g = web_group(rule("web-in", 100, Direction.INBOUND, True, PROTO_TCP, dports=((8080, 8080),)))
    t = TranslationTable(inbound_model(security_groups=(g,)), 0.0)
    rows = views.rules(t, ip(POOL[0]))
    assert [r["name"] for r in rows][:2] == ["web-in", "AllowVnetInBound"]
    assert len(rows) == 7
    assert views.rules(t, ip(INSTANCE)) == []
