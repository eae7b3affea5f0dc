"""tcpdump in a lab namespace: what really crossed an interface, as ``-n`` text lines."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

from gateway.lab.netns import LabError
from gateway.lab.procs import ProcessSet, poll_until, wait_quiet

START_TIMEOUT = 5.0
#: After the traffic under test, the capture is stopped once its output has not grown for
#: this long: the last packets are written by then (bounded by SETTLE_TIMEOUT).
SETTLE_QUIET = 0.2
SETTLE_TIMEOUT = 3.0


class Capture:
    """tcpdump in a namespace, bounded by packet count; ready only after "listening on".

    Use as a context manager, then read ``lines`` (one per packet); :meth:`current` reads
    what was captured so far, for waiting on a packet while the capture runs.
    """

    def __init__(self, ns: str, iface: str, bpf: str, *, count: int = 2000,
                 workdir: Path | None = None) -> None:
        self.ns, self.iface, self.bpf, self.count = ns, iface, bpf, count
        self.workdir = workdir or Path("/tmp")
        self.lines: list[str] = []
        self._procs = ProcessSet()
        self._proc: subprocess.Popen[bytes] | None = None
        self._out: Path | None = None
        self._err: Path | None = None

    def __enter__(self) -> Capture:
        stamp = f"{os.getpid()}-{time.monotonic_ns()}"
        self._out = self.workdir / f"tcpdump-{stamp}.out"
        self._err = self.workdir / f"tcpdump-{stamp}.err"
        with self._out.open("wb") as out, self._err.open("wb") as err:
            self._proc = self._procs.start(
                self.ns,
                ["tcpdump", "-n", "-l", "-U", "-i", self.iface, "-c", str(self.count), self.bpf],
                stdout=out, stderr=err,
            )
        proc, err_path = self._proc, self._err
        listening = poll_until(
            lambda: "listening on" in err_path.read_text(errors="replace"),
            START_TIMEOUT, interval=0.02, give_up=lambda: proc.poll() is not None,
        )
        if not listening:
            msg = err_path.read_text(errors="replace")
            self._finish(settle=False)
            raise LabError(f"tcpdump did not start in {self.ns}: {msg}")
        return self

    def __exit__(self, *exc: object) -> None:
        self._finish()

    def current(self) -> list[str]:
        """The packets captured so far (the capture keeps running)."""
        if self._out is None or not self._out.exists():
            return list(self.lines)
        return [ln for ln in self._out.read_text(errors="replace").splitlines() if ln]

    def _size(self) -> int:
        try:
            return self._out.stat().st_size if self._out is not None else 0
        except FileNotFoundError:
            return 0

    def _finish(self, settle: bool = True) -> None:
        if self._proc is not None:
            if settle:
                wait_quiet(self._size, SETTLE_QUIET, SETTLE_TIMEOUT)
            self._procs.stop(self._proc, signal.SIGINT, 5)
            self._proc = None
        if self._out is not None and self._out.exists():
            self.lines = self.current()
            self._out.unlink()
        if self._err is not None:
            self._err.unlink(missing_ok=True)

    @staticmethod
    def ip_source(line: str) -> str | None:
        """Source address of a ``-n`` tcpdump line (port, if any, stripped)."""
        m = re.search(r"\bIP (\d+\.\d+\.\d+\.\d+)", line)
        return m.group(1) if m else None
