"""The workers curve of ``make bench``: UDP 64-byte pps and TCP bulk for workers = 1 .. cores.

Issue 11, "All cores": each worker owns the backends whose address has ``(ip & 15) %
workers`` equal to its index (gateway/core/shard.py), so a load from one backend lands on
one worker whatever the count.  Each point of the curve therefore drives the load from
``2 * workers`` backend addresses, at least two per worker (:func:`pick_backends`), each
a pool member of the bench frontend, with one iperf3 sender per address in parallel.
Kernel NAT gets the same senders in the same lab, once per sender count, as that
point's reference.  CPU per packet sums the supervisor and every worker process.

Imported by scripts/bench.py (which is on the path as the script's own directory).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench_config import gateway_config

from gateway.core.shard import backend_owner
from gateway.lab.layout import FRONTEND_IP, SERVER, extra_backend_addresses

#: First iperf3 port of the curve's servers (one per sender; the rounds use 5201-5204).
CURVE_PORT_BASE = 5301


def pick_backends(workers: int, per_worker: int = 2) -> list[str]:
    """``per_worker`` lab extra-backend addresses owned by each of ``workers`` workers.

    Taken in the lab's address order (10.10.100.1, ...), skipping an address whose owner
    already has its share, so every worker has backends whatever the count.
    """
    have = [0] * workers
    out: list[str] = []
    for addr in extra_backend_addresses(16 * per_worker * 2):
        w = backend_owner(int(ipaddress.IPv4Address(addr)), workers)
        if have[w] < per_worker:
            have[w] += 1
            out.append(addr)
        if len(out) == workers * per_worker:
            return out
    raise ValueError(f"no {per_worker} backends for each of {workers} workers")


def curve_config(backends: Sequence[str], workers: int, queue: int) -> str:
    """The bench config with ``backends`` as the pool and ``workers`` set; defaults otherwise."""
    return gateway_config(queue=queue, workers=workers, members=backends)


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from /proc/PID/task/*/children), for CPU sums."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError):
                    todo += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
    return out


def curve_rows(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per worker count: snatgw and kernel figures, ratio, speed-up over one worker."""
    one = {k: next((p.get(k) for p in points if p["workers"] == 1), None) for k in ("udp_pps", "tcp_mbit")}
    rows = []
    for p in points:
        r: dict[str, Any] = {"workers": p["workers"], "senders": p["senders"]}
        for key in ("udp_pps", "tcp_mbit"):
            v, k = p.get(key), p.get(f"kernel_{key}")
            r[key] = v
            r[f"kernel_{key}"] = k
            r[f"{key}_ratio"] = v / k if v is not None and k else None
            r[f"{key}_speedup"] = v / one[key] if v is not None and one[key] else None
        r["cpu_us_per_udp_pkt"] = p.get("cpu_us_per_udp_pkt")
        r["requeued"] = p.get("requeued")
        rows.append(r)
    return rows


def render_curve(curve: dict[str, Any] | None, cores: int | None) -> str:
    """The workers curve as a small table, or why it is missing."""
    if not curve:
        return f"Workers curve: not measured ({cores} cores here)"
    if curve.get("error") and not curve.get("rows"):
        return f"Workers curve: failed: {curve['error']}"

    def f(v: float | None, fmtspec: str) -> str:
        return "-" if v is None else format(v, fmtspec)

    head = ("workers | senders | UDP pkt/s (kernel)  | ratio | x1 w | TCP Mbit/s (kernel) | ratio | x1 w "
            "| CPU us/UDP pkt")
    lines = [f"Workers curve ({cores} cores; load from 2 backend addresses per worker, one iperf3 "
             "sender each, kernel NAT with the same senders; x1 w = speed-up over one worker):", head]
    for r in curve.get("rows", []):
        lines.append(
            f"{r['workers']:>7} | {r['senders']:>7} | {f(r['udp_pps'], ',.0f'):>8} "
            f"({f(r['kernel_udp_pps'], ',.0f'):>8}) | {f(r['udp_pps_ratio'], '.3g'):>5} | "
            f"{f(r['udp_pps_speedup'], '.2f'):>4} | {f(r['tcp_mbit'], ',.0f'):>8} "
            f"({f(r['kernel_tcp_mbit'], ',.0f'):>8}) | {f(r['tcp_mbit_ratio'], '.3g'):>5} | "
            f"{f(r['tcp_mbit_speedup'], '.2f'):>4} | {f(r['cpu_us_per_udp_pkt'], '.2f'):>6}")
    for n in curve.get("notes", []):
        lines.append(f"  note: {n}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the lab part


def _udp(bench: Any, lab: Any, backends: Sequence[str], duration: float) -> dict[str, Any]:
    """One 64-byte iperf3 UDP sender per backend, each to its own server port, in parallel."""
    procs = [bench.start(lab.be, bench.iperf3_client(SERVER, b, CURVE_PORT_BASE + i, duration, udp_length=64),
                         stdout=subprocess.PIPE) for i, b in enumerate(backends)]
    received = sent = 0
    seconds = 0.0
    try:
        for p in procs:
            out, _ = p.communicate(timeout=duration + 30)
            doc = bench.iperf3_json(out, "workers udp")
            srv = doc.get("server_output_json") or {}
            ssum = srv.get("end", {}).get("sum", {})
            received += int(ssum.get("packets", 0)) - int(ssum.get("lost_packets", 0))
            sent += int(doc["end"]["sum"]["packets"])
            seconds = max(seconds, float(ssum.get("seconds", 0.0)), float(doc["end"]["sum"]["seconds"]))
    finally:
        for p in procs:
            bench.PROCS.stop(p)
    seconds = seconds or duration
    return {"delivered_pps": received / seconds, "sent_pps": sent / seconds}


def _tcp(bench: Any, lab: Any, backends: Sequence[str], duration: float) -> dict[str, Any]:
    """One iperf3 TCP bulk client per backend in parallel; receiver Mbit/s summed."""
    procs = [bench.start(lab.be, bench.iperf3_client(SERVER, b, CURVE_PORT_BASE + i, duration),
                         stdout=subprocess.PIPE) for i, b in enumerate(backends)]
    total = 0.0
    try:
        for p in procs:
            out, _ = p.communicate(timeout=duration + 30)
            total += bench.iperf3_json(out, "workers tcp")["end"]["sum_received"]["bits_per_second"] / 1e6
    finally:
        for p in procs:
            bench.PROCS.stop(p)
    return {"receiver_mbit_s": total}


def _tree_cpu(pid: int) -> float:
    hz = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / hz


def run_workers(bench: Any, args: argparse.Namespace, tmp: Path, cores: int) -> dict[str, Any]:
    """The curve for workers = 1 .. ``cores`` (each point a fresh lab), kernel NAT per point."""
    counts = list(range(1, max(1, cores) + 1))
    all_backends = pick_backends(counts[-1])
    out: dict[str, Any] = {"points": [], "notes": [], "errors": []}
    for n in counts:
        backends = pick_backends(n)
        point: dict[str, Any] = {"workers": n, "senders": len(backends), "backends": backends}
        lab = bench.lab_up(args.prefix, whoami=False, extra_backends=all_backends)
        launcher = bench.GatewayLauncher(lab.gw, tmp, bench.PROCS)
        gw = None
        try:
            for i in range(len(backends)):
                bench.start(lab.inet, bench.iperf3_server(SERVER, CURVE_PORT_BASE + i))
            bench.wait_listening(lab.inet, [CURVE_PORT_BASE + i for i in range(len(backends))], "tcp")
            with bench.kernel_nat(lab, ["-s", "10.10.0.0/16", "-j", "SNAT", "--to-source", FRONTEND_IP],
                                  address=FRONTEND_IP):
                point["kernel_udp_pps"] = _udp(bench, lab, backends, args.duration)["delivered_pps"]
                time.sleep(0.3)
                point["kernel_tcp_mbit"] = _tcp(bench, lab, backends, args.duration)["receiver_mbit_s"]
            time.sleep(0.3)
            gw = launcher.start(curve_config(backends, n, args.queue), ready_timeout=30.0)
            c0, cpu0 = bench.stats(gw)["counters"], _tree_cpu(gw.pid)
            r = _udp(bench, lab, backends, args.duration)
            deadline = time.monotonic() + 5.0
            while bench.nfqueue(gw.pid)["waiting"] and time.monotonic() < deadline:
                time.sleep(0.005)
            c1, cpu1 = bench.stats(gw)["counters"], _tree_cpu(gw.pid)
            pkts = bench.packets_handled(c0, c1)
            point["udp_pps"] = r["delivered_pps"]
            point["udp_sent_pps"] = r["sent_pps"]
            point["cpu_us_per_udp_pkt"] = bench.per_unit_us(cpu1 - cpu0, pkts)
            point["requeued"] = c1.get("requeued", 0) - c0.get("requeued", 0)
            time.sleep(0.3)
            point["tcp_mbit"] = _tcp(bench, lab, backends, args.duration)["receiver_mbit_s"]
            bench.log(f"workers {n}: UDP {point['udp_pps']:,.0f} pkt/s "
                      f"(kernel {point['kernel_udp_pps']:,.0f}), TCP {point['tcp_mbit']:,.0f} Mbit/s "
                      f"(kernel {point['kernel_tcp_mbit']:,.0f}), "
                      f"CPU {point['cpu_us_per_udp_pkt'] or 0:.2f} us/UDP pkt")
        except (bench.LabError, OSError, subprocess.SubprocessError, RuntimeError, KeyError,
                ValueError) as exc:
            out["errors"].append(f"workers {n}: {exc}")
            bench.log(f"workers {n}: FAILED: {exc}")
        finally:
            try:
                if gw is not None:
                    res: dict[str, Any] = {"errors": []}
                    bench.stop_gateway(gw, res, f"workers {n}")
                    out["errors"] += res["errors"]
                with contextlib.suppress(Exception):
                    launcher.close()
            finally:
                bench.PROCS.stop_all()
                bench.lab_down(args.prefix)
        out["points"].append(point)
    out["rows"] = curve_rows(out["points"])
    out["notes"].append(
        f"{cores} cores shared by the iperf3 senders and receivers, the kernel's forwarding and "
        "the workers: past one worker per core the curve measures the machine, not the gateway")
    return out
