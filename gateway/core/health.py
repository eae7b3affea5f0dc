"""Health of LB rule members, from the probe results the adapter reports
(docs/model.md, "Health probes").

Pure: the adapter's prober thread connects and hands each outcome to
:meth:`~gateway.core.inbound.Inbound.probe_result` with ``now``; this module
holds the state of every (probe, member) pair and the rules that move it, in
one place:

==========  =========  ====================================================
state       result     next
==========  =========  ====================================================
down        success    up (event ``member_health_changed``, info)
down        failure    down, failures + 1
up          success    up, failures back to 0
up          failure    failures + 1; down at ``number_of_probes`` in a row
                       (event ``member_health_changed``, warning)
==========  =========  ====================================================

A pair starts down (the article: a member receives nothing until its first
successful probe) and nothing of it is saved across a restart. A reload
keeps the state of every pair that stays.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.core.address import ip_str
from gateway.core.events import MemberHealthChanged
from gateway.core.model import GatewayModel, Probe

#: A probed pair: the probe's name and the member's address.
PairKey = tuple[str, int]


@dataclass(slots=True)
class MemberHealth:
    """One member as one probe sees it."""

    up: bool
    #: When the state last changed (the table's clock; a new pair: when it appeared).
    since: float
    #: Failures in a row (0 after a success).
    failures: int = 0
    #: Results seen since the pair appeared.
    results: int = 0


def probe_pairs(model: GatewayModel) -> dict[PairKey, Probe]:
    """Every (probe, member) the configuration asks to probe: the members of each
    pool an LB rule with a probe names, in rule then address order, each pair once."""
    probes = {p.name: p for p in model.probes}
    pools = {p.name: p for p in model.pools}
    out: dict[PairKey, Probe] = {}
    for rule in model.lb_rules:
        probe = probes.get(rule.probe)
        pool = pools.get(rule.pool)
        if probe is None or pool is None:
            continue
        for m in sorted(pool.members):
            out.setdefault((probe.name, m), probe)
    return out


def next_health(h: MemberHealth, ok: bool, number_of_probes: int, now: float) -> bool:
    """Apply one probe result to ``h`` (the table in this module's docstring);
    True when the member changed state."""
    h.results += 1
    if ok:
        h.failures = 0
        if h.up:
            return False
        h.up = True
        h.since = now
        return True
    h.failures += 1
    if h.up and h.failures >= number_of_probes:
        h.up = False
        h.since = now
        return True
    return False


class HealthBook:
    """The health of every probed pair of one configuration."""

    def __init__(self) -> None:
        self.pairs: dict[PairKey, MemberHealth] = {}
        self.probes: dict[PairKey, Probe] = {}
        #: Probes with at least one pair (an LB rule naming another probe has none:
        #: all its members count as healthy).
        self.names: set[str] = set()
        #: Every probed member address.
        self.members: set[int] = set()

    def reload(self, pairs: dict[PairKey, Probe], now: float) -> None:
        """Take a configuration's pairs: those that stay keep their state, new ones
        start down, the others are forgotten."""
        self.pairs = {k: self.pairs.get(k) or MemberHealth(False, now) for k in pairs}
        self.probes = dict(pairs)
        self.names = {name for name, _m in pairs}
        self.members = {m for _name, m in pairs}

    def is_up(self, probe: str, member: int) -> bool:
        h = self.pairs.get((probe, member))
        return h is not None and h.up

    def record(self, probe: str, member: int, ok: bool, now: float) -> MemberHealthChanged | None:
        """One probe result; the event when the member changed state (None otherwise,
        and for a pair the configuration does not probe: a result that raced a reload)."""
        key = (probe, member)
        h = self.pairs.get(key)
        if h is None:
            return None
        p = self.probes[key]
        if not next_health(h, ok, p.number_of_probes, now):
            return None
        return MemberHealthChanged(
            probe=probe,
            member=ip_str(member),
            port=p.port,
            state="up" if h.up else "down",
            failures=h.failures,
        )
