"""The data of a translation table, shared by the modules that work on it.

:class:`~gateway.core.table.TranslationTable` is one object whose code is split
by job, the way VPP splits NAT44-ED into files over one shared structure. Each
job is a class in a module of its own, and each calls only the jobs below it:

====================  =====================================================
``state``             the data (this module)
``lifecycle``         a flow starts, changes TCP state, expires, ends
``reconfigure``       reload, tier moves, excluded ports, idle release
``placement``         which backend a new inside source is, standalone placement
``inbound``           flows opened from the outside, member health
``dispatch``          with several workers: the owner of a packet without a flow
``icmp_error``        ICMP errors about a flow, both ways
``in2out``            the per-packet path from a backend to the outside
``out2in``            the per-packet path back to a backend
``table``             the whole: hairpinning, the timers and the counters' view
====================  =====================================================

A chain of classes rather than objects holding each other keeps the
per-packet path at one attribute lookup per table field, as before the split.
"""

from __future__ import annotations

from random import Random
from typing import TYPE_CHECKING

from gateway.core.address import Backend, PublicAddress
from gateway.core.counters import Counter
from gateway.core.events import Event
from gateway.core.flow import Flow
from gateway.core.header import Buffer
from gateway.core.health import HealthBook
from gateway.core.model import PROTO_ICMP, PROTO_TCP, PROTO_UDP, GatewayModel
from gateway.core.security import SecurityPolicy
from gateway.core.shard import Shard
from gateway.core.wheel import TimerWheel

if TYPE_CHECKING:
    from gateway.core.inbound import InboundTarget

__all__ = ["Buffer", "FlowMap", "TableState"]

#: Flows of one protocol by one of their keys.
FlowMap = dict[bytes, Flow]


class TableState:
    """Every field of the table; no behaviour.

    ``inside[proto]`` maps inside keys (what an in2out packet carries) to
    flows, ``outside[proto]`` outside keys (what an out2in packet carries);
    every flow is in both, under the keys it owns (:mod:`gateway.core.flow`).
    """

    #: The compiled security groups of the current configuration (set by the
    #: first ``reconfigure``, rebuilt by every reload).
    security: SecurityPolicy

    def __init__(
        self, model: GatewayModel, now: float, rng: Random | None = None, shard: Shard | None = None
    ) -> None:
        self.model = model
        #: Which part of the traffic this table owns when the gateway runs several
        #: workers (:mod:`gateway.core.shard`); ``Shard(0, 1)`` owns everything.
        self.shard = shard if shard is not None else Shard()
        #: The table's own random source (port choice, docs/decisions.md "Port choice"):
        #: passed in so tests are deterministic; never the module-global one.
        self.rng = rng if rng is not None else Random()
        self.timeouts = model.timeouts
        self.addresses: dict[int, PublicAddress] = {}
        self.backends: dict[int, Backend] = {}
        #: The default SNAT addresses, in configuration order (scenario 3).
        self.defaults: list[PublicAddress] = []
        self.pool_frontend: dict[str, str] = {}
        self.wheel = TimerWheel(now)
        self.counters = [0] * len(Counter)
        self.events: list[Event] = []
        self.tier_changes = 0
        #: Standalone backends whose last flow ended, and the earliest time one may go.
        self._vacant: dict[int, Backend] = {}
        self._vacant_due = float("inf")
        #: When each PAT address last changed tier, for the rate limit on moves into a
        #: lower tier; addresses moved by a placement wait in ``_tier_unstamped`` for
        #: the packet's time (``reconfigure``).
        self._tier_changed: dict[int, float] = {}
        self._tier_unstamped: list[int] = []
        #: Live flows (the global flow cap counts against it), and the backend that
        #: held the most flows when last looked for (``_hog_at``; docs/decisions.md, "Flow caps").
        self.flows_live = 0
        #: One bytes object per 4-byte address the flows name (public and backend
        #: addresses): flows share it instead of holding a copy each (docs/decisions.md,
        #: "Compact flows"). Grows with the addresses ever used, never per flow.
        self._ip_bytes: dict[bytes, bytes] = {}
        self._hog: Backend | None = None
        self._hog_at = float("-inf")
        self.inside: dict[int, FlowMap] = {PROTO_TCP: {}, PROTO_UDP: {}, PROTO_ICMP: {}}
        self.outside: dict[int, FlowMap] = {PROTO_TCP: {}, PROTO_UDP: {}, PROTO_ICMP: {}}
        self._tcp_inside = self.inside[PROTO_TCP]
        self._udp_inside = self.inside[PROTO_UDP]
        self._icmp_inside = self.inside[PROTO_ICMP]
        self._tcp_outside = self.outside[PROTO_TCP]
        self._udp_outside = self.outside[PROTO_UDP]
        self._icmp_outside = self.outside[PROTO_ICMP]
        #: The ``inbound_not_opened`` events already emitted (once each, docs/model.md
        #: "Security groups"); a reload emits only the ones it adds.
        self._unopened: frozenset[Event] = frozenset()
        #: What serves each (protocol, public address, port) from the outside, and the
        #: instance IPs (public -> private): :mod:`gateway.core.inbound`, rebuilt by reloads.
        self.inbound_index: dict[tuple[int, int, int], InboundTarget] = {}
        self.instance_inbound: dict[int, int] = {}
        #: LB rule members' health (:mod:`gateway.core.health`; never saved).
        self.health = HealthBook()
