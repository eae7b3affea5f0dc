"""The health prober against real listeners on 127.0.0.1 (no namespaces): tcp and http
probes, timeouts, cadence, one attempt in flight per target, reload and stop."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from gateway.adapters.prober import Prober, http_request, status_ok, timeout_for
from gateway.core.model import Probe

LOCAL = 0x7F000001


class Results:
    """What the prober reported, in order, safe to read from the test's thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: list[tuple[str, int, bool, float]] = []

    def __call__(self, name: str, member: int, ok: bool) -> None:
        with self.lock:
            self.items.append((name, member, ok, time.monotonic()))

    def of(self, name: str) -> list[bool]:
        with self.lock:
            return [ok for n, _m, ok, _t in self.items if n == name]

    def wait(self, name: str, count: int, timeout: float = 5.0) -> list[bool]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.of(name)
            if len(got) >= count:
                return got
            time.sleep(0.01)
        return self.of(name)


def _listener() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    return s


def _free_port() -> int:
    s = _listener()
    port = int(s.getsockname()[1])
    s.close()
    return port


class HttpServer:
    """A minimal HTTP/1.1 server answering every request with ``status``; records requests."""

    def __init__(self, status: int = 200, delay: float = 0.0) -> None:
        self.sock = _listener()
        self.port = int(self.sock.getsockname()[1])
        self.status = status
        self.delay = delay
        self.requests: list[bytes] = []
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.1)
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                self.requests.append(data)
                time.sleep(self.delay)
                reason = "OK" if self.status == 200 else "Nope"
                with contextlib.suppress(OSError):
                    conn.sendall(f"HTTP/1.1 {self.status} {reason}\r\nContent-Length: 0\r\n\r\n".encode())

    def close(self) -> None:
        self.stopping = True
        self.thread.join(0.3)  # a daemon thread still sleeping in a slow answer ends on its own
        self.sock.close()


@pytest.fixture
def results() -> Results:
    return Results()


@pytest.fixture
def prober(results: Results) -> Iterator[Prober]:
    p = Prober(results, source=LOCAL)
    p.start()
    yield p
    p.stop()


def test_tcp_probe_is_up_on_a_listener_and_down_on_a_closed_port(prober: Prober, results: Results) -> None:
    """tcp: an open port reports up, a refused connection reports down, each on its own target."""
    lst = _listener()
    try:
        up = Probe("up", "tcp", int(lst.getsockname()[1]), interval=0.2)
        down = Probe("down", "tcp", _free_port(), interval=0.2)
        prober.set_targets([(up, LOCAL), (down, LOCAL)])
        assert results.wait("up", 2)[:2] == [True, True]
        assert results.wait("down", 2)[:2] == [False, False]
    finally:
        lst.close()


def test_probes_keep_their_interval(prober: Prober, results: Results) -> None:
    """Attempts of one target come every interval (first at once), not back to back."""
    lst = _listener()
    try:
        probe = Probe("p", "tcp", int(lst.getsockname()[1]), interval=0.25)
        t0 = time.monotonic()
        prober.set_targets([(probe, LOCAL)])
        results.wait("p", 4)
        with results.lock:
            times = [t - t0 for n, _m, _ok, t in results.items if n == "p"][:4]
        assert times[0] < 0.2
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        assert all(0.15 < g < 0.45 for g in gaps), gaps
    finally:
        lst.close()


def test_http_probe_needs_status_200_and_sends_path_and_host(prober: Prober, results: Results) -> None:
    """http: GET path with a Host header; 200 is up, any other status is down."""
    good, bad = HttpServer(200), HttpServer(503)
    try:
        prober.set_targets([
            (Probe("good", "http", good.port, path="/health", interval=0.2), LOCAL),
            (Probe("bad", "http", bad.port, path="/", interval=0.2), LOCAL),
        ])
        assert results.wait("good", 2)[:2] == [True, True]
        assert results.wait("bad", 2)[:2] == [False, False]
        first = good.requests[0].decode()
        assert first.startswith("GET /health HTTP/1.1\r\n")
        assert f"\r\nHost: 127.0.0.1:{good.port}\r\n" in first
    finally:
        good.close()
        bad.close()


def test_a_silent_listener_times_out_within_the_interval(prober: Prober, results: Results) -> None:
    """An http server that never answers is down after min(interval, 2 s), with one attempt in flight."""
    slow = HttpServer(200, delay=1.0)
    try:
        probe = Probe("slow", "http", slow.port, interval=0.3)
        assert timeout_for(probe) == pytest.approx(0.3)
        t0 = time.monotonic()
        prober.set_targets([(probe, LOCAL)])
        got = results.wait("slow", 1)
        assert got[:1] == [False]
        with results.lock:
            took = results.items[0][3] - t0
        assert 0.25 < took < 0.8
        assert prober.started - prober.finished <= 1
    finally:
        slow.close()


def test_probe_sockets_are_bound_to_the_probe_source(results: Results) -> None:
    """The connection comes from probe_source (the AzureLoadBalancer address backends see)."""
    lst = _listener()
    seen: list[str] = []

    def accept() -> None:
        lst.settimeout(3)
        conn, peer = lst.accept()
        seen.append(peer[0])
        conn.close()

    th = threading.Thread(target=accept)
    th.start()
    p = Prober(results, source=0x7F000002)  # 127.0.0.2: any loopback address is local
    p.start()
    try:
        p.set_targets([(Probe("src", "tcp", int(lst.getsockname()[1]), interval=5), LOCAL)])
        th.join(4)
        assert seen == ["127.0.0.2"]
        assert results.wait("src", 1) == [True]
    finally:
        p.stop()
        lst.close()


def test_a_reload_keeps_staying_targets_and_drops_gone_ones(prober: Prober, results: Results) -> None:
    """set_targets again: a target that goes is no longer probed; a new one starts at once."""
    lst = _listener()
    try:
        port = int(lst.getsockname()[1])
        a, b = Probe("a", "tcp", port, interval=0.1), Probe("b", "tcp", port, interval=0.1)
        prober.set_targets([(a, LOCAL)])
        results.wait("a", 2)
        prober.set_targets([(b, LOCAL)])
        results.wait("b", 2)
        time.sleep(0.15)
        n = len(results.of("a"))
        time.sleep(0.4)
        assert len(results.of("a")) == n
        assert len(results.of("b")) >= 4
    finally:
        lst.close()


def test_stop_is_prompt_and_reports_nothing_after(results: Results) -> None:
    """stop() returns quickly even with an attempt in flight, and no report follows it."""
    slow = HttpServer(200, delay=1.5)
    p = Prober(results, source=LOCAL)
    p.start()
    try:
        p.set_targets([(Probe("s", "http", slow.port, interval=2.0), LOCAL)])
        time.sleep(0.2)
        t0 = time.monotonic()
        p.stop()
        assert time.monotonic() - t0 < 1.0
        assert not p.thread.is_alive()
        n = len(results.items)
        time.sleep(0.3)
        assert len(results.items) == n
    finally:
        slow.close()


def test_status_line_and_request_helpers() -> None:
    """status_ok reads only the status line; the request carries path and Host."""
    assert status_ok(b"HTTP/1.1 200 OK\r\n") is True
    assert status_ok(b"HTTP/1.0 200 OK\r\nX: y\r\n\r\n") is True
    assert status_ok(b"HTTP/1.1 404 Not Found\r\n") is False
    assert status_ok(b"HTTP/1.1 20") is None
    assert status_ok(b"SSH-2.0-OpenSSH\r\n") is False
    req = http_request(Probe("p", "http", 8080, path="/x"), 0x0A0A0101)
    assert req.startswith(b"GET /x HTTP/1.1\r\nHost: 10.10.1.1:8080\r\n") and req.endswith(b"\r\n\r\n")
