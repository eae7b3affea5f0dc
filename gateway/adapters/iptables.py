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

With several workers (docs/kernel.md, "Steering"; docs/decisions.md,
"Workers: steering with iptables u32, not queue-balance") the queue rules
go through two more chains of ours in mangle: ``SNATGW-SRC`` sends a packet
to the worker that owns its source address's low four bits (in2out,
hairpin, and what nothing else names), ``SNATGW-PORT`` sends a packet from
the outside to the worker whose SNAT port slice holds its destination port
(TCP, UDP) or its echo reply identifier, and hands the rest to
``SNATGW-SRC``. An instance IP's public address is queued whole to the
worker that owns its backend. Worker ``i`` listens on ``queue + 2i`` (UDP,
ICMP) and ``queue + 2i + 1`` (TCP).

The guard (the mark rule, the guard drop, the FORWARD filter) is what a
crashed run and, with ``stopped = "block"``, a stopped one leaves behind:
nothing from the inside leaves and nothing gets in, whatever the forwarding
switch says. No ``--queue-bypass``: without the gateway the kernel drops
queued packets (fail closed).
"""

from __future__ import annotations

import ipaddress
import subprocess
from collections.abc import Iterable, Mapping, Sequence

from gateway.adapters.kernel import Mark
from gateway.core.shard import MAX_WORKERS, backend_slots, slice_ports

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
#: Chains of ours with no jump from a built-in chain: the steering chains,
#: only present with several workers (reached from SNATGW-PRE and SNATGW-POST;
#: SNATGW-PORT ends in a jump to SNATGW-SRC, so it comes first when deleting).
STEER_CHAINS: tuple[tuple[str, str], ...] = (("mangle", "SNATGW-PORT"), ("mangle", "SNATGW-SRC"))
#: Where the source address is in an IPv4 header, for ``-m u32`` (RFC 791).
_U32_SRC_LOW = "12&0xF"
#: An ICMP echo reply's identifier: the header length from the first word
#: (``0>>22&0x3C`` = IHL * 4), then the high half of the ICMP header's second word.
_U32_ECHO_ID = "0>>22&0x3C@4>>16"
#: Most values in one ``-m u32`` test (XT_U32_MAXSIZE; iptables refuses an 11th).
U32_MAX_VALUES = 10

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
    workers: int = 1,
    owners: Mapping[int, int] | None = None,
    chains: Iterable[tuple[str, str]] = (),
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

    With ``workers`` > 1 (the netlink client: ``tcp_queue`` is ``queue + 1``)
    packets are steered to worker ``i``'s queues ``queue + 2i`` and
    ``queue + 2i + 1`` (:func:`steering`); ``owners`` maps an instance IP's
    public address to the worker that owns its backend. ``chains`` lists
    the steering chains present now (:func:`steering_present`); when this
    rule set does not use them (one worker, or the guard after several) they
    are emptied and deleted in the same commit. With one worker and no
    steering chains present the text is the same as before workers existed.
    """
    if workers != 1 and translate:
        check_workers(queue, tcp_queue, workers, owners or {})
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
    steer = workers > 1 and translate
    if steer:
        mangle += steering(inside, outside, queue, pubs, workers, owners or {})
    else:
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
        if not steer:
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
    gone = set() if steer else set(chains)
    lines: list[str] = []
    for table in TABLES:
        lines.append(f"*{table}")
        lines += [f":{c} - [0:0]" for t, _b, c in _unique_chains(table)]
        lines += [f":{c} - [0:0]" for t, c in STEER_CHAINS if t == table and (steer or (t, c) in gone)]
        lines += [f"-D {b} -j {c}" for t, b, c in have if t == table]
        lines += body[table]
        # Inserting at 1 in reverse keeps JUMPS' order within a built-in chain.
        lines += [f"-I {b} 1 -j {c}" for t, b, c in reversed(JUMPS) if t == table]
        # Emptied by their declaration above and no longer jumped to: deleted.
        lines += [f"-X {c}" for t, c in STEER_CHAINS if t == table and (t, c) in gone]
        lines.append("COMMIT")
    lines.append("")
    return "\n".join(lines)


def check_workers(queue: int, tcp_queue: int | None, workers: int, owners: Mapping[int, int]) -> None:
    """Raise ValueError unless ``workers`` can be steered: the netlink client's
    queue pairs (``tcp_queue`` = ``queue + 1``), all within the 16-bit queue
    numbers, and every instance IP owned by one of the workers."""
    if not 1 <= workers <= MAX_WORKERS:
        raise ValueError(f"workers must be 1..{MAX_WORKERS}, not {workers}")
    if tcp_queue != queue + 1:
        raise ValueError("several workers need the netlink client's queue pairs (tcp_queue = queue + 1)")
    if queue < 0 or queue + 2 * workers - 1 > 0xFFFF:
        raise ValueError(f"queues {queue}..{queue + 2 * workers - 1} are not all queue numbers")
    bad = {a: k for a, k in owners.items() if not 0 <= k < workers}
    if bad:
        raise ValueError(f"instance IP owners out of range: {bad}")


def worker_queues(queue: int, index: int) -> tuple[int, int]:
    """Worker ``index``'s (plain, TCP) queue numbers: ``queue + 2i``, ``queue + 2i + 1``."""
    return queue + 2 * index, queue + 2 * index + 1


def u32_values(values: Sequence[int]) -> str:
    """``v1,v2,...`` for a ``-m u32`` test; ValueError past :data:`U32_MAX_VALUES`."""
    if not 0 < len(values) <= U32_MAX_VALUES:
        raise ValueError(f"a u32 test takes 1..{U32_MAX_VALUES} values, not {len(values)}")
    return ",".join(str(v) for v in values)


def steering(
    inside: str,
    outside: str,
    queue: int,
    pubs: Sequence[str],
    workers: int,
    owners: Mapping[int, int],
) -> list[str]:
    """The mangle queue rules with ``workers`` > 1 (docs/kernel.md, "Steering").

    - ``SNATGW-SRC``: per worker, its ``backend_slots`` as a u32 test on the
      low four bits of the source address, TCP to its TCP queue, the rest to
      its plain queue; the 16 values are split among the workers, so every
      packet matches one of them (a final DROP says so, fail closed);
    - ``SNATGW-PORT``: per worker, TCP and UDP destination ports and the
      echo reply identifier in its SNAT port slice (``slice_ports``), then
      whatever is left (ports below 1024, an LB rule's frontend port, ICMP
      errors, echo requests) to ``SNATGW-SRC`` by the remote's address;
      the worker that gets a packet it does not own re-queues it;
    - in2out (POSTROUTING, marked INSIDE) and hairpin (marked HAIRPIN first)
      jump to ``SNATGW-SRC``; out2in to a PAT address jumps to
      ``SNATGW-PORT``; an instance IP's public address (``owners``: public
      address -> worker) is queued whole to the worker of its backend.
    """
    m_in = f"0x{Mark.INSIDE:x}/0x{Mark.INSIDE:x}"
    m_hp = f"0x{Mark.HAIRPIN:x}/0x{Mark.HAIRPIN:x}"
    owner = {str(ipaddress.IPv4Address(a)): k for a, k in owners.items()}
    rules: list[str] = []
    for p in pubs:
        k = owner.get(p)
        if k is None:
            rules.append(f"-A SNATGW-PRE -i {outside} -d {p}/32 -j SNATGW-PORT")
            continue
        plain, tcp = worker_queues(queue, k)
        rules.append(f"-A SNATGW-PRE -i {outside} -d {p}/32 -p tcp -j NFQUEUE --queue-num {tcp}")
        rules.append(f"-A SNATGW-PRE -i {outside} -d {p}/32 -j NFQUEUE --queue-num {plain}")
    for p in pubs:
        rules.append(f"-A SNATGW-PRE -i {inside} -d {p}/32 -j MARK --set-xmark {m_hp}")
        rules.append(f"-A SNATGW-PRE -i {inside} -d {p}/32 -j SNATGW-SRC")
    rules.append(f"-A SNATGW-POST -o {outside} -m mark --mark {m_in} -j SNATGW-SRC")
    for i in range(workers):
        plain, tcp = worker_queues(queue, i)
        lo, hi = slice_ports(i, workers)
        rules.append(f"-A SNATGW-PORT -p tcp -m tcp --dport {lo}:{hi} -j NFQUEUE --queue-num {tcp}")
        rules.append(f"-A SNATGW-PORT -p udp -m udp --dport {lo}:{hi} -j NFQUEUE --queue-num {plain}")
        rules.append(
            f'-A SNATGW-PORT -p icmp -m icmp --icmp-type 0 -m u32 --u32 "{_U32_ECHO_ID}={lo}:{hi}"'
            f" -j NFQUEUE --queue-num {plain}"
        )
    rules.append("-A SNATGW-PORT -j SNATGW-SRC")
    for i in range(workers):
        plain, tcp = worker_queues(queue, i)
        low = f'-m u32 --u32 "{_U32_SRC_LOW}={u32_values(backend_slots(i, workers))}"'
        rules.append(f"-A SNATGW-SRC -p tcp {low} -j NFQUEUE --queue-num {tcp}")
        rules.append(f"-A SNATGW-SRC {low} -j NFQUEUE --queue-num {plain}")
    rules.append("-A SNATGW-SRC -j DROP")
    return rules


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


def _save() -> str:
    res = _run(["iptables-save"])
    if res.returncode != 0:
        raise RuntimeError(f"iptables-save failed: {res.stderr.strip()}")
    return res.stdout


def jumps_present(saved: str | None = None) -> list[tuple[str, str, str]]:
    """Jumps from built-in chains into ours, one entry per rule (from ``iptables-save``,
    or from its output ``saved``)."""
    found: list[tuple[str, str, str]] = []
    table = ""
    for line in (_save() if saved is None else saved).splitlines():
        if line.startswith("*"):
            table = line[1:]
            continue
        parts = line.split()
        if len(parts) == 4 and parts[0] == "-A" and parts[2] == "-j" and (table, parts[1], parts[3]) in JUMPS:
            found.append((table, parts[1], parts[3]))
    return found


def steering_present(saved: str | None = None) -> list[tuple[str, str]]:
    """The steering chains (:data:`STEER_CHAINS`) that exist now."""
    declared: set[tuple[str, str]] = set()
    table = ""
    for line in (_save() if saved is None else saved).splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":"):
            declared.add((table, line[1:].split()[0]))
    return [c for c in STEER_CHAINS if c in declared]


def apply(
    inside: str,
    outside: str,
    queue: int,
    publics: Iterable[int],
    tcp_queue: int | None = None,
    *,
    translate: bool = True,
    probes: bool = False,
    workers: int = 1,
    owners: Mapping[int, int] | None = None,
) -> int:
    """Put the rules in place in one ``iptables-restore`` (start, reload, stop to the guard).

    Whatever was there (a crashed run's rules, the guard, our own rules of
    before a reload, the steering chains of several workers) is replaced in
    the same commit per table, never removed first. Returns how many of our
    jumps were missing before (a firewall reload that flushed the built-in
    chains takes them away); raises RuntimeError on failure, leaving the old
    rules as they were, and ValueError for ``workers`` it cannot steer
    (:func:`check_workers`).
    """
    saved = _save()
    existing = jumps_present(saved)
    text = ruleset(
        inside, outside, queue, publics, tcp_queue, translate=translate, probes=probes, existing=existing,
        workers=workers, owners=owners, chains=steering_present(saved),
    )  # fmt: skip
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
    chains = [(t, c) for t, _b, c in dict.fromkeys(JUMPS)] + list(STEER_CHAINS)
    for table, chain in dict.fromkeys(chains):
        _run(["iptables", "-w", "-t", table, "-F", chain])
        _run(["iptables", "-w", "-t", table, "-X", chain])


def present() -> list[str]:
    """Lines of ``iptables-save`` that mention our chains (empty when clean)."""
    res = _run(["iptables-save"])
    return [line for line in res.stdout.splitlines() if CHAIN_PREFIX in line]
