"""Readable tables for ``snatgw flows|ports|rules|stats|status|reload`` (the
``--json`` forms print the control socket's answer as it is).

Column layouts follow ``ss -tn`` and ``conntrack -L``: one line per flow or
backend, addresses as ``ip:port``, numbers unabbreviated so they can be
compared and grepped.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns separated by two spaces; the last column is not padded."""
    cells = [[str(h) for h in headers]] + [["-" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        parts = [c.ljust(w) for c, w in zip(r[:-1], widths[:-1], strict=True)] + [r[-1]]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _secs(v: float) -> str:
    return f"{v:.1f}s" if v < 600 else f"{v / 60:.0f}m"


def flows(rows: list[dict[str, Any]]) -> str:
    out = [
        (
            r["protocol"],
            f"{r['backend']}:{r['backend_port']}",
            f"{r['public_ip']}:{r['public_port']}",
            f"{r['remote']}:{r['remote_port']}",
            r["scenario"],
            r.get("direction", "out"),
            r.get("rule") or "-",
            r["state"],
            _secs(r["age"]),
            _secs(r["idle"]),
            r["packets_out"],
            r["bytes_out"],
            r["packets_in"],
            r["bytes_in"],
        )
        for r in rows
    ]
    head = [
        "PROTO",
        "BACKEND",
        "PUBLIC",
        "REMOTE",
        "SCENARIO",
        "DIR",
        "RULE",
        "STATE",
        "AGE",
        "IDLE",
        "PKTS-OUT",
        "BYTES-OUT",
        "PKTS-IN",
        "BYTES-IN",
    ]
    if rows and "worker" in rows[0]:  # several workers: each flow says whose table holds it
        head.append("WORKER")
        tagged: list[tuple[Any, ...]] = [(*o, r["worker"]) for o, r in zip(out, rows, strict=True)]
        return table(head, tagged) + f"\n{len(rows)} flows"
    return table(head, out) + f"\n{len(rows)} flows"


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(ts)) + f" ({time.time() - ts:.0f}s ago)"


def ports(rows: list[dict[str, Any]]) -> str:
    out = []
    for r in rows:
        block = ",".join(f"{lo}-{hi}" for lo, hi in r["block"]) or "own ports"
        top = ", ".join(f"{d['destination']}/{d['protocol']}={d['ports']}" for d in r["top_destinations"])
        peak = max(r["peak"].values(), default=None)
        use = r["in_use"]
        out.append(
            (
                r["backend"],
                r["scenario"],
                r["pool"] or "-",
                r["public_ip"],
                block,
                r["allocated"] if r["allocated"] is not None else "all",
                use.get("tcp", 0),
                use.get("udp", 0),
                use.get("icmp", 0),
                peak,
                r["flows"],
                r["exhausted"],
                _when(r["last_exhausted"]),
                top or "-",
            )
        )
    head = [
        "BACKEND",
        "SCENARIO",
        "POOL",
        "PUBLIC",
        "BLOCK",
        "ALLOC",
        "TCP",
        "UDP",
        "ICMP",
        "PEAK",
        "FLOWS",
        "EXHAUSTED",
        "LAST-EXHAUSTED",
        "TOP-DESTINATIONS",
    ]

    return table(head, out)


#: ``snatgw rules`` columns: (header, row key). Two "PORTS" columns, as Azure's portal shows them.
RULE_COLUMNS = (
    ("GROUP", "group"),
    ("ATTACHED", "attached"),
    ("DIRECTION", "direction"),
    ("PRIORITY", "priority"),
    ("NAME", "name"),
    ("ACCESS", "access"),
    ("PROTOCOL", "protocol"),
    ("SOURCE", "source"),
    ("PORTS", "source_ports"),
    ("DESTINATION", "destination"),
    ("PORTS", "destination_ports"),
    ("HITS", "hits"),
)


def rules(rows: list[dict[str, Any]]) -> str:
    """``snatgw rules``: one table per backend of the rules that apply to it, in
    evaluation order (inbound: subnet group, then NIC group; outbound: NIC, then
    subnet), Azure's default rules included and marked ``*``, with hit counts.

    Rows whose ``backend`` is "" belong to groups no configured backend meets;
    they come last under their own heading.
    """
    if not rows:
        return "no security groups: outbound is unfiltered, unsolicited inbound follows inbound_default"
    by_backend: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_backend.setdefault(str(r.get("backend", "")), []).append(r)
    blocks = []
    for backend, group_rows in by_backend.items():
        title = f"backend {backend}" if backend else "groups no configured backend meets"
        groups = dict.fromkeys(f"{r['group']} ({r['attached']})" for r in group_rows)
        body = table(
            [h for h, _k in RULE_COLUMNS],
            [
                [(r[k] + " *" if k == "name" and r.get("default") else r[k]) for _h, k in RULE_COLUMNS]
                for r in group_rows
            ],
        )
        blocks.append(f"{title}: {', '.join(groups)}\n{body}")
    blocks.append("* one of Azure's default rules")
    return "\n\n".join(blocks)


def stats(s: dict[str, Any]) -> str:
    c = s["counters"]
    lines = ["packets"]
    for k in ("in2out_translated", "out2in_translated", "hairpin_translated", "icmp_error_in2out",
              "icmp_error_out2in"):
        lines.append(f"  {k:<24} {c.get(k, 0)}")
    lines.append("drops")
    lines += [f"  {k:<24} {v}" for k, v in s["drops"].items()]
    conns = s["snat_connections"]
    lines.append("snat connections")
    lines.append(f"  {'attempted':<24} {conns['attempted']}")
    lines.append(
        f"  {'failed':<24} {conns['failed']}  (exhausted {c['drop_exhausted']}, "
        f"no public address {c['drop_no_public_address']})"
    )
    lines.append(f"  {'created':<24} {c['flows_created']}")
    lines.append(f"inbound flows created: {c.get('inbound_flows_created', 0)}")
    lines.append("flows ended")
    lines += [f"  {k:<24} {v}" for k, v in s["flows_ended"].items()]
    lines.append(f"flows live: {s['flows_total']}")
    rows = [(p, st, n) for p, states in s["flows"].items() for st, n in sorted(states.items())]
    if rows:
        lines.append(table(("  PROTO", "STATE", "FLOWS"), [(f"  {p}", st, n) for p, st, n in rows]))
    lines.append(f"tier changes: {s['tier_changes']}")
    return "\n".join(lines)


def status(s: dict[str, Any]) -> str:
    lines = [
        f"config      {s['config']}",
        f"uptime      {_secs(s['uptime'])}",
        f"queue       {s['queue']}"
        + (f" (tcp {s['tcp_queue']})" if s.get("tcp_queue") is not None else "")
        + f", client {s['queue_client']}",
        f"interfaces  inside {s['inside']}, outside {s['outside']}",
        f"control     {s['control_socket']}" + _control(s.get("control")),
        f"metrics     {s['metrics'] or 'off'}",
        f"reloads     applied {s['reloads']['applied']}, rejected {s['reloads']['rejected']}",
        f"flows       {s['flows']}",
        *_security_line(s),
        "",
        table(
            ("PUBLIC", "KIND", "NAME", "BACKENDS", "BLOCK-SIZE", "TIER"),
            [
                (a["public_ip"], a["kind"], a["name"] or "-", a["backends"], a["block_size"], a["tier"])
                for a in s["addresses"]
            ],
        ),
    ]
    if s["pools"]:
        lines += [
            "",
            table(
                ("POOL", "FRONTEND", "PUBLIC", "MEMBERS", "BLOCK-SIZE", "TIER"),
                [
                    (
                        p["pool"],
                        p["frontend"] or "-",
                        p["public_ip"],
                        p["members"],
                        p["block_size"],
                        p["tier"],
                    )
                    for p in s["pools"]
                ],
            ),
        ]
    if s.get("health"):
        lines += ["", health(s["health"])]
    if isinstance(s.get("workers"), list):
        lines += ["", workers(s["workers"])]
    return "\n".join(lines)


def workers(rows: list[dict[str, Any]]) -> str:
    """The worker processes of ``status`` (README, "Workers")."""
    return table(
        ("WORKER", "PID", "ALIVE", "QUEUES", "FLOWS", "PACKETS"),
        [
            (w["index"], w["pid"], "yes" if w["alive"] else "NO", ",".join(map(str, w["queues"])),
             w["flows"], w.get("packets", "-"))
            for w in rows
        ],
    )  # fmt: skip


def health(rows: list[dict[str, Any]]) -> str:
    """Probe health per member (``status``): up or down, since when, failures in a
    row, and the LB rules that use the probe on that member."""
    return table(
        ("PROBE", "MEMBER", "STATE", "FAILURES", "SINCE", "RULES"),
        [
            (r["probe"], r["member"], r["state"], r["failures"], _when(r.get("since")), ",".join(r["rules"]))
            for r in rows
        ],
    )


def _security_line(s: dict[str, Any]) -> list[str]:
    """The tags and default the security groups resolve against, when the gateway sends them."""
    if "address_space" not in s:
        return []
    space = ", ".join(s["address_space"]) or "-"
    return [
        f"security    VirtualNetwork {space}, AzureLoadBalancer {s.get('probe_source') or '-'}, "
        f"inbound_default {s.get('inbound_default', 'deny')}"
    ]


def _control(c: dict[str, Any] | None) -> str:
    if not c:
        return ""
    return (
        f" (clients {c['clients']}/{c['max_clients']}, served {c['served']}, refused {c['refused']}, "
        f"timed out {c['timed_out']}, denied {c['denied']})"
    )


def reload(r: dict[str, Any]) -> str:
    if not r["applied"]:
        return f"rejected {r['config']}: {r['key']}: {r['problem']}"
    return (
        f"reloaded {r['config']}: backends +{r['backends_added']} -{r['backends_removed']}, "
        f"public addresses +{r['addresses_added']} -{r['addresses_removed']}, "
        f"tier changes {r['tier_changes']}, flows ended {r['flows_ended']}"
    )


def who(r: dict[str, Any]) -> str:
    """``snatgw who IP:PORT``: the live holder of a public port and its flows on it."""
    where = f"{r['public_ip']}:{r['port']}"
    if r["kind"] is not None:
        where += f" ({r['kind']}" + (f" {r['name']}" if r["name"] else "") + ")"
    h = r["holder"]
    if h is None:
        return f"{where}: held by nobody now: {r['reason']}"
    block = ",".join(f"{lo}-{hi}" for lo, hi in h["block"])
    pool = f", pool {h['pool']}" if h["pool"] else ""
    lines = [f"{where}: held by {h['backend']} ({h['scenario']}{pool}), block {block}"]
    proto = f" ({r['protocol']})" if r["protocol"] else ""
    lines.append(f"{len(r['flows'])} live flows on this port{proto}")
    if r["flows"]:
        lines.append(flows(r["flows"]).rsplit("\n", 1)[0])
    return "\n".join(lines)


def who_log(r: dict[str, Any]) -> str:
    """``snatgw who IP:PORT --at TIME --log FILE``: who held it then, by the port-block log."""

    def span(h: dict[str, Any]) -> str:
        until = f"until {h['until']} ({h['end_event']})" if h["until"] else "and still at the end of the log"
        return f"{h['backend']} from {h['since']} ({h['event']}) {until}"

    head = f"{r['public_ip']}:{r['port']} at {r['at']}: "
    lines = [head + ("held by " + span(r["holder"]) if r["holder"] else "held by nobody, per the log")]
    if r["holder"] is None:
        if r["previous"]:
            lines.append("  before: " + span(r["previous"]))
        if r["next"]:
            lines.append("  after:  " + span(r["next"]))
        if not r["intervals"]:
            lines.append("  (no port_block_* line in the log covers this port)")
    for f in r.get("flows", []):
        lines.append(
            f"  flow {f['protocol']} {f['backend']}:{f['backend_port']} -> {f['remote']}:{f['remote_port']}"
            f" since {f['since']}"
        )
    return "\n".join(lines)
