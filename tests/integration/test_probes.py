"""Health probes (issue 10, part 2): a member whose probe fails goes down in time, new
inbound flows avoid it while an established one stays, it comes back after one success,
and a group that denies the AzureLoadBalancer tag marks a member down (the article's
warning).

Each member runs its service listener on 8080 (lab.toml's lb_rule "http") and a separate
health listener on 8081, the probe's port, so stopping the health listener fails the probe
without touching live connections.  An established flow is an nc connection through a
second lb_rule (frontend 7000 to each member's 7000, where an nc listener writes what it
receives to a file).
"""

from __future__ import annotations

import collections
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.lab import clients, configtext
from gateway.lab import layout as t
from gateway.lab.inbound import MemberListeners, parse_member_answer
from gateway.lab.layout import LabNames
from gateway.lab.procs import ProcessSet
from tests.integration import helpers as h

pytestmark = pytest.mark.integration

SERVICE, HEALTH, HELD = t.MEMBER_PORT, 8081, 7000
INTERVAL, COUNT = 1, 2
#: The issue's bound: down within interval * number_of_probes + 1 s.
DOWN_WITHIN = INTERVAL * COUNT + 1


def _config(
    gateway: dict[str, Any] | None = None, probe: dict[str, Any] | None = None, **arrays: Any
) -> str:
    """lab.toml with a probe on 8081 (tcp unless ``probe`` says otherwise) for lb_rule "http"
    and an lb_rule frontend 7000 -> members' 7000 on the same probe; inbound open;
    ``arrays`` appended."""
    http = {"name": "http", "frontend": "fe-web", "pool": "web", "protocol": "tcp",
            "frontend_port": 80, "backend_port": SERVICE, "probe": "health"}
    held = {"name": "held", "frontend": "fe-web", "pool": "web", "protocol": "tcp",
            "frontend_port": HELD, "backend_port": HELD, "probe": "health"}

    def add(cfg: dict[str, Any]) -> None:
        cfg["gateway"].update({"inbound_default": "allow", **(gateway or {})})

    spec = {"name": "health", "protocol": "tcp", "port": HEALTH, "interval": INTERVAL,
            "number_of_probes": COUNT, **(probe or {})}
    return (h.lab_config(lb_rules=[http, held], mutate=add)
            + configtext.sections(probes=[spec], **arrays))


@pytest.fixture(scope="module")
def listeners(lab: LabNames, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MemberListeners]:
    """Service (8080) and health (8081) listeners on every member; stopped by pid at the end."""
    ml = MemberListeners(lab.be, Path(tmp_path_factory.mktemp("listeners")))
    try:
        ml.start_all(t.POOL_MEMBERS, SERVICE)
        ml.start_all(t.POOL_MEMBERS, HEALTH)
        yield ml
    finally:
        ml.close()


@pytest.fixture()
def health_back(listeners: MemberListeners) -> Iterator[MemberListeners]:
    """Every health listener runs again after the test, whatever the test stopped."""
    try:
        yield listeners
    finally:
        listeners.start_all(t.POOL_MEMBERS, HEALTH)


def health(gw: h.GatewayProc) -> dict[str, str]:
    """member -> "up"/"down" from the ``health`` rows of ``snatgw status --json`` (one per
    probe and member; a member down for any probe counts as down)."""
    out: dict[str, str] = {}
    for row in gw.ask("status").get("health") or []:
        member, state = row["member"], row["state"]
        out[member] = "down" if out.get(member) == "down" else state
    return out


def _wait_health(gw: h.GatewayProc, want: dict[str, str], timeout: float) -> float:
    """Poll status until every member in ``want`` has its state; returns the seconds taken."""
    start = time.monotonic()
    h.wait_until(lambda: all(health(gw).get(m) == s for m, s in want.items()), timeout,
                 interval=0.1, what=f"health {want}", detail=lambda: health(gw))
    return time.monotonic() - start


def _members_answering(lab: LabNames, n: int) -> collections.Counter[str]:
    url = f"http://{t.FRONTEND_IP}:80/"
    res = clients.curl(lab.inet, t.SERVER, url, max_time=20, extra=[url] * (n - 1))
    assert res.returncode == 0, res.stderr.decode()
    return collections.Counter(parse_member_answer(ln).member for ln in res.stdout.decode().splitlines())


def test_a_member_whose_probe_fails_goes_down_and_comes_back(
    lab: LabNames, gateway: h.GatewayFactory, health_back: MemberListeners, tmp_path: Path
) -> None:
    """Probe fails: down in time, new flows avoid it, a live flow stays; probe back: up."""
    listeners = health_back
    gw = gateway(_config())
    _wait_health(gw, dict.fromkeys(t.POOL_MEMBERS, "up"), 10)

    procs = ProcessSet()
    sinks = {m: tmp_path / f"held-{m}.out" for m in t.POOL_MEMBERS}
    client: subprocess.Popen[bytes] | None = None
    try:
        for m, sink in sinks.items():
            with sink.open("wb") as fh:
                procs.start(lab.be, ["nc", "-l", "-s", m, "-p", str(HELD)], stdout=fh)
        for m in t.POOL_MEMBERS:
            h.wait_until(lambda m=m: clients_listening(lab, m), 10, what=f"nc on {m}:{HELD}")
        client = procs.start(lab.inet, ["nc", "-s", t.SERVER, t.FRONTEND_IP, str(HELD)],
                             stdin=subprocess.PIPE)
        assert client.stdin is not None
        client.stdin.write(b"before\n")
        client.stdin.flush()
        held = h.wait_until(
            lambda: next((m for m, s in sinks.items() if b"before" in s.read_bytes()), None), 5,
            what="the held connection reached a member")

        listeners.stop(held, HEALTH)
        took = _wait_health(gw, {held: "down"}, DOWN_WITHIN + 2)
        assert took <= DOWN_WITHIN, f"down after {took:.1f} s (bound {DOWN_WITHIN} s)"
        assert {m: s for m, s in health(gw).items() if m != held} == dict.fromkeys(
            set(t.POOL_MEMBERS) - {held}, "up")
        ev = [e for e in gw.events("member_health_changed") if e["member"] == held]
        assert ev and ev[-1]["state"] == "down" and ev[-1]["probe"] == "health", ev

        spread = _members_answering(lab, 30)
        assert held not in spread and sum(spread.values()) == 30, spread

        client.stdin.write(b"after\n")
        client.stdin.flush()
        h.wait_until(lambda: b"after" in sinks[held].read_bytes(), 5,
                     what="the established flow still delivers to the down member",
                     detail=lambda: sinks[held].read_bytes())

        listeners.start(held, HEALTH)
        _wait_health(gw, {held: "up"}, INTERVAL + 2)
        ups = [e for e in gw.events("member_health_changed") if e["member"] == held]
        assert ups[-1]["state"] == "up", ups
        assert held in _members_answering(lab, 30)
    finally:
        if client is not None and client.stdin is not None:
            client.stdin.close()
        procs.stop_all(timeout=3)


def clients_listening(lab: LabNames, addr: str) -> bool:
    out = h.ns_run(lab.be, ["ss", "-Hltn", "src", f"{addr}:{HELD}"], check=False).stdout
    return bool(out.strip())


def test_a_group_denying_azure_load_balancer_marks_the_member_down(
    lab: LabNames, gateway: h.GatewayFactory, listeners: MemberListeners
) -> None:
    """A group denying AzureLoadBalancer keeps its member down and out of new flows."""
    blocked = t.POOL_MEMBERS[2]
    group = {
        "name": "no-probes", "attach": [blocked],
        "rules": [
            {"name": "deny-lb", "priority": 100, "direction": "inbound", "access": "deny",
             "protocol": "*", "source": "AzureLoadBalancer", "destination": "*"},
            {"name": "allow-web", "priority": 200, "direction": "inbound", "access": "allow",
             "protocol": "tcp", "source": "Internet", "destination_ports": str(SERVICE)},
        ],
    }
    marks = {m: listeners.log(m, HEALTH).mark() for m in t.POOL_MEMBERS}
    gw = gateway(_config(probe={"protocol": "http", "path": "/healthz"}, security_groups=[group]))
    others = [m for m in t.POOL_MEMBERS if m != blocked]
    _wait_health(gw, {**dict.fromkeys(others, "up"), blocked: "down"}, 10)
    # Several probe rounds later it is still down, and no probe ever reached its listener.
    for m in others:
        recs = listeners.log(m, HEALTH).wait_for(lambda r: len(r) >= 3, marks[m], timeout=5 * INTERVAL)
        assert len(recs) >= 3 and {r["src"] for r in recs} == {t.INSIDE_GW}, (m, recs)
    assert listeners.log(blocked, HEALTH).records(marks[blocked]) == []
    assert health(gw)[blocked] == "down"
    spread = _members_answering(lab, 20)
    assert set(spread) == set(others), spread
    # Outbound through the frontend does not depend on probe health (scenario 2).
    res = h.curl(lab, blocked, f"http://{t.SERVER}/")
    assert res.returncode == 0 and h.parse_peer(res.stdout.decode())[0] == t.FRONTEND_IP


def test_all_members_down_drops_new_inbound_flows(
    lab: LabNames, gateway: h.GatewayFactory, health_back: MemberListeners
) -> None:
    """All members down: a new inbound connection reaches no one and counts drop_no_healthy_member."""
    listeners = health_back
    gw = gateway(_config())
    _wait_health(gw, dict.fromkeys(t.POOL_MEMBERS, "up"), 10)
    marks = {m: listeners.log(m).mark() for m in t.POOL_MEMBERS}
    for m in t.POOL_MEMBERS:
        listeners.stop(m, HEALTH)
    _wait_health(gw, dict.fromkeys(t.POOL_MEMBERS, "down"), DOWN_WITHIN + 2)
    before = gw.ask("stats")["counters"]["drop_no_healthy_member"]
    res = clients.curl(lab.inet, t.SERVER, f"http://{t.FRONTEND_IP}:80/", max_time=2)
    assert res.returncode != 0, res.stdout.decode()
    assert all(listeners.log(m).records(since) == [] for m, since in marks.items())
    assert gw.ask("stats")["counters"]["drop_no_healthy_member"] > before


def test_a_reload_keeps_the_health_of_members_that_stay(
    lab: LabNames, gateway: h.GatewayFactory, listeners: MemberListeners
) -> None:
    """A reload keeps member health: up at once, no member went down."""
    gw = gateway(_config())
    _wait_health(gw, dict.fromkeys(t.POOL_MEMBERS, "up"), 10)
    res = gw.reload(_config({"idle_timeout": 300}))
    assert res is not None and res.returncode == 0, res.stderr.decode()
    assert health(gw) == dict.fromkeys(t.POOL_MEMBERS, "up")
    assert not [e for e in gw.events("member_health_changed") if e["state"] == "down"]
