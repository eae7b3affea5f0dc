"""The three outbound scenarios end to end, as the internet host sees them.

One gateway on deploy/examples/lab.toml serves the whole module: pool "web" (3 members,
1024-port blocks, 10.10.1.1 first from 1024) leaves as the frontend 198.51.100.10,
10.10.2.1 as its instance IP 198.51.100.20 with its own ports, anything else as a
default SNAT address 198.51.100.30/.31.
"""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
from collections.abc import Iterator

import pytest

from gateway.lab import clients
from gateway.lab import layout as t
from gateway.lab.layout import LabNames
from gateway.lab.netns import ns_popen, ns_run
from gateway.lab.procs import close_pipes
from tests.integration import helpers as h

pytestmark = pytest.mark.integration

BLOCK = 1024
FIRST_BLOCK = (1024, BLOCK)  # (start, size) of 10.10.1.1, the first pool member


@pytest.fixture(scope="module")
def gw(module_gateway: h.GatewayFactory) -> Iterator[h.GatewayProc]:
    proc = module_gateway(h.lab_config())
    yield proc
    assert proc.stop() == 0, proc.log_text()[-3000:]


def test_each_scenario_leaves_with_its_public_address(
    lab: LabNames, gw: h.GatewayProc, whoami_log: h.WhoamiLog
) -> None:
    """Pool member -> frontend + port from its block; instance IP keeps its port; else default."""
    mark = whoami_log.mark()
    res = h.curl(lab, "10.10.1.1", f"http://{t.SERVER}/")
    assert res.returncode == 0, res.stderr
    ip, port = h.parse_peer(res.stdout.decode())
    assert ip == t.FRONTEND_IP and h.in_block(port, *FIRST_BLOCK), (ip, port)

    own_port = random.randint(40000, 49999)
    res = h.curl(lab, t.INSTANCE_BACKEND, f"http://{t.SERVER}/",
                 extra=["--local-port", str(own_port)])
    assert res.returncode == 0, res.stderr
    assert h.parse_peer(res.stdout.decode()) == (t.INSTANCE_PUBLIC, own_port)

    res = h.curl(lab, t.STANDALONE[0], f"http://{t.SERVER}/")
    assert res.returncode == 0, res.stderr
    ip, port = h.parse_peer(res.stdout.decode())
    assert ip in t.DEFAULT_SNAT and port >= 1024, (ip, port)

    recs = whoami_log.wait_for(lambda r: len(r) >= 3, mark)
    seen = [(r["proto"], r["src"], r["dst"], r["dport"]) for r in recs]
    assert seen[:2] == [("tcp", t.FRONTEND_IP, t.SERVER, 80), ("tcp", t.INSTANCE_PUBLIC, t.SERVER, 80)]
    assert seen[2][1] in t.DEFAULT_SNAT
    assert not any(r["src"].startswith("10.") for r in recs)


def test_second_and_third_pool_members_use_their_own_blocks(
    lab: LabNames, gw: h.GatewayProc
) -> None:
    """10.10.1.2 and 10.10.1.3 leave as the frontend with ports from two other 1024-blocks."""
    blocks = set()
    for member in t.POOL_MEMBERS[1:]:
        res = h.curl(lab, member, f"http://{t.SERVER}/")
        assert res.returncode == 0, res.stderr
        ip, port = h.parse_peer(res.stdout.decode())
        assert ip == t.FRONTEND_IP and port >= 1024 + BLOCK, (member, port)
        blocks.add((port - 1024) // BLOCK)
    assert len(blocks) == 2, "each member has its own block"


def test_tcp_bulk_through_the_gateway(lab: LabNames, gw: h.GatewayProc) -> None:
    """A 2 s iperf3 TCP transfer from a pool member works and the server saw the frontend."""
    port = 5201
    server = ns_popen(lab.inet, clients.iperf3_server(t.SERVER, port, one_off=True),
                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE)
    try:
        h.wait_listening(lab.inet, [port])
        client = ns_run(lab.be, clients.iperf3_client(t.SERVER, "10.10.1.2", port, 2,
                                                      extra=["--connect-timeout", "3000"]),
                        check=False, timeout=30)
        out, _err = server.communicate(timeout=15)
    finally:
        h.stop_process(server, signal.SIGTERM, 3)
        close_pipes(server)
    assert client.returncode == 0, client.stdout.decode()[-2000:] + client.stderr.decode()
    report = json.loads(out)
    remote = {c["remote_host"] for c in report["start"]["connected"]}
    assert remote == {t.FRONTEND_IP}
    assert report["start"]["accepted_connection"]["host"] == t.FRONTEND_IP
    sent = json.loads(client.stdout)["end"]["sum_received"]["bytes"]
    assert sent > 1_000_000, f"only {sent} bytes arrived"


def test_udp_replies_come_back_for_every_scenario(
    lab: LabNames, gw: h.GatewayProc, whoami_log: h.WhoamiLog
) -> None:
    """Several datagrams per scenario are answered, and the server saw only public sources."""
    mark = whoami_log.mark()
    expected = {"10.10.1.1": {t.FRONTEND_IP}, t.INSTANCE_BACKEND: {t.INSTANCE_PUBLIC},
                t.STANDALONE[1]: set(t.DEFAULT_SNAT)}
    for src, public in expected.items():
        steps: list[list[object]] = []
        for i in range(5):
            steps += [["send", 0, None, 0, f"hello {i}"], ["recv", 0, 2]]
        out = h.probe(lab.be, {"sockets": [{"src": src, "connect": [t.SERVER, 5000]}],
                               "steps": steps})
        local = out[0]["ports"][0]
        answers = [r.get("data") for r in out if r["op"] == "recv"]
        assert None not in answers and len(answers) == 5, (src, out)
        peers = {h.parse_peer(a) for a in answers if a}
        assert len(peers) == 1, f"one flow, one mapping: {peers}"
        ip, port = peers.pop()
        assert ip in public
        if src == t.INSTANCE_BACKEND:
            assert port == local
    recs = whoami_log.wait_for(lambda r: len(r) >= 15, mark)
    assert len(recs) == 15
    assert not any(r["src"].startswith("10.") for r in recs)


def test_ping_from_every_scenario(lab: LabNames, gw: h.GatewayProc) -> None:
    """ICMP echo is translated: the server sees the public address, the pool id in its block."""
    with h.Capture(lab.inet, "eth0", "icmp[icmptype] == icmp-echo") as cap:
        for src in ("10.10.1.1", t.INSTANCE_BACKEND, t.STANDALONE[0]):
            res = h.ping(lab.be, src, t.SERVER, count=3, interval=0.2)
            assert res.returncode == 0, (src, res.stdout.decode(), res.stderr.decode())
    requests = [ln for ln in cap.lines if "echo request" in ln]
    assert len(requests) == 9, cap.lines
    by_src: dict[str, set[int]] = {}
    for ln in requests:
        seen_src = h.Capture.ip_source(ln)
        m = re.search(r"\bid (\d+)", ln)
        assert seen_src and m, ln
        by_src.setdefault(seen_src, set()).add(int(m.group(1)))
    assert set(by_src) - set(t.DEFAULT_SNAT) == {t.FRONTEND_IP, t.INSTANCE_PUBLIC}, by_src
    assert all(h.in_block(i, *FIRST_BLOCK) for i in by_src[t.FRONTEND_IP]), by_src


def test_icmp_port_unreachable_reaches_connected_udp_sockets(
    lab: LabNames, gw: h.GatewayProc
) -> None:
    """An ICMP error about a live flow is translated back: connect()ed UDP gets ECONNREFUSED."""
    for src in ("10.10.1.1", t.INSTANCE_BACKEND, t.STANDALONE[0]):
        out = h.probe(lab.be, {
            "sockets": [{"src": src, "connect": [t.SERVER, 5999]}],
            "steps": [["send", 0, None, 0, "anyone?"], ["recv", 0, 3]],
        })
        assert out[-1].get("error") == "ConnectionRefusedError", (src, out)
