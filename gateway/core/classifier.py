"""The classifier behind security groups: integer range sets and first-match
tables (docs/model.md, "Security groups"; docs/decisions.md, "Security groups").

How a table matches (a bit-vector classifier, Lakshman and Stiliadis,
SIGCOMM 1998): a group's rules for one direction are numbered in priority
order, bit 0 first. Each of the four dimensions (source and destination
address, source and destination port) is cut at every rule's range edges into
pieces on which the same rules match; each piece carries the bit set of those
rules. A flow is one bisect per dimension and an AND of four bit sets and the
protocol's; the lowest set bit is the first matching rule. The cost does not
grow with the number of rules; the default DenyAll rule matches everything,
so the set is never empty.

:class:`Reach` answers the opposite question for ``unopened``: could any flow
from the Internet pass a backend's inbound tables.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from gateway.core.model import PROTO_NAMES, Direction, SecurityRule, Span

MAX_IP = 0xFFFFFFFF
MAX_PORT = 0xFFFF
ALL_PORTS: tuple[Span, ...] = ((0, MAX_PORT),)
#: Protocols whose flows carry ports; any other (ICMP among them) matches only rules
#: whose port ranges are both "*" (docs/decisions.md, "Security groups").
PORTED = (6, 17)

@dataclass(frozen=True, slots=True)
class RuleRef:
    """One compiled rule and where it came from; ``index`` into the policy's
    :attr:`~gateway.core.security.SecurityPolicy.hits`."""

    group: str
    name: str
    priority: int
    direction: Direction
    allow: bool
    #: One of Azure's six default rules (AllowVnetInBound, ...).
    default: bool
    index: int


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


class Reach:
    """Whether any flow from the Internet could pass a backend's inbound tables, for
    :meth:`~gateway.core.security.SecurityPolicy.unopened` (docs/decisions.md, "Security groups").

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
