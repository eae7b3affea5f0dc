"""Addresses and forwarding on the gateway host, through pyroute2 and /proc.

The public addresses belong to snatgw: it adds each one as a /32 on the
outside interface (so that ARP for it is answered: docs/kernel.md, "Diverting
packets") and removes them all when it stops, including any that a crashed
run left.
"""

from __future__ import annotations

import ipaddress
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
