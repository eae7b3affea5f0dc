"""Two workers (README, "Workers"): a flow's two directions meet in the worker that owns
its backend, the operator sees both workers as one gateway, a reload keeps flows, and a
worker's crash fails the gateway closed.

Backends of both workers are used: with two workers, backend ``ip`` belongs to worker
``(ip & 15) % 2`` (gateway/core/shard.py), so 10.10.1.2 and 10.10.100.2 are worker 0's
and 10.10.1.1, 10.10.100.1 and the instance IP's backend 10.10.2.1 are worker 1's.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.lab import clients
from gateway.lab import layout as t
from gateway.lab.inbound import MemberListeners, parse_member_answer
from gateway.lab.layout import LabNames
from tests.integration import helpers as h

pytestmark = pytest.mark.integration

LAB_EXTRA_BACKENDS = 4
WORKERS = 2
METRICS_PORT = 9479
#: Packets the far side receives from anything but itself and its neighbour.
FROM_GATEWAY = f"ip and not src host {t.SERVER} and not src host {t.SERVER2}"


def owner(ip: str) -> int:
    return (int(ipaddress.IPv4Address(ip)) & 15) % WORKERS


def config(extra: tuple[str, ...], **overrides: Any) -> str:
    """The lab's config with two workers and the extra backends in pool "web"."""

    def two(cfg: dict[str, Any]) -> None:
        cfg["gateway"]["workers"] = WORKERS

    return h.lab_config(extra_members=extra[:2], mutate=two, **overrides)


def backends(extra: tuple[str, ...]) -> dict[str, str]:
    """Backend -> the public address its outbound flows leave with, for both workers."""
    return {
        t.POOL_MEMBERS[0]: t.FRONTEND_IP,  # worker 1
        t.POOL_MEMBERS[1]: t.FRONTEND_IP,  # worker 0
        extra[0]: t.FRONTEND_IP,  # 10.10.100.1, worker 1
        extra[1]: t.FRONTEND_IP,  # 10.10.100.2, worker 0
        t.INSTANCE_BACKEND: t.INSTANCE_PUBLIC,  # 10.10.2.1, worker 1
    }


@pytest.fixture(scope="module")
def listeners(
    lab: LabNames, lab_extra: tuple[str, ...], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MemberListeners]:
    """Listeners on every pool member and the instance IP's backend (port 8080)."""
    ml = MemberListeners(lab.be, Path(tmp_path_factory.mktemp("listeners")))
    try:
        ml.start_all([*t.POOL_MEMBERS, *lab_extra[:2], t.INSTANCE_BACKEND], t.MEMBER_PORT)
        yield ml
    finally:
        ml.close()


@pytest.fixture(scope="module")
def gw(
    lab: LabNames, lab_extra: tuple[str, ...], module_gateway: h.GatewayFactory, listeners: MemberListeners
) -> h.GatewayProc:
    """One two-worker gateway (inbound open) for the traffic and operator-view tests."""
    text = config(lab_extra, metrics=f"127.0.0.1:{METRICS_PORT}").replace(
        "[gateway]\n", '[gateway]\ninbound_default = "allow"\n', 1
    )
    return module_gateway(text, ready_timeout=60)


def test_backends_of_both_workers(lab_extra: tuple[str, ...]) -> None:
    """The backends used here belong to both workers (else the tests prove nothing)."""
    assert {owner(b) for b in backends(lab_extra)} == {0, 1}


def test_tcp_udp_and_ping_meet_in_the_owner(
    lab: LabNames, lab_extra: tuple[str, ...], gw: h.GatewayProc, whoami_log: h.WhoamiLog
) -> None:
    """TCP (curl), UDP and ping from backends of both workers reach the far side from the
    public address and their answers come back; each flow sits in its backend's owner and
    nothing is handed between workers."""
    mark = whoami_log.mark()
    with h.Capture(lab.inet, t.INET_IF, FROM_GATEWAY, count=5000) as cap:
        for src, public in backends(lab_extra).items():
            res = h.curl(lab, src, f"http://{t.SERVER}/")
            assert res.returncode == 0, (src, res.stderr.decode())
            assert h.parse_peer(res.stdout.decode())[0] == public, (src, res.stdout)
            out = h.probe(
                lab.be,
                {
                    "sockets": [{"src": src, "connect": [t.SERVER, t.WHOAMI_UDP_PORT]}],
                    "steps": [["send", 0, None, 0, f"hello from {src}"], ["recv", 0, 3]],
                },
            )
            assert "data" in out[2], (src, out)
            assert h.parse_peer(out[2]["data"])[0] == public, (src, out)
            ping = h.ping(lab.be, src, t.SERVER, count=2, interval=0.2)
            assert ping.returncode == 0, (src, ping.stdout.decode())
    sources = {h.Capture.ip_source(ln) for ln in cap.lines}
    assert not any(s and s.startswith("10.") for s in sources), cap.lines[:10]
    assert sources <= {t.FRONTEND_IP, t.INSTANCE_PUBLIC, *t.DEFAULT_SNAT}, sources
    echo = [ln for ln in cap.lines if "ICMP echo request" in ln]
    assert {h.Capture.ip_source(ln) for ln in echo} == {t.FRONTEND_IP, t.INSTANCE_PUBLIC}
    recs = whoami_log.wait_for(lambda r: len(r) >= 2 * len(backends(lab_extra)), mark)
    assert {r["src"] for r in recs} == {t.FRONTEND_IP, t.INSTANCE_PUBLIC}

    flows = gw.ask("flows")
    for src in backends(lab_extra):
        mine = [f for f in flows if f["backend"] == src]
        assert {f["protocol"] for f in mine} == {"tcp", "udp", "icmp"}, (src, mine)
        assert {f["worker"] for f in mine} == {owner(src)}, (src, mine)
    counters = gw.ask("stats")["counters"]
    assert counters["requeued"] == 0, counters
    assert counters["drop_misrouted"] == 0, counters


def test_tcp_transfer_from_both_workers(lab: LabNames, lab_extra: tuple[str, ...], gw: h.GatewayProc) -> None:
    """A 4 MB nc transfer from a backend of each worker arrives whole at the far side."""
    data = os.urandom(4 << 20)
    want = hashlib.sha256(data).hexdigest()
    for port, src in ((7101, t.POOL_MEMBERS[1]), (7102, t.POOL_MEMBERS[0])):
        got = clients.nc_transfer(lab.be, src, lab.inet, t.SERVER, port, data)
        assert got == want, src


def test_status_and_metrics_show_both_workers(
    lab: LabNames, lab_extra: tuple[str, ...], gw: h.GatewayProc
) -> None:
    """status lists both workers (pid, alive, queues), flows and metrics add up over them,
    and gateway_ready says how many workers run."""
    ready = gw.event("gateway_ready")
    assert ready is not None and ready["workers"] == WORKERS
    status = gw.ask("status")
    workers = status["workers"]
    assert [w["index"] for w in workers] == [0, 1]
    assert all(w["alive"] for w in workers)
    assert [w["queues"] for w in workers] == [[0, 1], [2, 3]]
    pids = [w["pid"] for w in workers]
    assert len(set(pids)) == WORKERS and gw.pid not in pids
    assert sorted(pids) == sorted(ready["worker_pids"])
    assert status["flows"] == sum(w["flows"] for w in workers)
    res = h.curl(lab, t.POOL_MEMBERS[1], f"http://{t.SERVER}/")
    assert res.returncode == 0
    samples = gw.metrics(METRICS_PORT)
    assert samples["snatgw_workers"] == WORKERS
    per = [samples[f'snatgw_worker_flows{{worker="{i}"}}'] for i in range(WORKERS)]
    assert f'snatgw_worker_packets_total{{worker="{owner(t.POOL_MEMBERS[1])}"}}' in samples
    assert samples[f'snatgw_worker_packets_total{{worker="{owner(t.POOL_MEMBERS[1])}"}}'] > 0
    live = sum(v for k, v in samples.items() if k.startswith("snatgw_flows{"))
    assert live == sum(per)
    ports = gw.ask("ports")
    assert {p["backend"] for p in ports} >= set(backends(lab_extra)) - {t.INSTANCE_BACKEND}
    text = gw.cli("status")
    assert text.returncode == 0 and b"WORKER" in text.stdout


def test_inbound_and_hairpin_meet_in_the_owner(
    lab: LabNames, lab_extra: tuple[str, ...], gw: h.GatewayProc
) -> None:
    """Connections from the internet to the LB frontend and the instance IP, and hairpins
    between backends of different workers, are answered; every inbound flow sits in the
    worker that owns its backend."""
    url = f"http://{t.FRONTEND_IP}:80/"
    res = clients.curl(lab.inet, t.SERVER, url, max_time=20, extra=[url] * 29)
    assert res.returncode == 0, res.stderr.decode()
    members = {parse_member_answer(x).member for x in res.stdout.decode().splitlines() if x.strip()}
    assert {owner(m) for m in members} == {0, 1}, members
    res = clients.curl(lab.inet, t.SERVER, f"http://{t.INSTANCE_PUBLIC}:{t.MEMBER_PORT}/", max_time=5)
    assert res.returncode == 0, res.stderr.decode()
    assert parse_member_answer(res.stdout.decode()).member == t.INSTANCE_BACKEND
    # Hairpin: a worker-0 member to the instance IP (worker 1's backend), and back the other way.
    res = h.curl(lab, t.POOL_MEMBERS[1], f"http://{t.INSTANCE_PUBLIC}:{t.MEMBER_PORT}/", max_time=5)
    assert res.returncode == 0, res.stderr.decode()
    a = parse_member_answer(res.stdout.decode())
    assert (a.member, a.src) == (t.INSTANCE_BACKEND, t.FRONTEND_IP), a
    res = h.curl(lab, t.INSTANCE_BACKEND, url, max_time=5)
    assert res.returncode == 0, res.stderr.decode()
    assert parse_member_answer(res.stdout.decode()).src == t.INSTANCE_PUBLIC
    inbound = [f for f in gw.ask("flows") if f["direction"] == "in"]
    assert inbound
    assert all(f["worker"] == owner(f["backend"]) for f in inbound), inbound
