"""The ``snatgw`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gateway.config import ConfigError, load

EXIT_CONFIG = 2
EXIT_SYSTEM = 1


def _cmd_run(args: argparse.Namespace) -> int:
    try:
        cfg = load(args.config)
    except ConfigError as e:
        print(f"snatgw: invalid config {e}", file=sys.stderr)
        return EXIT_CONFIG
    from gateway.adapters import system
    from gateway.adapters.logs import configure
    from gateway.adapters.run import run

    for key, name in (("gateway.inside", cfg.inside), ("gateway.outside", cfg.outside)):
        try:
            system.interface_index(name)
        except LookupError as e:
            print(f"snatgw: invalid config {cfg.path}: {key}: {e}", file=sys.stderr)
            return EXIT_CONFIG
    log = configure()
    try:
        return run(cfg, log)
    except (OSError, RuntimeError) as e:
        log.error("gateway_failed", error=str(e))
        return EXIT_SYSTEM


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
    r.set_defaults(func=_cmd_run)
    c = sub.add_parser("check", help="validate a configuration file and exit")
    c.add_argument("--config", "-c", required=True)
    c.set_defaults(func=_cmd_check)
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
