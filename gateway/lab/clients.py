"""Client commands run inside the lab, and readers of what the far side saw.

curl, ping, iperf3, nc and the scripted UDP/TCP probe (:mod:`gateway.lab.probe`), each
bounded in time; :class:`WhoamiLog` reads what the internet host received.  The tests and
the benchmark both use these, so a flag or a timeout is chosen in one place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import select
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.lab import layout
from gateway.lab.netns import LabError, ns_popen, ns_run
from gateway.lab.procs import ProcessSet, close_pipes, poll_until, stop_process, wait_until

PYTHON = sys.executable
PROBE_MODULE = "gateway.lab.probe"

# --------------------------------------------------------------------------- whoami


def parse_peer(text: str) -> tuple[str, int]:
    """``"ip:port\\n"`` or ``"late ip:port\\n"`` (a whoami answer) -> (ip, port)."""
    m = re.fullmatch(r"\s*(?:late )?(\d+\.\d+\.\d+\.\d+):(\d+)\s*", text)
    if m is None:
        raise LabError(f"not a whoami answer: {text!r}")
    return m.group(1), int(m.group(2))


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
        """Poll (bounded) until ``pred(records)`` holds; returns the records either way,
        so the caller's assertion on them says what was seen instead."""
        seen: list[list[dict[str, Any]]] = [[]]

        def holds() -> bool:
            seen[0] = self.records(since)
            return pred(seen[0])

        poll_until(holds, timeout)
        return seen[0]


# --------------------------------------------------------------------------- one-shot clients


def curl(
    ns: str, src: str, url: str, *, max_time: float = 5, extra: Sequence[str] = ()
) -> subprocess.CompletedProcess[bytes]:
    """curl from address ``src`` in ``ns`` (never raises; callers assert on returncode)."""
    return ns_run(
        ns,
        ["curl", "-sS", "--max-time", str(max_time), "--interface", src, *extra, url],
        check=False,
        timeout=max_time + 10,
    )


def ping(
    ns: str, src: str, dst: str, *, count: int = 1, interval: float | None = None, wait: float = 2
) -> subprocess.CompletedProcess[bytes]:
    """``ping -n -c COUNT -W WAIT -I SRC DST`` in ``ns`` (never raises)."""
    argv = ["ping", "-n", "-c", str(count)]
    if interval is not None:
        argv += ["-i", f"{interval:g}"]
    argv += ["-W", f"{wait:g}", "-I", src, dst]
    timeout = count * (interval or 1.0) + wait + 10
    return ns_run(ns, argv, check=False, timeout=timeout)


def as_backend(src: str, extra_backends: Sequence[str] = ()) -> list[str]:
    """argv prefix that runs a command as backend ``src``'s uid in the backend namespace, so
    its unbound sockets leave from ``src`` (the lab routes each such uid by its own table;
    for clients with no bind option, such as nslookup)."""
    uid = layout.backend_uid(src, extra_backends)
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]


def nslookup(
    ns: str, src: str, server: str, name: str = layout.MYIP_NAME, *,
    options: Sequence[str] = (), extra_backends: Sequence[str] = (), timeout: float = 3,
) -> subprocess.CompletedProcess[bytes]:
    """``nslookup [OPTIONS] NAME SERVER`` from backend ``src`` (``timeout`` s per try; never
    raises), the article's way of asking which public address a VM leaves with."""
    argv = [*as_backend(src, extra_backends), "nslookup", *options, f"-timeout={timeout:g}",
            "-retry=1", name, server]
    return ns_run(ns, argv, check=False, timeout=timeout * 3 + 10)


def nslookup_addresses(text: str) -> list[str]:
    """The addresses an nslookup answer gives for the name (not the server's own lines,
    which come before ``Name:`` and carry ``#port``)."""
    out: list[str] = []
    named = False
    for line in text.splitlines():
        if line.startswith("Name:"):
            named = True
        elif named and (m := re.fullmatch(r"Address:\s*(\d+\.\d+\.\d+\.\d+)\s*", line)):
            out.append(m.group(1))
    return out


def iperf3_server(bind: str, port: int, *, one_off: bool = False) -> list[str]:
    """argv of an iperf3 server on ``bind:port`` printing JSON (``one_off``: one test)."""
    return ["iperf3", "-s", *(["-1"] if one_off else []), "-J", "-B", bind, "-p", str(port)]


def iperf3_client(
    dst: str,
    src: str,
    port: int,
    seconds: float,
    *,
    udp_length: int | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """argv of an iperf3 client from ``src`` printing JSON; ``udp_length`` makes it an
    unlimited-rate UDP sender of that payload size, with the server's report attached."""
    argv = ["iperf3", "-c", dst, "-B", src, "-p", str(port), "-t", f"{seconds:g}", "-J"]
    if udp_length is not None:
        argv += ["-u", "-l", str(udp_length), "-b", "0", "--get-server-output"]
    return [*argv, *extra]


def iperf3_json(stdout: bytes, what: str) -> dict[str, Any]:
    """iperf3's JSON report; an error it reports (or no JSON at all) raises LabError."""
    try:
        doc = json.loads(stdout)
    except ValueError as exc:
        raise LabError(f"{what}: iperf3 printed no JSON: {stdout[-500:]!r}") from exc
    if not isinstance(doc, dict):
        raise LabError(f"{what}: iperf3 printed {type(doc).__name__}, not an object")
    if doc.get("error"):
        raise LabError(f"{what}: iperf3: {doc['error']}")
    return doc


def nc_transfer(
    client_ns: str, src: str, server_ns: str, dst: str, port: int, data: bytes,
    *, timeout: float = 60,
) -> str:
    """Send ``data`` over TCP with nc from ``src`` to an nc listener on ``dst:port``; return
    the sha256 of what the listener received (the listener is stopped by its pid).

    The listener writes to a file, not a pipe: an unread pipe would fill and stall the
    transfer long before megabytes got through.
    """
    with tempfile.TemporaryFile() as sink:
        server = ns_popen(server_ns, ["nc", "-l", "-N", "-s", dst, "-p", str(port)],
                          stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.DEVNULL)
        try:
            wait_listening(server_ns, [port])
            ns_run(client_ns, ["nc", "-N", "-s", src, dst, str(port)], input=data,
                   timeout=timeout)
            server.wait(timeout=30)
        finally:
            stop_process(server, timeout=3)
        sink.seek(0)
        digest = hashlib.sha256()
        for chunk in iter(lambda: sink.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def wait_listening(ns: str, ports: Sequence[int], proto: str = "tcp", timeout: float = 10.0) -> None:
    """Wait (bounded) until something listens on every port of ``ports`` in ``ns``."""
    flag = "-Hltn" if proto == "tcp" else "-Hlun"
    want = {f":{p}" for p in ports}

    def missing() -> set[str]:
        out = ns_run(ns, ["ss", flag], check=False, timeout=5).stdout.decode()
        local = [f[3] for f in (ln.split() for ln in out.splitlines()) if len(f) > 3]
        return {w for w in want if not any(addr.endswith(w) for addr in local)}

    wait_until(lambda: not missing(), timeout,
               what=f"{proto} servers listen on {sorted(ports)} in {ns}",
               detail=lambda: f"not listening: {sorted(missing())}")


# --------------------------------------------------------------------------- probe


def probe_argv(spec: dict[str, Any]) -> list[str]:
    return [PYTHON, "-m", PROBE_MODULE, json.dumps(spec)]


def probe(ns: str, spec: dict[str, Any], *, timeout: float = 30) -> list[dict[str, Any]]:
    """Run the probe with ``spec`` in ``ns``; returns its step results (first: the open ports)."""
    res = ns_run(ns, probe_argv(spec), timeout=timeout, check=False)
    lines = [json.loads(x) for x in res.stdout.decode().splitlines() if x.startswith("{")]
    if res.returncode != 0 or not lines or lines[-1].get("op") != "done":
        raise LabError(f"probe failed rc={res.returncode}: "
                       f"{res.stderr.decode(errors='replace')[-3000:]}")
    return lines[:-1]


class ProbeProc:
    """The probe running in the background: read its step results one by one (bounded)."""

    def __init__(self, ns: str, spec: dict[str, Any], procs: ProcessSet | None = None) -> None:
        self._procs = procs if procs is not None else ProcessSet()
        self.proc = self._procs.start(ns, probe_argv(spec), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE)
        self._buf = b""

    def next(self, timeout: float = 10) -> dict[str, Any]:
        """The next step result; a probe that is silent for ``timeout`` or ends is an error."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise LabError(f"probe gave no result within {timeout:g} s")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise LabError(f"probe ended early: {self._stderr()}")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return dict(json.loads(line))

    def _stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return self.proc.stderr.read().decode(errors="replace")[-3000:]

    def close(self) -> None:
        self._procs.stop(self.proc, timeout=3)
        close_pipes(self.proc)


@contextlib.contextmanager
def idle_unix_clients(path: str, n: int, timeout: float = 15.0) -> Iterator[list[socket.socket]]:
    """``n`` connections to the Unix socket ``path`` that never send anything (a slow
    or stuck client of the control socket); all closed at the end."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            socks.append(s)
            s.settimeout(timeout)
            s.connect(path)
        yield socks
    finally:
        for s in socks:
            s.close()


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the peer sends on ``sock`` until it closes the connection."""
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data
