"""Steering rules for N workers (docs/kernel.md, "Steering"): every packet the gateway
queues reaches one worker's queue pair, by the owner functions of gateway.core.shard."""

from __future__ import annotations

import re
import subprocess

import pytest

from gateway.adapters import iptables
from gateway.adapters.iptables import STEER_CHAINS, U32_MAX_VALUES, ruleset, steering
from gateway.core.shard import MAX_WORKERS, backend_slots, slice_ports

PUB = 0xC633640A  # 198.51.100.10, a PAT address
INST = 0xC6336414  # 198.51.100.20, an instance IP's public address


def _table(text: str, name: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index(f"*{name}")
    return lines[start + 1 : lines.index("COMMIT", start)]


def _chain(text: str, chain: str) -> list[str]:
    return [ln for ln in _table(text, "mangle") if ln.startswith(f"-A {chain} ")]


def _steered(workers: int, owners: dict[int, int] | None = None, probes: bool = False) -> str:
    return ruleset(
        "in0", "out0", 10, [PUB, INST], 11, workers=workers, owners=owners or {INST: 1}, probes=probes
    )


def test_one_worker_is_todays_rule_set() -> None:
    """workers=1 (with or without owners) renders the same text as no workers argument."""
    for kw in ({}, {"translate": False}, {"probes": True}):
        base = ruleset("in0", "out0", 3, [PUB, INST], 4, **kw)  # type: ignore[arg-type]
        assert ruleset("in0", "out0", 3, [PUB, INST], 4, workers=1, owners={INST: 0}, **kw) == base  # type: ignore[arg-type]
        assert "SNATGW-SRC" not in base and "SNATGW-PORT" not in base and "u32" not in base


@pytest.mark.parametrize("workers", range(2, MAX_WORKERS + 1))
def test_source_low_bits_split_among_the_workers(workers: int) -> None:
    """SNATGW-SRC: each of the 16 values of src & 15 goes to exactly one worker, TCP to its
    TCP queue (queue + 2i + 1), the rest to its plain queue (queue + 2i); no u32 test has
    more values than iptables takes; anything else is dropped."""
    rules = _chain(_steered(workers), "SNATGW-SRC")
    assert rules[-1] == "-A SNATGW-SRC -j DROP" and len(rules) == 2 * workers + 1
    seen: list[int] = []
    for i in range(workers):
        vals = backend_slots(i, workers)
        assert len(vals) <= U32_MAX_VALUES
        low = f'-m u32 --u32 "12&0xF={",".join(map(str, vals))}"'
        assert rules[2 * i] == f"-A SNATGW-SRC -p tcp {low} -j NFQUEUE --queue-num {10 + 2 * i + 1}"
        assert rules[2 * i + 1] == f"-A SNATGW-SRC {low} -j NFQUEUE --queue-num {10 + 2 * i}"
        seen += vals
    assert sorted(seen) == list(range(16))


@pytest.mark.parametrize("workers", [2, 3, 7, 16])
def test_return_traffic_by_port_slice_then_by_remote(workers: int) -> None:
    """SNATGW-PORT: TCP/UDP destination port and echo reply id in worker i's slice to worker i
    (the slices cover 1024-65535 with no gap), then everything else to SNATGW-SRC."""
    rules = _chain(_steered(workers), "SNATGW-PORT")
    assert rules[-1] == "-A SNATGW-PORT -j SNATGW-SRC" and len(rules) == 3 * workers + 1
    end = 1023
    for i in range(workers):
        lo, hi = slice_ports(i, workers)
        assert lo == end + 1
        end = hi
        plain, tcp = 10 + 2 * i, 10 + 2 * i + 1
        assert rules[3 * i : 3 * i + 3] == [
            f"-A SNATGW-PORT -p tcp -m tcp --dport {lo}:{hi} -j NFQUEUE --queue-num {tcp}",
            f"-A SNATGW-PORT -p udp -m udp --dport {lo}:{hi} -j NFQUEUE --queue-num {plain}",
            f'-A SNATGW-PORT -p icmp -m icmp --icmp-type 0 -m u32 --u32 "0>>22&0x3C@4>>16={lo}:{hi}"'
            f" -j NFQUEUE --queue-num {plain}",
        ]
    assert end == 65535


def test_each_direction_enters_its_steering_chain() -> None:
    """in2out (marked INSIDE) and hairpin (marked HAIRPIN first) go by source, out2in to a PAT
    address by port, an instance IP's address wholly to its backend's owner; OUTPUT to worker 0."""
    text = _steered(4, probes=True)
    assert _chain(text, "SNATGW-POST") == [
        "-A SNATGW-POST -o out0 -m mark --mark 0x20000000/0x20000000 -j SNATGW-SRC"
    ]
    pre = _chain(text, "SNATGW-PRE")
    assert pre == [
        "-A SNATGW-PRE -i in0 -m addrtype ! --dst-type LOCAL -j MARK --set-xmark 0x20000000/0x20000000",
        "-A SNATGW-PRE -i out0 -d 198.51.100.10/32 -j SNATGW-PORT",
        "-A SNATGW-PRE -i out0 -d 198.51.100.20/32 -p tcp -j NFQUEUE --queue-num 13",
        "-A SNATGW-PRE -i out0 -d 198.51.100.20/32 -j NFQUEUE --queue-num 12",
        "-A SNATGW-PRE -i in0 -d 198.51.100.10/32 -j MARK --set-xmark 0x40000000/0x40000000",
        "-A SNATGW-PRE -i in0 -d 198.51.100.10/32 -j SNATGW-SRC",
        "-A SNATGW-PRE -i in0 -d 198.51.100.20/32 -j MARK --set-xmark 0x40000000/0x40000000",
        "-A SNATGW-PRE -i in0 -d 198.51.100.20/32 -j SNATGW-SRC",
    ]
    out = _chain(text, "SNATGW-OUT")
    assert out and all(ln.endswith("-j NFQUEUE --queue-num 10") for ln in out)
    assert "-A SNATGW-GUARD -o out0 -m mark --mark 0x20000000/0x20000000 -j DROP" in _table(text, "mangle")
    assert "--queue-bypass" not in text
    queues = {int(n) for n in re.findall(r"--queue-num (\d+)", text)}
    assert queues == set(range(10, 18))


def test_steering_chains_are_declared_and_stale_ones_deleted_in_the_same_commit() -> None:
    """With workers the two steering chains are declared (emptied) with ours; going back to one
    worker or to the guard empties and deletes them in that commit, after nothing jumps there."""
    steered = _table(_steered(2), "mangle")
    assert ":SNATGW-PORT - [0:0]" in steered and ":SNATGW-SRC - [0:0]" in steered
    assert not any(ln.startswith("-X") for ln in steered)
    for text in (
        ruleset("in0", "out0", 10, [PUB], 11, chains=STEER_CHAINS),
        ruleset("in0", "out0", 0, [], None, translate=False, chains=STEER_CHAINS, workers=4),
    ):
        mangle = _table(text, "mangle")
        assert mangle[-2:] == ["-X SNATGW-PORT", "-X SNATGW-SRC"]
        assert ":SNATGW-SRC - [0:0]" in mangle
        assert not any("-j SNATGW-SRC" in ln or "-j SNATGW-PORT" in ln for ln in mangle)
    assert "-X" not in ruleset("in0", "out0", 10, [PUB], 11, workers=2, chains=STEER_CHAINS)


def test_workers_that_cannot_be_steered_are_refused() -> None:
    """Several workers need the netlink queue pairs, queue numbers that exist, and owners in range."""
    with pytest.raises(ValueError, match="tcp_queue"):
        ruleset("in0", "out0", 10, [PUB], None, workers=2)
    with pytest.raises(ValueError, match="queue numbers"):
        ruleset("in0", "out0", 65530, [PUB], 65531, workers=4)
    with pytest.raises(ValueError, match="owners"):
        ruleset("in0", "out0", 10, [PUB, INST], 11, workers=2, owners={INST: 2})
    with pytest.raises(ValueError, match="workers"):
        ruleset("in0", "out0", 10, [PUB], 11, workers=MAX_WORKERS + 1)
    with pytest.raises(ValueError, match="values"):
        iptables.u32_values(list(range(U32_MAX_VALUES + 1)))
    assert steering("in0", "out0", 0, [], 2, {})[-1] == "-A SNATGW-SRC -j DROP"


def test_apply_reads_the_rules_once_and_deletes_steering_chains_it_no_longer_uses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """apply: one iptables-save (jumps and steering chains), one iptables-restore whose input
    deletes the steering chains a one-worker rule set does not use."""
    saved = "*mangle\n:SNATGW-PRE - [0:0]\n:SNATGW-SRC - [0:0]\n-A PREROUTING -j SNATGW-PRE\nCOMMIT\n"
    calls: list[tuple[list[str], str | None]] = []

    def fake_run(argv: list[str], data: str | None = None) -> subprocess.CompletedProcess[str]:
        calls.append((list(argv), data))
        return subprocess.CompletedProcess(argv, 0, saved if argv[0] == "iptables-save" else "", "")

    monkeypatch.setattr(iptables, "_run", fake_run)
    assert iptables.apply("in0", "out0", 10, [PUB], 11) == len(iptables.JUMPS) - 1
    assert [c[0][0] for c in calls] == ["iptables-save", "iptables-restore"]
    text = calls[1][1] or ""
    assert "-D PREROUTING -j SNATGW-PRE" in text and "-X SNATGW-SRC" in text and "-X SNATGW-PORT" not in text
    assert iptables.steering_present(saved) == [("mangle", "SNATGW-SRC")]
