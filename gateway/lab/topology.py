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

The whoami echo service (``gateway.lab.whoami``) and the myip DNS responder
(``gateway.lab.dns``, port 53) run daemonised in ``inet``; their pid files and JSON logs
live in :func:`gateway.lab.layout.state_dir`.  In ``be``, a policy rule per uid (see
``layout.BACKEND_UID_BASE``) lets a client that cannot bind an address, such as nslookup,
leave from a chosen backend address (:func:`gateway.lab.clients.as_backend`).  Addresses and names are in
:mod:`gateway.lab.layout`; this module changes the system (root).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from pyroute2 import NetNS, netns

from gateway.lab.layout import (
    BACKEND_TABLE_BASE,
    BACKEND_UID_BASE,
    BE_IF,
    DNS_MODULE,
    DNS_PORT,
    GW_IN_IF,
    GW_OUT_IF,
    INET_IF,
    INSIDE_GW,
    INSIDE_PREFIXLEN,
    OUTSIDE_GW,
    OUTSIDE_PREFIXLEN,
    ROUTED_BACKENDS,
    SERVER,
    SERVER2,
    STATE_ROOT,
    WHOAMI_HTTP_PORT,
    WHOAMI_MODULE,
    WHOAMI_UDP_PORT,
    LabNames,
    backend_addresses,
    check_prefix,
    dns_log_path,
    dns_pid_path,
    names,
    state_dir,
    whoami_log_path,
    whoami_pid_path,
)
from gateway.lab.netns import LabError, list_netns, ns_pids, ns_run, sysctl
from gateway.lab.procs import poll_until, stop_daemon

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
    failed ``lab_up`` never leaves namespaces behind.  ``whoami`` starts the internet
    host's services: whoami and the myip DNS responder.
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
            _start_dns(lab)
    except BaseException:
        lab_down(prefix)
        raise
    return lab


def lab_down(prefix: str = "snatgw") -> None:
    """Stop the lab's whoami and DNS responder (by their pid files) and delete its three
    namespaces; idempotent.

    Other processes still inside the namespaces are not ours to kill: they are reported on
    stderr, and the namespaces' names are removed anyway (their interfaces then go away
    with the last such process).
    """
    _require_root()
    lab = names(prefix)
    _stop_daemon(WHOAMI_MODULE, whoami_pid_path(prefix))
    _stop_daemon(DNS_MODULE, dns_pid_path(prefix))
    existing = set(list_netns())
    for ns in (lab.be, lab.gw, lab.inet):
        if ns not in existing:
            continue
        stray = ns_pids(ns)
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
    existing = set(list_netns())
    return any(ns in existing for ns in (lab.be, lab.gw, lab.inet))


class LabBusy(LabError):
    """Another run holds the lab's lock (see :func:`lab_lock`)."""


@contextlib.contextmanager
def lab_lock(prefix: str = "snatgw", *, wait: float = 0.0) -> Iterator[None]:
    """Hold the lock of lab ``prefix`` for as long as a run uses that lab.

    ``lab_up`` replaces a lab of the same prefix, so two runs (two test sessions, a test
    and a benchmark) must never use one prefix at once: the second waits up to ``wait``
    seconds for the first, then raises :class:`LabBusy`.  The lock is a ``flock`` on a
    file next to the state directory, so it is released when its holder dies.
    """
    check_prefix(prefix)
    STATE_ROOT.mkdir(parents=True, exist_ok=True)
    path = STATE_ROOT / f"{prefix}.lock"
    with path.open("w") as fh:

        def take() -> bool:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            return True

        if not poll_until(take, wait, interval=0.2):
            raise LabBusy(f"lab {prefix} is in use by another run (lock {path})")
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def kernel_nat(
    lab: LabNames, rule: Sequence[str] = (), *, address: str | None = None
) -> Iterator[None]:
    """The kernel's own forwarding in the gateway namespace, optionally with one NAT rule
    (``iptables -t nat -A POSTROUTING -o out0 RULE``) and a public ``address`` on out0.

    The lab's self-test and the benchmark's baseline; never used with snatgw running.
    Whatever was set up is undone in reverse order on exit, also after a failure.
    """
    steps: list[tuple[list[str], list[str]]] = []
    if address is not None:
        addr = ["addr", f"{address}/32", "dev", GW_OUT_IF]
        steps.append((["ip", "addr", "add", *addr[1:]], ["ip", "addr", "del", *addr[1:]]))
    if rule:
        nat = ["iptables", "-w", "-t", "nat"]
        post = ["POSTROUTING", "-o", GW_OUT_IF, *rule]
        steps.append(([*nat, "-A", *post], [*nat, "-D", *post]))
    fwd = ["sysctl", "-q", "-w"]
    steps.append(([*fwd, "net.ipv4.ip_forward=1"], [*fwd, "net.ipv4.ip_forward=0"]))
    undo: list[list[str]] = []
    try:
        for do, un in steps:
            ns_run(lab.gw, do)
            undo.append(un)
        yield
    finally:
        for un in reversed(undo):
            ns_run(lab.gw, un, check=False)


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
    sysctl(lab.be, {**common, f"net.ipv4.conf.{BE_IF}.rp_filter": 0})
    sysctl(
        lab.gw,
        {
            **common,
            f"net.ipv4.conf.{GW_IN_IF}.rp_filter": 0,
            f"net.ipv4.conf.{GW_OUT_IF}.rp_filter": 0,
            "net.ipv4.ip_forward": 0,
        },
    )
    sysctl(lab.inet, {**common, f"net.ipv4.conf.{INET_IF}.rp_filter": 0})

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
    _backend_uid_routes(lab.be, addrs[:ROUTED_BACKENDS])

    with NetNS(lab.inet) as inet:
        _lo_up(inet)
        idx = _index(inet, INET_IF)
        inet.link("set", index=idx, mtu=mtu)
        inet.addr("add", index=idx, address=SERVER, prefixlen=OUTSIDE_PREFIXLEN)
        inet.addr("add", index=idx, address=SERVER2, prefixlen=OUTSIDE_PREFIXLEN)
        inet.link("set", index=idx, state="up")
        # Deliberately no default route and no route to 10.0.0.0/8.


def _backend_uid_routes(ns: str, addrs: Sequence[str]) -> None:
    """uid BACKEND_UID_BASE+i routes by table BACKEND_TABLE_BASE+i, whose routes carry
    source ``addrs[i]``: an unbound socket of that uid leaves from that backend address."""
    inside = f"{INSIDE_GW.rsplit('.', 2)[0]}.0.0/{INSIDE_PREFIXLEN}"
    cmds = []
    for i, addr in enumerate(addrs):
        uid, table = BACKEND_UID_BASE + i, BACKEND_TABLE_BASE + i
        cmds += [
            f"route add {inside} dev {BE_IF} src {addr} table {table}",
            f"route add default via {INSIDE_GW} dev {BE_IF} src {addr} table {table}",
            f"rule add uidrange {uid}-{uid} lookup {table} pref {table}",
        ]
    ns_run(ns, ["ip", "-batch", "-"], input=("\n".join(cmds) + "\n").encode(), timeout=15)


def _lo_up(ipr: NetNS) -> None:
    ipr.link("set", index=_index(ipr, "lo"), state="up")


def _index(ipr: NetNS, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise LabError(f"interface {ifname} not found")
    return int(found[0])


# --------------------------------------------------------------------------- servers


def _start_whoami(lab: LabNames) -> None:
    _start_daemon(lab, "whoami", WHOAMI_MODULE, whoami_pid_path(lab.prefix),
                  whoami_log_path(lab.prefix),
                  ["--http-port", str(WHOAMI_HTTP_PORT), "--udp-port", str(WHOAMI_UDP_PORT)])


def _start_dns(lab: LabNames) -> None:
    _start_daemon(lab, "dns", DNS_MODULE, dns_pid_path(lab.prefix), dns_log_path(lab.prefix),
                  ["--port", str(DNS_PORT)])


def _start_daemon(
    lab: LabNames, what: str, module: str, pid_path: Path, log_path: Path, args: Sequence[str]
) -> None:
    """Start one of the lab's servers daemonised in ``inet``; it returns only once its
    sockets are bound and its pid file is written (``--daemon``)."""
    err_path = state_dir(lab.prefix) / f"{what}.stderr"
    pid_path.unlink(missing_ok=True)
    log_path.write_bytes(b"")
    argv = [sys.executable, "-m", module, *args, "--log", str(log_path),
            "--pid-file", str(pid_path), "--stderr", str(err_path), "--daemon"]
    res = ns_run(lab.inet, argv, check=False, timeout=15)
    if res.returncode != 0 or not pid_path.exists():
        detail = res.stderr.decode(errors="replace").strip()
        if err_path.exists():
            detail += "\n" + err_path.read_text(errors="replace")[-2000:]
        raise LabError(f"{what} did not start in {lab.inet} (rc {res.returncode}): {detail}")


def _daemon_pid(module: str, pid_path: Path) -> int | None:
    """The pid from ``pid_path``, only if that process really is ``module`` run with it."""
    try:
        pid = int(pid_path.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if module.encode() not in cmdline or str(pid_path).encode() not in cmdline:
        return None  # pid reused by an unrelated process: not ours to signal
    return pid


def _stop_daemon(module: str, pid_path: Path) -> None:
    pid = _daemon_pid(module, pid_path)
    if pid is None:
        return
    stop_daemon(pid)
    pid_path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- helpers


def _require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, veths, sysctls)")
