"""snatgw benchmark: kernel NAT and snatgw side by side in the same run, and where the time goes.

Run as root (``make bench``; ``--quick`` for a smoke run of every row).  What it measures
(issue 11, "An honest make bench"; issue 10, the rows with 100 security rules):

* **Rounds.** Each round runs, each in a fresh lab (``gateway.lab``, prefix ``bench``):
  ``kernel`` (``iptables -j SNAT``), ``snatgw`` (the default configuration), ``rules``
  (snatgw with 100 security rules attached) and ``tuned`` (snatgw with ``tcp_fin_linger``
  0.25 s, the old bench's connection row).  Rounds interleave (kernel, snatgw, kernel,
  snatgw, ...); each figure is the best of the rounds, and the ratio's spread over the
  rounds is printed next to it, because a ratio to kernel NAT swings with the machine.
* **Rows.** Two setups, each with kernel NAT in the same round: the *default
  configuration* (pool member 10.10.1.1 leaving through frontend 198.51.100.10, every
  ``[gateway]`` setting at its default, so ``tcp_fin_linger`` is 10 s) and an *instance
  IP* (10.10.2.1 as 198.51.100.20: no port block to run out of).  Per setup: UDP 64-byte
  packets delivered per second (iperf3), TCP bulk (iperf3), TCP connections per second
  (connect, 1 byte, close), UDP round trip p50/p99, and the gateway's CPU time per packet:
  utime+stime of the snatgw process (/proc/PID/stat, all threads) over the load, divided
  by the packets its counters say it handled in that time.
* **100 rules.** 100 outbound rules that never match the bench traffic, and the allow
  rule it takes, attached to both backends; UDP pps and connections per second through
  the instance IP, next to the same round's instance-IP row without rules.
* **Memory.** Idle UDP flows opened through the instance IP in bursts paced by the
  gateway's queue (one raw packet per flow from 50,000 source ports x N destination
  ports); VmRSS of the snatgw process (/proc/PID/status) before and at 100k and 1M live
  flows.  If the time or memory budget ends first, the largest count reached is reported.
* **Profile.** In this process, the core (``TranslationTable.in2out``/``out2in``) on
  prebuilt packets, timed with ``time.perf_counter``; set against the whole process's
  measured CPU per packet, the rest is the queue client and the kernel work charged to
  the process.

A table goes to stdout (with the machine: cores, CPU model, kernel, date), progress to
stderr, and everything to ``bench-results.json``.  Exit status 0 when every figure was
measured (goals met or not), 1 when something broke, 130 on Ctrl-C.  Namespaces and every
process started here are removed on every exit path (try/finally, atexit, SIGTERM/SIGINT).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import cProfile
import dataclasses
import functools
import gzip
import ipaddress
import json
import os
import platform
import pstats
import re
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
# The bench's own modules beside it (bench_workers, profile_worker), also when imported by path.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(1, str(Path(__file__).resolve().parent))

import bench_workers  # noqa: E402
from bench_config import bench_rules, gateway_config, security_group_toml  # noqa: E402,F401

from gateway.adapters.control import RequestError, request  # noqa: E402
from gateway.core.model import Timeouts  # noqa: E402
from gateway.lab.clients import (  # noqa: E402
    iperf3_client,
    iperf3_json,
    iperf3_server,
    wait_listening,
)
from gateway.lab.gatewayproc import GatewayLauncher, GatewayProc  # noqa: E402
from gateway.lab.layout import (  # noqa: E402
    FRONTEND_IP,
    INSIDE_GW,
    INSTANCE_BACKEND,
    INSTANCE_PUBLIC,
    POOL_MEMBERS,
    SERVER,
    LabNames,
)
from gateway.lab.netns import LabError, ns_run  # noqa: E402
from gateway.lab.procs import ProcessSet  # noqa: E402
from gateway.lab.topology import LabBusy, kernel_nat, lab_down, lab_lock, lab_up  # noqa: E402

#: tcp_fin_linger when the config leaves it out (the default row's).
DEFAULT_LINGER = Timeouts().tcp_fin_linger

# pyroute2 (used by the lab) forks short-lived children; let them die on SIGTERM instead
# of running this script's handler (see main()).
with contextlib.suppress(ImportError, AttributeError):
    import pyroute2.config

    pyroute2.config.disable_mp_signal = True

HELPER = Path(__file__).resolve().parent / "bench_helper.py"
IPERF_PORTS = (5201, 5202, 5203, 5204)
ACCEPT_PORT = 8000
ECHO_PORT = 7000
#: Destination ports of the memory phase's idle flows (dropped in the internet namespace).
FLOW_DPORT_BASE = 30000
FLOW_SPORTS = (10000, 59999)
#: Extra headroom the memory phase leaves the machine (MemAvailable), in KiB.
MEM_RESERVE_KB = 2 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Setup:
    """One backend and the public address it leaves by, as a row group of the table."""

    name: str
    backend: str
    public: str
    title: str


SETUPS = {
    "default": Setup("default", POOL_MEMBERS[0], FRONTEND_IP,
                     f"Default configuration: pool member {POOL_MEMBERS[0]} via frontend "
                     f"{FRONTEND_IP}, every [gateway] setting at its default "
                     f"(tcp_fin_linger {DEFAULT_LINGER:g} s)"),
    "instance": Setup("instance", INSTANCE_BACKEND, INSTANCE_PUBLIC,
                      f"Instance IP: {INSTANCE_BACKEND} as {INSTANCE_PUBLIC} "
                      "(scenario 1, no port budget), defaults otherwise"),
}

#: What each phase of a round runs: (setup names, loads).
PHASES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "kernel": (("default", "instance"), ("udp_pps", "tcp_bulk", "udp_rtt", "tcp_cps")),
    "snatgw": (("default", "instance"), ("udp_pps", "tcp_bulk", "udp_rtt", "tcp_cps")),
    "rules": (("instance",), ("udp_pps", "tcp_cps")),
    "tuned": (("default",), ("tcp_cps",)),
}
ROUND_PHASES = tuple(PHASES)
#: tcp_fin_linger of the ``tuned`` phase (the value the bench used before it had the default row).
TUNED_LINGER = 0.25
#: Security rules of the ``rules`` phase.
RULE_COUNT = 100


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(LabError):
    """A step of the benchmark failed (not a missed goal: something broke)."""


#: Every process this script started, so that each can be stopped by its own pid.
PROCS = ProcessSet()


# =========================================================================== pure parts
# (tests/unit/test_bench_report.py)


def summarise_rules(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The bench group's own outbound rules in ``snatgw rules`` rows, and their hits."""
    own = [r for r in rows if r.get("group") == "bench-nsg" and r.get("direction") == "outbound"
           and not r.get("default")]
    return {"rules_attached": len(own),
            "allow_hits": sum(int(r.get("hits", 0)) for r in own if r.get("access") == "allow"),
            "deny_hits": sum(int(r.get("hits", 0)) for r in own if r.get("access") == "deny")}


def rules_note(check: dict[str, Any] | None) -> str:
    if not check:
        return "snatgw rules was not read"
    if check.get("error"):
        return f"snatgw rules failed: {check['error']}"
    return (f"snatgw rules (last round, {INSTANCE_BACKEND}): {check['rules_attached']} rules of the "
            f"bench group; the allow rule admitted {check['allow_hits']:,} flows, the deny rules "
            f"{check['deny_hits']:,}")


def parse_cpuinfo(text: str) -> str:
    """The first ``model name`` of /proc/cpuinfo ("unknown" if none)."""
    for line in text.splitlines():
        key, _, val = line.partition(":")
        if key.strip() == "model name" and val.strip():
            return val.strip()
    return "unknown"


def cpu_accounting(kernel_config: str) -> str:
    """How the kernel charges CPU time, from its config: with tick sampling and no
    IRQ_TIME_ACCOUNTING, softirq work is charged to whichever task was on the CPU."""
    if not kernel_config:
        return "unknown (no /proc/config.gz)"
    if "CONFIG_IRQ_TIME_ACCOUNTING=y" in kernel_config:
        return "irq time accounted apart (CONFIG_IRQ_TIME_ACCOUNTING)"
    return "tick-sampled; softirq work is charged to the task it interrupts"


def parse_kb(text: str, field: str) -> int | None:
    """``FIELD:   1234 kB`` from /proc/PID/status or /proc/meminfo, in KiB."""
    for line in text.splitlines():
        if line.startswith(field + ":"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return int(parts[1])
    return None


def parse_cpu_split(stat: str) -> tuple[int, int]:
    """(utime, stime) in clock ticks from /proc/PID/stat; the process name may hold spaces."""
    fields = stat.rsplit(")", 1)[1].split()
    # After the name: state is field 3 of proc(5), utime 14 and stime 15.
    return int(fields[11]), int(fields[12])


def parse_cpu_ticks(stat: str) -> int:
    """utime + stime (clock ticks) from /proc/PID/stat."""
    return sum(parse_cpu_split(stat))


def parse_nfqueue(text: str) -> dict[str, int]:
    """/proc/net/netfilter/nfnetlink_queue summed over queues: waiting now, dropped because
    the queue or the socket was full, and packets handed to userspace (id sequence)."""
    tot = {"waiting": 0, "queue_dropped": 0, "user_dropped": 0, "queued_total": 0}
    for line in text.splitlines():
        f = line.split()
        if len(f) >= 8 and all(x.isdigit() for x in f[:8]):
            tot["waiting"] += int(f[2])
            tot["queue_dropped"] += int(f[5])
            tot["user_dropped"] += int(f[6])
            tot["queued_total"] += int(f[7])
    return tot


def parse_slab_objsize(text: str, name: str) -> int | None:
    """Object size in bytes of slab cache ``name`` in /proc/slabinfo."""
    for line in text.splitlines():
        f = line.split()
        if len(f) >= 4 and f[0] == name and f[3].isdigit():
            return int(f[3])
    return None


#: Counter name prefixes that count packets (each packet bumps exactly one of them).
PACKET_COUNTERS = ("in2out_translated", "out2in_translated", "icmp_error_", "drop_", "hairpin_")


def packets_handled(before: dict[str, int], after: dict[str, int]) -> int:
    """Packets the gateway handled between two counter snapshots: translated, ICMP errors
    translated, hairpinned and dropped (flow counters are not packets)."""
    return sum(after.get(k, 0) - before.get(k, 0) for k in after if k.startswith(PACKET_COUNTERS))


def per_unit_us(cpu_s: float, units: int) -> float | None:
    """CPU microseconds per unit (None when nothing was handled)."""
    return cpu_s * 1e6 / units if units > 0 else None


def best(values: Sequence[float | None], higher: bool) -> float | None:
    """The best measured value of the rounds (None ones failed); None if none was measured."""
    got = [v for v in values if v is not None]
    if not got:
        return None
    return max(got) if higher else min(got)


def round_ratios(values: Sequence[float | None], bases: Sequence[float | None]) -> list[float]:
    """value / base of each round where both were measured (same round, same machine state)."""
    return [v / b for v, b in zip(values, bases, strict=False) if v is not None and b]


@dataclass(frozen=True, slots=True)
class Goal:
    """A goal of issue 11 or 10: ``kind`` is ratio_ge, ratio_le, added_le or value_le."""

    kind: str
    limit: float

    def text(self, unit: str) -> str:
        return {
            "ratio_ge": f">= {self.limit:.2f}x",
            "ratio_le": f"<= {self.limit:g}x",
            "added_le": f"+{self.limit:g} {unit} at most",
            "value_le": f"<= {self.limit:g} {unit}",
        }[self.kind]

    def met(self, base: float | None, value: float | None) -> bool | None:
        """None when it cannot be judged (a figure is missing)."""
        if value is None:
            return None
        if self.kind == "value_le":
            return value <= self.limit
        if base is None or not base:
            return None
        if self.kind == "ratio_ge":
            return value / base >= self.limit
        if self.kind == "ratio_le":
            return value / base <= self.limit
        return value - base <= self.limit


@dataclass(frozen=True, slots=True)
class Metric:
    """One row: which figure of a load, its unit, which way is better, its goal."""

    key: str
    label: str
    unit: str
    higher: bool
    goal: Goal | None = None
    #: A figure only snatgw has (its CPU): no kernel column.
    gateway_only: bool = False


METRICS = {
    "udp_pps": Metric("udp_pps", "UDP 64 B delivered", "pkt/s", True, Goal("ratio_ge", 0.60)),
    "tcp_mbit": Metric("tcp_mbit", "TCP bulk (receiver)", "Mbit/s", True, Goal("ratio_ge", 0.60)),
    "cps": Metric("cps", "TCP connections", "conn/s", True),
    "rtt_p50_us": Metric("rtt_p50_us", "UDP round trip p50", "us", False, Goal("added_le", 50)),
    "rtt_p99_us": Metric("rtt_p99_us", "UDP round trip p99", "us", False, Goal("ratio_le", 2.0)),
    "cpu_us_per_udp_pkt": Metric("cpu_us_per_udp_pkt", "gateway CPU per UDP packet", "us", False,
                                 Goal("value_le", 3.0), gateway_only=True),
    "cpu_us_per_tcp_pkt": Metric("cpu_us_per_tcp_pkt", "gateway CPU per TCP bulk packet (GSO)",
                                 "us", False, gateway_only=True),
    "cpu_us_per_conn": Metric("cpu_us_per_conn", "gateway CPU per connection", "us", False,
                              gateway_only=True),
}
#: The rows of a setup's section, in order.
SETUP_ROWS = ("udp_pps", "tcp_mbit", "cps", "rtt_p50_us", "rtt_p99_us", "cpu_us_per_udp_pkt",
              "cpu_us_per_tcp_pkt", "cpu_us_per_conn")

#: Samples: phase -> setup -> metric -> one value per round (None: not measured that round).
Samples = dict[str, dict[str, dict[str, list[float | None]]]]


def metrics_of(load: str, r: dict[str, Any]) -> dict[str, float | None]:
    """The table's figures from one load's raw result."""
    gw = r.get("gateway") or {}
    if load == "udp_pps":
        return {"udp_pps": r.get("delivered_pps"), "udp_sent_pps": r.get("sent_pps"),
                "cpu_us_per_udp_pkt": gw.get("cpu_us_per_packet"),
                "user_us_per_udp_pkt": gw.get("user_us_per_packet"),
                "system_us_per_udp_pkt": gw.get("system_us_per_packet")}
    if load == "tcp_bulk":
        return {"tcp_mbit": r.get("receiver_mbit_s"), "cpu_us_per_tcp_pkt": gw.get("cpu_us_per_packet")}
    if load == "tcp_cps":
        conns = int(r.get("completed") or 0)
        cpu = gw.get("cpu_s")
        return {"cps": r.get("conn_per_s"),
                "cpu_us_per_conn": per_unit_us(cpu, conns) if cpu is not None else None}
    if load == "udp_rtt":
        return {"rtt_p50_us": r.get("p50_us"), "rtt_p99_us": r.get("p99_us")}
    return {}


def add_sample(samples: Samples, phase: str, setup: str, round_no: int, figures: dict[str, float | None],
               rounds: int) -> None:
    """Record round ``round_no``'s figures (0-based) of one phase and setup."""
    per = samples.setdefault(phase, {}).setdefault(setup, {})
    for key, val in figures.items():
        per.setdefault(key, [None] * rounds)[round_no] = None if val is None else float(val)


def row(metric: Metric, base_vals: Sequence[float | None], vals: Sequence[float | None],
        goal: Goal | None = None) -> dict[str, Any]:
    """One table row: best of the rounds each side, their ratio, the per-round ratio spread."""
    goal = goal if goal is not None else metric.goal
    b = None if metric.gateway_only else best(base_vals, metric.higher)
    v = best(vals, metric.higher)
    ratios = [] if metric.gateway_only else round_ratios(vals, base_vals)
    met = goal.met(b, v) if goal is not None else None
    return {
        "metric": metric.label, "key": metric.key, "unit": metric.unit,
        "higher_is_better": metric.higher, "base": b, "value": v,
        "ratio": v / b if v is not None and b else None,
        "ratio_min": min(ratios) if ratios else None, "ratio_max": max(ratios) if ratios else None,
        "rounds_base": list(base_vals), "rounds_value": list(vals),
        "goal": goal.text(metric.unit) if goal is not None else "", "met": met,
    }


def build_summary(samples: Samples, settings: dict[str, Any],
                  rss: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The report's sections (each a small table) from the rounds' samples."""
    rounds = int(settings["rounds"])
    empty: list[float | None] = [None] * rounds

    def vals(phase: str, setup: str, key: str) -> list[float | None]:
        return samples.get(phase, {}).get(setup, {}).get(key, empty)

    sections: list[dict[str, Any]] = []
    for name in ("default", "instance"):
        rows = []
        for key in SETUP_ROWS:
            m = METRICS[key]
            goal = m.goal
            if key == "cps":
                goal = Goal("ratio_ge", 0.90) if name == "instance" else None
            rows.append(row(m, vals("kernel", name, key), vals("snatgw", name, key), goal))
        notes = [udp_note(vals("kernel", name, "udp_pps"), vals("kernel", name, "udp_sent_pps"),
                          vals("snatgw", name, "udp_pps"), vals("snatgw", name, "udp_sent_pps"))]
        if name == "default":
            notes.append(port_block_note(settings))
            idle = settings.get("idle_cpu_pct")
            if idle is not None:
                notes.append(f"gateway CPU rows: whole snatgw process, all threads, kernel time in its "
                             f"syscalls included (a verdict carries the packet on through the "
                             f"kernel's forwarding), until its queue is empty; idle it used up "
                             f"to {idle:g}% of a core, not subtracted")
        sections.append({"name": name, "title": SETUPS[name].title,
                         "columns": ("kernel NAT", "snatgw"), "rows": rows, "notes": notes})
    sections.append({
        "name": "tuned",
        "title": f"Tuned, not the default: tcp_fin_linger {TUNED_LINGER:g} s, pool member "
                 "(the connection row the bench printed before it had the default one)",
        "columns": ("kernel NAT", "snatgw"),
        "rows": [row(METRICS["cps"], vals("kernel", "default", "cps"), vals("tuned", "default", "cps")),
                 row(METRICS["cpu_us_per_conn"], empty, vals("tuned", "default", "cpu_us_per_conn"))],
        "notes": [],
    })
    ten = Goal("ratio_ge", 0.90)
    sections.append({
        "name": "rules",
        "title": f"{RULE_COUNT} security rules attached (instance IP; {RULE_COUNT} outbound rules "
                 "that do not match, then the allow rule), against the same rounds' instance-IP "
                 "snatgw row without rules",
        "columns": ("no rules", f"{RULE_COUNT} rules"),
        "rows": [row(METRICS["udp_pps"], vals("snatgw", "instance", "udp_pps"),
                     vals("rules", "instance", "udp_pps"), ten),
                 row(METRICS["cps"], vals("snatgw", "instance", "cps"),
                     vals("rules", "instance", "cps"), ten)],
        "notes": [rules_note(settings.get("rules_check"))],
    })
    if rss is not None:
        sections.append(rss_section(rss))
        loaded = rss.get("loaded")
        if loaded:
            flat = Goal("ratio_ge", 0.90)
            rows = [row(METRICS["udp_pps"], vals("snatgw", "instance", "udp_pps"),
                        [loaded.get("udp_pps")], flat),
                    row(METRICS["cpu_us_per_udp_pkt"], empty, [loaded.get("cpu_us_per_udp_pkt")])]
            cpu_base = best(vals("snatgw", "instance", "cpu_us_per_udp_pkt"), False)
            rows[1]["base"] = cpu_base
            for r in rows:
                r["ratio_min"] = r["ratio_max"] = None
            if cpu_base and rows[1]["value"] is not None:
                rows[1]["ratio"] = rows[1]["value"] / cpu_base
            sections.append({
                "name": "table_size",
                "title": f"Per-packet cost and table size: UDP through the instance IP with "
                         f"{loaded['flows']:,} idle flows in the table (after the memory phase), "
                         "against the rounds' instance-IP row (a near-empty table)",
                "columns": ("few flows", f"{loaded['flows']:,} flows"), "rows": rows, "notes": [],
            })
    return sections


def process_split(per: dict[str, list[float | None]]) -> dict[str, float | None]:
    """The whole process's CPU per UDP packet in its best round, and that round's user and
    system (kernel) parts."""
    cpu = per.get("cpu_us_per_udp_pkt", [])
    rounds = [i for i, v in enumerate(cpu) if v is not None]
    if not rounds:
        return {"process_us_per_udp_pkt": None}
    i = min(rounds, key=lambda j: cpu[j] or 0.0)

    def at(key: str) -> float | None:
        vals = per.get(key, [])
        return vals[i] if i < len(vals) else None

    return {"process_us_per_udp_pkt": cpu[i], "process_user_us_per_udp_pkt": at("user_us_per_udp_pkt"),
            "process_system_us_per_udp_pkt": at("system_us_per_udp_pkt")}


def udp_note(k_got: Sequence[float | None], k_sent: Sequence[float | None],
             g_got: Sequence[float | None], g_sent: Sequence[float | None]) -> str:
    """Whether the UDP row measured the NAT or the sender: what arrived of what was sent,
    in each side's best round."""
    def share(got: Sequence[float | None], sent: Sequence[float | None]) -> float | None:
        pairs = [(a, b) for a, b in zip(got, sent, strict=False) if a is not None and b]
        if not pairs:
            return None
        a, b = max(pairs)
        return a / b

    k, g = share(k_got, k_sent), share(g_got, g_sent)
    if k is None or g is None:
        return "UDP: not measured on both sides"
    text = f"UDP: of what the iperf3 sender sent, kernel NAT delivered {k:.0%} and snatgw {g:.0%}"
    if k >= 0.97:
        text += (" (the kernel row is sender-bound: kernel NAT forwards more than one sender "
                 "makes on this machine, so its ratio understates the gap")
        text += ")" if g >= 0.97 else "; snatgw's missing packets were dropped at its full queue)"
    return text


def port_block_note(settings: dict[str, Any]) -> str:
    block = settings.get("block_size")
    linger = DEFAULT_LINGER
    if not block:
        return ("TCP connections (default): the pool member's port block and tcp_fin_linger "
                "bound the sustained rate (block size not read)")
    return (f"TCP connections (default): {block} ports to one destination / {linger:g} s "
            f"tcp_fin_linger = {block / linger:,.0f} conn/s sustained; a {settings['duration_s']:g} s "
            "load also gets the first block's worth at full speed, then drop_exhausted")


def rss_section(rss: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for cp in rss.get("checkpoints", []):
        per = cp.get("bytes_per_flow")
        rows.append({
            "metric": f"RSS per flow at {cp['flows']:,} flows", "key": f"rss_{cp['target']}",
            "unit": "B", "higher_is_better": False, "base": rss.get("conntrack_objsize"),
            "value": per, "ratio": per / rss["conntrack_objsize"]
            if per is not None and rss.get("conntrack_objsize") else None,
            "ratio_min": None, "ratio_max": None, "rounds_base": [], "rounds_value": [],
            "goal": "<= 300 B at 1M" if cp["flows"] >= 990_000 else "",
            "met": (per <= 300) if per is not None and cp["flows"] >= 990_000 else None,
        })
    notes = list(rss.get("notes", []))
    return {"name": "memory",
            "title": "Memory: idle UDP flows through the instance IP; kernel column: one conntrack "
                     "entry (slab object size, /proc/slabinfo, hash bucket not included)",
            "columns": ("kernel entry", "snatgw"), "rows": rows, "notes": notes}


def short_name(key: tuple[str, int, str]) -> str:
    """A pstats key (file, line, function) as ``module.function`` or ``Type.method``."""
    path, _line, name = key
    if path != "~":
        return f"{Path(path).stem}.{name}"
    m = re.fullmatch(r"<method '(\w+)' of '(?:[\w.]*\.)?(\w+)' objects>", name)
    if m:
        return f"{m[2]}.{m[1]}"
    m = re.fullmatch(r"<built-in method (\S+)>", name)
    return m[1] if m else name


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:,.1f}" if abs(v) >= 10 else f"{v:,.2f}"


def fmt_ratio(r: dict[str, Any]) -> str:
    if r["ratio"] is None:
        return "-"
    # Three significant figures, so that 0.598 against a 0.60 goal does not print as 0.60.
    text = f"{r['ratio']:.3g}x"
    if r["ratio_min"] is not None and r["ratio_max"] is not None and r["ratio_max"] != r["ratio_min"]:
        text += f" ({r['ratio_min']:.3g}-{r['ratio_max']:.3g})"
    return text


def fmt_goal(r: dict[str, Any]) -> str:
    if not r["goal"]:
        return ""
    mark = {True: "met", False: "MISSED", None: "?"}[r["met"]]
    return f"{r['goal']}: {mark}"


def format_table(head: Sequence[str], lines: Sequence[Sequence[str]], right: Sequence[bool]) -> str:
    """Columns padded to their widest cell, ``right``-aligned where asked, a rule under the head."""
    allrows = [list(head), *[list(x) for x in lines]]
    widths = [max(len(x[i]) for x in allrows) for i in range(len(head))]

    def one(cells: Sequence[str]) -> str:
        return " | ".join(c.rjust(w) if rt else c.ljust(w)
                          for c, w, rt in zip(cells, widths, right, strict=True)).rstrip()

    out = [one(head), "-+-".join("-" * w for w in widths)]
    out += [one(x) for x in allrows[1:]]
    return "\n".join(out)


def render_machine(machine: dict[str, Any], settings: dict[str, Any]) -> str:
    rounds = settings["rounds"]
    mode = " (--quick: a smoke run, not a measurement)" if settings.get("quick") else ""
    return (f"snatgw bench {machine['date']}: {machine['cores']} cores, {machine['cpu_model']}, "
            f"kernel {machine['kernel']}, Python {machine['python']}, "
            f"{machine['mem_total_mb']:,} MB RAM; CPU time accounting: "
            f"{machine.get('cpu_accounting', 'unknown')}\n"
            f"{rounds} round(s) of kernel, snatgw, rules, tuned (interleaved, a fresh lab each), "
            f"{settings['duration_s']:g} s per load, best of the rounds; ratio = snatgw/kernel "
            f"of the bests (spread of the per-round ratios){mode}")


def render_section(sec: dict[str, Any], machine: str = "") -> str:
    """One section's table; ``machine`` is printed under a table with a ratio column,
    because a ratio to kernel NAT holds for the machine it was measured on only."""
    base, val = sec["columns"]
    head = ("metric", "unit", base, val, "ratio (rounds)", "goal")
    lines = [(r["metric"], r["unit"], fmt(r["base"]), fmt(r["value"]), fmt_ratio(r), fmt_goal(r))
             for r in sec["rows"]]
    text = sec["title"] + "\n" + format_table(head, lines, (False, False, True, True, False, False))
    if machine and any(r.get("ratio") is not None for r in sec["rows"]):
        text += f"\n  ({machine})"
    for n in sec.get("notes", []):
        text += f"\n  note: {n}"
    return text


def render_spy(spy: dict[str, Any] | None) -> str:
    """py-spy's top functions by self time of one worker under the UDP load."""
    if not spy:
        return "Where one worker's time goes (py-spy): not measured"
    if spy.get("error"):
        return f"Where one worker's time goes (py-spy): failed: {spy['error']}"
    g = spy.get("gateway") or {}
    head = (f"Where one worker's Python time goes under the UDP 64 B load (workers = 1, py-spy "
            f"{spy.get('rate_hz', '?')} Hz, {spy.get('samples', 0):,} samples holding the GIL, self "
            "time; the kernel's share, syscalls and the forwarding they carry, is the system figure)")
    if g.get("cpu_us_per_packet") is not None:
        head += (f"; that run: {g['cpu_us_per_packet']:.2f} us CPU per packet (user "
                 f"{g['user_us_per_packet']:.2f}, system {g['system_us_per_packet']:.2f})")
    lines = [head + ":"]
    for t in spy.get("top", [])[:10]:
        lines.append(f"  {t['share']:6.1%}  {t['function']}")
    return "\n".join(lines)


def render_profile(profile: dict[str, Any] | None) -> str:
    """Where the time goes per UDP packet, saying how each figure was measured."""
    if not profile:
        return "Where the time goes: not measured"
    if profile.get("error"):
        return f"Where the time goes: profile failed: {profile['error']}"
    lines = ["Where the time goes per packet (core: this process, time.perf_counter over "
             f"{profile['iterations']:,} prebuilt packets, best of {profile['repeats']}, the "
             "buffer copy subtracted):"]
    for key, label in (("in2out_udp_us", "core in2out, UDP, existing flow"),
                       ("out2in_udp_us", "core out2in, UDP, existing flow"),
                       ("new_flow_pool_us", "core in2out, new UDP flow, pool member (PAT, first 1000)"),
                       ("new_flow_instance_us", "core in2out, new UDP flow, instance IP"),
                       ("new_flow_rules_us", f"core in2out, new UDP flow, instance IP, {RULE_COUNT} rules"),
                       ("policy_eval_us", f"security policy lookup alone, {RULE_COUNT} rules")):
        v = profile.get(key)
        if isinstance(v, int | float):
            lines.append(f"  {label:62} {v:6.2f} us")
        elif isinstance(v, str):
            lines.append(f"  {label:62} n/a ({v})")
    whole = profile.get("process_us_per_udp_pkt")
    core = profile.get("in2out_udp_us")
    if isinstance(whole, int | float) and isinstance(core, int | float):
        rest = whole - core
        lines.append(f"  {'whole snatgw process per UDP packet (measured, default row)':62} "
                     f"{whole:6.2f} us  (utime+stime / packets counted)")
        user = profile.get("process_user_us_per_udp_pkt")
        system = profile.get("process_system_us_per_udp_pkt")
        if isinstance(user, int | float) and isinstance(system, int | float):
            lines.append(f"  {'  of which in user space (utime: Python, the core included)':62} "
                         f"{user:6.2f} us")
            lines.append(f"  {'  of which in the kernel (stime: syscalls, forwarding, softirq)':62} "
                         f"{system:6.2f} us")
        lines.append(f"  -> core {core / whole:.0%}; the other {rest:.2f} us ({rest / whole:.0%}) are "
                     "the queue client (receive, parse, verdict), syscalls and the kernel work "
                     "charged to the process")
    top = profile.get("cprofile_top") or []
    if top:
        lines.append("  cProfile of the core on the same packets (its overhead inflates small "
                     "calls; shares are indicative): "
                     + ", ".join(f"{t['function']} {t['share']:.0%}" for t in top))
    return "\n".join(lines)


def render_report(doc: dict[str, Any]) -> str:
    """The whole text report from the JSON document (so the JSON alone can re-print it)."""
    machine = doc["machine"]
    on = f"machine: {machine['cores']} cores, {machine['cpu_model']}, kernel {machine['kernel']}"
    parts = [render_machine(machine, doc["settings"])]
    parts += [render_section(s, on) for s in doc["summary"]]
    workers = doc.get("workers") or {}
    parts.append(bench_workers.render_curve(workers if workers.get("rows") or workers.get("error") else None,
                              machine["cores"]))
    parts.append(render_profile(doc.get("profile")))
    parts.append(render_spy(doc.get("worker_profile")))
    errs = doc.get("errors") or []
    if errs:
        parts.append("Errors:\n" + "\n".join(f"  {e}" for e in errs))
    return "\n\n".join(parts)


# =========================================================================== the system


def machine_info() -> dict[str, Any]:
    def read(p: str) -> str:
        try:
            return Path(p).read_text()
        except OSError:
            return ""

    config = ""
    with contextlib.suppress(OSError, EOFError, zlib.error):
        config = gzip.decompress(Path("/proc/config.gz").read_bytes()).decode(errors="replace")
    return {
        "cpu_accounting": cpu_accounting(config),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cores": os.cpu_count(),
        "cpu_model": parse_cpuinfo(read("/proc/cpuinfo")),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "mem_total_mb": (parse_kb(read("/proc/meminfo"), "MemTotal") or 0) // 1024,
    }


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of ``pid`` so far, in seconds."""
    return sum(cpu_split(pid))


def cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) so far, in seconds, of every thread of ``pid`` and of its descendants
    (with ``workers`` > 1 snatgw is a supervisor and one process per worker)."""
    u = k = 0
    for p in bench_workers.process_tree(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            pu, pk = parse_cpu_split(Path(f"/proc/{p}/stat").read_text())
            u, k = u + pu, k + pk
    hz = os.sysconf("SC_CLK_TCK")
    return u / hz, k / hz


def rss_kb(pid: int) -> int:
    """VmRSS of ``pid`` and its descendants (the workers), summed, in KiB."""
    total = 0
    for p in bench_workers.process_tree(pid):
        with contextlib.suppress(OSError):
            total += parse_kb(Path(f"/proc/{p}/status").read_text(), "VmRSS") or 0
    if not total:
        raise BenchError(f"no VmRSS for pid {pid}")
    return total


def mem_available_kb() -> int:
    return parse_kb(Path("/proc/meminfo").read_text(), "MemAvailable") or 0


def nfqueue(pid: int) -> dict[str, int]:
    """The queue counters of ``pid``'s network namespace (read through /proc/PID/net)."""
    try:
        return parse_nfqueue(Path(f"/proc/{pid}/net/netfilter/nfnetlink_queue").read_text())
    except OSError:
        return parse_nfqueue("")


def stats(gw: GatewayProc) -> dict[str, Any]:
    """``snatgw stats`` over the control socket (a unix path: no namespace hop needed)."""
    try:
        result: dict[str, Any] = request(gw.socket, "stats", timeout=60.0)
    except (OSError, RequestError, ValueError) as exc:
        raise BenchError(f"stats from the gateway failed: {exc}") from exc
    return result


def start(ns: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[bytes]:
    return PROCS.start(ns, argv, **kw)


# --------------------------------------------------------------------------- loads


def measure_tcp_bulk(lab: LabNames, src: str, duration: float) -> dict[str, Any]:
    res = ns_run(lab.be, iperf3_client(SERVER, src, IPERF_PORTS[0], duration),
                 check=False, timeout=duration + 25)
    doc = iperf3_json(res.stdout, "tcp bulk")
    end = doc["end"]
    return {
        "receiver_mbit_s": end["sum_received"]["bits_per_second"] / 1e6,
        "sender_mbit_s": end["sum_sent"]["bits_per_second"] / 1e6,
        "retransmits": end["sum_sent"].get("retransmits"),
        "seconds": end["sum_received"]["seconds"],
    }


def measure_udp_pps(lab: LabNames, src: str, duration: float, streams: int) -> dict[str, Any]:
    """``streams`` iperf3 64-byte senders in parallel (separate processes)."""
    procs = [start(lab.be, iperf3_client(SERVER, src, port, duration, udp_length=64),
                   stdout=subprocess.PIPE) for port in IPERF_PORTS[:streams]]
    outs = []
    try:
        for p in procs:
            try:
                out, _ = p.communicate(timeout=duration + 30)
            except subprocess.TimeoutExpired as exc:
                raise BenchError("udp pps: iperf3 client did not finish") from exc
            outs.append(out)
    finally:
        for p in procs:
            PROCS.stop(p)
    received = sent = lost = 0
    seconds = 0.0
    for out in outs:
        doc = iperf3_json(out, "udp pps")
        sent += int(doc["end"]["sum"]["packets"])
        srv = doc.get("server_output_json")
        if not srv:
            raise BenchError("udp pps: no server output in iperf3 JSON (--get-server-output)")
        ssum = srv["end"]["sum"]
        received += int(ssum["packets"]) - int(ssum["lost_packets"])
        lost += int(ssum["lost_packets"])
        seconds = max(seconds, float(ssum["seconds"]), float(doc["end"]["sum"]["seconds"]))
    seconds = seconds or duration
    return {"delivered_pps": received / seconds, "sent_pps": sent / seconds,
            "received_packets": received, "sent_packets": sent, "lost_packets": lost,
            "seconds": seconds, "streams": streams}


def measure_cps(lab: LabNames, src: str, duration: float, clients: int) -> dict[str, Any]:
    argv = [sys.executable, str(HELPER), "cps-client", "--src", src, "--dst", SERVER,
            "--port", str(ACCEPT_PORT), "--duration", str(duration)]
    procs = [start(lab.be, argv, stdout=subprocess.PIPE) for _ in range(clients)]
    results = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=duration + 20)
            if p.returncode != 0:
                raise BenchError(f"cps client failed (rc {p.returncode})")
            results.append(json.loads(out))
    finally:
        for p in procs:
            PROCS.stop(p)
    completed = sum(r["completed"] for r in results)
    elapsed = max(r["elapsed"] for r in results)
    errors = [r["first_error"] for r in results if r["first_error"]]
    return {"conn_per_s": completed / elapsed, "completed": completed,
            "failed": sum(r["failed"] for r in results), "elapsed": elapsed, "clients": clients,
            "first_error": errors[0] if errors else ""}


def measure_rtt(lab: LabNames, src: str, count: int) -> dict[str, Any]:
    argv = [sys.executable, str(HELPER), "rtt-client", "--src", src, "--dst", SERVER,
            "--port", str(ECHO_PORT), "--count", str(count)]
    res = ns_run(lab.be, argv, check=False, timeout=40)
    if res.returncode != 0:
        raise BenchError(f"rtt client failed: {res.stderr.decode(errors='replace')[-500:]}")
    doc: dict[str, Any] = json.loads(res.stdout)
    if not doc["samples"]:
        raise BenchError(f"rtt: no reply at all ({doc['lost']} lost)")
    return doc


def run_load(load: str, lab: LabNames, src: str, args: argparse.Namespace) -> dict[str, Any]:
    """One load from backend ``src``, bounded by ``args``."""
    if load == "udp_pps":
        return measure_udp_pps(lab, src, args.duration, args.udp_streams)
    if load == "tcp_bulk":
        return measure_tcp_bulk(lab, src, args.duration)
    if load == "udp_rtt":
        return measure_rtt(lab, src, args.rtt_count)
    if load == "tcp_cps":
        return measure_cps(lab, src, args.duration, args.cps_clients)
    raise BenchError(f"unknown load {load}")


def measured(gw: GatewayProc | None, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one load; with snatgw, also its CPU time and the packets its counters saw."""
    if gw is None:
        return fn()
    c0 = stats(gw)["counters"]
    q0 = nfqueue(gw.pid)
    u0, k0 = cpu_split(gw.pid)
    r = fn()
    # The window ends once the gateway has handled what is still queued, so that its CPU
    # time and its counters cover the same packets.
    deadline = time.monotonic() + 5.0
    while nfqueue(gw.pid)["waiting"] and time.monotonic() < deadline:
        time.sleep(0.005)
    u1, k1 = cpu_split(gw.pid)
    q1 = nfqueue(gw.pid)
    c1 = stats(gw)["counters"]
    pkts = packets_handled(c0, c1)
    r["gateway"] = {
        "cpu_s": round(u1 - u0 + k1 - k0, 3),
        "packets": pkts,
        "cpu_us_per_packet": per_unit_us(u1 - u0 + k1 - k0, pkts),
        "user_us_per_packet": per_unit_us(u1 - u0, pkts),
        "system_us_per_packet": per_unit_us(k1 - k0, pkts),
        "flows_created": c1.get("flows_created", 0) - c0.get("flows_created", 0),
        "drop_exhausted": c1.get("drop_exhausted", 0) - c0.get("drop_exhausted", 0),
        "drop_security_denied": c1.get("drop_security_denied", 0) - c0.get("drop_security_denied", 0),
        "nfqueue": {k: q1[k] - q0[k] for k in ("queue_dropped", "user_dropped", "queued_total")},
    }
    return r


def summary_line(load: str, r: dict[str, Any]) -> str:
    gw = r.get("gateway")
    extra = ""
    if gw:
        cpu = gw["cpu_us_per_packet"]
        extra = (f"; gateway {gw['cpu_s']:.2f} s CPU for {gw['packets']:,} pkts"
                 + (f" = {cpu:.2f} us/pkt" if cpu is not None else "")
                 + f", queue full {gw['nfqueue']['queue_dropped']:,}")
    if load == "tcp_bulk":
        return f"{r['receiver_mbit_s']:,.0f} Mbit/s (retransmits {r['retransmits']}){extra}"
    if load == "udp_pps":
        return f"{r['delivered_pps']:,.0f} pkt/s delivered of {r['sent_pps']:,.0f} sent{extra}"
    if load == "tcp_cps":
        return f"{r['conn_per_s']:,.0f} conn/s ({r['completed']} ok, {r['failed']} failed){extra}"
    if load == "udp_rtt":
        return f"p50 {r['p50_us']:.0f} us, p99 {r['p99_us']:.0f} us ({r['lost']} lost){extra}"
    return ""


# --------------------------------------------------------------------------- phases


def start_servers(lab: LabNames, udp_streams: int) -> None:
    ports = IPERF_PORTS[:max(1, udp_streams)]
    for port in ports:
        start(lab.inet, iperf3_server(SERVER, port))
    start(lab.inet, [sys.executable, str(HELPER), "accept-server", "--bind", SERVER,
                     "--port", str(ACCEPT_PORT)])
    start(lab.inet, [sys.executable, str(HELPER), "echo-server", "--bind", SERVER,
                     "--port", str(ECHO_PORT)])
    wait_listening(lab.inet, [*ports, ACCEPT_PORT], "tcp")
    wait_listening(lab.inet, [ECHO_PORT], "udp")


def prepare_backends(lab: LabNames) -> None:
    # Room for the connect/close clients' TIME_WAIT ports (they close first), and let
    # connect() reuse a TIME_WAIT port (timestamps protect it) instead of running out.
    ns_run(lab.be, ["sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=10000 65000",
                    "net.ipv4.tcp_tw_reuse=1"])


def phase_config(phase: str, args: argparse.Namespace) -> str:
    if phase == "rules":
        return gateway_config(rules=RULE_COUNT, queue=args.queue)
    if phase == "tuned":
        return gateway_config(fin_linger=TUNED_LINGER, queue=args.queue)
    return gateway_config(queue=args.queue)


def stop_gateway(gw: GatewayProc, result: dict[str, Any], phase: str) -> None:
    """Stop snatgw (SIGTERM) and keep its exit status, final counters and warnings."""
    rc = gw.stop(timeout=15.0)
    stopped = gw.event("gateway_stopped")
    result["gateway_rc"] = rc
    result["counters_at_stop"] = (stopped or {}).get("counters")
    warnings: dict[str, int] = {}
    for rec in gw.records():
        if rec.get("level") in ("warning", "error"):
            name = str(rec.get("event"))
            warnings[name] = warnings.get(name, 0) + 1
    result["gateway_warnings"] = warnings
    if rc != 0 or stopped is None:
        result["errors"].append(f"{phase}: snatgw exited {rc}, gateway_stopped "
                                f"{'seen' if stopped else 'not seen'}")
        tail = "\n".join(gw.log_text().splitlines()[-10:])
        log(f"{phase}: snatgw exit {rc}; last log lines:\n{tail}")


def rules_check(gw: GatewayProc) -> dict[str, Any]:
    """What ``snatgw rules`` says of the instance backend after the rules phase: that the
    group is attached, and that its flows went past the deny rules to the allow rule."""
    try:
        rows = request(gw.socket, "rules", timeout=30.0, backend=INSTANCE_BACKEND)
    except (OSError, RequestError, ValueError) as exc:
        return {"error": str(exc)}
    return summarise_rules(rows)


def run_phase(phase: str, round_no: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """A fresh lab, ``phase`` set up in it, its loads for each of its setups, all removed."""
    setups, loads = PHASES[phase]
    result: dict[str, Any] = {"phase": phase, "round": round_no + 1, "errors": [], "loads": {}}
    lab = lab_up(args.prefix, whoami=False)
    launcher = GatewayLauncher(lab.gw, tmp, PROCS)
    gw: GatewayProc | None = None
    undo = contextlib.ExitStack()
    try:
        start_servers(lab, args.udp_streams)
        prepare_backends(lab)
        if phase == "kernel":
            undo.enter_context(kernel_nat(
                lab, ["-s", SETUPS["default"].backend, "-j", "SNAT", "--to-source", FRONTEND_IP],
                address=FRONTEND_IP))
            undo.enter_context(kernel_nat(
                lab, ["-s", SETUPS["instance"].backend, "-j", "SNAT", "--to-source", INSTANCE_PUBLIC],
                address=INSTANCE_PUBLIC))
        else:
            try:
                gw = launcher.start(phase_config(phase, args), ready_timeout=30.0)
            except LabError as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                result["errors"].append(f"{phase}: snatgw did not start: {first}")
                log(f"{phase}: snatgw did not start:\n{str(exc)[-1500:]}")
                return result
            c0 = cpu_seconds(gw.pid)
            time.sleep(1.0)
            result["idle_cpu_pct"] = round((cpu_seconds(gw.pid) - c0) * 100, 1)
            with contextlib.suppress(BenchError, RequestError, OSError):
                status = request(gw.socket, "status", timeout=30.0)
                blocks = [a.get("block_size") for a in status.get("addresses", [])
                          if a.get("public_ip") == FRONTEND_IP]
                result["block_size"] = blocks[0] if blocks else None
        for setup_name in setups:
            src = SETUPS[setup_name].backend
            for load in loads:
                if load not in args.only:
                    continue
                tag = f"round {round_no + 1} {phase}/{setup_name} {load}"
                try:
                    r = measured(gw, functools.partial(run_load, load, lab, src, args))
                except (LabError, subprocess.SubprocessError, ValueError, KeyError, OSError) as exc:
                    result["errors"].append(f"{tag}: {exc}")
                    log(f"{tag} FAILED: {exc}")
                    continue
                result["loads"].setdefault(setup_name, {})[load] = r
                log(f"{tag}: {summary_line(load, r)}")
                # The previous load's stragglers (late packets, closing connections) drain
                # before the next one is measured.
                time.sleep(0.3)
        if phase == "rules" and gw is not None:
            result["rules_check"] = rules_check(gw)
    finally:
        try:
            if gw is not None:
                stop_gateway(gw, result, phase)
            undo.close()
            with contextlib.suppress(Exception):
                launcher.close()
        finally:
            PROCS.stop_all()
            lab_down(args.prefix)
    return result


# --------------------------------------------------------------------------- memory


def run_rss(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Idle UDP flows through the instance IP, VmRSS of snatgw at each checkpoint."""
    targets = sorted(args.rss_flows)
    top = targets[-1]
    n_sports = FLOW_SPORTS[1] - FLOW_SPORTS[0] + 1
    n_dports = -(-top // n_sports)
    out: dict[str, Any] = {"checkpoints": [], "notes": [], "errors": [],
                           "method": f"one raw UDP packet per flow from {INSTANCE_BACKEND}, source ports "
                                     f"{FLOW_SPORTS[0]}-{FLOW_SPORTS[1]} x destination ports "
                                     f"{FLOW_DPORT_BASE}-{FLOW_DPORT_BASE + n_dports - 1} of {SERVER}, "
                                     f"bursts of {args.rss_burst} paced by the gateway's queue"}
    with contextlib.suppress(OSError):
        out["conntrack_objsize"] = parse_slab_objsize(Path("/proc/slabinfo").read_text(), "nf_conntrack")
    lab = lab_up(args.prefix, whoami=False)
    launcher = GatewayLauncher(lab.gw, tmp, PROCS)
    gw: GatewayProc | None = None
    try:
        # The flows' packets end in the internet namespace without an ICMP answer.
        start_servers(lab, args.udp_streams)
        ns_run(lab.inet, ["iptables", "-w", "-A", "INPUT", "-p", "udp", "--dport",
                          f"{FLOW_DPORT_BASE}:{FLOW_DPORT_BASE + n_dports - 1}", "-j", "DROP"])
        config = gateway_config(queue=args.queue, max_flows=max(2 * top, 262144), idle_timeout=3600,
                                queue_maxlen=max(4 * args.rss_burst, 4096))
        gw = launcher.start(config, ready_timeout=30.0)
        sender = start(lab.be, [sys.executable, str(HELPER), "flow-burst", "--src", INSTANCE_BACKEND,
                                "--dst", SERVER, "--sports", f"{FLOW_SPORTS[0]}-{FLOW_SPORTS[1]}",
                                "--dports", f"{FLOW_DPORT_BASE}-{FLOW_DPORT_BASE + n_dports - 1}"],
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert sender.stdin is not None and sender.stdout is not None
        if sender.stdout.readline().strip() != b"ready":
            raise BenchError("flow-burst helper did not start")
        time.sleep(0.5)
        base_flows = int(stats(gw)["flows_total"])
        base_rss = rss_kb(gw.pid)
        out["rss_kb_before"] = base_rss
        q_start = nfqueue(gw.pid)
        cpu_start = cpu_seconds(gw.pid)
        began = time.monotonic()
        sent = 0
        stop_reason = ""

        def drained(limit: int, timeout: float) -> bool:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if nfqueue(gw.pid)["waiting"] <= limit:
                    return True
                time.sleep(0.002)
            return False

        for target in targets:
            while sent < target and not stop_reason:
                if time.monotonic() - began > args.rss_seconds:
                    stop_reason = f"time budget of {args.rss_seconds:g} s used up"
                    break
                if mem_available_kb() < MEM_RESERVE_KB:
                    stop_reason = f"machine down to {mem_available_kb() // 1024:,} MB available"
                    break
                if not gw.alive():
                    stop_reason = "snatgw exited"
                    break
                if not drained(args.rss_burst // 2, 20.0):
                    stop_reason = "the gateway stopped draining its queue (20 s)"
                    break
                n = min(args.rss_burst, target - sent)
                sender.stdin.write(f"{n}\n".encode())
                sender.stdin.flush()
                line = sender.stdout.readline().decode().split()
                if len(line) != 2 or line[0] != "sent":
                    stop_reason = "flow-burst helper stopped"
                    break
                if int(line[1]) == sent:
                    stop_reason = "ran out of (source port, destination port) pairs"
                    break
                sent = int(line[1])
            drained(0, 30.0)
            time.sleep(0.5)
            st = stats(gw)
            flows = int(st["flows_total"]) - base_flows
            rss = rss_kb(gw.pid)
            q = nfqueue(gw.pid)
            cp = {"target": target, "sent": sent, "flows": flows, "rss_kb": rss,
                  "bytes_per_flow": (rss - base_rss) * 1024 / flows if flows > 0 else None,
                  "seconds": round(time.monotonic() - began, 1),
                  "queue_dropped": q["queue_dropped"] - q_start["queue_dropped"],
                  "gateway_cpu_us_per_flow": per_unit_us(cpu_seconds(gw.pid) - cpu_start, flows),
                  "drop_flow_limit": st["counters"].get("drop_flow_limit", 0)}
            out["checkpoints"].append(cp)
            per = cp["bytes_per_flow"]
            log(f"memory: {flows:,} flows live (of {sent:,} sent) after {cp['seconds']} s: VmRSS "
                f"{base_rss // 1024:,} -> {rss // 1024:,} MB"
                + (f" = {per:,.0f} B/flow" if per is not None else ""))
            if stop_reason:
                break
        if stop_reason:
            reached = out["checkpoints"][-1]["flows"] if out["checkpoints"] else 0
            out["notes"].append(f"{top:,} flows not reached: {stop_reason}; the largest reached is "
                                f"{reached:,} (row above)")
        elapsed = time.monotonic() - began
        out["flows_per_s"] = round(sent / elapsed) if elapsed > 0 else None
        cpu_flow = out["checkpoints"][-1]["gateway_cpu_us_per_flow"] if out["checkpoints"] else None
        out["notes"].append(f"{out['method']}; {out['flows_per_s']:,} new flows/s"
                            + (f", gateway CPU {cpu_flow:.0f} us per new flow" if cpu_flow else "")
                            + "; bytes per flow = (VmRSS now - VmRSS before the first flow) / live flows")
        with contextlib.suppress(Exception):
            PROCS.stop(sender)
        if "udp_pps" in args.only and out["checkpoints"] and gw.alive():
            r = measured(gw, functools.partial(run_load, "udp_pps", lab, INSTANCE_BACKEND, args))
            live = int(stats(gw)["flows_total"])
            log(f"memory: with {live:,} flows in the table: {summary_line('udp_pps', r)}")
            out["loaded"] = {"flows": live, "udp_pps": r["delivered_pps"],
                             "cpu_us_per_udp_pkt": r["gateway"]["cpu_us_per_packet"], "raw": r}
    finally:
        try:
            if gw is not None:
                stop_gateway(gw, out, "memory")
            with contextlib.suppress(Exception):
                launcher.close()
        finally:
            PROCS.stop_all()
            lab_down(args.prefix)
    return out


# --------------------------------------------------------------------------- profile


def _udp(src: str, dst: str, sport: int, dport: int) -> bytearray:
    sys.path.insert(0, str(HELPER.parent))
    import bench_helper

    return bytearray(bench_helper.udp_packet(src, dst, sport, dport, b"x" * 18))


def _model(rules: int) -> Any:
    """The bench's config as the gateway would load it, with the adapter's fill-ins."""
    from gateway.config import parse

    model = parse(gateway_config(rules=rules), "bench.toml").model
    inside = ipaddress.ip_network("10.10.0.0/16")
    fill: dict[str, Any] = {}
    if hasattr(model, "address_space") and not model.address_space:
        fill["address_space"] = ((int(inside.network_address), int(inside.broadcast_address)),)
    if hasattr(model, "probe_source") and not model.probe_source:
        fill["probe_source"] = int(ipaddress.IPv4Address(INSIDE_GW))
    return dataclasses.replace(model, **fill) if fill else model


def _time_loop(fn: Callable[[bytearray, float], object], tmpl: bytes, n: int, repeats: int) -> float:
    """Best per-call seconds of ``fn`` on a fresh copy of ``tmpl``, the copy's cost removed."""
    buf = bytearray(tmpl)
    best_s = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            buf[:] = tmpl
            fn(buf, 1000.0)
        t1 = time.perf_counter()
        for _ in range(n):
            buf[:] = tmpl
        t2 = time.perf_counter()
        best_s = min(best_s, ((t1 - t0) - (t2 - t1)) / n)
    return best_s


def _time_new_flows(model: Any, src: str, n: int, dports: int, repeats: int) -> float:
    """Best per-flow seconds of in2out on ``n`` packets that each open a new flow."""
    from gateway.core.table import TranslationTable

    pkts = [bytes(_udp(src, SERVER, 10000 + i // dports, 20000 + i % dports)) for i in range(n)]
    best_s = float("inf")
    for _ in range(repeats):
        table = TranslationTable(model, 1000.0)
        bufs = [bytearray(p) for p in pkts]
        f = table.in2out
        t0 = time.perf_counter()
        for b in bufs:
            f(b, 1000.0)
        best_s = min(best_s, (time.perf_counter() - t0) / n)
        if table.flow_count() != n:
            raise BenchError(f"profile: {table.flow_count()} flows from {n} new-flow packets")
    return best_s


def profile_core(iterations: int, repeats: int = 5) -> dict[str, Any]:
    """The core on prebuilt packets in this process (no lab): see :func:`render_profile`."""
    from gateway.core.table import TranslationTable
    from gateway.core.verdict import DROP

    out: dict[str, Any] = {"iterations": iterations, "repeats": repeats}
    model = _model(0)
    table = TranslationTable(model, 1000.0)
    be = SETUPS["default"].backend
    tmpl = bytes(_udp(be, SERVER, 40000, IPERF_PORTS[0]))
    first = bytearray(tmpl)
    if table.in2out(first, 1000.0) == DROP:
        raise BenchError("profile: the core dropped the bench's first UDP packet")
    public_port = int.from_bytes(first[20:22], "big")
    reply = bytes(_udp(SERVER, FRONTEND_IP, IPERF_PORTS[0], public_port))
    out["in2out_udp_us"] = _time_loop(table.in2out, tmpl, iterations, repeats) * 1e6
    out["out2in_udp_us"] = _time_loop(table.out2in, reply, iterations, repeats) * 1e6
    out["new_flow_pool_us"] = _time_new_flows(model, be, 1000, 1000, repeats) * 1e6
    n_new = max(1000, iterations // 5)
    out["new_flow_instance_us"] = _time_new_flows(model, INSTANCE_BACKEND, n_new, 16, repeats) * 1e6
    try:
        rmodel = _model(RULE_COUNT)
        out["new_flow_rules_us"] = _time_new_flows(rmodel, INSTANCE_BACKEND, n_new, 16, repeats) * 1e6
    except Exception as exc:  # the rules may not be supported by this build yet: say so
        out["new_flow_rules_us"] = f"{type(exc).__name__}: {str(exc)[:120]}"
        rmodel = None
    try:
        from gateway.core.security import SecurityPolicy

        policy = SecurityPolicy(rmodel if rmodel is not None else _model(RULE_COUNT))
        b, s = int(ipaddress.IPv4Address(INSTANCE_BACKEND)), int(ipaddress.IPv4Address(SERVER))
        t0 = time.perf_counter()
        for i in range(iterations):
            policy.outbound(b, 17, b, 10000 + (i & 1023), s, 5201)
        out["policy_eval_us"] = (time.perf_counter() - t0) / iterations * 1e6
    except Exception as exc:
        out["policy_eval_us"] = f"{type(exc).__name__}: {str(exc)[:120]}"
    # cProfile over the same existing-flow packets, both ways.
    prof = cProfile.Profile()
    buf, rbuf = bytearray(tmpl), bytearray(reply)
    n = min(iterations, 20000)
    prof.enable()
    for _ in range(n):
        buf[:] = tmpl
        table.in2out(buf, 1000.0)
        rbuf[:] = reply
        table.out2in(rbuf, 1000.0)
    prof.disable()
    st = pstats.Stats(prof)
    entries = getattr(st, "stats", {})
    total = sum(v[2] for v in entries.values()) or 1.0
    top = sorted(((v[2], short_name(k)) for k, v in entries.items()), reverse=True)[:6]
    out["cprofile_top"] = [{"function": name, "share": t / total} for t, name in top]
    return out


def run_worker_profile(args: argparse.Namespace) -> dict[str, Any]:
    """py-spy on a one-worker snatgw under the bench's UDP load (scripts/profile_worker.py):
    the top functions by self time, and that run's CPU per packet.  Not a measured row:
    the sampler shares the machine."""
    import profile_worker

    ns = argparse.Namespace(duration=max(4.0, args.duration + 1.0), setup="default", native=False,
                            spy=True, extra=["workers = 1"], perf="", gw_cmd=[], wrap="",
                            prefix=args.prefix)
    try:
        got = profile_worker.run(ns, sys.modules[__name__])
    except (LabError, OSError, subprocess.SubprocessError, RuntimeError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    spy = dict(got.get("profile") or {})
    spy["gateway"] = {k: v for k, v in got.get("gateway", {}).items() if k != "nfqueue"}
    spy["udp"] = got.get("udp")
    return spy


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 round, 1 s per load, 20k flows, short profile")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3)")
    p.add_argument("--duration", type=float, default=None, help="seconds per load (default 3, max 10)")
    p.add_argument("--phases", default=",".join((*ROUND_PHASES, "memory", "workers", "profile")),
                   help="comma list of kernel, snatgw, rules, tuned, memory, workers, profile")
    p.add_argument("--only", default="udp_pps,tcp_bulk,udp_rtt,tcp_cps", help="comma list of loads")
    p.add_argument("--prefix", default="bench", help="lab namespace prefix (default bench)")
    p.add_argument("--udp-streams", type=int, default=1, help="parallel iperf3 UDP senders")
    p.add_argument("--cps-clients", type=int, default=2, help="parallel connect/close clients")
    p.add_argument("--rtt-count", type=int, default=None, help="round trips per run (default 2000)")
    p.add_argument("--rss-flows", default=None,
                   help="comma list of flow counts to read VmRSS at (default 100000,1000000)")
    p.add_argument("--rss-seconds", type=float, default=None,
                   help="time budget of the memory phase (default 240 s)")
    p.add_argument("--rss-burst", type=int, default=2000, help="flows per burst (memory phase)")
    p.add_argument("--profile-iterations", type=int, default=None)
    p.add_argument("--queue", type=int, default=0)
    p.add_argument("--output", default=str(REPO / "bench-results.json"))
    a = p.parse_args(argv)
    q = a.quick
    a.rounds = min(max(a.rounds if a.rounds is not None else (1 if q else 3), 1), 10)
    a.duration = min(max(a.duration if a.duration is not None else (1.0 if q else 3.0), 1.0), 10.0)
    a.rtt_count = min(max(a.rtt_count if a.rtt_count is not None else (300 if q else 2000), 10), 20000)
    flows = a.rss_flows if a.rss_flows is not None else ("20000" if q else "100000,1000000")
    a.rss_flows = sorted({int(x) for x in flows.split(",") if x.strip()})
    if not a.rss_flows or min(a.rss_flows) < 1 or max(a.rss_flows) > 3_000_000:
        p.error("--rss-flows: counts from 1 to 3,000,000")
    a.rss_seconds = a.rss_seconds if a.rss_seconds is not None else (60.0 if q else 240.0)
    a.rss_burst = min(max(a.rss_burst, 10), 8192)
    a.profile_iterations = a.profile_iterations or (5000 if q else 50000)
    a.udp_streams = min(max(a.udp_streams, 1), len(IPERF_PORTS))
    a.cps_clients = min(max(a.cps_clients, 1), 8)
    a.phases = [x for x in a.phases.split(",") if x]
    a.only = [x for x in a.only.split(",") if x]
    for ph in a.phases:
        if ph not in (*ROUND_PHASES, "memory", "workers", "profile"):
            p.error(f"unknown phase {ph}")
    return a


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench: needs root (network namespaces)", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(lab_lock(args.prefix))  # held for the whole run
        except LabBusy:
            print(f"bench: another bench with prefix {args.prefix} is running", file=sys.stderr)
            return 2
        return run(args)


def collect(rounds: list[dict[str, Any]], n_rounds: int) -> Samples:
    samples: Samples = {}
    for res in rounds:
        for setup, loads in res.get("loads", {}).items():
            for load, r in loads.items():
                add_sample(samples, res["phase"], setup, res["round"] - 1, metrics_of(load, r), n_rounds)
    return samples


def run(args: argparse.Namespace) -> int:
    """Every round, the memory phase and the profile, then the report; cleans up always."""
    main_pid = os.getpid()

    # pyroute2 forks helper processes into the namespaces; they inherit this process's
    # signal handlers and atexit hooks, so both only act in the main process.
    def cleanup() -> None:
        if os.getpid() != main_pid:
            return
        PROCS.stop_all()
        with contextlib.suppress(Exception):
            lab_down(args.prefix)

    atexit.register(cleanup)

    def on_signal(signum: int, _frame: object) -> None:
        if os.getpid() != main_pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    started = time.monotonic()
    machine = machine_info()
    rounds: list[dict[str, Any]] = []
    rss: dict[str, Any] | None = None
    profile: dict[str, Any] | None = None
    curve: dict[str, Any] | None = None
    worker_profile: dict[str, Any] | None = None
    errors: list[str] = []
    try:
        with tempfile.TemporaryDirectory(prefix="snatgw-bench-") as tmpdir:
            for rnd in range(args.rounds):
                for phase in ROUND_PHASES:
                    if phase not in args.phases:
                        continue
                    log(f"round {rnd + 1}/{args.rounds}: {phase}")
                    try:
                        res = run_phase(phase, rnd, args, Path(tmpdir))
                    except (LabError, OSError, subprocess.SubprocessError, RuntimeError) as exc:
                        log(f"round {rnd + 1} {phase}: FAILED: {exc}")
                        res = {"phase": phase, "round": rnd + 1, "errors": [f"{phase}: {exc}"],
                               "loads": {}}
                    rounds.append(res)
                    errors += res["errors"]
            if "memory" in args.phases:
                log(f"memory: up to {max(args.rss_flows):,} idle flows")
                try:
                    rss = run_rss(args, Path(tmpdir))
                except (LabError, OSError, subprocess.SubprocessError, RuntimeError) as exc:
                    log(f"memory: FAILED: {exc}")
                    rss = {"checkpoints": [], "notes": [], "errors": [f"memory: {exc}"]}
                errors += rss.get("errors", [])
            if "workers" in args.phases:
                log(f"workers curve: 1 to {os.cpu_count()} workers")
                try:
                    curve = bench_workers.run_workers(sys.modules[__name__], args, Path(tmpdir),
                                                      os.cpu_count() or 1)
                except (LabError, OSError, subprocess.SubprocessError, RuntimeError, ValueError) as exc:
                    log(f"workers curve: FAILED: {exc}")
                    curve = {"error": str(exc), "rows": [], "errors": [f"workers: {exc}"]}
                errors += curve.get("errors", [])
            if "profile" in args.phases:
                log("profile: py-spy on one worker under the UDP load")
                worker_profile = run_worker_profile(args)
                if worker_profile.get("error"):
                    errors.append(f"worker profile: {worker_profile['error']}")
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        cleanup()
        return 130
    finally:
        cleanup()
    if "profile" in args.phases:
        log("profile: the core in this process")
        try:
            profile = profile_core(args.profile_iterations)
        except Exception as exc:  # a broken profile must not lose the measured rows
            profile = {"error": f"{type(exc).__name__}: {exc}"}
            errors.append(f"profile: {exc}")

    samples = collect(rounds, args.rounds)
    blocks = [r.get("block_size") for r in rounds if r.get("block_size")]
    idles = [r["idle_cpu_pct"] for r in rounds if r.get("idle_cpu_pct") is not None]
    checks = [r["rules_check"] for r in rounds if r.get("rules_check")]
    settings = {"rounds": args.rounds, "duration_s": args.duration, "quick": args.quick,
                "udp_streams": args.udp_streams, "cps_clients": args.cps_clients,
                "rtt_count": args.rtt_count, "rss_flows": args.rss_flows, "prefix": args.prefix,
                "phases": args.phases, "block_size": blocks[0] if blocks else None,
                "idle_cpu_pct": max(idles) if idles else None,
                "rules_check": checks[-1] if checks else None,
                "configs": {"default": gateway_config(queue=args.queue),
                            "tuned_tcp_fin_linger_s": TUNED_LINGER, "rules": RULE_COUNT}}
    summary = build_summary(samples, settings, rss)
    if profile is not None and not profile.get("error"):
        profile.update(process_split(samples.get("snatgw", {}).get("default", {})))
    doc = {"machine": machine, "settings": settings, "summary": summary, "profile": profile,
           "memory": rss, "samples": samples, "rounds": rounds, "errors": errors,
           "workers": curve, "worker_profile": worker_profile,
           "runtime_s": round(time.monotonic() - started, 1)}
    Path(args.output).write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(render_report(doc))
    print(f"\nresults written to {args.output} (total {doc['runtime_s']} s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
