#!/usr/bin/env python3
"""What a NEW flow costs in the core, in this process with an injected clock
(issue 11: connections per second through an instance IP).

Times, on the bench's own config (scripts/bench.py ``_model``): a new UDP flow
through an instance IP, one from a PAT pool member, one through the instance IP
with 100 security rules, and a whole TCP connection through the instance IP
(SYN in2out, SYN-ACK out2in, ACK, data both ways, FIN both ways, final ACK) plus
its end after ``tcp_fin_linger`` on the timer wheel (``handle_timer``). Each
figure is the best of ``--repeats`` runs over ``--n`` flows on a fresh table.

``--profile KIND`` (udp, pat, rules, tcp) prints cProfile's top functions of one run.

Usage: ``.venv/bin/python scripts/newflow.py [--n 20000] [--repeats 5] [--profile tcp]``.
"""

from __future__ import annotations

import argparse
import cProfile
import ipaddress
import pstats
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench  # noqa: E402

from gateway.core.checksum import ones_sum  # noqa: E402
from gateway.core.table import TranslationTable  # noqa: E402
from gateway.core.verdict import DROP  # noqa: E402

NOW0 = 1000.0
SYN, ACK, FIN, PSH = 0x02, 0x10, 0x01, 0x08


def _ip(a: str) -> bytes:
    return ipaddress.IPv4Address(a).packed


def tcp_packet(src: str, dst: str, sport: int, dport: int, seq: int, ack: int, flags: int,
               payload: bytes = b"") -> bytes:
    """An IPv4 TCP segment with correct checksums (a SYN carries a window-scale option)."""
    opts = b"\x01\x03\x03\x07" if flags & SYN else b""
    doff = (20 + len(opts)) // 4
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, doff << 4, flags, 65535, 0, 0) + opts + payload
    s, d = _ip(src), _ip(dst)
    pseudo = s + d + struct.pack("!BBH", 0, 6, len(tcp))
    c = 0xFFFF - ones_sum(pseudo + tcp)
    tcp = tcp[:16] + struct.pack("!H", c) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0, 64, 6, 0, s, d)
    ip = ip[:10] + struct.pack("!H", 0xFFFF - ones_sum(ip)) + ip[12:]
    return ip + tcp


def tcp_connection(sport: int) -> list[tuple[bool, bytes]]:
    """One connection's packets, (in2out?, packet), as the instance IP sees them."""
    be, pub, srv, dp = bench.INSTANCE_BACKEND, bench.INSTANCE_PUBLIC, bench.SERVER, 8080
    a, b = 1000, 5000
    return [
        (True, tcp_packet(be, srv, sport, dp, a, 0, SYN)),
        (False, tcp_packet(srv, pub, dp, sport, b, a + 1, SYN | ACK)),
        (True, tcp_packet(be, srv, sport, dp, a + 1, b + 1, ACK)),
        (True, tcp_packet(be, srv, sport, dp, a + 1, b + 1, ACK | PSH, b"x" * 20)),
        (False, tcp_packet(srv, pub, dp, sport, b + 1, a + 21, ACK | PSH, b"y" * 20)),
        (True, tcp_packet(be, srv, sport, dp, a + 21, b + 21, ACK | FIN)),
        (False, tcp_packet(srv, pub, dp, sport, b + 21, a + 22, ACK | FIN)),
        (True, tcp_packet(be, srv, sport, dp, a + 22, b + 22, ACK)),
    ]


def run_udp(model: Any, src: str, n: int, dports: int) -> Callable[[], float]:
    """A closure timing one table's ``n`` new-UDP-flow packets (seconds per flow)."""
    pkts = [bytes(bench._udp(src, bench.SERVER, 10000 + i // dports, 20000 + i % dports)) for i in range(n)]

    def once() -> float:
        table = TranslationTable(model, NOW0)
        bufs = [bytearray(p) for p in pkts]
        f = table.in2out
        t0 = time.perf_counter()
        for buf in bufs:
            f(buf, NOW0)
        dt = time.perf_counter() - t0
        if table.flow_count() != n:
            raise SystemExit(f"{table.flow_count()} flows from {n} packets")
        return dt / n

    return once


def run_tcp(model: Any, n: int) -> Callable[[], float]:
    """A closure timing ``n`` whole TCP connections and their end (seconds per connection)."""
    conns = [tcp_connection(1024 + i) for i in range(n)]
    linger = model.timeouts.tcp_fin_linger

    def once() -> float:
        table = TranslationTable(model, NOW0)
        work = [[(d, bytearray(p)) for d, p in c] for c in conns]
        i2o, o2i = table.in2out, table.out2in
        t0 = time.perf_counter()
        now = NOW0
        for k, c in enumerate(work):
            now = NOW0 + k * 1e-5
            for d, buf in c:
                if (i2o if d else o2i)(buf, now) == DROP:
                    raise SystemExit(f"connection {k}: a packet was dropped: {table.counters_dict()}")
        table.handle_timer(now + linger + 1.0)
        dt = time.perf_counter() - t0
        if table.flow_count():
            raise SystemExit(f"{table.flow_count()} flows left after the linger")
        return dt / n

    return once


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--profile", choices=("udp", "pat", "rules", "tcp"))
    args = ap.parse_args()
    model, rmodel = bench._model(0), bench._model(bench.RULE_COUNT)
    n = args.n
    cases = {
        "udp": ("new UDP flow, instance IP", run_udp(model, bench.INSTANCE_BACKEND, n, 16)),
        "pat": ("new UDP flow, PAT pool member (first 1000)",
                run_udp(model, bench.SETUPS["default"].backend, 1000, 1000)),
        "rules": (f"new UDP flow, instance IP, {bench.RULE_COUNT} rules",
                  run_udp(rmodel, bench.INSTANCE_BACKEND, n, 16)),
        "tcp": ("TCP connection (8 packets + end after linger), instance IP", run_tcp(model, min(n, 60000))),
    }
    if args.profile:
        _label, fn = cases[args.profile]
        prof = cProfile.Profile()
        prof.enable()
        fn()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return 0
    for label, fn in cases.values():
        best = min(fn() for _ in range(args.repeats))
        print(f"{label:62} {best * 1e6:7.2f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
