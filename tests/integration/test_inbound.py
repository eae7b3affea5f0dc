"""The inbound half (issue 10, part 2): an lb_rule delivering to its pool, an inbound NAT
rule, instance-IP inbound under a security group, and ``inbound_default`` both ways.

Clients run in the internet namespace (curl, the UDP probe, ping) and talk to the
gateway's public addresses; the backends run whoami ``--show-local`` listeners
(gateway.lab.inbound), whose answers and logs say which backend was reached and what
source it saw.  Replies must come from the public address and port the client used.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.lab import clients, configtext
from gateway.lab import layout as t
from gateway.lab.inbound import MemberListeners, parse_member_answer
from gateway.lab.layout import LabNames
from tests.integration import helpers as h

pytestmark = pytest.mark.integration

PORT = t.MEMBER_PORT  # 8080: the backend port of lab.toml's lb_rule "http" (frontend port 80)
OTHER = 8081  # a port no rule opens
NAT_PORT, NAT_BACKEND_PORT = 50001, 2222
UDP_FRONT = 5353  # frontend port of a udp lb_rule to the members' 8080/udp


def _config(gateway: dict[str, Any] | None = None, **arrays: Any) -> str:
    """deploy/examples/lab.toml, ``[gateway]`` keys added, arrays of tables appended."""

    def add(cfg: dict[str, Any]) -> None:
        cfg["gateway"].update(gateway or {})

    return h.lab_config(mutate=add) + configtext.sections(**arrays)


@pytest.fixture(scope="module")
def listeners(lab: LabNames, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MemberListeners]:
    """Every pool member and the instance-IP backend on 8080, the instance backend also on
    8081, 10.10.1.1 on the NAT rule's 2222; all stopped by pid at the end."""
    ml = MemberListeners(lab.be, Path(tmp_path_factory.mktemp("listeners")))
    try:
        ml.start_all([*t.POOL_MEMBERS, t.INSTANCE_BACKEND], PORT)
        ml.start(t.INSTANCE_BACKEND, OTHER)
        ml.start(t.POOL_MEMBERS[0], NAT_BACKEND_PORT)
        yield ml
    finally:
        ml.close()


def _inbound(lab: LabNames, url: str, max_time: float = 3) -> Any:
    """curl from the internet host (SERVER) to a public address of the gateway."""
    return clients.curl(lab.inet, t.SERVER, url, max_time=max_time)


def _counters(gw: h.GatewayProc) -> dict[str, int]:
    return dict(gw.ask("stats")["counters"])


def test_lb_rule_spreads_60_connections_over_the_three_members(
    lab: LabNames, gateway: h.GatewayFactory, listeners: MemberListeners
) -> None:
    """60 connections to frontend:80 reach all three members; every reply leaves from frontend:80."""
    gw = gateway(_config({"inbound_default": "allow"}))
    marks = {m: listeners.log(m).mark() for m in t.POOL_MEMBERS}
    url = f"http://{t.FRONTEND_IP}:80/"
    with h.Capture(lab.inet, t.INET_IF, f"tcp and host {t.SERVER} and not port 53") as cap:
        # One curl, 60 URLs: HTTP/1.0 answers close, so each is a new connection (new port).
        res = clients.curl(lab.inet, t.SERVER, url, max_time=30, extra=[url] * 59)
    assert res.returncode == 0, res.stderr.decode()
    answers = [parse_member_answer(ln) for ln in res.stdout.decode().splitlines()]
    assert len(answers) == 60
    assert {a.src for a in answers} == {t.SERVER}, "the member sees the client's own address"
    assert {a.port for a in answers} == {PORT}
    per_member = collections.Counter(a.member for a in answers)
    assert set(per_member) == set(t.POOL_MEMBERS), per_member
    assert len({a.sport for a in answers}) == 60
    for m in t.POOL_MEMBERS:
        recs = listeners.log(m).wait_for(lambda r, m=m: len(r) >= per_member[m], marks[m])
        assert len(recs) == per_member[m] and {r["src"] for r in recs} == {t.SERVER}, (m, recs)
    back = [ln for ln in cap.lines if f"> {t.SERVER}." in ln]
    assert back, cap.lines[:10]
    assert all(f"IP {t.FRONTEND_IP}.80 > " in ln for ln in back), [
        ln for ln in back if f"IP {t.FRONTEND_IP}.80 > " not in ln][:5]
    assert _counters(gw)["inbound_flows_created"] >= 60


def test_udp_lb_rule_answers_from_the_frontend_address_and_port(
    lab: LabNames, gateway: h.GatewayFactory, listeners: MemberListeners
) -> None:
    """A connected UDP socket to frontend:5353 gets its answer (it accepts only that peer)."""
    rule = {"name": "udp", "frontend": "fe-web", "pool": "web", "protocol": "udp",
            "frontend_port": UDP_FRONT, "backend_port": PORT}
    gateway(_config({"inbound_default": "allow"}, lb_rules=[rule]))
    out = h.probe(lab.inet, {
        "sockets": [{"src": t.SERVER, "connect": [t.FRONTEND_IP, UDP_FRONT]}],
        "steps": [["send", 0, None, 0, "one"], ["recv", 0, 3],
                  ["send", 0, None, 0, "two"], ["recv", 0, 3]],
    })
    local = out[0]["ports"][0]
    got = [r.get("data") for r in out if r["op"] == "recv"]
    assert None not in got, out
    answers = [parse_member_answer(g) for g in got]
    assert {(a.src, a.sport) for a in answers} == {(t.SERVER, local)}
    assert len({a.member for a in answers}) == 1, "one flow stays on one member"
    assert answers[0].member in t.POOL_MEMBERS and answers[0].port == PORT


def test_source_ip_distribution_keeps_a_client_on_one_member(
    lab: LabNames, gateway: h.GatewayFactory, listeners: MemberListeners
) -> None:
    """distribution source_ip: 20 connections from one client address all reach one member."""
    rule = {"name": "http", "frontend": "fe-web", "pool": "web", "protocol": "tcp",
            "frontend_port": 80, "backend_port": PORT, "distribution": "source_ip"}

    def add(cfg: dict[str, Any]) -> None:
        cfg["gateway"]["inbound_default"] = "allow"

    gateway(h.lab_config(lb_rules=[rule], mutate=add))
    url = f"http://{t.FRONTEND_IP}:80/"
    for client in (t.SERVER, t.SERVER2):
        res = clients.curl(lab.inet, client, url, max_time=20, extra=[url] * 19)
        assert res.returncode == 0, res.stderr.decode()
        answers = [parse_member_answer(ln) for ln in res.stdout.decode().splitlines()]
        assert len(answers) == 20 and len({a.sport for a in answers}) == 20
        assert len({a.member for a in answers}) == 1, collections.Counter(a.member for a in answers)
        assert {a.src for a in answers} == {client}


def test_inbound_nat_rule_forwards_one_port_to_one_backend(
    lab: LabNames, gateway: h.GatewayFactory, listeners: MemberListeners
) -> None:
    """frontend:50001 reaches 10.10.1.1:2222 only, which sees the client's address."""
    nat = {"name": "ssh-1", "frontend": "fe-web", "protocol": "tcp", "frontend_port": NAT_PORT,
           "backend": t.POOL_MEMBERS[0], "backend_port": NAT_BACKEND_PORT}
    gateway(_config({"inbound_default": "allow"}, inbound_nat_rules=[nat]))
    log = listeners.log(t.POOL_MEMBERS[0], NAT_BACKEND_PORT)
    mark = log.mark()
    for _ in range(3):
        res = _inbound(lab, f"http://{t.FRONTEND_IP}:{NAT_PORT}/")
        assert res.returncode == 0, res.stderr.decode()
        a = parse_member_answer(res.stdout.decode())
        assert (a.src, a.member, a.port) == (t.SERVER, t.POOL_MEMBERS[0], NAT_BACKEND_PORT)
    recs = log.wait_for(lambda r: len(r) >= 3, mark)
    assert [r["src"] for r in recs] == [t.SERVER] * 3


def test_instance_ip_inbound_allowed_and_denied_by_a_group(
    lab: LabNames, gateway: h.GatewayFactory, listeners: MemberListeners
) -> None:
    """A group opening 8080 on the instance IP lets 8080 in; 8081 falls to DenyAllInBound."""
    group = {
        "name": "inst-nsg", "attach": [t.INSTANCE_BACKEND],
        "rules": [{"name": "allow-web", "priority": 100, "direction": "inbound", "access": "allow",
                   "protocol": "tcp", "source": "Internet", "destination": "*",
                   "destination_ports": str(PORT)}],
    }
    gw = gateway(_config(security_groups=[group]))
    denied_log = listeners.log(t.INSTANCE_BACKEND, OTHER)
    mark = denied_log.mark()

    res = _inbound(lab, f"http://{t.INSTANCE_PUBLIC}:{PORT}/")
    assert res.returncode == 0, res.stderr.decode()
    a = parse_member_answer(res.stdout.decode())
    assert (a.src, a.member, a.port) == (t.SERVER, t.INSTANCE_BACKEND, PORT)
    rows = [r for r in gw.ask("flows", "--backend", t.INSTANCE_BACKEND)
            if (r["remote"], r["remote_port"]) == (t.SERVER, a.sport)]
    assert len(rows) == 1, rows
    row = rows[0]
    assert (row["direction"], row["public_ip"], row["public_port"], row["backend_port"]) == (
        "in", t.INSTANCE_PUBLIC, PORT, PORT), row
    assert "allow-web" in str(row["rule"]), row

    before = _counters(gw)["drop_security_denied"]
    res = _inbound(lab, f"http://{t.INSTANCE_PUBLIC}:{OTHER}/", max_time=2)
    assert res.returncode != 0, res.stdout.decode()
    assert denied_log.records(mark) == [], "nothing reached the denied port"
    h.wait_until(lambda: _counters(gw)["drop_security_denied"] > before, 5,
                 what="drop_security_denied counted")
    ev = h.wait_until(lambda: gw.event("flow_denied"), 5, what="a flow_denied event",
                      detail=lambda: gw.log_text()[-2000:])
    assert ev["backend"] == t.INSTANCE_BACKEND and ev["direction"] == "inbound", ev
    assert ev["rule"] == "DenyAllInBound" and ev["port"] == OTHER, ev


@pytest.mark.parametrize(("destination", "ports", "opens"), [
    ("10.10.1.0/24", str(PORT), True),  # the backend's private address and backend port
    (t.FRONTEND_IP, "80", False),  # the frontend's address and port: never what a rule sees
])
def test_inbound_rules_see_the_backend_address_and_port(
    lab: LabNames, gateway: h.GatewayFactory, listeners: MemberListeners,
    destination: str, ports: str, opens: bool,
) -> None:
    """Inbound rules match the member's address and backend port, never frontend:80."""
    group = {"name": "web-in", "attach": ["web"],
             "rules": [{"name": "allow-in", "priority": 100, "direction": "inbound",
                        "access": "allow", "protocol": "tcp", "source": "Internet",
                        "destination": destination, "destination_ports": ports}]}
    gateway(_config(security_groups=[group]))
    marks = {m: listeners.log(m).mark() for m in t.POOL_MEMBERS}
    res = _inbound(lab, f"http://{t.FRONTEND_IP}:80/", max_time=2)
    arrived = sum(len(listeners.log(m).records(since)) for m, since in marks.items())
    if opens:
        assert res.returncode == 0, res.stderr.decode()
        assert parse_member_answer(res.stdout.decode()).member in t.POOL_MEMBERS
        assert arrived == 1
    else:
        assert res.returncode != 0 and arrived == 0, res.stdout.decode()


def test_instance_ip_answers_ping_from_the_internet_when_inbound_is_allowed(
    lab: LabNames, gateway: h.GatewayFactory
) -> None:
    """inbound_default allow: an echo request to 198.51.100.20 reaches 10.10.2.1 and is answered."""
    gateway(_config({"inbound_default": "allow"}))
    with h.Capture(lab.be, t.BE_IF, "icmp[icmptype] == icmp-echo") as cap:
        res = h.ping(lab.inet, t.SERVER, t.INSTANCE_PUBLIC, count=2, interval=0.2)
    assert res.returncode == 0, res.stdout.decode()
    arrived = [ln for ln in cap.lines if "echo request" in ln]
    assert len(arrived) == 2 and all(f"{t.SERVER} > {t.INSTANCE_BACKEND}" in ln for ln in arrived), cap.lines


@pytest.mark.parametrize("default", ["deny", "allow"])
def test_inbound_default_decides_for_backends_without_a_group(
    lab: LabNames, gateway: h.GatewayFactory, listeners: MemberListeners, default: str
) -> None:
    """No group: inbound_default deny lets nothing in (warned at start), allow lets all in."""
    gw = gateway(_config({"inbound_default": default}))
    marks = {m: listeners.log(m).mark() for m in (*t.POOL_MEMBERS, t.INSTANCE_BACKEND)}
    urls = [f"http://{t.FRONTEND_IP}:80/", f"http://{t.INSTANCE_PUBLIC}:{PORT}/"]
    results = [_inbound(lab, u, max_time=2) for u in urls]
    if default == "deny":
        assert all(r.returncode != 0 for r in results), [r.stdout for r in results]
        assert all(listeners.log(m).records(since) == [] for m, since in marks.items())
        warned = {(e["kind"], e["name"]) for e in gw.events("inbound_not_opened")}
        assert ("lb_rule", "http") in warned and any(k == "instance_ip" for k, _ in warned), warned
    else:
        assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
        members = {parse_member_answer(r.stdout.decode()).member for r in results}
        assert t.INSTANCE_BACKEND in members and members & set(t.POOL_MEMBERS)
        assert gw.events("inbound_not_opened") == []
    res = h.curl(lab, t.POOL_MEMBERS[1], f"http://{t.SERVER}/")
    assert res.returncode == 0 and h.parse_peer(res.stdout.decode())[0] == t.FRONTEND_IP
