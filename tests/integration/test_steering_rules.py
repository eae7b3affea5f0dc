"""The steering rules load into a real kernel for 1 to 16 workers (docs/kernel.md, "Steering"):
iptables-restore takes every u32 test and port range, and going back to one worker or to the
guard deletes the steering chains in the same commit."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator

import pytest

from gateway.adapters.iptables import STEER_CHAINS, jumps_present, ruleset, steering_present

pytestmark = pytest.mark.integration

PUBS = [0xC633640A, 0xC633640B, 0xC6336414]  # 198.51.100.10, .11 (PAT), .20 (instance IP)
INSTANCE = {0xC6336414: 0}


def _run(*cmd: str, data: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, input=data, capture_output=True, text=True, timeout=30, check=False)


@pytest.fixture
def netns() -> Iterator[str]:
    """A namespace of our own with the two interfaces the rules name; deleted afterwards."""
    ns = f"w2st{uuid.uuid4().hex[:6]}"
    assert _run("ip", "netns", "add", ns).returncode == 0
    try:
        res = _run("ip", "-n", ns, "link", "add", "in0", "type", "veth", "peer", "name", "out0")
        assert res.returncode == 0, res.stderr
        yield ns
    finally:
        _run("ip", "netns", "del", ns)


def _restore(ns: str, text: str) -> None:
    res = _run("ip", "netns", "exec", ns, "iptables-restore", "--noflush", "-w", data=text)
    assert res.returncode == 0, f"{res.stderr}\n{text}"


def _save(ns: str) -> str:
    res = _run("ip", "netns", "exec", ns, "iptables-save")
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.mark.parametrize("workers", [1, 2, 3, 4, 16])
def test_rules_load_then_give_way_to_the_guard(netns: str, workers: int) -> None:
    """The rule set for N workers (three public addresses, one an instance IP) is accepted by
    iptables-restore and read back with one queue pair per worker; the guard that follows
    leaves no steering chain and no queue rule."""
    tcp = 11
    text = ruleset("in0", "out0", 10, PUBS, tcp, workers=workers, owners=INSTANCE, probes=True)
    test = _run("ip", "netns", "exec", netns, "iptables-restore", "--noflush", "--test", data=text)
    assert test.returncode == 0, test.stderr
    _restore(netns, text)
    saved = _save(netns)
    queues = {int(w.split()[0]) for w in saved.split("--queue-num ")[1:]}
    assert queues == set(range(10, 10 + 2 * workers))
    assert steering_present(saved) == (list(STEER_CHAINS) if workers > 1 else [])
    if workers > 1:
        assert saved.count("-m u32") == 2 * workers + workers  # SNATGW-SRC pairs, echo reply ids
    present = steering_present(saved)
    guard = ruleset(
        "in0", "out0", 0, [], None, translate=False, existing=jumps_present(saved), chains=present
    )
    _restore(netns, guard)
    after = _save(netns)
    assert steering_present(after) == [] and "NFQUEUE" not in after
    assert after.count("-A POSTROUTING -j SNATGW-") == 2
    assert "-A SNATGW-GUARD -o out0 -m mark --mark 0x20000000/0x20000000 -j DROP" in after
