"""`snatgw rules`, `status` health and `flows` direction render the gateway's answers readably."""

from __future__ import annotations

from dataclasses import replace

from gateway import show
from gateway.cli import build_parser
from gateway.core.model import Direction, SecurityGroup, SecurityRule, Tag
from gateway.core.security import SecurityPolicy
from tests.unit.conftest import POOL, SERVER, ip, lab_model

ANY_PORT = ((0, 65535),)


def _policy() -> SecurityPolicy:
    """web-nsg on the pool (NIC) with one outbound deny, subnet-nsg on 10.10.0.0/16."""
    deny25 = SecurityRule(
        "deny-smtp", 100, Direction.OUTBOUND, False, 6, (Tag.ANY,), ANY_PORT, (Tag.INTERNET,), ((25, 25),)
    )
    allow80 = SecurityRule(
        "allow-http", 200, Direction.INBOUND, True, 6, (Tag.INTERNET,), ANY_PORT, (Tag.ANY,), ((8080, 8080),)
    )
    model = replace(
        lab_model(),
        address_space=((ip("10.10.0.0"), ip("10.10.255.255")),),
        probe_source=ip("10.10.0.1"),
        security_groups=(
            SecurityGroup("web-nsg", (deny25,), pools=("web",)),
            SecurityGroup("subnet-nsg", (allow80,), prefixes=((ip("10.10.0.0"), ip("10.10.255.255")),)),
        ),
    )
    return SecurityPolicy(model)


def test_rules_renders_a_table_per_backend_with_defaults_and_hits() -> None:
    """One block per backend naming its groups; every column; defaults marked; hits counted."""
    policy = _policy()
    policy.outbound(ip(POOL[0]), 6, ip(POOL[0]), 40000, ip(SERVER), 25)
    rows = policy.effective_rules(ip(POOL[0]))
    text = show.rules(rows)
    lines = text.splitlines()
    assert lines[0] == f"backend {POOL[0]}: subnet-nsg (subnet), web-nsg (nic)"
    head = lines[1].split()
    assert head == ["GROUP", "ATTACHED", "DIRECTION", "PRIORITY", "NAME", "ACCESS", "PROTOCOL", "SOURCE",
                    "PORTS", "DESTINATION", "PORTS", "HITS"]
    deny = next(ln for ln in lines if "deny-smtp" in ln).split()
    assert deny[:8] == ["web-nsg", "nic", "outbound", "100", "deny-smtp", "deny", "tcp", "*"]
    assert deny[-3:] == ["Internet", "25", "1"]
    assert any("AllowVnetInBound *" in ln and "65000" in ln for ln in lines)
    assert sum("DenyAllOutBound *" in ln for ln in lines) == 2, "both groups' defaults are listed"
    assert lines[-1] == "* one of Azure's default rules"


def test_rules_lists_every_backend_and_unattached_groups_last() -> None:
    """Without --backend every covered backend gets its own block, each naming it."""
    text = show.rules(_policy().effective_rules())
    titles = [ln for ln in text.splitlines() if ln.startswith(("backend ", "groups "))]
    assert [t.split(":")[0] for t in titles[:3]] == [f"backend {b}" for b in POOL]


def test_rules_without_groups_says_what_applies() -> None:
    """An empty answer says outbound is unfiltered and inbound follows inbound_default."""
    assert "inbound_default" in show.rules([])


def test_status_shows_probe_health_per_member() -> None:
    """status lists each probed member with its state, failures in a row and time in state."""
    base = {
        "config": "/etc/x.toml", "uptime": 1.0, "queue": 0, "tcp_queue": None, "queue_client": "netlink",
        "inside": "in0", "outside": "out0", "control_socket": "/run/s", "metrics": None,
        "reloads": {"applied": 0, "rejected": 0}, "flows": 0, "addresses": [], "pools": [],
    }  # fmt: skip
    import time

    now = time.time()
    health = [
        {"probe": "web-probe", "member": POOL[0], "state": "up", "since": now - 12, "failures": 0,
         "rules": ["http"]},
        {"probe": "web-probe", "member": POOL[1], "state": "down", "since": now - 4, "failures": 3,
         "rules": ["http", "alt"]},
    ]  # fmt: skip
    text = show.status({**base, "health": health})
    lines = text.splitlines()
    i = next(n for n, ln in enumerate(lines) if ln.startswith("PROBE"))
    assert lines[i].split() == ["PROBE", "MEMBER", "STATE", "FAILURES", "SINCE", "RULES"]
    up, down = lines[i + 1].split(), lines[i + 2].split()
    assert up[:4] == ["web-probe", POOL[0], "up", "0"] and up[5:] == ["(12s", "ago)", "http"]
    assert down[:4] == ["web-probe", POOL[1], "down", "3"] and down[-1] == "http,alt"
    assert "PROBE" not in show.status(base), "no probes: no health table"


def test_flows_show_direction_and_admitting_rule() -> None:
    """Each flow line carries its direction and the rule that admitted it ('-' for none)."""
    row = {
        "protocol": "tcp", "backend": POOL[0], "backend_port": 8080, "public_ip": "198.51.100.10",
        "public_port": 80, "remote": "203.0.113.9", "remote_port": 50000, "scenario": "lb_rule",
        "direction": "in", "rule": "subnet-nsg/allow-http", "state": "established", "age": 1.0, "idle": 0.5,
        "packets_out": 1, "bytes_out": 60, "packets_in": 2, "bytes_in": 120,
    }  # fmt: skip
    lines = show.flows([row, {**row, "direction": "out", "rule": None}]).splitlines()
    head = lines[0].split()
    assert head[4:7] == ["SCENARIO", "DIR", "RULE"]
    assert lines[1].split()[4:7] == ["lb_rule", "in", "subnet-nsg/allow-http"]
    assert lines[2].split()[4:7] == ["lb_rule", "out", "-"]


def test_cli_rules_takes_backend_and_json() -> None:
    """`snatgw rules --backend IP --json` parses and asks the gateway for that backend."""
    args = build_parser().parse_args(["rules", "--backend", POOL[0], "--json"])
    assert args.backend == POOL[0] and args.json and args.command == "rules"


def test_status_names_the_tags_security_groups_resolve_against() -> None:
    """status shows address_space (VirtualNetwork), probe_source (AzureLoadBalancer) and inbound_default."""
    base = {
        "config": "/etc/x.toml", "uptime": 1.0, "queue": 0, "tcp_queue": None, "queue_client": "netlink",
        "inside": "in0", "outside": "out0", "control_socket": "/run/s", "metrics": None,
        "reloads": {"applied": 0, "rejected": 0}, "flows": 0, "addresses": [], "pools": [],
        "address_space": ["10.10.0.0/16"], "probe_source": "10.10.0.1", "inbound_default": "deny",
    }  # fmt: skip
    line = "security    VirtualNetwork 10.10.0.0/16, AzureLoadBalancer 10.10.0.1, inbound_default deny"
    assert line in show.status(base).splitlines()
