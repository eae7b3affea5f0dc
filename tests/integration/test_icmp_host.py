"""ICMP errors the gateway host itself sends about return traffic it has rewritten leave
quoting the public address and port, never the backend's (docs/kernel.md, "ICMP errors
from the host"), and path MTU discovery works through a smaller inside MTU.

Each test has its control: with the jump into SNATGW-OUT deleted (the host's errors not
queued) the same capture shows the backend's private address.
"""

from __future__ import annotations

import ipaddress
import re
import subprocess
from collections.abc import Iterator

import pytest
from scapy.layers.inet import ICMP, IP, IPerror, UDPerror

from gateway.lab import layout as t
from gateway.lab.layout import LabNames
from gateway.lab.netns import ns_popen, ns_run
from tests.integration import helpers as h

pytestmark = pytest.mark.integration

PRIVATE = [ipaddress.IPv4Address(a).packed for a in t.backend_addresses()]
UNQUEUE_HOST_ERRORS = ["iptables", "-w", "-t", "mangle", "-D", "OUTPUT", "-j", "SNATGW-OUT"]
QUEUE_HOST_ERRORS = ["iptables", "-w", "-t", "mangle", "-I", "OUTPUT", "1", "-j", "SNATGW-OUT"]

#: From the internet host: a datagram with TTL 1 to a public ip:port of a live flow; the
#: ICMP it gets back on eth0 (the outside link) is printed as hex, whole.
TTL_ONE = r"""
import sys
from scapy.all import IP, UDP, conf, raw, send, sniff
conf.verb = 0
pub, pport, server = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ttl = int(sys.argv[4]) if len(sys.argv) > 4 else 1
probe = IP(src=server, dst=pub, ttl=ttl) / UDP(sport=5000, dport=pport) / b"ttl one"
got = sniff(iface="eth0", filter=f"icmp and dst host {server}", count=1, timeout=8,
            started_callback=lambda: send(probe))
for p in got:
    print(raw(p[IP]).hex(), flush=True)
"""

#: The internet side of a bulk TCP transfer toward a backend: accept one connection,
#: send N bytes, close.
PUSH_SERVER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
print("ready", flush=True)
s.settimeout(20)
c, _ = s.accept()
c.settimeout(10)
try:
    c.sendall(b"x" * int(sys.argv[3]))
except OSError:
    pass
c.close()
"""

#: The backend side: connect, count bytes until EOF or a 4 s silence.
PULL_CLIENT = r"""
import socket, sys
s = socket.socket()
s.bind((sys.argv[1], 0))
s.settimeout(4)
s.connect((sys.argv[2], int(sys.argv[3])))
n = 0
try:
    while True:
        d = s.recv(65536)
        if not d:
            break
        n += len(d)
except OSError:
    pass
print(n, flush=True)
"""

BULK = 300_000
PUSH_PORT = 7000


def _ttl_one(lab: LabNames, pub: str, pport: int, ttl: int = 1) -> list[bytes]:
    res = ns_run(lab.inet, [h.PYTHON, "-c", TTL_ONE, pub, str(pport), t.SERVER, str(ttl)], timeout=20)
    return [bytes.fromhex(x) for x in res.stdout.decode().split()]


def _udp_flow(lab: LabNames, src: str = t.POOL_MEMBERS[0]) -> tuple[str, int]:
    out = h.probe(lab.be, {"sockets": [{"src": src}],
                           "steps": [["send", 0, t.SERVER, t.WHOAMI_UDP_PORT, "hi"], ["recv", 0, 3]]})
    return h.parse_peer(out[-1]["data"])


@pytest.fixture()
def gw(gateway: h.GatewayFactory) -> Iterator[h.GatewayProc]:
    proc = gateway(h.lab_config())
    yield proc
    assert proc.stop() == 0, proc.log_text()[-3000:]


def test_time_exceeded_for_a_ttl_1_return_packet_names_no_private_address(
    lab: LabNames, gw: h.GatewayProc
) -> None:
    """A return packet with TTL 1: the host's time exceeded reaches the remote quoting the
    public ip:port, and no backend address is anywhere in its bytes (control: not queued,
    the quote carries the backend's address)."""
    pub, pport = _udp_flow(lab)
    got = _ttl_one(lab, pub, pport)
    assert len(got) == 1, got
    pkt = IP(got[0])
    assert (pkt[ICMP].type, pkt.src) == (11, t.OUTSIDE_GW), pkt.summary()
    assert (pkt[IPerror].dst, pkt[UDPerror].dport) == (pub, pport)
    assert not [a for a in PRIVATE if a in got[0]], got[0].hex()
    ns_run(lab.gw, UNQUEUE_HOST_ERRORS)
    control = _ttl_one(lab, pub, pport)
    assert len(control) == 1 and ipaddress.IPv4Address(t.POOL_MEMBERS[0]).packed in control[0]
    ns_run(lab.gw, QUEUE_HOST_ERRORS)


def test_pmtud_through_a_smaller_inside_mtu(lab: LabNames, gw: h.GatewayProc) -> None:
    """Inside route MTU 1280, outside 1500: a server pushing 300 kB to a backend gets the
    host's frag-needed quoting the public address, lowers its path MTU to 1280 and the
    transfer completes (control: not queued, the transfer stalls and the quote is private)."""
    route = ["ip", "route", "change", f"10.10.0.0/{t.INSIDE_PREFIXLEN}", "dev", t.GW_IN_IF,
             "proto", "kernel", "scope", "link", "src", t.INSIDE_GW]
    ns_run(lab.gw, [*route, "mtu", "1280"])
    try:
        ns_run(lab.gw, UNQUEUE_HOST_ERRORS)
        got, cap = _bulk(lab)
        assert got < BULK, "control: without the host's errors translated the transfer stalls"
        assert any(re.search(r"ICMP 10\.10\.\d+\.\d+ .*need to frag", ln) for ln in cap), cap[:3]
        ns_run(lab.gw, QUEUE_HOST_ERRORS)
        ns_run(lab.inet, ["ip", "route", "flush", "cache"])
        got, cap = _bulk(lab)
        assert got == BULK
        frag = [ln for ln in cap if "need to frag" in ln]
        assert frag and all(f"ICMP {t.FRONTEND_IP} " in ln and "mtu 1280" in ln for ln in frag), cap[:3]
        assert not any("10.10." in ln for ln in cap)
        cached = ns_run(lab.inet, ["ip", "route", "get", t.FRONTEND_IP]).stdout.decode()
        assert "mtu 1280" in cached, cached
    finally:
        ns_run(lab.gw, route, check=False)
        ns_run(lab.inet, ["ip", "route", "flush", "cache"], check=False)


def _bulk(lab: LabNames) -> tuple[int, list[str]]:
    """One transfer inet -> backend; bytes the backend got, ICMP lines seen on eth0."""
    with h.Capture(lab.inet, t.INET_IF, "icmp") as cap:
        server = ns_popen(lab.inet, [h.PYTHON, "-c", PUSH_SERVER, t.SERVER, str(PUSH_PORT), str(BULK)],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == b"ready"
            res = ns_run(lab.be, [h.PYTHON, "-c", PULL_CLIENT, t.POOL_MEMBERS[1], t.SERVER,
                                  str(PUSH_PORT)], timeout=30)
        finally:
            h.stop_process(server, timeout=3)
    return int(res.stdout.decode().strip()), cap.lines


def test_ping_dont_fragment_from_the_inside_reports_the_outside_mtu(
    lab: LabNames, gw: h.GatewayProc
) -> None:
    """Outside MTU 1280: `ping -M do -s 1472` from a backend is told mtu 1280 by the gateway
    (the host's error goes inward, about the backend's own packet); 1252 bytes pass."""
    route = ["ip", "route", "change", f"{t.OUTSIDE_GW.rsplit('.', 1)[0]}.0/{t.OUTSIDE_PREFIXLEN}",
             "dev", t.GW_OUT_IF, "proto", "kernel", "scope", "link", "src", t.OUTSIDE_GW]
    ns_run(lab.gw, [*route, "mtu", "1280"])
    try:
        def ping(size: int) -> tuple[int, str]:
            argv = ["ping", "-n", "-c", "2", "-i", "0.2", "-W", "2", "-M", "do", "-s", str(size),
                    "-I", t.STANDALONE[0], t.SERVER]
            res = ns_run(lab.be, argv, check=False, timeout=20)
            return res.returncode, res.stdout.decode() + res.stderr.decode()

        rc, text = ping(1472)
        assert rc != 0 and re.search(r"mtu ?= ?1280", text), text
        rc, text = ping(1252)
        assert rc == 0, text
    finally:
        ns_run(lab.gw, route, check=False)


#: From the internet host: ICMP messages to a public address quoting a flow (argv: kind).
FORGE = r"""
import sys
from scapy.all import ICMP, IP, UDP, conf, send
conf.verb = 0
pub, pport, server, kind = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
quote = lambda port: bytes(IP(src=pub, dst=server) / UDP(sport=port, dport=5000))
if kind == "forged":
    send([IP(src=server, dst=pub) / ICMP(type=3, code=3) / quote(pport + 1),   # no such port
          IP(src=server, dst=pub) / ICMP(type=5, code=1, gw="198.51.100.66") / quote(pport),
          IP(src=server, dst=pub) / ICMP(type=3, code=3, chksum=0x1234) / quote(pport)])
else:
    send(IP(src=server, dst=pub) / ICMP(type=3, code=3) / quote(pport))
"""


def test_forged_redirected_and_bad_checksum_errors_do_not_reach_the_backend(
    lab: LabNames, gw: h.GatewayProc
) -> None:
    """An error naming a port with no flow, a redirect and an error with a bad checksum are
    dropped and counted; the same error, well formed about the live flow, gets through (control)."""
    pub, pport = _udp_flow(lab)
    before = gw.ask("stats")["counters"]
    with h.Capture(lab.be, t.BE_IF, "icmp") as cap:
        ns_run(lab.inet, [h.PYTHON, "-c", FORGE, pub, str(pport), t.SERVER, "forged"])
        h.wait_until(lambda: gw.ask("stats")["counters"]["drop_bad_checksum"] > before["drop_bad_checksum"],
                     5, what="the bad checksum counted")
    assert cap.lines == [], cap.lines
    after = gw.ask("stats")["counters"]
    # At least: a late packet of the lab's earlier traffic to a public address may
    # be counted too; what pins the behaviour is that nothing reached the backend.
    assert after["drop_no_flow"] >= before["drop_no_flow"] + 1
    assert after["drop_icmp_type"] == before["drop_icmp_type"] + 1
    with h.Capture(lab.be, t.BE_IF, "icmp") as cap:
        ns_run(lab.inet, [h.PYTHON, "-c", FORGE, pub, str(pport), t.SERVER, "real"])
        h.wait_until(lambda: cap.current(), 5, what="the real error at the backend")
    assert f"> {t.POOL_MEMBERS[0]}: ICMP" in cap.lines[0], cap.lines


def test_host_unreachable_for_a_vanished_backend_names_no_private_address(
    lab: LabNames, gw: h.GatewayProc
) -> None:
    """A backend that stops answering ARP: the host's host unreachable about the return
    packet reaches the remote quoting the public ip:port, no backend address in its bytes
    (control: not queued, the quote names the backend)."""
    gone = t.POOL_MEMBERS[2]
    pub, pport = _udp_flow(lab, gone)
    addr = ["ip", "addr", "del", f"{gone}/{t.INSIDE_PREFIXLEN}", "dev", t.BE_IF]
    ns_run(lab.be, addr)
    try:
        ns_run(lab.gw, UNQUEUE_HOST_ERRORS)
        ns_run(lab.gw, ["ip", "neigh", "flush", "dev", t.GW_IN_IF])
        control = _ttl_one(lab, pub, pport, ttl=64)
        ns_run(lab.gw, QUEUE_HOST_ERRORS)
        ns_run(lab.gw, ["ip", "neigh", "flush", "dev", t.GW_IN_IF])
        got = _ttl_one(lab, pub, pport, ttl=64)
    finally:
        ns_run(lab.be, ["ip", "addr", "add", *addr[3:]], check=False)
    assert len(control) == 1 and ipaddress.IPv4Address(gone).packed in control[0], control
    assert len(got) == 1, got
    pkt = IP(got[0])
    assert (pkt[ICMP].type, pkt[ICMP].code) == (3, 1), pkt.summary()
    assert (pkt[IPerror].dst, pkt[UDPerror].dport) == (pub, pport)
    assert not [a for a in PRIVATE if a in got[0]], got[0].hex()
