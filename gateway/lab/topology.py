"""The three-namespace lab that every integration test, the demo and the benchmark run in.

Layout (all links are veth pairs, created directly inside the namespaces so that nothing
is ever attached to the host's own interfaces and several labs can exist side by side)::

    <prefix>-be                     <prefix>-gw                        <prefix>-inet
    be0  10.10.x.y/16 (many)  <->   in0  10.10.0.1/16
                                    out0 198.51.100.1/24    <->   eth0 198.51.100.2/24
                                                                       198.51.100.3/24

* ``be`` holds every backend address (pool members, the instance-IP backend, the standalone
  backends and any extra backends) on one interface, with a default route via the gateway.
* ``gw`` is left as a plain router-to-be: no forwarding, no public addresses, no NAT.  The
  gateway process turns on what it needs and removes it again, so a test can tell what the
  gateway did from what the lab did.
* ``inet`` has no default route and no route back to 10.0.0.0/8: a packet that leaks out
  with a private source is never answered, which makes leaks fail loudly instead of
  silently "working".

The whoami echo service (``gateway.lab.whoami``) runs daemonised in ``inet``; its pid file
and JSON log live in :func:`state_dir`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2 import NetNS, netns

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
_WHOAMI_MODULE = "gateway.lab.whoami"


@dataclass(frozen=True, slots=True)
class LabNames:
    """Namespace names of one lab; derived from the prefix so several labs can coexist."""

    prefix: str
    be: str
    gw: str
    inet: str


class LabError(RuntimeError):
    """The lab could not be built or torn down (the message says which step)."""


class LabCommandError(subprocess.CalledProcessError):
    """A command run in a namespace failed; unlike the base class, str() shows its stderr."""

    def __str__(self) -> str:
        base = super().__str__()
        err = self.stderr.decode(errors="replace").strip() if self.stderr else ""
        return f"{base}: {err[-2000:]}" if err else base


def names(prefix: str = "snatgw") -> LabNames:
    """Return the namespace names for ``prefix`` (no system change)."""
    _check_prefix(prefix)
    return LabNames(prefix=prefix, be=f"{prefix}-be", gw=f"{prefix}-gw", inet=f"{prefix}-inet")


def state_dir(prefix: str = "snatgw") -> Path:
    """Directory holding the lab's whoami pid file and log (under /run, gone on reboot)."""
    _check_prefix(prefix)
    return STATE_ROOT / prefix


def whoami_log_path(prefix: str = "snatgw") -> Path:
    """JSON-lines log of every peer whoami saw: what the internet received."""
    return state_dir(prefix) / "whoami.log"


def whoami_pid_path(prefix: str = "snatgw") -> Path:
    """Pid file written by the daemonised whoami once its sockets are bound."""
    return state_dir(prefix) / "whoami.pid"


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


# --------------------------------------------------------------------------- commands


def ns_run(
    ns: str,
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 30,
    input: bytes | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` inside namespace ``ns`` and capture its output (bounded by ``timeout``).

    ``ip netns exec`` execs the program in place, so a timeout kills the program itself.
    With ``check`` a failure raises :class:`LabCommandError` carrying stderr.
    """
    cmd = ["ip", "netns", "exec", ns, *argv]
    res = subprocess.run(
        cmd,
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    if check and res.returncode != 0:
        raise LabCommandError(res.returncode, cmd, res.stdout, res.stderr)
    return res


def ns_popen(ns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """Start ``argv`` in namespace ``ns``; the returned pid is the program's own pid."""
    return subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kwargs)


def _sysctl(ns: str, settings: dict[str, str | int]) -> None:
    ns_run(ns, ["sysctl", "-q", "-w", *(f"{k}={v}" for k, v in settings.items())], timeout=10)


# --------------------------------------------------------------------------- up / down


def lab_up(
    prefix: str = "snatgw",
    *,
    extra_backends: Sequence[str] = (),
    mtu: int = 1500,
    whoami: bool = True,
) -> LabNames:
    """Build the lab from scratch (a stale lab of the same prefix is removed first).

    On any failure the partial lab is torn down again before the error propagates, so a
    failed ``lab_up`` never leaves namespaces behind.
    """
    _require_root()
    if not 68 <= mtu <= 65535:
        raise ValueError(f"mtu must be in 68..65535, got {mtu}")
    lab = names(prefix)
    addrs = backend_addresses(extra_backends)
    lab_down(prefix)
    try:
        _build(lab, addrs, mtu)
        sdir = state_dir(prefix)
        sdir.mkdir(parents=True, exist_ok=True)
        if whoami:
            _start_whoami(lab)
    except BaseException:
        lab_down(prefix)
        raise
    return lab


def lab_down(prefix: str = "snatgw") -> None:
    """Stop the lab's whoami (by its pid file) and delete its three namespaces; idempotent.

    Other processes still inside the namespaces are not ours to kill: they are reported on
    stderr, and the namespaces' names are removed anyway (their interfaces then go away
    with the last such process).
    """
    _require_root()
    lab = names(prefix)
    _stop_whoami(prefix)
    existing = set(_list_netns())
    for ns in (lab.be, lab.gw, lab.inet):
        if ns not in existing:
            continue
        stray = _ns_pids(ns)
        if stray:
            print(
                f"snatgw lab: warning: processes still in namespace {ns}: "
                f"{' '.join(map(str, stray))}",
                file=sys.stderr,
            )
        try:
            netns.remove(ns)
        except OSError as exc:
            raise LabError(f"cannot delete namespace {ns}: {exc}") from exc
    sdir = state_dir(prefix)
    if sdir.is_dir():
        for p in sdir.iterdir():
            p.unlink(missing_ok=True)
        sdir.rmdir()


def lab_exists(prefix: str = "snatgw") -> bool:
    """True when any of the lab's namespaces exists."""
    lab = names(prefix)
    existing = set(_list_netns())
    return any(ns in existing for ns in (lab.be, lab.gw, lab.inet))


def _build(lab: LabNames, addrs: Sequence[str], mtu: int) -> None:
    for ns in (lab.be, lab.gw, lab.inet):
        netns.create(ns)

    # Links are created down and only brought up after the sysctls below, so that no IPv6
    # link-local chatter (DAD, router solicitations) ever appears in a capture.
    with NetNS(lab.gw) as gw:
        gw.link("add", ifname=GW_IN_IF, kind="veth", peer={"ifname": BE_IF, "net_ns_fd": lab.be})
        gw.link(
            "add", ifname=GW_OUT_IF, kind="veth", peer={"ifname": INET_IF, "net_ns_fd": lab.inet}
        )

    common: dict[str, str | int] = {
        "net.ipv6.conf.all.disable_ipv6": 1,
        "net.ipv6.conf.default.disable_ipv6": 1,
        "net.ipv4.conf.all.rp_filter": 0,
        "net.ipv4.conf.default.rp_filter": 0,
    }
    _sysctl(lab.be, {**common, f"net.ipv4.conf.{BE_IF}.rp_filter": 0})
    _sysctl(
        lab.gw,
        {
            **common,
            f"net.ipv4.conf.{GW_IN_IF}.rp_filter": 0,
            f"net.ipv4.conf.{GW_OUT_IF}.rp_filter": 0,
            "net.ipv4.ip_forward": 0,
        },
    )
    _sysctl(lab.inet, {**common, f"net.ipv4.conf.{INET_IF}.rp_filter": 0})

    with NetNS(lab.gw) as gw:
        _lo_up(gw)
        idx_in = _index(gw, GW_IN_IF)
        idx_out = _index(gw, GW_OUT_IF)
        gw.link("set", index=idx_in, mtu=mtu)
        gw.link("set", index=idx_out, mtu=mtu)
        gw.addr("add", index=idx_in, address=INSIDE_GW, prefixlen=INSIDE_PREFIXLEN)
        gw.addr("add", index=idx_out, address=OUTSIDE_GW, prefixlen=OUTSIDE_PREFIXLEN)
        gw.link("set", index=idx_in, state="up")
        gw.link("set", index=idx_out, state="up")

    with NetNS(lab.be) as be:
        _lo_up(be)
        idx = _index(be, BE_IF)
        be.link("set", index=idx, mtu=mtu)
        # One netlink session for all addresses: ~1000 addresses take under a second.
        for a in addrs:
            be.addr("add", index=idx, address=a, prefixlen=INSIDE_PREFIXLEN)
        be.link("set", index=idx, state="up")
        be.route("add", dst="0.0.0.0/0", gateway=INSIDE_GW, oif=idx)

    with NetNS(lab.inet) as inet:
        _lo_up(inet)
        idx = _index(inet, INET_IF)
        inet.link("set", index=idx, mtu=mtu)
        inet.addr("add", index=idx, address=SERVER, prefixlen=OUTSIDE_PREFIXLEN)
        inet.addr("add", index=idx, address=SERVER2, prefixlen=OUTSIDE_PREFIXLEN)
        inet.link("set", index=idx, state="up")
        # Deliberately no default route and no route to 10.0.0.0/8.


def _lo_up(ipr: NetNS) -> None:
    ipr.link("set", index=_index(ipr, "lo"), state="up")


def _index(ipr: NetNS, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise LabError(f"interface {ifname} not found")
    return int(found[0])


# --------------------------------------------------------------------------- whoami


def _start_whoami(lab: LabNames) -> None:
    pid_path = whoami_pid_path(lab.prefix)
    log_path = whoami_log_path(lab.prefix)
    err_path = state_dir(lab.prefix) / "whoami.stderr"
    pid_path.unlink(missing_ok=True)
    log_path.write_bytes(b"")
    argv = [
        sys.executable,
        "-m",
        _WHOAMI_MODULE,
        "--http-port",
        str(WHOAMI_HTTP_PORT),
        "--udp-port",
        str(WHOAMI_UDP_PORT),
        "--log",
        str(log_path),
        "--pid-file",
        str(pid_path),
        "--stderr",
        str(err_path),
        "--daemon",
    ]
    # --daemon returns only once the sockets are bound and the pid file is written.
    res = ns_run(lab.inet, argv, check=False, timeout=15)
    if res.returncode != 0 or not pid_path.exists():
        detail = res.stderr.decode(errors="replace").strip()
        if err_path.exists():
            detail += "\n" + err_path.read_text(errors="replace")[-2000:]
        raise LabError(f"whoami did not start in {lab.inet} (rc {res.returncode}): {detail}")


def _whoami_pid(prefix: str) -> int | None:
    """The whoami pid from the pid file, only if that process really is this lab's whoami."""
    pid_path = whoami_pid_path(prefix)
    try:
        pid = int(pid_path.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if _WHOAMI_MODULE.encode() not in cmdline or str(pid_path).encode() not in cmdline:
        return None  # pid reused by an unrelated process: not ours to signal
    return pid


def _stop_whoami(prefix: str) -> None:
    pid = _whoami_pid(prefix)
    if pid is None:
        return
    _signal(pid, signal.SIGTERM)
    if not _wait_gone(pid, 3.0):
        _signal(pid, signal.SIGKILL)
        _wait_gone(pid, 3.0)
    whoami_pid_path(prefix).unlink(missing_ok=True)


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.02)
    return False


# --------------------------------------------------------------------------- helpers


def _list_netns() -> list[str]:
    try:
        return sorted(os.listdir(netns.NETNS_RUN_DIR))
    except FileNotFoundError:
        return []


def _ns_pids(ns: str) -> list[int]:
    res = subprocess.run(
        ["ip", "netns", "pids", ns], capture_output=True, timeout=10, check=False
    )
    return [int(x) for x in res.stdout.split() if x.isdigit()]


def _check_prefix(prefix: str) -> None:
    if not _PREFIX_RE.match(prefix):
        raise ValueError(
            f"lab prefix {prefix!r} must be 1-20 chars of [a-z0-9_-], "
            "starting with a letter or digit"
        )


def _require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, veths, sysctls)")
