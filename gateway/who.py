"""Who held a public ip:port at a given time, from the gateway's log (``snatgw who
--at TIME --log FILE``).

Port-block logging (RFC 6888 section 4, RFC 7422) writes one line when a
block is allocated, resized or released (``port_block_allocated``,
``port_block_resized``, ``port_block_released``) instead of one per flow;
this module replays those lines for one address and port into the intervals
during which each backend held it, and picks the one containing the time
asked about. Pure: it takes parsed records (dicts), so tests need no files.

A run of the gateway logs its allocations after ``gateway_ready``
(the packet loop flushes the core's events), so ``gateway_ready``,
``gateway_stopped`` and ``gateway_failed`` close every interval: whatever a
crashed run held is not claimed past the next start.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

BLOCK_EVENTS = ("port_block_allocated", "port_block_resized", "port_block_released")
#: Per-flow lines, only with ``log_flows = true``.
FLOW_EVENTS = ("flow_created", "flow_ended")
_FLOW_KEY = ("protocol", "backend", "backend_port", "public_ip", "public_port", "remote", "remote_port")
#: Lines after which nothing from before is held (a run starts or ends).
RUN_EDGES = ("gateway_ready", "gateway_stopped", "gateway_failed")


def parse_time(text: str) -> float:
    """Unix seconds from ``text``: a number (``1764650000``) or an ISO 8601 time
    (``2026-12-02T04:35:49Z``; without an offset it is local time, as ``date`` prints it)."""
    with contextlib.suppress(ValueError):
        return float(text)
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise ValueError(f"{text!r} is neither Unix seconds nor an ISO 8601 time") from None


def iso(ts: float) -> str:
    """``ts`` as an ISO 8601 UTC time, the way the log writes its ``timestamp``."""
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def records(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """The JSON object lines of a log (``journalctl -o cat`` output or the gateway's
    stderr); any other line is skipped."""
    for line in lines:
        line = line.strip()
        if not line.startswith("{"):
            continue
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            if isinstance(rec, dict):
                yield rec


def _time(rec: dict[str, Any]) -> float | None:
    ts = rec.get("timestamp")
    if not isinstance(ts, str):
        return None
    try:
        return datetime.fromisoformat(ts).timestamp()
    except ValueError:
        return None


def _holds(rec: dict[str, Any], port: int) -> bool:
    ranges = rec.get("ranges")
    if not isinstance(ranges, list):
        return False
    return any(isinstance(r, list) and len(r) == 2 and r[0] <= port <= r[1] for r in ranges)


@dataclass(slots=True)
class Holding:
    """``backend`` held the port from ``since`` until ``until`` (None: still, as far
    as the log goes); ``event``/``end_event`` name the lines that began and ended it."""

    backend: str
    since: float
    until: float | None
    event: str
    end_event: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "since": iso(self.since),
            "until": iso(self.until) if self.until is not None else None,
            "event": self.event,
            "end_event": self.end_event,
        }


def history(recs: Iterable[dict[str, Any]], public_ip: str, port: int) -> list[Holding]:
    """Every interval during which a backend held ``public_ip:port``, in log order.

    A block event for the address that covers the port makes its backend
    the holder (a later one wins over an earlier one, so a crash that left
    no release line cannot hide a new holder); one for the holder that no
    longer covers it, or the holder's release, ends the interval.
    """
    out: list[Holding] = []
    current: Holding | None = None

    def close(at: float, why: str) -> None:
        nonlocal current
        if current is not None:
            current.until, current.end_event = at, why
            current = None

    for rec in recs:
        name = rec.get("event")
        if name in RUN_EDGES:
            t = _time(rec)
            if t is not None:
                close(t, str(name))
            continue
        if name not in BLOCK_EVENTS or rec.get("public_ip") != public_ip:
            continue
        t = _time(rec)
        backend = rec.get("backend")
        if t is None or not isinstance(backend, str):
            continue
        covers = name != "port_block_released" and _holds(rec, port)
        if covers:
            if current is None or current.backend != backend:
                close(t, str(name))
                current = Holding(backend, t, None, str(name))
                out.append(current)
        elif current is not None and current.backend == backend:
            close(t, str(name))
    return out


def flows_at(recs: Iterable[dict[str, Any]], public_ip: str, port: int, at: float) -> list[dict[str, Any]]:
    """The flows on ``public_ip:port`` live at ``at``, from ``flow_created`` and
    ``flow_ended`` lines (written only with ``log_flows = true``); a flow with no
    end line is live until the run ends (``gateway_ready``/``stopped``/``failed``)."""
    open_: dict[tuple[Any, ...], dict[str, Any]] = {}
    out: list[dict[str, Any]] = []

    def end(key: tuple[Any, ...], t: float) -> None:
        f = open_.pop(key)
        if f["_since"] <= at < t:
            out.append(f)

    for rec in recs:
        name = rec.get("event")
        t = _time(rec)
        if t is None:
            continue
        if name in RUN_EDGES:
            for key in list(open_):
                end(key, t)
            continue
        if name not in FLOW_EVENTS or rec.get("public_ip") != public_ip or rec.get("public_port") != port:
            continue
        key = tuple(rec.get(k) for k in _FLOW_KEY)
        if name == "flow_created":
            if key in open_:
                end(key, t)
            open_[key] = {**{k: rec.get(k) for k in _FLOW_KEY}, "_since": t}
        elif key in open_:
            end(key, t)
    out += [f for f in open_.values() if f["_since"] <= at]
    return [
        {**{k: v for k, v in f.items() if k != "_since"}, "since": iso(f["_since"])}
        for f in sorted(out, key=lambda f: float(f["_since"]))
    ]


def who_at(recs: Iterable[dict[str, Any]], public_ip: str, port: int, at: float) -> dict[str, Any]:
    """Who held ``public_ip:port`` at ``at`` (Unix seconds) according to the log:
    ``holder`` (a :class:`Holding` as a dict) or None, with the neighbouring
    intervals so the operator sees who had it just before and after, and the
    flows on the port then if the log has per-flow lines."""
    recs = list(recs)
    hist = history(recs, public_ip, port)
    holder = next((h for h in hist if h.since <= at and (h.until is None or at < h.until)), None)
    before = [h for h in hist if h.until is not None and h.until <= at]
    after = [h for h in hist if h.since > at]
    return {
        "public_ip": public_ip,
        "port": port,
        "at": iso(at),
        "holder": holder.as_dict() if holder is not None else None,
        "previous": before[-1].as_dict() if before else None,
        "next": after[0].as_dict() if after else None,
        "intervals": len(hist),
        "flows": flows_at(recs, public_ip, port, at),
    }
