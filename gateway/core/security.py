"""Network security groups, Azure's semantics (docs/model.md, "Security groups").

A :class:`SecurityPolicy` is built from a :class:`~gateway.core.model.GatewayModel`
at load and at every reload: each group's rules, with Azure's six default rules
below them, are compiled into sorted integer ranges (tags resolved against
``address_space`` and ``probe_source``). It is asked once per new flow, never
per packet of an existing flow; the flow keeps the :class:`Decision`.

How a group's rules are matched, and whether any Internet flow could pass
them, is :mod:`gateway.core.classifier`; here are the groups, the order Azure
evaluates them in, the counts and the operator's view.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.core.address import EventGate, ip_str
from gateway.core.classifier import (
    ALL_PORTS,
    MAX_IP,
    MAX_PORT,
    CompiledRule,
    Reach,
    RuleRef,
    Table,
    complement,
    merge,
)
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

#: A denial event per backend and rule at most this often (seconds).
DENIAL_EVENT_INTERVAL = 60.0
#: Distinct (backend, rule) denial counts kept. Sources a subnet group covers are
#: any address of its prefix (an inside host may spoof them), so past this many
#: the denials count under backend 0 (0.0.0.0, "other backends") and share one
#: event gate per rule: memory, metric series and events stay bounded.
DENIAL_KEYS_LIMIT = 4096
#: Group lookups of unconfigured sources kept (a cache of a cheap bisect; cleared when full).
CACHE_LIMIT = 65536

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
        self, reach: Reach, backend: int, protos: tuple[int, ...], dport: int | None, opening: bool
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
        reach = Reach(complement(merge(self.tags[Tag.VIRTUAL_NETWORK] + probe), MAX_IP), self._allow)
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
