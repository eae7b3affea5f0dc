"""Pools and the scenario policy: which public address and which block a
backend's flows leave with (OUTBOUND_MODEL.md, "Scenarios").

Precedence is 1 (instance IP) over 2 (member of a pool an LB rule names) over
3 (anything else from the inside, on a default SNAT address the gateway picks).
A pool reachable through several frontends always uses the one with the
lowest address: arbitrary, as in the model, but stable while the
configuration does not change.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway.core.block import PortBlock
from gateway.core.errors import ModelError
from gateway.core.frontend import (
    KIND_DEFAULT_SNAT,
    KIND_FRONTEND,
    KIND_INSTANCE_IP,
    PublicAddress,
    new_pat_address,
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
    exhausted: int = 0
    last_exhausted: float = float("-inf")
    last_event: float = float("-inf")
    suppressed: int = 0


def ip_str(ip: int) -> str:
    return str(ipaddress.IPv4Address(ip))


def pool_frontends(model: GatewayModel) -> dict[str, str]:
    """The frontend each pool named by an LB rule leaves through (pool -> frontend name)."""
    by_name = {f.name: f for f in model.frontends}
    chosen: dict[str, str] = {}
    for rule in model.lb_rules:
        cur = chosen.get(rule.pool)
        if cur is None or by_name[rule.frontend].ip < by_name[cur].ip:
            chosen[rule.pool] = rule.frontend
    return chosen


@dataclass(slots=True)
class Resolution:
    """The outcome of the scenario policy for a configuration."""

    addresses: dict[int, PublicAddress]
    backends: dict[int, Backend]
    defaults: list[PublicAddress]
    pool_frontend: dict[str, str]


def resolve(model: GatewayModel) -> Resolution:
    """Place every configured backend in its scenario and lay out the blocks.

    Raises :class:`ModelError` when an address would have more than 1000
    backends or its blocks do not fit in the port range.
    """
    excluded: dict[int, set[int]] = {}
    by_name = {f.name: f for f in model.frontends}
    for rule in model.lb_rules:
        excluded.setdefault(by_name[rule.frontend].ip, set()).add(rule.frontend_port)
    addresses: dict[int, PublicAddress] = {}
    for f in model.frontends:
        addresses[f.ip] = new_pat_address(f.ip, KIND_FRONTEND, f.name, frozenset(excluded.get(f.ip, ())))
    defaults = []
    for ip in model.default_snat:
        addr = new_pat_address(ip, KIND_DEFAULT_SNAT, "", frozenset())
        addresses[ip] = addr
        defaults.append(addr)
    backends: dict[int, Backend] = {}
    for inst in model.instance_ips:
        addr = PublicAddress(inst.public, KIND_INSTANCE_IP)
        addresses[inst.public] = addr
        be = Backend(inst.private, SCENARIO_INSTANCE_IP, addr, None)
        addr.members[inst.private] = be
        backends[inst.private] = be

    chosen = pool_frontends(model)
    best: dict[int, tuple[int, str, str]] = {}
    for pool in model.pools:
        fe = chosen.get(pool.name)
        if fe is None:
            continue
        fip = by_name[fe].ip
        for m in pool.members:
            if m in backends:
                continue
            cur = best.get(m)
            if cur is None or fip < cur[0]:
                best[m] = (fip, fe, pool.name)
    members: dict[str, list[tuple[int, str]]] = {}
    for m, (_fip, fe, pool_name) in best.items():
        members.setdefault(fe, []).append((m, pool_name))
    for fe_name, mlist in members.items():
        addr = addresses[by_name[fe_name].ip]
        key = f"frontends[{fe_name}]"
        if len(mlist) > MAX_BACKENDS_PER_ADDRESS:
            raise ModelError(
                key,
                f"{len(mlist)} backends share {ip_str(addr.ip)}, "
                f"at most {MAX_BACKENDS_PER_ADDRESS} are allowed",
            )
        assert addr.layout is not None
        addr.layout.size = ports_per_backend(len(mlist))
        for ip, pool_name in sorted(mlist):
            start = addr.layout.assign(ip)
            if start < 0:
                raise ModelError(key, f"the blocks of {len(mlist)} backends do not fit in 1024-65535")
            be = Backend(ip, SCENARIO_LB, addr, PortBlock(addr.ip, start, addr.layout.size), pool_name)
            addr.members[ip] = be
            backends[ip] = be
    return Resolution(addresses, backends, defaults, chosen)


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
