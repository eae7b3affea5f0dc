"""The ``snatgw`` command."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from gateway.config import DEFAULT_CONTROL_SOCKET, ConfigError, GatewayConfig, load, parse_endpoint

EXIT_CONFIG = 2
EXIT_SYSTEM = 1


def _cmd_run(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload sent while starting must not kill us
    try:
        cfg = load(args.config)
    except ConfigError as e:
        print(f"snatgw: invalid config {e}", file=sys.stderr)
        return EXIT_CONFIG
    from gateway.adapters import system
    from gateway.adapters.control import group_id
    from gateway.adapters.logs import configure
    from gateway.adapters.run import run

    problem = _system_problem(cfg, system.interface_index, group_id)
    if problem:
        print(f"snatgw: invalid config {cfg.path}: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    metrics = None
    if args.metrics:
        try:
            metrics = parse_endpoint(args.metrics)
        except ValueError as e:
            print(f"snatgw: --metrics: {e}", file=sys.stderr)
            return EXIT_CONFIG
    log = configure()
    try:
        return run(cfg, log, metrics, args.control_socket)
    except (OSError, RuntimeError) as e:
        log.error("gateway_failed", error=str(e))
        return EXIT_SYSTEM


def _system_problem(
    cfg: GatewayConfig, interface: Callable[[str], int], group: Callable[[str], int]
) -> str | None:
    """What in ``cfg`` this host cannot provide ("KEY: PROBLEM"), checked before touching it."""
    for key, name in (("gateway.inside", cfg.inside), ("gateway.outside", cfg.outside)):
        try:
            interface(name)
        except LookupError as e:
            return f"{key}: {e}"
    if cfg.control_group is not None:
        try:
            group(cfg.control_group)
        except LookupError as e:
            return f"gateway.control_group: {e}"
    return None


def _socket_path(args: argparse.Namespace) -> str:
    path: str = args.socket or os.environ.get("SNATGW_SOCKET") or DEFAULT_CONTROL_SOCKET
    return path


def _ask(path: str, name: str, params: dict[str, Any]) -> Any:
    """The running gateway's answer to ``name``, or None after saying on stderr why not."""
    from gateway.adapters.control import RequestError, request

    try:
        return request(path, name, **params)
    except RequestError as e:
        print(f"snatgw {name}: {e}", file=sys.stderr)
    except (OSError, ValueError) as e:
        print(f"snatgw {name}: cannot reach the gateway at {path}: {e}", file=sys.stderr)
    return None


def _operator_command(name: str, render: Callable[[Any], str]) -> Callable[[argparse.Namespace], int]:
    """``snatgw NAME``: ask the running gateway, print a table or (``--json``) its answer."""

    def command(args: argparse.Namespace) -> int:
        params = {k: getattr(args, k) for k in ("backend", "proto") if getattr(args, k, None) is not None}
        path = _socket_path(args)
        result = _ask(path, name, params)
        if result is None:
            return EXIT_SYSTEM
        print(json.dumps(result, indent=2) if args.json else render(result))
        if name == "reload" and not result.get("applied"):
            return EXIT_CONFIG
        return 0

    return command


def _endpoint(text: str) -> tuple[str, int]:
    """``A.B.C.D:PORT`` as (address, port); ValueError says what is wrong."""
    import ipaddress

    host, sep, port = text.rpartition(":")
    try:
        ip = str(ipaddress.IPv4Address(host))
    except ValueError:
        ip = ""
    if not sep or not ip or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not PUBLIC_IP:PORT (an IPv4 address and a port)")
    return ip, int(port)


def _cmd_who(args: argparse.Namespace) -> int:
    """``snatgw who IP:PORT``: from the running gateway, or with ``--at``/``--log`` from its log."""
    from gateway import show, who

    try:
        ip, port = _endpoint(args.endpoint)
        at = who.parse_time(args.at) if args.at is not None else None
    except ValueError as e:
        print(f"snatgw who: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if args.log is None and at is not None:
        print("snatgw who: --at needs --log FILE (or --log - to read the log from stdin; "
              "journalctl -u snatgw -o cat | snatgw who IP:PORT --at TIME --log -)", file=sys.stderr)
        return EXIT_CONFIG
    if args.log is not None:
        import time

        try:
            if args.log == "-":
                result = who.who_at(who.records(sys.stdin), ip, port, at if at is not None else time.time())
            else:
                with open(args.log, encoding="utf-8", errors="replace") as fh:
                    result = who.who_at(who.records(fh), ip, port, at if at is not None else time.time())
        except OSError as e:
            print(f"snatgw who: cannot read {args.log}: {e}", file=sys.stderr)
            return EXIT_SYSTEM
        print(json.dumps(result, indent=2) if args.json else show.who_log(result))
        return 0

    path = _socket_path(args)
    params: dict[str, Any] = {"public_ip": ip, "port": port}
    if args.proto is not None:
        params["proto"] = args.proto
    live = _ask(path, "who", params)
    if live is None:
        return EXIT_SYSTEM
    print(json.dumps(live, indent=2) if args.json else show.who(live))
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    try:
        load(args.config)
    except ConfigError as e:
        print(f"snatgw: invalid config {e}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"{args.config}: ok")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="snatgw", description="Userspace SNAT/PAT gateway")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the gateway in this network namespace")
    r.add_argument("--config", "-c", required=True, help="TOML configuration file")
    r.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics here (default: off)")
    r.add_argument(
        "--control-socket", metavar="PATH", help="control socket (default: gateway.control_socket)"
    )
    r.set_defaults(func=_cmd_run)
    c = sub.add_parser("check", help="validate a configuration file and exit")
    c.add_argument("--config", "-c", required=True)
    c.set_defaults(func=_cmd_check)
    from gateway import show

    views: tuple[tuple[str, str, Callable[[Any], str]], ...] = (
        ("flows", "live translations, like conntrack -L, with direction and admitting rule", show.flows),
        ("ports", "SNAT ports per backend: block, in use, peak, top destinations, exhaustion", show.ports),
        ("rules", "each backend's effective security rules, defaults included, with hit counts", show.rules),
        ("stats", "packet, drop and flow counters", show.stats),
        ("status", "config, uptime, queue, public addresses, pools with their tier, probe health",
         show.status),
        ("reload", "re-read the config file (as SIGHUP does) and say what changed", show.reload),
    )
    for name, text, render in views:
        v = sub.add_parser(name, help=text)
        v.add_argument(
            "--socket",
            metavar="PATH",
            help=f"control socket (default: $SNATGW_SOCKET or {DEFAULT_CONTROL_SOCKET})",
        )
        v.add_argument("--json", action="store_true", help="print the gateway's answer as JSON")
        if name in ("flows", "ports", "rules"):
            v.add_argument("--backend", metavar="IP", help="only this backend")
        if name == "flows":
            v.add_argument("--proto", choices=("tcp", "udp", "icmp"), help="only this protocol")
        v.set_defaults(func=_operator_command(name, render))
    w = sub.add_parser(
        "who",
        help="which backend holds (or held, with --at and --log) a public IP:PORT, and its flows on it",
    )
    w.add_argument("endpoint", metavar="PUBLIC_IP:PORT")
    w.add_argument("--proto", choices=("tcp", "udp", "icmp"), help="only flows of this protocol (live)")
    w.add_argument("--at", metavar="TIME", help="ISO 8601 time or Unix seconds (needs --log)")
    w.add_argument(
        "--log", metavar="FILE", help="the gateway's JSON log to read ('-': stdin); default: ask the gateway"
    )
    w.add_argument(
        "--socket",
        metavar="PATH",
        help=f"control socket (default: $SNATGW_SOCKET or {DEFAULT_CONTROL_SOCKET})",
    )
    w.add_argument("--json", action="store_true", help="print the answer as JSON")
    w.set_defaults(func=_cmd_who)
    try:
        from gateway.lab.cli import add_lab_parser
    except ImportError:
        pass
    else:
        add_lab_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
