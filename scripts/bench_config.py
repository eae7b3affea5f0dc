"""The bench's snatgw configurations, shared by ``scripts/bench.py`` (its rows) and
``scripts/bench_workers.py`` (the workers curve, with its own pool members), so
both load the same gateway."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gateway.lab.layout import FRONTEND_IP, INSTANCE_BACKEND, INSTANCE_PUBLIC, POOL_MEMBERS


def gateway_config(*, fin_linger: float | None = None, rules: int = 0, queue: int = 0,
                   max_flows: int | None = None, idle_timeout: float | None = None,
                   queue_maxlen: int | None = None, workers: int | None = None,
                   members: Sequence[str] = (POOL_MEMBERS[0],)) -> str:
    """The bench's snatgw config: the pool member behind the frontend and the instance IP.

    Only what a value is given for appears under ``[gateway]``: the default row runs the
    defaults, as users do.  ``rules``: that many outbound rules that never match the bench
    traffic, plus the allow rule it takes, in one group attached to both backends.
    """
    opt = []
    if fin_linger is not None:
        opt.append(f"tcp_fin_linger = {fin_linger:g}")
    if idle_timeout is not None:
        opt.append(f"idle_timeout = {idle_timeout:g}")
    if queue_maxlen is not None:
        opt.append(f"queue_maxlen = {queue_maxlen}")
    if workers is not None:
        opt.append(f"workers = {workers}")
    if max_flows is not None:
        opt += [f"max_flows = {max_flows}", f"max_flows_per_backend = {max_flows}"]
    text = f"""\
# Written by scripts/bench.py.
[gateway]
inside = "in0"
outside = "out0"
queue = {queue}
{chr(10).join(opt)}

[[frontends]]
name = "fe-bench"
ip = "{FRONTEND_IP}"

[[pools]]
name = "bench"
members = [{", ".join(f'"{m}"' for m in members)}]

[[lb_rules]]
name = "http"
frontend = "fe-bench"
pool = "bench"
protocol = "tcp"
frontend_port = 80
backend_port = 8080

[[instance_ips]]
private = "{INSTANCE_BACKEND}"
public = "{INSTANCE_PUBLIC}"
"""
    if rules:
        text += "\n" + security_group_toml(rules)
    return text


def bench_rules(count: int) -> list[dict[str, Any]]:
    """``count`` outbound deny rules that no bench packet matches, then the allow rule.

    Half name other hosts (192.0.2.0/24, any port), half the bench's own server prefix on
    ports the bench never uses (40000 + i), so that neither the address nor the port alone
    rules them out; protocols alternate tcp/udp.  The last rule allows the Internet tag
    (the bench's server is outside the inside prefix): every flow is looked up past all
    of them.
    """
    out: list[dict[str, Any]] = []
    for i in range(count):
        proto = "tcp" if i % 2 == 0 else "udp"
        if i % 4 < 2:
            dst, ports = f"192.0.2.{i % 250 + 1}", "*"
        else:
            dst, ports = "198.51.100.0/24", str(40000 + i)
        out.append({"name": f"deny-{i:03d}", "priority": 100 + i, "direction": "outbound",
                    "access": "deny", "protocol": proto, "source": "*", "source_ports": "*",
                    "destination": dst, "destination_ports": ports})
    out.append({"name": "allow-internet", "priority": 100 + count, "direction": "outbound",
                "access": "allow", "protocol": "*", "source": "*", "source_ports": "*",
                "destination": "Internet", "destination_ports": "*"})
    return out


def security_group_toml(count: int) -> str:
    """The ``[[security_groups]]`` text of :func:`bench_rules` (config syntax of issue 10)."""
    lines = ["[[security_groups]]", 'name = "bench-nsg"',
             f'attach = ["bench", "{INSTANCE_BACKEND}"]', ""]
    for r in bench_rules(count):
        lines.append("[[security_groups.rules]]")
        for k, v in r.items():
            lines.append(f"{k} = {v}" if isinstance(v, int) else f'{k} = "{v}"')
        lines.append("")
    return "\n".join(lines)
