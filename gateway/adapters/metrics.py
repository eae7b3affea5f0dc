"""The Prometheus endpoint (``--metrics HOST:PORT``), with prometheus_client.

Names follow what cloud NAT users already chart (SNAT connection count by
state, allocated and used SNAT ports per backend); the README lists them
all. Nothing is updated per packet: on each scrape the collector asks the
packet loop for one snapshot (:meth:`PacketLoop.call`) and turns it into
metric families in the HTTP server's thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
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

Snapshot = Callable[[], dict[str, Any]]


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

        conns = CounterMetricFamily(
            "snatgw_snat_connections",
            "New outbound flows by state: attempted, failed (no port or address)",
            labels=["state"],
        )
        for state, n in stats["snat_connections"].items():
            conns.add_metric([state], n)
        yield conns

        be_conns = CounterMetricFamily(
            "snatgw_backend_snat_connections",
            "New outbound flows per backend by state",
            labels=["backend", "public_ip", "state"],
        )
        allocated = GaugeMetricFamily(
            "snatgw_allocated_snat_ports",
            "SNAT ports preallocated to the backend (its block)",
            labels=["backend", "public_ip"],
        )
        used = GaugeMetricFamily(
            "snatgw_used_snat_ports",
            "SNAT ports carrying at least one flow",
            labels=["backend", "public_ip", "protocol"],
        )
        exhaustion = CounterMetricFamily(
            "snatgw_snat_port_exhaustion",
            "New flows that failed because the backend's block had no port",
            labels=["backend", "public_ip"],
        )
        for row in snap["ports"]:
            labels = [row["backend"], row["public_ip"]]
            be_conns.add_metric([*labels, "attempted"], row["attempted"])
            be_conns.add_metric([*labels, "failed"], row["exhausted"])
            if row["allocated"] is not None:
                allocated.add_metric(labels, row["allocated"])
            for proto in ("tcp", "udp", "icmp"):
                used.add_metric([*labels, proto], row["in_use"].get(proto, 0))
            exhaustion.add_metric(labels, row["exhausted"])
        yield from (be_conns, allocated, used, exhaustion)

        packets = CounterMetricFamily("snatgw_packets", "Packets translated", labels=["direction"])
        packets.add_metric(["in2out"], c["in2out_translated"])
        packets.add_metric(["out2in"], c["out2in_translated"])
        yield packets
        icmp = CounterMetricFamily("snatgw_icmp_errors", "ICMP errors translated", labels=["direction"])
        icmp.add_metric(["in2out"], c["icmp_error_in2out"])
        icmp.add_metric(["out2in"], c["icmp_error_out2in"])
        yield icmp
        drops = CounterMetricFamily("snatgw_dropped_packets", "Packets dropped, by reason", labels=["reason"])
        for reason, n in stats["drops"].items():
            drops.add_metric([reason], n)
        yield drops

        flows = GaugeMetricFamily("snatgw_flows", "Live flows", labels=["protocol", "state"])
        for proto, states in stats["flows"].items():
            for state, n in states.items():
                flows.add_metric([proto, state], n)
        yield flows
        yield CounterMetricFamily("snatgw_flows_created", "Flows created", value=c["flows_created"])
        ended = CounterMetricFamily("snatgw_flows_ended", "Flows ended, by reason", labels=["reason"])
        for reason, n in stats["flows_ended"].items():
            ended.add_metric([reason], n)
        yield ended

        block = GaugeMetricFamily(
            "snatgw_address_block_size_ports",
            "Ports per backend on the address (its tier)",
            labels=["public_ip", "name", "kind"],
        )
        members = GaugeMetricFamily(
            "snatgw_address_backends",
            "Backends leaving through the address",
            labels=["public_ip", "name", "kind"],
        )
        tier = GaugeMetricFamily(
            "snatgw_address_tier",
            "Row of the tier table the address is in (1: 1-50 backends)",
            labels=["public_ip", "name", "kind"],
        )
        for a in snap["status"]["addresses"]:
            labels = [a["public_ip"], a["name"], a["kind"]]
            members.add_metric(labels, a["backends"])
            if a["block_size"]:
                block.add_metric(labels, a["block_size"])
                tier.add_metric(labels, a["tier"])
        yield from (block, members, tier)
        yield CounterMetricFamily(
            "snatgw_tier_changes", "Times an address changed tier", value=stats["tier_changes"]
        )

        counts, total = snap["latency"]
        cumulative = 0
        buckets = []
        for bound, n in zip((*LATENCY_BUCKETS, float("inf")), counts, strict=True):
            cumulative += n
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        hist = HistogramMetricFamily("snatgw_loop_latency_seconds", "Time to handle one batch of packets")
        hist.add_metric([], buckets, total)
        yield hist

        reloads = CounterMetricFamily(
            "snatgw_config_reloads", "Configuration reloads, by result", labels=["result"]
        )
        for result, n in snap["reloads"].items():
            reloads.add_metric([result], n)
        yield reloads
        yield GaugeMetricFamily(
            "snatgw_start_time_seconds", "When the gateway started (Unix time)", value=snap["started"]
        )


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
