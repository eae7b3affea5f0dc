"""Preallocation by pool size, exhaustion, and ports coming back when TCP flows close.

The lab has 997 extra backends so that pools of 60, 201 and 1000 members can be built
from the 3 lab members plus the first extras (10.10.1.1 always stays the first member).
"""

from __future__ import annotations

import time

import pytest

from gateway.lab import layout as t
from gateway.lab.layout import LabNames
from tests.integration import helpers as h

pytestmark = pytest.mark.integration

LAB_EXTRA_BACKENDS = 997


def pool_of(size: int, extra: tuple[str, ...]) -> list[str]:
    assert 3 <= size <= 3 + len(extra)
    return [*t.POOL_MEMBERS, *extra[: size - 3]]


@pytest.mark.parametrize(("members", "block"), [(60, 512), (201, 128)])
def test_block_size_follows_the_tier_and_exhaustion_is_visible(
    lab: LabNames,
    lab_extra: tuple[str, ...],
    gateway: h.GatewayFactory,
    whoami_log: h.WhoamiLog,
    members: int,
    block: int,
) -> None:
    """A member of an N-member pool gets exactly its tier's block; the rest fail, visibly."""
    gw = gateway(h.lab_config(pool_members=pool_of(members, lab_extra)))
    mark = whoami_log.mark()
    out = h.probe(lab.be, {"steps": [["many", "10.10.1.1", t.SERVER, 5000, block + 8, 2, "x"]]},
                  timeout=30)
    answered = [r for r in out[-1]["replies"] if r]
    peers = {h.parse_peer(r) for r in answered}
    assert {ip for ip, _ in peers} == {t.FRONTEND_IP}
    ports = sorted(p for _, p in peers)
    assert len(ports) == block, f"{len(ports)} flows got through, block is {block}"
    assert ports[0] >= 1024 and ports[-1] - ports[0] == block - 1, "one contiguous block"

    recs = whoami_log.wait_for(lambda r: len(r) >= block, mark)
    seen = {r["sport"] for r in recs if r["src"] == t.FRONTEND_IP}
    assert seen == set(ports), "the server saw exactly the block's ports"

    event = gw.wait_event("snat_port_exhausted", 3)
    assert event is not None, "exhaustion must be logged"
    assert event["backend"] == "10.10.1.1" and event["public_ip"] == t.FRONTEND_IP
    assert event["block_size"] == block
    assert t.SERVER in str(event["destination"])
    assert gw.stop() == 0
    assert gw.counters()["drop_exhausted"] > 0


def test_closed_tcp_flows_give_their_ports_back(
    lab: LabNames, lab_extra: tuple[str, ...], gateway: h.GatewayFactory
) -> None:
    """1000 members -> 32-port blocks; 40 short TCP flows fit because FIN/RST free ports."""
    gw = gateway(h.lab_config(pool_members=pool_of(1000, lab_extra), tcp_fin_linger=1,
                              tcp_rst_linger=1))
    ports = []
    for i in range(40):
        if i == 30:
            # Waiting out the 1 s FIN linger is what this test is about: the first 30
            # flows' ports come back only once it has passed.
            time.sleep(1.2)
        res = h.curl(lab, "10.10.1.1", f"http://{t.SERVER}/", max_time=3)
        assert res.returncode == 0, f"curl {i}: {res.stderr.decode()}"
        ip, port = h.parse_peer(res.stdout.decode())
        assert ip == t.FRONTEND_IP
        ports.append(port)
    assert len(set(ports)) <= 32 and max(ports) - min(ports) < 32, sorted(set(ports))

    time.sleep(1.2)  # the same: the 40 flows above linger 1 s before their ports are free
    steps: list[list[object]] = [["tcp", "10.10.1.1", t.SERVER, 81, 2] for _ in range(30)]
    steps += [["sleep", 1.2]] + [["tcp", "10.10.1.1", t.SERVER, 81, 2] for _ in range(10)]
    out = h.probe(lab.be, {"steps": steps}, timeout=60)
    results = [r["result"] for r in out if r["op"] == "tcp"]
    assert results == ["ConnectionRefusedError"] * 40, results
    assert gw.stop() == 0
    assert gw.counters().get("drop_exhausted", 0) == 0


def test_a_full_block_still_reaches_other_destinations(
    lab: LabNames, lab_extra: tuple[str, ...], gateway: h.GatewayFactory
) -> None:
    """32-port block (1000 members) full toward one server: 32 more flows elsewhere share it."""
    gw = gateway(h.lab_config(pool_members=pool_of(1000, lab_extra)))
    out = h.probe(lab.be, {"steps": [
        ["many", "10.10.1.1", t.SERVER, 5000, 32, 3, "first"],
        ["many", "10.10.1.1", t.SERVER2, 5000, 33, 2, "second"],
    ]}, timeout=30)
    first, second = out[1]["replies"], out[2]["replies"]
    assert None not in first, "the block holds 32 flows to one destination"
    first_ports = {h.parse_peer(r)[1] for r in first}
    assert len(first_ports) == 32 and max(first_ports) - min(first_ports) == 31
    answered = [r for r in second if r]
    assert len(answered) == 32, "ports in use toward SERVER are shared toward SERVER2"
    assert {h.parse_peer(r)[1] for r in answered} == first_ports
    event = gw.wait_event("snat_port_exhausted", 3)
    assert event is not None and event["block_size"] == 32
    assert t.SERVER2 in str(event["destination"])
    assert gw.stop() == 0
    assert gw.counters()["drop_exhausted"] >= 1
