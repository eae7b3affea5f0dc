"""The control socket: a Unix stream socket the operator CLI talks to.

One request per connection: the client sends one JSON object on one line
(``{"command": "ports", "backend": "10.10.1.1"}``) and reads one JSON
object back (``{"ok": true, "result": ...}`` or ``{"ok": false, "error":
"..."}``) before the server closes.

Everyone is served at once, so no client can hold up another (issue 9: one
idle client used to block every ``snatgw`` command):

- one thread (``snatgw-control``) accepts and reads every request with a
  selector, each connection under its own deadline
  (:data:`REQUEST_TIMEOUT` to send its line; an idle client is told so and
  closed);
- a complete request goes to a small pool of workers that ask the packet
  loop (:meth:`PacketLoop.call`, a snapshot taken between two batches),
  format and send the answer (:data:`REPLY_TIMEOUT` to read it);
- at most ``max_clients`` connections are open; one more is answered at
  once with an error line and closed, and counted (:meth:`ControlServer.stats`).

Who may do what: the socket's mode and group decide who may connect
(``control_mode``, default 0600, or 0660 with ``control_group``), so
read-only commands can be opened to a group; a command that changes the
gateway (:data:`PRIVILEGED`: ``reload``) is refused unless the peer's
credentials (``SO_PEERCRED``, taken by the kernel at connect time and not
forgeable by the client) say uid 0.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Longest request accepted, in bytes.
MAX_REQUEST = 65536
#: How long a client may take to send its one request line after connecting.
REQUEST_TIMEOUT = 2.0
#: How long a client may take to read the answer (``snatgw flows`` may be megabytes).
REPLY_TIMEOUT = 10.0
#: Connections open at once by default (``gateway.control_max_clients``).
MAX_CLIENTS = 256
#: Requests answered at once; each waits for the packet loop, which serves them in turn.
WORKERS = 8
#: Commands that change the gateway: only uid 0 may send them.
PRIVILEGED = frozenset({"reload"})

Handler = Callable[[dict[str, Any]], Any]
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class RequestError(Exception):
    """A request the gateway refuses; its message goes back to the client."""


def group_id(name: str) -> int:
    """The gid of group ``name``; LookupError (with a readable message) if there is none."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise LookupError(f"no group named {name!r}") from None


def socket_mode(group: str | None, mode: int | None) -> int:
    """The control socket's permission bits: ``mode`` if set, else 0660 with a group, 0600 without."""
    if mode is not None:
        return mode
    return 0o660 if group is not None else 0o600


def peer_uid(conn: socket.socket) -> int:
    """The uid of the process at the other end of ``conn``, as the kernel recorded it at connect."""
    _pid, uid, _gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return int(uid)


def _line(reply: dict[str, Any]) -> bytes:
    return json.dumps(reply, separators=(",", ":")).encode() + b"\n"


@dataclass(slots=True, eq=False)
class _Client:
    """One connection while its request is being read."""

    sock: socket.socket
    uid: int
    deadline: float
    data: bytearray = field(default_factory=bytearray)


class ControlServer:
    """Listens on ``path`` and answers each request with ``handler(request)``."""

    def __init__(
        self,
        path: str,
        handler: Handler,
        group: str | None = None,
        mode: int | None = None,
        max_clients: int = MAX_CLIENTS,
        request_timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self.path = path
        self.handler = handler
        self.max_clients = max_clients
        self.request_timeout = request_timeout
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._open = 0
        self._counts = {"served": 0, "refused": 0, "timed_out": 0, "denied": 0}
        Path(path).parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # left behind by a run that died
            else:
                raise RuntimeError(f"control socket {path} is in use by another gateway")
            finally:
                probe.close()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self.sock.bind(path)
        finally:
            os.umask(old)
        if group is not None:
            os.chown(path, -1, group_id(group))
        os.chmod(path, socket_mode(group, mode))
        self.sock.listen(128)
        self.sock.setblocking(False)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._workers = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="snatgw-control-worker")
        self.thread = threading.Thread(target=self._serve, name="snatgw-control", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stats(self) -> dict[str, int]:
        """Connections open now, the limit, and how many were answered (``served``,
        including ``denied``: a privileged command from a non-root peer), refused for
        the limit, or closed for sending no request in time."""
        with self._lock:
            return {"clients": self._open, "max_clients": self.max_clients, **self._counts}

    def _count(self, what: str, opened: int = 0) -> None:
        with self._lock:
            self._counts[what] += 1
            self._open += opened

    # ------------------------------------------------------------------ the reading thread

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        clients: dict[int, _Client] = {}
        try:
            while not self._stopping.is_set():
                now = time.monotonic()
                soonest = min((c.deadline for c in clients.values()), default=now + 0.5)
                for key, _ in sel.select(max(0.0, min(0.5, soonest - now))):
                    if key.fileobj is self.sock:
                        self._accept(sel, clients)
                    elif key.fileobj is self._wake_r:
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(4096)
                    else:
                        c = clients.get(key.fd)
                        if c is not None and self._read(c):
                            sel.unregister(c.sock)
                            del clients[key.fd]
                            self._workers.submit(self._answer, c)
                now = time.monotonic()
                for fd, c in list(clients.items()):
                    if c.deadline <= now:
                        sel.unregister(c.sock)
                        del clients[fd]
                        msg = f"no request within {self.request_timeout:g} s; closing"
                        self._close(c.sock, {"ok": False, "error": msg}, "timed_out")
        finally:
            for c in clients.values():
                self._close(c.sock, None, None)
            sel.close()

    def _accept(self, sel: selectors.BaseSelector, clients: dict[int, _Client]) -> None:
        """Take every pending connection; over the limit, answer with an error and close."""
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            conn.setblocking(False)
            with self._lock:
                full = self._open >= self.max_clients
                if not full:
                    self._open += 1
            if full:
                msg = f"too many control connections (limit {self.max_clients}); try again"
                with self._lock:
                    self._counts["refused"] += 1
                with contextlib.suppress(OSError):
                    conn.send(_line({"ok": False, "error": msg}))
                conn.close()
                continue
            try:
                uid = peer_uid(conn)
            except OSError:
                uid = -1  # unknown: treated as unprivileged
            c = _Client(conn, uid, time.monotonic() + self.request_timeout)
            clients[conn.fileno()] = c
            sel.register(conn, selectors.EVENT_READ)

    def _read(self, c: _Client) -> bool:
        """Read what ``c`` sent; True once the request is complete (a line, EOF, or too long)."""
        try:
            chunk = c.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            chunk = b""
        if chunk:
            c.data += chunk
        return not chunk or b"\n" in chunk or len(c.data) >= MAX_REQUEST

    def _close(self, conn: socket.socket, reply: dict[str, Any] | None, what: str | None) -> None:
        """Best-effort last line to a client that gets no answer, then close it."""
        if reply is not None:
            with contextlib.suppress(OSError):
                conn.send(_line(reply))
        conn.close()
        with self._lock:
            self._open -= 1
            if what is not None:
                self._counts[what] += 1

    # ------------------------------------------------------------------ the workers

    def _answer(self, c: _Client) -> None:
        conn = c.sock
        try:
            try:
                request = json.loads(bytes(c.data).split(b"\n", 1)[0] or b"null")
                if not isinstance(request, dict) or not isinstance(request.get("command"), str):
                    raise RequestError('a request is one JSON object with a "command"')
                command = request["command"]
                if command in PRIVILEGED and c.uid != 0:
                    self._count("denied")
                    raise RequestError(
                        f"{command} changes the gateway and needs root; this client runs as uid {c.uid}"
                    )
                reply: dict[str, Any] = {"ok": True, "result": self.handler(request)}
            except (RequestError, ValueError, TimeoutError) as e:
                reply = {"ok": False, "error": str(e)}
            except Exception as e:  # a bug in a view must not kill the control socket
                reply = {"ok": False, "error": f"internal error: {e!r}"}
            conn.setblocking(True)
            conn.settimeout(REPLY_TIMEOUT)
            with contextlib.suppress(OSError):
                conn.sendall(_line(reply))
        finally:
            self._close(conn, None, "served")

    def close(self) -> None:
        """Stop answering and remove the socket file; idempotent."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")
        if self.thread.is_alive():
            self.thread.join(timeout=2)
        self._workers.shutdown(wait=False, cancel_futures=True)
        self.sock.close()
        self._wake_r.close()
        self._wake_w.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def request(path: str, command: str, timeout: float = 30.0, **args: Any) -> Any:
    """Send one request to the gateway at ``path`` and return its result.

    Raises OSError when the gateway cannot be reached and RequestError when
    it refuses the request.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            # A refused connection (over the limit) is closed after one error line: read it.
            s.sendall(json.dumps({"command": command, **args}).encode() + b"\n")
        chunks = []
        while True:
            try:
                chunk = s.recv(1 << 16)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    reply = json.loads(b"".join(chunks) or b"null")
    if not isinstance(reply, dict) or not reply.get("ok"):
        raise RequestError(reply.get("error", "no answer") if isinstance(reply, dict) else "no answer")
    return reply["result"]
