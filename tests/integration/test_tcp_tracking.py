"""TCP tracking on the wire (issue 9, item 1; docs/decisions.md, "TCP tracking"): a RST
injected from the internet with a sequence number far outside the window leaves a real
connection working on the same public port, an in-window one ends it; a retransmitted
SYN keeps its first mapping; two backends with the same inside tuple get their own.

The internet side here is a line echo server of the test's own (it answers each line
with the peer it saw, so the public port is checked on every line); RSTs are injected
with scapy from the internet namespace by a script that first watches the connection
to learn the server's next sequence number.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
from typing import Any

import pytest

from gateway.lab import layout as t
from gateway.lab.layout import LabNames
from gateway.lab.netns import LabError, ns_run
from gateway.lab.procs import ProcessSet
from tests.integration import helpers as h

pytestmark = pytest.mark.integration

ECHO_PORT = 7070
B1, B2 = t.POOL_MEMBERS[0], t.POOL_MEMBERS[1]

#: Internet side: answers every line with "peer_ip:peer_port line" and logs it (JSON lines).
_ECHO = r"""
import json, select, socket, sys
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2]))); srv.listen(16)
conns = {}
while True:
    ready, _, _ = select.select([srv, *conns], [], [], 1.0)
    for s in ready:
        if s is srv:
            c, peer = srv.accept(); conns[c] = (peer, b"")
            print(json.dumps({"accept": list(peer)}), flush=True)
            continue
        peer, buf = conns[s]
        try:
            data = s.recv(65536)
        except OSError as e:
            data = b""; print(json.dumps({"error": type(e).__name__, "peer": list(peer)}), flush=True)
        if not data:
            del conns[s]; s.close(); continue
        *lines, rest = (buf + data).split(b"\n")
        conns[s] = (peer, rest)
        for line in lines:
            print(json.dumps({"peer": list(peer), "line": line.decode()}), flush=True)
            s.sendall(f"{peer[0]}:{peer[1]} {line.decode()}\n".encode())
"""

#: Backend side: one connection; stdin lines "send TEXT" (answer: the reply line) and "recv".
_CLIENT = r"""
import json, socket, sys
s = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=5, source_address=(sys.argv[1], 0))
print(json.dumps({"local": list(s.getsockname())}), flush=True)
f = s.makefile("rb")
for cmd in sys.stdin:
    op, _, text = cmd.strip().partition(" ")
    try:
        if op == "send":
            s.sendall(text.encode() + b"\n")
        line = f.readline()
        print(json.dumps({"reply": line.decode()} if line else {"eof": True}), flush=True)
    except OSError as e:
        print(json.dumps({"error": type(e).__name__}), flush=True)
"""

#: Internet side: watch the connection until told "go", then send one RST from the server
#: with sequence number (server's next sequence + offset).
_INJECT = r"""
import json, sys, time
from scapy.all import IP, TCP, AsyncSniffer, conf, send
conf.verb = 0
iface, server, sport, public, pport, offset, marker = sys.argv[1], sys.argv[2], int(sys.argv[3]), \
    sys.argv[4], int(sys.argv[5]), int(sys.argv[6]), sys.argv[7].encode()
pkts = []
sn = AsyncSniffer(iface=iface, filter=f"tcp and host {public} and port {pport}", store=False,
                  prn=pkts.append,
                  started_callback=lambda: print(json.dumps({"ready": True}), flush=True))
sn.start()
sys.stdin.readline()
deadline = time.monotonic() + 5
while time.monotonic() < deadline and not any(
        TCP in p and p[IP].src == server and marker in bytes(p[TCP].payload) for p in list(pkts)):
    time.sleep(0.01)
sn.stop()
nxt = None
for p in pkts:
    if TCP not in p:
        continue
    tcp = p[TCP]
    if p[IP].src == server:
        end = tcp.seq + len(bytes(tcp.payload)) + (1 if tcp.flags & 0x03 else 0)
    elif tcp.flags & 0x10:
        end = tcp.ack
    else:
        continue
    if nxt is None or (end - nxt) % 2**32 < 2**31:
        nxt = end % 2**32
if nxt is None or not any(marker in bytes(p[TCP].payload) for p in pkts if TCP in p):
    print(json.dumps({"error": "the echo of the marker was not seen", "seen": len(pkts)}), flush=True)
    sys.exit(1)
seq = (nxt + offset) % 2**32
send(IP(src=server, dst=public) / TCP(sport=sport, dport=pport, flags="R", seq=seq))
print(json.dumps({"sent": seq, "next": nxt, "seen": len(pkts)}), flush=True)
"""


class Lines:
    """A process in a namespace that speaks JSON lines on stdout (bounded reads)."""

    def __init__(self, procs: ProcessSet, ns: str, script: str, *args: str, stdin: bool = True) -> None:
        self.proc = procs.start(ns, [h.PYTHON, "-c", script, *args],
                                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._buf = b""

    def say(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def next(self, timeout: float = 10.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(left, 0))
            if not ready:
                raise LabError(f"no line within {timeout:g} s")
            chunk = os.read(fd, 65536)
            if not chunk:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise LabError(f"process ended: {err[-3000:]}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return dict(json.loads(line))

    def ask(self, line: str, timeout: float = 6.0) -> dict[str, Any]:
        self.say(line)
        return self.next(timeout)



def echo_server(procs: ProcessSet, lab: LabNames) -> Lines:
    server = Lines(procs, lab.inet, _ECHO, t.SERVER, str(ECHO_PORT), stdin=False)
    h.wait_listening(lab.inet, [ECHO_PORT])
    return server


def inject_rst(procs: ProcessSet, lab: LabNames, client: Lines, public: tuple[str, int], offset: int,
               line: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Watch the connection while the client sends ``line`` and gets its answer, then inject a
    RST from the server at its next sequence number + ``offset``. Returns (reply, injection)."""
    inj = Lines(procs, lab.inet, _INJECT, "eth0", t.SERVER, str(ECHO_PORT), public[0], str(public[1]),
                str(offset), line)
    assert inj.next(15).get("ready"), "sniffer did not start"
    reply = client.ask(f"send {line}")
    inj.say("go")
    sent = inj.next(15)
    assert "sent" in sent, sent
    return reply, sent


def flow_state(gw: h.GatewayProc, local_port: int) -> str | None:
    rows = gw.ask("flows", "--backend", B1, "--proto", "tcp")
    states = [r["state"] for r in rows if r["backend_port"] == local_port and r["remote_port"] == ECHO_PORT]
    return states[0] if states else None


def test_out_of_window_rst_from_outside_leaves_the_connection_on_its_port_in_window_rst_ends_it(
    lab: LabNames, gateway: h.GatewayFactory, procs: ProcessSet
) -> None:
    """A RST from the server's address with a sequence number half the space away is dropped
    (drop_tcp_out_of_window): the flow stays established, and lines keep flowing both ways
    on the same public port. The control: the same injection at the server's next sequence
    number passes, the backend's socket is reset and the flow moves to reset."""
    gw = gateway(h.lab_config(tcp_rst_linger=1))
    server = echo_server(procs, lab)
    client = Lines(procs, lab.be, _CLIENT, B1, t.SERVER, str(ECHO_PORT))
    local_port = int(client.next()["local"][1])
    first = h.parse_peer(client.ask("send hello")["reply"].split(" ", 1)[0])
    assert first[0] == t.FRONTEND_IP

    reply, sent = inject_rst(procs, lab, client, first, 2**31, "before-far-rst")
    assert reply["reply"].startswith(f"{first[0]}:{first[1]} before-far-rst"), reply
    h.wait_until(lambda: gw.ask("stats")["counters"]["drop_tcp_out_of_window"] >= 1, 5,
                 what="the far RST dropped")
    assert flow_state(gw, local_port) == "established"
    for i in range(3):
        got = client.ask(f"send after-far-rst-{i}")
        assert got.get("reply", "").startswith(f"{first[0]}:{first[1]} after-far-rst-{i}"), got
    lines: list[dict[str, Any]] = []
    while len(lines) < 5:
        rec = server.next()
        if "line" in rec:
            lines.append(rec)
    assert {tuple(r["peer"]) for r in lines} == {first}, "the server saw one public ip:port throughout"

    _reply, sent = inject_rst(procs, lab, client, first, 0, "before-rst")
    h.wait_until(lambda: flow_state(gw, local_port) in ("reset", None), 5, what="the in-window RST taken")
    after = client.ask("send after-rst")
    assert after.get("error") in ("ConnectionResetError", "BrokenPipeError") or after.get("eof"), after
    assert gw.ask("stats")["counters"]["drop_tcp_out_of_window"] == 1


def test_syn_retransmission_keeps_its_first_mapping(
    lab: LabNames, gateway: h.GatewayFactory, procs: ProcessSet
) -> None:
    """The internet host drops the first SYN of a connection (iptables ``recent``); the
    backend's retransmitted SYN leaves from the same public port and the connection works.
    Control: the capture shows two SYNs, so a retransmission really happened."""
    gw = gateway(h.lab_config())
    echo_server(procs, lab)
    rule = ["-p", "tcp", "--dport", str(ECHO_PORT), "--tcp-flags", "SYN,ACK", "SYN"]
    ns_run(lab.inet, ["iptables", "-I", "INPUT", *rule, "-m", "recent", "--name", "synrtx",
                      "--set", "-j", "DROP"], timeout=10)
    ns_run(lab.inet, ["iptables", "-I", "INPUT", *rule, "-m", "recent", "--name", "synrtx",
                      "--rcheck", "-j", "ACCEPT"], timeout=10)
    try:
        with h.Capture(lab.inet, "eth0", f"tcp dst port {ECHO_PORT} and tcp[tcpflags] & tcp-syn != 0") as cap:
            client = Lines(procs, lab.be, _CLIENT, B1, t.SERVER, str(ECHO_PORT))
            assert "local" in client.next(15)
            peer = h.parse_peer(client.ask("send hi")["reply"].split(" ", 1)[0])
    finally:
        for flag in ("-D", "-D"):
            ns_run(lab.inet, ["iptables", flag, "INPUT", *rule, "-m", "recent", "--name", "synrtx",
                              "--rcheck", "-j", "ACCEPT"], timeout=10, check=False)
            ns_run(lab.inet, ["iptables", flag, "INPUT", *rule, "-m", "recent", "--name", "synrtx",
                              "--set", "-j", "DROP"], timeout=10, check=False)
    syns = [ln for ln in cap.lines if f"> {t.SERVER}.{ECHO_PORT}" in ln]
    assert len(syns) >= 2, f"expected a retransmitted SYN: {cap.lines}"
    assert all(f"{peer[0]}.{peer[1]} >" in ln for ln in syns), (peer, syns)
    assert gw.ask("stats")["counters"]["flows_created"] == 1


def test_colliding_inside_tuples_from_two_backends_get_their_own_mappings(
    lab: LabNames, gateway: h.GatewayFactory, whoami_log: h.WhoamiLog
) -> None:
    """Two backends with the same source port to the same destination (UDP and TCP) each
    get their own public ip:port and their own replies; whoami saw two peers per protocol."""
    gateway(h.lab_config())
    mark = whoami_log.mark()
    sport = 40123
    out = h.probe(lab.be, {
        "sockets": [{"src": B1, "sport": sport}, {"src": t.STANDALONE[0], "sport": sport}],
        "steps": [["send", 0, t.SERVER, t.WHOAMI_UDP_PORT, "x"],
                  ["send", 1, t.SERVER, t.WHOAMI_UDP_PORT, "x"],
                  ["recv", 0, 3], ["recv", 1, 3]],
    })
    r0, r1 = (r for r in out if r["op"] == "recv")
    p0, p1 = h.parse_peer(r0["data"]), h.parse_peer(r1["data"])
    assert p0 != p1 and p0[0] == t.FRONTEND_IP and p1[0] in t.DEFAULT_SNAT, (p0, p1)
    tcp_peers = []
    for src in (B1, t.STANDALONE[0]):
        res = h.curl(lab, src, f"http://{t.SERVER}/", extra=["--local-port", str(sport + 1)])
        tcp_peers.append(h.parse_peer(res.stdout.decode()))
    assert tcp_peers[0] != tcp_peers[1], tcp_peers
    recs = whoami_log.wait_for(lambda rs: len(rs) >= 4, since=mark)
    assert {(r["src"], r["sport"]) for r in recs} == {p0, p1, *tcp_peers}, recs
