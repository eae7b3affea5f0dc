"""Re-queue between two workers through a real kernel (docs/kernel.md, "Steering").

Three namespaces of our own: a client (10.99.0.2), a router (10.99.0.1, 10.99.1.1) and a far
side (10.99.1.2). The router runs two PacketLoops of one test process, worker 0 and worker 1
of 3 (queues 10/11 and 12/13; worker 2's queues 14/15 have no listener), with stub tables:
plain objects whose entry points answer fixed verdicts. Worker 0 answers REQUEUES[1] to
everything; what worker 1 does decides what the far side's socket receives. The queues, the
NF_QUEUE verdicts, the marks and the forwarding are the kernel's; the assertions are on what
the far side received and on the kernel's queue counters.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from gateway.adapters.kernel import Hook, Mark
from gateway.adapters.loop import PacketLoop
from gateway.adapters.nfqueue import Handler
from gateway.core.verdict import REQUEUES, Verdict

pytestmark = pytest.mark.integration

QUEUE = 10
CLIENT, ROUTER_IN, ROUTER_OUT, FAR = "10.99.0.2", "10.99.0.1", "10.99.1.1", "10.99.1.2"
#: Destination ports, one per case: in2out (POSTROUTING), out2in (PREROUTING, the FORWARD filter
#: lets it through only with INSIDE|REQUEUED), hairpin, a second REQUEUE, TCP (SYN only), and a
#: packet worker 0 hands to worker 2, which is not running.
P_IN2OUT, P_OUT2IN, P_HAIRPIN, P_TWICE, P_TCP, P_NOBODY = 7000, 7002, 7003, 7004, 7001, 7005
WAIT = 5.0
QUIET = 1.0

_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNET = 0x40000000


def _run(*cmd: str) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 0, f"{' '.join(cmd)}: {res.stderr}"


@contextlib.contextmanager
def in_netns(ns: str) -> Iterator[None]:
    """Run the block with this thread in namespace ``ns`` (sockets made there stay there)."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if _libc.setns(target, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {ns}")
        try:
            yield
        finally:
            if _libc.setns(home, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")  # the session cannot go on
    finally:
        os.close(target)
        os.close(home)


def _udp_dport(p: memoryview) -> int:
    ihl = (p[0] & 15) * 4
    return int(p[ihl + 2] << 8 | p[ihl + 3])


@dataclass
class StubTable:
    """A table with fixed answers: ``answer(name, packet)`` gives the verdict (and may rewrite)."""

    answer: Callable[[str, memoryview], int]
    calls: list[tuple[str, bytes]] = field(default_factory=list)
    misrouted: int = 0
    events: list[object] = field(default_factory=list)

    def _entry(self, name: str, buf: memoryview) -> int:
        self.calls.append((name, bytes(buf)))
        return self.answer(name, buf)

    def in2out(self, buf: memoryview, now: float) -> int:
        return self._entry("in2out", buf)

    def out2in(self, buf: memoryview, now: float) -> int:
        return self._entry("out2in", buf)

    def hairpin(self, buf: memoryview, now: float) -> int:
        return self._entry("hairpin", buf)

    def hairpin_second(self, buf: memoryview, now: float) -> int:
        return self._entry("hairpin_second", buf)

    def local_out(self, buf: memoryview, now: float) -> int:
        return self._entry("local_out", buf)

    def count_misrouted(self) -> None:
        self.misrouted += 1

    def count_internal_error(self) -> None:
        raise AssertionError("the stub table never fails")

    def get_timer(self) -> float | None:
        return None

    def handle_timer(self, now: float) -> None:
        pass


def _worker0(name: str, p: memoryview) -> int:
    """Hand everything to worker 1 (P_NOBODY to worker 2); a UDP packet with its first data
    byte set to 'A' first."""
    if p[9] == socket.IPPROTO_UDP:
        p[(p[0] & 15) * 4 + 8] = ord("A")
        if _udp_dport(p) == P_NOBODY:
            return REQUEUES[2]
    return REQUEUES[1]


def _worker1(name: str, p: memoryview) -> int:
    """Accept TCP unchanged; hand P_TWICE back (a second REQUEUE); rewrite the rest's second
    data byte to 'B' and clear the UDP checksum (0: none, RFC 768)."""
    if p[9] != socket.IPPROTO_UDP:
        return Verdict.ACCEPT
    if _udp_dport(p) == P_TWICE:
        return REQUEUES[0]
    ihl = (p[0] & 15) * 4
    p[ihl + 9] = ord("B")
    p[ihl + 6 : ihl + 8] = b"\0\0"
    return Verdict.ACCEPT_MODIFIED


@dataclass
class Lab:
    client: str
    router: str
    far: str
    tables: list[StubTable]
    hooks: list[list[int]]


def _queue_ids(ns: str) -> dict[int, int]:
    """Queue number -> id_sequence (packets ever queued there), from the kernel."""
    out = subprocess.run(["ip", "netns", "exec", ns, "cat", "/proc/net/netfilter/nfnetlink_queue"],
                         capture_output=True, text=True, timeout=10, check=True).stdout  # fmt: skip
    return {int(f[0]): int(f[7]) for f in (line.split() for line in out.splitlines())}


def _topology(lab: Lab) -> None:
    for ns in (lab.client, lab.router, lab.far):
        _run("ip", "netns", "add", ns)
        _run("ip", "-n", ns, "link", "set", "lo", "up")
    _run(
        "ip",
        "-n",
        lab.client,
        "link",
        "add",
        "vc",
        "type",
        "veth",
        "peer",
        "name",
        "vg0",
        "netns",
        lab.router,
    )
    _run("ip", "-n", lab.far, "link", "add", "vs", "type", "veth", "peer", "name", "vg1", "netns", lab.router)
    for ns, dev, addr in (
        (lab.client, "vc", CLIENT), (lab.router, "vg0", ROUTER_IN),
        (lab.router, "vg1", ROUTER_OUT), (lab.far, "vs", FAR),
    ):  # fmt: skip
        _run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
        _run("ip", "-n", ns, "link", "set", dev, "up")
    _run("ip", "-n", lab.client, "route", "add", "default", "via", ROUTER_IN)
    _run("ip", "-n", lab.far, "route", "add", "default", "via", ROUTER_OUT)
    _run("ip", "netns", "exec", lab.router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    inside, hairpin, both = f"0x{Mark.INSIDE:x}", f"0x{Mark.HAIRPIN:x}", f"0x{Mark.INSIDE | Mark.REQUEUED:x}"
    ports = f"{P_IN2OUT},{P_TWICE},{P_NOBODY}"
    rules = f"""*mangle
-A PREROUTING -i vg0 -j MARK --set-xmark {inside}/{inside}
-A PREROUTING -i vg0 -p udp --dport {P_OUT2IN} -j NFQUEUE --queue-num {QUEUE}
-A PREROUTING -i vg0 -p udp --dport {P_HAIRPIN} -j MARK --set-xmark {hairpin}/{hairpin}
-A PREROUTING -i vg0 -p udp --dport {P_HAIRPIN} -j NFQUEUE --queue-num {QUEUE}
-A POSTROUTING -o vg1 -p udp -m multiport --dports {ports} -j NFQUEUE --queue-num {QUEUE}
-A POSTROUTING -o vg1 -p tcp --dport {P_TCP} --syn -j NFQUEUE --queue-num {QUEUE + 1}
COMMIT
*filter
-A FORWARD -p udp --dport {P_OUT2IN} -m mark --mark {both}/{both} -j ACCEPT
-A FORWARD -p udp --dport {P_OUT2IN} -j DROP
COMMIT
"""
    res = subprocess.run(["ip", "netns", "exec", lab.router, "iptables-restore"], input=rules,
                         capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    assert res.returncode == 0, res.stderr


def _recording(handler: Handler, hooks: list[int]) -> Handler:
    """The loop's own handler, noting the hook each packet arrived with."""

    def recording(p: memoryview, hook: int, info: int) -> int:
        hooks.append(hook)
        return handler(p, hook, info)

    return recording


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """The three namespaces and both workers' loops running in threads; all removed afterwards."""
    tag = uuid.uuid4().hex[:5]
    lab = Lab(
        f"w2rq{tag}c", f"w2rq{tag}r", f"w2rq{tag}f", [StubTable(_worker0), StubTable(_worker1)], [[], []]
    )
    loops: list[PacketLoop] = []
    threads: list[threading.Thread] = []
    try:
        _topology(lab)
        with in_netns(lab.router):
            for i, table in enumerate(lab.tables):
                loops.append(PacketLoop(table, QUEUE, worker=i, workers=3))  # type: ignore[arg-type]
        for loop, hooks in zip(loops, lab.hooks, strict=True):
            loop._nl_packet = _recording(loop._nl_packet, hooks)  # type: ignore[method-assign,assignment]
            threads.append(threading.Thread(target=loop.run, daemon=True))
            threads[-1].start()
        yield lab
    finally:
        for loop in loops:
            loop.stop()
        for t in threads:
            t.join(timeout=WAIT)
        for loop in loops:
            loop.close()
        for ns in (lab.client, lab.router, lab.far):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30, check=False)
        assert not any(t.is_alive() for t in threads), "a packet loop did not stop"


def _send_udp(lab: Lab, port: int, data: bytes) -> socket.socket:
    """Bind the far side's socket on ``port``, send ``data`` from the client; return the far socket."""
    with in_netns(lab.far):
        far = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    far.bind(("0.0.0.0", port))
    with in_netns(lab.client):
        cli = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with cli:
        cli.sendto(data, (FAR, port))
    return far


def _wait_for(cond: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


@pytest.mark.parametrize(
    ("port", "first", "second", "hook"),
    [
        (P_IN2OUT, "in2out", "in2out", Hook.POST_ROUTING),
        (P_OUT2IN, "out2in", "out2in", Hook.PRE_ROUTING),
        (P_HAIRPIN, "hairpin", "hairpin_second", Hook.PRE_ROUTING_HAIRPIN),
    ],
)
def test_worker_1_gets_the_rewritten_packet_and_its_verdict_reaches_the_far_side(
    lab: Lab, port: int, first: str, second: str, hook: int
) -> None:
    """A packet worker 0 hands to worker 1 arrives there once, rewritten by worker 0 and marked
    REQUEUED; the far side receives it as worker 1 rewrote it (for out2in the FORWARD filter
    passes it only with the INSIDE and REQUEUED marks)."""
    w0, w1 = lab.tables
    n0, n1 = len(w0.calls), len(w1.calls)
    h1 = len(lab.hooks[1])
    data = f"..{port}-payload".encode()
    far = _send_udp(lab, port, data)
    with far:
        far.settimeout(WAIT)
        got, src = far.recvfrom(2048)
    assert got == b"AB" + data[2:] and src[0] == CLIENT
    assert [c[0] for c in w0.calls[n0:]] == [first]
    assert [c[0] for c in w1.calls[n1:]] == [second]
    assert w1.calls[n1][1].endswith(b"A." + data[2:])  # worker 0's rewrite came along
    assert lab.hooks[1][h1:] == [hook | Hook.REQUEUED]
    assert w1.misrouted == 0


def test_a_second_requeue_is_dropped_and_counted(lab: Lab) -> None:
    """Worker 1 answering REQUEUE for a packet handed to it is a drop counted as misrouted: the far
    side receives nothing and the kernel queued the packet once on each worker, not back on 0."""
    w1 = lab.tables[1]
    before = _queue_ids(lab.router)
    n1, m1 = len(w1.calls), w1.misrouted
    far = _send_udp(lab, P_TWICE, b"..twice")
    with far:
        assert _wait_for(lambda: w1.misrouted == m1 + 1)
        far.settimeout(QUIET)
        with pytest.raises(TimeoutError):
            far.recvfrom(2048)
    assert [c[0] for c in w1.calls[n1:]] == ["in2out"]
    after = _queue_ids(lab.router)
    assert (after[QUEUE] - before[QUEUE], after[QUEUE + 2] - before[QUEUE + 2]) == (1, 1)


def test_tcp_is_handed_to_the_tcp_queue_of_the_other_worker(lab: Lab) -> None:
    """A SYN on worker 0's TCP queue is handed to worker 1's TCP queue (13, not 12) with a full
    checksum (the far side accepts the connection) and the data then flows."""
    before = _queue_ids(lab.router)
    with in_netns(lab.far):
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with srv:
        srv.bind(("0.0.0.0", P_TCP))
        srv.listen(1)
        srv.settimeout(WAIT)
        with in_netns(lab.client):
            cli = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with cli:
            cli.settimeout(WAIT)
            cli.connect((FAR, P_TCP))
            conn, _ = srv.accept()
            with conn:
                cli.sendall(b"over tcp")
                conn.settimeout(WAIT)
                assert conn.recv(64) == b"over tcp"
    after = _queue_ids(lab.router)
    delta = {q: after.get(q, 0) - before.get(q, 0) for q in range(QUEUE, QUEUE + 4)}
    assert delta == {QUEUE: 0, QUEUE + 1: 1, QUEUE + 2: 0, QUEUE + 3: 1}
    assert struct.unpack("!H", lab.tables[1].calls[-1][1][22:24])[0] == P_TCP


def test_a_packet_handed_to_a_worker_nobody_runs_is_dropped(lab: Lab) -> None:
    """Fail closed: worker 0 hands a packet to worker 2, whose queue has no listener; the kernel
    drops it (no bypass), so the far side receives nothing and worker 1 never sees it."""
    w0, w1 = lab.tables
    n0, n1 = len(w0.calls), len(w1.calls)
    before = _queue_ids(lab.router)
    assert QUEUE + 4 not in before and QUEUE + 5 not in before
    far = _send_udp(lab, P_NOBODY, b"..nobody")
    with far:
        assert _wait_for(lambda: len(w0.calls) == n0 + 1)
        far.settimeout(QUIET)
        with pytest.raises(TimeoutError):
            far.recvfrom(2048)
    assert len(w1.calls) == n1 and w0.misrouted == 0
    assert _queue_ids(lab.router)[QUEUE] == before[QUEUE] + 1
