"""Reload (``snatgw reload`` and SIGHUP) and pool resizes, on the wire
(docs/model.md, "Resizing"; issue 3, item 5).

Each test keeps UDP flows open with whoami's ``PUSHLATER``: the server answers at
once and pushes again a few seconds later, after the reload. A push that reaches
the backend proves its flow survived; one that does not proves it ended. The
pool's extra members are configuration only (10.10.200.x): they never send.
"""

from __future__ import annotations

import pytest

from gateway.lab import layout as t
from gateway.lab.layout import LabNames
from gateway.lab.netns import ns_run
from tests.integration import helpers as h

pytestmark = pytest.mark.integration

METRICS_PORT = 9470
FE = f'public_ip="{t.FRONTEND_IP}"'
B1 = "10.10.1.1"


def sixty_members() -> list[str]:
    """The three lab members and 57 that exist only in the config: 60 backends, tier 2."""
    return [*t.POOL_MEMBERS, *(f"10.10.200.{i}" for i in range(1, 58))]


def sequential_ports(cfg: dict[str, object]) -> None:
    """``random_ports = false``: ports in block order, so the test knows which flows a
    halving reclaims (the default draws them at random, docs/decisions.md "Port choice")."""
    gw = cfg["gateway"]
    assert isinstance(gw, dict)
    gw["random_ports"] = False


def early_peers(probe: h.ProbeProc, count: int) -> list[tuple[str, int]]:
    """Read ``count`` send/recv pairs of a probe and return the peers the server reported."""
    peers = []
    for _ in range(count):
        assert probe.next()["op"] == "send"
        r = probe.next()
        assert "data" in r, f"no answer from the server: {r}"
        peers.append(h.parse_peer(r["data"]))
    return peers


def late(probe: h.ProbeProc) -> dict[str, object]:
    r = probe.next(timeout=15)
    assert r["op"] == "recv", r
    return r


def test_reload_into_a_higher_tier_halves_blocks_and_ends_reclaimed_flows(
    lab: LabNames, gateway: h.GatewayFactory
) -> None:
    """Growing the pool from 3 to 60 members halves 10.10.1.1's block to 1024-1535: the
    flow on port 1625 ends (its late reply is dropped), the one on 1024 lives on, and
    the CLI, the metrics and the log all say so."""
    gw = gateway(h.lab_config(mutate=sequential_ports), args=["--metrics", f"127.0.0.1:{METRICS_PORT}"])
    probe = h.ProbeProc(lab.be, {
        "sockets": [{"src": B1}, {"src": B1}],
        "steps": [["send", 0, t.SERVER, 5000, "PUSHLATER 5"], ["recv", 0, 3],
                  ["many", B1, t.SERVER, 5000, 600, 3, "x"],
                  ["send", 1, t.SERVER, 5000, "PUSHLATER 5"], ["recv", 1, 3],
                  ["recv", 0, 8], ["recv", 1, 8]],
    })
    try:
        probe.next()
        (_, port_a), = early_peers(probe, 1)
        many = probe.next(timeout=15)
        assert sum(r is not None for r in many["replies"]) == 600, "all 600 flows fit a 1024 block"
        (_, port_b), = early_peers(probe, 1)
        assert port_a == 1024 and port_b == 1625, "ports are handed out in block order"
        before = gw.ask("ports", "--backend", B1)[0]
        assert before["allocated"] == 1024 and before["in_use"]["udp"] == 602

        res = gw.reload(h.lab_config(pool_members=sixty_members(), mutate=sequential_ports))
        assert res is not None and res.returncode == 0, res.stderr
        assert "tier changes 1, flows ended 90" in res.stdout.decode(), res.stdout

        kept, reclaimed = late(probe), late(probe)
    finally:
        probe.close()
    assert str(kept.get("data", "")).startswith("late"), f"the flow on a kept port must live: {kept}"
    assert h.parse_peer(str(kept["data"]).split(" ", 1)[1]) == (t.FRONTEND_IP, 1024)
    assert reclaimed.get("timeout") is True, f"a reclaimed flow's reply got through: {reclaimed}"

    after = gw.ask("ports", "--backend", B1)[0]
    assert after["allocated"] == 512 and after["block"] == [[1024, 1535]]
    assert after["in_use"]["udp"] == 512 and after["exhausted"] == 0
    stats = gw.ask("stats")
    assert stats["flows_ended"]["reclaimed"] == 90 and stats["tier_changes"] == 1
    pool = gw.ask("status")["pools"][0]
    assert (pool["members"], pool["block_size"], pool["tier"]) == (60, 512, 2)
    blocks = [b["block"] for b in gw.ask("ports") if b["public_ip"] == t.FRONTEND_IP]
    flat = sorted(r for blk in blocks for r in blk)
    assert len(blocks) == 60 and all(a[1] < b[0] for a, b in zip(flat, flat[1:], strict=False))

    m = gw.metrics(METRICS_PORT)
    assert m[f'snatgw_allocated_snat_ports{{backend="{B1}",{FE}}}'] == 512
    assert m[f'snatgw_used_snat_ports{{backend="{B1}",protocol="udp",{FE}}}'] == 512
    assert m['snatgw_flows_ended_total{reason="reclaimed"}'] == 90
    assert m[f'snatgw_address_tier{{kind="frontend",name="fe-web",{FE}}}'] == 2
    assert m[f'snatgw_address_block_size_ports{{kind="frontend",name="fe-web",{FE}}}'] == 512
    assert m['snatgw_config_reloads_total{result="applied"}'] == 1
    assert m["snatgw_tier_changes_total"] == 1

    tier = gw.events("pool_tier_changed")
    assert [(e["public_ip"], e["old_block_size"], e["new_block_size"], e["backends"], e["tier"])
            for e in tier] == [(t.FRONTEND_IP, 1024, 512, 60, 2)]
    rec = [e for e in gw.events("ports_reclaimed") if e["reason"] == "tier_change"]
    assert len(rec) == 1 and rec[0]["flows_ended"] == 90 and rec[0]["ports"] == 3 * 512
    done = gw.events("config_reloaded")
    assert len(done) == 1 and done[0]["source"] == "control" and done[0]["backends_added"] == 57
    assert gw.stop() == 0
    assert gw.counters()["drop_no_flow"] >= 1


def test_sighup_into_a_lower_tier_grows_blocks_and_ends_nothing(
    lab: LabNames, gateway: h.GatewayFactory
) -> None:
    """Shrinking the pool from 60 to 3 members (SIGHUP) doubles 10.10.1.1's block: its
    open flow keeps its public port and gets its late reply, and 600 new flows all fit."""
    gw = gateway(h.lab_config(pool_members=sixty_members()))
    assert gw.ask("ports", "--backend", B1)[0]["allocated"] == 512
    probe = h.ProbeProc(lab.be, {
        "sockets": [{"src": B1}],
        "steps": [["send", 0, t.SERVER, 5000, "PUSHLATER 4"], ["recv", 0, 3], ["recv", 0, 8],
                  ["many", B1, t.SERVER, 5000, 600, 3, "x"]],
    })
    try:
        probe.next()
        (peer,) = early_peers(probe, 1)
        gw.reload(h.lab_config(), sighup=True)
        assert gw.wait_event("config_reloaded", 5) is not None, gw.log_text()[-2000:]
        pushed = late(probe)
        many = probe.next(timeout=15)
    finally:
        probe.close()
    assert str(pushed.get("data", "")).startswith("late"), f"the open flow must survive: {pushed}"
    assert h.parse_peer(str(pushed["data"]).split(" ", 1)[1]) == peer
    answered = [r for r in many["replies"] if r]
    assert len(answered) == 600, "the grown block holds 600 more flows to one destination"
    assert len({h.parse_peer(r) for r in answered} | {peer}) == 601

    row = gw.ask("ports", "--backend", B1)[0]
    assert row["allocated"] == 1024 and row["exhausted"] == 0
    first = row["block"][0]
    assert first[0] == 1024 and first[1] >= 1535, f"the old 1024-1535 must stay in the block: {row['block']}"
    stats = gw.ask("stats")
    assert stats["flows_ended"]["reclaimed"] == 0 and stats["flows_ended"]["removed"] == 0
    event = gw.events("pool_tier_changed")
    assert [(e["old_block_size"], e["new_block_size"]) for e in event] == [(512, 1024)]
    assert not [e for e in gw.events("ports_reclaimed") if e["reason"] == "tier_change"]
    assert gw.events("config_reloaded")[0]["source"] == "sighup"


def test_removing_a_backend_or_a_public_address_ends_their_flows(
    lab: LabNames, gateway: h.GatewayFactory
) -> None:
    """A reload without pool member 10.10.1.2 and without default address .30 ends the
    flows that used them (no late reply), leaves 10.10.1.1's flow alone, removes .30 from
    the interface and the rules, and both backends leave through .31 afterwards."""
    gw = gateway(h.lab_config())
    standalone = t.STANDALONE[0]
    probe = h.ProbeProc(lab.be, {
        "sockets": [{"src": "10.10.1.2"}, {"src": standalone}, {"src": B1}],
        "steps": [*[s for i in range(3) for s in (["send", i, t.SERVER, 5000, "PUSHLATER 4"],
                                                   ["recv", i, 3])],
                  ["recv", 0, 6], ["recv", 1, 6], ["recv", 2, 6],
                  ["send", 0, t.SERVER, 5000, "again"], ["recv", 0, 3],
                  ["send", 1, t.SERVER, 5000, "again"], ["recv", 1, 3]],
    })
    try:
        probe.next()
        peers = early_peers(probe, 3)
        assert [ip for ip, _ in peers] == [t.FRONTEND_IP, t.DEFAULT_SNAT[0], t.FRONTEND_IP]
        res = gw.reload(h.lab_config(pool_members=[B1, "10.10.1.3"],
                                     default_snat_ips=[t.DEFAULT_SNAT[1]]))
        assert res is not None and res.returncode == 0, res.stderr
        ended_member, ended_standalone, kept = late(probe), late(probe), late(probe)
        again = early_peers(probe, 2)
    finally:
        probe.close()
    assert ended_member.get("timeout") is True, ended_member
    assert ended_standalone.get("timeout") is True, ended_standalone
    assert str(kept.get("data", "")).startswith("late"), kept
    assert [ip for ip, _ in again] == [t.DEFAULT_SNAT[1], t.DEFAULT_SNAT[1]]

    assert t.DEFAULT_SNAT[0] not in h.out_addresses(lab)
    assert t.DEFAULT_SNAT[0] not in h.iptables_save(lab)
    reasons = {e["reason"]: e for e in gw.events("ports_reclaimed")}
    assert reasons["backend_removed"]["public_ip"] == t.FRONTEND_IP
    assert reasons["backend_removed"]["flows_ended"] == 1
    assert reasons["address_removed"]["public_ip"] == t.DEFAULT_SNAT[0]
    assert reasons["address_removed"]["flows_ended"] == 1
    done = gw.events("config_reloaded")[0]
    assert (done["backends_removed"], done["addresses_removed"]) == (2, 1)  # 10.10.1.2 and .30's one
    assert done["public_ips_removed"] == [t.DEFAULT_SNAT[0]]
    rows = {r["backend"]: r for r in gw.ask("ports")}
    assert rows["10.10.1.2"]["scenario"] == "default" and rows["10.10.1.2"]["public_ip"] == t.DEFAULT_SNAT[1]
    assert gw.ask("stats")["flows_ended"]["removed"] == 2
    assert gw.stop() == 0
    assert h.out_addresses(lab).isdisjoint({t.FRONTEND_IP, *t.DEFAULT_SNAT}), "stop removes what is left"


def test_a_rejected_reload_keeps_the_old_config_and_its_flows(
    lab: LabNames, gateway: h.GatewayFactory
) -> None:
    """An invalid config and a change that needs a restart are refused with
    config_rejected naming the key; the flow opened before gets its late reply, and a
    valid reload of the same config afterwards ends nothing."""
    good = h.lab_config()
    gw = gateway(good)
    probe = h.ProbeProc(lab.be, {
        "sockets": [{"src": B1}],
        "steps": [["send", 0, t.SERVER, 5000, "PUSHLATER 4"], ["recv", 0, 3], ["recv", 0, 8]],
    })
    try:
        probe.next()
        (peer,) = early_peers(probe, 1)
        bad = gw.reload(h.lab_config(idle_timeout=-1))
        restart = gw.reload(h.lab_config(queue=7))
        gw.reload(good, sighup=True)
        pushed = late(probe)
    finally:
        probe.close()
    assert bad is not None and bad.returncode == 2
    assert "rejected" in bad.stdout.decode() and "gateway.idle_timeout" in bad.stdout.decode()
    assert restart is not None and restart.returncode == 2
    assert "gateway.queue" in restart.stdout.decode() and "restart" in restart.stdout.decode()
    rejected = gw.events("config_rejected")
    assert [e["key"] for e in rejected] == ["gateway.idle_timeout", "gateway.queue"]
    assert all(e["config"] == str(gw.config_path) and e["problem"] for e in rejected)
    assert str(pushed.get("data", "")).startswith("late"), f"the flow must survive: {pushed}"
    assert h.parse_peer(str(pushed["data"]).split(" ", 1)[1]) == peer
    assert h.wait_until(lambda: bool(gw.events("config_reloaded")), 5, what="config_reloaded is logged")
    done = gw.events("config_reloaded")[0]
    assert done["flows_ended"] == 0 and done["tier_changes"] == 0 and done["source"] == "sighup"
    status = gw.ask("status")
    assert status["reloads"] == {"applied": 1, "rejected": 2} and status["queue"] == 0


def test_reload_puts_back_rule_jumps_a_firewall_flush_removed(
    lab: LabNames, gateway: h.GatewayFactory
) -> None:
    """After something deleted the jumps into our chains (a firewall reload), a reload
    restores them, says how many, and traffic is translated again."""
    gw = gateway(h.lab_config())
    for table, chain, ours in (("mangle", "POSTROUTING", "SNATGW-POST"), ("filter", "FORWARD", "SNATGW-FWD")):
        ns_run(lab.gw, ["iptables", "-w", "-t", table, "-D", chain, "-j", ours], timeout=10)
    assert "-A POSTROUTING -j SNATGW-POST" not in h.iptables_save(lab)
    res = gw.reload(h.lab_config())
    assert res is not None and res.returncode == 0, res.stderr
    assert gw.events("config_reloaded")[0]["rule_jumps_restored"] == 2
    saved = h.iptables_save(lab)
    assert "-A POSTROUTING -j SNATGW-POST" in saved and "-A FORWARD -j SNATGW-FWD" in saved
    got = h.curl(lab, B1, f"http://{t.SERVER}/")
    assert got.returncode == 0 and h.parse_peer(got.stdout.decode())[0] == t.FRONTEND_IP


def test_a_silent_standalone_backend_gives_its_block_back(
    lab: LabNames, gateway: h.GatewayFactory
) -> None:
    """With idle_timeout 2 s, a standalone backend's one UDP flow idles out and its block
    goes back: `snatgw ports` stops listing it and ports_reclaimed says backend_idle."""
    gw = gateway(h.lab_config(idle_timeout=2))
    standalone = t.STANDALONE[0]
    out = h.probe(lab.be, {"sockets": [{"src": standalone}],
                           "steps": [["send", 0, t.SERVER, 5000, "x"], ["recv", 0, 3]]})
    assert h.parse_peer(str(out[-1]["data"]))[0] == t.DEFAULT_SNAT[0]
    assert [r["backend"] for r in gw.ask("ports") if r["scenario"] == "default"] == [standalone]
    assert h.wait_until(lambda: not [r for r in gw.ask("ports") if r["scenario"] == "default"], 10,
                        what="no default-scenario backend is listed in `snatgw ports`")
    event = gw.wait_event("ports_reclaimed", 3)
    assert event is not None and event["reason"] == "backend_idle" and event["backends"] == 1
    assert event["public_ip"] == t.DEFAULT_SNAT[0] and event["ports"] == 1024
