"""Flow caps on the wire (issue 9, item 4; docs/decisions.md, "Flow caps"): a flood from
one backend hits its cap while another backend still connects, and at the global cap
the flooding backend gives up its unreplied flows, not the newcomer."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.lab import layout as t
from gateway.lab.layout import LabNames
from tests.integration import helpers as h

pytestmark = pytest.mark.integration

B1, B2 = t.POOL_MEMBERS[0], t.POOL_MEMBERS[1]


def caps(**keys: int) -> Any:
    def mutate(cfg: dict[str, Any]) -> None:
        cfg["gateway"].update(keys)
    return mutate


def many(lab: LabNames, src: str, count: int, text: str, dport: int = t.WHOAMI_UDP_PORT,
         timeout: float = 2) -> list[str | None]:
    out = h.probe(lab.be, {"steps": [["many", src, t.SERVER, dport, count, timeout, text]]}, timeout=30)
    (res,) = [r for r in out if r.get("op") == "many"]
    return list(res["replies"])


def test_a_flood_from_one_backend_hits_its_cap_while_another_still_connects(
    lab: LabNames, gateway: h.GatewayFactory, whoami_log: h.WhoamiLog
) -> None:
    """max_flows_per_backend = 40: 40 answered flows fill 10.10.1.1's share; 60 more are
    refused (none reaches whoami, drop_flow_limit 60, one flow_limit_reached event, the
    ports view and the metrics count them) while 10.10.1.2 still gets through."""
    gw = gateway(h.lab_config(mutate=caps(max_flows_per_backend=40), metrics="127.0.0.1:9479"))
    mark = whoami_log.mark()
    first = many(lab, B1, 40, "fill")
    assert None not in first, "40 flows fit the cap"
    flood = many(lab, B1, 60, "flood", timeout=1)
    assert flood == [None] * 60, "every flow over the cap is refused"
    other = h.curl(lab, B2, f"http://{t.SERVER}/")
    assert other.returncode == 0, other.stderr
    peer = h.parse_peer(other.stdout.decode())
    recs = whoami_log.wait_for(lambda rs: any(r["proto"] == "tcp" for r in rs), since=mark)
    b1_block = {tuple(r) for r in gw.ask("ports", "--backend", B1)[0]["block"]}
    (lo, hi), = b1_block
    from_b1 = [r for r in recs if r["proto"] == "udp" and lo <= r["sport"] <= hi]
    assert len(from_b1) == 40, f"whoami got {len(from_b1)} datagrams from 10.10.1.1's block"
    assert [(r["src"], r["sport"]) for r in recs if r["proto"] == "tcp"] == [peer]

    row = gw.ask("ports", "--backend", B1)[0]
    assert (row["flows"], row["flow_limit_drops"]) == (40, 60), row
    stats = gw.ask("stats")
    assert stats["drops"]["flow_limit"] == 60 and stats["flow_limits"]["max_flows_per_backend"] == 40
    m = gw.metrics(9479)
    assert m[f'snatgw_flow_limit_drops_total{{backend="{B1}",public_ip="{t.FRONTEND_IP}"}}'] == 60
    assert m['snatgw_max_flows{scope="per_backend"}'] == 40
    events = gw.events("flow_limit_reached")
    assert [(e["backend"], e["limit"], e["max_flows"]) for e in events] == [(B1, "backend", 40)], events
    assert gw.stop() == 0


def test_at_the_global_cap_the_flooding_backend_gives_way(
    lab: LabNames, gateway: h.GatewayFactory, whoami_log: h.WhoamiLog
) -> None:
    """max_flows = 60: 10.10.1.1 fills the whole table with 100 flows nobody answers (its
    own new flows replace its own oldest); 10.10.1.2's HTTP request still gets through,
    taking the room from 10.10.1.1 (early drop), never refused."""
    gw = gateway(h.lab_config(mutate=caps(max_flows=60)))
    flood = many(lab, B1, 100, "flood", dport=5999, timeout=0.5)
    assert flood == [None] * 100
    before = gw.ask("stats")
    assert before["flows_total"] == 60, "the flood filled the table (the control)"
    mark = whoami_log.mark()
    for _ in range(3):
        res = h.curl(lab, B2, f"http://{t.SERVER}/")
        assert res.returncode == 0, res.stderr
    recs = whoami_log.wait_for(lambda rs: len(rs) >= 3, since=mark)
    assert len({(r["src"], r["sport"]) for r in recs if r["proto"] == "tcp"}) == 3, recs
    stats = gw.ask("stats")
    assert stats["drops"]["flow_limit"] == 0
    assert stats["flows_ended"]["early_drop"] >= 40 + 3
    rows = {r["backend"]: r for r in gw.ask("ports")}
    assert rows[B2]["flow_limit_drops"] == 0 and rows[B1]["flows"] <= 60 - 1
