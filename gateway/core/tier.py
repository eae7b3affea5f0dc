"""Preallocation tiers: ports per backend by the number of backends sharing a
public address (docs/model.md, "Preallocation by pool size")."""

from __future__ import annotations

#: (largest number of backends sharing the address, ports preallocated per backend)
TIERS: tuple[tuple[int, int], ...] = (
    (50, 1024),
    (100, 512),
    (200, 256),
    (400, 128),
    (800, 64),
    (1000, 32),
)

#: More backends than this on one public address is not allowed.
MAX_BACKENDS_PER_ADDRESS = TIERS[-1][0]

#: SNAT ports come from this range; below it are the well-known ports.
PORT_MIN = 1024
PORT_MAX = 65535


def ports_per_backend(backends: int) -> int:
    """Block size for each of ``backends`` backends sharing one public address.

    Raises ``ValueError`` above :data:`MAX_BACKENDS_PER_ADDRESS`; zero
    backends get the first tier (an address is never left with no tier).
    """
    for limit, size in TIERS:
        if backends <= limit:
            return size
    raise ValueError(f"{backends} backends on one address (at most {MAX_BACKENDS_PER_ADDRESS})")
