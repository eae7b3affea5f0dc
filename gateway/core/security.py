"""Network security groups, Azure's semantics (docs/model.md, "Security groups").

CONTRACT STUB (filled in by the security-core work): the names and signatures
below are what the rest of the core and the adapters use.

A :class:`SecurityPolicy` is built from a :class:`~gateway.core.model.GatewayModel`
at load and at every reload: each group's rules, with Azure's six default rules
below them, are compiled into sorted integer ranges (tags resolved against
``address_space`` and ``probe_source``). It is asked once per new flow, never
per packet of an existing flow; the flow keeps the :class:`Decision`.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.core.model import Direction, GatewayModel


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
    "no group" or "inbound_default")."""

    allowed: bool
    rules: tuple[RuleRef, ...]
    label: str


class SecurityPolicy:
    """The compiled groups of one configuration."""

    def __init__(self, model: GatewayModel, previous: SecurityPolicy | None = None) -> None:
        """Compile; ``previous`` (the policy before a reload) hands over hit and
        denial counts of rules that stay (same group, direction and name)."""
        self.hits: list[int] = []
        raise NotImplementedError

    def outbound(self, backend: int, proto: int, src: int, sport: int, dst: int, dport: int) -> Decision:
        """A flow ``backend`` opens toward the outside. No group: allowed, "no group"."""
        raise NotImplementedError

    def inbound(
        self, backend: int, proto: int, src: int, sport: int, dst: int, dport: int, *, opening: bool = False
    ) -> Decision:
        """A flow opened to ``backend`` (dst/dport: the backend's private address and
        port, as it reaches the backend). No group: ``inbound_default``, or allowed
        when ``opening`` (a classic endpoint)."""
        raise NotImplementedError
