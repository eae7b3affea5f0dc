"""`snatgw lab up|down`: build or remove the lab from the command line (wired into gateway.cli)."""

from __future__ import annotations

import argparse
import sys

from gateway.lab import layout as t
from gateway.lab.netns import LabError
from gateway.lab.topology import lab_down, lab_up


def add_lab_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``lab`` command to the main parser's subcommands."""
    p = subparsers.add_parser(
        "lab",
        help="build or remove the three-namespace test lab (needs root)",
        description=(
            "Build (up) or remove (down) the lab: namespaces <prefix>-be, <prefix>-gw, "
            "<prefix>-inet. `up` replaces a stale lab of the same prefix."
        ),
    )
    p.add_argument("action", choices=("up", "down"))
    p.add_argument("--prefix", default="snatgw", help="namespace name prefix (default: snatgw)")
    p.add_argument(
        "--extra-backends",
        type=int,
        default=0,
        metavar="N",
        help=(
            "add N more backend addresses on be0: 10.10.100.1..10.10.100.250, "
            "10.10.101.1.., 250 per third octet (default: 0)"
        ),
    )
    p.add_argument("--mtu", type=int, default=1500, help="MTU of every veth (default: 1500)")
    p.add_argument("--no-whoami", action="store_true", help="do not start the whoami and myip DNS services")
    p.set_defaults(func=cmd_lab)


def cmd_lab(args: argparse.Namespace) -> int:
    """Run ``lab up`` or ``lab down``; prints a short how-to after ``up``."""
    try:
        if args.action == "down":
            lab_down(args.prefix)
            print(f"lab {args.prefix}: down")
            return 0
        extras = t.extra_backend_addresses(args.extra_backends)
        lab = lab_up(args.prefix, extra_backends=extras, mtu=args.mtu, whoami=not args.no_whoami)
    except (LabError, ValueError, OSError) as exc:
        print(f"snatgw lab {args.action}: {exc}", file=sys.stderr)
        return 1
    print(summary(lab, extras, whoami=not args.no_whoami))
    return 0


def summary(lab: t.LabNames, extras: tuple[str, ...] = (), *, whoami: bool = True) -> str:
    """Human summary printed by ``lab up``: what exists and how to use it."""
    extra_line = ""
    if extras:
        extra_line = f"\n                 + {len(extras)} extra: {extras[0]} .. {extras[-1]}"
    down = "make lab-down" if lab.prefix == "snatgw" else f"snatgw lab down --prefix {lab.prefix}"
    lines = [
        f"lab {lab.prefix}: up",
        f"  {lab.be:<16} {t.BE_IF}: pool web {', '.join(t.POOL_MEMBERS)}",
        f"                   instance-IP backend {t.INSTANCE_BACKEND} "
        f"(public {t.INSTANCE_PUBLIC})",
        f"                   standalone {', '.join(t.STANDALONE)}{extra_line}",
        f"                   default route via {t.INSIDE_GW}",
        f"  {lab.gw:<16} {t.GW_IN_IF} {t.INSIDE_GW}/16, {t.GW_OUT_IF} {t.OUTSIDE_GW}/24 "
        "(no forwarding, no public addresses until the gateway runs)",
        f"  {lab.inet:<16} {t.INET_IF} {t.SERVER}/24 and {t.SERVER2}/24, no route to 10/8",
    ]
    if whoami:
        lines.append(
            f"  whoami           http://{t.SERVER}:{t.WHOAMI_HTTP_PORT}/ and udp "
            f"{t.SERVER}:{t.WHOAMI_UDP_PORT}; log {t.whoami_log_path(lab.prefix)}"
        )
        lines.append(
            f"  dns              {t.MYIP_NAME} A -> the asker's address, {t.SERVER}:{t.DNS_PORT} "
            f"udp/tcp; log {t.dns_log_path(lab.prefix)}"
        )
    lines += [
        "",
        "run the gateway:",
        f"  ip netns exec {lab.gw} .venv/bin/snatgw run --config deploy/examples/lab.toml",
        "then from a backend:",
        f"  ip netns exec {lab.be} curl --interface {t.POOL_MEMBERS[0]} http://{t.SERVER}/",
        f"  ip netns exec {lab.be} ping -c 3 -I {t.INSTANCE_BACKEND} {t.SERVER}",
        f"  ip netns exec {lab.be} setpriv --reuid={t.backend_uid(t.INSTANCE_BACKEND)} "
        f"--regid={t.backend_uid(t.INSTANCE_BACKEND)} --clear-groups "
        f"nslookup {t.MYIP_NAME} {t.SERVER}",
        f"    (uid {t.BACKEND_UID_BASE}+i leaves from the i-th backend above: "
        f"{t.BACKEND_UID_BASE} is {t.POOL_MEMBERS[0]})",
        f"remove: {down}",
    ]
    return "\n".join(lines)
