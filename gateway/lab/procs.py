"""Processes and waiting: start in a namespace, wait on a condition, stop by pid.

One set of rules for the tests, the benchmark and the lab itself:

* every wait is on a condition, polled with a bounded timeout; a wait that must hold
  raises :class:`WaitTimeout` saying what did not happen (never a bare sleep);
* a process is stopped by its own pid only (SIGTERM, then SIGKILL after a timeout) and
  reaped, never by name;
* :class:`ProcessSet` remembers what it started, so a ``finally``, an ``atexit`` hook or a
  fixture finaliser can stop everything on every exit path.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from gateway.lab.netns import LabError, ns_popen

T = TypeVar("T")

POLL_INTERVAL = 0.05


class WaitTimeout(LabError):
    """A condition did not hold within its timeout (the message says which)."""


def poll_until(
    pred: Callable[[], T],
    timeout: float,
    *,
    interval: float = POLL_INTERVAL,
    give_up: Callable[[], bool] | None = None,
) -> T | None:
    """Poll ``pred`` until it returns something truthy and return that, or None on timeout.

    ``pred`` is always evaluated at least once, and once more at the deadline, so a short
    timeout never misses a condition that already holds.  ``give_up`` (e.g. "the process
    died") ends the wait early: waiting longer could not help.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        left = deadline - time.monotonic()
        if left <= 0 or (give_up is not None and give_up()):
            return None
        time.sleep(min(interval, left))


def wait_until(
    pred: Callable[[], T],
    timeout: float,
    *,
    what: str = "",
    interval: float = POLL_INTERVAL,
    detail: Callable[[], object] | None = None,
) -> T:
    """Like :func:`poll_until`, but a timeout is a failure: raises :class:`WaitTimeout`.

    The message names the condition (``what``, else the predicate's name) and, when given,
    ``detail()`` evaluated at the timeout (e.g. the state that was seen instead).
    """
    value = poll_until(pred, timeout, interval=interval)
    if value:
        return value
    name = what or getattr(pred, "__qualname__", repr(pred))
    msg = f"timed out after {timeout:g} s waiting until {name}"
    if detail is not None:
        msg += f"; seen: {detail()}"
    raise WaitTimeout(msg)


def wait_quiet(value: Callable[[], object], quiet: float, timeout: float) -> bool:
    """Wait until ``value()`` has not changed for ``quiet`` seconds (bounded by ``timeout``).

    For "everything in flight has arrived" where the count of what arrives is unknown, e.g.
    a capture file that stops growing once the last packet of a test is written.
    """
    deadline = time.monotonic() + timeout
    last, since = value(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(min(POLL_INTERVAL, quiet))
        now = value()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return True
    return False


# --------------------------------------------------------------------------- children


def stop_process(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 5.0
) -> int | None:
    """Signal one process we started (by its own pid), SIGKILL after ``timeout``, reap it.

    Returns the exit code (None only if even SIGKILL left it unreaped after 5 s).
    """
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5.0)
    return proc.returncode


def close_pipes(proc: subprocess.Popen[bytes]) -> None:
    """Close whichever of the process's pipes we hold (after it has been stopped)."""
    for fh in (proc.stdin, proc.stdout, proc.stderr):
        if fh is not None:
            fh.close()


@dataclass(slots=True)
class ProcessSet:
    """Every process a run started, so that each is stopped by its own pid, newest first."""

    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, ns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """``argv`` in namespace ``ns``, stdio to /dev/null unless given, remembered."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("stdout", subprocess.DEVNULL)
        kwargs.setdefault("stderr", subprocess.DEVNULL)
        return self.add(ns_popen(ns, list(argv), **kwargs))

    def add(self, proc: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
        self.procs.append(proc)
        return proc

    def stop(
        self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 5.0
    ) -> int | None:
        """Stop ``proc`` (see :func:`stop_process`) and forget it once it is gone."""
        rc = stop_process(proc, sig, timeout)
        if proc in self.procs and proc.poll() is not None:
            self.procs.remove(proc)
        return rc

    def stop_all(self, timeout: float = 5.0) -> None:
        """Stop everything still remembered; one stubborn process does not stop the rest."""
        for proc in reversed(list(self.procs)):
            self.stop(proc, timeout=timeout)


# --------------------------------------------------------------------------- daemons


def pid_gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (absent, or a zombie waiting for its parent)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


def stop_daemon(pid: int, timeout: float = 3.0) -> bool:
    """Stop a daemon that is not our child (its pid came from its own pid file).

    The caller has checked that ``pid`` really is its daemon (the pid may have been
    reused).  SIGTERM, then SIGKILL after ``timeout``; True once it is gone.
    """
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        if poll_until(lambda: pid_gone(pid), timeout, interval=0.02):
            return True
    return False
