"""Classic cloud services (issue 10, part 3): a web role with an endpoint leaves through the
service's VIP (scenario 2), a worker role without endpoints through default SNAT (scenario
3), the endpoint delivers inbound (open unless a group denies it), and an instance public
IP on a web role is refused at start.

The role instances are the lab's first extra backends (10.10.100.1-3).
"""

from __future__ import annotations

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

LAB_EXTRA_BACKENDS = 3
WEB = ("10.10.100.1", "10.10.100.2")
WORKER = "10.10.100.3"
VIP = "198.51.100.40"
LOCAL_PORT = t.MEMBER_PORT


def _service(**web_role: Any) -> dict[str, Any]:
    return {
        "name": "shop", "vip": VIP,
        "roles": [
            {"name": "frontend", "kind": "web", "instances": list(WEB),
             "endpoints": [{"protocol": "tcp", "public_port": 80, "local_port": LOCAL_PORT}],
             **web_role},
            {"name": "jobs", "kind": "worker", "instances": [WORKER]},
        ],
    }


@pytest.fixture(scope="module")
def listeners(lab: LabNames, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MemberListeners]:
    ml = MemberListeners(lab.be, Path(tmp_path_factory.mktemp("listeners")))
    try:
        ml.start_all(WEB, LOCAL_PORT)
        yield ml
    finally:
        ml.close()


@pytest.fixture(scope="module")
def gw(module_gateway: h.GatewayFactory, listeners: MemberListeners) -> Iterator[h.GatewayProc]:
    """lab.toml (inbound_default deny, the default) plus the cloud service "shop"."""
    proc = module_gateway(h.lab_config() + configtext.sections(cloud_services=[_service()]))
    yield proc
    assert proc.stop() == 0, proc.log_text()[-3000:]


def test_a_web_role_leaves_through_the_vip(
    lab: LabNames, lab_extra: tuple[str, ...], gw: h.GatewayProc, whoami_log: h.WhoamiLog
) -> None:
    """Web role instances leave as the VIP from their own blocks; nslookup myip prints the VIP."""
    mark = whoami_log.mark()
    seen = []
    for src in WEB:
        res = h.curl(lab, src, f"http://{t.SERVER}/")
        assert res.returncode == 0, res.stderr.decode()
        seen.append(h.parse_peer(res.stdout.decode()))
    assert [ip for ip, _ in seen] == [VIP, VIP], seen
    assert all(port >= 1024 for _, port in seen)
    blocks = {src: str(row["block"]) for src in WEB for row in gw.ask("ports", "--backend", src)}
    assert len(set(blocks.values())) == 2 and "[]" not in blocks.values(), (
        f"one preallocated block per instance: {blocks}")
    for (_ip, port), src in zip(seen, WEB, strict=True):
        rows = gw.ask("ports", "--backend", src)
        assert any(lo <= port <= hi for lo, hi in rows[0]["block"]), (src, port, rows)
    recs = whoami_log.wait_for(lambda r: len(r) >= 2, mark)
    assert [(r["src"], r["sport"]) for r in recs] == seen

    res = clients.nslookup(lab.be, WEB[1], t.SERVER, extra_backends=lab_extra)
    assert clients.nslookup_addresses(res.stdout.decode()) == [VIP], res.stdout.decode()


def test_a_worker_role_without_endpoints_uses_default_snat(
    lab: LabNames, lab_extra: tuple[str, ...], gw: h.GatewayProc
) -> None:
    """The worker role instance leaves as a default SNAT address (scenario 3), nslookup agrees."""
    res = h.curl(lab, WORKER, f"http://{t.SERVER}/")
    assert res.returncode == 0, res.stderr.decode()
    ip, _port = h.parse_peer(res.stdout.decode())
    assert ip in t.DEFAULT_SNAT
    res = clients.nslookup(lab.be, WORKER, t.SERVER, extra_backends=lab_extra)
    found = clients.nslookup_addresses(res.stdout.decode())
    assert len(found) == 1 and found[0] in t.DEFAULT_SNAT, res.stdout.decode()


def test_the_endpoint_delivers_inbound_to_the_web_role(
    lab: LabNames, gw: h.GatewayProc, listeners: MemberListeners
) -> None:
    """VIP:80 reaches the web role's 8080 with inbound_default deny: an endpoint is an opening."""
    url = f"http://{VIP}:80/"
    res = clients.curl(lab.inet, t.SERVER, url, max_time=20, extra=[url] * 9)
    assert res.returncode == 0, res.stderr.decode()
    answers = [parse_member_answer(ln) for ln in res.stdout.decode().splitlines()]
    assert len(answers) == 10
    assert {a.member for a in answers} <= set(WEB) and {a.port for a in answers} == {LOCAL_PORT}
    assert {a.src for a in answers} == {t.SERVER}
    got = sum(len(listeners.log(m).records()) for m in WEB)
    assert got >= 10


def test_an_instance_ip_on_a_web_role_is_refused_at_start(
    lab: LabNames, gateway: h.GatewayFactory
) -> None:
    """An instance IP on a web role: exit 2, one line naming file and instance, nothing installed."""
    before = h.gw_snapshot(lab)
    bad = h.lab_config(instance_ips=[{"private": t.INSTANCE_BACKEND, "public": t.INSTANCE_PUBLIC},
                                     {"private": WEB[0], "public": "198.51.100.21"}])
    res = gateway.run_to_exit(bad + configtext.sections(cloud_services=[_service()]))
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2, f"rc {res.returncode}: {res.stderr[-2000:]}"
    assert len(lines) == 1, lines
    line = lines[0]
    assert str(res.config_path) in line and "cloud_services" in line and WEB[0] in line, line
    assert "instance" in line, line
    assert h.gw_snapshot(lab) == before
