"""What the core tells the operator: small typed records with a level.

The table appends them to :attr:`TranslationTable.events`; the adapter drains
that list between two batches and logs each as ``log.<level>(name, **fields)``
(README, "Events", lists every name and key). They are rare by construction
(rate-limited or tied to a reconfiguration), never per packet.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any, ClassVar


class ReclaimReason(StrEnum):
    """Why ports went back to a public address (``ports_reclaimed``)."""

    TIER_CHANGE = "tier_change"
    BACKEND_REMOVED = "backend_removed"
    ADDRESS_REMOVED = "address_removed"
    PORT_EXCLUDED = "port_excluded"
    BACKEND_IDLE = "backend_idle"


@dataclass(frozen=True, slots=True)
class _BackendEvent:
    """About one backend's ports on its public address, for one protocol."""

    level: ClassVar[str] = "warning"

    backend: str
    public_ip: str
    protocol: str


@dataclass(frozen=True, slots=True)
class SnatPortExhausted(_BackendEvent):
    """A new flow failed: its backend had no free port for that destination
    (docs/model.md, "Exhaustion"); at most one per backend per interval."""

    name: ClassVar[str] = "snat_port_exhausted"
    destination: str
    block_size: int
    #: Failures not logged since the last event of this backend.
    suppressed: int


@dataclass(frozen=True, slots=True)
class SnatPortsHighWater(_BackendEvent):
    """A backend's ports in use for one protocol reached ``high_water`` of its block."""

    name: ClassVar[str] = "snat_ports_high_water"
    ports_in_use: int
    block_size: int
    threshold: float


@dataclass(frozen=True, slots=True)
class FlowLimitReached(_BackendEvent):
    """A new flow of this backend was refused at a flow cap (RFC 6888 REQ-5;
    docs/decisions.md, "Flow caps"); at most one per backend per minute.
    ``limit`` is ``backend`` (``max_flows_per_backend``) or ``global``
    (``max_flows``), ``max_flows`` that cap's value and ``flows`` the
    backend's live flows."""

    name: ClassVar[str] = "flow_limit_reached"
    limit: str
    max_flows: int
    flows: int
    #: Refusals not logged since the last event of this backend.
    suppressed: int


@dataclass(frozen=True, slots=True)
class _AddressEvent:
    """About every backend of one public address; ``address_name`` is the
    frontend's name ("" for a default SNAT address), logged as ``name``."""

    level: ClassVar[str] = "warning"

    public_ip: str
    address_name: str


@dataclass(frozen=True, slots=True)
class PoolTierChanged(_AddressEvent):
    """A public address moved to another tier (docs/model.md, "Resizing")."""

    name: ClassVar[str] = "pool_tier_changed"
    kind: str
    backends: int
    old_block_size: int
    new_block_size: int
    tier: int


@dataclass(frozen=True, slots=True)
class PortsReclaimed(_AddressEvent):
    """Ports went back to an address and the flows on them ended."""

    name: ClassVar[str] = "ports_reclaimed"
    reason: ReclaimReason
    backends: int
    ports: int
    flows_ended: int


#: Port ranges of a block as (first, last) pairs, in the block's order.
Ranges = tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class _PortBlockEvent:
    """Port-block logging (RFC 6888 section 4, REQ-12 and RFC 7422): one line when
    a backend's block is allocated, resized or released, so that "who held public
    ip:port at time T" is answered from the log without one line per flow. A
    block serves TCP, UDP and ICMP alike. The time is the log line's
    ``timestamp`` (the adapter logs the core's events between two packet
    batches). An instance IP's backend holds every port (``0-65535``)."""

    level: ClassVar[str] = "info"

    backend: str
    public_ip: str
    ranges: Ranges
    size: int


@dataclass(frozen=True, slots=True)
class PortBlockAllocated(_PortBlockEvent):
    """A backend got its block: at start or reload for a configured one, at its first
    packet for a standalone one (after a release it may get another)."""

    name: ClassVar[str] = "port_block_allocated"
    scenario: str
    pool: str


@dataclass(frozen=True, slots=True)
class PortBlockResized(_PortBlockEvent):
    """A block changed: a tier move halved or grew it, or an excluded port swapped a
    chunk. ``old_ranges`` are what it held before; ports in them but not in
    ``ranges`` went back to the address (their flows ended)."""

    name: ClassVar[str] = "port_block_resized"
    old_ranges: Ranges
    old_size: int
    reason: ReclaimReason


@dataclass(frozen=True, slots=True)
class PortBlockReleased(_PortBlockEvent):
    """A backend's block went back to its address (reload, address removed, idle release)."""

    name: ClassVar[str] = "port_block_released"
    reason: ReclaimReason


PortBlockEvent = PortBlockAllocated | PortBlockResized | PortBlockReleased


@dataclass(frozen=True, slots=True)
class _FlowEvent:
    """Per-flow logging, only with ``[gateway] log_flows = true`` (RFC 6888
    section 4 allows it; RFC 7422 explains why port blocks usually suffice):
    one line when a flow starts and one when it ends, never per packet. The
    ICMP echo identifier is logged as the port and the remote port is 0."""

    level: ClassVar[str] = "info"

    protocol: str
    backend: str
    backend_port: int
    public_ip: str
    public_port: int
    remote: str
    remote_port: int


@dataclass(frozen=True, slots=True)
class FlowCreated(_FlowEvent):
    """A flow got its public ip:port (also a flow restored from the state file)."""

    name: ClassVar[str] = "flow_created"


@dataclass(frozen=True, slots=True)
class FlowEnded(_FlowEvent):
    """A flow ended and gave its port back; ``reason`` as in ``flows_ended_<reason>``."""

    name: ClassVar[str] = "flow_ended"
    reason: str
    duration: float
    packets_out: int
    bytes_out: int
    packets_in: int
    bytes_in: int


@dataclass(frozen=True, slots=True)
class FlowDenied:
    """A new flow a security group (or ``inbound_default``) denied (docs/model.md,
    "Security groups"); at most one per backend and rule per minute. ``rule`` is
    the denying rule ("inbound_default" with ``group`` "" when no group covers the
    backend), ``remote`` and ``port`` the far side's address and the backend's
    port for inbound, the destination and its port for outbound."""

    name: ClassVar[str] = "flow_denied"
    level: ClassVar[str] = "warning"

    backend: str
    group: str
    rule: str
    direction: str
    protocol: str
    remote: str
    port: int
    #: Denials of this backend and rule not logged since the last event.
    suppressed: int


@dataclass(frozen=True, slots=True)
class InboundNotOpened:
    """Once at start: an inbound path that no security rule (nor ``inbound_default``)
    lets any Internet address use, so it can never deliver (docs/model.md,
    "Security groups"). ``kind`` is "lb_rule", "inbound_nat_rule", "instance_ip"
    or "endpoint"; ``rule_name`` (logged as ``name``) the rule's name (the
    public address for an instance IP); ``port`` the backend port (0 for an
    instance IP: no port of it is open)."""

    name: ClassVar[str] = "inbound_not_opened"
    level: ClassVar[str] = "warning"

    kind: str
    rule_name: str
    backend: str
    port: int
    protocol: str


@dataclass(frozen=True, slots=True)
class MemberHealthChanged:
    """An LB rule member went up or down as its health probe sees it
    (docs/model.md, "Health probes"): down after ``number_of_probes`` failed
    probes in a row (warning), up after one success (info). ``failures`` is
    the run of failures at the change (0 when it came up)."""

    name: ClassVar[str] = "member_health_changed"
    probe: str
    member: str
    port: int
    state: str
    failures: int

    @property
    def level(self) -> str:
        return "warning" if self.state == "down" else "info"


Event = (
    SnatPortExhausted
    | SnatPortsHighWater
    | FlowLimitReached
    | PoolTierChanged
    | PortsReclaimed
    | PortBlockEvent
    | FlowCreated
    | FlowEnded
    | FlowDenied
    | InboundNotOpened
    | MemberHealthChanged
)


def fields(event: Event) -> dict[str, Any]:
    """The event's keys as logged (README, "Events"): ``address_name`` is logged as ``name``."""
    out = asdict(event)
    if "address_name" in out:
        out["name"] = out.pop("address_name")
    if "rule_name" in out:
        out["name"] = out.pop("rule_name")
    if isinstance(event, PortsReclaimed | PortBlockResized | PortBlockReleased):
        out["reason"] = str(event.reason)
    return out
