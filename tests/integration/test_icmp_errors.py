"""ICMP errors cross the gateway with their quoted header translated, both ways.

Path MTU discovery is checked where it takes effect: a "fragmentation needed"
sent to the public address must lower the MTU the backend's own socket sees,
which only happens if the backend's kernel recognises the quoted packet as its
own (private address and port restored in the quote).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator

import pytest

from gateway.lab import layout as t
from gateway.lab.layout import LabNames
from gateway.lab.netns import ns_popen, ns_run
from tests.integration import helpers as h

pytestmark = pytest.mark.integration

PMTU_CLIENT = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 0))
s.connect((sys.argv[2], 5000))
s.setsockopt(socket.IPPROTO_IP, 10, 2)   # IP_MTU_DISCOVER = IP_PMTUDISC_DO
s.settimeout(3)
s.send(b"hello")
print(s.recv(100).decode().strip(), flush=True)
deadline = time.monotonic() + 8
mtu = s.getsockopt(socket.IPPROTO_IP, 14)   # IP_MTU
while mtu != 1280 and time.monotonic() < deadline:
    time.sleep(0.05)
    mtu = s.getsockopt(socket.IPPROTO_IP, 14)
print(mtu, flush=True)
"""

INJECT = r"""
import sys
from scapy.all import ICMP, IP, UDP, conf, send
conf.verb = 0
pub, pport, server = sys.argv[1], int(sys.argv[2]), sys.argv[3]
quoted = IP(src=pub, dst=server, flags="DF") / UDP(sport=pport, dport=5000) / b"hello"
send(IP(src=server, dst=pub) / ICMP(type=3, code=4, nexthopmtu=1280) / bytes(quoted)[:28])
"""


@pytest.fixture(scope="module")
def gw(module_gateway: h.GatewayFactory) -> Iterator[h.GatewayProc]:
    proc = module_gateway(h.lab_config())
    yield proc
    assert proc.stop() == 0, proc.log_text()[-3000:]


def test_fragmentation_needed_reaches_the_backend_socket(lab: LabNames, gw: h.GatewayProc) -> None:
    """A frag-needed from the outside about a flow lowers the backend socket's path MTU to 1280."""
    client = ns_popen(
        lab.be,
        [h.PYTHON, "-c", PMTU_CLIENT, t.POOL_MEMBERS[0], t.SERVER],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert client.stdout is not None
        seen = client.stdout.readline().decode().strip()
        pub, pport = h.parse_peer(seen)
        assert pub == t.FRONTEND_IP
        ns_run(lab.inet, [h.PYTHON, "-c", INJECT, pub, str(pport), t.SERVER], timeout=30)
        out, err = client.communicate(timeout=15)
    finally:
        h.stop_process(client, timeout=3)
    assert out.decode().strip() == "1280", err.decode()[-2000:]


def test_backend_port_unreachable_leaves_with_the_public_tuple(lab: LabNames, gw: h.GatewayProc) -> None:
    """A backend's port unreachable about a live flow leaves from the public address, quoting
    the public ip:port, so the remote side can match it."""
    with h.Capture(lab.inet, t.INET_IF, "icmp") as cap:
        out = h.probe(
            lab.be,
            {
                "sockets": [{"src": t.STANDALONE[1]}],
                "steps": [["send", 0, t.SERVER, 5000, "PUSHLATER 1"], ["recv", 0, 3]],
            },
        )
        pub, pport = h.parse_peer(out[-1]["data"])
        # The late push comes 1 s after the request, to a socket the probe has closed by
        # then: wait (bounded) for the backend's port unreachable to cross eth0.
        h.poll_until(lambda: any("unreachable" in ln for ln in cap.current()), 5)
    unreachable = [ln for ln in cap.lines if "unreachable" in ln]
    assert unreachable, cap.lines
    line = unreachable[0]
    assert line.split()[2] == pub, line
    assert re.search(rf"ICMP {re.escape(pub)} udp port {pport} unreachable", line), line
    assert "10.10." not in " ".join(cap.lines)
