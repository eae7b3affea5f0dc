"""TOML text for the lab's configs: a whole document (:func:`to_toml`, what the integration
tests' ``lab_config`` writes) and sections with nested arrays of tables
(``[[security_groups]]`` with ``[[security_groups.rules]]``, ``[[cloud_services.roles]]``
with endpoints, :func:`sections`), written the way the README shows them, for tests and
scripts that build or append to a lab config.

Pure functions; only the value kinds the config schema uses (str, int, float, bool, lists,
tables).  The result of :func:`sections` is meant to be appended after every plain table
of a document: an array of tables may follow anything, a plain table cannot be reopened.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def toml_key(k: str) -> str:
    """A key: bare when TOML allows it, else a quoted (basic string) key."""
    return k if _BARE_KEY.fullmatch(k) else json.dumps(k, ensure_ascii=False)


def toml_value(v: Any) -> str:
    """One TOML value; a mapping becomes an inline table.

    Strings are JSON strings (a valid TOML basic string) with non-ASCII characters
    written as they are: JSON's ``\\ud83d\\ude00`` surrogate escapes are not TOML.
    """
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def _is_tables(v: Any) -> bool:
    return isinstance(v, list | tuple) and bool(v) and all(isinstance(x, Mapping) for x in v)


def _array_lines(key: str, items: Sequence[Mapping[str, Any]]) -> list[str]:
    lines: list[str] = []
    for item in items:
        lines += ["", f"[[{key}]]"]
        nested: list[tuple[str, Sequence[Mapping[str, Any]]]] = []
        for k, v in item.items():
            if _is_tables(v):
                nested.append((k, v))
            else:
                lines.append(f"{toml_key(k)} = {toml_value(v)}")
        for k, sub in nested:
            lines += _array_lines(f"{key}.{k}", sub)
    return lines


def array_of_tables(key: str, items: Sequence[Mapping[str, Any]]) -> str:
    """``[[key]]`` per item; a value that is a list of tables becomes ``[[key.sub]]`` tables
    right after its parent (TOML's nesting), anything else a ``k = v`` line."""
    return "\n".join(_array_lines(key, items)) + "\n"


def sections(**arrays: Sequence[Mapping[str, Any]]) -> str:
    """Several arrays of tables, e.g. ``sections(security_groups=[...], probes=[...])``."""
    return "".join(array_of_tables(k, v) for k, v in arrays.items() if v)


def to_toml(doc: Mapping[str, Any]) -> str:
    """A whole document: top-level values first, then plain tables, then arrays of tables
    (a value after a table header would belong to that table)."""
    lines: list[str] = []
    tables: list[tuple[str, Mapping[str, Any]]] = []
    arrays: list[tuple[str, Sequence[Mapping[str, Any]]]] = []
    for key, value in doc.items():
        if isinstance(value, Mapping):
            tables.append((key, value))
        elif _is_tables(value):
            arrays.append((key, value))
        else:
            lines.append(f"{toml_key(key)} = {toml_value(value)}")
    for key, table in tables:
        lines += ["", f"[{key}]"] + [f"{toml_key(k)} = {toml_value(v)}" for k, v in table.items()]
    for key, items in arrays:
        lines += _array_lines(key, items)
    return "\n".join(lines).lstrip("\n") + "\n"
