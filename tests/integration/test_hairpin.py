"""Hairpinning (RFC 4787 REQ-9, RFC 5382 REQ-8; issue 10, part 2): a backend that connects
to a public address the gateway owns reaches the target, which sees the backend's own
public address as the source, exactly as if the connection came from outside.

Targets are whoami ``--show-local`` listeners on the backends: their answer names the
member that answered and the source it saw, and their log records the same.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.lab import clients, configtext
from gateway.lab import layout as t
from gateway.lab.inbound import MemberAnswer, MemberListeners, parse_member_answer
from gateway.lab.layout import LabNames
from gateway.lab.netns import ns_run
from gateway.lab.procs import ProcessSet
from tests.integration import helpers as h

pytestmark = pytest.mark.integration

PORT = t.MEMBER_PORT
NAT_PORT, NAT_BACKEND_PORT = 50001, 2222
BLOCK = 1024  # lab.toml: 3 members behind fe-web, 1024-port blocks from 1024 (10.10.1.1 first)


@pytest.fixture(scope="module")
def listeners(lab: LabNames, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MemberListeners]:
    ml = MemberListeners(lab.be, Path(tmp_path_factory.mktemp("listeners")))
    try:
        ml.start_all([*t.POOL_MEMBERS, t.INSTANCE_BACKEND], PORT)
        ml.start(t.POOL_MEMBERS[0], NAT_BACKEND_PORT)
        yield ml
    finally:
        ml.close()


@pytest.fixture(scope="module")
def gw(module_gateway: h.GatewayFactory, listeners: MemberListeners) -> Iterator[h.GatewayProc]:
    """lab.toml, inbound open, plus the NAT rule frontend:50001 -> 10.10.1.1:2222."""

    def add(cfg: dict[str, Any]) -> None:
        cfg["gateway"]["inbound_default"] = "allow"

    nat = {"name": "ssh-1", "frontend": "fe-web", "protocol": "tcp", "frontend_port": NAT_PORT,
           "backend": t.POOL_MEMBERS[0], "backend_port": NAT_BACKEND_PORT}
    proc = module_gateway(h.lab_config(mutate=add) + configtext.sections(inbound_nat_rules=[nat]))
    yield proc
    assert proc.stop() == 0, proc.log_text()[-3000:]


def _from_backend(lab: LabNames, src: str, url: str, extra: tuple[str, ...] = ()) -> MemberAnswer:
    res = h.curl(lab, src, url, max_time=3, extra=extra)
    assert res.returncode == 0, (src, url, res.stderr.decode())
    return parse_member_answer(res.stdout.decode())


def test_a_standalone_backend_reaches_an_lb_frontend_port_as_its_default_snat_address(
    lab: LabNames, gw: h.GatewayProc, listeners: MemberListeners
) -> None:
    """10.10.3.1 -> frontend:80 lands on a member's 8080, which sees a default SNAT address."""
    marks = {m: listeners.log(m).mark() for m in t.POOL_MEMBERS}
    a = _from_backend(lab, t.STANDALONE[0], f"http://{t.FRONTEND_IP}:80/")
    assert a.member in t.POOL_MEMBERS and a.port == PORT
    assert a.src in t.DEFAULT_SNAT and a.sport >= 1024, a
    recs = listeners.log(a.member).wait_for(lambda r: len(r) >= 1, marks[a.member])
    assert [(r["src"], r["sport"]) for r in recs] == [(a.src, a.sport)]
    assert h.wait_until(lambda: gw.ask("stats")["counters"]["hairpin_translated"] > 0, 5,
                        what="hairpin_translated counted")


def test_a_pool_member_reaches_an_instance_public_ip_as_its_frontend(
    lab: LabNames, gw: h.GatewayProc, listeners: MemberListeners
) -> None:
    """Pool member -> instance public IP: the target sees the frontend and a port of its block."""
    a = _from_backend(lab, t.POOL_MEMBERS[1], f"http://{t.INSTANCE_PUBLIC}:{PORT}/")
    assert a.member == t.INSTANCE_BACKEND and a.src == t.FRONTEND_IP, a
    assert 1024 + BLOCK <= a.sport < 1024 + 3 * BLOCK, a


def test_an_instance_ip_backend_reaches_a_frontend_with_its_own_port(
    lab: LabNames, gw: h.GatewayProc
) -> None:
    """Instance-IP backend -> frontend:80: the member sees 198.51.100.20 and the backend's port."""
    a = _from_backend(lab, t.INSTANCE_BACKEND, f"http://{t.FRONTEND_IP}:80/",
                      extra=("--local-port", "41234"))
    assert (a.src, a.sport) == (t.INSTANCE_PUBLIC, 41234), a
    assert a.member in t.POOL_MEMBERS


def test_hairpin_to_an_inbound_nat_port(lab: LabNames, gw: h.GatewayProc, listeners: MemberListeners) -> None:
    """10.10.3.2 -> frontend:50001 reaches 10.10.1.1:2222, which sees a default SNAT address."""
    a = _from_backend(lab, t.STANDALONE[1], f"http://{t.FRONTEND_IP}:{NAT_PORT}/")
    assert (a.member, a.port) == (t.POOL_MEMBERS[0], NAT_BACKEND_PORT)
    assert a.src in t.DEFAULT_SNAT, a


def test_a_member_landing_on_itself_sees_its_own_frontend(lab: LabNames, gw: h.GatewayProc) -> None:
    """A member hairpinned onto itself sees its own frontend and a port of its own block."""
    url = f"http://{t.FRONTEND_IP}:80/"
    res = h.curl(lab, t.POOL_MEMBERS[0], url, max_time=20, extra=[url] * 29)
    assert res.returncode == 0, res.stderr.decode()
    answers = [parse_member_answer(ln) for ln in res.stdout.decode().splitlines()]
    assert len(answers) == 30
    assert {a.src for a in answers} == {t.FRONTEND_IP}
    assert all(1024 <= a.sport < 1024 + BLOCK for a in answers), [a.sport for a in answers]
    assert any(a.member == t.POOL_MEMBERS[0] for a in answers), {a.member for a in answers}


def _counter(gw: h.GatewayProc, name: str) -> int:
    n: int = gw.ask("stats")["counters"][name]
    return n


def test_a_backend_pings_an_instance_ip_but_not_its_own(lab: LabNames, gw: h.GatewayProc) -> None:
    """10.10.3.1 pings 198.51.100.20 through the hairpin and gets its answers; 10.10.2.1 pinging
    its own instance IP gets none (dropped, never passed)."""
    before = _counter(gw, "hairpin_translated")
    res = clients.ping(lab.be, t.STANDALONE[0], t.INSTANCE_PUBLIC, count=2, interval=0.2)
    assert res.returncode == 0, res.stdout.decode()
    assert _counter(gw, "hairpin_translated") >= before + 4
    own = clients.ping(lab.be, t.INSTANCE_BACKEND, t.INSTANCE_PUBLIC, count=1, wait=1)
    assert own.returncode != 0 and b" 0 received" in own.stdout, own.stdout.decode()


def test_an_unserved_public_port_never_reaches_the_gateway_host(lab: LabNames, gw: h.GatewayProc) -> None:
    """A listener of the gateway host on 0.0.0.0:81 is not reached at frontend:81 from a backend
    or from the internet (queued and dropped, drop_no_flow); the host itself reaches it."""
    url = f"http://{t.FRONTEND_IP}:81/"
    procs = ProcessSet()
    try:
        procs.start(lab.gw, [sys.executable, "-m", "http.server", "81", "--bind", "0.0.0.0"])
        h.wait_until(
            lambda: clients.curl(lab.gw, t.FRONTEND_IP, url, max_time=1).returncode == 0, 10,
            what="the host's own listener answers on frontend:81",
        )  # fmt: skip
        before = _counter(gw, "drop_no_flow")
        assert h.curl(lab, t.STANDALONE[0], url, max_time=2).returncode != 0
        assert clients.curl(lab.inet, t.SERVER, url, max_time=2).returncode != 0
        assert _counter(gw, "drop_no_flow") >= before + 2
    finally:
        procs.stop_all()


def test_a_bulk_download_through_the_hairpin_arrives_intact(
    lab: LabNames, gw: h.GatewayProc, tmp_path: Path
) -> None:
    """4 MiB from the instance-IP backend to 10.10.3.1 through 198.51.100.20 (whole GSO
    segments rewritten twice, the TCP queue) arrives byte for byte."""
    data = hashlib.sha256(b"hairpin").digest() * (4 * 32768)
    (tmp_path / "big").write_bytes(data)
    url = f"http://{t.INSTANCE_PUBLIC}:2223/big"
    procs = ProcessSet()
    try:
        procs.start(lab.be, [sys.executable, "-m", "http.server", "2223", "--bind", t.INSTANCE_BACKEND,
                             "--directory", str(tmp_path)])  # fmt: skip
        h.wait_until(
            lambda: clients.curl(lab.be, t.INSTANCE_BACKEND, f"http://{t.INSTANCE_BACKEND}:2223/",
                                 max_time=1).returncode == 0,
            10, what="the download server listens",
        )  # fmt: skip
        before = _counter(gw, "hairpin_translated")
        res = h.curl(lab, t.STANDALONE[0], url, max_time=20)
        assert res.returncode == 0, res.stderr.decode()
        assert hashlib.sha256(res.stdout).hexdigest() == hashlib.sha256(data).hexdigest()
        assert _counter(gw, "hairpin_translated") > before
    finally:
        procs.stop_all()


FORGE = """
import sys
from scapy.all import IP, TCP, UDP, send
src, dst = sys.argv[1], sys.argv[2]
for i in range(5):
    send(IP(src=src, dst=dst) / TCP(sport=40000 + i, dport=80, flags="S"), verbose=False)
    send(IP(src=src, dst=dst) / UDP(sport=40000 + i, dport=5000) / b"x", verbose=False)
"""


def test_the_internet_cannot_speak_as_a_public_address_of_the_gateway(
    lab: LabNames, gw: h.GatewayProc
) -> None:
    """SYNs and datagrams from the internet forged with a default SNAT address (what a hairpinned
    sender looks like) as their source open no flow and reach nothing: dropped before the queue.
    Control: the same packets from the internet host's own address open flows."""
    def created() -> int:
        return _counter(gw, "inbound_flows_created")

    before = created()
    for src in (t.DEFAULT_SNAT[0], t.FRONTEND_IP, t.INSTANCE_PUBLIC):
        ns_run(lab.inet, [sys.executable, "-c", FORGE, src, t.INSTANCE_PUBLIC], timeout=30)
    ns_run(lab.inet, [sys.executable, "-c", FORGE, t.SERVER, t.INSTANCE_PUBLIC], timeout=30)
    assert h.wait_until(lambda: created() >= before + 10, 5, what="the control's flows")
    assert created() == before + 10
    forged = [
        r for r in gw.ask("flows", "--backend", t.INSTANCE_BACKEND)
        if r["remote"] != t.SERVER and 40000 <= r["remote_port"] < 40005 and r["backend_port"] in (80, 5000)
    ]  # fmt: skip
    assert not forged, forged
