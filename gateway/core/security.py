"""Network security groups, Azure's semantics (docs/model.md, "Security groups").

A :class:`SecurityPolicy` is built from a :class:`~gateway.core.model.GatewayModel`
at load and at every reload: each group's rules, with Azure's six default rules
below them, are compiled into sorted integer ranges (tags resolved against
``address_space`` and ``probe_source``). It is asked once per new flow, never
per packet of an existing flow; the flow keeps the :class:`Decision`.

How a group is matched (a bit-vector classifier, Lakshman and Stiliadis,
SIGCOMM 1998): a group's rules for one direction are numbered in priority
order, bit 0 first. Each of the four dimensions (source and destination
address, source and destination port) is cut at every rule's range edges into
pieces on which the same rules match; each piece carries the bit set of those
rules. A flow is one bisect per dimension and an AND of four bit sets and the
protocol's; the lowest set bit is the first matching rule. The cost does not
grow with the number of rules (a few microseconds for a hundred); the default
DenyAll rule matches everything, so the set is never empty.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from gateway.core.address import EventGate, ip_str
from gateway.core.events import FlowDenied, InboundNotOpened
from gateway.core.model import (
    PROTO_NAMES,
    AddressTerm,
    Direction,
    GatewayModel,
    SecurityGroup,
    SecurityRule,
    Span,
    Tag,
)

MAX_IP = 0xFFFFFFFF
MAX_PORT = 0xFFFF
ALL_PORTS: tuple[Span, ...] = ((0, MAX_PORT),)
#: A denial event per backend and rule at most this often (seconds).
DENIAL_EVENT_INTERVAL = 60.0
#: Distinct (backend, rule) denial counts kept. Sources a subnet group covers are
#: any address of its prefix (an inside host may spoof them), so past this many
#: the denials count under backend 0 (0.0.0.0, "other backends") and share one
#: event gate per rule: memory, metric series and events stay bounded.
DENIAL_KEYS_LIMIT = 4096
#: Group lookups of unconfigured sources kept (a cache of a cheap bisect; cleared when full).
CACHE_LIMIT = 65536
#: Protocols whose flows carry ports; any other (ICMP among them) matches only rules
#: whose port ranges are both "*" (docs/decisions.md, "Security groups").
PORTED = (6, 17)

_IN, _OUT = Direction.INBOUND, Direction.OUTBOUND

#: Azure's default rules, below every group's own (docs/model.md, "Security groups").
DEFAULT_RULES: tuple[SecurityRule, ...] = (
    SecurityRule("AllowVnetInBound", 65000, _IN, True, 0, (Tag.VIRTUAL_NETWORK,), ALL_PORTS,
                 (Tag.VIRTUAL_NETWORK,), ALL_PORTS),
    SecurityRule("AllowAzureLoadBalancerInBound", 65001, _IN, True, 0, (Tag.AZURE_LOAD_BALANCER,), ALL_PORTS,
                 (Tag.ANY,), ALL_PORTS),
    SecurityRule("DenyAllInBound", 65500, _IN, False, 0, (Tag.ANY,), ALL_PORTS, (Tag.ANY,), ALL_PORTS),
    SecurityRule("AllowVnetOutBound", 65000, _OUT, True, 0, (Tag.VIRTUAL_NETWORK,), ALL_PORTS,
                 (Tag.VIRTUAL_NETWORK,), ALL_PORTS),
    SecurityRule("AllowInternetOutBound", 65001, _OUT, True, 0, (Tag.ANY,), ALL_PORTS,
                 (Tag.INTERNET,), ALL_PORTS),
    SecurityRule("DenyAllOutBound", 65500, _OUT, False, 0, (Tag.ANY,), ALL_PORTS, (Tag.ANY,), ALL_PORTS),
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class RuleRef:
    """One compiled rule and where it came from; ``index`` into :attr:`SecurityPolicy.hits`."""

    group: str
    name: str
    priority: int
    direction: Direction
    allow: bool
    #: One of Azure's six default rules (AllowVnetInBound, ...).
    default: bool
    index: int


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome for one new flow: allowed or not, and the rules that decided
    it in evaluation order (inbound: subnet group then NIC group; outbound: NIC
    then subnet). Empty ``rules``: no group covers the backend (``label`` says
    "no group", "inbound_default" or "opening")."""

    allowed: bool
    rules: tuple[RuleRef, ...]
    label: str


NO_GROUP = Decision(True, (), "no group")
INBOUND_DEFAULT_ALLOW = Decision(True, (), "inbound_default")
INBOUND_DEFAULT_DENY = Decision(False, (), "inbound_default")
OPENING = Decision(True, (), "opening")


def merge(spans: Iterable[Span]) -> tuple[Span, ...]:
    """Sorted, disjoint, non-adjacent inclusive ranges covering the same integers."""
    out: list[Span] = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1] + 1:
            if e > out[-1][1]:
                out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return tuple(out)


def complement(spans: tuple[Span, ...], top: int) -> tuple[Span, ...]:
    """The integers of ``0..top`` outside merged ``spans``."""
    out: list[Span] = []
    nxt = 0
    for s, e in spans:
        if s > nxt:
            out.append((nxt, s - 1))
        nxt = e + 1
    if nxt <= top:
        out.append((nxt, top))
    return tuple(out)


def contains(spans: tuple[Span, ...], starts: Sequence[int], x: int) -> bool:
    """Whether ``x`` lies in merged ``spans`` (``starts``: their first elements)."""
    i = bisect_right(starts, x) - 1
    return i >= 0 and x <= spans[i][1]


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """A rule with its terms resolved to merged integer ranges."""

    ref: RuleRef
    rule: SecurityRule
    protocol: int
    sources: tuple[Span, ...]
    source_ports: tuple[Span, ...]
    destinations: tuple[Span, ...]
    destination_ports: tuple[Span, ...]


def _partition(sets: Sequence[tuple[Span, ...]], top: int) -> tuple[list[int], list[int]]:
    """Cut ``0..top`` at every edge of ``sets`` (one merged range set per rule, bit
    = position); return each piece's first integer and its bit set of rules."""
    edges = {0}
    for spans in sets:
        for s, e in spans:
            edges.add(s)
            if e < top:
                edges.add(e + 1)
    bounds = sorted(edges)
    toggles = [0] * (len(bounds) + 1)
    for bit, spans in enumerate(sets):
        for s, e in spans:
            toggles[bisect_left(bounds, s)] ^= 1 << bit
            toggles[bisect_right(bounds, e)] ^= 1 << bit
    masks: list[int] = []
    acc = 0
    for t in toggles[:-1]:
        acc ^= t
        masks.append(acc)
    return bounds, masks


class Table:
    """One group's rules for one direction, compiled for first-match lookup (see the module docstring)."""

    __slots__ = (
        "group", "direction", "rules", "index", "protos", "other",
        "src_b", "src_m", "sport_b", "sport_m", "dst_b", "dst_m", "dport_b", "dport_m", "dims",
    )  # fmt: skip

    def __init__(self, group: str, direction: Direction, rules: list[CompiledRule]) -> None:
        self.group = group
        self.direction = direction
        self.rules = rules
        #: Bit position -> index into the policy's ``hits``.
        self.index = [r.ref.index for r in rules]
        portless = 0
        self.protos: dict[int, int] = {p: 0 for p in PROTO_NAMES}
        for bit, r in enumerate(rules):
            ported_only = r.source_ports != ALL_PORTS or r.destination_ports != ALL_PORTS
            for p in self.protos:
                if r.protocol in (0, p) and (p in PORTED or not ported_only):
                    self.protos[p] |= 1 << bit
            if r.protocol == 0 and not ported_only:
                portless |= 1 << bit
        #: Mask for a protocol other than ICMP, TCP and UDP.
        self.other = portless
        self.src_b, self.src_m = _partition([r.sources for r in rules], MAX_IP)
        self.sport_b, self.sport_m = _partition([r.source_ports for r in rules], MAX_PORT)
        self.dst_b, self.dst_m = _partition([r.destinations for r in rules], MAX_IP)
        self.dport_b, self.dport_m = _partition([r.destination_ports for r in rules], MAX_PORT)
        #: (bounds, masks) per dimension: source, source port, destination, destination port.
        self.dims = (
            (self.src_b, self.src_m),
            (self.sport_b, self.sport_m),
            (self.dst_b, self.dst_m),
            (self.dport_b, self.dport_m),
        )

    def first(self, proto: int, src: int, sport: int, dst: int, dport: int) -> int:
        """Index (into ``hits``) of the first rule by priority that matches the flow."""
        m = (
            self.protos.get(proto, self.other)
            & self.src_m[bisect_right(self.src_b, src) - 1]
            & self.sport_m[bisect_right(self.sport_b, sport) - 1]
            & self.dst_m[bisect_right(self.dst_b, dst) - 1]
            & self.dport_m[bisect_right(self.dport_b, dport) - 1]
        )
        return self.index[(m & -m).bit_length() - 1]


@dataclass(slots=True)
class _Group:
    """A compiled group: a table per direction and where it is attached."""

    spec: SecurityGroup
    inbound: Table
    outbound: Table


#: Per backend: (subnet group, NIC group), outbound tables in order, inbound tables in order.
_Cover = tuple[_Group | None, _Group | None, tuple[Table, ...], tuple[Table, ...]]
_NONE: _Cover = (None, None, (), ())


def _cover(subnet: _Group | None, nic: _Group | None) -> _Cover:
    """Azure's order: inbound meets the subnet group first, outbound the NIC group first."""
    out = tuple(g.outbound for g in (nic, subnet) if g is not None)
    inb = tuple(g.inbound for g in (subnet, nic) if g is not None)
    return (subnet, nic, out, inb)


def span_text(span: Span, top: int) -> str:
    """An address range as an operator writes it: ``10.0.0.0/8``, ``10.0.0.1``, ``a-b``
    (``*`` is a tag, never a range); ports ``80``, ``1024-65535`` or ``*`` for all."""
    s, e = span
    if top == MAX_PORT:
        return "*" if (s, e) == (0, top) else str(s) if s == e else f"{s}-{e}"
    size = e - s + 1
    if size & (size - 1) == 0 and s % size == 0:
        plen = 33 - size.bit_length()
        return ip_str(s) if plen == 32 else f"{ip_str(s)}/{plen}"
    return f"{ip_str(s)}-{ip_str(e)}"


def terms_text(terms: Iterable[AddressTerm]) -> str:
    """A rule's address terms as written, tags by name."""
    return ", ".join(str(t) if isinstance(t, Tag) else span_text(t, MAX_IP) for t in terms)


def ports_text(spans: Iterable[Span]) -> str:
    """A rule's port ranges as written."""
    return ", ".join(span_text(s, MAX_PORT) for s in spans)


#: How rows and events name a rule's or flow's protocol ("*": any).
PROTO_LABELS = {0: "*", **PROTO_NAMES}


class SecurityPolicy:
    """The compiled groups of one configuration."""

    def __init__(self, model: GatewayModel, previous: SecurityPolicy | None = None) -> None:
        """Compile; ``previous`` (the policy before a reload) hands over hit and
        denial counts of rules that stay (same group, direction and name)."""
        self.model = model
        space = merge(model.address_space)
        self.tags: dict[Tag, tuple[Span, ...]] = {
            Tag.ANY: ((0, MAX_IP),),
            Tag.INTERNET: complement(space, MAX_IP),
            Tag.VIRTUAL_NETWORK: space,
            Tag.AZURE_LOAD_BALANCER: ((model.probe_source, model.probe_source),)
            if model.probe_source
            else (),
        }
        #: Every compiled rule, ``refs[i].index == i``.
        self.refs: list[RuleRef] = []
        self.groups: dict[str, _Group] = {}
        for g in model.security_groups:
            tables = {d: self._compile(g.name, d, g.rules) for d in (_IN, _OUT)}
            self.groups[g.name] = _Group(g, tables[_IN], tables[_OUT])
        self.hits: list[int] = [0] * len(self.refs)
        #: Denied flows per (backend, rule index); index -1: ``inbound_default``.
        self.denials: dict[tuple[int, int], int] = {}
        self._gates: dict[tuple[int, int], EventGate] = {}
        self._allow = [r.allow for r in self.refs]
        self._single = [Decision(r.allow, (r,), f"{r.group}/{r.name}") for r in self.refs]
        self._pairs: dict[int, Decision] = {}
        self._prefix_index()
        self._covers: dict[int, _Cover] = self._nic_covers()
        self._cache: dict[int, _Cover] = {}
        if previous is not None:
            self._carry(previous)

    # -- compile -------------------------------------------------------------------

    def _resolve(self, terms: Iterable[AddressTerm]) -> tuple[Span, ...]:
        spans: list[Span] = []
        for t in terms:
            if isinstance(t, Tag):
                spans.extend(self.tags[t])
            else:
                spans.append(t)
        return merge(spans)

    def _compile(self, group: str, direction: Direction, rules: Iterable[SecurityRule]) -> Table:
        own = [(r, False) for r in rules if r.direction == direction]
        own.sort(key=lambda rd: rd[0].priority)
        own += [(r, True) for r in DEFAULT_RULES if r.direction == direction]
        compiled: list[CompiledRule] = []
        for r, default in own:
            ref = RuleRef(group, r.name, r.priority, direction, r.allow, default, len(self.refs))
            self.refs.append(ref)
            c = CompiledRule(
                ref,
                r,
                r.protocol,
                self._resolve(r.sources),
                merge(r.source_ports),
                self._resolve(r.destinations),
                merge(r.destination_ports),
            )
            compiled.append(c)
        return Table(group, direction, compiled)

    def _prefix_index(self) -> None:
        """Cut the address space at every attached prefix; each piece names the
        narrowest prefix covering it (the config keeps one per backend anyway)."""
        spans = [(s, e, g) for g in self.groups.values() for s, e in g.spec.prefixes]
        edges = {0}
        for s, e, _ in spans:
            edges.add(s)
            if e < MAX_IP:
                edges.add(e + 1)
        self._prefix_b = sorted(edges)
        self._prefix_g: list[_Group | None] = []
        for start in self._prefix_b:
            best: tuple[int, _Group] | None = None
            for s, e, g in spans:
                if s <= start <= e and (best is None or e - s < best[0]):
                    best = (e - s, g)
            self._prefix_g.append(best[1] if best else None)

    def configured_backends(self) -> list[int]:
        """Every backend address the configuration names, sorted."""
        seen: set[int] = set()
        for p in self.model.pools:
            seen.update(p.members)
        seen.update(i.private for i in self.model.instance_ips)
        seen.update(n.backend for n in self.model.inbound_nat_rules)
        for g in self.model.security_groups:
            seen.update(g.backends)
        return sorted(seen)

    def _subnet(self, backend: int) -> _Group | None:
        return self._prefix_g[bisect_right(self._prefix_b, backend) - 1]

    def _nic_covers(self) -> dict[int, _Cover]:
        """Groups of every configured backend: its NIC group (attached to its address
        or to a pool it is in) and its subnet group."""
        nic: dict[int, _Group] = {}
        members = {p.name: p.members for p in self.model.pools}
        for g in self.groups.values():
            for b in g.spec.backends:
                nic.setdefault(b, g)
            for pool in g.spec.pools:
                for b in members.get(pool, ()):
                    nic.setdefault(b, g)
        covers: dict[int, _Cover] = {}
        for b in self.configured_backends():
            subnet, n = self._subnet(b), nic.get(b)
            covers[b] = _cover(subnet, n) if subnet or n else _NONE
        return covers

    def _cover_of(self, backend: int) -> _Cover:
        c = self._covers.get(backend)
        if c is not None:
            return c
        c = self._cache.get(backend)
        if c is None:
            if len(self._cache) >= CACHE_LIMIT:
                self._cache.clear()
            subnet = self._subnet(backend)
            c = self._cache[backend] = _cover(subnet, None) if subnet else _NONE
        return c

    def _carry(self, previous: SecurityPolicy) -> None:
        """Counts of rules that stay move to their new index (docs/decisions.md)."""
        new = {(r.group, r.direction, r.name): r.index for r in self.refs}
        moved = {-1: -1}
        for r in previous.refs:
            i = new.get((r.group, r.direction, r.name))
            if i is not None:
                moved[r.index] = i
                self.hits[i] += previous.hits[r.index]
        for (b, old), n in previous.denials.items():
            if old in moved:
                self.denials[(b, moved[old])] = n
        for (b, old), gate in previous._gates.items():
            if old in moved:
                self._gates[(b, moved[old])] = gate

    # -- evaluate (once per new flow) ---------------------------------------------

    def _decide(
        self, tables: tuple[Table, ...], proto: int, src: int, sport: int, dst: int, dport: int
    ) -> Decision:
        """Each table's first matching rule decides; both must allow and a deny in the
        first ends it (docs/model.md, "Security groups"). Counts the deciding rules' hits."""
        i = tables[0].first(proto, src, sport, dst, dport)
        self.hits[i] += 1
        if len(tables) == 1 or not self._allow[i]:
            return self._single[i]
        j = tables[1].first(proto, src, sport, dst, dport)
        self.hits[j] += 1
        key = i * len(self.refs) + j
        d = self._pairs.get(key)
        if d is None:
            a, b = self.refs[i], self.refs[j]
            d = self._pairs[key] = Decision(b.allow, (a, b), f"{a.group}/{a.name},{b.group}/{b.name}")
        return d

    def outbound(self, backend: int, proto: int, src: int, sport: int, dst: int, dport: int) -> Decision:
        """A flow ``backend`` opens toward the outside. No group: allowed, "no group"."""
        tables = self._cover_of(backend)[2]
        if not tables:
            return NO_GROUP
        return self._decide(tables, proto, src, sport, dst, dport)

    def inbound(
        self, backend: int, proto: int, src: int, sport: int, dst: int, dport: int, *, opening: bool = False
    ) -> Decision:
        """A flow opened to ``backend`` (dst/dport: the backend's private address and
        port, as it reaches the backend). No group: ``inbound_default``, or allowed
        when ``opening`` (a classic endpoint)."""
        tables = self._cover_of(backend)[3]
        if not tables:
            if opening:
                return OPENING
            return INBOUND_DEFAULT_ALLOW if self.model.inbound_default_allow else INBOUND_DEFAULT_DENY
        return self._decide(tables, proto, src, sport, dst, dport)

    def record_denial(
        self, backend: int, decision: Decision, remote: int, port: int, proto: int, now: float
    ) -> FlowDenied | None:
        """Count a denied flow per backend and deciding rule; an event for the first
        per backend and rule in :data:`DENIAL_EVENT_INTERVAL` (``suppressed``: the
        ones held back since the last). Past :data:`DENIAL_KEYS_LIMIT` pairs a new
        backend counts under backend 0 with one gate per rule (its event still
        names it)."""
        if decision.rules:
            ref = decision.rules[-1]
            index = ref.index
            group, rule, direction = ref.group, ref.name, str(ref.direction)
        else:
            index = -1
            group, rule, direction = "", decision.label, str(_IN)
        key = (backend, index)
        if key not in self.denials and len(self.denials) >= DENIAL_KEYS_LIMIT:
            key = (0, index)
        self.denials[key] = self.denials.get(key, 0) + 1
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = EventGate()
        if not gate.admit(now, DENIAL_EVENT_INTERVAL):
            return None
        protocol = PROTO_LABELS.get(proto, str(proto))
        event = FlowDenied(
            ip_str(backend), group, rule, direction, protocol, ip_str(remote), port, gate.suppressed
        )
        gate.sent(now)
        return event

    # -- views ---------------------------------------------------------------------

    def groups_of(self, backend: int) -> tuple[str | None, str | None]:
        """Names of the (subnet, NIC) groups covering ``backend``."""
        subnet, nic, _, _ = self._cover_of(backend)
        return (subnet.spec.name if subnet else None, nic.spec.name if nic else None)

    def _rows(self, backend: str, table: Table, attached: str) -> list[dict[str, object]]:
        return [
            {
                "backend": backend,
                "group": table.group,
                "attached": attached,
                "direction": str(table.direction),
                "priority": c.ref.priority,
                "name": c.ref.name,
                "access": "allow" if c.ref.allow else "deny",
                "protocol": PROTO_LABELS.get(c.protocol, str(c.protocol)),
                "source": terms_text(c.rule.sources),
                "source_ports": ports_text(c.rule.source_ports),
                "destination": terms_text(c.rule.destinations),
                "destination_ports": ports_text(c.rule.destination_ports),
                "hits": self.hits[c.ref.index],
                "default": c.ref.default,
            }
            for c in table.rules
        ]

    def _backend_rows(self, backend: int) -> list[dict[str, object]]:
        subnet, nic, _, _ = self._cover_of(backend)
        rows: list[dict[str, object]] = []
        name = ip_str(backend)
        for direction, order in (
            (_IN, ((subnet, "subnet"), (nic, "nic"))),
            (_OUT, ((nic, "nic"), (subnet, "subnet"))),
        ):
            for g, attached in order:
                if g is not None:
                    rows += self._rows(name, g.inbound if direction == _IN else g.outbound, attached)
        return rows

    def effective_rules(self, backend: int | None = None) -> list[dict[str, object]]:
        """What ``snatgw rules`` shows: every rule that applies to ``backend``, per
        direction in evaluation order, defaults included, with hit counts. None:
        every configured backend's, then each group no configured backend meets
        (``backend`` "")."""
        if backend is not None:
            return self._backend_rows(backend)
        rows: list[dict[str, object]] = []
        for b in self.configured_backends():
            rows += self._backend_rows(b)
        shown = {r["group"] for r in rows}
        for g in self.groups.values():
            if g.spec.name not in shown:
                attached = "subnet" if g.spec.prefixes and not (g.spec.backends or g.spec.pools) else "nic"
                rows += self._rows("", g.inbound, attached) + self._rows("", g.outbound, attached)
        return rows

    # -- inbound paths no rule opens ----------------------------------------------

    def _could_allow(
        self, reach: _Reach, backend: int, protos: tuple[int, ...], dport: int | None, opening: bool
    ) -> bool:
        """Whether some Internet source could open a flow to ``backend`` on ``dport``
        (None: any port). No group: only ``inbound_default`` or an opening lets it."""
        tables = self._cover_of(backend)[3]
        if not tables:
            return opening or self.model.inbound_default_allow
        return reach.could_allow(tables, backend, protos, dport)

    def unopened(self) -> list[InboundNotOpened]:
        """Every inbound path (lb_rule or endpoint member, inbound NAT rule, instance
        IP) that no Internet source could ever use: one warning each, at start."""
        out: list[InboundNotOpened] = []
        # The probe source is the gateway itself, not a client, even when outside address_space.
        probe = self.tags[Tag.AZURE_LOAD_BALANCER]
        reach = _Reach(complement(merge(self.tags[Tag.VIRTUAL_NETWORK] + probe), MAX_IP), self._allow)
        members = {p.name: p.members for p in self.model.pools}
        for r in self.model.lb_rules:
            kind = "endpoint" if r.opening else "lb_rule"
            for proto in (6, 17) if r.protocol == "all" else (_proto_number(r.protocol),):
                for b in members.get(r.pool, ()):
                    if not self._could_allow(reach, b, (proto,), r.backend_port, r.opening):
                        out.append(
                            InboundNotOpened(kind, r.name, ip_str(b), r.backend_port, PROTO_NAMES[proto])
                        )
        for n in self.model.inbound_nat_rules:
            proto = _proto_number(n.protocol)
            if not self._could_allow(reach, n.backend, (proto,), n.backend_port, False):
                out.append(
                    InboundNotOpened(
                        "inbound_nat_rule", n.name, ip_str(n.backend), n.backend_port, n.protocol
                    )
                )
        for i in self.model.instance_ips:
            if not self._could_allow(reach, i.private, tuple(PROTO_NAMES), None, False):
                out.append(InboundNotOpened("instance_ip", ip_str(i.public), ip_str(i.private), 0, "*"))
        return out


def _proto_number(name: str) -> int:
    return {v: k for k, v in PROTO_NAMES.items()}[name]


class _Reach:
    """Whether any flow from the Internet could pass a backend's inbound tables, for
    :meth:`SecurityPolicy.unopened` (docs/decisions.md, "Security groups").

    Exact, not sampled: each free dimension (source address, source port, and
    the destination port for an instance IP) is cut at the edges of every
    table's pieces and, for the source, of the Internet set; only pieces with a
    distinct combination of rule sets are tried. A branch stops as soon as the
    first matching rule of a table is one that matches every value of the
    dimensions still free. Members of one pool share their groups, so answers
    are kept per (tables, destination rule sets, protocols, port)."""

    def __init__(self, internet: tuple[Span, ...], allow: list[bool]) -> None:
        self.internet = internet
        self.starts = [s for s, _ in internet]
        self.allow = allow
        self._pieces: dict[tuple[tuple[Table, ...], int], list[tuple[int, ...]]] = {}
        self._answers: dict[tuple[object, ...], bool] = {}

    def pieces(self, tables: tuple[Table, ...], dim: int) -> list[tuple[int, ...]]:
        """The distinct per-table rule sets of dimension ``dim`` (0: source, only
        Internet addresses; 1: source port; 3: destination port)."""
        key = (tables, dim)
        found = self._pieces.get(key)
        if found is not None:
            return found
        edges = {0}
        if dim == 0:
            edges.update(x for s, e in self.internet for x in (s, e + 1) if x <= MAX_IP)
        for t in tables:
            edges.update(t.dims[dim][0])
        distinct: dict[tuple[int, ...], None] = {}
        for x in sorted(edges):
            if dim == 0 and not contains(self.internet, self.starts, x):
                continue
            distinct[tuple(m[bisect_right(b, x) - 1] for b, m in (t.dims[dim] for t in tables))] = None
        found = self._pieces[key] = list(distinct)
        return found

    def could_allow(
        self, tables: tuple[Table, ...], backend: int, protos: tuple[int, ...], dport: int | None
    ) -> bool:
        dst = tuple(t.dst_m[bisect_right(t.dst_b, backend) - 1] for t in tables)
        key: tuple[object, ...] = (tables, dst, protos, dport)
        answer = self._answers.get(key)
        if answer is None:
            answer = self._answers[key] = self._search(tables, dst, protos, dport)
        return answer

    def _search(
        self, tables: tuple[Table, ...], dst: tuple[int, ...], protos: tuple[int, ...], dport: int | None
    ) -> bool:
        if dport is None:
            dports = self.pieces(tables, 3)
        else:
            dports = [tuple(t.dport_m[bisect_right(t.dport_b, dport) - 1] for t in tables)]
        dims = [self.pieces(tables, 0), self.pieces(tables, 1), dports]
        # Rules that match every value of the dimensions after position k, per table.
        every = [[-1] * len(tables) for _ in range(len(dims) + 1)]
        for k in range(len(dims) - 1, -1, -1):
            for i in range(len(tables)):
                acc = every[k + 1][i]
                for piece in dims[k]:
                    acc &= piece[i]
                every[k][i] = acc
        allow = self.allow

        def walk(k: int, masks: list[int]) -> bool:
            decided = True
            for i, m in enumerate(masks):
                low = m & -m
                if low & every[k][i]:
                    if not allow[tables[i].index[low.bit_length() - 1]]:
                        return False
                else:
                    decided = False
            if decided:
                return True
            if k == len(dims):
                return False  # unreachable: DenyAll matches every flow
            return any(walk(k + 1, [m & p for m, p in zip(masks, piece, strict=True)]) for piece in dims[k])

        return any(
            walk(0, [t.protos.get(proto, t.other) & d for t, d in zip(tables, dst, strict=True)])
            for proto in protos
        )
