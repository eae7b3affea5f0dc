"""The pure parts of ``make bench`` (scripts/bench.py): configs, /proc parsers, statistics
and the report, without a lab."""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from scapy.layers.inet import IP, UDP

from gateway.config import parse

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


bench = _load("bench")
helper = _load("bench_helper")
workers = _load("bench_workers")
profiler = _load("profile_worker")


def ip(s: str) -> int:
    return int(ipaddress.IPv4Address(s))


# --------------------------------------------------------------------------- configs


def test_default_config_leaves_gateway_settings_at_their_defaults() -> None:
    """The default row's config sets no timeout, linger, cap or queue length: users' defaults."""
    text = bench.gateway_config()
    for key in ("tcp_fin_linger", "idle_timeout", "max_flows", "queue_maxlen", "security_groups"):
        assert key not in text
    cfg = parse(text, "bench.toml")
    assert cfg.model.timeouts.tcp_fin_linger == bench.DEFAULT_LINGER
    assert [i.private for i in cfg.model.instance_ips] == [ip(bench.INSTANCE_BACKEND)]


def test_tuned_and_memory_configs_set_only_what_they_name() -> None:
    """The tuned row sets tcp_fin_linger; the memory phase raises both flow caps."""
    assert parse(bench.gateway_config(fin_linger=0.25), "b.toml").model.timeouts.tcp_fin_linger == 0.25
    m = parse(bench.gateway_config(max_flows=2_000_000, queue_maxlen=8000), "b.toml")
    assert m.model.max_flows == m.model.max_flows_per_backend == 2_000_000
    assert m.queue_maxlen == 8000


def test_rules_config_attaches_100_rules_and_the_allow_rule_to_both_backends() -> None:
    """The rules row's group has 100 deny rules plus one allow, on the pool and the instance backend."""
    model = parse(bench.gateway_config(rules=100), "bench.toml").model
    (group,) = model.security_groups
    assert len(group.rules) == 101
    assert group.pools == ("bench",)
    assert group.backends == (ip(bench.INSTANCE_BACKEND),)
    assert [r.allow for r in group.rules].count(True) == 1
    assert len({r.priority for r in group.rules}) == 101


def test_bench_traffic_passes_all_100_rules_to_the_allow_rule() -> None:
    """No deny rule matches a bench flow: each is decided by the group's allow-internet rule."""
    from gateway.core.security import SecurityPolicy

    model = bench._model(100)
    policy = SecurityPolicy(model)
    server = ip(bench.SERVER)
    for backend in (bench.POOL_MEMBERS[0], bench.INSTANCE_BACKEND):
        b = ip(backend)
        for proto, port in ((17, 5201), (6, 5201), (6, 8000), (17, 7000), (17, 30000)):
            d = policy.outbound(b, proto, b, 40000, server, port)
            assert d.allowed
            assert d.rules and d.rules[0].name == "allow-internet"


# --------------------------------------------------------------------------- /proc parsers


def test_cpu_ticks_survive_a_process_name_with_spaces_and_parentheses() -> None:
    """utime+stime are fields 14 and 15 counted after the last ')' of the name."""
    rest = " ".join(str(x) for x in range(3, 53))  # field n holds the value n
    stat = f"4242 (snat gw) (x)) S {rest[2:]}"
    assert bench.parse_cpu_ticks(stat) == 14 + 15


def test_vmrss_meminfo_and_cpu_model_are_read_by_name() -> None:
    """VmRSS/MemAvailable in KiB and the first CPU model name, None/unknown when absent."""
    status = "Name:\tsnatgw\nVmPeak:\t  9000 kB\nVmRSS:\t  1234 kB\n"
    assert bench.parse_kb(status, "VmRSS") == 1234
    assert bench.parse_kb(status, "VmSwap") is None
    assert bench.parse_cpuinfo("processor\t: 0\nmodel name\t: AMD EPYC 7B13\n") == "AMD EPYC 7B13"
    assert bench.parse_cpuinfo("processor\t: 0\n") == "unknown"


def test_nfqueue_counters_are_summed_over_queues() -> None:
    """Waiting, queue-full, socket-full drops and the id sequence, summed over every queue line."""
    text = ("    0  1234     5 2 65531     7     1   100  1\n"
            "    1  1235     0 2 65531     3     0    50  1\n")
    assert bench.parse_nfqueue(text) == {"waiting": 5, "queue_dropped": 10, "user_dropped": 1,
                                         "queued_total": 150}
    assert bench.parse_nfqueue("")["queued_total"] == 0


def test_conntrack_object_size_comes_from_slabinfo() -> None:
    """The kernel reference for bytes per flow is nf_conntrack's slab object size."""
    text = ("slabinfo - version: 2.1\n"
            "nf_conntrack_expect      0      0    208   39    2 : tunables 0 0 0\n"
            "nf_conntrack         204    204    320   51    4 : tunables 0 0 0\n")
    assert bench.parse_slab_objsize(text, "nf_conntrack") == 320
    assert bench.parse_slab_objsize(text, "missing") is None


# --------------------------------------------------------------------------- statistics


def test_packets_handled_counts_packet_counters_not_flow_counters() -> None:
    """Translated, ICMP error, hairpin and drop counters are packets; flows_* are not."""
    before = {"in2out_translated": 10, "out2in_translated": 5, "drop_exhausted": 1,
              "flows_created": 3, "icmp_error_out2in": 0, "inbound_flows_created": 0}
    after = {"in2out_translated": 110, "out2in_translated": 25, "drop_exhausted": 4,
             "flows_created": 90, "icmp_error_out2in": 2, "inbound_flows_created": 7}
    assert bench.packets_handled(before, after) == 100 + 20 + 3 + 2


def test_cpu_per_unit_is_none_without_units() -> None:
    """No packet handled gives no figure rather than a division by zero."""
    assert bench.per_unit_us(0.5, 100_000) == pytest.approx(5.0)
    assert bench.per_unit_us(0.5, 0) is None


def test_best_of_rounds_skips_failed_rounds_and_picks_by_direction() -> None:
    """Throughput takes the highest round, latency and CPU the lowest; failed rounds are None."""
    assert bench.best([3.0, None, 5.0], higher=True) == 5.0
    assert bench.best([3.0, None, 5.0], higher=False) == 3.0
    assert bench.best([None, None], higher=True) is None


def test_round_ratios_pair_each_round_with_its_own_baseline() -> None:
    """A ratio is taken within a round only, where both sides were measured."""
    assert bench.round_ratios([50.0, 60.0, None], [100.0, None, 80.0]) == [0.5]
    assert bench.round_ratios([1.0, 3.0], [2.0, 4.0]) == [0.5, 0.75]


@pytest.mark.parametrize(
    ("goal", "base", "value", "met"),
    [
        (bench.Goal("ratio_ge", 0.6), 100.0, 61.0, True),
        (bench.Goal("ratio_ge", 0.6), 100.0, 59.0, False),
        (bench.Goal("ratio_le", 2.0), 80.0, 150.0, True),
        (bench.Goal("ratio_le", 2.0), 80.0, 170.0, False),
        (bench.Goal("added_le", 50), 78.0, 121.0, True),
        (bench.Goal("added_le", 50), 78.0, 140.0, False),
        (bench.Goal("value_le", 3.0), None, 2.5, True),
        (bench.Goal("value_le", 3.0), None, 6.0, False),
        (bench.Goal("ratio_ge", 0.6), None, 6.0, None),
        (bench.Goal("value_le", 3.0), None, None, None),
    ],
)
def test_goals_are_judged_on_the_figures_they_name(goal: Any, base: float | None,
                                                   value: float | None, met: bool | None) -> None:
    """Ratio, added-latency and absolute goals; a missing figure is not judged."""
    assert goal.met(base, value) is met


def test_row_takes_best_of_each_side_and_the_spread_of_round_ratios() -> None:
    """ratio = best/best; ratio_min/max are the per-round ratios; the goal is judged on the bests."""
    r = bench.row(bench.METRICS["udp_pps"], [100.0, 120.0, 90.0], [60.0, 66.0, None])
    assert r["base"] == 120.0 and r["value"] == 66.0
    assert r["ratio"] == pytest.approx(0.55)
    assert r["ratio_min"] == pytest.approx(0.55) and r["ratio_max"] == pytest.approx(0.6)
    assert r["met"] is False
    cpu = bench.row(bench.METRICS["cpu_us_per_udp_pkt"], [None] * 3, [6.2, 5.9, 6.5])
    assert cpu["base"] is None and cpu["value"] == 5.9 and cpu["ratio"] is None


def _samples() -> dict[str, dict[str, dict[str, list[float | None]]]]:
    s: dict[str, dict[str, dict[str, list[float | None]]]] = {}
    for rnd, (k, g, ru) in enumerate(((200_000.0, 100_000.0, 95_000.0), (180_000.0, 110_000.0, 99_000.0))):
        for setup in ("default", "instance"):
            bench.add_sample(s, "kernel", setup, rnd, {"udp_pps": k, "cps": 20_000.0,
                                                        "rtt_p50_us": 40.0}, 2)
            bench.add_sample(s, "snatgw", setup, rnd, {"udp_pps": g, "cps": 1000.0, "rtt_p50_us": 100.0,
                                                        "cpu_us_per_udp_pkt": 6.0}, 2)
        bench.add_sample(s, "rules", "instance", rnd, {"udp_pps": ru, "cps": 950.0}, 2)
        bench.add_sample(s, "tuned", "default", rnd, {"cps": 800.0}, 2)
    return s


def _doc(rss: dict[str, Any] | None = None) -> dict[str, Any]:
    settings = {"rounds": 2, "duration_s": 3.0, "quick": False, "block_size": 1024}
    summary = bench.build_summary(_samples(), settings, rss)
    machine = {"date": "2026-12-02 08:20 UTC", "cores": 2, "cpu_model": "AMD EPYC",
               "kernel": "6.18.44", "python": "3.11.7", "mem_total_mb": 24105}
    return {"machine": machine, "settings": settings, "summary": summary, "profile": None,
            "errors": []}


def test_summary_compares_rules_with_the_same_rounds_instance_row() -> None:
    """The 100-rules rows' baseline is snatgw's instance-IP row, judged against 0.90."""
    sections = {s["name"]: s for s in _doc()["summary"]}
    assert list(sections) == ["default", "instance", "tuned", "rules"]
    udp = sections["rules"]["rows"][0]
    assert udp["base"] == 110_000.0 and udp["value"] == 99_000.0
    assert udp["ratio"] == pytest.approx(0.9) and udp["met"] is True
    assert sections["rules"]["rows"][1]["ratio"] == pytest.approx(0.95)


def test_connections_goal_applies_to_the_instance_ip_only() -> None:
    """The default row's connections are bound by its port block, so only the instance row has
    the 0.90 goal; the default row says what bounds it."""
    sections = {s["name"]: s for s in _doc()["summary"]}
    cps = {n: next(r for r in sections[n]["rows"] if r["key"] == "cps") for n in ("default", "instance")}
    assert cps["default"]["goal"] == "" and cps["instance"]["goal"].startswith(">= 0.90")
    notes = " ".join(sections["default"]["notes"])
    assert "1024 ports" in notes and "102 conn/s" in notes


def test_report_prints_the_machine_the_workers_line_and_every_section_from_json() -> None:
    """The text report is rebuilt from the JSON alone: machine line, sections, goals, workers."""
    rss = {"conntrack_objsize": 320, "notes": ["x"],
           "checkpoints": [{"target": 100_000, "flows": 100_000, "bytes_per_flow": 1100.0},
                           {"target": 1_000_000, "flows": 1_000_000, "bytes_per_flow": 1050.0}]}
    doc = json.loads(json.dumps(_doc(rss)))
    text = bench.render_report(doc)
    assert text.startswith("snatgw bench 2026-12-02 08:20 UTC: 2 cores, AMD EPYC, kernel 6.18.44")
    assert "Workers curve: not measured (2 cores here)" in text
    assert "(machine: 2 cores, AMD EPYC, kernel 6.18.44)" in text
    assert "RSS per flow at 1,000,000 flows" in text and "<= 300 B at 1M: MISSED" in text
    assert "UDP 64 B delivered" in text and ">= 0.60x: MISSED" in text
    assert "0.55x (0.5-0.611)" in text
    assert "Where the time goes: not measured" in text


def test_memory_goal_is_judged_only_when_a_million_flows_were_reached() -> None:
    """A run that stopped short of 1M flows reports its largest count without judging the goal."""
    sec = bench.rss_section({"conntrack_objsize": 256, "notes": ["stopped"],
                             "checkpoints": [{"target": 1_000_000, "flows": 600_000,
                                              "bytes_per_flow": 1000.0}]})
    (r,) = sec["rows"]
    assert r["metric"] == "RSS per flow at 600,000 flows" and r["goal"] == "" and r["met"] is None
    assert r["ratio"] == pytest.approx(1000 / 256)


def test_table_columns_align_and_numbers_right_align() -> None:
    """Every line of a table is as wide as its widest cell per column; numbers are right-aligned."""
    text = bench.format_table(("metric", "value"), [("a", "1"), ("longer", "1,000")], (False, True))
    lines = text.splitlines()
    assert lines[0] == "metric | value"
    assert lines[1] == "-------+------"
    assert lines[2] == "a      |     1"
    assert lines[3] == "longer | 1,000"


def test_a_ratio_just_under_its_goal_does_not_print_as_the_goal() -> None:
    """Ratios keep three significant figures: 0.598 against >= 0.60 reads 0.598x, MISSED."""
    r = bench.row(bench.METRICS["tcp_mbit"], [14_605.0], [8_736.0])
    assert bench.fmt_ratio(r) == "0.598x" and bench.fmt_goal(r) == ">= 0.60x: MISSED"


def test_numbers_keep_three_significant_figures_or_more() -> None:
    """Large figures get thousands separators, small ones decimals, missing ones a dash."""
    assert bench.fmt(164936.4) == "164,936"
    assert bench.fmt(12.34) == "12.3"
    assert bench.fmt(1.234) == "1.23"
    assert bench.fmt(None) == "-"


def test_profile_names_are_short() -> None:
    """pstats keys become module.function or Type.method."""
    assert bench.short_name(("/x/gateway/core/in2out.py", 32, "in2out")) == "in2out.in2out"
    method = "<method 'pack_into' of '_struct.Struct' objects>"
    assert bench.short_name(("~", 0, method)) == "Struct.pack_into"
    assert bench.short_name(("~", 0, "<built-in method builtins.len>")) == "builtins.len"


def test_profile_summary_splits_process_cpu_into_core_and_the_rest() -> None:
    """The measured whole-process figure minus the core's is attributed to the rest, labelled."""
    text = bench.render_profile({"iterations": 1000, "repeats": 5, "in2out_udp_us": 1.5,
                                 "out2in_udp_us": 1.6, "new_flow_rules_us": "ModelError: x",
                                 "process_us_per_udp_pkt": 6.0, "cprofile_top": []})
    assert "core 25%" in text and "4.50 us (75%)" in text
    assert "n/a (ModelError: x)" in text


# --------------------------------------------------------------------------- load helper


def test_flow_burst_packets_have_valid_checksums() -> None:
    """The raw packets the memory phase sends carry correct IP and UDP checksums."""
    raw = helper.udp_packet("10.10.2.1", "198.51.100.2", 10000, 30000, b"bench-fl")
    pkt = IP(raw)
    ip_sum, udp_sum = pkt.chksum, pkt[UDP].chksum
    del pkt.chksum
    del pkt[UDP].chksum
    again = IP(bytes(pkt))
    assert (ip_sum, udp_sum) == (again.chksum, again[UDP].chksum)


def test_flow_tuples_enumerate_every_pair_once() -> None:
    """Source ports vary fastest, every (sport, dport) pair once: one new flow per packet."""
    pairs = list(helper.flow_tuples((10, 12), (5, 6)))
    assert pairs == [(10, 5), (11, 5), (12, 5), (10, 6), (11, 6), (12, 6)]


def test_cpu_accounting_says_when_softirq_time_lands_on_the_gateway() -> None:
    """Without IRQ_TIME_ACCOUNTING the report says softirq work is charged to the running task."""
    assert bench.cpu_accounting("CONFIG_TICK_CPU_ACCOUNTING=y\n# CONFIG_IRQ_TIME_ACCOUNTING is not set\n") \
        .startswith("tick-sampled; softirq")
    assert bench.cpu_accounting("CONFIG_IRQ_TIME_ACCOUNTING=y\n").startswith("irq time accounted apart")
    assert bench.cpu_accounting("").startswith("unknown")


def test_rules_check_counts_the_bench_groups_own_outbound_rules_and_their_hits() -> None:
    """From snatgw rules rows: own outbound rules of bench-nsg, hits of the allow and deny ones."""
    rows = [
        {"group": "bench-nsg", "direction": "outbound", "default": False, "access": "deny", "hits": 0},
        {"group": "bench-nsg", "direction": "outbound", "default": False, "access": "deny", "hits": 1},
        {"group": "bench-nsg", "direction": "outbound", "default": False, "access": "allow", "hits": 42},
        {"group": "bench-nsg", "direction": "outbound", "default": True, "access": "allow", "hits": 9},
        {"group": "bench-nsg", "direction": "inbound", "default": True, "access": "deny", "hits": 3},
    ]
    check = bench.summarise_rules(rows)
    assert check == {"rules_attached": 3, "allow_hits": 42, "deny_hits": 1}
    assert "3 rules of the bench group; the allow rule admitted 42 flows, the deny rules 1" \
        in bench.rules_note(check)
    assert bench.rules_note({"error": "unknown command"}) == "snatgw rules failed: unknown command"


def test_udp_note_says_when_the_kernel_row_is_sender_bound() -> None:
    """A kernel that delivers all the sender made is sender-bound; snatgw's loss is its queue."""
    text = bench.udp_note([99_000.0], [100_000.0], [40_000.0], [100_000.0])
    assert "kernel NAT delivered 99% and snatgw 40%" in text
    assert "sender-bound" in text and "full queue" in text
    assert "sender-bound" not in bench.udp_note([60_000.0], [100_000.0], [40_000.0], [100_000.0])
    assert bench.udp_note([None], [None], [1.0], [1.0]) == "UDP: not measured on both sides"


def test_process_split_takes_user_and_system_from_the_best_round() -> None:
    """The whole-process figure and its utime/stime parts come from the same (lowest) round."""
    per = {"cpu_us_per_udp_pkt": [8.0, 6.0, None], "user_us_per_udp_pkt": [5.0, 4.0, None],
           "system_us_per_udp_pkt": [3.0, 2.0, None]}
    assert bench.process_split(per) == {"process_us_per_udp_pkt": 6.0, "process_user_us_per_udp_pkt": 4.0,
                                        "process_system_us_per_udp_pkt": 2.0}
    assert bench.process_split({}) == {"process_us_per_udp_pkt": None}
    assert bench.parse_cpu_split("1 (a b) S " + " ".join(str(n) for n in range(4, 53))) == (14, 15)


# --------------------------------------------------------------------------- workers curve, py-spy


@pytest.mark.parametrize("count", [1, 2, 3, 5, 7, 16])
def test_curve_backends_give_every_worker_two_of_its_own(count: int) -> None:
    """Each point's load comes from 2 addresses per worker, owned as core/shard.py says."""
    from gateway.core.shard import backend_owner

    got = workers.pick_backends(count)
    assert len(got) == len(set(got)) == 2 * count
    owners = [backend_owner(ip(a), count) for a in got]
    assert sorted(owners) == sorted(list(range(count)) * 2)


def test_curve_config_sets_workers_and_the_pool_and_parses() -> None:
    """The curve's config names its worker count and its backends as the pool; it loads."""
    text = workers.curve_config(workers.pick_backends(2), 2, 0)
    model = parse(text, "curve.toml").model
    assert "workers = 2" in text and '"10.10.100.1"' in text
    assert model is not None


def test_curve_rows_give_ratio_to_kernel_and_speedup_over_one_worker() -> None:
    """Per worker count: snatgw / kernel of the same senders, and snatgw / snatgw with one worker."""
    rows = workers.curve_rows([
        {"workers": 1, "senders": 2, "udp_pps": 50.0, "kernel_udp_pps": 100.0, "tcp_mbit": 10.0,
         "kernel_tcp_mbit": 20.0, "cpu_us_per_udp_pkt": 7.0},
        {"workers": 2, "senders": 4, "udp_pps": 80.0, "kernel_udp_pps": 100.0, "tcp_mbit": None,
         "kernel_tcp_mbit": 20.0},
    ])
    assert rows[1]["udp_pps_ratio"] == pytest.approx(0.8) and rows[1]["udp_pps_speedup"] == pytest.approx(1.6)
    assert rows[1]["tcp_mbit_ratio"] is None and rows[0]["tcp_mbit_speedup"] == pytest.approx(1.0)
    text = workers.render_curve({"rows": rows, "notes": ["n"]}, 2)
    assert "Workers curve (2 cores" in text and "1.60" in text and "note: n" in text


def test_report_prints_the_curve_and_the_worker_profile_from_json() -> None:
    """The curve and py-spy's top functions are part of the report rebuilt from the JSON."""
    doc = _doc()
    doc["workers"] = {"rows": workers.curve_rows([{"workers": 1, "senders": 2, "udp_pps": 5.0,
                                                   "kernel_udp_pps": 10.0}]), "notes": []}
    doc["worker_profile"] = {"samples": 1000, "rate_hz": 250,
                             "top": [{"function": "verdicts.VerdictWriter.flush", "share": 0.3}],
                             "gateway": {"cpu_us_per_packet": 8.0, "user_us_per_packet": 4.0,
                                         "system_us_per_packet": 4.0}}
    text = bench.render_report(json.loads(json.dumps(doc)))
    assert "Workers curve (2 cores" in text
    assert "30.0%  verdicts.VerdictWriter.flush" in text and "8.00 us CPU per packet" in text


def test_py_spy_raw_output_becomes_self_time_per_function() -> None:
    """The leaf frame of each collapsed stack gets its samples; line numbers are merged."""
    raw = ("run (gateway/adapters/loop.py:300);receive (gateway/adapters/nfqueue/queue.py:290) 30\n"
           "run (gateway/adapters/loop.py:300);receive (gateway/adapters/nfqueue/queue.py:301) 10\n"
           "run (gateway/adapters/loop.py:300);in2out (gateway/core/in2out.py:50) 60\n"
           "garbage line\n")
    top = profiler.top_functions(raw)
    assert top[0] == {"function": "in2out.in2out", "share": 0.6, "samples": 60}
    assert top[1]["function"] == "queue.receive" and top[1]["samples"] == 40
