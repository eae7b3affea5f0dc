"""Pools and the scenario policy: which public address and which block a
backend's flows leave with (OUTBOUND_MODEL.md, "Scenarios").

Precedence is 1 (instance IP) over 2 (member of a pool an LB rule names) over
3 (anything else from the inside, on a default SNAT address the gateway picks).
A pool reachable through several frontends always uses the one with the
lowest address: arbitrary, as in the model, but stable while the
configuration does not change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway.core.block import CHUNK, BlockLayout, PortBlock
from gateway.core.errors import ModelError
from gateway.core.frontend import (
    KIND_DEFAULT_SNAT,
    KIND_FRONTEND,
    KIND_INSTANCE_IP,
    PublicAddress,
)
from gateway.core.model import GatewayModel
from gateway.core.tier import MAX_BACKENDS_PER_ADDRESS, ports_per_backend

if TYPE_CHECKING:
    from gateway.core.flow import Flow

SCENARIO_INSTANCE_IP = 1
SCENARIO_LB = 2
SCENARIO_DEFAULT = 3


@dataclass(slots=True, eq=False)
class Backend:
    """One private source address and the public address and block it uses."""

    ip: int
    scenario: int
    address: PublicAddress
    block: PortBlock | None
    pool: str = ""
    flows: set[Flow] = field(default_factory=set)
    #: Flows created, and new flows that failed for want of a port (the
    #: "attempted" and "failed" SNAT connection counts are created + exhausted
    #: and exhausted).
    created: int = 0
    exhausted: int = 0
    last_exhausted: float = float("-inf")
    last_event: float = float("-inf")
    suppressed: int = 0
    #: A standalone backend without flows: the last packet time of its last flow
    #: (it gives its block back ``idle_timeout`` after that).
    vacant_since: float | None = None


def ip_str(ip: int) -> str:
    """Dotted quad of ``ip`` (ten times faster than ``ipaddress`` for big snapshots)."""
    return f"{ip >> 24}.{ip >> 16 & 255}.{ip >> 8 & 255}.{ip & 255}"


def pool_frontends(model: GatewayModel) -> dict[str, str]:
    """The frontend each pool named by an LB rule leaves through (pool -> frontend name)."""
    by_name = {f.name: f for f in model.frontends}
    chosen: dict[str, str] = {}
    for rule in model.lb_rules:
        cur = chosen.get(rule.pool)
        if cur is None or by_name[rule.frontend].ip < by_name[cur].ip:
            chosen[rule.pool] = rule.frontend
    return chosen


@dataclass(frozen=True, slots=True)
class AddressPlan:
    """A public address the configuration asks for."""

    ip: int
    kind: str
    name: str = ""
    excluded: frozenset[int] = frozenset()


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a configured backend's flows leave: its scenario, public address and pool."""

    scenario: int
    public_ip: int
    pool: str = ""


@dataclass(slots=True)
class Plan:
    """The outcome of the scenario policy for a configuration (no blocks yet:
    the table lays those out, keeping what it already has on a reload)."""

    addresses: dict[int, AddressPlan]
    placements: dict[int, Placement]
    defaults: list[int]
    pool_frontend: dict[str, str]

    def members(self, public_ip: int) -> list[int]:
        """Configured backends on ``public_ip``, lowest address first."""
        return sorted(b for b, p in self.placements.items() if p.public_ip == public_ip)


def plan(model: GatewayModel) -> Plan:
    """Place every configured backend in its scenario.

    Raises :class:`ModelError` when an address would have more than 1000
    backends or its blocks do not fit in the port range.
    """
    excluded: dict[int, set[int]] = {}
    by_name = {f.name: f for f in model.frontends}
    for rule in model.lb_rules:
        excluded.setdefault(by_name[rule.frontend].ip, set()).add(rule.frontend_port)
    addresses: dict[int, AddressPlan] = {}
    for f in model.frontends:
        addresses[f.ip] = AddressPlan(f.ip, KIND_FRONTEND, f.name, frozenset(excluded.get(f.ip, ())))
    for ip in model.default_snat:
        addresses[ip] = AddressPlan(ip, KIND_DEFAULT_SNAT)
    placements: dict[int, Placement] = {}
    for inst in model.instance_ips:
        addresses[inst.public] = AddressPlan(inst.public, KIND_INSTANCE_IP)
        placements[inst.private] = Placement(SCENARIO_INSTANCE_IP, inst.public)

    chosen = pool_frontends(model)
    for pool in model.pools:
        fe = chosen.get(pool.name)
        if fe is None:
            continue
        fip = by_name[fe].ip
        for m in pool.members:
            cur = placements.get(m)
            if cur is None or (cur.scenario == SCENARIO_LB and fip < cur.public_ip):
                placements[m] = Placement(SCENARIO_LB, fip, pool.name)
    plan_ = Plan(addresses, placements, list(model.default_snat), chosen)
    for front in model.frontends:
        n = len(plan_.members(front.ip))
        key = f"frontends[{front.name}]"
        if n > MAX_BACKENDS_PER_ADDRESS:
            raise ModelError(
                key, f"{n} backends share {ip_str(front.ip)}, at most {MAX_BACKENDS_PER_ADDRESS} are allowed"
            )
        room = BlockLayout(1024, addresses[front.ip].excluded).free_chunks() * CHUNK
        if n and room < n * ports_per_backend(n):
            raise ModelError(key, f"the blocks of {n} backends do not fit in 1024-65535")
    return plan_


def pick_default(defaults: list[PublicAddress]) -> PublicAddress | None:
    """The default SNAT address for a new standalone backend: the least shared one
    that still has room (first in configuration order on a tie), or None."""
    best: PublicAddress | None = None
    for addr in defaults:
        if len(addr.members) >= MAX_BACKENDS_PER_ADDRESS:
            continue
        if best is None or len(addr.members) < len(best.members):
            best = addr
    return best
