"""The Prometheus endpoint (``--metrics HOST:PORT``), with prometheus_client.

Names follow what cloud NAT users already chart (SNAT connection count by
state, allocated and used SNAT ports per backend); the README lists them
all. Nothing is updated per packet: on each scrape the collector asks the
packet loop for one snapshot (:meth:`PacketLoop.call`) and turns it into
metric families in the HTTP server's thread. With several workers the
snapshot is every worker's, merged by the supervisor (:mod:`gateway.merge`),
plus ``per_worker`` rows for the ``snatgw_worker_*`` families.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import start_http_server

from gateway.adapters.loop import LATENCY_BUCKETS
from gateway.core.address import ip_str
from gateway.core.model import PROTO_NAMES
from gateway.core.security import SecurityPolicy

Snapshot = Callable[[], dict[str, Any]]


#: The labels of the per-backend and per-address families.
_BACKEND = ["backend", "public_ip"]
_ADDRESS = ["public_ip", "name", "kind"]
PROTOCOLS = tuple(PROTO_NAMES.values())
Samples = Iterable[tuple[list[str], float]]


Family = type[CounterMetricFamily | GaugeMetricFamily]


def family(kind: Family, name: str, doc: str, labels: list[str], samples: Samples) -> Metric:
    """One counter or gauge family with its samples."""
    fam = kind(name, doc, labels=labels)
    for values, n in samples:
        fam.add_metric(values, n)
    return fam


def by_key(counts: dict[str, int]) -> Samples:
    """Samples labelled by the keys of ``counts`` (one label)."""
    return (([k], n) for k, n in counts.items())


def security_counts(policy: SecurityPolicy) -> dict[str, list[dict[str, Any]]]:
    """Hit and denial counts of the security policy as plain rows (taken in the loop's
    thread, turned into families in the scrape's).

    ``hits``: one row per compiled rule (a group's own and its six defaults);
    ``denials``: one row per backend and deciding rule; a flow no group
    covered that ``inbound_default`` denied has group "" and rule
    "inbound_default".
    """
    refs = policy.refs
    hits = [
        {"group": r.group, "direction": str(r.direction), "rule": r.name, "hits": policy.hits[r.index]}
        for r in refs
    ]
    denials = []
    for (backend, index), n in policy.denials.items():
        if 0 <= index < len(refs):
            r = refs[index]
            group, rule, direction = r.group, r.name, str(r.direction)
        else:
            group, rule, direction = "", "inbound_default", "inbound"
        denials.append(
            {"backend": ip_str(backend), "group": group, "rule": rule, "direction": direction, "flows": n}
        )
    return {"hits": hits, "denials": denials}


class GatewayCollector:
    """Builds every ``snatgw_*`` family from one snapshot per scrape."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def describe(self) -> list[Metric]:
        return []  # dynamic label sets: the registry must not pre-scrape

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        stats = snap["stats"]
        c = stats["counters"]
        rows = snap["ports"]
        addresses = snap["status"]["addresses"]
        blocks = [a for a in addresses if a["block_size"]]

        def backend(row: dict[str, Any]) -> list[str]:
            return [row["backend"], row["public_ip"]]

        def address(a: dict[str, Any]) -> list[str]:
            return [a["public_ip"], a["name"], a["kind"]]

        C, G = CounterMetricFamily, GaugeMetricFamily
        yield family(C, "snatgw_snat_connections", "New flows (SNAT connections) by state: attempted, "
                     "failed (no port or address)", ["state"], by_key(stats["snat_connections"]))
        yield family(C, "snatgw_backend_snat_connections",
                     "New flows (SNAT connections) per backend by state", [*_BACKEND, "state"],
                     ((backend(r) + [state], r[key]) for r in rows
                      for state, key in (("attempted", "attempted"), ("failed", "exhausted"))))
        yield family(G, "snatgw_allocated_snat_ports", "SNAT ports preallocated to the backend (its block)",
                     _BACKEND, ((backend(r), r["allocated"]) for r in rows if r["allocated"] is not None))
        yield family(G, "snatgw_used_snat_ports", "SNAT ports carrying at least one flow",
                     [*_BACKEND, "protocol"],
                     ((backend(r) + [p], r["in_use"].get(p, 0)) for r in rows for p in PROTOCOLS))
        yield family(C, "snatgw_snat_port_exhaustion", "New flows that failed because the backend's block "
                     "had no port", _BACKEND, ((backend(r), r["exhausted"]) for r in rows))
        yield family(C, "snatgw_flow_limit_drops", "New flows refused at a flow cap (max_flows_per_backend "
                     "or max_flows)", _BACKEND, ((backend(r), r["flow_limit_drops"]) for r in rows))
        yield family(G, "snatgw_backend_flows", "Live flows of the backend (max_flows_per_backend caps it)",
                     _BACKEND, ((backend(r), r["flows"]) for r in rows))
        caps = stats["flow_limits"]
        yield family(G, "snatgw_max_flows", "Flow caps: max_flows (global) and max_flows_per_backend",
                     ["scope"], ((["global"], caps["max_flows"]),
                                 (["per_backend"], caps["max_flows_per_backend"])))
        yield family(C, "snatgw_packets", "Packets translated", ["direction"],
                     (([d], c[f"{d}_translated"]) for d in ("in2out", "out2in")))
        yield family(C, "snatgw_icmp_errors", "ICMP errors translated", ["direction"],
                     (([d], c[f"icmp_error_{d}"]) for d in ("in2out", "out2in", "local_out")))
        yield family(C, "snatgw_dropped_packets", "Packets dropped, by reason", ["reason"],
                     by_key(stats["drops"]))
        yield family(G, "snatgw_flows", "Live flows", ["protocol", "state"],
                     (([p, st], n) for p, states in stats["flows"].items() for st, n in states.items()))
        yield C("snatgw_flows_created", "Flows created", value=c["flows_created"])
        yield C("snatgw_inbound_flows_created", "Flows opened from the outside (LB rules, inbound NAT "
                "rules, instance IPs)", value=c["inbound_flows_created"])
        yield C("snatgw_hairpin_packets", "Packets from the inside to a public address translated "
                "back inside (hairpin)", value=c["hairpin_translated"])
        sec = snap.get("security", {"hits": [], "denials": []})
        yield family(C, "snatgw_security_denied_flows", "New flows a security group (or inbound_default) "
                     "denied, per backend and deciding rule", ["backend", "group", "rule", "direction"],
                     (([d["backend"], d["group"], d["rule"], d["direction"]], d["flows"])
                      for d in sec["denials"]))
        yield family(C, "snatgw_security_rule_hits", "New flows each security rule decided (allowed or "
                     "denied), defaults included", ["group", "rule", "direction"],
                     (([h["group"], h["rule"], h["direction"]], h["hits"]) for h in sec["hits"]))
        yield family(G, "snatgw_member_health", "LB rule member health as its probe sees it (1 up, 0 down)",
                     ["probe", "member"],
                     (([h["probe"], h["member"]], 1 if h["state"] == "up" else 0)
                      for h in snap.get("health", [])))
        yield family(C, "snatgw_flows_ended", "Flows ended, by reason", ["reason"],
                     by_key(stats["flows_ended"]))
        yield family(G, "snatgw_address_block_size_ports", "Ports per backend on the address (its tier)",
                     _ADDRESS, ((address(a), a["block_size"]) for a in blocks))
        yield family(G, "snatgw_address_backends", "Backends leaving through the address", _ADDRESS,
                     ((address(a), a["backends"]) for a in addresses))
        yield family(G, "snatgw_address_tier", "Row of the tier table the address is in (1: 1-50 backends)",
                     _ADDRESS, ((address(a), a["tier"]) for a in blocks))
        yield C("snatgw_tier_changes", "Times an address changed tier", value=stats["tier_changes"])
        yield self._latency(snap["latency"])
        yield family(C, "snatgw_config_reloads", "Configuration reloads, by result", ["result"],
                     by_key(snap["reloads"]))
        yield G("snatgw_start_time_seconds", "When the gateway started (Unix time)", value=snap["started"])
        workers = snap.get("per_worker")
        if workers is not None:  # several workers (README, "Workers"); everything above is their sum
            yield G("snatgw_workers", "Worker processes", value=len(workers))
            yield family(G, "snatgw_worker_flows", "Live flows of each worker", ["worker"],
                         (([str(w["worker"])], w["flows"]) for w in workers))
            yield family(C, "snatgw_worker_packets", "Packets each worker translated (both directions)",
                         ["worker"], (([str(w["worker"])], w["packets"]) for w in workers))

    @staticmethod
    def _latency(latency: tuple[list[int], float]) -> Metric:
        """The loop latency histogram (cumulative buckets, as Prometheus wants them)."""
        counts, total = latency
        cumulative = 0
        buckets = []
        for bound, n in zip((*LATENCY_BUCKETS, float("inf")), counts, strict=True):
            cumulative += n
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        hist = HistogramMetricFamily("snatgw_loop_latency_seconds", "Time to handle one batch of packets")
        hist.add_metric([], buckets, total)
        return hist


def serve(host: str, port: int, snapshot: Snapshot) -> Callable[[], None]:
    """Start the endpoint in a thread of its own; returns the function that stops it."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(snapshot))
    server, thread = start_http_server(port, host, registry=registry)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=2)

    return stop
