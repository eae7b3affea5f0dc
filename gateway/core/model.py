"""The operator's intent as plain data: frontends, pools, LB rules, instance
IPs, default SNAT addresses and timeouts (docs/model.md, "Words").

:func:`gateway.config.load` builds a :class:`GatewayModel` from TOML; the
core takes it as given and derives everything else (scenarios, tiers, blocks).
Addresses are kept as ``int`` so the core never parses strings per packet.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum


class Proto(IntEnum):
    """IP protocol numbers the gateway translates (each has its own port inventory)."""

    ICMP = 1
    TCP = 6
    UDP = 17


#: Aliases for the per-packet path, where a module global is the cheapest lookup.
PROTO_ICMP, PROTO_TCP, PROTO_UDP = Proto
#: How the operator's view, events and metrics name each protocol.
PROTO_NAMES: dict[int, str] = {p.value: p.name.lower() for p in Proto}


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Flow lifetimes in seconds (docs/model.md, "Idle timeout").

    ``tcp_fin_linger`` and ``tcp_rst_linger`` are how long a TCP flow's port
    stays reserved after FIN from both sides or a RST: long enough to carry
    the last ACK and a retransmitted FIN or RST, short enough to give ports
    back quickly (see docs/decisions.md).
    """

    idle: float = 240.0
    tcp_fin_linger: float = 10.0
    tcp_rst_linger: float = 2.0


@dataclass(frozen=True, slots=True)
class Frontend:
    """A named public address of the load balancer (docs/model.md, "Words")."""

    name: str
    ip: int


@dataclass(frozen=True, slots=True)
class Pool:
    """A named set of backend addresses; an LB rule naming it gives its members
    scenario 2 (docs/model.md, "Scenarios")."""

    name: str
    members: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class LbRule:
    """Links a frontend to a pool. Only its existence matters to outbound
    traffic: it puts the pool behind the frontend, and its frontend port is
    kept out of every block on that address."""

    name: str
    frontend: str
    pool: str
    protocol: str
    frontend_port: int
    backend_port: int


@dataclass(frozen=True, slots=True)
class InstanceIp:
    """A public address of one backend's own (scenario 1, no port translation)."""

    private: int
    public: int


@dataclass(frozen=True, slots=True)
class GatewayModel:
    """Everything the translation table needs to know about the operator's setup."""

    frontends: tuple[Frontend, ...] = ()
    pools: tuple[Pool, ...] = ()
    lb_rules: tuple[LbRule, ...] = ()
    instance_ips: tuple[InstanceIp, ...] = ()
    default_snat: tuple[int, ...] = ()
    timeouts: Timeouts = field(default_factory=Timeouts)
    #: Seconds between two ``snat_port_exhausted`` events for one backend.
    exhaustion_event_interval: float = 10.0
    #: Share of a block in use (one protocol) at which ``snat_ports_high_water`` fires.
    high_water: float = 0.8
    #: One ``flow_created`` and one ``flow_ended`` event per flow (RFC 6888 section 4
    #: allows per-session logging; off by default: port-block events answer "who").
    log_flows: bool = False
    #: Flow caps (RFC 6888 REQ-5): live flows per backend and in all; at a cap a flow
    #: without a reply is dropped to make room, else the new flow is refused
    #: (docs/decisions.md, "Flow caps").
    max_flows_per_backend: int = 65536
    max_flows: int = 262144
    #: Ports drawn at random inside a block (RFC 6056); False: least recently freed first.
    random_ports: bool = True

    def public_addresses(self) -> tuple[int, ...]:
        """Every address the gateway owns on the outside, each once, in config order."""
        seen: dict[int, None] = {}
        for f in self.frontends:
            seen[f.ip] = None
        for i in self.instance_ips:
            seen[i.public] = None
        for a in self.default_snat:
            seen[a] = None
        return tuple(seen)
