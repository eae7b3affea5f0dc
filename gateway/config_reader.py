"""The pieces every part of the configuration reader shares: the one error type
and typed reads that name the key they fail on (:mod:`gateway.config`)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import Any


class ConfigError(Exception):
    """A configuration file the gateway refuses, with where and why."""

    def __init__(self, path: str, key: str, problem: str) -> None:
        super().__init__(f"{path}: {key}: {problem}")
        self.path = path
        self.key = key
        self.problem = problem


class Reader:
    """Typed reads of one TOML document that fail as :class:`ConfigError` naming the key."""

    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(self.path, key, problem)

    def table(self, value: Any, key: str, allowed: set[str], required: set[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, "must be a table")
        for k in value:
            if k not in allowed:
                raise self.fail(f"{key}.{k}" if key else k, "unknown key")
        for k in sorted(required):
            if k not in value:
                raise self.fail(f"{key}.{k}" if key else k, "missing")
        return value

    def named_tables(
        self,
        doc: dict[str, Any],
        section: str,
        keys: set[str],
        what: str = "",
        optional: frozenset[str] = frozenset(),
        parent: str = "",
    ) -> Iterator[tuple[str, dict[str, Any], str]]:
        """Each table of the array ``section`` (all of ``keys``, any of ``optional``,
        nothing else) with its key path and its ``name``; with ``what``, a name used
        twice is an error. ``parent``: the key path of ``doc`` when it is nested."""
        seen: set[str] = set()
        path = f"{parent}.{section}" if parent else section
        for i, item in enumerate(self.array(doc.get(section, []), path)):
            k = f"{path}[{i}]"
            t = self.table(item, k, keys | optional, keys)
            name = self.string(t["name"], f"{k}.name")
            if what and name in seen:
                raise self.fail(f"{k}.name", f"{what} {name!r} is defined twice")
            seen.add(name)
            yield k, t, name

    def array(self, value: Any, key: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(key, "must be an array")
        return value

    def string(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(key, "must be a non-empty string")
        return value

    def ip(self, value: Any, key: str) -> int:
        try:
            addr = ipaddress.IPv4Address(value) if isinstance(value, str) else None
        except ValueError:
            addr = None
        if addr is None:
            raise self.fail(key, f"{value!r} is not an IPv4 address")
        if (
            addr.is_unspecified
            or addr.is_multicast
            or addr.is_loopback
            or addr == ipaddress.IPv4Address("255.255.255.255")
        ):
            raise self.fail(key, f"{value} cannot be used here")
        return int(addr)

    def integer(self, value: Any, key: str, lo: int, hi: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise self.fail(key, f"must be an integer from {lo} to {hi}")
        return value

    def seconds(self, value: Any, key: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 86400:
            raise self.fail(key, "must be a number of seconds above 0 and at most 86400")
        return float(value)
