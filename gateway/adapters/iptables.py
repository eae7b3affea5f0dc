"""The gateway's iptables rules (docs/kernel.md, "Diverting packets").

All rules live in chains of our own (``SNATGW-*``) reached by one jump from
each built-in chain, installed in one ``iptables-restore --noflush`` call so
the rule set appears atomically. Removal is idempotent and also clears what
a crashed run left behind.

What the rules do:
- raw PREROUTING: no conntrack for forwarded inside traffic and for traffic
  to the public addresses (the kernel must not track tuples we rewrite);
- mangle PREROUTING: mark forwarded inside traffic; queue traffic arriving
  on the outside for a public address (return traffic, rewritten before the
  routing decision);
- mangle POSTROUTING: queue marked inside traffic leaving on the outside;
- filter FORWARD: from the outside to the inside only packets the gateway
  translated (it marks them) pass.
No ``--queue-bypass``: without the gateway the kernel drops queued packets
(fail closed).
"""

from __future__ import annotations

import ipaddress
import subprocess
from collections.abc import Iterable, Sequence

from gateway.adapters.kernel import Mark

CHAIN_PREFIX = "SNATGW-"

#: (table, built-in chain, our chain)
JUMPS: tuple[tuple[str, str, str], ...] = (
    ("raw", "PREROUTING", "SNATGW-PRE"),
    ("mangle", "PREROUTING", "SNATGW-PRE"),
    ("mangle", "POSTROUTING", "SNATGW-POST"),
    ("filter", "FORWARD", "SNATGW-FWD"),
)


def ruleset(
    inside: str,
    outside: str,
    queue: int,
    publics: Iterable[int],
    tcp_queue: int | None = None,
    jumps: bool = True,
) -> str:
    """The ``iptables-restore --noflush`` input for one gateway.

    With ``tcp_queue`` TCP goes to that queue (the GSO one) and everything
    else to ``queue``. Without ``jumps`` it only refills our chains: declaring
    a chain in ``iptables-restore`` empties it, and each table is committed
    at once, so a reload swaps the rules with no moment without them.
    """
    jump = (lambda line: [line]) if jumps else (lambda line: [])
    pubs = [str(ipaddress.IPv4Address(p)) for p in publics]
    m_in = f"0x{Mark.INSIDE:x}/0x{Mark.INSIDE:x}"
    m_tr = f"0x{Mark.TRANSLATED:x}/0x{Mark.TRANSLATED:x}"
    q = f"-j NFQUEUE --queue-num {queue}"
    qt = f"-p tcp -j NFQUEUE --queue-num {tcp_queue}"
    fwd_inside = f"-i {inside} -m addrtype ! --dst-type LOCAL"
    lines = ["*raw", ":SNATGW-PRE - [0:0]", f"-A SNATGW-PRE {fwd_inside} -j CT --notrack"]
    lines += [f"-A SNATGW-PRE -i {outside} -d {p}/32 -j CT --notrack" for p in pubs]
    lines += [*jump("-I PREROUTING 1 -j SNATGW-PRE"), "COMMIT"]
    lines += ["*mangle", ":SNATGW-PRE - [0:0]", ":SNATGW-POST - [0:0]"]
    lines += [f"-A SNATGW-PRE {fwd_inside} -j MARK --set-xmark {m_in}"]
    for p in pubs:
        if tcp_queue is not None:
            lines += [f"-A SNATGW-PRE -i {outside} -d {p}/32 {qt}"]
        lines += [f"-A SNATGW-PRE -i {outside} -d {p}/32 {q}"]
    if tcp_queue is not None:
        lines += [f"-A SNATGW-POST -o {outside} -m mark --mark {m_in} {qt}"]
    lines += [f"-A SNATGW-POST -o {outside} -m mark --mark {m_in} {q}"]
    lines += [*jump("-I PREROUTING 1 -j SNATGW-PRE"), *jump("-I POSTROUTING 1 -j SNATGW-POST"), "COMMIT"]
    lines += ["*filter", ":SNATGW-FWD - [0:0]"]
    lines += [f"-A SNATGW-FWD -i {outside} -o {inside} -m mark ! --mark {m_tr} -j DROP"]
    lines += [*jump("-I FORWARD 1 -j SNATGW-FWD"), "COMMIT", ""]
    return "\n".join(lines)


def _run(argv: Sequence[str], data: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), input=data, capture_output=True, text=True, check=False)


def install(
    inside: str, outside: str, queue: int, publics: Iterable[int], tcp_queue: int | None = None
) -> None:
    """Remove any stale rules, then install ours atomically; raise RuntimeError on failure."""
    remove()
    text = ruleset(inside, outside, queue, publics, tcp_queue)
    res = _run(["iptables-restore", "--noflush", "-w"], text)
    if res.returncode != 0:
        raise RuntimeError(f"iptables-restore failed: {res.stderr.strip()}")


def replace(
    inside: str, outside: str, queue: int, publics: Iterable[int], tcp_queue: int | None = None
) -> int:
    """Swap the rules of our installed chains for a new set (a reload); raise RuntimeError on failure.

    A firewall reload that flushed the built-in chains also took our jumps
    away, and with them the translation; they are put back here, after the
    chains are refilled. Returns how many jumps had to be restored.
    """
    text = ruleset(inside, outside, queue, publics, tcp_queue, jumps=False)
    res = _run(["iptables-restore", "--noflush", "-w"], text)
    if res.returncode != 0:
        raise RuntimeError(f"iptables-restore failed: {res.stderr.strip()}")
    restored = 0
    for table, builtin, chain in JUMPS:
        if _run(["iptables", "-w", "-t", table, "-C", builtin, "-j", chain]).returncode:
            res = _run(["iptables", "-w", "-t", table, "-I", builtin, "1", "-j", chain])
            if res.returncode != 0:
                raise RuntimeError(f"iptables -I {builtin} failed: {res.stderr.strip()}")
            restored += 1
    return restored


def remove() -> None:
    """Delete our jumps and chains wherever they are; safe to call any time."""
    for table, builtin, chain in JUMPS:
        for _ in range(64):
            if _run(["iptables", "-w", "-t", table, "-D", builtin, "-j", chain]).returncode:
                break
    for table, _builtin, chain in JUMPS:
        _run(["iptables", "-w", "-t", table, "-F", chain])
        _run(["iptables", "-w", "-t", table, "-X", chain])


def present() -> list[str]:
    """Lines of ``iptables-save`` that mention our chains (empty when clean)."""
    res = _run(["iptables-save"])
    return [line for line in res.stdout.splitlines() if CHAIN_PREFIX in line]
