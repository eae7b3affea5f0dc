"""TOML text for config sections with nested arrays of tables (``[[security_groups]]`` with
``[[security_groups.rules]]``, ``[[cloud_services.roles]]`` with endpoints), written the way
the README shows them, for tests and scripts that append such sections to a lab config.

Pure functions; only the value kinds the config schema uses (str, int, float, bool, lists,
tables).  The result is meant to be appended after every plain table of a document: an
array of tables may follow anything, a plain table cannot be reopened.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any


def toml_value(v: Any) -> str:
    """One TOML value; a mapping becomes an inline table."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def _is_tables(v: Any) -> bool:
    return isinstance(v, list | tuple) and bool(v) and all(isinstance(x, Mapping) for x in v)


def array_of_tables(key: str, items: Sequence[Mapping[str, Any]]) -> str:
    """``[[key]]`` per item; a value that is a list of tables becomes ``[[key.sub]]`` tables
    right after its parent (TOML's nesting), anything else a ``k = v`` line."""
    lines: list[str] = []
    for item in items:
        lines += ["", f"[[{key}]]"]
        nested: list[tuple[str, Sequence[Mapping[str, Any]]]] = []
        for k, v in item.items():
            if _is_tables(v):
                nested.append((k, v))
            else:
                lines.append(f"{k} = {toml_value(v)}")
        for k, sub in nested:
            lines.append(array_of_tables(f"{key}.{k}", sub).rstrip("\n"))
    return "\n".join(lines) + "\n"


def sections(**arrays: Sequence[Mapping[str, Any]]) -> str:
    """Several arrays of tables, e.g. ``sections(security_groups=[...], probes=[...])``."""
    return "".join(array_of_tables(k, v) for k, v in arrays.items() if v)
