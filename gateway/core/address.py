"""Public addresses and the backends that leave through them (docs/model.md,
"Words" and "Scenarios").

A :class:`PublicAddress` is a frontend, an instance IP or a default SNAT
address; it knows its backends and, for the PAT scenarios, where each one's
block lies and which tier it is in. A :class:`Backend` is one private source
address, its scenario, its public address and its block. Both types live in
this one module because each refers to the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum, StrEnum

from gateway.core.block import BlockLayout, PortBlock
from gateway.core.flow import Flow
from gateway.core.tier import TIERS, ports_per_backend


class Scenario(IntEnum):
    """Which public address a backend's flows leave with; 1 wins over 2 over 3."""

    INSTANCE_IP = 1
    LB = 2
    DEFAULT = 3

    @property
    def label(self) -> str:
        """How the operator's view names it (``snatgw flows``, ``ports``)."""
        return _SCENARIO_LABELS[self]


_SCENARIO_LABELS = {Scenario.INSTANCE_IP: "instance_ip", Scenario.LB: "lb", Scenario.DEFAULT: "default"}
#: The operator's names by scenario number (rows of the views carry plain ints).
SCENARIO_NAMES: dict[int, str] = {s.value: s.label for s in Scenario}


class AddressKind(StrEnum):
    """What a public address is for."""

    FRONTEND = "frontend"
    INSTANCE_IP = "instance_ip"
    DEFAULT_SNAT = "default_snat"


@dataclass(slots=True)
class EventGate:
    """At most one event per interval, counting the ones it holds back (reported
    as ``suppressed`` in the next event that passes)."""

    last: float = float("-inf")
    suppressed: int = 0

    def admit(self, now: float, interval: float) -> bool:
        """Whether an event may go out at ``now``; if so the caller emits it with
        :attr:`suppressed` and then calls :meth:`sent`."""
        if now - self.last < interval:
            self.suppressed += 1
            return False
        return True

    def sent(self, now: float) -> None:
        self.last = now
        self.suppressed = 0


def ip_str(ip: int) -> str:
    """Dotted quad of ``ip`` (ten times faster than ``ipaddress`` for big snapshots)."""
    return f"{ip >> 24}.{ip >> 16 & 255}.{ip >> 8 & 255}.{ip & 255}"


@dataclass(slots=True, eq=False)
class PublicAddress:
    """One address the gateway owns on the outside.

    ``layout`` is None for an instance IP: its one backend keeps its own
    source ports (scenario 1, no port masquerading).
    """

    ip: int
    kind: AddressKind
    name: str = ""
    layout: BlockLayout | None = None
    members: dict[int, Backend] = field(default_factory=dict)

    @property
    def block_size(self) -> int:
        return self.layout.size if self.layout is not None else 0

    @property
    def tier(self) -> int:
        """1 for the first row of the tier table (1-50 backends, 1024 ports), 0 without blocks."""
        for i, (_limit, size) in enumerate(TIERS, 1):
            if size == self.block_size:
                return i
        return 0


def new_pat_address(
    ip: int, kind: AddressKind, name: str, excluded: frozenset[int], backends: int
) -> PublicAddress:
    """A PAT address (frontend or default SNAT) with an empty layout in the tier for ``backends``."""
    return PublicAddress(ip, kind, name, BlockLayout(ports_per_backend(backends), excluded))


@dataclass(slots=True, eq=False)
class Backend:
    """One private source address and the public address and block it uses."""

    ip: int
    scenario: Scenario
    address: PublicAddress
    block: PortBlock | None
    pool: str = ""
    #: The backend's flows, oldest first, as a list cleaned lazily (docs/decisions.md,
    #: "Compact flows"): an ended flow stays until :meth:`compact` (run by ``end_flow``
    #: once ended ones pass a quarter of the live ones); ``flow_count`` is the live ones.
    flow_list: list[Flow] = field(default_factory=list)
    flow_count: int = 0
    #: Flows created, and new flows that failed for want of a port (the
    #: "attempted" and "failed" SNAT connection counts are created + exhausted
    #: and exhausted).
    created: int = 0
    exhausted: int = 0
    last_exhausted: float = float("-inf")
    #: Rate limit of ``snat_port_exhausted``.
    exhausted_events: EventGate = field(default_factory=EventGate)
    #: A standalone backend without flows: when its last flow ended (it gives its
    #: block back ``idle_timeout`` after that).
    vacant_since: float | None = None
    #: Flow caps (docs/decisions.md, "Flow caps"): where in ``flow_list`` the early
    #: drop looks next for the oldest flow without a reply (every live flow before it
    #: was seen replied, and a reply is never taken back), new flows refused at a
    #: cap, and the rate limit of ``flow_limit_reached``.
    drop_from: int = 0
    refused: int = 0
    refused_events: EventGate = field(default_factory=EventGate)

    @property
    def flows(self) -> list[Flow]:
        """The live flows, oldest first (a new list: O(flows of this backend))."""
        return [f for f in self.flow_list if f.live]

    def compact(self) -> None:
        """Drop ended flows from ``flow_list``, keeping ``drop_from`` on the same flow."""
        lst = self.flow_list
        self.drop_from = sum(1 for f in lst[: self.drop_from] if f.live)
        self.flow_list = [f for f in lst if f.live]
