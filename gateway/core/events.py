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


Event = SnatPortExhausted | SnatPortsHighWater | PoolTierChanged | PortsReclaimed


def fields(event: Event) -> dict[str, Any]:
    """The event's keys as logged (README, "Events"): ``address_name`` is logged as ``name``."""
    out = asdict(event)
    if "address_name" in out:
        out["name"] = out.pop("address_name")
    if isinstance(event, PortsReclaimed):
        out["reason"] = str(event.reason)
    return out
