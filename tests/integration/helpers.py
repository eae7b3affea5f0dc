"""Shared tools for the integration tests: config builder, gateway handle, probes, captures.

Everything here is bounded in time and count, and every process it starts is stopped by
its own pid (never by name).  Tests assert on what the far side received (the whoami log,
a capture in the internet namespace), not on what the gateway says it did.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest

from gateway.lab import topology as t
from gateway.lab.topology import LabNames, ns_popen, ns_run

REPO = Path(__file__).resolve().parents[2]
LAB_TOML = REPO / "deploy" / "examples" / "lab.toml"
PYTHON = sys.executable
SNATGW = Path(sys.executable).parent / "snatgw"
READY_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0

# --------------------------------------------------------------------------- config


_GATEWAY_KEYS = (
    "inside", "outside", "queue", "idle_timeout", "tcp_fin_linger", "tcp_rst_linger", "queue_client",
    "high_water", "control_group", "exhaustion_event_interval", "metrics",
)
_SECTION_KEYS = ("frontends", "pools", "lb_rules", "instance_ips")


def lab_config_dict() -> dict[str, Any]:
    """deploy/examples/lab.toml as a dict: the single source of the lab's gateway config."""
    with LAB_TOML.open("rb") as fh:
        return tomllib.load(fh)


def lab_config(
    *,
    mutate: Callable[[dict[str, Any]], None] | None = None,
    **overrides: Any,
) -> str:
    """TOML text equal to deploy/examples/lab.toml with ``overrides`` applied.

    Accepted overrides: any ``[gateway]`` key (inside, outside, queue, idle_timeout,
    tcp_fin_linger, tcp_rst_linger); ``pool_members`` (replaces pool "web"'s members);
    ``extra_members`` (appended to them); ``default_snat_ips``; and whole sections
    ``frontends``, ``pools``, ``lb_rules``, ``instance_ips`` (lists of tables).
    ``mutate`` gets the dict last, for anything else (used to build bad configs).
    """
    cfg = lab_config_dict()
    for key, value in overrides.items():
        if key in _GATEWAY_KEYS:
            cfg["gateway"][key] = value
        elif key == "pool_members":
            cfg["pools"][0]["members"] = list(value)
        elif key == "extra_members":
            cfg["pools"][0]["members"] = [*cfg["pools"][0]["members"], *value]
        elif key == "default_snat_ips":
            cfg["default_snat"]["ips"] = list(value)
        elif key in _SECTION_KEYS:
            cfg[key] = [dict(x) for x in value]
        else:
            raise TypeError(f"lab_config: unknown override {key!r}")
    if mutate is not None:
        mutate(cfg)
    return to_toml(cfg)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def to_toml(cfg: dict[str, Any]) -> str:
    """Write the config dict as TOML (scalars, tables, arrays of tables: all the schema uses)."""
    lines: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []
    arrays: list[tuple[str, list[dict[str, Any]]]] = []
    for key, value in cfg.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
            arrays.append((key, value))
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    for key, table in tables:
        lines += ["", f"[{key}]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    for key, items in arrays:
        for item in items:
            lines += ["", f"[[{key}]]"] + [f"{k} = {_toml_value(v)}" for k, v in item.items()]
    return "\n".join(lines).lstrip("\n") + "\n"


# --------------------------------------------------------------------------- whoami log


@dataclass(slots=True)
class WhoamiLog:
    """Reader of the lab's whoami log: what the internet saw, one record per peer/datagram."""

    path: Path

    def mark(self) -> int:
        """Current end of the log; pass to records() to see only what came after."""
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def records(self, since: int = 0) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as fh:
                fh.seek(since)
                raw = fh.read()
        except FileNotFoundError:
            return []
        out = []
        for line in raw.splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def wait_for(
        self,
        pred: Callable[[list[dict[str, Any]]], bool],
        since: int = 0,
        timeout: float = 3.0,
    ) -> list[dict[str, Any]]:
        """Poll (bounded) until ``pred(records)`` holds; returns the records either way."""
        deadline = time.monotonic() + timeout
        recs = self.records(since)
        while not pred(recs) and time.monotonic() < deadline:
            time.sleep(0.05)
            recs = self.records(since)
        return recs


# --------------------------------------------------------------------------- processes


def stop_pid(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 5) -> int:
    """Signal one process we started (by its pid) and reap it; SIGKILL after ``timeout``."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
    return int(proc.returncode)


@dataclass(slots=True)
class GatewayProc:
    """A running ``snatgw run`` in the lab's gateway namespace, with its JSON log."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    config_path: Path
    ns: str
    #: The control socket this gateway was told to use (``--control-socket``).
    socket: str = ""
    _files: list[IO[bytes]] = field(default_factory=list)

    def cli(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
        """``snatgw ARGS --socket S`` run in the gateway's namespace, as an operator would."""
        return ns_run(self.ns, [str(SNATGW), *args, "--socket", self.socket], timeout=timeout, check=False)

    def ask(self, command: str, *args: str) -> Any:
        """``snatgw COMMAND --json ARGS``, parsed; fails the test if the CLI fails."""
        res = self.cli(command, "--json", *args)
        assert res.returncode == 0, f"snatgw {command} failed: {res.stderr.decode(errors='replace')}"
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
        assert res.returncode == 0, f"metrics endpoint: curl exit {res.returncode}"
        return parse_metrics(res.stdout.decode())

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

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

    def wait_event(self, name: str, timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while True:
            found = self.events(name)
            if found:
                return found[0]
            if not self.alive() or time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        if self.wait_event("gateway_ready", timeout) is not None:
            return
        if self.alive():
            self.stop()
            why = f"no gateway_ready within {timeout:.0f} s"
        else:
            why = f"gateway exited with {self.proc.returncode} before gateway_ready"
        pytest.fail(f"{why}; log {self.log_path}:\n{self.log_text()[-6000:]}", pytrace=False)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, wait up to ``timeout`` (then SIGKILL); returns the exit code."""
        rc = stop_pid(self.proc, signal.SIGTERM, timeout)
        self._close_files()
        return rc

    def kill(self) -> int:
        """SIGKILL: a crash, leaving whatever state the gateway had installed."""
        rc = stop_pid(self.proc, signal.SIGKILL, 5)
        self._close_files()
        return rc

    def counters(self) -> dict[str, Any]:
        """Counters from the gateway_stopped event (the gateway must have been stopped)."""
        stopped = self.events("gateway_stopped")
        assert stopped, f"no gateway_stopped event; log:\n{self.log_text()[-4000:]}"
        counters = stopped[-1].get("counters")
        assert isinstance(counters, dict), f"gateway_stopped without counters: {stopped[-1]}"
        return counters

    def _close_files(self) -> None:
        for fh in self._files:
            fh.close()
        self._files.clear()


class GatewayFactory:
    """``start(config_toml_text) -> GatewayProc``; everything started is stopped on close()."""

    def __init__(self, lab: LabNames, workdir: Path) -> None:
        self.lab = lab
        self.workdir = workdir
        self.started: list[GatewayProc] = []
        self._n = 0

    def write_config(self, text: str) -> Path:
        self._n += 1
        path = self.workdir / f"gateway-{self._n}.toml"
        path.write_text(text)
        return path

    def start(
        self, config_text: str, *, wait_ready: bool = True, args: Sequence[str] = ()
    ) -> GatewayProc:
        cfg = self.write_config(config_text)
        log = self.workdir / f"gateway-{self._n}.log"
        err = log.open("wb")
        out = (self.workdir / f"gateway-{self._n}.stdout").open("wb")
        sock = f"/run/snatgw/test-{self.lab.prefix}-{os.getpid()}-{self._n}.sock"
        proc = ns_popen(
            self.lab.gw,
            [str(SNATGW), "run", "--config", str(cfg), "--control-socket", sock, *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
        gw = GatewayProc(proc=proc, log_path=log, config_path=cfg, ns=self.lab.gw, socket=sock,
                         _files=[err, out])
        self.started.append(gw)
        if wait_ready:
            gw.wait_ready()
        return gw

    __call__ = start

    def run_to_exit(self, config_text: str, timeout: float = 15.0) -> RunResult:
        """Run the gateway on a config that must be refused; it must exit by itself."""
        cfg = self.write_config(config_text)
        proc = ns_popen(
            self.lab.gw,
            [str(SNATGW), "run", "--config", str(cfg)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_pid(proc, signal.SIGTERM, STOP_TIMEOUT)
            out, err = proc.communicate(timeout=5)
            pytest.fail(
                f"gateway kept running on config {cfg} (expected a refusal):\n"
                f"{err.decode(errors='replace')[-3000:]}",
                pytrace=False,
            )
        return RunResult(cfg, int(proc.returncode), out.decode(errors="replace"),
                         err.decode(errors="replace"))

    def close(self) -> None:
        for gw in self.started:
            gw.stop()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(gw.socket)  # left behind by a gateway a test killed


@dataclass(frozen=True, slots=True)
class RunResult:
    config_path: Path
    returncode: int
    stdout: str
    stderr: str


# --------------------------------------------------------------------------- gateway ns state


def gw_snapshot(lab: LabNames) -> dict[str, str]:
    """What the gateway may change in its namespace, normalised for comparison."""
    rules = ns_run(lab.gw, ["iptables-save"], timeout=15).stdout.decode()
    rules = "\n".join(
        re.sub(r"\[\d+:\d+\]", "", ln) for ln in rules.splitlines() if not ln.startswith("#")
    )
    addrs = ns_run(lab.gw, ["ip", "-4", "-o", "addr", "show"], timeout=10).stdout.decode()
    addrs = "\n".join(sorted(re.sub(r"\s+", " ", ln).strip() for ln in addrs.splitlines()))
    fwd = ns_run(lab.gw, ["sysctl", "-n", "net.ipv4.ip_forward"], timeout=10).stdout.decode()
    return {"iptables": rules, "addresses": addrs, "ip_forward": fwd.strip()}


def out_addresses(lab: LabNames) -> set[str]:
    res = ns_run(lab.gw, ["ip", "-4", "-o", "addr", "show", "dev", t.GW_OUT_IF], timeout=10)
    return set(re.findall(r"inet (\d+\.\d+\.\d+\.\d+)/", res.stdout.decode()))


def iptables_save(lab: LabNames) -> str:
    return ns_run(lab.gw, ["iptables-save"], timeout=15).stdout.decode()


# --------------------------------------------------------------------------- traffic


def curl(
    lab: LabNames, src: str, url: str, *, max_time: float = 5, extra: Sequence[str] = ()
) -> subprocess.CompletedProcess[bytes]:
    """curl from backend address ``src`` (never raises; callers assert on returncode)."""
    return ns_run(
        lab.be,
        ["curl", "-sS", "--max-time", str(max_time), "--interface", src, *extra, url],
        check=False,
        timeout=max_time + 10,
    )


def parse_peer(text: str) -> tuple[str, int]:
    """``"ip:port\\n"`` (a whoami answer) -> (ip, port)."""
    m = re.fullmatch(r"\s*(?:late )?(\d+\.\d+\.\d+\.\d+):(\d+)\s*", text)
    assert m, f"not a whoami answer: {text!r}"
    return m.group(1), int(m.group(2))


# A tiny scripted client run with the venv's python inside a namespace.  It prints one JSON
# line per step as soon as the step is done, so a test can react while it is running.
PROBE = r"""
import json, select, socket, sys, time
spec = json.loads(sys.argv[1])
def out(o):
    print(json.dumps(o), flush=True)
socks = []
for s in spec.get("sockets", []):
    k = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if s.get("reuse"):
        k.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    k.bind((s["src"], s.get("sport", 0)))
    if s.get("connect"):
        k.connect(tuple(s["connect"]))
    socks.append(k)
out({"op": "open", "ports": [k.getsockname()[1] for k in socks]})
for step in spec.get("steps", []):
    op = step[0]
    if op == "send":
        _, i, dst, dport, payload = step
        try:
            if dst is None:
                socks[i].send(payload.encode())
            else:
                socks[i].sendto(payload.encode(), (dst, dport))
            out({"op": "send"})
        except OSError as e:
            out({"op": "send", "error": type(e).__name__})
    elif op == "recv":
        _, i, timeout = step
        socks[i].settimeout(timeout)
        try:
            data, addr = socks[i].recvfrom(65535)
            out({"op": "recv", "data": data.decode(errors="replace"), "from": [addr[0], addr[1]]})
        except TimeoutError:
            out({"op": "recv", "timeout": True})
        except OSError as e:
            out({"op": "recv", "error": type(e).__name__})
    elif op == "sleep":
        time.sleep(min(float(step[1]), 30.0))
    elif op == "tcp":
        _, src, dst, dport, timeout = step
        k = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        k.settimeout(timeout)
        try:
            k.bind((src, 0))
            k.connect((dst, dport))
            res = "connected"
        except TimeoutError:
            res = "timeout"
        except OSError as e:
            res = type(e).__name__
        finally:
            k.close()
        out({"op": "tcp", "result": res})
    elif op == "many":
        _, src, dst, dport, count, timeout, payload = step
        count = min(int(count), 5000)
        many = []
        try:
            for _ in range(count):
                k = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                k.bind((src, 0))
                k.setblocking(False)
                many.append(k)
            ports = [k.getsockname()[1] for k in many]
            for k in many:
                try:
                    k.sendto(payload.encode(), (dst, dport))
                except BlockingIOError:
                    pass
            replies = {}
            by_fd = {k.fileno(): n for n, k in enumerate(many)}
            poller = select.poll()
            for k in many:
                poller.register(k, select.POLLIN)
            deadline = time.monotonic() + timeout
            while len(replies) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                for fd, _ev in poller.poll(left * 1000):
                    n = by_fd[fd]
                    try:
                        replies[n] = many[n].recv(65535).decode(errors="replace")
                    except OSError as e:
                        replies[n] = "error " + type(e).__name__
                    poller.unregister(fd)
            out({"op": "many", "ports": ports,
                 "replies": [replies.get(n) for n in range(count)]})
        finally:
            for k in many:
                k.close()
out({"op": "done"})
"""


def probe(ns: str, spec: dict[str, Any], *, timeout: float = 30) -> list[dict[str, Any]]:
    """Run PROBE with ``spec`` in ``ns``; returns its step results (first: the open ports)."""
    res = ns_run(ns, [PYTHON, "-c", PROBE, json.dumps(spec)], timeout=timeout, check=False)
    lines = [json.loads(x) for x in res.stdout.decode().splitlines() if x.startswith("{")]
    assert res.returncode == 0 and lines and lines[-1].get("op") == "done", (
        f"probe failed rc={res.returncode}: {res.stderr.decode(errors='replace')[-3000:]}"
    )
    return lines[:-1]


class ProbeProc:
    """PROBE running in the background: read its step results one by one (bounded)."""

    def __init__(self, ns: str, spec: dict[str, Any]) -> None:
        self.proc = ns_popen(
            ns, [PYTHON, "-c", PROBE, json.dumps(spec)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self._buf = b""

    def next(self, timeout: float = 10) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            assert left > 0, "probe gave no result in time"
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                assert chunk, f"probe ended early: {self._stderr()}"
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return dict(json.loads(line))

    def _stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return self.proc.stderr.read().decode(errors="replace")[-3000:]

    def close(self) -> None:
        stop_pid(self.proc, signal.SIGTERM, 3)
        for fh in (self.proc.stdout, self.proc.stderr):
            if fh is not None:
                fh.close()


# --------------------------------------------------------------------------- capture


class Capture:
    """tcpdump in a namespace, bounded by packet count; ready only after "listening on".

    Use as a context manager, then read ``lines`` (one per packet, ``-n`` format).
    """

    def __init__(self, ns: str, iface: str, bpf: str, *, count: int = 2000,
                 workdir: Path | None = None) -> None:
        self.ns, self.iface, self.bpf, self.count = ns, iface, bpf, count
        self.workdir = workdir or Path("/tmp")
        self.lines: list[str] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._out: Path | None = None
        self._err: Path | None = None

    def __enter__(self) -> Capture:
        stamp = f"{os.getpid()}-{time.monotonic_ns()}"
        self._out = self.workdir / f"tcpdump-{stamp}.out"
        self._err = self.workdir / f"tcpdump-{stamp}.err"
        with self._out.open("wb") as out, self._err.open("wb") as err:
            self._proc = ns_popen(
                self.ns,
                ["tcpdump", "-n", "-l", "-U", "-i", self.iface, "-c", str(self.count), self.bpf],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err,
            )
        deadline = time.monotonic() + 5
        while "listening on" not in self._err.read_text(errors="replace"):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                msg = self._err.read_text(errors="replace")
                self._finish()
                pytest.fail(f"tcpdump did not start in {self.ns}: {msg}", pytrace=False)
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._finish()

    def _finish(self) -> None:
        if self._proc is not None:
            time.sleep(0.2)  # let the last packets of the traffic under test arrive
            stop_pid(self._proc, signal.SIGINT, 5)
            self._proc = None
        if self._out is not None and self._out.exists():
            self.lines = [ln for ln in self._out.read_text(errors="replace").splitlines() if ln]
            self._out.unlink()
        if self._err is not None:
            self._err.unlink(missing_ok=True)

    @staticmethod
    def ip_source(line: str) -> str | None:
        """Source address of a ``-n`` tcpdump line (port, if any, stripped)."""
        m = re.search(r"\bIP (\d+\.\d+\.\d+\.\d+)", line)
        return m.group(1) if m else None


# --------------------------------------------------------------------------- kernel NAT


@contextlib.contextmanager
def kernel_masquerade(lab: LabNames) -> Iterator[None]:
    """The kernel's own NAT in the gateway namespace; only for the lab's self-test."""
    ns_run(lab.gw, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
    rule = ["POSTROUTING", "-o", t.GW_OUT_IF, "-j", "MASQUERADE"]
    ns_run(lab.gw, ["iptables", "-t", "nat", "-A", *rule])
    try:
        yield
    finally:
        ns_run(lab.gw, ["iptables", "-t", "nat", "-D", *rule], check=False)
        ns_run(lab.gw, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=0"], check=False)


@contextlib.contextmanager
def kernel_forwarding(lab: LabNames) -> Iterator[None]:
    """Forwarding without any NAT: private sources leave as they are (lab self-test only)."""
    ns_run(lab.gw, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
    try:
        yield
    finally:
        ns_run(lab.gw, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=0"], check=False)


def in_block(port: int, start: int, size: int) -> bool:
    return start <= port < start + size


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


def wait_until(pred: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def wait_listening(ns: str, port: int, proto: str = "t", timeout: float = 5.0) -> None:
    """Wait (bounded) until something listens on ``port`` in ``ns`` (ss -l)."""

    def listening() -> bool:
        res = ns_run(ns, ["ss", f"-Hln{proto}", f"sport = :{port}"], check=False, timeout=5)
        return bool(res.stdout.strip())

    assert wait_until(listening, timeout, 0.05), f"nothing listening on {port} in {ns}"


__all__ = [
    "Capture",
    "GatewayFactory",
    "GatewayProc",
    "ProbeProc",
    "RunResult",
    "WhoamiLog",
    "curl",
    "gw_snapshot",
    "in_block",
    "iptables_save",
    "kernel_forwarding",
    "kernel_masquerade",
    "lab_config",
    "lab_config_dict",
    "out_addresses",
    "parse_peer",
    "probe",
    "stop_pid",
    "to_toml",
    "wait_listening",
    "wait_until",
]
