"""Network security groups on the outbound side (issue 10, part 1): a deny rule on one port,
a deny-all rule below an allow rule, the Internet and VirtualNetwork tags, and what the
operator sees (counter, event, ``snatgw rules --json`` hit counts).

The internet host runs whoami on 80 (tcp) and 5000 (udp) and a second listener on 8000
(tcp and udp) bound to SERVER, so "another port" is a real service too; every test checks
what those services received.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.lab import configtext
from gateway.lab import layout as t
from gateway.lab.inbound import MemberListeners, parse_member_answer
from gateway.lab.layout import LabNames
from tests.integration import helpers as h

pytestmark = pytest.mark.integration

OTHER_PORT = 8000
MEMBER = t.POOL_MEMBERS[0]


def _config(groups: list[dict[str, Any]], gateway: dict[str, Any] | None = None) -> str:
    """lab.toml with ``[gateway]`` keys added and the groups appended."""

    def add(cfg: dict[str, Any]) -> None:
        cfg["gateway"].update(gateway or {})

    return h.lab_config(mutate=add) + configtext.sections(security_groups=groups)


def _rule(name: str, priority: int, access: str, protocol: str = "*", destination: Any = "*",
          ports: str = "*", direction: str = "outbound") -> dict[str, Any]:
    return {"name": name, "priority": priority, "direction": direction, "access": access,
            "protocol": protocol, "source": "*", "source_ports": "*",
            "destination": destination, "destination_ports": ports}


@pytest.fixture(scope="module")
def server_8000(lab: LabNames, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MemberListeners]:
    """A second service on the internet host: SERVER:8000 tcp and udp (stopped by pid)."""
    ml = MemberListeners(lab.inet, Path(tmp_path_factory.mktemp("inet")))
    try:
        ml.start(t.SERVER, OTHER_PORT)
        yield ml
    finally:
        ml.close()


def _counters(gw: h.GatewayProc) -> dict[str, int]:
    return dict(gw.ask("stats")["counters"])


def rule_hits(gw: h.GatewayProc, backend: str) -> dict[str, int]:
    """rule name -> hit count from ``snatgw rules --backend B --json`` (one row per rule that
    applies to the backend, Azure's defaults included; summed over its groups)."""
    hits: dict[str, int] = {}
    for row in gw.ask("rules", "--backend", backend):
        assert row["backend"] == backend, row
        hits[row["name"]] = hits.get(row["name"], 0) + int(row["hits"])
    return hits


def test_an_outbound_deny_on_one_port(
    lab: LabNames, gateway: h.GatewayFactory, whoami_log: h.WhoamiLog, server_8000: MemberListeners
) -> None:
    """An outbound deny on tcp/80: curl to :80 fails, :8000 works; counted, one flow_denied event."""
    deny = _rule("deny-http", 100, "deny", "tcp", "Internet", "80")
    gw = gateway(_config([{"name": "web-nsg", "attach": ["web"], "rules": [deny]}]))
    mark, mark8000 = whoami_log.mark(), server_8000.log(t.SERVER, OTHER_PORT).mark()

    res = h.curl(lab, MEMBER, f"http://{t.SERVER}/", max_time=2)
    assert res.returncode != 0, res.stdout.decode()
    res = h.curl(lab, MEMBER, f"http://{t.SERVER}:{OTHER_PORT}/")
    assert res.returncode == 0, res.stderr.decode()
    a = parse_member_answer(res.stdout.decode())
    assert a.src == t.FRONTEND_IP and (a.member, a.port) == (t.SERVER, OTHER_PORT)
    # The group covers the pool only: a standalone backend still reaches port 80.
    res = h.curl(lab, t.STANDALONE[0], f"http://{t.SERVER}/")
    assert res.returncode == 0, res.stderr.decode()

    recs = whoami_log.wait_for(lambda r: len(r) >= 1, mark)
    assert [(r["proto"], r["src"] in t.DEFAULT_SNAT) for r in recs] == [("tcp", True)], (
        f"only the standalone backend arrived: {recs}")
    assert len(server_8000.log(t.SERVER, OTHER_PORT).records(mark8000)) == 1

    assert _counters(gw)["drop_security_denied"] >= 1
    # A denied flow never takes a port: the member's only flows are to :8000.
    assert {(r["remote"], r["remote_port"]) for r in gw.ask("flows", "--backend", MEMBER)} == {
        (t.SERVER, OTHER_PORT)}
    ev = h.wait_until(lambda: gw.event("flow_denied"), 5, what="a flow_denied event",
                      detail=lambda: gw.log_text()[-2000:])
    assert (ev["backend"], ev["group"], ev["rule"], ev["direction"]) == (
        MEMBER, "web-nsg", "deny-http", "outbound"), ev
    assert (ev["remote"], ev["port"], ev["protocol"]) == (t.SERVER, 80, "tcp"), ev
    # curl's SYN retries are the same backend and rule within the minute: one event.
    assert len(gw.events("flow_denied")) == 1, gw.events("flow_denied")
    assert rule_hits(gw, MEMBER).get("deny-http", 0) >= 1


def test_deny_all_outbound_below_an_allow_rule(
    lab: LabNames, gateway: h.GatewayFactory, whoami_log: h.WhoamiLog, server_8000: MemberListeners
) -> None:
    """allow tcp/80 above a deny-all: http leaves, udp and ping do not; rules --json counts hits."""
    rules = [_rule("allow-http", 100, "allow", "tcp", "*", "80"), _rule("deny-all-out", 4096, "deny")]
    gw = gateway(_config([{"name": "locked", "attach": [t.INSTANCE_BACKEND], "rules": rules}]))
    mark = whoami_log.mark()
    mark8000 = server_8000.log(t.SERVER, OTHER_PORT).mark()

    res = h.curl(lab, t.INSTANCE_BACKEND, f"http://{t.SERVER}/")
    assert res.returncode == 0 and h.parse_peer(res.stdout.decode())[0] == t.INSTANCE_PUBLIC
    out = h.probe(lab.be, {"sockets": [{"src": t.INSTANCE_BACKEND}],
                           "steps": [["send", 0, t.SERVER, OTHER_PORT, "hi"], ["recv", 0, 1]]})
    assert out[-1].get("timeout") is True, out
    assert h.ping(lab.be, t.INSTANCE_BACKEND, t.SERVER, count=1, wait=1).returncode != 0

    recs = whoami_log.wait_for(lambda r: len(r) >= 1, mark)
    assert [(r["proto"], r["src"]) for r in recs] == [("tcp", t.INSTANCE_PUBLIC)], recs
    assert server_8000.log(t.SERVER, OTHER_PORT).records(mark8000) == []

    hits = rule_hits(gw, t.INSTANCE_BACKEND)
    assert hits.get("allow-http", 0) >= 1 and hits.get("deny-all-out", 0) >= 2, hits
    assert hits.get("AllowInternetOutBound", 0) == 0, hits
    assert {"AllowVnetOutBound", "AllowInternetOutBound", "DenyAllOutBound",
            "AllowVnetInBound", "AllowAzureLoadBalancerInBound", "DenyAllInBound"} <= set(hits), hits
    # Another backend has no group: its rules view holds no user rule and it is unfiltered.
    assert "allow-http" not in rule_hits(gw, t.STANDALONE[0])
    assert h.ping(lab.be, t.STANDALONE[0], t.SERVER, count=1).returncode == 0


def test_internet_and_virtual_network_tags(
    lab: LabNames, gateway: h.GatewayFactory, whoami_log: h.WhoamiLog
) -> None:
    """address_space decides the tags: SERVER/32 in it is VirtualNetwork, SERVER2 stays Internet."""
    space = {"address_space": ["10.10.0.0/16", f"{t.SERVER}/32"]}
    groups = [
        {"name": "no-internet", "attach": ["10.10.3.0/24"],
         "rules": [_rule("deny-internet", 100, "deny", "*", "Internet")]},
        {"name": "no-vnet", "attach": [t.INSTANCE_BACKEND],
         "rules": [_rule("deny-vnet", 100, "deny", "*", "VirtualNetwork")]},
    ]
    gateway(_config(groups, space))
    mark = whoami_log.mark()

    def reach(src: str, server: str) -> tuple[str, int] | None:
        res = h.curl(lab, src, f"http://{server}/", max_time=2)
        return h.parse_peer(res.stdout.decode()) if res.returncode == 0 else None

    seen = reach(t.STANDALONE[0], t.SERVER)
    assert seen is not None and seen[0] in t.DEFAULT_SNAT, "VirtualNetwork is not Internet"
    assert reach(t.STANDALONE[0], t.SERVER2) is None, "SERVER2 is Internet: denied"
    assert reach(t.INSTANCE_BACKEND, t.SERVER) is None, "SERVER is VirtualNetwork: denied"
    seen2 = reach(t.INSTANCE_BACKEND, t.SERVER2)
    assert seen2 is not None and seen2[0] == t.INSTANCE_PUBLIC

    recs = whoami_log.wait_for(lambda r: len(r) >= 2, mark)
    assert sorted((r["dst"], r["src"]) for r in recs) == sorted(
        [(t.SERVER, seen[0]), (t.SERVER2, t.INSTANCE_PUBLIC)]), recs
