"""Inbound listeners on the lab's backends: what a pool member, an inbound NAT target or an
instance-IP backend runs so that flows *to* it can be seen.

Each listener is whoami (:mod:`gateway.lab.whoami`) run with ``--show-local`` in the backend
namespace, bound to one backend address and port (TCP and UDP on the same number), as its
own process: stopping one member's listener (a refused connection, a failing health probe)
leaves the others running.  Its answer ``"<src>:<sport> at <member>:<port>"`` tells the
client which member it reached and what source that member saw, and its JSON log says the
same from the member's side.  Processes are stopped by their own pid.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from gateway.lab.clients import PYTHON, WhoamiLog
from gateway.lab.layout import MEMBER_PORT, WHOAMI_MODULE
from gateway.lab.netns import LabError, ns_run
from gateway.lab.procs import ProcessSet, close_pipes, poll_until

READY_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class MemberAnswer:
    """One ``--show-local`` answer: the client as the member saw it, and the member."""

    src: str
    sport: int
    member: str
    port: int


def parse_member_answer(text: str) -> MemberAnswer:
    """``"ip:port at ip:port\\n"`` -> :class:`MemberAnswer` (LabError if it is not one)."""
    m = re.fullmatch(r"\s*(\d+\.\d+\.\d+\.\d+):(\d+) at (\d+\.\d+\.\d+\.\d+):(\d+)\s*", text)
    if m is None:
        raise LabError(f"not a member answer: {text!r}")
    return MemberAnswer(m.group(1), int(m.group(2)), m.group(3), int(m.group(4)))


def listening(ns: str, addr: str, port: int) -> bool:
    """True when both a TCP listener and a UDP socket are bound to ``addr:port`` in ``ns``."""
    for flag in ("-Hltn", "-Hlun"):
        out = ns_run(ns, ["ss", flag, "src", f"{addr}:{port}"], check=False, timeout=5).stdout
        if not out.strip():
            return False
    return True


@dataclass(slots=True)
class MemberListeners:
    """Listeners on backend addresses in namespace ``ns``, one process per address and port.

    ``start`` returns once the listener is bound; ``stop`` ends just that one; ``close``
    ends all (a fixture's finaliser).  Logs go to ``workdir``.
    """

    ns: str
    workdir: Path
    procs: ProcessSet = field(default_factory=ProcessSet)
    running: dict[tuple[str, int], subprocess.Popen[bytes]] = field(default_factory=dict)

    def log_path(self, addr: str, port: int = MEMBER_PORT) -> Path:
        return self.workdir / f"member-{addr}-{port}.log"

    def log(self, addr: str, port: int = MEMBER_PORT) -> WhoamiLog:
        """What the listener on ``addr:port`` received (one record per connection/datagram)."""
        return WhoamiLog(self.log_path(addr, port))

    def start(self, addr: str, port: int = MEMBER_PORT) -> None:
        """Start the listener on ``addr:port`` (TCP and UDP); no-op if it already runs."""
        key = (addr, port)
        proc = self.running.get(key)
        if proc is not None and proc.poll() is None:
            return
        argv = [PYTHON, "-m", WHOAMI_MODULE, "--bind", addr, "--http-port", str(port),
                "--udp-port", str(port), "--show-local", "--log", str(self.log_path(addr, port))]
        err = self.workdir / f"member-{addr}-{port}.stderr"
        with err.open("ab") as fh:
            proc = self.procs.start(self.ns, argv, stderr=fh)
        self.running[key] = proc
        if not poll_until(lambda: listening(self.ns, addr, port), READY_TIMEOUT,
                          give_up=lambda: proc.poll() is not None):
            self.stop(addr, port)
            raise LabError(f"listener {addr}:{port} in {self.ns} did not start: "
                           f"{err.read_text(errors='replace')[-2000:]}")

    def start_all(self, addrs: Iterable[str], port: int = MEMBER_PORT) -> None:
        for addr in addrs:
            self.start(addr, port)

    def stop(self, addr: str, port: int = MEMBER_PORT) -> None:
        """Stop the listener on ``addr:port`` (by its pid); new connections are refused."""
        proc = self.running.pop((addr, port), None)
        if proc is not None:
            self.procs.stop(proc, timeout=3)
            close_pipes(proc)

    def close(self) -> None:
        """Stop every listener started here; one that will not stop does not keep the rest."""
        for addr, port in list(self.running):
            self.stop(addr, port)
        self.procs.stop_all(timeout=3)
