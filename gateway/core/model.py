"""The operator's intent as plain data: frontends, pools, LB rules, instance
IPs, default SNAT addresses and timeouts (docs/model.md, "Words").

:func:`gateway.config.load` builds a :class:`GatewayModel` from TOML; the
core takes it as given and derives everything else (scenarios, tiers, blocks).
Addresses are kept as ``int`` so the core never parses strings per packet.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum, StrEnum


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
    """A named public address of the load balancer (docs/model.md, "Words").

    ``tier_backends``: count at least this many backends when choosing the
    address's tier (a classic cloud service's VIP is tiered by all of the
    service's instances, not only those that leave through it); 0: its members.
    """

    name: str
    ip: int
    tier_backends: int = 0


@dataclass(frozen=True, slots=True)
class Pool:
    """A named set of backend addresses; an LB rule naming it gives its members
    scenario 2 (docs/model.md, "Scenarios")."""

    name: str
    members: tuple[int, ...]


class Distribution(StrEnum):
    """How an LB rule picks a member for a new inbound flow (docs/model.md, "Inbound")."""

    #: Hash of the 5-tuple (source ip and port, destination ip and port, protocol).
    DEFAULT = "default"
    #: Hash of source and destination ip (client affinity).
    SOURCE_IP = "source_ip"
    #: Hash of source ip, destination ip and protocol.
    SOURCE_IP_PROTOCOL = "source_ip_protocol"


@dataclass(frozen=True, slots=True)
class LbRule:
    """Links a frontend to a pool, both ways.

    Outbound, its existence puts the pool behind the frontend (scenario 2), and
    its frontend port is kept out of every block on that address. Inbound, a
    new flow to ``frontend:frontend_port`` goes to a healthy member's
    ``backend_port`` (``probe`` names the health probe; "" = every member is
    healthy). ``protocol`` is "tcp", "udp" or "all". ``opening``: a classic
    cloud-service endpoint, open to the internet unless a security group
    denies it (``inbound_default`` does not apply).
    """

    name: str
    frontend: str
    pool: str
    protocol: str
    frontend_port: int
    backend_port: int
    distribution: Distribution = Distribution.DEFAULT
    probe: str = ""
    idle_timeout: float = 240.0
    opening: bool = False


@dataclass(frozen=True, slots=True)
class Probe:
    """A health probe (docs/model.md, "Health probes"): the gateway connects to each
    member's ``port`` every ``interval`` seconds from the AzureLoadBalancer
    address; ``number_of_probes`` failures in a row mark a member down, one
    success marks it up. ``protocol`` is "tcp" (the connection opens) or
    "http" (``GET path`` answers 200)."""

    name: str
    protocol: str
    port: int
    path: str = "/"
    interval: float = 5.0
    number_of_probes: int = 2


@dataclass(frozen=True, slots=True)
class InboundNatRule:
    """One port of a frontend forwarded to one backend (``50001 -> 10.10.1.1:22``).
    ``protocol`` is "tcp" or "udp"."""

    name: str
    frontend: str
    protocol: str
    frontend_port: int
    backend: int
    backend_port: int


class Direction(StrEnum):
    """Which way a security rule looks: at flows a backend opens, or flows opened to it."""

    INBOUND = "inbound"
    OUTBOUND = "outbound"


class Tag(StrEnum):
    """Service tags a security rule may name instead of addresses (docs/model.md,
    "Security groups")."""

    ANY = "*"
    #: Every address outside ``address_space``.
    INTERNET = "Internet"
    #: ``address_space``.
    VIRTUAL_NETWORK = "VirtualNetwork"
    #: The address the health probes come from (``probe_source``).
    AZURE_LOAD_BALANCER = "AzureLoadBalancer"


#: An inclusive range of IPv4 addresses or ports, as integers.
Span = tuple[int, int]
#: One address term of a rule: a tag, or an inclusive address range (an address or CIDR).
AddressTerm = Tag | Span


@dataclass(frozen=True, slots=True)
class SecurityRule:
    """One rule of a security group, as written (tags unresolved; the core
    compiles it, docs/model.md "Security groups"). ``protocol`` is 0 for "*",
    else 1, 6 or 17. Port lists are inclusive ranges; ``((0, 65535),)`` is "*"."""

    name: str
    priority: int
    direction: Direction
    allow: bool
    protocol: int
    sources: tuple[AddressTerm, ...]
    source_ports: tuple[Span, ...]
    destinations: tuple[AddressTerm, ...]
    destination_ports: tuple[Span, ...]


@dataclass(frozen=True, slots=True)
class SecurityGroup:
    """A network security group and what it is attached to.

    A group attached to a pool or a backend address is that backend's "NIC"
    group; attached to a prefix, the "subnet" group of every backend in it.
    A backend has at most one of each (the config rejects more).
    """

    name: str
    rules: tuple[SecurityRule, ...] = ()
    pools: tuple[str, ...] = ()
    backends: tuple[int, ...] = ()
    prefixes: tuple[Span, ...] = ()


class RoleKind(StrEnum):
    """Classic cloud-service role kinds (docs/model.md, "Classic cloud services")."""

    WEB = "web"
    WORKER = "worker"
    VM = "vm"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A classic input endpoint: ``vip:public_port`` to each instance's ``local_port``."""

    protocol: str
    public_port: int
    local_port: int


@dataclass(frozen=True, slots=True)
class Role:
    """A classic role: its instances' private addresses and its input endpoints."""

    name: str
    kind: RoleKind
    instances: tuple[int, ...]
    endpoints: tuple[Endpoint, ...] = ()


@dataclass(frozen=True, slots=True)
class CloudService:
    """A classic cloud service, kept for the operator's view. The config turns it
    into the model's own words: its VIP is a frontend (``tier_backends`` = all
    instances), each role with endpoints a pool, each endpoint an LB rule with
    ``opening`` set; a role without endpoints is left to default SNAT."""

    name: str
    vip: int
    roles: tuple[Role, ...] = ()


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
    probes: tuple[Probe, ...] = ()
    inbound_nat_rules: tuple[InboundNatRule, ...] = ()
    security_groups: tuple[SecurityGroup, ...] = ()
    cloud_services: tuple[CloudService, ...] = ()
    #: The VirtualNetwork tag. The config leaves it empty when not given; the
    #: adapter fills in the inside interface's prefixes before the table is built.
    address_space: tuple[Span, ...] = ()
    #: Unsolicited inbound to a backend no security group covers: False = dropped
    #: ("deny", Azure's Standard SKU), True = let through ("allow", Basic SKU).
    inbound_default_allow: bool = False
    #: The AzureLoadBalancer tag: where health probes come from. 0 in the config
    #: when not given; the adapter fills in the gateway's inside address.
    probe_source: int = 0

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
