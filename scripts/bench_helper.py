"""Small load programs for scripts/bench.py, run inside the lab's namespaces.

Standard library only; every client is bounded in time or in count and prints one JSON
object on stdout.  Servers run until SIGTERM/SIGINT (bench.py stops them by pid).

    bench_helper.py accept-server --bind IP --port N        # accept, send 1 byte, close on EOF
    bench_helper.py echo-server --bind IP --port N          # UDP echo
    bench_helper.py cps-client --src IP --dst IP --port N --duration S
    bench_helper.py rtt-client --src IP --dst IP --port N --count N
    bench_helper.py flow-burst --src IP --dst IP --sports LO-HI --dports LO-HI
        # raw UDP packets, one per (source port, destination port): a new flow each;
        # reads a count per line on stdin, sends that many more, answers "sent TOTAL"
"""

from __future__ import annotations

import argparse
import json
import selectors
import signal
import socket
import struct
import sys
import time
from collections.abc import Iterator, Sequence


def _stop_on_term() -> None:
    def handler(*_: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def accept_server(bind: str, port: int) -> int:
    """Accept connections, answer each with one byte, close once the client has closed.

    The client closes first, so TIME_WAIT lands on the client (whose kernel then avoids
    that port) and never on this server: a PAT gateway reuses its few public ports toward
    this one destination, and SYNs hitting a server TIME_WAIT would cost a ~10 ms
    challenge-ACK / RST / SYN-retransmit round each, measuring the server, not the path.
    """
    _stop_on_term()
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((bind, port))
    ls.listen(4096)
    ls.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(ls, selectors.EVENT_READ, None)
    print("ready", flush=True)
    while True:
        for key, _ in sel.select(1.0):
            if key.data is None:
                for _ in range(64):
                    try:
                        conn, _peer = ls.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break
                    conn.setblocking(False)
                    try:
                        conn.send(b"x")
                    except OSError:
                        conn.close()
                        continue
                    sel.register(conn, selectors.EVENT_READ, True)
                continue
            peer = key.fileobj
            assert isinstance(peer, socket.socket)
            try:
                data = peer.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                sel.unregister(peer)
                peer.close()


def echo_server(bind: str, port: int) -> int:
    """Send every datagram back to where it came from."""
    _stop_on_term()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((bind, port))
    print("ready", flush=True)
    while True:
        try:
            data, peer = s.recvfrom(65535)
            s.sendto(data, peer)
        except OSError:
            continue


#: Linux IP_BIND_ADDRESS_NO_PORT (Python 3.11 lacks the name): bind() takes the address only
#: and connect() picks the port, as for an unbound socket.
IP_BIND_ADDRESS_NO_PORT = int(getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24))


def cps_client(src: str, dst: str, port: int, duration: float) -> int:
    """Sequential connect / read the server's byte / close for ``duration`` seconds.

    The source port is chosen at connect() (IP_BIND_ADDRESS_NO_PORT): bind(ip, 0) would
    search for a port unused by any socket, which becomes slow once thousands of this
    client's ports sit in TIME_WAIT.
    """
    done = failed = 0
    first_error = ""
    start = time.monotonic()
    deadline = start + duration
    while time.monotonic() < deadline:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(1.0)
        try:
            s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            s.bind((src, 0))
            s.connect((dst, port))
            got = s.recv(16)
            if got == b"x":
                done += 1
            else:
                failed += 1
        except OSError as exc:
            failed += 1
            first_error = first_error or f"{type(exc).__name__}: {exc}"
        finally:
            s.close()
    elapsed = time.monotonic() - start
    print(json.dumps({"completed": done, "failed": failed, "elapsed": elapsed,
                      "first_error": first_error}))
    return 0


def rtt_client(src: str, dst: str, port: int, count: int, warmup: int) -> int:
    """``count`` sequential request/response round trips (after ``warmup`` unmeasured ones)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((src, 0))
    s.connect((dst, port))
    s.settimeout(0.5)
    samples: list[int] = []
    lost = 0
    payload = b"p" * 32
    deadline = time.monotonic() + 20.0
    for i in range(warmup + count):
        if time.monotonic() > deadline:
            break
        t0 = time.perf_counter_ns()
        s.send(payload)
        try:
            s.recv(2048)
        except OSError:  # timeout or ICMP error: count as lost
            lost += 1
            continue
        dt = time.perf_counter_ns() - t0
        if i >= warmup:
            samples.append(dt)
    samples.sort()

    def pct(p: float) -> float | None:
        if not samples:
            return None
        return samples[min(len(samples) - 1, int(p * len(samples)))] / 1000.0

    print(json.dumps({"samples": len(samples), "lost": lost, "p50_us": pct(0.50),
                      "p90_us": pct(0.90), "p99_us": pct(0.99),
                      "min_us": samples[0] / 1000.0 if samples else None}))
    return 0


def ones_sum(data: bytes) -> int:
    """RFC 1071 one's-complement sum of ``data`` (padded to even length), folded to 16 bits."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def udp_packet(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    """An IPv4/UDP datagram with correct checksums (RFC 791, RFC 768)."""
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    length = 8 + len(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + length, 0, 0, 64, 17, 0, s, d)
    ip = ip[:10] + struct.pack("!H", ~ones_sum(ip) & 0xFFFF) + ip[12:]
    udp = struct.pack("!HHHH", sport, dport, length, 0) + payload
    c = ~ones_sum(s + d + struct.pack("!BBH", 0, 17, length) + udp) & 0xFFFF
    return ip + udp[:6] + struct.pack("!H", c or 0xFFFF) + udp[8:]


def flow_tuples(sports: tuple[int, int], dports: tuple[int, int]) -> Iterator[tuple[int, int]]:
    """Every (source port, destination port) pair, source port varying fastest."""
    for dport in range(dports[0], dports[1] + 1):
        for sport in range(sports[0], sports[1] + 1):
            yield sport, dport


def flow_burst(src: str, dst: str, sports: tuple[int, int], dports: tuple[int, int]) -> int:
    """Open idle UDP flows on demand: each line on stdin is a count of new flows to send.

    One packet per flow, sent on a raw socket (no socket per source port), so one process
    can open a million flows; the bench paces the bursts by the gateway's queue, so
    that none is lost to a full queue.  Answers ``sent TOTAL`` per line; ``done`` when
    every pair has been sent.
    """
    _stop_on_term()
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    # One template; per packet only the ports and the UDP checksum change (RFC 1624).
    template = bytearray(udp_packet(src, dst, 0, 0, b"bench-fl"))
    base = ~int.from_bytes(template[26:28], "big") & 0xFFFF
    ports = struct.Struct("!HH")
    csum = struct.Struct("!H")
    tuples = flow_tuples(sports, dports)
    sent = 0
    print("ready", flush=True)
    for line in sys.stdin:
        want = int(line.strip() or 0)
        for _ in range(want):
            pair = next(tuples, None)
            if pair is None:
                break
            c = base + pair[0] + pair[1]
            c = (c & 0xFFFF) + (c >> 16)
            c = (c & 0xFFFF) + (c >> 16)
            ports.pack_into(template, 20, pair[0], pair[1])
            csum.pack_into(template, 26, (~c & 0xFFFF) or 0xFFFF)
            raw.sendto(template, (dst, 0))
            sent += 1
        print(f"sent {sent}", flush=True)
    return 0


def port_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    a, b = int(lo), int(hi or lo)
    if not 1 <= a <= b <= 65535:
        raise argparse.ArgumentTypeError(f"bad port range {text!r}")
    return a, b


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_helper")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("accept-server", "echo-server"):
        sp = sub.add_parser(name)
        sp.add_argument("--bind", required=True)
        sp.add_argument("--port", type=int, required=True)
    c = sub.add_parser("cps-client")
    c.add_argument("--src", required=True)
    c.add_argument("--dst", required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--duration", type=float, default=3.0)
    r = sub.add_parser("rtt-client")
    r.add_argument("--src", required=True)
    r.add_argument("--dst", required=True)
    r.add_argument("--port", type=int, required=True)
    r.add_argument("--count", type=int, default=2000)
    r.add_argument("--warmup", type=int, default=50)
    f = sub.add_parser("flow-burst")
    f.add_argument("--src", required=True)
    f.add_argument("--dst", required=True)
    f.add_argument("--sports", type=port_range, required=True)
    f.add_argument("--dports", type=port_range, required=True)
    a = p.parse_args(argv)
    if a.cmd == "accept-server":
        return accept_server(a.bind, a.port)
    if a.cmd == "echo-server":
        return echo_server(a.bind, a.port)
    if a.cmd == "flow-burst":
        return flow_burst(a.src, a.dst, a.sports, a.dports)
    if a.cmd == "cps-client":
        return cps_client(a.src, a.dst, a.port, min(a.duration, 30.0))
    return rtt_client(a.src, a.dst, a.port, min(a.count, 100_000), min(a.warmup, 1000))


if __name__ == "__main__":
    sys.exit(main())
