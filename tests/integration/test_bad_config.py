"""Issue 10's bad configs, through the real `snatgw run`: exit 2, one stderr line naming
the file, the key and the problem, and nothing installed in the gateway namespace."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from gateway.lab.layout import LabNames
from tests.integration import helpers as h

pytestmark = pytest.mark.integration

#: No traffic here: the internet host's whoami is not needed.
LAB_WHOAMI = False

GROUP = """
[[security_groups]]
name = "web-nsg"
attach = [{attach}]

[[security_groups.rules]]
name = "allow-http"
priority = 100
direction = "inbound"
access = "allow"
protocol = "tcp"
source = "Internet"
destination_ports = "8080"
"""

RULE = """
[[security_groups.rules]]
name = "{name}"
priority = {priority}
direction = "{direction}"
access = "deny"
protocol = "Tcp"
source = "{source}"
destination = "Internet"
destination_ports = "{ports}"
"""


def group(attach: str = '"web"', **rule: object) -> str:
    """The lab config with group web-nsg and, when given, a second (outbound deny) rule."""
    text = h.lab_config() + GROUP.format(attach=attach)
    if rule:
        r = {"name": "deny-smtp", "priority": 200, "direction": "outbound", "source": "*", "ports": "25"}
        r.update(rule)
        text += RULE.format(**r)
    return text


NAT_ON_80 = """
[[inbound_nat_rules]]
name = "ssh"
frontend = "fe-web"
protocol = "tcp"
frontend_port = 80
backend = "10.10.1.1"
backend_port = 22
"""

LB_ALL_ON_80 = """
[[lb_rules]]
name = "everything"
frontend = "fe-web"
pool = "web"
protocol = "all"
frontend_port = 80
backend_port = 9000
"""

WEB_ROLE_WITH_INSTANCE_IP = """
[[cloud_services]]
name = "shop"
vip = "198.51.100.40"

[[cloud_services.roles]]
name = "frontend"
kind = "web"
instances = ["10.10.2.1"]
endpoints = [{ protocol = "tcp", public_port = 80, local_port = 8080 }]
"""

R1 = "security_groups[0].rules[1]"
TAGS = "(Internet, VirtualNetwork, AzureLoadBalancer, *, an address or a CIDR prefix)"
PORTS = 'use "*", a port or LOW-HIGH with 0 <= LOW <= HIGH <= 65535'

# (id, config text, key, problem)
BAD: list[tuple[str, str, str, str]] = [
    ("unknown-tag", group(source="Internets"), f"{R1}.source", f"unknown tag 'Internets' {TAGS}"),
    ("priority-out-of-range", group(priority=4097), f"{R1}.priority", "must be an integer from 100 to 4096"),
    ("priority-duplicated", group(priority=100, direction="inbound"), f"{R1}.priority",
     "priority 100 is already used by inbound rule 'allow-http' of this group"),
    ("bad-port-range", group(ports="587-25"), f"{R1}.destination_ports", f"bad port range '587-25': {PORTS}"),
    ("overlapping-frontend-ports-nat", h.lab_config() + NAT_ON_80, "inbound_nat_rules[0].frontend_port",
     "port 80/tcp of frontend 'fe-web' overlaps lb_rules[0] 'http' (80/tcp)"),
    ("overlapping-frontend-ports-all", h.lab_config() + LB_ALL_ON_80, "lb_rules[1].frontend_port",
     "port 80/all of frontend 'fe-web' overlaps lb_rules[0] 'http' (80/tcp)"),
    ("attach-unknown-pool", group(attach='"web", "wbe"'), "security_groups[0].attach[1]",
     "no pool named 'wbe' (nor is it an address or a CIDR prefix)"),
    ("web-role-with-instance-ip", h.lab_config() + WEB_ROLE_WITH_INSTANCE_IP,
     "cloud_services[0].roles[0].instances[0]",
     "10.10.2.1 has an instance public IP (instance_ips), which a web role instance cannot have "
     "(only kind vm)"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "key", "problem"), [pytest.param(*c[1:], id=c[0]) for c in BAD])
def test_bad_inbound_config_is_refused_before_touching_the_host(
    lab: LabNames, gateway: h.GatewayFactory, text: str, key: str, problem: str
) -> None:
    """Exit 2 with exactly one stderr line "snatgw: invalid config FILE: KEY: PROBLEM"; no
    SNATGW chain, no queue rule and no public address appear in the gateway namespace."""
    before = h.gw_snapshot(lab)
    addresses = h.out_addresses(lab)
    res = gateway.run_to_exit(text)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2, f"rc {res.returncode}: {res.stderr[-2000:]}"
    assert lines == [f"snatgw: invalid config {res.config_path}: {key}: {problem}"], lines
    saved = h.iptables_save(lab)
    assert "SNATGW" not in saved and "NFQUEUE" not in saved, saved
    assert h.out_addresses(lab) == addresses
    assert h.gw_snapshot(lab) == before


def test_the_good_version_is_accepted(tmp_path: Path) -> None:
    """Control: the lab config with the group and a valid second rule passes `snatgw check`."""
    cfg = tmp_path / "good.toml"
    cfg.write_text(group())
    res = subprocess.run([str(h.SNATGW), "check", "--config", str(cfg)], capture_output=True, timeout=30)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("name", ["inbound.toml", "classic.toml"])
def test_the_new_examples_start_in_the_lab(lab: LabNames, gateway: h.GatewayFactory, name: str) -> None:
    """Control: deploy/examples/inbound.toml and classic.toml (lab addresses) start a gateway
    that puts its public addresses up; a clean stop (stopped = "remove", so the refusals
    above still find no SNATGW chain whatever the order) takes everything away again."""
    text = (h.REPO / "deploy" / "examples" / name).read_text()
    text = text.replace("[gateway]\n", '[gateway]\nstopped = "remove"\n', 1)
    before = h.out_addresses(lab)
    gw = gateway(text)
    up = h.out_addresses(lab) - before
    want = {"inbound.toml": {"198.51.100.10", "198.51.100.20", "198.51.100.30", "198.51.100.31"},
            "classic.toml": {"198.51.100.40", "198.51.100.20", "198.51.100.30"}}[name]  # fmt: skip
    assert up == want, up
    assert gw.stop() == 0
    assert h.out_addresses(lab) == before
    assert "SNATGW" not in h.iptables_save(lab)
