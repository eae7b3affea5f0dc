"""RFC 1624 incremental updates agree with RFC 1071 recomputation."""

from __future__ import annotations

from hypothesis import assume, given
from hypothesis import strategies as st

from gateway.core.checksum import apply, checksum, delta, ones_sum


@given(st.binary(min_size=2, max_size=200).filter(lambda b: len(b) % 2 == 0), st.data())
def test_incremental_update_verifies_like_recompute(data: bytes, draw: st.DataObject) -> None:
    """Changing any words and folding in their delta gives a checksum that verifies."""
    words = len(data) // 2
    at = draw.draw(st.integers(0, words - 1)) * 2
    width = draw.draw(st.integers(1, min(3, words - at // 2))) * 2
    new = draw.draw(st.binary(min_size=width, max_size=width))
    changed = data[:at] + new + data[at + width :]
    assume(any(data) and any(changed))
    updated = apply(checksum(data), delta(data[at : at + width], new))
    assert checksum(changed + updated.to_bytes(2, "big")) == 0
    assert ones_sum(changed + updated.to_bytes(2, "big")) == 0xFFFF


def test_known_vector() -> None:
    """The RFC 1071 example sums to 0xddf2 (checksum 0x220d)."""
    data = bytes([0x00, 0x01, 0xF2, 0x03, 0xF4, 0xF5, 0xF6, 0xF7])
    assert ones_sum(data) == 0xDDF2
    assert checksum(data) == 0x220D


def test_odd_length_is_padded() -> None:
    """An odd trailing byte counts as the high byte of a last word."""
    assert ones_sum(b"\x01") == 0x0100


def _delta_by_words(old: bytes, new: bytes) -> int:
    d = 0
    for i in range(0, len(old), 2):
        d += (~int.from_bytes(old[i : i + 2], "big") & 0xFFFF) + int.from_bytes(new[i : i + 2], "big")
    while d > 0xFFFF:
        d = (d & 0xFFFF) + (d >> 16)
    return d


@given(st.integers(1, 4).flatmap(lambda n: st.tuples(st.binary(min_size=2 * n, max_size=2 * n),
                                                      st.binary(min_size=2 * n, max_size=2 * n))))
def test_delta_equals_the_word_by_word_rfc1624_sum(pair: tuple[bytes, bytes]) -> None:
    """The one-subtraction delta is exactly RFC 1624's ~m + m' summed word by word, folded."""
    old, new = pair
    assert delta(old, new) == _delta_by_words(old, new)
    assert delta(old, old) == _delta_by_words(old, old)
    assert delta(b"\xff" * len(old), bytes(len(old))) == 0
