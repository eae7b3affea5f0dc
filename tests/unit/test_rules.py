"""The iptables rule set diverts both directions, fails closed and stays in its own chains."""

from __future__ import annotations

import subprocess

import pytest

from gateway.adapters import iptables
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


def _table(text: str, name: str) -> list[str]:
    """The lines of one table's section of an iptables-restore input."""
    lines = text.splitlines()
    start = lines.index(f"*{name}")
    return lines[start + 1 : lines.index("COMMIT", start)]


def test_one_commit_per_table_replaces_old_jumps_in_place() -> None:
    """Existing jumps are deleted and re-inserted inside the same commit (no moment
    without rules), after the chains are declared; the guard sits after the queue."""
    existing = [("mangle", "POSTROUTING", "SNATGW-POST"), ("mangle", "POSTROUTING", "SNATGW-POST")]
    text = ruleset("in0", "out0", 0, [1], existing=existing)
    assert text.count("COMMIT") == 3 and "\n-F" not in text and "\n-X" not in text
    mangle = _table(text, "mangle")
    deletes = [i for i, ln in enumerate(mangle) if ln == "-D POSTROUTING -j SNATGW-POST"]
    assert len(deletes) == 2
    assert max(i for i, ln in enumerate(mangle) if ln.startswith(":")) < deletes[0]
    inserts = [ln for ln in mangle if ln.startswith("-I POSTROUTING")]
    # inserted at 1 in reverse: SNATGW-POST ends up first, SNATGW-GUARD after it
    assert inserts == ["-I POSTROUTING 1 -j SNATGW-GUARD", "-I POSTROUTING 1 -j SNATGW-POST"]
    assert "-D" not in "\n".join(_table(text, "raw") + _table(text, "filter"))


def test_guard_only_queues_nothing_and_drops_inside_traffic_to_the_outside() -> None:
    """stopped = "block": no NFQUEUE, no notrack; inside traffic is marked and dropped on
    the outside, unsolicited outside traffic is dropped at FORWARD."""
    text = ruleset("in0", "out0", 0, [0xC633640A], translate=False)
    assert "NFQUEUE" not in text and "notrack" not in text and "198.51.100.10" not in text
    mark = "-j MARK --set-xmark 0x20000000/0x20000000"
    assert f"-A SNATGW-PRE -i in0 -m addrtype ! --dst-type LOCAL {mark}" in text
    assert "-A SNATGW-GUARD -o out0 -m mark --mark 0x20000000/0x20000000 -j DROP" in text
    assert "-A SNATGW-FWD -i out0 -o in0 -m mark ! --mark 0x10000000/0x10000000 -j DROP" in text


def test_running_rules_keep_the_guard_behind_the_queue() -> None:
    """With translation on the guard is still there, jumped to after the queue rules."""
    text = ruleset("in0", "out0", 0, [1], tcp_queue=1)
    assert "-A SNATGW-GUARD -o out0 -m mark --mark 0x20000000/0x20000000 -j DROP" in text


def test_defragmentation_and_host_icmp_errors_are_asked_for() -> None:
    """A never-matching -m socket rule pulls in the kernel's defrag (docs/kernel.md,
    "Fragments"); the host's ICMP errors on the outside are queued from OUTPUT."""
    text = ruleset("in0", "out0", 7, [1])
    assert "-A SNATGW-PRE -i lo -m socket -j RETURN" in _table(text, "raw")
    out = [ln for ln in _table(text, "mangle") if ln.startswith("-A SNATGW-OUT")]
    assert out == [f"-A SNATGW-OUT -o out0 -p icmp -m icmp --icmp-type {t} -j NFQUEUE --queue-num 7"
                   for t in (3, 4, 5, 11, 12)]
    assert "-I OUTPUT 1 -j SNATGW-OUT" in _table(text, "mangle")


def test_a_failing_guard_swap_does_not_abort_the_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    """guard() reports a failed iptables-restore instead of raising, so the rest of the
    stop (forwarding, addresses, sockets) still runs; the old rules stay (fail closed)."""
    calls: list[list[str]] = []

    def fake_run(argv: list[str], data: str | None = None) -> subprocess.CompletedProcess[str]:
        calls.append(list(argv))
        rc = 1 if argv[0] == "iptables-restore" else 0
        return subprocess.CompletedProcess(argv, rc, "", "boom")

    monkeypatch.setattr(iptables, "_run", fake_run)
    assert iptables.guard("in0", "out0") is False
    assert [c[0] for c in calls] == ["iptables-save", "iptables-restore"]


def test_the_stopped_setting_defaults_to_block_and_refuses_other_values() -> None:
    """[gateway] stopped: "block" unless set, "remove" accepted, anything else names the key."""
    from gateway.config import ConfigError, parse

    base = '[gateway]\ninside = "in0"\noutside = "out0"\n'
    assert parse(base, "x.toml").stopped == "block"
    assert parse(base + 'stopped = "remove"\n', "x.toml").stopped == "remove"
    with pytest.raises(ConfigError, match="gateway.stopped"):
        parse(base + 'stopped = "open"\n', "x.toml")
