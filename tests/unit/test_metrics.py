"""The Prometheus families built from one snapshot: names, labels, histogram buckets."""

from __future__ import annotations

from prometheus_client.core import CollectorRegistry
from prometheus_client.exposition import generate_latest

from gateway.adapters.loop import LATENCY_BUCKETS
from gateway.adapters.metrics import GatewayCollector
from gateway.core import views
from gateway.core.table import TranslationTable
from tests.unit.conftest import POOL, SERVER, lab_model, udp


def _scrape() -> str:
    t = TranslationTable(lab_model(), 0.0)
    for sport in range(40000, 40003):
        t.in2out(udp(POOL[0], SERVER, sport, 5000), 1.0)
    latency = [0] * (len(LATENCY_BUCKETS) + 1)
    latency[0], latency[-1] = 5, 1

    def snapshot() -> dict[str, object]:
        return {
            "stats": views.stats(t),
            "ports": views.ports(t, 2.0, 1000.0, top=0),
            "status": views.status(t),
            "latency": (latency, 2.5),
            "reloads": {"applied": 1, "rejected": 2},
            "started": 1000.0,
        }

    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(snapshot))  # type: ignore[arg-type]
    return generate_latest(registry).decode()


def test_port_metrics_per_backend_and_public_address() -> None:
    """Allocated and used SNAT ports carry backend and public address (used: also protocol)."""
    text = _scrape()
    assert 'snatgw_allocated_snat_ports{backend="10.10.1.1",public_ip="198.51.100.10"} 1024.0' in text
    assert 'snatgw_used_snat_ports{backend="10.10.1.1",protocol="udp",public_ip="198.51.100.10"} 3.0' in text
    assert 'snatgw_snat_connections_total{state="attempted"} 3.0' in text
    assert 'snatgw_snat_port_exhaustion_total{backend="10.10.1.1",public_ip="198.51.100.10"} 0.0' in text


def test_counters_gauges_and_histogram_are_exposed() -> None:
    """Packets, drops, flows, tiers, reloads and a cumulative latency histogram are all there."""
    text = _scrape()
    assert 'snatgw_packets_total{direction="in2out"} 3.0' in text
    assert 'snatgw_dropped_packets_total{reason="exhausted"} 0.0' in text
    assert 'snatgw_flows{protocol="udp",state="active"} 3.0' in text
    assert 'snatgw_address_tier{kind="frontend",name="fe-web",public_ip="198.51.100.10"} 1.0' in text
    assert 'snatgw_config_reloads_total{result="rejected"} 2.0' in text
    assert 'snatgw_loop_latency_seconds_bucket{le="0.0001"} 5.0' in text
    assert 'snatgw_loop_latency_seconds_bucket{le="1.0"} 5.0' in text
    assert 'snatgw_loop_latency_seconds_bucket{le="+Inf"} 6.0' in text
    assert "snatgw_loop_latency_seconds_count 6.0" in text
    assert "snatgw_start_time_seconds 1000.0" in text


def test_security_health_inbound_and_hairpin_families() -> None:
    """Denied flows per backend and rule, rule hits, member health 1/0, inbound and hairpin counters."""
    from gateway.adapters.metrics import security_counts
    from tests.unit.conftest import ip
    from tests.unit.test_rules_render import _policy

    policy = _policy()
    backend = ip(POOL[0])
    d = policy.outbound(backend, 6, backend, 40000, ip(SERVER), 25)
    assert not d.allowed
    policy.record_denial(backend, d, ip(SERVER), 25, 6, 1.0)
    policy.denials[(ip(POOL[1]), -1)] = 2  # inbound_default denied two flows to a backend
    sec = security_counts(policy)
    t = TranslationTable(lab_model(), 0.0)
    health = [
        {"probe": "web-probe", "member": POOL[0], "state": "up", "since": 1.0, "failures": 0, "rules": []},
        {"probe": "web-probe", "member": POOL[1], "state": "down", "since": 1.0, "failures": 2, "rules": []},
    ]

    def snapshot() -> dict[str, object]:
        return {
            "stats": views.stats(t), "ports": views.ports(t, 2.0, 1000.0, top=0), "status": views.status(t),
            "security": sec, "health": health, "latency": ([0] * (len(LATENCY_BUCKETS) + 1), 0.0),
            "reloads": {"applied": 0, "rejected": 0}, "started": 1.0,
        }  # fmt: skip

    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(snapshot))  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    assert ('snatgw_security_denied_flows_total{backend="10.10.1.1",direction="outbound",group="web-nsg",'
            'rule="deny-smtp"} 1.0') in text
    assert ('snatgw_security_denied_flows_total{backend="10.10.1.2",direction="inbound",group="",'
            'rule="inbound_default"} 2.0') in text
    hits = "snatgw_security_rule_hits_total"
    assert f'{hits}{{direction="outbound",group="web-nsg",rule="deny-smtp"}} 1.0' in text
    assert f'{hits}{{direction="inbound",group="web-nsg",rule="DenyAllInBound"}} 0.0' in text
    assert 'snatgw_member_health{member="10.10.1.1",probe="web-probe"} 1.0' in text
    assert 'snatgw_member_health{member="10.10.1.2",probe="web-probe"} 0.0' in text
    assert "snatgw_inbound_flows_created_total 0.0" in text
    assert "snatgw_hairpin_packets_total 0.0" in text
    assert 'snatgw_dropped_packets_total{reason="security_denied"} 0.0' in text
    assert 'snatgw_dropped_packets_total{reason="no_healthy_member"} 0.0' in text


def test_every_metric_the_dashboard_charts_is_exported() -> None:
    """Each snatgw_* name in the Grafana dashboard's queries is a family the collector yields."""
    import json
    import re
    from pathlib import Path

    dash = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "snatgw-dashboard.json"
    exprs = re.findall(r'"expr": "((?:[^"\\]|\\.)*)"', dash.read_text())
    used = {n for e in exprs for n in re.findall(r"snatgw_[a-z_]+", json.loads(f'"{e}"'))}
    text = _scrape_full()
    exported = {re.sub(r"_total$", "", n) for n in re.findall(r"^# TYPE (snatgw_[a-z_]+) ", text, re.M)}
    names = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in used}
    assert {"snatgw_security_denied_flows", "snatgw_member_health"} <= names
    assert names <= exported, names - exported


def _scrape_full() -> str:
    t = TranslationTable(lab_model(), 0.0)

    def snapshot() -> dict[str, object]:
        return {
            "stats": views.stats(t), "ports": views.ports(t, 2.0, 1000.0, top=0), "status": views.status(t),
            "security": {"hits": [], "denials": []}, "health": [],
            "latency": ([0] * (len(LATENCY_BUCKETS) + 1), 0.0), "reloads": {"applied": 0, "rejected": 0},
            "started": 1.0,
        }  # fmt: skip

    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(snapshot))  # type: ignore[arg-type]
    return generate_latest(registry).decode()
