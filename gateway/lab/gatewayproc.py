"""A ``snatgw run`` process against a lab: start with a config, wait for readiness, read its
JSON log, talk to it through its CLI, stop it by its pid.

The tests and the benchmark start the gateway the same way: stdout and stderr (the JSON
log) go to files in a work directory, each gateway gets its own control socket, and
readiness is the ``gateway_ready`` event in that log, never a sleep.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from gateway.lab.netns import LabError, ns_run
from gateway.lab.procs import ProcessSet, poll_until

SNATGW = Path(sys.executable).parent / "snatgw"
CONTROL_DIR = Path("/run/snatgw")
READY_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0


class GatewayError(LabError):
    """The gateway did not start, refused a command, or did not say what it must."""


def snatgw_argv() -> list[str]:
    """How to run snatgw: the venv's entry point, else this Python's ``-m gateway``."""
    if SNATGW.exists():
        return [str(SNATGW)]
    return [sys.executable, "-m", "gateway"]


@dataclass(slots=True)
class GatewayProc:
    """A running ``snatgw run`` in a lab's gateway namespace, with its JSON log."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    config_path: Path
    ns: str
    #: The control socket this gateway was told to use (``--control-socket``).
    socket: str = ""
    procs: ProcessSet = field(default_factory=ProcessSet)
    _files: list[IO[bytes]] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    # ------------------------------------------------------------------ the log

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def records(self) -> list[dict[str, Any]]:
        """Every JSON object line of the log (anything else, e.g. a traceback, is skipped)."""
        out = []
        for line in self.log_text().splitlines():
            line = line.strip()
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    rec = json.loads(line)
                    if isinstance(rec, dict):
                        out.append(rec)
        return out

    def events(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.records() if r.get("event") == name]

    def event(self, name: str) -> dict[str, Any] | None:
        """The first ``name`` event logged so far, or None."""
        found = self.events(name)
        return found[0] if found else None

    def wait_event(self, name: str, timeout: float) -> dict[str, Any] | None:
        """The first ``name`` event, waiting up to ``timeout`` (less if the gateway exits)."""
        return poll_until(lambda: self.event(name), timeout, give_up=lambda: not self.alive())

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> dict[str, Any]:
        """The ``gateway_ready`` event; if it does not come the gateway is stopped and
        :class:`GatewayError` carries the log's tail."""
        ready = self.wait_event("gateway_ready", timeout)
        if ready is not None:
            return ready
        # A last look: the event may have been written just as the process exited.
        ready = self.event("gateway_ready")
        if ready is not None:
            return ready
        if self.alive():
            self.stop()
            why = f"no gateway_ready within {timeout:.0f} s"
        else:
            why = f"gateway exited with {self.proc.returncode} before gateway_ready"
        raise GatewayError(f"{why}; log {self.log_path}:\n{self.log_text()[-6000:]}")

    def counters(self) -> dict[str, Any]:
        """Counters from the gateway_stopped event (the gateway must have been stopped)."""
        stopped = self.events("gateway_stopped")
        if not stopped:
            raise GatewayError(f"no gateway_stopped event; log:\n{self.log_text()[-4000:]}")
        counters = stopped[-1].get("counters")
        if not isinstance(counters, dict):
            raise GatewayError(f"gateway_stopped without counters: {stopped[-1]}")
        return counters

    # ------------------------------------------------------------------ the operator's view

    def cli(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
        """``snatgw ARGS --socket S`` run in the gateway's namespace, as an operator would."""
        return ns_run(self.ns, [*snatgw_argv(), *args, "--socket", self.socket],
                      timeout=timeout, check=False)

    def ask(self, command: str, *args: str) -> Any:
        """``snatgw COMMAND --json ARGS``, parsed; a failing CLI raises GatewayError."""
        res = self.cli(command, "--json", *args)
        if res.returncode != 0:
            raise GatewayError(f"snatgw {command} failed: {res.stderr.decode(errors='replace')}")
        return json.loads(res.stdout)

    def reload(self, config_text: str, *, sighup: bool = False) -> subprocess.CompletedProcess[bytes] | None:
        """Rewrite the config file, then ``snatgw reload`` (its result) or SIGHUP (None)."""
        tmp = self.config_path.with_suffix(".new")
        tmp.write_text(config_text)
        tmp.replace(self.config_path)
        if sighup:
            os.kill(self.proc.pid, signal.SIGHUP)
            return None
        return self.cli("reload")

    def metrics(self, port: int) -> dict[str, float]:
        """The gateway's Prometheus endpoint on 127.0.0.1:PORT in its namespace, as
        ``{'name{labels}': value}`` with labels sorted."""
        res = ns_run(self.ns, ["curl", "-s", "--max-time", "10", f"http://127.0.0.1:{port}/metrics"],
                     timeout=20, check=False)
        if res.returncode != 0:
            raise GatewayError(f"metrics endpoint: curl exit {res.returncode}")
        return parse_metrics(res.stdout.decode())

    # ------------------------------------------------------------------ stopping

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, wait up to ``timeout`` (then SIGKILL); returns the exit code."""
        rc = self.procs.stop(self.proc, signal.SIGTERM, timeout)
        self._close_files()
        return rc

    def kill(self) -> int | None:
        """SIGKILL: a crash, leaving whatever state the gateway had installed."""
        rc = self.procs.stop(self.proc, signal.SIGKILL, 5)
        self._close_files()
        return rc

    def _close_files(self) -> None:
        for fh in self._files:
            fh.close()
        self._files.clear()


@dataclass(frozen=True, slots=True)
class RunResult:
    """How a gateway that had to refuse its config ended."""

    config_path: Path
    returncode: int
    stdout: str
    stderr: str


class GatewayLauncher:
    """Starts gateways in namespace ``ns`` from config text; close() stops every one.

    Files (config, log, stdout) are numbered in ``workdir``; control sockets are private to
    this launcher, so launchers in other processes never meet.
    """

    def __init__(self, ns: str, workdir: Path, procs: ProcessSet | None = None) -> None:
        self.ns = ns
        self.workdir = workdir
        self.procs = procs if procs is not None else ProcessSet()
        self.started: list[GatewayProc] = []
        self._n = 0

    def write_config(self, text: str) -> Path:
        self._n += 1
        path = self.workdir / f"gateway-{self._n}.toml"
        path.write_text(text)
        return path

    def start(
        self,
        config_text: str,
        *,
        wait_ready: bool = True,
        args: Sequence[str] = (),
        ready_timeout: float = READY_TIMEOUT,
    ) -> GatewayProc:
        """``snatgw run`` on ``config_text``; by default returns once gateway_ready is logged."""
        cfg = self.write_config(config_text)
        log = self.workdir / f"gateway-{self._n}.log"
        err = log.open("wb")
        out = (self.workdir / f"gateway-{self._n}.stdout").open("wb")
        sock = str(CONTROL_DIR / f"lab-{self.ns}-{os.getpid()}-{self._n}.sock")
        proc = self.procs.start(
            self.ns,
            [*snatgw_argv(), "run", "--config", str(cfg), "--control-socket", sock, *args],
            stdout=out, stderr=err, start_new_session=True,
        )
        gw = GatewayProc(proc=proc, log_path=log, config_path=cfg, ns=self.ns, socket=sock,
                         procs=self.procs, _files=[err, out])
        self.started.append(gw)
        if wait_ready:
            gw.wait_ready(ready_timeout)
        return gw

    __call__ = start

    def run_to_exit(self, config_text: str, timeout: float = 15.0) -> RunResult:
        """Run the gateway on a config that must be refused; it must exit by itself."""
        cfg = self.write_config(config_text)
        proc = self.procs.start(
            self.ns, [*snatgw_argv(), "run", "--config", str(cfg)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.procs.stop(proc, signal.SIGTERM, STOP_TIMEOUT)
            out, err = proc.communicate(timeout=5)
            raise GatewayError(
                f"gateway kept running on config {cfg} (expected a refusal):\n"
                f"{err.decode(errors='replace')[-3000:]}"
            ) from None
        finally:
            self.procs.stop(proc)
        return RunResult(cfg, int(proc.returncode), out.decode(errors="replace"),
                         err.decode(errors="replace"))

    def close(self) -> None:
        """Stop every gateway started here (each by its pid) and remove the control socket
        a killed one left behind; one failure does not keep the others running."""
        errors: list[Exception] = []
        for gw in self.started:
            try:
                gw.stop()
            except Exception as exc:  # stop the others first, then report it
                errors.append(exc)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(gw.socket)
        self.procs.stop_all()
        if errors:
            raise errors[0]


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format as ``{'name{a="x",b="y"}': value}`` (labels sorted by name)."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or line.startswith("#"):
            continue
        name, labels, value = m.groups()
        pairs = sorted(_LABEL.findall(labels or ""))
        key = name + ("{" + ",".join(f'{k}="{v}"' for k, v in pairs) + "}" if pairs else "")
        samples[key] = float(value)
    return samples
