"""Addresses, forwarding and the inside interface's sysctls on the gateway host,
through pyroute2 and /proc.

The public addresses belong to snatgw: it adds each one as a /32 on the
outside interface (so that ARP for it is answered: docs/kernel.md, "Diverting
packets") and removes them all when it stops, including any that a crashed
run left.

Every sysctl snatgw changes (forwarding; ICMP redirects and accept_local on
the inside interface, for hairpinning: docs/kernel.md "Hairpin") is recorded
before the first change in a file under the state directory, one per network
namespace, so that a clean stop after a crash puts back the host's own value
rather than the crashed run's.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
from collections.abc import Iterable
from pathlib import Path

from pyroute2 import IPRoute

_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


def interface_index(name: str) -> int:
    """Index of interface ``name``; raise LookupError when it does not exist."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
    if not found:
        raise LookupError(f"no interface named {name!r} in this network namespace")
    return int(found[0])


def addresses(ifname: str) -> set[int]:
    """IPv4 addresses on ``ifname``."""
    idx = interface_index(ifname)
    with IPRoute() as ipr:
        return {
            int(ipaddress.IPv4Address(a.get_attr("IFA_ADDRESS"))) for a in ipr.get_addr(family=2, index=idx)
        }


def add_addresses(ifname: str, ips: Iterable[int]) -> list[int]:
    """Add each of ``ips`` as /32 on ``ifname``; return the ones that were added."""
    idx = interface_index(ifname)
    have = addresses(ifname)
    added = []
    with IPRoute() as ipr:
        for ip in ips:
            if ip in have:
                continue
            ipr.addr("add", index=idx, address=str(ipaddress.IPv4Address(ip)), prefixlen=32)
            added.append(ip)
    return added


def remove_addresses(ifname: str, ips: Iterable[int]) -> None:
    """Remove each of ``ips`` from ``ifname`` if present (idempotent)."""
    try:
        idx = interface_index(ifname)
    except LookupError:
        return
    have = addresses(ifname)
    with IPRoute() as ipr:
        for ip in ips:
            if ip in have:
                ipr.addr("del", index=idx, address=str(ipaddress.IPv4Address(ip)), prefixlen=32)


def get_forwarding() -> bool:
    return _FORWARD.read_text().strip() == "1"


def set_forwarding(on: bool) -> None:
    _FORWARD.write_text("1\n" if on else "0\n")


def _state_file(state_dir: Path) -> Path:
    """One file per network namespace: several gateways may share /run."""
    return state_dir / f"forwarding-netns-{os.stat('/proc/self/ns/net').st_ino}"


def enable_forwarding(state_dir: Path) -> None:
    """Turn forwarding on, first recording the value it had before snatgw.

    The record survives a crash, so a later clean stop restores the host's
    own value, not the crashed run's "on" (which would forward untranslated
    inside traffic once our rules are gone).
    """
    state = _state_file(state_dir)
    if not state.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        state.write_text("1\n" if get_forwarding() else "0\n")
    set_forwarding(True)


def restore_forwarding(state_dir: Path) -> None:
    """Put forwarding back to the recorded value (off if there is no record)."""
    state = _state_file(state_dir)
    try:
        before = state.read_text().strip() == "1"
    except OSError:
        before = False
    set_forwarding(before)
    state.unlink(missing_ok=True)


def inside_prefixes(ifname: str) -> tuple[tuple[int, int], ...]:
    """The IPv4 prefixes on ``ifname`` as inclusive address ranges, in address order
    (the VirtualNetwork tag when ``[gateway] address_space`` is not given)."""
    idx = interface_index(ifname)
    with IPRoute() as ipr:
        nets = {
            ipaddress.IPv4Network(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}", strict=False)
            for a in ipr.get_addr(family=2, index=idx)
        }
    return tuple(sorted((int(n.network_address), int(n.broadcast_address)) for n in nets))


def first_address(ifname: str) -> int:
    """The first IPv4 address on ``ifname`` as the kernel lists it (its primary one),
    or 0 when it has none (the AzureLoadBalancer address when ``probe_source`` is
    not given)."""
    idx = interface_index(ifname)
    with IPRoute() as ipr:
        for a in ipr.get_addr(family=2, index=idx):
            return int(ipaddress.IPv4Address(a.get_attr("IFA_ADDRESS")))
    return 0


_CONF = Path("/proc/sys/net/ipv4/conf")


def hairpin_sysctls(inside: str) -> dict[str, str]:
    """The values hairpinning needs on the inside interface (docs/kernel.md, "Hairpin").

    - ``send_redirects`` 0 on the interface and on ``all`` (the kernel ORs the
      two): a hairpinned packet leaves by the interface it came in on, which
      would otherwise make the host tell the backend to go direct;
    - ``accept_local`` 1 on the interface: after the rewrite the packet's
      source is a public address, local to the host, which the routing
      decision drops as a martian unless this is set.
    """
    return {
        "all/send_redirects": "0",
        f"{inside}/send_redirects": "0",
        f"{inside}/accept_local": "1",
    }


def strict_rp_filter(inside: str) -> bool:
    """Whether strict reverse-path filtering applies on ``inside`` (the kernel uses
    the larger of ``all`` and the interface's value; 1 is strict). A hairpinned
    packet's source is a public address, local to the host and routed out the
    other interface, so strict filtering drops it; loose (2) and off (0) do not
    (docs/kernel.md, "Hairpin")."""
    try:
        values = [int((_CONF / k / "rp_filter").read_text()) for k in ("all", inside)]
    except (OSError, ValueError):
        return False
    return max(values) == 1


def _sysctl_state(state_dir: Path) -> Path:
    return state_dir / f"sysctl-netns-{os.stat('/proc/self/ns/net').st_ino}.json"


def set_sysctls(state_dir: Path, values: dict[str, str]) -> None:
    """Set ``net.ipv4.conf`` values (keys ``IFACE/NAME``), recording the ones they
    replace first; a value already recorded (by a run that crashed) is kept."""
    state = _sysctl_state(state_dir)
    try:
        before: dict[str, str] = json.loads(state.read_text())
    except (OSError, ValueError):
        before = {}
    for key in values:
        if key not in before:
            before[key] = (_CONF / key).read_text().strip()
    state_dir.mkdir(parents=True, exist_ok=True)
    state.write_text(json.dumps(before))
    for key, value in values.items():
        (_CONF / key).write_text(value + "\n")


def restore_sysctls(state_dir: Path) -> None:
    """Put back every value :func:`set_sysctls` recorded; one that cannot be written
    (its interface is gone) is skipped. Never raises, so the rest of a stop runs."""
    state = _sysctl_state(state_dir)
    try:
        before: dict[str, str] = json.loads(state.read_text())
    except (OSError, ValueError):
        return
    for key, value in before.items():
        with contextlib.suppress(OSError):
            (_CONF / key).write_text(value + "\n")
    state.unlink(missing_ok=True)
