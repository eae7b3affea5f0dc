"""Control requests: their arguments checked in one place, and what one table answers.

Three places answer ``snatgw flows|ports|rules|stats|who``: the single-process
gateway (:mod:`gateway.adapters.run`), every worker
(:mod:`gateway.adapters.worker`) and the supervisor, which checks a request
once, fans it out to the workers and merges their answers
(:mod:`gateway.merge`). They must refuse the same requests with the same
words and read a table the same way, so both halves live here.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from typing import Any

from gateway.adapters.control import RequestError
from gateway.core import views
from gateway.core.model import PROTO_NAMES
from gateway.core.table import TranslationTable

PROTOS = {name: num for num, name in PROTO_NAMES.items()}
#: Commands answered from the table alone (``reload`` and ``status`` need the host too).
VIEW_COMMANDS = frozenset({"flows", "ports", "rules", "stats", "who"})
_OTHER_COMMANDS = frozenset({"reload", "status"})


def ip_arg(request: dict[str, Any], key: str) -> int | None:
    """``request[key]`` as an address number; None when absent."""
    value = request.get(key)
    if value is None:
        return None
    try:
        return int(ipaddress.IPv4Address(value))
    except ValueError:
        raise RequestError(f"{key}: {value!r} is not an IPv4 address") from None


def proto_arg(request: dict[str, Any]) -> int | None:
    """``request["proto"]`` as a protocol number; None when absent."""
    name = request.get("proto")
    if name is None:
        return None
    proto = PROTOS.get(name)
    if proto is None:
        raise RequestError(f"proto: {name!r} is not one of tcp, udp, icmp")
    return proto


def parse(request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The command and its checked arguments; RequestError names the bad one."""
    cmd = request["command"]
    args: dict[str, Any] = {}
    if cmd in ("flows", "ports", "rules"):
        args["backend"] = ip_arg(request, "backend")
    if cmd == "flows":
        args["proto"] = proto_arg(request)
    elif cmd == "ports":
        top = request.get("top", 3)
        if not isinstance(top, int) or not 0 <= top <= 100:
            raise RequestError("top: must be an integer from 0 to 100")
        args["top"] = top
    elif cmd == "who":
        public = ip_arg(request, "public_ip")
        port = request.get("port")
        if public is None or type(port) is not int or not 0 <= port <= 65535:
            raise RequestError("who: needs public_ip and a port from 0 to 65535")
        args.update(public_ip=public, port=port, proto=proto_arg(request))
    elif cmd not in VIEW_COMMANDS and cmd not in _OTHER_COMMANDS:
        raise RequestError(f"unknown command {cmd!r}")
    return cmd, args


def view(table: TranslationTable, call: Callable[..., Any], cmd: str, args: dict[str, Any]) -> Any:
    """One of :data:`VIEW_COMMANDS` answered from ``table``, read in the loop's thread
    through ``call`` (:meth:`~gateway.adapters.loop.PacketLoop.call`)."""
    if cmd == "flows":
        records = call(lambda: views.flow_records(table, args.get("backend"), args.get("proto")))
        return views.flow_rows(records, time.monotonic())
    if cmd == "ports":
        return call(
            lambda: views.ports(table, time.monotonic(), time.time(), args.get("backend"), args.get("top", 3))
        )
    if cmd == "rules":
        return call(lambda: views.rules(table, args.get("backend")))
    if cmd == "stats":
        return call(lambda: views.stats(table))
    if cmd == "who":
        return call(
            lambda: views.who(table, args["public_ip"], args["port"], time.monotonic(), args.get("proto"))
        )
    raise ValueError(f"not a view command: {cmd!r}")
