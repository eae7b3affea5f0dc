"""The lab's layout: addresses, interface and namespace names, state paths.

Pure data and pure functions (no system change, no root), so that configs, tests and the
``snatgw lab`` summary can all name the same addresses; :mod:`gateway.lab.topology` builds
the namespaces from it.  See that module for the picture.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

INSIDE_GW = "10.10.0.1"
INSIDE_PREFIXLEN = 16
POOL_MEMBERS = ("10.10.1.1", "10.10.1.2", "10.10.1.3")
INSTANCE_BACKEND = "10.10.2.1"
STANDALONE = ("10.10.3.1", "10.10.3.2")
OUTSIDE_GW = "198.51.100.1"
OUTSIDE_PREFIXLEN = 24
SERVER = "198.51.100.2"
SERVER2 = "198.51.100.3"
FRONTEND_IP = "198.51.100.10"
INSTANCE_PUBLIC = "198.51.100.20"
DEFAULT_SNAT = ("198.51.100.30", "198.51.100.31")
WHOAMI_HTTP_PORT = 80
WHOAMI_UDP_PORT = 5000
#: The myip DNS responder (gateway.lab.dns) beside whoami: ``nslookup myip.opendns.com SERVER``.
DNS_PORT = 53
MYIP_NAME = "myip.opendns.com"
#: Inbound member listeners (gateway.lab.inbound): the lab.toml lb_rule's backend port.
MEMBER_PORT = 8080

# A client run as uid BACKEND_UID_BASE + i (see clients.as_backend) leaves from the i-th
# backend address: a policy rule per uid picks a routing table whose routes carry that
# source, because nslookup (unlike curl --interface or ping -I) cannot bind an address.
# Covers the first ROUTED_BACKENDS addresses of backend_addresses().
BACKEND_UID_BASE = 64000
BACKEND_TABLE_BASE = 1000
ROUTED_BACKENDS = 32

# Interface names inside the namespaces; identical in every lab (they live in different
# namespaces, so they never clash).
BE_IF = "be0"
GW_IN_IF = "in0"
GW_OUT_IF = "out0"
INET_IF = "eth0"

STATE_ROOT = Path("/run/snatgw-lab")

# Extra backends: 10.10.100.1 .. 10.10.100.250, 10.10.101.1 .. 10.10.101.250, ...
# (250 per /24 so that .0 and .251-.255 are never used), up to 10.10.255.250.
EXTRA_BASE_THIRD_OCTET = 100
EXTRA_PER_OCTET = 250
EXTRA_MAX = (256 - EXTRA_BASE_THIRD_OCTET) * EXTRA_PER_OCTET

_PREFIX_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,19}$")
WHOAMI_MODULE = "gateway.lab.whoami"
DNS_MODULE = "gateway.lab.dns"


@dataclass(frozen=True, slots=True)
class LabNames:
    """Namespace names of one lab; derived from the prefix so several labs can coexist."""

    prefix: str
    be: str
    gw: str
    inet: str


def names(prefix: str = "snatgw") -> LabNames:
    """Return the namespace names for ``prefix`` (no system change)."""
    check_prefix(prefix)
    return LabNames(prefix=prefix, be=f"{prefix}-be", gw=f"{prefix}-gw", inet=f"{prefix}-inet")


def state_dir(prefix: str = "snatgw") -> Path:
    """Directory holding the lab's whoami pid file and log (under /run, gone on reboot)."""
    check_prefix(prefix)
    return STATE_ROOT / prefix


def whoami_log_path(prefix: str = "snatgw") -> Path:
    """JSON-lines log of every peer whoami saw: what the internet received."""
    return state_dir(prefix) / "whoami.log"


def whoami_pid_path(prefix: str = "snatgw") -> Path:
    """Pid file written by the daemonised whoami once its sockets are bound."""
    return state_dir(prefix) / "whoami.pid"


def dns_log_path(prefix: str = "snatgw") -> Path:
    """JSON-lines log of every query the myip DNS responder answered."""
    return state_dir(prefix) / "dns.log"


def dns_pid_path(prefix: str = "snatgw") -> Path:
    """Pid file written by the daemonised DNS responder once its sockets are bound."""
    return state_dir(prefix) / "dns.pid"


def backend_uid(addr: str, extra_backends: Sequence[str] = ()) -> int:
    """The uid whose unbound sockets leave from backend ``addr`` (see ROUTED_BACKENDS)."""
    addrs = backend_addresses(extra_backends)[:ROUTED_BACKENDS]
    if addr not in addrs:
        raise ValueError(f"{addr} is not one of the lab's first {ROUTED_BACKENDS} backends")
    return BACKEND_UID_BASE + addrs.index(addr)


def extra_backend_addresses(count: int) -> tuple[str, ...]:
    """The documented extra-backend scheme: 10.10.100.1.., 250 addresses per third octet.

    Deterministic so that a config naming ``extra_backend_addresses(57)`` matches the lab
    brought up with the same count.
    """
    if count < 0 or count > EXTRA_MAX:
        raise ValueError(f"extra backend count must be in 0..{EXTRA_MAX}, got {count}")
    return tuple(
        f"10.10.{EXTRA_BASE_THIRD_OCTET + i // EXTRA_PER_OCTET}.{i % EXTRA_PER_OCTET + 1}"
        for i in range(count)
    )


def backend_addresses(extra_backends: Sequence[str] = ()) -> tuple[str, ...]:
    """All addresses put on be0, in order: pool members first (so 10.10.1.1 is primary)."""
    base = (*POOL_MEMBERS, INSTANCE_BACKEND, *STANDALONE)
    inside = ipaddress.ip_network(f"{INSIDE_GW}/{INSIDE_PREFIXLEN}", strict=False)
    seen = set(base)
    out = list(base)
    for raw in extra_backends:
        addr = ipaddress.IPv4Address(raw)
        text = str(addr)
        if addr not in inside or text == INSIDE_GW or addr in (inside.network_address,
                                                              inside.broadcast_address):
            raise ValueError(f"extra backend {text} is not a usable host of {inside}")
        if text not in seen:
            seen.add(text)
            out.append(text)
    return tuple(out)


def check_prefix(prefix: str) -> None:
    if not _PREFIX_RE.match(prefix):
        raise ValueError(
            f"lab prefix {prefix!r} must be 1-20 chars of [a-z0-9_-], "
            "starting with a letter or digit"
        )
