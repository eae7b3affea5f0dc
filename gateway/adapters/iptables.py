"""The gateway's iptables rules (docs/kernel.md, "Diverting packets", "Guard",
"Fragments").

All rules live in chains of our own (``SNATGW-*``) reached by one jump from
each built-in chain. Every change, from start and reload to the guard a stop
leaves, is one ``iptables-restore --noflush`` input that removes our old
jumps, empties and refills our chains and inserts the jumps again: each table
is one commit, so there is never a moment with half a rule set or none
(docs/kernel.md, "Pitfalls", "Delete-then-install leaks").

What the rules do:
- raw PREROUTING: packets arriving on the outside with one of the public
  addresses as their source are dropped (forged: only a hairpinned sender
  has such a source, and it never crosses the outside); no conntrack for
  forwarded inside traffic and for traffic to the public addresses, from
  the outside and (hairpin) from the inside (the kernel must not track
  tuples we rewrite); one ``-m socket`` rule that never matches (``-i lo``) but makes the kernel
  reassemble IPv4 fragments in this namespace without conntrack
  (docs/kernel.md, "Fragments");
- mangle PREROUTING: mark forwarded inside traffic; queue traffic arriving
  on the outside for a public address (return traffic and new inbound flows,
  rewritten before the routing decision); mark traffic arriving on the
  *inside* for a public address with ``Mark.HAIRPIN`` and queue it (hairpin:
  the mark is how the loop tells it from out2in, docs/kernel.md "Hairpin");
- mangle POSTROUTING: queue marked inside traffic leaving on the outside,
  then the **guard**: marked inside traffic that reaches the end of our rules
  unqueued is dropped. A queued packet that comes back accepted continues at
  the next hook, so it never meets the guard;
- mangle OUTPUT: queue the ICMP errors the gateway host itself sends on the
  outside (they may quote a translated return packet: ``local_out``) and,
  with health probes configured, the TCP SYNs the host sends on the inside
  (probes: ``local_out`` holds them to the backend's inbound security rules);
- filter FORWARD: from the outside to the inside only packets the gateway
  translated (it marks them) pass.

The guard (the mark rule, the guard drop, the FORWARD filter) is what a
crashed run and, with ``stopped = "block"``, a stopped one leaves behind:
nothing from the inside leaves and nothing gets in, whatever the forwarding
switch says. No ``--queue-bypass``: without the gateway the kernel drops
queued packets (fail closed).
"""

from __future__ import annotations

import ipaddress
import subprocess
from collections.abc import Iterable, Sequence

from gateway.adapters.kernel import Mark

CHAIN_PREFIX = "SNATGW-"

#: (table, built-in chain, our chain), in the order the jumps must sit: the
#: guard comes after the queue rules in POSTROUTING.
JUMPS: tuple[tuple[str, str, str], ...] = (
    ("raw", "PREROUTING", "SNATGW-PRE"),
    ("mangle", "PREROUTING", "SNATGW-PRE"),
    ("mangle", "POSTROUTING", "SNATGW-POST"),
    ("mangle", "POSTROUTING", "SNATGW-GUARD"),
    ("mangle", "OUTPUT", "SNATGW-OUT"),
    ("filter", "FORWARD", "SNATGW-FWD"),
)
TABLES = ("raw", "mangle", "filter")

#: ICMP types queued from OUTPUT: the errors the host may send about a packet
#: it received (RFC 792), which quote that packet.
LOCAL_ICMP_ERRORS = (3, 4, 5, 11, 12)


def ruleset(
    inside: str,
    outside: str,
    queue: int,
    publics: Iterable[int],
    tcp_queue: int | None = None,
    *,
    translate: bool = True,
    probes: bool = False,
    existing: Iterable[tuple[str, str, str]] = (),
) -> str:
    """The ``iptables-restore --noflush`` input that puts one gateway's rules in place.

    With ``tcp_queue`` TCP goes to that queue (the GSO one) and everything
    else to ``queue``. With ``probes`` the TCP SYNs the host sends on the
    inside are queued too, on ``queue`` (the plain queue: the kernel
    completes a local packet's checksum there, and a SYN is never GSO).
    Without ``translate`` only the guard is left (nothing
    is queued, inside traffic to the outside is dropped). ``existing`` lists
    the jumps into our chains present now (one entry per rule, as
    :func:`jumps_present` reads them): they are deleted in the same commit
    and inserted again in order, so no jump is doubled or missing.
    """
    pubs = [str(ipaddress.IPv4Address(p)) for p in publics] if translate else []
    m_in = f"0x{Mark.INSIDE:x}/0x{Mark.INSIDE:x}"
    m_tr = f"0x{Mark.TRANSLATED:x}/0x{Mark.TRANSLATED:x}"
    m_hp = f"0x{Mark.HAIRPIN:x}/0x{Mark.HAIRPIN:x}"
    q = f"-j NFQUEUE --queue-num {queue}"
    qt = f"-p tcp -j NFQUEUE --queue-num {tcp_queue}"
    fwd_inside = f"-i {inside} -m addrtype ! --dst-type LOCAL"
    body: dict[str, list[str]] = {t: [] for t in TABLES}
    raw, mangle, filt = body["raw"], body["mangle"], body["filter"]
    if translate:
        # From the outside, a public address of ours as the source is forged (a
        # hairpinned sender is never seen there): dropped before it can open or
        # touch a flow (docs/kernel.md, "Hairpin").
        raw += [f"-A SNATGW-PRE -i {outside} -s {p}/32 -j DROP" for p in pubs]
        raw.append(f"-A SNATGW-PRE {fwd_inside} -j CT --notrack")
        raw += [f"-A SNATGW-PRE -i {outside} -d {p}/32 -j CT --notrack" for p in pubs]
        raw += [f"-A SNATGW-PRE -i {inside} -d {p}/32 -j CT --notrack" for p in pubs]
        raw.append("-A SNATGW-PRE -i lo -m socket -j RETURN")
    mangle.append(f"-A SNATGW-PRE {fwd_inside} -j MARK --set-xmark {m_in}")
    for p in pubs:
        if tcp_queue is not None:
            mangle.append(f"-A SNATGW-PRE -i {outside} -d {p}/32 {qt}")
        mangle.append(f"-A SNATGW-PRE -i {outside} -d {p}/32 {q}")
    for p in pubs:
        # Hairpin: the mark first (the loop reads it off the queued packet), then the queue.
        mangle.append(f"-A SNATGW-PRE -i {inside} -d {p}/32 -j MARK --set-xmark {m_hp}")
        if tcp_queue is not None:
            mangle.append(f"-A SNATGW-PRE -i {inside} -d {p}/32 {qt}")
        mangle.append(f"-A SNATGW-PRE -i {inside} -d {p}/32 {q}")
    if translate:
        if tcp_queue is not None:
            mangle.append(f"-A SNATGW-POST -o {outside} -m mark --mark {m_in} {qt}")
        mangle.append(f"-A SNATGW-POST -o {outside} -m mark --mark {m_in} {q}")
        icmp = f"-A SNATGW-OUT -o {outside} -p icmp -m icmp --icmp-type"
        mangle += [f"{icmp} {t} {q}" for t in LOCAL_ICMP_ERRORS]
        if probes:
            mangle.append(f"-A SNATGW-OUT -o {inside} -p tcp -m tcp --syn {q}")
    mangle.append(f"-A SNATGW-GUARD -o {outside} -m mark --mark {m_in} -j DROP")
    filt.append(f"-A SNATGW-FWD -i {outside} -o {inside} -m mark ! --mark {m_tr} -j DROP")
    have = list(existing)
    lines: list[str] = []
    for table in TABLES:
        lines.append(f"*{table}")
        lines += [f":{c} - [0:0]" for t, _b, c in _unique_chains(table)]
        lines += [f"-D {b} -j {c}" for t, b, c in have if t == table]
        lines += body[table]
        # Inserting at 1 in reverse keeps JUMPS' order within a built-in chain.
        lines += [f"-I {b} 1 -j {c}" for t, b, c in reversed(JUMPS) if t == table]
        lines.append("COMMIT")
    lines.append("")
    return "\n".join(lines)


def _unique_chains(table: str) -> list[tuple[str, str, str]]:
    seen: set[str] = set()
    out = []
    for t, b, c in JUMPS:
        if t == table and c not in seen:
            seen.add(c)
            out.append((t, b, c))
    return out


def _run(argv: Sequence[str], data: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), input=data, capture_output=True, text=True, check=False)


def jumps_present() -> list[tuple[str, str, str]]:
    """Jumps from built-in chains into ours, one entry per rule (from ``iptables-save``)."""
    res = _run(["iptables-save"])
    if res.returncode != 0:
        raise RuntimeError(f"iptables-save failed: {res.stderr.strip()}")
    found: list[tuple[str, str, str]] = []
    table = ""
    for line in res.stdout.splitlines():
        if line.startswith("*"):
            table = line[1:]
            continue
        parts = line.split()
        if len(parts) == 4 and parts[0] == "-A" and parts[2] == "-j" and (table, parts[1], parts[3]) in JUMPS:
            found.append((table, parts[1], parts[3]))
    return found


def apply(
    inside: str,
    outside: str,
    queue: int,
    publics: Iterable[int],
    tcp_queue: int | None = None,
    *,
    translate: bool = True,
    probes: bool = False,
) -> int:
    """Put the rules in place in one ``iptables-restore`` (start, reload, stop to the guard).

    Whatever was there (a crashed run's rules, the guard, our own rules of
    before a reload) is replaced in the same commit per table, never removed
    first. Returns how many of our jumps were missing before (a firewall
    reload that flushed the built-in chains takes them away); raises
    RuntimeError on failure, leaving the old rules as they were.
    """
    existing = jumps_present()
    text = ruleset(
        inside, outside, queue, publics, tcp_queue, translate=translate, probes=probes, existing=existing
    )
    res = _run(["iptables-restore", "--noflush", "-w"], text)
    if res.returncode != 0:
        raise RuntimeError(f"iptables-restore failed: {res.stderr.strip()}")
    return sum(1 for j in JUMPS if j not in existing)


def guard(inside: str, outside: str) -> bool:
    """Leave only the guard (``stopped = "block"``): nothing queued, nothing from
    the inside leaves, nothing unsolicited gets in.

    Never raises, so the rest of a stop still runs: if the swap fails the old
    rules stay as they were (queue rules nobody answers drop, the guard drops
    the rest), and False says so.
    """
    try:
        apply(inside, outside, 0, (), None, translate=False)
    except (OSError, RuntimeError):
        return False
    return True


def remove() -> None:
    """Delete our jumps and chains wherever they are; safe to call any time.

    Only for ``stopped = "remove"``, after forwarding is put back: without
    the guard a host with forwarding on routes inside traffic untranslated.
    """
    for table, builtin, chain in dict.fromkeys(JUMPS):
        for _ in range(64):
            if _run(["iptables", "-w", "-t", table, "-D", builtin, "-j", chain]).returncode:
                break
    for table, _builtin, chain in dict.fromkeys(JUMPS):
        _run(["iptables", "-w", "-t", table, "-F", chain])
        _run(["iptables", "-w", "-t", table, "-X", chain])


def present() -> list[str]:
    """Lines of ``iptables-save`` that mention our chains (empty when clean)."""
    res = _run(["iptables-save"])
    return [line for line in res.stdout.splitlines() if CHAIN_PREFIX in line]
