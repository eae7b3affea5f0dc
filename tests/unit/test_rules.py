"""The iptables rule set diverts both directions, fails closed and stays in its own chains."""

from __future__ import annotations

from gateway.adapters.iptables import ruleset


def test_ruleset_queues_both_directions_without_bypass() -> None:
    """Outbound in mangle POSTROUTING, return in mangle PREROUTING per public address, no bypass."""
    text = ruleset("in0", "out0", 3, [0xC633640A, 0xC6336414])
    assert "--queue-bypass" not in text
    assert "-A SNATGW-POST -o out0 -m mark --mark 0x20000000/0x20000000 -j NFQUEUE --queue-num 3" in text
    assert "-A SNATGW-PRE -i out0 -d 198.51.100.10/32 -j NFQUEUE --queue-num 3" in text
    assert "-A SNATGW-PRE -i out0 -d 198.51.100.20/32 -j CT --notrack" in text
    assert "-A SNATGW-FWD -i out0 -o in0 -m mark ! --mark 0x10000000/0x10000000 -j DROP" in text


def test_every_rule_is_in_a_chain_of_our_own() -> None:
    """Apart from one jump per built-in chain, every rule lives in a SNATGW- chain."""
    for line in ruleset("in0", "out0", 0, [1]).splitlines():
        if line.startswith(("-A", "-I")):
            assert line.split()[1].startswith("SNATGW-") or "-j SNATGW-" in line
