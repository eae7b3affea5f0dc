#!/usr/bin/env python3
"""Memory per flow and per-packet cost against table size, in this process
(issue 11, part 3: at most 300 B per flow at 1M live flows, pps with 1M idle
flows within 10% of pps with one).

No network, no root: a :class:`~gateway.core.table.TranslationTable` is built
from a model with instance IPs (scenario 1: no port budget, so a million flows
fit), and synthetic first packets (UDP, many backends x many destinations x
many source ports) go through the real ``in2out``. RSS comes from
``/proc/self/statm`` after ``gc.collect()``; bytes per flow = (RSS now - RSS
of the empty table) / live flows. Per-packet cost: ns per ``in2out`` and
``out2in`` of a hit on one flow, with one flow in the table and with all of
them (the copy of the packet into the buffer is timed apart and taken off).

``--breakdown N`` instead lists, with tracemalloc, where the bytes of N flows
are allocated (by source line), and the sizes of one flow's parts.

Usage: ``.venv/bin/python scripts/flowmem.py [--flows 100000 1000000] [--json]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import struct
import sys
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.config import parse  # noqa: E402
from gateway.core.checksum import ones_sum  # noqa: E402
from gateway.core.table import TranslationTable  # noqa: E402

#: Backends, each with its own instance IP: 10.10.1.<i> -> 198.51.100.<i>.
BACKENDS = 16
#: Destinations per backend (100.64.x.y), each on port 443; source ports vary slowest.
DESTS = 4096
#: ``--pat``: standalone backends 10.10.2.<i> on four default SNAT addresses (16 each:
#: 1024-port blocks), 16 destinations each, so a million flows fit their blocks.
PAT_BACKENDS = 64
PAT_DESTS = 16
SPORT0 = 1024
PAGE = os.sysconf("SC_PAGE_SIZE")
NOW0 = 1000.0


@dataclass(frozen=True)
class Layout:
    """Which backends and destinations the synthetic flows use."""

    pat: bool = False

    @property
    def backends(self) -> int:
        return PAT_BACKENDS if self.pat else BACKENDS

    @property
    def dests(self) -> int:
        return PAT_DESTS if self.pat else DESTS

    def toml(self, cap: int) -> str:
        """A config with the backends' public addresses and flow caps above ``cap``."""
        text = f"""\
[gateway]
inside = "in0"
outside = "out0"
address_space = ["10.10.0.0/16"]
max_flows = {cap}
max_flows_per_backend = {cap}
"""
        if self.pat:
            ips = ", ".join(f'"198.51.100.{30 + k}"' for k in range(4))
            return text + f"\n[default_snat]\nips = [{ips}]\n"
        for i in range(1, self.backends + 1):
            text += f'\n[[instance_ips]]\nprivate = "10.10.1.{i}"\npublic = "198.51.100.{i}"\n'
        return text

    def flow(self, i: int) -> tuple[bytes, bytes, int]:
        """(backend, destination, source port) of synthetic flow ``i``: backends vary
        fastest, then destinations, then source ports."""
        b = i % self.backends
        j = i // self.backends
        d = j % self.dests
        src = bytes((10, 10, 2 if self.pat else 1, b + 1))
        return src, bytes((100, 64, d >> 8, d & 255)), SPORT0 + j // self.dests


def rss_bytes() -> int:
    """Resident set size of this process (``/proc/self/statm``, second field)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * PAGE


_IP = struct.Struct("!BBHHHBBH4s4s")
_UDP = struct.Struct("!HHHH")


def udp_packet(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes = b"x" * 18,
               checksum: bool = True) -> bytearray:
    """An IPv4/UDP datagram (RFC 791, RFC 768); ``checksum`` False sends UDP checksum 0."""
    length = 8 + len(payload)
    ip = bytearray(_IP.pack(0x45, 0, 20 + length, 0, 0, 64, 17, 0, src, dst))
    struct.pack_into("!H", ip, 10, ~ones_sum(ip) & 0xFFFF)
    udp = _UDP.pack(sport, dport, length, 0) + payload
    c = 0
    if checksum:
        c = ~ones_sum(src + dst + struct.pack("!BBH", 0, 17, length) + udp) & 0xFFFF or 0xFFFF
    return ip + udp[:6] + struct.pack("!H", c) + udp[8:]


def fill(table: TranslationTable, layout: Layout, start: int, stop: int, batch: int = 1) -> None:
    """Open flows ``start`` to ``stop`` with one first packet each, one packet
    buffer reused (a packet's buffer must not count as the flow's memory); a
    new ``now`` per ``batch`` packets (1, the default, is the worst case: no two
    flows share a time object; the packet loop reads the clock once per batch)."""
    in2out = table.in2out
    buf = udp_packet(b"\0" * 4, b"\0" * 4, 0, 443, checksum=False)
    tmpl = bytes(buf)
    now = NOW0 + start * 1e-6
    for i in range(start, stop):
        src, dst, sport = layout.flow(i)
        buf[:] = tmpl
        buf[12:16] = src
        buf[16:20] = dst
        struct.pack_into("!H", buf, 20, sport)
        struct.pack_into("!H", buf, 10, 0)
        struct.pack_into("!H", buf, 10, ~ones_sum(buf[:20]) & 0xFFFF)
        if i % batch == 0:
            now = NOW0 + i * 1e-6
        in2out(buf, now)


def time_hit(fn: Any, tmpl: bytes, n: int, repeats: int) -> float:
    """Best ns per call of ``fn`` on a fresh copy of ``tmpl`` (the copy's cost taken off)."""
    buf = bytearray(tmpl)
    best = float("inf")
    now = NOW0 + 10.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            buf[:] = tmpl
            fn(buf, now)
        t1 = time.perf_counter()
        for _ in range(n):
            buf[:] = tmpl
        t2 = time.perf_counter()
        best = min(best, ((t1 - t0) - (t2 - t1)) / n)
    return best * 1e9


def hit_packets(table: TranslationTable, layout: Layout) -> tuple[bytes, bytes]:
    """A packet of flow 0 and its reply to the public address and port ``table`` gave it."""
    src, dst, sport = layout.flow(0)
    out_pkt = bytes(udp_packet(src, dst, sport, 443))
    buf = bytearray(out_pkt)
    table.in2out(buf, NOW0)
    public, port = bytes(buf[12:16]), buf[20] << 8 | buf[21]
    return out_pkt, bytes(udp_packet(dst, public, 443, port))


def per_packet(
    small: TranslationTable, big: TranslationTable, layout: Layout, n: int, repeats: int
) -> tuple[dict[str, float], dict[str, float]]:
    """ns per hit of flow 0 in ``small`` and in ``big``: rounds interleaved (small,
    big, small, big, ...) and the best of each kept, so that load from other
    processes weighs on both alike."""
    pkts = [hit_packets(small, layout), hit_packets(big, layout)]
    res: list[dict[str, float]] = [{}, {}]
    for _ in range(repeats):
        for k, t in enumerate((small, big)):
            out_pkt, back_pkt = pkts[k]
            for name, fn, pkt in (("in2out_ns", t.in2out, out_pkt), ("out2in_ns", t.out2in, back_pkt)):
                ns = time_hit(fn, pkt, n, 1)
                res[k][name] = round(min(res[k].get(name, ns), ns))
    return res[0], res[1]


def measure(
    targets: list[int], iterations: int = 200_000, repeats: int = 5, batch: int = 1, pat: bool = False
) -> dict[str, Any]:
    """RSS per flow at each of ``targets`` live flows and per-packet cost with
    one flow and with the largest target; a dict (what ``--json`` prints)."""
    targets = sorted(targets)
    top = targets[-1]
    layout = Layout(pat)
    model = parse(layout.toml(2 * top + 16), "flowmem.toml").model
    table = TranslationTable(model, NOW0)
    small = TranslationTable(model, NOW0)
    fill(small, layout, 0, 1)
    gc.collect()
    out: dict[str, Any] = {"python": sys.version.split()[0], "backends": layout.backends, "batch": batch,
                           "pat": pat, "checkpoints": []}
    fill(table, layout, 0, 1)
    gc.collect()
    base = rss_bytes()
    out["rss_base"] = base
    done = 1
    for target in targets:
        t0 = time.perf_counter()
        fill(table, layout, done, target, batch)
        fill_s = time.perf_counter() - t0
        done = target
        gc.collect()
        live = table.flow_count()
        rss = rss_bytes()
        out["checkpoints"].append({
            "flows": live, "rss": rss, "bytes_per_flow": round((rss - base) / max(1, live - 1)),
            "new_flow_us": round(fill_s / max(1, target - 1) * 1e6 if target > 1 else 0.0, 2),
        })
    out["one_flow"], out["all_flows"] = per_packet(small, table, layout, iterations, repeats)
    out["all_flows"]["flows"] = table.flow_count()
    return out


def breakdown(n: int, pat: bool = False) -> dict[str, Any]:
    """Where the bytes of ``n`` flows go: tracemalloc by source line."""
    layout = Layout(pat)
    model = parse(layout.toml(2 * n + 16), "flowmem.toml").model
    table = TranslationTable(model, NOW0)
    fill(table, layout, 0, 1)
    gc.collect()
    tracemalloc.start(1)
    before = tracemalloc.take_snapshot()
    fill(table, layout, 1, n + 1)
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    stats = after.compare_to(before, "lineno")
    rows = []
    total = 0
    for s in stats:
        if s.size_diff <= 0:
            continue
        total += s.size_diff
        fr = s.traceback[0]
        rows.append((s.size_diff / n, s.count_diff / n, f"{Path(fr.filename).name}:{fr.lineno}"))
    rows.sort(reverse=True)
    return {"flows": n, "total_per_flow": round(total / n, 1),
            "lines": [{"bytes": round(b, 1), "blocks": round(c, 2), "where": w} for b, c, w in rows[:25]]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flows", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--iterations", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--breakdown", type=int, default=0, metavar="N")
    ap.add_argument("--batch", type=int, default=1, help="new flows per clock reading (default 1)")
    ap.add_argument("--pat", action="store_true",
                    help="PAT flows of standalone backends on default SNAT addresses (not instance IPs)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.breakdown:
        res = breakdown(args.breakdown, args.pat)
        if args.json:
            print(json.dumps(res))
            return 0
        print(f"{res['flows']:,} flows, {res['total_per_flow']} B per flow traced by tracemalloc")
        for r in res["lines"]:
            print(f"{r['bytes']:8.1f} B {r['blocks']:6.2f} blocks  {r['where']}")
        return 0
    res = measure(args.flows, args.iterations, args.repeats, args.batch, args.pat)
    if args.json:
        print(json.dumps(res))
        return 0
    for cp in res["checkpoints"]:
        print(f"{cp['flows']:>10,} flows: {cp['bytes_per_flow']:6,} B per flow"
              f" (RSS {cp['rss'] / 2**20:.0f} MiB, {cp['new_flow_us']} us per new flow)")
    one, alln = res["one_flow"], res["all_flows"]
    print(f"in2out hit: {one['in2out_ns']} ns with 1 flow, {alln['in2out_ns']} ns with {alln['flows']:,}")
    print(f"out2in hit: {one['out2in_ns']} ns with 1 flow, {alln['out2in_ns']} ns with {alln['flows']:,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
