"""What must never happen on the outside: unsolicited packets getting in, private sources out."""

from __future__ import annotations

import pytest

from gateway.lab import layout as t
from gateway.lab.layout import LabNames
from tests.integration import helpers as h

pytestmark = pytest.mark.integration

# Everything the gateway namespace could emit towards the internet host, except ARP.
FROM_GATEWAY = f"ip and src net 198.51.100.0/24 and not src host {t.SERVER} " \
               f"and not src host {t.SERVER2}"


def test_return_traffic_from_a_wrong_endpoint_is_dropped(
    lab: LabNames, gateway: h.GatewayFactory
) -> None:
    """Only the exact remote endpoint of a live flow gets in; others are dropped silently."""
    gw = gateway(h.lab_config())
    backend = h.ProbeProc(lab.be, {
        # unconnected: the backend socket would accept a datagram from anyone
        "sockets": [{"src": "10.10.1.3"}],
        "steps": [["send", 0, t.SERVER, 5000, "PUSHLATER 2"],
                  ["recv", 0, 3], ["recv", 0, 4], ["recv", 0, 1.5]],
    })
    try:
        assert backend.next()["op"] == "open"
        assert backend.next() == {"op": "send"}
        first = backend.next(5)
        assert "data" in first, first
        public_ip, public_port = h.parse_peer(first["data"])
        assert public_ip == t.FRONTEND_IP
        with h.Capture(lab.inet, "eth0", FROM_GATEWAY) as cap:
            intruders = h.probe(lab.inet, {
                "sockets": [
                    # right port, wrong address
                    {"src": t.SERVER2, "sport": 5000, "reuse": True,
                     "connect": [public_ip, public_port]},
                    # right address, wrong port
                    {"src": t.SERVER, "sport": 5001, "connect": [public_ip, public_port]},
                ],
                "steps": [["send", 0, None, 0, "intruder wrong ip"],
                          ["send", 1, None, 0, "intruder wrong port"],
                          ["recv", 0, 1.0], ["recv", 1, 0.5],
                          ["tcp", t.SERVER, t.FRONTEND_IP, 4444, 1.5],
                          ["tcp", t.SERVER, t.DEFAULT_SNAT[0], 80, 1.0],
                          ["tcp", t.SERVER, t.INSTANCE_PUBLIC, 22, 1.0]],
            })
        late = backend.next(6)
        after = backend.next(4)
    finally:
        backend.close()
    # the sender learns nothing: no ICMP error, no RST, no SYN-ACK
    assert [r.get("timeout") for r in intruders if r["op"] == "recv"] == [True, True], intruders
    assert [r["result"] for r in intruders if r["op"] == "tcp"] == ["timeout"] * 3, intruders
    assert cap.lines == [], f"the gateway answered an intruder: {cap.lines}"
    # the backend got the legitimate late push and nothing else
    assert late.get("data") == f"late {public_ip}:{public_port}\n", late
    assert late.get("from") == [t.SERVER, 5000]
    assert after.get("timeout") is True, after
    assert gw.stop() == 0
    assert gw.counters()["drop_no_flow"] >= 2


def test_no_private_source_leaves_on_the_outside(
    lab: LabNames, gateway: h.GatewayFactory, tmp_path: object
) -> None:
    """Under TCP, UDP, ICMP and closed-port traffic, out0 carries only public sources."""
    gw = gateway(h.lab_config())
    backends = ("10.10.1.1", t.INSTANCE_BACKEND, *t.STANDALONE)
    with h.Capture(lab.gw, t.GW_OUT_IF, "ip and src net 10.0.0.0/8") as leak, \
            h.Capture(lab.gw, t.GW_OUT_IF, "ip", count=5000) as everything:
        for src in backends:
            for server in (t.SERVER, t.SERVER2):
                res = h.curl(lab, src, f"http://{server}/")
                assert res.returncode == 0, (src, server, res.stderr)
            closed = h.curl(lab, src, f"http://{t.SERVER}:81/", max_time=3)
            assert closed.returncode == 7, f"expected a RST back (curl 7), got {closed.returncode}"
            out = h.probe(lab.be, {
                "sockets": [{"src": src, "connect": [t.SERVER, 5000]},
                            {"src": src, "connect": [t.SERVER2, 5999]}],
                "steps": [["send", 0, None, 0, "x"], ["recv", 0, 2],
                          ["send", 1, None, 0, "y"], ["recv", 1, 2]],
            })
            assert "data" in out[2] and out[4].get("error") == "ConnectionRefusedError", out
            ping = h.ping(lab.be, src, t.SERVER, count=2, interval=0.2)
            assert ping.returncode == 0, ping.stdout.decode()
    assert leak.lines == [], f"private sources on the outside: {leak.lines[:10]}"
    sources = {h.Capture.ip_source(ln) for ln in everything.lines}
    assert {t.FRONTEND_IP, t.INSTANCE_PUBLIC} <= sources, sources
    assert sources & set(t.DEFAULT_SNAT)
    assert not any(s and s.startswith("10.") for s in sources)
    assert gw.stop() == 0
