"""How SNAT ports are consumed and released: endpoint-dependent reuse, idle expiry."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from gateway.lab import layout as t
from gateway.lab.layout import LabNames
from tests.integration import helpers as h

pytestmark = pytest.mark.integration

MEMBER2_BLOCK = (2048, 1024)  # 10.10.1.2, second of three pool members


def test_a_new_flow_to_the_same_destination_needs_its_own_port(
    lab: LabNames, gateway: h.GatewayFactory, whoami_log: h.WhoamiLog
) -> None:
    """Two local ports to one destination get two public ports from the member's block."""
    gateway(h.lab_config())
    mark = whoami_log.mark()
    out = h.probe(lab.be, {
        "sockets": [{"src": "10.10.1.2"}, {"src": "10.10.1.2"}],
        "steps": [["send", 0, t.SERVER, 5000, "a"], ["recv", 0, 2],
                  ["send", 1, t.SERVER, 5000, "b"], ["recv", 1, 2],
                  ["send", 0, t.SERVER2, 5000, "c"], ["recv", 0, 2]],
    })
    answers = [r for r in out if r["op"] == "recv"]
    assert all("data" in r for r in answers), answers
    (ip_a, port_a), (ip_b, port_b), (ip_c, port_c) = (h.parse_peer(r["data"]) for r in answers)
    assert ip_a == ip_b == ip_c == t.FRONTEND_IP
    assert answers[2]["from"] == [t.SERVER2, 5000]
    assert port_a != port_b, "a second flow to the same destination needs its own port"
    assert all(h.in_block(p, *MEMBER2_BLOCK) for p in (port_a, port_b, port_c))
    recs = whoami_log.wait_for(lambda r: len(r) >= 3, mark)
    assert [(r["dst"], r["sport"]) for r in recs] == [
        (t.SERVER, port_a), (t.SERVER, port_b), (t.SERVER2, port_c)
    ]


def test_idle_timeout_keepalive_and_expiry(
    lab: LabNames, gateway: h.GatewayFactory, whoami_log: h.WhoamiLog
) -> None:
    """idle_timeout=3: 1 s keepalives hold the mapping; after 5 s idle a late reply is dropped."""
    gw = gateway(h.lab_config(idle_timeout=3))
    keepalive = {
        "sockets": [{"src": t.STANDALONE[0], "connect": [t.SERVER, 5000]}],
        "steps": [step for i in range(6)
                  for step in (["send", 0, None, 0, f"ka {i}"], ["recv", 0, 2], ["sleep", 1])],
    }
    expiry = {
        "sockets": [{"src": t.STANDALONE[1], "connect": [t.SERVER, 5000]}],
        # early reply at once; the push 5 s later must not arrive; then the flow reopens
        "steps": [["send", 0, None, 0, "PUSHLATER 5"], ["recv", 0, 2], ["recv", 0, 7],
                  ["send", 0, None, 0, "again"], ["recv", 0, 2]],
    }
    mark = whoami_log.mark()
    with ThreadPoolExecutor(2) as pool:
        fut_ka = pool.submit(h.probe, lab.be, keepalive, timeout=30)
        fut_ex = pool.submit(h.probe, lab.be, expiry, timeout=30)
        ka, ex = fut_ka.result(timeout=40), fut_ex.result(timeout=40)

    ka_answers = [r.get("data") for r in ka if r["op"] == "recv"]
    assert None not in ka_answers and len(ka_answers) == 6, ka
    assert len({h.parse_peer(a) for a in ka_answers if a}) == 1, "keepalives keep one mapping"

    early, late, reopened = (r for r in ex if r["op"] == "recv")
    assert "data" in early and h.parse_peer(early["data"])[0] in t.DEFAULT_SNAT, early
    assert late.get("timeout") is True, f"a reply after the idle timeout got through: {late}"
    assert "data" in reopened, "a new packet opens a new flow"

    ka_peer = h.parse_peer(ka_answers[0] or "")
    recs = whoami_log.wait_for(lambda r: len(r) >= 8, mark)
    assert sum((r["src"], r["sport"]) == ka_peer for r in recs) == 6, "server saw one mapping"
    assert gw.stop() == 0
    assert gw.counters()["drop_no_flow"] >= 1
