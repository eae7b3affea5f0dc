"""Tests for gateway.adapters.nfqueue (pure-Python nfnetlink_queue client).

Real kernel, root: two network namespaces ``nlq<id>a`` (192.0.2.1) and
``nlq<id>b`` (192.0.2.2) joined by a veth pair; namespace A queues everything
it sends to B with ``iptables -t mangle -A OUTPUT -d 192.0.2.2 -j NFQUEUE
--queue-num 7`` and runs a worker process bound with NetlinkQueue; assertions
are on what B actually received. The protocol handling without a kernel
(parser, verdict encoding, batching) is tested in tests/unit/test_nfqueue_codec.py
and tests/unit/test_nfqueue_queue.py.

This file is also the helper program run inside the namespaces
(``python test_nfqueue.py MODE ...``) and holds the throughput micro-check:

    sudo .venv/bin/python tests/integration/test_nfqueue.py bench [seconds [all|flood|drain]]

It prints two kinds of figures:

* "flood": ``iperf3 -u -l 64 -b 0`` from A to B for a few seconds with no
  queue, with a NetlinkQueue loop accepting unchanged, and with
  netfilterqueue's ``run(block=False)`` + ``pkt.accept()``. On two cores the
  sender, the consumer and the receiver share the CPUs, so these are bound
  by the sender as much as by the consumer;
* "drain": 60 000 64-byte UDP packets are queued while the consumer does not
  read (huge queue and socket buffer), then the consumer drains them alone:
  packets/s and CPU time per packet (user + sys) of the consumer itself
  (Python + the kernel verdict/forward path it runs), NetlinkQueue vs
  netfilterqueue, for accept unchanged and for a one-field rewrite sent back
  (ACCEPT_MODIFIED / ``set_payload``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import resource
import select
import shutil
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gateway.adapters.kernel import Hook, Mark, SkbInfo
from gateway.adapters.nfqueue import NetlinkQueue
from gateway.core.verdict import Verdict

REPO = Path(__file__).resolve().parents[2]
QUEUE = 7
ADDR_A = "192.0.2.1"
ADDR_B = "192.0.2.2"
NF_INET_LOCAL_OUT = Hook.LOCAL_OUT

# ----------------------------------------------------------------------------
# integration: two namespaces, real kernel
# ----------------------------------------------------------------------------

def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=30)


class Proc:
    """A helper process (this file, run as a program) inside a namespace.

    Protocol: it prints one JSON line when ready, then its result as one JSON
    line when told to stop (a line or EOF on stdin) or when it finishes.
    """

    def __init__(self, ns: str, *args: str) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.name = " ".join(args)
        self.p = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, __file__, *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=env, cwd=str(REPO),
        )  # fmt: skip
        self.ready: dict[str, Any] = {}

    def wait_ready(self, timeout: float = 15.0) -> dict[str, Any]:
        assert self.p.stdout is not None
        r, _, _ = select.select([self.p.stdout], [], [], timeout)
        line = self.p.stdout.readline() if r else ""
        if not line:
            self.p.kill()
            _, err = self.p.communicate(timeout=10)
            raise AssertionError(f"helper {self.name} not ready: {err}")
        self.ready = json.loads(line)
        return self.ready

    def result(self, timeout: float = 60.0, stop: bool = True) -> dict[str, Any]:
        assert self.p.stdin is not None
        if stop:
            try:
                self.p.stdin.write("stop\n")
                self.p.stdin.flush()
            except BrokenPipeError:
                pass
        try:
            out, err = self.p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            out, err = self.p.communicate(timeout=10)
            raise AssertionError(f"helper {self.name} timed out: {err}") from None
        lines = out.strip().splitlines()
        assert self.p.returncode == 0 and lines, f"helper {self.name} failed: {err}"
        res: dict[str, Any] = json.loads(lines[-1])
        return res

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.communicate(timeout=10)


@dataclass
class Lab:
    a: str
    b: str
    procs: list[Proc] = field(default_factory=list)

    def spawn(self, ns: str, *args: str) -> Proc:
        proc = Proc(ns, *args)
        self.procs.append(proc)
        return proc

    def iptables(self, *args: str) -> None:
        _run("ip", "netns", "exec", self.a, "iptables", *args)


def _lab_up() -> Lab:
    tag = uuid.uuid4().hex[:6]
    lab = Lab(f"nlq{tag}a", f"nlq{tag}b")
    _run("ip", "netns", "add", lab.a)
    try:
        _run("ip", "netns", "add", lab.b)
        _run("ip", "-n", lab.a, "link", "add", "v0", "type", "veth", "peer", "name", "v0",
             "netns", lab.b)  # fmt: skip
        for ns, addr in ((lab.a, ADDR_A), (lab.b, ADDR_B)):
            _run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "v0")
            _run("ip", "-n", ns, "link", "set", "v0", "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        lab.iptables("-t", "mangle", "-A", "OUTPUT", "-d", ADDR_B, "-j", "NFQUEUE",
                     "--queue-num", str(QUEUE))  # fmt: skip
    except BaseException:
        _lab_down(lab)
        raise
    return lab


def _lab_down(lab: Lab) -> None:
    for proc in lab.procs:
        proc.kill()
    for ns in (lab.a, lab.b):
        _run("ip", "netns", "del", ns, check=False)


@pytest.fixture
def nlq_lab() -> Iterator[Lab]:
    lab = _lab_up()
    try:
        yield lab
    finally:
        _lab_down(lab)


def _udp_exchange(lab: Lab, count: int, mode: str, gso: bool) -> tuple[dict[str, Any], list[str]]:
    """Queue worker in A (mode), UDP receiver in B, send `count` packets A->B."""
    worker = lab.spawn(lab.a, "queue", mode, "1" if gso else "0")
    worker.wait_ready()
    rx = lab.spawn(lab.b, "udprecv")
    rx.wait_ready()
    tx = lab.spawn(lab.a, "udpsend", str(count))
    tx.result(timeout=30, stop=False)
    got: list[str] = rx.result(timeout=30)["payloads"]
    stats = worker.result(timeout=30)
    return stats, got


@pytest.mark.integration
@pytest.mark.parametrize("gso", [False, True])
def test_udp_accept_unchanged(nlq_lab: Lab, gso: bool) -> None:
    """Accepted packets arrive unchanged, with or without the GSO flag."""
    stats, got = _udp_exchange(nlq_lab, 300, "accept", gso)
    assert sorted(got) == [f"#{i:05d}" for i in range(300)]
    assert stats["handled"] == 300 and stats["errors"] == 0 and stats["dropped"] == 0
    assert stats["hooks"] == [NF_INET_LOCAL_OUT]
    if gso:  # UDP from a local socket is CHECKSUM_PARTIAL and reported as such
        assert stats["skbinfo_or"] & SkbInfo.CSUMNOTREADY
    else:
        assert stats["skbinfo_or"] == 0


@pytest.mark.integration
@pytest.mark.parametrize("gso", [False, True])
def test_udp_mangle_in_place(nlq_lab: Lab, gso: bool) -> None:
    """Payloads rewritten in place arrive as rewritten."""
    stats, got = _udp_exchange(nlq_lab, 300, "udp_mangle", gso)
    assert sorted(got) == [f"M{i:05d}" for i in range(300)]
    assert stats["handled"] == 300 and stats["errors"] == 0


@pytest.mark.integration
def test_udp_drop(nlq_lab: Lab) -> None:
    """Dropped packets never arrive."""
    stats, got = _udp_exchange(nlq_lab, 100, "drop", False)
    assert got == []
    assert stats["handled"] == 100 and stats["errors"] == 0


@pytest.mark.integration
@pytest.mark.parametrize("gso", [False, True])
def test_udp_mixed_verdicts(nlq_lab: Lab, gso: bool) -> None:
    """Drop / mangle / accept interleaved, verdicts sent in batches."""
    n = 600
    stats, got = _udp_exchange(nlq_lab, n, "mixed", gso)
    expect = [f"{'M' if i % 3 == 1 else '#'}{i:05d}" for i in range(n) if i % 3 != 0]
    assert sorted(got, key=lambda s: s[1:]) == expect
    assert stats["handled"] == n and stats["errors"] == 0
    assert stats["max_batch"] > 1, "the flood should have been received in batches"


@pytest.mark.integration
@pytest.mark.parametrize(
    ("mode", "gso", "delivered"),
    [("udp_mark", False, True), ("udp_mark", True, True), ("udp_mangle", False, False)],
)
def test_mark(nlq_lab: Lab, mode: str, gso: bool, delivered: bool) -> None:
    """ACCEPT_MODIFIED_MARK sets NFQA_MARK: a filter rule that passes only marked packets."""
    nlq_lab.iptables("-A", "OUTPUT", "-d", ADDR_B, "-p", "udp", "-m", "mark", "!", "--mark",
                     hex(Mark.TRANSLATED), "-j", "DROP")  # fmt: skip
    stats, got = _udp_exchange(nlq_lab, 50, mode, gso)
    assert stats["handled"] == 50
    assert sorted(got) == ([f"M{i:05d}" for i in range(50)] if delivered else [])


@pytest.mark.integration
@pytest.mark.parametrize(("gso", "mode"), [(True, "accept"), (True, "ttl"), (False, "accept")])
def test_tcp_bulk(nlq_lab: Lab, gso: bool, mode: str) -> None:
    """20 MB over TCP through the queue; with gso=True the handler sees super-packets.

    "ttl" rewrites the IPv4 TTL and header checksum of every (GSO) packet and
    returns 2: the kernel re-segments and computes TCP checksums itself.
    """
    size = 20_000_000
    worker = nlq_lab.spawn(nlq_lab.a, "queue", mode, "1" if gso else "0")
    worker.wait_ready()
    sink = nlq_lab.spawn(nlq_lab.b, "tcpsink")
    sink.wait_ready()
    sent = nlq_lab.spawn(nlq_lab.a, "tcpsend", str(size)).result(timeout=90, stop=False)
    got = sink.result(timeout=30, stop=False)
    elapsed = sent["seconds"]
    stats = worker.result(timeout=30)
    assert got["bytes"] == size and got["sha256"] == sent["sha256"]
    assert stats["errors"] == 0 and stats["dropped"] == 0
    if gso:
        assert stats["max_len"] > 1500, stats
        assert stats["skbinfo_or"] & SkbInfo.GSO
    else:
        assert stats["max_len"] <= 1500
        assert stats["skbinfo_or"] & SkbInfo.GSO == 0
    print(f"tcp {mode} gso={gso}: {size * 8 / elapsed / 1e6:.0f} Mbit/s, "
          f"{stats['handled']} packets, max {stats['max_len']} bytes")  # fmt: skip


@pytest.mark.integration
def test_bind_conflict_and_rebind(nlq_lab: Lab) -> None:
    """A queue bound by another process is refused with a clear error, and free again after close."""
    worker = nlq_lab.spawn(nlq_lab.a, "queue", "accept", "0")
    worker.wait_ready()
    busy = nlq_lab.spawn(nlq_lab.a, "bind").result(timeout=20, stop=False)
    assert busy["errno"] in (errno.EPERM, errno.EBUSY)
    assert "already bound" in busy["message"] and str(QUEUE) in busy["message"]
    worker.result(timeout=20)
    free = nlq_lab.spawn(nlq_lab.a, "bind").result(timeout=20, stop=False)
    assert free == {"errno": 0, "message": "", "rebind": True}


# ----------------------------------------------------------------------------
# helper program (runs inside the namespaces)
# ----------------------------------------------------------------------------


def _emit(obj: object) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _ip_csum(h: memoryview, ihl: int) -> None:
    h[10:12] = b"\0\0"
    s = sum(struct.unpack_from(f"!{ihl // 2}H", h))
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    struct.pack_into("!H", h, 10, ~s & 0xFFFF)


def _tcp_csum(p: memoryview, ihl: int) -> None:
    """Full TCP checksum (test helper only; the gateway core has its own)."""
    seg = bytes(p[ihl:])
    seg = seg[:16] + b"\0\0" + seg[18:]
    data = bytes(p[12:20]) + struct.pack("!HH", 6, len(seg)) + seg + b"\0" * (len(seg) & 1)
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    struct.pack_into("!H", p, ihl + 16, ~s & 0xFFFF)


def _make_handler(mode: str, stats: dict[str, Any]) -> Callable[[memoryview, int, int], int]:
    hooks: set[int] = set()
    stats["hooks"] = hooks

    def note(p: memoryview, hook: int, info: int) -> int:
        stats["handled"] += 1
        stats["skbinfo_or"] |= info
        if len(p) > stats["max_len"]:
            stats["max_len"] = len(p)
        hooks.add(hook)
        return (p[0] & 15) * 4

    def accept(p: memoryview, hook: int, info: int) -> int:
        note(p, hook, info)
        return Verdict.ACCEPT

    def drop(p: memoryview, hook: int, info: int) -> int:
        note(p, hook, info)
        return Verdict.DROP

    def udp_mangle(p: memoryview, hook: int, info: int) -> int:
        ihl = note(p, hook, info)
        p[ihl + 8] = ord("M")
        p[ihl + 6 : ihl + 8] = b"\0\0"  # UDP checksum 0: none
        return Verdict.ACCEPT_MODIFIED

    def udp_mark(p: memoryview, hook: int, info: int) -> int:
        udp_mangle(p, hook, info)
        return Verdict.ACCEPT_MODIFIED_MARK

    def mixed(p: memoryview, hook: int, info: int) -> int:
        ihl = note(p, hook, info)
        i = int(bytes(p[ihl + 9 : ihl + 14])) % 3
        if i == 0:
            return Verdict.DROP
        if i == 1:
            p[ihl + 8] = ord("M")
            p[ihl + 6 : ihl + 8] = b"\0\0"
            return Verdict.ACCEPT_MODIFIED
        return Verdict.ACCEPT

    def ttl(p: memoryview, hook: int, info: int) -> int:
        ihl = note(p, hook, info)
        p[8] -= 1
        _ip_csum(p[:ihl], ihl)
        if info & (SkbInfo.CSUMNOTREADY | SkbInfo.GSO) == SkbInfo.CSUMNOTREADY:
            # Not GSO but checksum left partial: after a mangled verdict the
            # kernel sends what we wrote, so the TCP checksum must be complete.
            _tcp_csum(p, ihl)
        return Verdict.ACCEPT_MODIFIED

    def bare_accept(p: memoryview, hook: int, info: int) -> int:
        return Verdict.ACCEPT

    def bare_mangle(p: memoryview, hook: int, info: int) -> int:
        p[26:28] = b"\0\0"  # UDP checksum of an option-less IPv4 header: none
        return Verdict.ACCEPT_MODIFIED

    handlers: dict[str, Callable[[memoryview, int, int], int]] = {
        "accept": accept, "drop": drop, "udp_mangle": udp_mangle, "udp_mark": udp_mark,
        "mixed": mixed, "ttl": ttl, "bare_accept": bare_accept, "bare_mangle": bare_mangle,
    }  # fmt: skip
    return handlers[mode]


def _helper_queue(mode: str, gso: str) -> None:
    stats: dict[str, Any] = {"handled": 0, "skbinfo_or": 0, "max_len": 0, "max_batch": 0}
    handler = _make_handler(mode, stats)
    q = NetlinkQueue(QUEUE, gso=gso == "1")
    _emit({"ready": True})
    deadline = time.monotonic() + 120
    first = last = 0.0
    while time.monotonic() < deadline:
        r, _, _ = select.select([q, sys.stdin], [], [], 0.5)
        if q in r:
            n = q.receive(handler)
            if n:
                last = time.monotonic()
                first = first or last
                stats["max_batch"] = max(stats["max_batch"], n)
        if sys.stdin in r:
            break
    q.close()
    q.close()
    stats.update(hooks=sorted(stats["hooks"]), errors=q.errors, dropped=q.dropped,
                 enobufs=q.enobufs, span=last - first)  # fmt: skip
    _emit(stats)


def _helper_nfq() -> None:
    """netfilterqueue baseline for the bench: run(block=False) + pkt.accept()."""
    from netfilterqueue import NetfilterQueue  # type: ignore[import-not-found,unused-ignore]

    count = [0]
    first = [0.0]
    last = [0.0]

    def cb(pkt: Any) -> None:
        count[0] += 1
        pkt.accept()

    nfq = NetfilterQueue()
    nfq.bind(QUEUE, cb, max_len=4096, sock_len=16 << 20)
    fd = nfq.get_fd()
    _emit({"ready": True})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        r, _, _ = select.select([fd, sys.stdin], [], [], 0.5)
        if fd in r:
            before = count[0]
            nfq.run(block=False)
            if count[0] != before:
                last[0] = time.monotonic()
                first[0] = first[0] or last[0]
        if sys.stdin in r:
            break
    nfq.unbind()
    _emit({"handled": count[0], "span": last[0] - first[0]})


def _helper_drain(kind: str, mode: str) -> None:
    """Bench: bind with a huge backlog, wait for "go", then drain and time it.

    Packets queued while nobody reads pile up in the socket receive buffer;
    draining them afterwards measures the consumer (Python loop + kernel
    verdict and forwarding path) without a sender competing for the CPUs.
    """
    stats: dict[str, Any] = {"handled": 0, "skbinfo_or": 0, "max_len": 0}
    handled = [0]
    poll_fd: Any
    if kind == "nl":
        handler = _make_handler(mode, stats)
        q = NetlinkQueue(QUEUE, max_len=1_000_000, rcvbuf=512 << 20)
        poll_fd = q

        def step() -> None:
            handled[0] += q.receive(handler)
    else:
        from netfilterqueue import NetfilterQueue  # type: ignore[import-not-found,unused-ignore]

        def cb(pkt: Any) -> None:
            handled[0] += 1
            pkt.accept()

        def cb_mangle(pkt: Any) -> None:
            handled[0] += 1
            data = bytearray(pkt.get_payload())
            data[26:28] = b"\0\0"
            pkt.set_payload(bytes(data))
            pkt.accept()

        nfq = NetfilterQueue()
        nfq.bind(QUEUE, cb if mode == "bare_accept" else cb_mangle, max_len=1_000_000,
                 sock_len=512 << 20)  # fmt: skip
        poll_fd = nfq.get_fd()

        def step() -> None:
            nfq.run(block=False)

    _emit({"ready": True})
    sys.stdin.readline()
    t0 = time.monotonic()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    last = t0
    r1 = r0
    while True:
        r, _, _ = select.select([poll_fd], [], [], 0.5)
        if not r:
            break
        step()
        last = time.monotonic()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
    _emit({"handled": handled[0], "span": last - t0, "user": r1.ru_utime - r0.ru_utime,
           "sys": r1.ru_stime - r0.ru_stime,
           "enobufs": q.enobufs if kind == "nl" else None})  # fmt: skip


def _helper_flood(count: str) -> None:
    """Send `count` 64-byte UDP payloads as fast as possible (bench backlog)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, 32, 1 << 30)  # SO_SNDBUFFORCE: queued skbs count
    msg = b"#" * 64
    dst = (ADDR_B, 9000)
    for _ in range(int(count)):
        s.sendto(msg, dst)
    _emit({"sent": int(count)})


def _helper_bind() -> None:
    try:
        q = NetlinkQueue(QUEUE)
    except OSError as e:
        _emit({"errno": e.errno, "message": str(e)})
        return
    q.close()
    q.close()
    q2 = NetlinkQueue(QUEUE, gso=True, fail_open=True)
    q2.close()
    _emit({"errno": 0, "message": "", "rebind": True})


def _helper_udprecv() -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    s.bind((ADDR_B, 9000))
    s.setblocking(False)
    _emit({"ready": True})
    got: list[str] = []
    stop_at = time.monotonic() + 120
    while time.monotonic() < stop_at:
        r, _, _ = select.select([s, sys.stdin], [], [], 0.5)
        if s in r:
            while True:
                try:
                    got.append(s.recv(2048)[:6].decode())
                except BlockingIOError:
                    break
        if sys.stdin in r:
            stop_at = min(stop_at, time.monotonic() + 0.5)  # late packets
    _emit({"payloads": got})


def _helper_udpsend(count: str) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for i in range(int(count)):
        s.sendto(b"#%05d" % i + b"." * 20, (ADDR_B, 9000))
        if i % 50 == 49:
            time.sleep(0.002)
    _emit({"sent": int(count)})


def _helper_tcpsink() -> None:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((ADDR_B, 9001))
    srv.listen(1)
    srv.settimeout(60)
    _emit({"ready": True})
    conn, _ = srv.accept()
    conn.settimeout(60)
    h = hashlib.sha256()
    total = 0
    while chunk := conn.recv(1 << 20):
        h.update(chunk)
        total += len(chunk)
    _emit({"bytes": total, "sha256": h.hexdigest()})


def _helper_tcpsend(size: str) -> None:
    data = random.Random(1).randbytes(int(size))
    digest = hashlib.sha256(data).hexdigest()
    t0 = time.monotonic()
    c = socket.create_connection((ADDR_B, 9001), timeout=60)
    c.sendall(data)
    c.shutdown(socket.SHUT_WR)
    c.recv(1)  # wait for the peer's FIN
    c.close()
    _emit({"sha256": digest, "seconds": time.monotonic() - t0})


def _bench(seconds: float, which: str = "all") -> None:
    """64-byte UDP flood A->B: packets/s through each kind of queue consumer."""
    if which in ("all", "flood"):
        _bench_flood(seconds)
    if which in ("all", "drain"):
        _bench_drain()


def _bench_flood(seconds: float) -> None:
    if not shutil.which("iperf3"):
        raise SystemExit("iperf3 is needed (apt-get install -y iperf3)")
    results = {}
    for kind in ("none", "nfqueue", "netfilterqueue"):
        lab = _lab_up()
        try:
            worker = None
            if kind == "none":
                lab.iptables("-t", "mangle", "-F", "OUTPUT")
            elif kind == "nfqueue":
                worker = lab.spawn(lab.a, "queue", "accept", "0")
            else:
                worker = lab.spawn(lab.a, "nfq")
            if worker:
                worker.wait_ready()
            server = subprocess.Popen(["ip", "netns", "exec", lab.b, "iperf3", "-s", "-1"],
                                      stdout=subprocess.DEVNULL)  # fmt: skip
            time.sleep(0.5)
            cli = _run("ip", "netns", "exec", lab.a, "iperf3", "-c", ADDR_B, "-u", "-l", "64",
                       "-b", "0", "-t", str(seconds), "-J")  # fmt: skip
            server.wait(timeout=30)
            rep = json.loads(cli.stdout)["end"]["sum"]
            sent = rep["packets"]
            lost = rep["lost_packets"]
            row = {"sent_pps": sent / seconds, "delivered_pps": (sent - lost) / seconds}
            if worker:
                st_ = worker.result(timeout=30)
                row["handled_pps"] = st_["handled"] / max(st_["span"], 1e-9)
            results[kind] = row
        finally:
            _lab_down(lab)
    for kind, row in results.items():
        print("flood", kind, " ".join(f"{k}={v:,.0f}" for k, v in row.items()))


def _bench_drain() -> None:
    # Kernel 6.18 keeps queued entries in a hash table limited to 65536
    # ("nf_queue: hash insert failed: -7" beyond that): stay below it.
    backlog = 60_000
    runs = [(k, m) for m in ("bare_accept", "bare_mangle") for k in ("nl", "nfq")]
    for kind, mode in runs:
        lab = _lab_up()
        try:
            worker = lab.spawn(lab.a, "drain", kind, mode)
            worker.wait_ready()
            lab.spawn(lab.a, "flood", str(backlog)).result(timeout=60, stop=False)
            res = worker.result(timeout=120)
            label = {"nl": "nfqueue", "nfq": "netfilterqueue"}[kind]
            n = res["handled"]
            print(f"drain {label} {mode[5:]}: {n:,} packets in {res['span']:.2f} s"
                  f" = {n / res['span']:,.0f} packets/s,"
                  f" consumer CPU/packet user {res['user'] / n * 1e6:.1f} us"
                  f" + sys {res['sys'] / n * 1e6:.1f} us"
                  f" (enobufs {res['enobufs']})")  # fmt: skip
        finally:
            _lab_down(lab)


def _main(argv: list[str]) -> None:
    mode, args = argv[0], argv[1:]
    if mode == "queue":
        _helper_queue(*args)
    elif mode == "nfq":
        _helper_nfq()
    elif mode == "drain":
        _helper_drain(*args)
    elif mode == "flood":
        _helper_flood(*args)
    elif mode == "bind":
        _helper_bind()
    elif mode == "udprecv":
        _helper_udprecv()
    elif mode == "udpsend":
        _helper_udpsend(*args)
    elif mode == "tcpsink":
        _helper_tcpsink()
    elif mode == "tcpsend":
        _helper_tcpsend(*args)
    elif mode == "bench":
        _bench(float(args[0]) if args else 3.0, args[1] if len(args) > 1 else "all")
    else:
        raise SystemExit(f"unknown helper mode {mode}")


if __name__ == "__main__":
    _main(sys.argv[1:])
