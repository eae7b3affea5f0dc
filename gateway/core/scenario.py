"""The scenario policy: which public address each configured backend's flows
leave with (docs/model.md, "Scenarios").

Precedence is 1 (instance IP) over 2 (member of a pool an LB rule names) over
3 (anything else from the inside, on a default SNAT address the gateway picks).
A frontend's tier counts its members, or ``Frontend.tier_backends`` when that is
more (a classic cloud service's VIP is tiered by all of the service's instances).
A pool reachable through several frontends always uses the one with the
lowest address: arbitrary, as in the model, but stable while the
configuration does not change.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.core.address import AddressKind, PublicAddress, Scenario, ip_str
from gateway.core.block import CHUNK, BlockLayout
from gateway.core.errors import ModelError
from gateway.core.model import GatewayModel
from gateway.core.tier import MAX_BACKENDS_PER_ADDRESS, ports_per_backend


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
    kind: AddressKind
    name: str = ""
    excluded: frozenset[int] = frozenset()
    #: Count at least this many backends when choosing the tier (``Frontend.tier_backends``).
    tier_backends: int = 0


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a configured backend's flows leave: its scenario, public address and pool."""

    scenario: Scenario
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

    def tier_count(self, public_ip: int) -> int:
        """How many backends ``public_ip``'s tier is chosen for: its configured members, or
        the address's ``tier_backends`` when that is more (docs/model.md, "Preallocation
        by pool size"; a classic VIP counts every instance of its service)."""
        ap = self.addresses.get(public_ip)
        floor = ap.tier_backends if ap is not None else 0
        return max(len(self.members(public_ip)), floor)


def plan(model: GatewayModel) -> Plan:
    """Place every configured backend in its scenario.

    Every frontend port an LB rule or an inbound NAT rule holds is kept out of
    every block on that address, whatever the rule's protocol (a block serves
    TCP, UDP and ICMP alike). Raises :class:`ModelError` when an address would
    have more than 1000 backends or its blocks do not fit in the port range.
    """
    excluded: dict[int, set[int]] = {}
    by_name = {f.name: f for f in model.frontends}
    held = [(r.frontend, r.frontend_port) for r in model.lb_rules]
    held += [(r.frontend, r.frontend_port) for r in model.inbound_nat_rules]
    for name, port in held:
        excluded.setdefault(by_name[name].ip, set()).add(port)
    addresses: dict[int, AddressPlan] = {}
    for f in model.frontends:
        addresses[f.ip] = AddressPlan(
            f.ip, AddressKind.FRONTEND, f.name, frozenset(excluded.get(f.ip, ())), f.tier_backends
        )
    for ip in model.default_snat:
        addresses[ip] = AddressPlan(ip, AddressKind.DEFAULT_SNAT)
    placements: dict[int, Placement] = {}
    for inst in model.instance_ips:
        addresses[inst.public] = AddressPlan(inst.public, AddressKind.INSTANCE_IP)
        placements[inst.private] = Placement(Scenario.INSTANCE_IP, inst.public)

    chosen = pool_frontends(model)
    for pool in model.pools:
        fe = chosen.get(pool.name)
        if fe is None:
            continue
        fip = by_name[fe].ip
        for m in pool.members:
            cur = placements.get(m)
            if cur is None or (cur.scenario == Scenario.LB and fip < cur.public_ip):
                placements[m] = Placement(Scenario.LB, fip, pool.name)
    plan_ = Plan(addresses, placements, list(model.default_snat), chosen)
    for front in model.frontends:
        n = len(plan_.members(front.ip))
        tier = plan_.tier_count(front.ip)
        key = f"frontends[{front.name}]"
        if tier > MAX_BACKENDS_PER_ADDRESS:
            raise ModelError(
                key,
                f"{tier} backends share {ip_str(front.ip)}, at most {MAX_BACKENDS_PER_ADDRESS} are allowed",
            )
        room = BlockLayout(1024, addresses[front.ip].excluded).free_chunks() * CHUNK
        if n and room < n * ports_per_backend(tier):
            raise ModelError(key, f"the blocks of {n} backends do not fit in 1024-65535")
    return plan_


def pick_default(defaults: list[PublicAddress], cap: int = MAX_BACKENDS_PER_ADDRESS) -> PublicAddress | None:
    """The default SNAT address for a new standalone backend: the least shared one
    that still has room (fewer than ``cap`` members: 1000, or with several workers
    each one's share of it), first in configuration order on a tie; or None."""
    best: PublicAddress | None = None
    for addr in defaults:
        if len(addr.members) >= cap:
            continue
        if best is None or len(addr.members) < len(best.members):
            best = addr
    return best
