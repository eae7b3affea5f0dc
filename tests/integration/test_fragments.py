"""Fragmented UDP, TCP and ICMP cross the gateway both ways, in order and out of order.

The kernel reassembles in front of the queue (a never-matching ``-m socket`` rule pulls in
nf_defrag_ipv4 without conntrack: docs/kernel.md, "Fragments"), the core translates the
whole datagram, and the kernel fragments it again for the next link. Each test asserts on
what the far side received, whole.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from gateway.lab import layout as t
from gateway.lab.layout import LabNames
from gateway.lab.netns import ns_run
from gateway.lab.procs import ProcessSet
from tests.integration import helpers as h

pytestmark = pytest.mark.integration

ECHO_PORT = 6000
SIZE = 3000

#: UDP server on the internet side: prints each datagram's size and sender, answers with
#: "ip:port\n" padded to the same size (so the reply is fragmented as well).
ECHO_SERVER = r"""
import json, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
print(json.dumps({"ready": True}), flush=True)
s.settimeout(30)
for _ in range(20):
    try:
        data, peer = s.recvfrom(65535)
    except TimeoutError:
        break
    print(json.dumps({"len": len(data), "from": list(peer), "whole": data == data[:1] * len(data)}),
          flush=True)
    s.sendto(f"{peer[0]}:{peer[1]}\n".encode().ljust(len(data), b"r"), peer)
"""

#: Backend side: one UDP socket; sends a datagram (by the socket, or as scapy fragments in
#: reverse order), prints the reply, then prints whatever else arrives (an injection).
BACKEND = r"""
import json, socket, sys
src, dst, port, size, how = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((src, 0))
s.settimeout(5)
payload = b"b" * size
if how == "socket":
    s.sendto(payload, (dst, port))
else:
    from scapy.all import IP, UDP, conf, fragment, send
    conf.verb = 0
    pkt = IP(src=src, dst=dst) / UDP(sport=s.getsockname()[1], dport=port) / payload
    send(list(reversed(fragment(pkt, fragsize=1000))))
for _ in range(2):
    try:
        data, peer = s.recvfrom(65535)
        print(json.dumps({"len": len(data), "from": list(peer),
                          "head": data.split(b"\n")[0].decode(errors="replace")}), flush=True)
    except TimeoutError:
        print(json.dumps({"timeout": True}), flush=True)
"""

#: Internet side: fragments of one UDP datagram to a public ip:port, in reverse order.
INJECT = r"""
import sys
from scapy.all import IP, UDP, conf, fragment, send
conf.verb = 0
src, dst, sport, dport, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
pkt = IP(src=src, dst=dst) / UDP(sport=sport, dport=dport) / (b"i" * size)
send(list(reversed(fragment(pkt, fragsize=1000))))
"""

#: A TCP SYN cut into 8-byte fragments (only the first carries the ports), out of order.
TCP_FRAGS = r"""
import sys
from scapy.all import IP, TCP, conf, fragment, send
conf.verb = 0
pkt = IP(src=sys.argv[1], dst=sys.argv[2]) / TCP(sport=43210, dport=80, flags="S", seq=1000)
frags = fragment(pkt, fragsize=8)
send([frags[1], frags[0], *frags[2:]])
"""


def _counters(gw: h.GatewayProc) -> dict[str, int]:
    """The running gateway's counters (``snatgw stats``)."""
    counters: dict[str, int] = gw.ask("stats")["counters"]
    return counters


class _Lines:
    """JSON lines of a process we started, read one at a time (bounded by the caller)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc

    def next(self) -> dict[str, object]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"process ended: {self.proc.stderr.read().decode()[-2000:] if self.proc.stderr else ''}"
        out: dict[str, object] = json.loads(line)
        return out



@pytest.fixture()
def echo(lab: LabNames, procs: ProcessSet) -> _Lines:
    server = _Lines(procs.start(lab.inet, [h.PYTHON, "-c", ECHO_SERVER, t.SERVER, str(ECHO_PORT)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    assert server.next() == {"ready": True}
    return server


def _backend(lab: LabNames, procs: ProcessSet, src: str, how: str) -> _Lines:
    argv = [h.PYTHON, "-c", BACKEND, src, t.SERVER, str(ECHO_PORT), str(SIZE), how]
    return _Lines(procs.start(lab.be, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE))


@pytest.mark.parametrize("how", ["socket", "reversed"])
def test_a_3000_byte_udp_datagram_crosses_both_ways(
    lab: LabNames, gateway: h.GatewayFactory, echo: _Lines, procs: ProcessSet, how: str
) -> None:
    """3000-byte UDP out (whole or fragments in reverse order) and back, and reversed
    fragments injected from outside: every side receives the whole datagram, translated."""
    gw = gateway(h.lab_config())
    be = _backend(lab, procs, t.POOL_MEMBERS[0], how)
    got = echo.next()
    assert got["len"] == SIZE and got["whole"] is True, got
    pub, pport = got["from"]  # type: ignore[misc]
    assert pub == t.FRONTEND_IP
    reply = be.next()
    assert reply == {"len": SIZE, "from": [t.SERVER, ECHO_PORT], "head": f"{pub}:{pport}"}, reply
    ns_run(lab.inet, [h.PYTHON, "-c", INJECT, t.SERVER, pub, str(ECHO_PORT), str(pport), str(SIZE)])
    injected = be.next()
    assert injected.get("len") == SIZE and injected.get("from") == [t.SERVER, ECHO_PORT], injected
    assert _counters(gw)["drop_fragment"] == 0


def test_ping_with_3000_bytes_both_ways(lab: LabNames, gateway: h.GatewayFactory) -> None:
    """`ping -s 3000` from a backend: the request leaves fragmented, the reply comes back
    fragmented, and both are reassembled and translated."""
    gw = gateway(h.lab_config())
    ping = ["ping", "-n", "-c", "3", "-i", "0.2", "-W", "2", "-s", str(SIZE), "-I", t.STANDALONE[0],
            t.SERVER]
    with h.Capture(lab.inet, t.INET_IF, "icmp") as cap:
        res = ns_run(lab.be, ping, check=False, timeout=20)
    out = res.stdout.decode()
    assert res.returncode == 0 and "3 received" in out, out
    assert f"{SIZE + 8} bytes from {t.SERVER}" in out, out
    requests = [ln for ln in cap.lines if "echo request" in ln]
    assert len(requests) == 3 and all(h.Capture.ip_source(ln) in t.DEFAULT_SNAT for ln in requests)
    assert _counters(gw)["drop_fragment"] == 0


def test_a_fragmented_tcp_syn_reaches_the_server_translated(
    lab: LabNames, gateway: h.GatewayFactory
) -> None:
    """A SYN split into 8-byte fragments, sent out of order, reaches the server from the
    frontend address (its SYN-ACK says so: the gateway keeps the sender's fragment size, so
    the SYN itself crosses eth0 in fragments); without the defrag rule it is dropped."""
    gw = gateway(h.lab_config())
    syn = f"tcp and src host {t.SERVER} and dst host {t.FRONTEND_IP} and tcp[tcpflags] & tcp-syn != 0"
    with h.Capture(lab.inet, t.INET_IF, syn) as cap:
        ns_run(lab.be, [h.PYTHON, "-c", TCP_FRAGS, t.POOL_MEMBERS[1], t.SERVER])
        h.poll_until(lambda: cap.current(), 5)
    assert len(cap.lines) == 1, cap.lines
    # The control: without the defrag rule the same fragments never make it.
    ns_run(lab.gw, ["iptables", "-w", "-t", "raw", "-D", "SNATGW-PRE", "-i", "lo", "-m", "socket",
                    "-j", "RETURN"])
    with h.Capture(lab.inet, t.INET_IF, syn) as cap:
        ns_run(lab.be, [h.PYTHON, "-c", TCP_FRAGS, t.POOL_MEMBERS[1], t.SERVER])
        h.wait_until(lambda: _counters(gw)["drop_fragment"] > 0, 5, what="fragments dropped")
    assert cap.lines == [], cap.lines
