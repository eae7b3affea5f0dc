"""Internet checksum (RFC 1071) and its incremental update (RFC 1624).

A translation changes a few fixed 16-bit words (an address, a port). Their
effect on a checksum is a constant per flow: :func:`delta` computes it once
when the flow is created and :func:`apply` folds it into each packet's
checksum, so the per-packet cost does not depend on the packet's length.
"""

from __future__ import annotations


def fold(x: int) -> int:
    """Fold a one's-complement sum to 16 bits (end-around carry)."""
    while x > 0xFFFF:
        x = (x & 0xFFFF) + (x >> 16)
    return x


def ones_sum(data: bytes | bytearray | memoryview) -> int:
    """Folded one's-complement sum of ``data`` as big-endian 16-bit words.

    Since 2**16 is 1 modulo 0xFFFF, the sum of the words is the whole buffer
    read as one big integer modulo 0xFFFF (RFC 1071 section 2), which CPython
    computes in C. A non-zero sum that is a multiple of 0xFFFF folds to 0xFFFF.
    """
    b = bytes(data)
    if len(b) % 2:
        b += b"\0"
    x = int.from_bytes(b, "big")
    return x % 0xFFFF or (0xFFFF if x else 0)


def checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """RFC 1071 checksum of ``data`` plus an optional pre-summed ``initial``."""
    return ~fold(ones_sum(data) + initial) & 0xFFFF


def delta(old: bytes, new: bytes) -> int:
    """The RFC 1624 term ``~m + m'`` summed over the words of ``old`` -> ``new``.

    ``old`` and ``new`` have the same even length. The result is folded and
    can be added to other deltas before :func:`apply`. As in :func:`ones_sum`,
    each side's word sum is its integer value modulo 0xFFFF, and ``~m`` is
    ``0xFFFF - m``, so the sum is ``new - old`` modulo 0xFFFF; the folded
    form is 0xFFFF rather than 0 unless every term was zero (old all ones,
    new all zeros). One subtraction instead of a loop per word: this runs
    four times for every new flow.
    """
    r = (int.from_bytes(new, "big") - int.from_bytes(old, "big")) % 0xFFFF
    if r:
        return r
    return 0 if old == b"\xff" * len(old) and not any(new) else 0xFFFF


def apply(csum: int, d: int) -> int:
    """RFC 1624 eqn. 3, ``HC' = ~(~HC + ~m + m')``, with the precomputed, folded ``d``.

    For 16-bit operands ``~(~HC + d)`` is ``HC - d`` in one's-complement
    arithmetic: subtract, and add 0xFFFF back on a borrow. The per-packet
    paths in :mod:`gateway.core.table` inline exactly this.
    """
    c = csum - d
    return c + 0xFFFF if c < 0 else c
