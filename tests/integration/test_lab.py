"""The lab itself, checked with the kernel's own NAT: no snatgw involved.

If these fail, gateway test failures mean nothing; if these pass, the topology, whoami and
the probes are sound and a gateway failure is the gateway's.
"""

from __future__ import annotations

import json

import pytest

from gateway.lab import layout as t
from gateway.lab.layout import LabNames
from gateway.lab.netns import ns_run
from gateway.lab.topology import lab_down, lab_exists, lab_up
from tests.integration import helpers as h

pytestmark = pytest.mark.integration

LAB_EXTRA_BACKENDS = 300


def test_topology_addresses_and_routes(lab: LabNames, lab_extra: tuple[str, ...]) -> None:
    """The namespaces hold exactly the documented addresses and routes, and no more."""
    be = ns_run(lab.be, ["ip", "-4", "-o", "addr", "show", "dev", t.BE_IF]).stdout.decode()
    be_addrs = {ln.split()[3] for ln in be.splitlines()}
    expected = {f"{a}/16" for a in t.backend_addresses(lab_extra)}
    assert be_addrs == expected
    assert len(lab_extra) == 300 and "10.10.101.50" in lab_extra
    assert "default via 10.10.0.1" in ns_run(lab.be, ["ip", "route"]).stdout.decode()

    inet_routes = ns_run(lab.inet, ["ip", "-4", "route"]).stdout.decode()
    assert "default" not in inet_routes and "10." not in inet_routes
    inet = ns_run(lab.inet, ["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).stdout.decode()
    assert {ln.split()[3] for ln in inet.splitlines()} == {"198.51.100.2/24", "198.51.100.3/24"}

    assert h.out_addresses(lab) == {t.OUTSIDE_GW}
    fwd = ns_run(lab.gw, ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.decode().strip()
    assert fwd == "0", "the lab must leave forwarding to the gateway"
    for ns in (lab.be, lab.gw, lab.inet):
        links = ns_run(ns, ["ip", "-o", "link", "show"]).stdout.decode()
        for ln in links.splitlines():
            if "LOOPBACK" not in ln:
                assert " mtu 1500 " in ln and "state UP" in ln, ln
            else:
                assert "UP" in ln


def test_whoami_answers_from_the_gateway_namespace(lab: LabNames, whoami_log: h.WhoamiLog) -> None:
    """whoami echoes the peer over TCP and UDP, replies from the address asked, and logs it."""
    mark = whoami_log.mark()
    for server in (t.SERVER, t.SERVER2):
        res = ns_run(lab.gw, ["curl", "-sS", "--max-time", "3", f"http://{server}/"])
        ip, _port = h.parse_peer(res.stdout.decode())
        assert ip == t.OUTSIDE_GW
    # Connected sockets accept only replies from the address they sent to.
    out = h.probe(lab.gw, {
        "sockets": [{"src": t.OUTSIDE_GW, "connect": [t.SERVER, 5000]},
                    {"src": t.OUTSIDE_GW, "connect": [t.SERVER2, 5000]}],
        "steps": [["send", 0, None, 0, "a"], ["recv", 0, 2],
                  ["send", 1, None, 0, "b"], ["recv", 1, 2]],
    })
    ports = out[0]["ports"]
    replies = [r for r in out if r["op"] == "recv"]
    assert [r.get("data") for r in replies] == [f"{t.OUTSIDE_GW}:{p}\n" for p in ports]
    recs = whoami_log.wait_for(lambda r: len(r) >= 4, mark)
    assert [(r["proto"], r["dst"]) for r in recs] == [
        ("tcp", t.SERVER), ("tcp", t.SERVER2), ("udp", t.SERVER), ("udp", t.SERVER2)
    ]
    assert all(r["src"] == t.OUTSIDE_GW for r in recs)
    assert [r["sport"] for r in recs[2:]] == ports


def test_without_nat_a_private_source_is_never_answered(lab: LabNames, tmp_path: object) -> None:
    """Forwarding without NAT: the server sees 10.10.1.1 and cannot answer it (no route)."""
    assert h.curl(lab, "10.10.1.1", f"http://{t.SERVER}/", max_time=1).returncode != 0
    with h.kernel_forwarding(lab), h.Capture(lab.inet, "eth0", "tcp port 80") as cap:
        res = h.curl(lab, "10.10.1.1", f"http://{t.SERVER}/", max_time=2)
    assert res.returncode != 0
    sources = {h.Capture.ip_source(ln) for ln in cap.lines}
    assert "10.10.1.1" in sources, cap.lines
    assert not any(h.Capture.ip_source(ln) == t.SERVER for ln in cap.lines), (
        "the internet host answered a private source"
    )


def test_kernel_masquerade_works_end_to_end(lab: LabNames, whoami_log: h.WhoamiLog) -> None:
    """With the kernel's MASQUERADE the lab carries TCP, UDP, ICMP and PUSHLATER."""
    with h.kernel_masquerade(lab):
        res = h.curl(lab, "10.10.1.1", f"http://{t.SERVER}/")
        assert res.returncode == 0, res.stderr
        assert h.parse_peer(res.stdout.decode())[0] == t.OUTSIDE_GW
        ping = h.ping(lab.be, "10.10.3.1", t.SERVER)
        assert ping.returncode == 0, ping.stdout
        out = h.probe(lab.be, {
            "sockets": [{"src": "10.10.2.1", "connect": [t.SERVER2, 5000]}],
            "steps": [["send", 0, None, 0, "PUSHLATER 0.5"], ["recv", 0, 2], ["recv", 0, 3]],
        })
        data = [r.get("data", "") for r in out if r["op"] == "recv"]
        assert data[0].startswith(f"{t.OUTSIDE_GW}:") and data[1].startswith("late ")
        refused = h.probe(lab.be, {
            "sockets": [{"src": "10.10.1.2", "connect": [t.SERVER, 5999]}],
            "steps": [["send", 0, None, 0, "x"], ["recv", 0, 2]],
        })
        assert refused[-1].get("error") == "ConnectionRefusedError"


def test_whoami_survives_many_udp_flows_and_bounds_pushes(
    lab: LabNames, whoami_log: h.WhoamiLog
) -> None:
    """1000 UDP flows are all answered; at most 10 late pushes are pending per peer."""
    with h.kernel_masquerade(lab):
        mark = whoami_log.mark()
        out = h.probe(lab.be, {"steps": [["many", "10.10.1.3", t.SERVER, 5000, 1000, 5, "x"]]})
        many = out[-1]
        assert sum(r is not None for r in many["replies"]) == 1000
        recs = whoami_log.wait_for(lambda r: len(r) >= 1000, mark)
        assert len({r["sport"] for r in recs}) == 1000

        steps: list[list[object]] = [["send", 0, None, 0, "PUSHLATER 0.3"] for _ in range(12)]
        steps += [["recv", 0, 2] for _ in range(22)] + [["recv", 0, 0.7]]
        out = h.probe(lab.be, {
            "sockets": [{"src": "10.10.1.3", "connect": [t.SERVER, 5000]}], "steps": steps,
        })
        data = [r.get("data", "") for r in out if r["op"] == "recv" and "data" in r]
        assert len([d for d in data if not d.startswith("late ")]) == 12
        assert len([d for d in data if d.startswith("late ")]) == 10


def test_lab_up_is_idempotent_and_labs_coexist(lab: LabNames) -> None:
    """A second lab with another prefix coexists; up twice and down twice are harmless."""
    other = "sgt-labtwo"
    try:
        lab_up(other, mtu=1400, whoami=False)
        lab_up(other, mtu=1400)
        assert lab_exists(other)
        links = ns_run(f"{other}-gw", ["ip", "-o", "link", "show", "out0"]).stdout.decode()
        assert " mtu 1400 " in links
        res = ns_run(f"{other}-gw", ["curl", "-sS", "--max-time", "3", f"http://{t.SERVER}/"])
        assert res.stdout.decode().startswith(f"{t.OUTSIDE_GW}:")
        # the module's own lab is untouched
        assert lab_exists(lab.prefix)
    finally:
        lab_down(other)
        lab_down(other)
    assert not lab_exists(other)
    assert not t.state_dir(other).exists()


def test_cli_up_and_down(capsys: pytest.CaptureFixture[str]) -> None:
    """`snatgw lab up/down` (argparse wiring) builds and removes a lab and prints the how-to."""
    import argparse

    from gateway.lab.cli import add_lab_parser

    parser = argparse.ArgumentParser()
    add_lab_parser(parser.add_subparsers())
    prefix = "sgt-labcli"
    try:
        args = parser.parse_args(["lab", "up", "--prefix", prefix, "--extra-backends", "3",
                                  "--no-whoami"])
        assert args.func(args) == 0
        text = capsys.readouterr().out
        assert f"ip netns exec {prefix}-gw" in text and "10.10.100.3" in text
        be = ns_run(f"{prefix}-be", ["ip", "-4", "-o", "addr"]).stdout.decode()
        assert "10.10.100.3/16" in be and "10.10.100.4/16" not in be
        args = parser.parse_args(["lab", "down", "--prefix", prefix])
        assert args.func(args) == 0
        assert not lab_exists(prefix)
    finally:
        lab_down(prefix)


def test_whoami_log_lines_are_json(whoami_log: h.WhoamiLog) -> None:
    """Every line of the whoami log is one JSON object with the documented keys."""
    raw = whoami_log.path.read_text().splitlines()
    assert raw
    for line in raw:
        rec = json.loads(line)
        assert {"proto", "src", "sport", "dst", "dport"} <= rec.keys()
