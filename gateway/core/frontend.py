"""Public addresses: frontends, instance IPs and default SNAT addresses
(OUTBOUND_MODEL.md, "Words" and "Scenarios").

A :class:`PublicAddress` knows which backends leave through it and, for the
PAT scenarios, where each one's block lies and which tier the address is in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway.core.block import BlockLayout
from gateway.core.tier import TIERS, ports_per_backend

if TYPE_CHECKING:
    from gateway.core.pool import Backend

KIND_FRONTEND = "frontend"
KIND_INSTANCE_IP = "instance_ip"
KIND_DEFAULT_SNAT = "default_snat"


@dataclass(slots=True, eq=False)
class PublicAddress:
    """One address the gateway owns on the outside.

    ``layout`` is None for an instance IP: its one backend keeps its own
    source ports (scenario 1, no port masquerading).
    """

    ip: int
    kind: str
    name: str = ""
    layout: BlockLayout | None = None
    members: dict[int, Backend] = field(default_factory=dict)

    @property
    def block_size(self) -> int:
        return self.layout.size if self.layout is not None else 0

    @property
    def tier(self) -> int:
        """1 for the first row of the tier table (1-50 backends, 1024 ports), 0 without blocks."""
        for i, (_limit, size) in enumerate(TIERS, 1):
            if size == self.block_size:
                return i
        return 0

    def size_for(self, backends: int) -> int:
        """Block size the model prescribes for ``backends`` sharing this address."""
        return ports_per_backend(backends)


def new_pat_address(ip: int, kind: str, name: str, excluded: frozenset[int], backends: int) -> PublicAddress:
    """A PAT address (frontend or default SNAT) with an empty layout in the tier for ``backends``."""
    return PublicAddress(ip, kind, name, BlockLayout(ports_per_backend(backends), excluded))
