"""Flows opened from the outside: LB rules, inbound NAT rules, instance IPs (docs/model.md, "Inbound")."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gateway.core import persist, restore, views
from gateway.core.counters import Counter
from gateway.core.flow import Flow, TcpState
from gateway.core.inbound import build_index, pick_member
from gateway.core.model import (
    PROTO_ICMP,
    PROTO_TCP,
    PROTO_UDP,
    Direction,
    Distribution,
    InboundNatRule,
    LbRule,
    Probe,
    SecurityGroup,
)
from gateway.core.packet import checksums_ok, describe
from gateway.core.table import TranslationTable
from gateway.core.verdict import ACCEPT_MODIFIED, ACCEPT_MODIFIED_MARK, DROP
from tests.unit.conftest import (
    CLIENT,
    FRONTEND,
    INSTANCE,
    INSTANCE_PUBLIC,
    POOL,
    SERVER,
    STANDALONE,
    deliver,
    echo,
    holds,
    inbound_model,
    ip,
    lab_model,
    out,
    rule,
    tcp,
    udp,
)


def inbound_flows(t: TranslationTable) -> list[Flow]:
    return [f for d in t.inside.values() for f in d.values() if f.inbound]


@pytest.fixture
def t() -> TranslationTable:
    return TranslationTable(inbound_model(), 0.0)


def test_lb_rule_delivers_to_a_member_and_the_reply_leaves_from_the_frontend(t: TranslationTable) -> None:
    """A SYN to frontend:80 reaches a member's 8080; its SYN-ACK leaves from frontend:80."""
    dst, dport = deliver(t, tcp(CLIENT, FRONTEND, 50000, 80))
    assert dst in POOL and dport == 8080
    sport, src, dport2 = out(t, tcp(dst, CLIENT, 8080, 50000, "SA", seq=100, ack=1), 0.1)
    assert (src, sport, dport2) == (FRONTEND, 80, 50000)
    (f,) = inbound_flows(t)
    assert f.state == TcpState.ESTABLISHED and f.block is None and f.scenario == 2
    c = t.counters_dict()
    assert c["inbound_flows_created"] == 1 and c["flows_created"] == 1


def test_every_member_answers_some_of_many_connections(t: TranslationTable) -> None:
    """60 connections from different ports spread over all three members (5-tuple hash)."""
    seen = {deliver(t, tcp(CLIENT, FRONTEND, 40000 + i, 80))[0] for i in range(60)}
    assert seen == set(POOL)


def test_source_ip_distribution_keeps_a_client_on_one_member() -> None:
    """``source_ip``: every connection of one client goes to one member; clients spread."""
    m = inbound_model(lb_rules=(LbRule("http", "fe-web", "web", "tcp", 80, 8080, Distribution.SOURCE_IP),))
    t = TranslationTable(m, 0.0)
    assert len({deliver(t, tcp(CLIENT, FRONTEND, 40000 + i, 80))[0] for i in range(20)}) == 1
    clients = {deliver(t, tcp(f"203.0.113.{i}", FRONTEND, 40000, 80))[0] for i in range(1, 40)}
    assert clients == set(POOL)


def test_pick_member_is_a_crc32_of_the_tuple_modulo_the_healthy_members() -> None:
    """The hash covers 5, 2 or 3 fields by distribution and is the same in every run."""
    import zlib

    members = tuple(ip(m) for m in POOL)
    src, dst, ports = bytes([203, 0, 113, 7]), bytes([198, 51, 100, 10]), bytes([0x9C, 0x40, 0, 80])
    assert (
        pick_member(members, Distribution.DEFAULT, 6, src, dst, ports)
        == members[zlib.crc32(src + dst + ports + b"\x06") % 3]
    )
    assert (
        pick_member(members, Distribution.SOURCE_IP, 6, src, dst, ports) == members[zlib.crc32(src + dst) % 3]
    )
    assert (
        pick_member(members, Distribution.SOURCE_IP_PROTOCOL, 17, src, dst, ports)
        == members[zlib.crc32(src + dst + b"\x11") % 3]
    )
    assert pick_member(members[:1], Distribution.DEFAULT, 6, src, dst, ports) == members[0]


def test_only_a_bare_syn_opens_a_tcp_flow(t: TranslationTable) -> None:
    """ACK, SYN-ACK, RST and FIN to a served port without a flow are drop_no_flow and open nothing."""
    for flags in ("A", "SA", "R", "FA", "PA"):
        assert t.out2in(tcp(CLIENT, FRONTEND, 40000, 80, flags), 0.0) == DROP
    assert t.counters_dict()["drop_no_flow"] == 5 and t.flow_count() == 0


def test_nothing_served_is_drop_no_flow(t: TranslationTable) -> None:
    """A SYN to a frontend port no rule serves, or UDP to a TCP rule's port, opens nothing."""
    assert t.out2in(tcp(CLIENT, FRONTEND, 40000, 81), 0.0) == DROP
    assert t.out2in(udp(CLIENT, FRONTEND, 40000, 80), 0.0) == DROP
    assert t.counters_dict()["drop_no_flow"] == 2 and t.flow_count() == 0


def test_udp_rule_and_all_protocol_rule_open_on_any_datagram() -> None:
    """``all`` serves TCP and UDP; a UDP datagram opens its flow and the answer leaves from the frontend."""
    m = inbound_model(lb_rules=(LbRule("dns", "fe-web", "web", "all", 53, 5353),))
    t = TranslationTable(m, 0.0)
    dst, dport = deliver(t, udp(CLIENT, FRONTEND, 40000, 53))
    assert dport == 5353
    sport, src, _ = out(t, udp(dst, CLIENT, 5353, 40000), 0.1)
    assert (src, sport) == (FRONTEND, 53)
    assert deliver(t, tcp(CLIENT, FRONTEND, 40001, 53))[1] == 5353


def test_a_flow_stays_on_its_member_and_later_packets_take_the_flow(t: TranslationTable) -> None:
    """Later packets of one connection reach the same member whatever the hash of the others."""
    dst, _ = deliver(t, tcp(CLIENT, FRONTEND, 40000, 80))
    out(t, tcp(dst, CLIENT, 8080, 40000, "SA", seq=100, ack=1), 0.1)
    for i in range(5):
        assert deliver(t, tcp(CLIENT, FRONTEND, 40000, 80, "A", seq=1, ack=101), 0.2 + i)[0] == dst
    assert len(inbound_flows(t)) == 1


def test_lb_rule_idle_timeout_is_the_flows_own() -> None:
    """An LB rule's idle_timeout bounds its inbound flows, also after the handshake."""
    m = inbound_model(lb_rules=(LbRule("http", "fe-web", "web", "tcp", 80, 8080, idle_timeout=30.0),))
    t = TranslationTable(m, 0.0)
    dst, _ = deliver(t, tcp(CLIENT, FRONTEND, 40000, 80))
    out(t, tcp(dst, CLIENT, 8080, 40000, "SA", seq=100, ack=1), 0.1)
    (f,) = inbound_flows(t)
    assert f.state == TcpState.ESTABLISHED and f.timeout == 30.0 and f.idle == 30.0
    t.handle_timer(20.0)
    assert t.flow_count() == 1
    t.handle_timer(31.0)
    assert t.flow_count() == 0 and t.counters_dict()["flows_ended_idle"] == 1


def test_inbound_tcp_states_fin_both_ways_lingers_and_out_of_window_rst_is_dropped(
    t: TranslationTable,
) -> None:
    """SYN_RECEIVED -> ESTABLISHED on the backend's SYN-ACK; a far-off RST is dropped; FINs close."""
    dst, _ = deliver(t, tcp(CLIENT, FRONTEND, 40000, 80, seq=1000))
    (f,) = inbound_flows(t)
    assert f.state == TcpState.SYN_RECEIVED
    out(t, tcp(dst, CLIENT, 8080, 40000, "SA", seq=5000, ack=1001, window=1000), 0.1)
    assert f.state == TcpState.ESTABLISHED and f.trk_ack == 1001
    assert t.out2in(tcp(CLIENT, FRONTEND, 40000, 80, "R", seq=900_000), 0.2) == DROP
    assert t.counters_dict()["drop_tcp_out_of_window"] == 1 and f.state == TcpState.ESTABLISHED
    deliver(t, tcp(CLIENT, FRONTEND, 40000, 80, "FA", seq=1001, ack=5001), 0.3)
    assert f.state == TcpState.FIN_WAIT
    out(t, tcp(dst, CLIENT, 8080, 40000, "FA", seq=5001, ack=1002), 0.4)
    assert f.state == TcpState.CLOSED


def test_a_retransmitted_syn_keeps_its_member_and_a_backend_rst_resets_the_flow() -> None:
    """A SYN sent again after its member went down still reaches that member (a flow stays on
    its member); the member's RST puts the flow in the RST linger; an out-of-window FIN from
    the outside is dropped once the backend's window is known."""
    m = inbound_model(
        probes=(Probe("p", "tcp", 8080),),
        lb_rules=(LbRule("http", "fe-web", "web", "tcp", 80, 8080, probe="p"),),
    )
    t = TranslationTable(m, 0.0)
    for member in POOL:
        t.probe_result("p", ip(member), True, 0.0)
    dst, _ = deliver(t, tcp(CLIENT, FRONTEND, 40000, 80, seq=10), 0.1)
    for k in range(2):
        t.probe_result("p", ip(dst), False, 0.2 + k)
    assert ip(dst) not in t.inbound_index[(PROTO_TCP, ip(FRONTEND), 80)].healthy
    assert deliver(t, tcp(CLIENT, FRONTEND, 40000, 80, seq=10), 3.0)[0] == dst
    out(t, tcp(dst, CLIENT, 8080, 40000, "SA", seq=500, ack=11, window=100), 3.1)
    (f,) = inbound_flows(t)
    assert t.out2in(tcp(CLIENT, FRONTEND, 40000, 80, "FA", seq=11 + 2**30, ack=501), 3.2) == DROP
    assert f.state == TcpState.ESTABLISHED
    out(t, tcp(dst, CLIENT, 8080, 40000, "RA", seq=501, ack=11), 3.3)
    assert f.state == TcpState.RESET and f.timeout == t.timeouts.tcp_rst_linger


def test_all_members_down_drops_and_counts() -> None:
    """With a probe and no member up yet, a new inbound flow is drop_no_healthy_member."""
    m = inbound_model(
        probes=(Probe("p", "tcp", 8080),),
        lb_rules=(LbRule("http", "fe-web", "web", "tcp", 80, 8080, probe="p"),),
    )
    t = TranslationTable(m, 0.0)
    assert t.out2in(tcp(CLIENT, FRONTEND, 40000, 80), 0.0) == DROP
    assert t.counters_dict()["drop_no_healthy_member"] == 1 and t.flow_count() == 0
    t.probe_result("p", ip(POOL[2]), True, 1.0)
    assert {deliver(t, tcp(CLIENT, FRONTEND, 40000 + i, 80), 2.0)[0] for i in range(10)} == {POOL[2]}


def test_a_udp_flood_to_a_rule_with_every_member_down_is_counted_and_does_no_work() -> None:
    """Datagrams to a UDP rule whose members are all down: each counted, no flow, no rule
    evaluated, no event (the check comes before anything per flow)."""
    m = inbound_model(
        probes=(Probe("p", "tcp", 8080),),
        lb_rules=(LbRule("dns", "fe-web", "web", "udp", 53, 5353, probe="p"),),
        security_groups=(SecurityGroup("g", (), pools=("web",)),),
    )
    t = TranslationTable(m, 0.0)
    t.events.clear()
    for i in range(500):
        assert t.out2in(udp(CLIENT, FRONTEND, 1024 + i, 53), 0.0) == DROP
    assert t.counters_dict()["drop_no_healthy_member"] == 500
    assert t.flow_count() == 0 and sum(t.security.hits) == 0 and not t.events


def test_inbound_nat_rule_forwards_one_port_to_one_backend() -> None:
    """50001 on the frontend reaches 10.10.1.1:22; the reply leaves from frontend:50001."""
    m = inbound_model(inbound_nat_rules=(InboundNatRule("ssh1", "fe-web", "tcp", 50001, ip(POOL[0]), 22),))
    t = TranslationTable(m, 0.0)
    assert deliver(t, tcp(CLIENT, FRONTEND, 40000, 50001)) == (POOL[0], 22)
    sport, src, _ = out(t, tcp(POOL[0], CLIENT, 22, 40000, "SA"), 0.1)
    assert (src, sport) == (FRONTEND, 50001)
    assert t.out2in(udp(CLIENT, FRONTEND, 40000, 50001), 0.2) == DROP


def test_inbound_nat_rule_backend_outside_any_pool_is_placed_standalone() -> None:
    """A NAT rule's backend in no pool counts as a standalone backend; its outbound uses default SNAT."""
    m = inbound_model(inbound_nat_rules=(InboundNatRule("ssh", "fe-web", "tcp", 50002, ip(STANDALONE), 22),))
    t = TranslationTable(m, 0.0)
    assert deliver(t, tcp(CLIENT, FRONTEND, 40000, 50002)) == (STANDALONE, 22)
    be = t.backends[ip(STANDALONE)]
    assert be.scenario == 3 and len(be.flows) == 1 and be.created == 0
    _, src, _ = out(t, udp(STANDALONE, SERVER, 1234, 53), 0.1)
    assert src != FRONTEND


def test_instance_ip_inbound_tcp_udp_and_echo_are_one_to_one(t: TranslationTable) -> None:
    """Unsolicited TCP, UDP and ping to an instance IP reach its backend on the same port and id."""
    assert deliver(t, tcp(CLIENT, INSTANCE_PUBLIC, 40000, 22)) == (INSTANCE, 22)
    assert deliver(t, udp(CLIENT, INSTANCE_PUBLIC, 40000, 5000)) == (INSTANCE, 5000)
    ping = echo(CLIENT, INSTANCE_PUBLIC, 4242)
    assert t.out2in(ping, 0.0) == ACCEPT_MODIFIED_MARK and checksums_ok(ping)
    assert describe(ping).dst == INSTANCE and describe(ping).sport == 4242
    reply = echo(INSTANCE, CLIENT, 4242, reply=True)
    assert t.in2out(reply, 0.1) == ACCEPT_MODIFIED and checksums_ok(reply)
    assert (describe(reply).src, describe(reply).sport) == (INSTANCE_PUBLIC, 4242)
    assert t.counters_dict()["inbound_flows_created"] == 3


def test_echo_to_a_frontend_or_a_reply_without_inbound_flow_is_dropped(t: TranslationTable) -> None:
    """A ping to a PAT address opens nothing; an echo reply from a backend without a ping is unsupported."""
    assert t.out2in(echo(CLIENT, FRONTEND, 1), 0.0) == DROP
    assert t.in2out(echo(POOL[0], CLIENT, 1, reply=True), 0.0) == DROP
    c = t.counters_dict()
    assert c["drop_no_flow"] == 1 and c["drop_unsupported"] == 1


def test_inbound_default_deny_drops_unsolicited_and_counts(t: TranslationTable) -> None:
    """``inbound_default = "deny"``: an uncovered backend gets nothing unsolicited, and it is counted."""
    d = TranslationTable(inbound_model(inbound_default_allow=False), 0.0)
    assert d.out2in(tcp(CLIENT, FRONTEND, 40000, 80), 0.0) == DROP
    assert d.out2in(udp(CLIENT, INSTANCE_PUBLIC, 40000, 53), 0.0) == DROP
    assert d.counters_dict()["drop_security_denied"] == 2 and d.flow_count() == 0
    assert [e.name for e in d.events if e.name == "flow_denied"]


def test_an_opening_rule_passes_inbound_default_deny() -> None:
    """A classic endpoint (``opening``) is open to uncovered backends even with inbound_default deny."""
    m = inbound_model(
        inbound_default_allow=False, lb_rules=(LbRule("web", "fe-web", "web", "tcp", 80, 8080, opening=True),)
    )
    assert deliver(TranslationTable(m, 0.0), tcp(CLIENT, FRONTEND, 40000, 80))[1] == 8080


def test_inbound_flows_take_no_port_from_any_block(t: TranslationTable) -> None:
    """Inbound flows leave every block's inventory as it was."""
    for i in range(10):
        deliver(t, tcp(CLIENT, FRONTEND, 40000 + i, 80))
    for be in t.backends.values():
        if be.block is not None:
            assert all(inv.in_use == 0 for inv in be.block.inventories.values())
    assert not holds(t.backends[ip(POOL[0])].block, 80)


def test_outbound_and_inbound_share_a_backend_without_colliding(t: TranslationTable) -> None:
    """A member's own outbound flow and an inbound flow to it live side by side."""
    sport, src, _ = out(t, tcp(POOL[0], CLIENT, 8080, 40000))
    assert src == FRONTEND and sport != 80
    m = inbound_model(inbound_nat_rules=(InboundNatRule("x", "fe-web", "tcp", 50001, ip(POOL[0]), 8080),))
    t2 = TranslationTable(m, 0.0)
    out(t2, tcp(POOL[0], CLIENT, 8080, 40000))
    assert t2.out2in(tcp(CLIENT, FRONTEND, 40000, 50001), 0.1) == DROP  # the backend's 4-tuple is taken
    assert t2.flow_count() == 1


def test_flow_view_shows_direction_and_admitting_rule(t: TranslationTable) -> None:
    """``snatgw flows`` rows say "in" or "out" and the label of the decision that admitted them."""
    deliver(t, tcp(CLIENT, FRONTEND, 40000, 80))
    out(t, udp(POOL[0], SERVER, 1000, 53))
    rows = views.flows(t, 1.0)
    assert [(r["direction"], r["rule"]) for r in rows] == [("in", "inbound_default"), ("out", "no group")]
    assert rows[0]["public_ip"] == FRONTEND and rows[0]["public_port"] == 80


def test_flow_caps_count_inbound_flows_and_early_drop_the_unanswered() -> None:
    """At the per-backend cap an inbound flow the backend never answered makes room."""
    m = inbound_model(
        max_flows_per_backend=2,
        lb_rules=(LbRule("h", "fe-web", "web", "tcp", 80, 8080),),
        pools=lab_model(members=(POOL[0],)).pools,
    )
    t = TranslationTable(m, 0.0)
    deliver(t, tcp(CLIENT, FRONTEND, 40000, 80))
    out(t, tcp(POOL[0], CLIENT, 8080, 40000, "SA"), 0.1)
    deliver(t, tcp(CLIENT, FRONTEND, 40000, 80, "A", seq=1), 0.15)
    deliver(t, tcp(CLIENT, FRONTEND, 40001, 80), 0.2)
    deliver(t, tcp(CLIENT, FRONTEND, 40002, 80), 0.3)
    assert t.counters_dict()["flows_ended_early_drop"] == 1
    assert {f.remote_port for f in inbound_flows(t)} == {40000, 40002}


def test_an_inbound_syn_flood_the_backend_answers_stays_early_droppable() -> None:
    """Spoofed SYNs the member answers with SYN-ACKs (no handshake ACK ever comes) make room
    for a new client at the per-backend cap; a completed handshake is never early-dropped."""
    m = inbound_model(
        max_flows_per_backend=3,
        lb_rules=(LbRule("h", "fe-web", "web", "tcp", 80, 8080),),
        pools=lab_model(members=(POOL[0],)).pools,
    )
    t = TranslationTable(m, 0.0)
    deliver(t, tcp(CLIENT, FRONTEND, 40000, 80, seq=10))
    out(t, tcp(POOL[0], CLIENT, 8080, 40000, "SA", seq=100, ack=11), 0.1)
    deliver(t, tcp(CLIENT, FRONTEND, 40000, 80, "A", seq=11, ack=101), 0.2)
    for i in range(2):
        spoofed = f"203.0.113.{100 + i}"
        deliver(t, tcp(spoofed, FRONTEND, 1000, 80, seq=10), 0.3)
        out(t, tcp(POOL[0], spoofed, 8080, 1000, "SA", seq=100, ack=11), 0.4)
    for i in range(3):
        deliver(t, tcp(CLIENT, FRONTEND, 41000 + i, 80), 1.0 + i)
    c = t.counters_dict()
    assert c["flows_ended_early_drop"] == 3 and c["drop_flow_limit"] == 0
    assert 40000 in {f.remote_port for f in inbound_flows(t)}


def test_reload_keeps_live_inbound_flows_and_applies_new_rules_to_new_flows(t: TranslationTable) -> None:
    """A group that now denies port 8080 stops new flows; the live one keeps running (Azure's way)."""
    dst, _ = deliver(t, tcp(CLIENT, FRONTEND, 40000, 80))
    deny = SecurityGroup(
        "web-nsg",
        (rule("no-web", 100, Direction.INBOUND, False, PROTO_TCP, dports=((8080, 8080),)),),
        pools=("web",),
    )
    t.reconfigure(inbound_model(security_groups=(deny,)), 1.0)
    assert deliver(t, tcp(CLIENT, FRONTEND, 40000, 80, "A", seq=1), 2.0)[0] == dst
    assert t.out2in(tcp(CLIENT, FRONTEND, 40001, 80), 2.0) == DROP
    assert t.counters_dict()["drop_security_denied"] == 1


def test_removing_a_frontend_ends_its_inbound_flows_also_for_an_instance_ip_member() -> None:
    """An inbound flow through an address the gateway gave up ends, whoever owns it."""
    m = inbound_model(
        pools=lab_model(members=(*POOL, INSTANCE)).pools,
        lb_rules=(LbRule("h", "fe-web", "web", "tcp", 80, 8080, Distribution.SOURCE_IP),),
    )
    t = TranslationTable(m, 0.0)
    for i in range(1, 30):
        deliver(t, tcp(f"203.0.113.{i}", FRONTEND, 40000, 80))
    assert any(f.backend == ip(INSTANCE) for f in inbound_flows(t))
    t.reconfigure(replace(m, frontends=(), lb_rules=(), pools=()), 1.0)
    assert not inbound_flows(t)


def test_a_removed_lb_rule_keeps_live_flows_and_a_removed_member_ends_its_own() -> None:
    """Reload without the LB rule: a live inbound flow runs on both ways, a new SYN to the
    port is dropped, and PAT ports handed out later never take the live flow's key; a
    member taken out of the pool loses its inbound flows."""
    keep = LbRule("https", "fe-web", "web", "tcp", 443, 8443)
    m = inbound_model(
        pools=lab_model(members=(POOL[0], POOL[1])).pools,
        lb_rules=(LbRule("http", "fe-web", "web", "tcp", 80, 8080), keep),
    )
    t = TranslationTable(m, 0.0)
    flows = {}
    for i in range(12):
        dst, _ = deliver(t, tcp(CLIENT, FRONTEND, 40000 + i, 80))
        flows.setdefault(dst, 40000 + i)
    assert set(flows) == {POOL[0], POOL[1]}
    t.reconfigure(replace(m, lb_rules=(keep,)), 1.0)
    assert deliver(t, tcp(CLIENT, FRONTEND, flows[POOL[0]], 80, "A", seq=1), 2.0)[0] == POOL[0]
    _, src, _ = out(t, tcp(POOL[0], CLIENT, 8080, flows[POOL[0]], "A", seq=1, ack=1), 2.1)
    assert src == FRONTEND
    assert t.out2in(tcp(CLIENT, FRONTEND, 45000, 80), 2.2) == DROP
    live = {f.outside_key for f in inbound_flows(t)}
    for i in range(40):
        out(t, tcp(POOL[1], CLIENT, 30000 + i, flows[POOL[0]]), 2.3)
    assert live <= {f.outside_key for d in t.outside.values() for f in d.values() if f.inbound}
    t.reconfigure(replace(m, lb_rules=(keep,), pools=lab_model(members=(POOL[1],)).pools), 3.0)
    assert {f.backend for f in inbound_flows(t)} == {ip(POOL[1])}


def test_unopened_paths_are_reported_once_at_start_and_again_only_when_new() -> None:
    """inbound_not_opened: at start for every closed path; a reload repeats none, adds new ones."""
    m = inbound_model(inbound_default_allow=False)
    t = TranslationTable(m, 0.0)
    first = [e for e in t.events if e.name == "inbound_not_opened"]
    assert first
    t.events.clear()
    t.reconfigure(m, 1.0)
    assert not [e for e in t.events if e.name == "inbound_not_opened"]
    t.reconfigure(
        replace(m, inbound_nat_rules=(InboundNatRule("s", "fe-web", "tcp", 50001, ip(POOL[0]), 22),)), 2.0
    )
    again = [e for e in t.events if e.name == "inbound_not_opened"]
    assert len(again) == 1


def test_build_index_serves_each_protocol_of_a_rule() -> None:
    """The index maps (protocol, frontend, port) to its rule; instance IPs map public to private."""
    m = inbound_model(
        lb_rules=(LbRule("dns", "fe-web", "web", "all", 53, 53),),
        inbound_nat_rules=(InboundNatRule("s", "fe-web", "udp", 50001, ip(POOL[0]), 22),),
    )
    index, inst = build_index(m)
    assert {k[0] for k in index if k[2] == 53} == {PROTO_TCP, PROTO_UDP}
    assert index[(PROTO_UDP, ip(FRONTEND), 50001)].members == (ip(POOL[0]),)
    assert inst == {ip(INSTANCE_PUBLIC): ip(INSTANCE)}
    assert (PROTO_ICMP, ip(FRONTEND), 53) not in index


def test_inbound_flows_survive_a_restart() -> None:
    """Inbound flows are saved and restored under the same keys, still inbound, decision asked again."""
    t = TranslationTable(inbound_model(), 0.0)
    dst, _ = deliver(t, tcp(CLIENT, FRONTEND, 40000, 80))
    deliver(t, udp(CLIENT, INSTANCE_PUBLIC, 40000, 53))
    deliver(t, echo(CLIENT, INSTANCE_PUBLIC, 7))
    doc = persist.dump(t, 1.0, 1000.0)
    t2 = TranslationTable(inbound_model(), 50.0)
    s = restore.restore(t2, doc, 50.0, 1001.0)
    assert s.restored == 3 and not s.dropped_denied
    assert all(f.inbound and f.decision is not None for f in inbound_flows(t2))
    assert deliver(t2, tcp(CLIENT, FRONTEND, 40000, 80, "A", seq=1), 51.0)[0] == dst
    assert t2.in2out(echo(INSTANCE, CLIENT, 7, reply=True), 51.0) == ACCEPT_MODIFIED


def test_restore_fails_closed_on_denied_or_no_longer_served_flows() -> None:
    """A restored flow the current rules deny, or whose rule is gone, is dropped and counted."""
    t = TranslationTable(inbound_model(), 0.0)
    deliver(t, tcp(CLIENT, FRONTEND, 40000, 80))
    deliver(t, udp(CLIENT, INSTANCE_PUBLIC, 40000, 53))
    out(t, udp(POOL[0], SERVER, 1000, 25))
    doc = persist.dump(t, 1.0, 1000.0)
    deny_out = SecurityGroup(
        "g", (rule("no-25", 100, Direction.OUTBOUND, False, PROTO_UDP, dports=((25, 25),)),), pools=("web",)
    )
    m = inbound_model(
        inbound_default_allow=False, security_groups=(deny_out,),
        lb_rules=(LbRule("x", "fe-web", "web", "tcp", 81, 8080),),
    )  # fmt: skip
    t2 = TranslationTable(m, 5.0)
    s = restore.restore(t2, doc, 5.0, 1001.0)
    assert s.restored == 0
    assert s.dropped_config == 1  # the lb flow: port 80 is served no more
    assert s.dropped_denied == 2  # instance ip (inbound_default deny) and the outbound flow to 25
    assert "dropped_denied" in restore.summary_fields(s)


def test_counters_have_a_place_in_stats(t: TranslationTable) -> None:
    """Inbound flows are not SNAT connections in ``snatgw stats``."""
    deliver(t, tcp(CLIENT, FRONTEND, 40000, 80))
    out(t, udp(POOL[0], SERVER, 1000, 53))
    s = views.stats(t)
    assert s["snat_connections"]["attempted"] == 1
    assert s["counters"]["inbound_flows_created"] == 1
    assert Counter.INBOUND_FLOWS_CREATED.name.lower() in s["counters"]


def test_a_closed_inbound_flow_reopened_by_the_remote_learns_the_new_connection(t: TranslationTable) -> None:
    """A new SYN on a lingering closed inbound flow goes back to SYN_RECEIVED with the window forgotten."""
    dst, _ = deliver(t, tcp(CLIENT, FRONTEND, 40000, 80, seq=1000))
    out(t, tcp(dst, CLIENT, 8080, 40000, "SA", seq=5000, ack=1001), 0.1)
    deliver(t, tcp(CLIENT, FRONTEND, 40000, 80, "R", seq=1001), 0.2)
    (f,) = inbound_flows(t)
    assert f.state == TcpState.RESET
    assert deliver(t, tcp(CLIENT, FRONTEND, 40000, 80, seq=70000), 0.5)[0] == dst
    assert f.state == TcpState.SYN_RECEIVED and f.trk_ack == -1
    deliver(t, tcp(CLIENT, FRONTEND, 40000, 80, "R", seq=12345), 0.6)
    assert f.state == TcpState.RESET


def test_ports_of_an_instance_ip_member_count_only_its_own_address() -> None:
    """An LB flow to a member with an instance IP is not one of that instance IP's ports in use."""
    m = inbound_model(
        pools=lab_model(members=(INSTANCE,)).pools,
        lb_rules=(LbRule("h", "fe-web", "web", "tcp", 80, 8080),),
    )
    t = TranslationTable(m, 0.0)
    deliver(t, tcp(CLIENT, FRONTEND, 40000, 80))
    deliver(t, tcp(CLIENT, INSTANCE_PUBLIC, 40000, 22))
    (row,) = views.ports(t, 1.0, 1000.0, ip(INSTANCE))
    assert row["in_use"] == {"tcp": 1} and row["flows"] == 2


def test_an_inbound_ping_flow_carries_requests_in_and_replies_out_only(t: TranslationTable) -> None:
    """On a ping flow opened from the outside, an echo reply from the remote and an echo request
    from the backend with its identifier are dropped: a flow carries requests one way only."""
    assert t.out2in(echo(CLIENT, INSTANCE_PUBLIC, 4242), 0.0) == ACCEPT_MODIFIED_MARK
    assert t.out2in(echo(CLIENT, INSTANCE_PUBLIC, 4242, reply=True), 0.1) == DROP
    assert t.in2out(echo(INSTANCE, CLIENT, 4242), 0.2) == DROP
    c = t.counters_dict()
    assert c["drop_no_flow"] == 1 and c["drop_unsupported"] == 1
    (f,) = inbound_flows(t)
    assert (f.pkts_in, f.pkts_out, f.last_seen) == (1, 0, 0.0)
    # The flow still works its own way.
    assert t.out2in(echo(CLIENT, INSTANCE_PUBLIC, 4242), 0.3) == ACCEPT_MODIFIED_MARK
    assert t.in2out(echo(INSTANCE, CLIENT, 4242, reply=True), 0.4) == ACCEPT_MODIFIED


def test_an_outbound_ping_flow_takes_no_request_from_the_outside(t: TranslationTable) -> None:
    """A backend's own ping flow: the remote's reply passes, a request from the remote with the
    same identifier is dropped (it opens nothing and rides nothing)."""
    req = echo(INSTANCE, CLIENT, 77)
    assert t.in2out(req, 0.0) == ACCEPT_MODIFIED
    ident = describe(req).sport
    assert t.out2in(echo(CLIENT, INSTANCE_PUBLIC, ident), 0.1) == DROP
    assert t.out2in(echo(CLIENT, INSTANCE_PUBLIC, ident, reply=True), 0.2) == ACCEPT_MODIFIED_MARK
    assert t.counters_dict()["drop_no_flow"] == 1 and not inbound_flows(t)
