"""Health of LB rule members (docs/model.md, "Health probes"): the state machine, its events, reloads."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from gateway.core import views
from gateway.core.events import MemberHealthChanged, fields
from gateway.core.health import HealthBook, MemberHealth, next_health, probe_pairs
from gateway.core.model import GatewayModel, LbRule, Pool, Probe
from gateway.core.table import TranslationTable
from gateway.core.verdict import DROP
from tests.unit.conftest import CLIENT, FRONTEND, POOL, SERVER, deliver, inbound_model, ip, out, tcp, udp

PROBE = Probe("web-probe", "tcp", 8080, number_of_probes=3)


def probed_model(**kw: Any) -> GatewayModel:
    return inbound_model(
        probes=(PROBE,), lb_rules=(LbRule("http", "fe-web", "web", "tcp", 80, 8080, probe="web-probe"),), **kw
    )


def probed_table() -> TranslationTable:
    return TranslationTable(probed_model(), 0.0)


def test_down_after_n_failures_up_after_one_success() -> None:
    """The state machine: N failures in a row take an up member down, one success brings it up."""
    h = MemberHealth(False, 0.0)
    assert next_health(h, True, 3, 1.0) and h.up and h.since == 1.0
    assert not next_health(h, False, 3, 2.0) and not next_health(h, False, 3, 3.0)
    assert not next_health(h, True, 3, 4.0) and h.failures == 0
    assert [next_health(h, False, 3, 5.0 + i) for i in range(3)] == [False, False, True]
    assert not h.up and h.since == 7.0 and h.failures == 3
    assert not next_health(h, False, 3, 8.0) and h.failures == 4


def test_a_member_starts_down_and_events_say_each_change() -> None:
    """Members start down without an event; up is info, down a warning."""
    t = probed_table()
    assert not [e for e in t.events if isinstance(e, MemberHealthChanged)]
    t.probe_result("web-probe", ip(POOL[0]), True, 1.0)
    t.probe_result("web-probe", ip(POOL[0]), True, 2.0)
    for i in range(3):
        t.probe_result("web-probe", ip(POOL[0]), False, 3.0 + i)
    evs = [e for e in t.events if isinstance(e, MemberHealthChanged)]
    assert [(e.state, e.level) for e in evs] == [("up", "info"), ("down", "warning")]
    assert fields(evs[1]) == {
        "probe": "web-probe",
        "member": POOL[0],
        "port": 8080,
        "state": "down",
        "failures": 3,
    }


def test_new_flows_avoid_a_down_member_and_a_live_flow_stays() -> None:
    """A member going down gets no new flows; its established flow keeps running (Azure's way)."""
    t = probed_table()
    for m in POOL:
        t.probe_result("web-probe", ip(m), True, 1.0)
    dst, _ = deliver(t, tcp(CLIENT, FRONTEND, 40000, 80), 2.0)
    for i in range(3):
        t.probe_result("web-probe", ip(dst), False, 3.0 + i)
    assert dst not in {deliver(t, tcp(CLIENT, FRONTEND, 41000 + i, 80), 7.0)[0] for i in range(30)}
    assert deliver(t, tcp(CLIENT, FRONTEND, 40000, 80, "A", seq=1), 8.0)[0] == dst


def test_probe_targets_pairs_each_probed_member_once() -> None:
    """probe_targets lists (probe, member) for pools of LB rules that name a probe, each pair once."""
    m = inbound_model(
        probes=(PROBE,),
        lb_rules=(
            LbRule("http", "fe-web", "web", "tcp", 80, 8080, probe="web-probe"),
            LbRule("alt", "fe-web", "web", "tcp", 81, 8080, probe="web-probe"),
            LbRule("plain", "fe-web", "web", "udp", 53, 53),
        ),
    )
    t = TranslationTable(m, 0.0)
    assert t.probe_targets() == [(PROBE, ip(a)) for a in sorted(POOL, key=ip)]
    assert len(probe_pairs(m)) == 3


def test_a_rule_without_a_probe_counts_every_member_healthy() -> None:
    """No probe: flows go to members at once."""
    t = TranslationTable(inbound_model(), 0.0)
    assert deliver(t, tcp(CLIENT, FRONTEND, 40000, 80))[1] == 8080
    assert t.probe_targets() == []


def test_outbound_does_not_depend_on_probe_health() -> None:
    """Scenario 2 leaves through the frontend while every member is down."""
    t = probed_table()
    assert t.out2in(tcp(CLIENT, FRONTEND, 40000, 80), 0.0) == DROP
    _, src, _ = out(t, udp(POOL[0], SERVER, 1000, 53))
    assert src == FRONTEND


def test_reload_keeps_health_of_pairs_that_stay() -> None:
    """A reload keeps the state of staying pairs; a new member starts down; a gone one is forgotten."""
    t = probed_table()
    t.probe_result("web-probe", ip(POOL[0]), True, 1.0)
    t.probe_result("web-probe", ip(POOL[1]), True, 1.0)
    m = probed_model(pools=(Pool("web", (ip(POOL[0]), ip("10.10.1.9"))),))
    t.reconfigure(m, 2.0)
    assert t.health.is_up("web-probe", ip(POOL[0]))
    assert not t.health.is_up("web-probe", ip("10.10.1.9"))
    assert ("web-probe", ip(POOL[1])) not in t.health.pairs
    assert {deliver(t, tcp(CLIENT, FRONTEND, 40000 + i, 80), 3.0)[0] for i in range(10)} == {POOL[0]}


def test_a_result_for_a_pair_no_longer_probed_is_ignored() -> None:
    """A result that raced a reload changes nothing and raises nothing."""
    book = HealthBook()
    assert book.record("gone", 1, True, 0.0) is None
    t = probed_table()
    t.probe_result("other", ip(POOL[0]), True, 1.0)
    assert not t.health.is_up("web-probe", ip(POOL[0]))


def test_health_view_and_status() -> None:
    """The health view lists each pair's state, since, failures and the rules using it; status includes it."""
    t = probed_table()
    t.probe_result("web-probe", ip(POOL[1]), True, 5.0)
    rows = {r["member"]: r for r in views.health(t, now=10.0, wall=1000.0)}
    assert rows[POOL[1]] == {
        "probe": "web-probe", "member": POOL[1], "state": "up", "since": 995.0, "failures": 0,
        "rules": ["http"],
    }  # fmt: skip
    assert rows[POOL[0]]["state"] == "down"
    assert len(views.status(t)["health"]) == 3


def test_a_restart_starts_every_member_down() -> None:
    """Health is not saved: a fresh table has every probed member down."""
    t = probed_table()
    t.probe_result("web-probe", ip(POOL[0]), True, 1.0)
    fresh = TranslationTable(replace(t.model), 2.0)
    assert not fresh.health.is_up("web-probe", ip(POOL[0]))
