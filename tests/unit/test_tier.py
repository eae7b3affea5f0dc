"""Preallocation tiers are exactly the model's table."""

from __future__ import annotations

import pytest

from gateway.core.tier import ports_per_backend


@pytest.mark.parametrize(
    ("backends", "ports"),
    [
        (1, 1024),
        (50, 1024),
        (51, 512),
        (100, 512),
        (101, 256),
        (200, 256),
        (201, 128),
        (400, 128),
        (401, 64),
        (800, 64),
        (801, 32),
        (1000, 32),
    ],
)
def test_tier_boundaries(backends: int, ports: int) -> None:
    """Each tier boundary of docs/model.md gives its block size."""
    assert ports_per_backend(backends) == ports


def test_more_than_1000_is_refused() -> None:
    """More than 1000 backends on one address is not allowed."""
    with pytest.raises(ValueError):
        ports_per_backend(1001)
