"""The steering rules load into a real kernel for 1 to 16 workers (docs/kernel.md, "Steering"):
iptables-restore takes every u32 test and port range, and going back to one worker or to the
guard deletes the steering chains in the same commit."""

from __future__ import annotations

import contextlib
import ipaddress
import select
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from gateway.adapters.iptables import STEER_CHAINS, jumps_present, ruleset, steering_present
from gateway.adapters.nfqueue import NetlinkQueue
from gateway.core.shard import backend_owner, slice_ports
from gateway.core.verdict import Verdict
from tests.integration.test_requeue import in_netns

pytestmark = pytest.mark.integration

PUBS = [0xC633640A, 0xC633640B, 0xC6336414]  # 198.51.100.10, .11 (PAT), .20 (instance IP)
INSTANCE = {0xC6336414: 0}


def _run(*cmd: str, data: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, input=data, capture_output=True, text=True, timeout=30, check=False)


@pytest.fixture
def netns() -> Iterator[str]:
    """A namespace of our own with the two interfaces the rules name; deleted afterwards."""
    ns = f"w2st{uuid.uuid4().hex[:6]}"
    assert _run("ip", "netns", "add", ns).returncode == 0
    try:
        res = _run("ip", "-n", ns, "link", "add", "in0", "type", "veth", "peer", "name", "out0")
        assert res.returncode == 0, res.stderr
        yield ns
    finally:
        _run("ip", "netns", "del", ns)


def _restore(ns: str, text: str) -> None:
    res = _run("ip", "netns", "exec", ns, "iptables-restore", "--noflush", "-w", data=text)
    assert res.returncode == 0, f"{res.stderr}\n{text}"


def _save(ns: str) -> str:
    res = _run("ip", "netns", "exec", ns, "iptables-save")
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.mark.parametrize("workers", [1, 2, 3, 4, 16])
def test_rules_load_then_give_way_to_the_guard(netns: str, workers: int) -> None:
    """The rule set for N workers (three public addresses, one an instance IP) is accepted by
    iptables-restore and read back with one queue pair per worker; the guard that follows
    leaves no steering chain and no queue rule."""
    tcp = 11
    text = ruleset("in0", "out0", 10, PUBS, tcp, workers=workers, owners=INSTANCE, probes=True)
    test = _run("ip", "netns", "exec", netns, "iptables-restore", "--noflush", "--test", data=text)
    assert test.returncode == 0, test.stderr
    _restore(netns, text)
    saved = _save(netns)
    queues = {int(w.split()[0]) for w in saved.split("--queue-num ")[1:]}
    assert queues == set(range(10, 10 + 2 * workers))
    assert steering_present(saved) == (list(STEER_CHAINS) if workers > 1 else [])
    if workers > 1:
        assert saved.count("-m u32") == 2 * workers + workers  # SNATGW-SRC pairs, echo reply ids
    present = steering_present(saved)
    guard = ruleset(
        "in0", "out0", 0, [], None, translate=False, existing=jumps_present(saved), chains=present
    )
    _restore(netns, guard)
    after = _save(netns)
    assert steering_present(after) == [] and "NFQUEUE" not in after
    assert after.count("-A POSTROUTING -j SNATGW-") == 2
    assert "-A SNATGW-GUARD -o out0 -m mark --mark 0x20000000/0x20000000 -j DROP" in after


# --- packets through the rules: each reaches the queue of the worker that owns it ------------

WORKERS = 4
QUEUE = 10
PAT, INST_IP = "203.0.113.10", "203.0.113.20"
REMOTE = "203.0.113.2"
INSIDE_NET = "10.98.0."


@dataclass
class SteerLab:
    gw: str
    inside: str
    outside: str
    queues: list[NetlinkQueue] = field(default_factory=list)
    got: list[tuple[int, bytes]] = field(default_factory=list)


@pytest.fixture(scope="module")
def steer_lab() -> Iterator[SteerLab]:
    """A gateway namespace with the 4-worker rules and all 8 queues bound (every packet
    dropped after it is noted), an inside and an outside namespace; removed afterwards."""
    tag = uuid.uuid4().hex[:5]
    lab = SteerLab(f"w2sg{tag}", f"w2si{tag}", f"w2so{tag}")
    try:
        for ns in (lab.gw, lab.inside, lab.outside):
            _ok("ip", "netns", "add", ns)
            _ok("ip", "-n", ns, "link", "set", "lo", "up")
        _ok(
            "ip", "-n", lab.gw, "link", "add", "in0", "type", "veth", "peer", "name", "v", "netns", lab.inside
        )
        _ok(
            "ip",
            "-n",
            lab.gw,
            "link",
            "add",
            "out0",
            "type",
            "veth",
            "peer",
            "name",
            "v",
            "netns",
            lab.outside,
        )
        _ok("ip", "-n", lab.gw, "addr", "add", f"{INSIDE_NET}1/24", "dev", "in0")
        for a in ("203.0.113.1/24", f"{PAT}/32", f"{INST_IP}/32"):
            _ok("ip", "-n", lab.gw, "addr", "add", a, "dev", "out0")
        for i in range(2, 18):  # sources with every value of the low four bits
            _ok("ip", "-n", lab.inside, "addr", "add", f"{INSIDE_NET}{i}/24", "dev", "v")
        for i in range(2, 6):
            _ok("ip", "-n", lab.outside, "addr", "add", f"203.0.113.{i}/24", "dev", "v")
        for ns, dev in ((lab.gw, "in0"), (lab.gw, "out0"), (lab.inside, "v"), (lab.outside, "v")):
            _ok("ip", "-n", ns, "link", "set", dev, "up")
        _ok("ip", "-n", lab.inside, "route", "add", "default", "via", f"{INSIDE_NET}1")
        _ok("ip", "-n", lab.outside, "route", "add", "default", "via", "203.0.113.1")
        _ok("ip", "netns", "exec", lab.gw, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        pubs = [int(ipaddress.IPv4Address(a)) for a in (PAT, INST_IP)]
        owners = {pubs[1]: 3}
        _restore(lab.gw, ruleset("in0", "out0", QUEUE, pubs, QUEUE + 1, workers=WORKERS, owners=owners))
        with in_netns(lab.gw):
            for q in range(QUEUE, QUEUE + 2 * WORKERS):
                lab.queues.append(NetlinkQueue(q, gso=bool((q - QUEUE) & 1)))
        yield lab
    finally:
        for nq in lab.queues:
            nq.close()
        for ns in (lab.gw, lab.inside, lab.outside):
            _run("ip", "netns", "del", ns)


def _ok(*cmd: str) -> None:
    res = _run(*cmd)
    assert res.returncode == 0, f"{' '.join(cmd)}: {res.stderr}"


def _drain(lab: SteerLab, want: int) -> list[tuple[int, bytes]]:
    """Read the queues (dropping every packet) until ``want`` packets arrived or 5 s passed."""
    got: list[tuple[int, bytes]] = []
    deadline = time.monotonic() + 5.0
    while len(got) < want and time.monotonic() < deadline:
        ready, _, _ = select.select(lab.queues, [], [], 0.1)
        for nq in ready:
            num = nq.queue_num

            def note(p: memoryview, hook: int, info: int, num: int = num) -> int:
                got.append((num, bytes(p)))
                return Verdict.DROP

            nq.receive(note)
    return got


def _send(ns: str, proto: int, src: str, dst: str, dport: int) -> None:
    """One UDP datagram, TCP SYN (a connect that times out at once) or echo reply from ``src``."""
    with in_netns(ns):
        kind = {socket.IPPROTO_UDP: socket.SOCK_DGRAM, socket.IPPROTO_TCP: socket.SOCK_STREAM}.get(proto)
        s = socket.socket(socket.AF_INET, kind or socket.SOCK_RAW, proto if kind is None else 0)
    with s:
        s.bind((src, 0))
        if proto == socket.IPPROTO_UDP:
            s.sendto(b"steer", (dst, dport))
        elif proto == socket.IPPROTO_TCP:
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect((dst, dport))
        else:  # echo reply (type 0) with identifier dport
            head = struct.pack("!BBHHH", 0, 0, 0, dport, 1) + b"steer"
            s.sendto(head[:2] + struct.pack("!H", _csum(head)) + head[4:], (dst, 0))


def _csum(data: bytes) -> int:
    data += b"\0" * (len(data) & 1)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _owner_queue(proto: int, worker: int) -> int:
    return QUEUE + 2 * worker + (proto == socket.IPPROTO_TCP)


def test_each_packet_reaches_the_queue_of_its_owner(steer_lab: SteerLab) -> None:
    """With 4 workers in a real kernel: in2out and hairpin by the source's low bits, return
    traffic to the PAT address by TCP/UDP port slice and echo reply identifier, other ports by
    the remote's low bits, an instance IP whole to its owner; TCP to the TCP queue."""
    lab = steer_lab
    cases: list[tuple[str, int, str, str, int, int]] = []  # ns, proto, src, dst, dport, worker
    for i in range(2, 18):
        src = f"{INSIDE_NET}{i}"
        for proto in (socket.IPPROTO_UDP, socket.IPPROTO_TCP):
            cases.append((lab.inside, proto, src, REMOTE, 7000, backend_owner(i, WORKERS)))
        cases.append((lab.inside, socket.IPPROTO_UDP, src, PAT, 7000, backend_owner(i, WORKERS)))
    for w in range(WORKERS):
        lo, hi = slice_ports(w, WORKERS)
        for port in (lo, hi, (lo + hi) // 2):
            for proto in (socket.IPPROTO_UDP, socket.IPPROTO_TCP, socket.IPPROTO_ICMP):
                cases.append((lab.outside, proto, "203.0.113.3", PAT, port, w))
    for r in range(2, 6):
        remote = f"203.0.113.{r}"
        cases.append((lab.outside, socket.IPPROTO_UDP, remote, PAT, 53, backend_owner(r, WORKERS)))
        cases.append((lab.outside, socket.IPPROTO_TCP, remote, PAT, 443, backend_owner(r, WORKERS)))
        cases.append((lab.outside, socket.IPPROTO_UDP, remote, INST_IP, 40000, 3))
        cases.append((lab.outside, socket.IPPROTO_TCP, remote, INST_IP, 80, 3))
    wrong = []
    for ns, proto, src, dst, dport, worker in cases:
        _send(ns, proto, src, dst, dport)
        got = _drain(lab, 1)
        want = _owner_queue(proto, worker)
        if [(q, p[9], socket.inet_ntoa(p[12:16]), socket.inet_ntoa(p[16:20])) for q, p in got[:1]] != [
            (want, proto, src, dst)
        ] or len(got) != 1:
            wrong.append((proto, src, dst, dport, want, [(q, len(p)) for q, p in got]))
    assert not wrong, wrong
