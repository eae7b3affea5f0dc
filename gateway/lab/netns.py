"""Commands inside network namespaces, and the lab's error types.

``ip netns exec`` execs the program in place, so the pid a caller gets back from
:func:`ns_popen` is the program's own pid: stopping that pid stops exactly what was started
and nothing else.  Every command is bounded by a timeout.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Sequence
from typing import Any

from pyroute2 import netns


class LabError(RuntimeError):
    """The lab could not be built, torn down or driven (the message says which step)."""


class LabCommandError(subprocess.CalledProcessError):
    """A command run in a namespace failed; unlike the base class, str() shows its stderr."""

    def __str__(self) -> str:
        base = super().__str__()
        err = self.stderr.decode(errors="replace").strip() if self.stderr else ""
        return f"{base}: {err[-2000:]}" if err else base


def ns_run(
    ns: str,
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 30,
    input: bytes | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` inside namespace ``ns`` and capture its output (bounded by ``timeout``).

    A timeout kills the program itself (it is the direct child).  With ``check`` a failure
    raises :class:`LabCommandError` carrying stderr.
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
    """Start ``argv`` in namespace ``ns``; the returned pid is the program's own pid.

    Prefer :meth:`gateway.lab.procs.ProcessSet.start`, which also remembers the process so
    that it is stopped on every exit path.
    """
    return subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kwargs)


def sysctl(ns: str, settings: dict[str, str | int]) -> None:
    """Set kernel parameters inside ``ns`` (one ``sysctl -w`` call, fails loudly)."""
    ns_run(ns, ["sysctl", "-q", "-w", *(f"{k}={v}" for k, v in settings.items())], timeout=10)


def ipv4_addresses(ns: str, dev: str) -> set[str]:
    """The IPv4 addresses on ``dev`` in ``ns`` (without prefix length)."""
    res = ns_run(ns, ["ip", "-4", "-o", "addr", "show", "dev", dev], timeout=10)
    return set(re.findall(r"inet (\d+\.\d+\.\d+\.\d+)/", res.stdout.decode()))


def list_netns() -> list[str]:
    """Names of the existing named network namespaces, sorted."""
    try:
        return sorted(os.listdir(netns.NETNS_RUN_DIR))
    except FileNotFoundError:
        return []


def ns_pids(ns: str) -> list[int]:
    """Pids of the processes inside ``ns`` (to report them, never to kill them)."""
    res = subprocess.run(
        ["ip", "netns", "pids", ns], capture_output=True, timeout=10, check=False
    )
    return [int(x) for x in res.stdout.split() if x.isdigit()]
