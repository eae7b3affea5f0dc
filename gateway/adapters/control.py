"""The control socket: a Unix stream socket the operator CLI talks to.

One request per connection: the client sends one JSON object on one line
(``{"command": "ports", "backend": "10.10.1.1"}``) and reads one JSON
object back (``{"ok": true, "result": ...}`` or ``{"ok": false, "error":
"..."}``) before the server closes. A thread of its own accepts and
answers; the data comes from :meth:`PacketLoop.call`, a snapshot taken
between two packet batches, and the formatting and sending happen here, off
the packet loop.

The socket is mode 0600 (root only), or 0660 and owned by
``gateway.control_group`` when that is set.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Longest request accepted, in bytes.
MAX_REQUEST = 65536
#: How long a client may take to send its request or read the answer.
CLIENT_TIMEOUT = 10.0

Handler = Callable[[dict[str, Any]], Any]


class RequestError(Exception):
    """A request the gateway refuses; its message goes back to the client."""


def group_id(name: str) -> int:
    """The gid of group ``name``; LookupError (with a readable message) if there is none."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise LookupError(f"no group named {name!r}") from None


class ControlServer:
    """Listens on ``path`` and answers each request with ``handler(request)``."""

    def __init__(self, path: str, handler: Handler, group: str | None = None) -> None:
        self.path = path
        self.handler = handler
        self._stopping = threading.Event()
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
            os.chmod(path, 0o660)
        self.sock.listen(16)
        self.sock.settimeout(0.5)
        self.thread = threading.Thread(target=self._serve, name="snatgw-control", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn, contextlib.suppress(OSError):
                self._answer(conn)

    def _answer(self, conn: socket.socket) -> None:
        conn.settimeout(CLIENT_TIMEOUT)
        data = b""
        while b"\n" not in data and len(data) < MAX_REQUEST:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        try:
            request = json.loads(data.split(b"\n", 1)[0] or b"null")
            if not isinstance(request, dict) or not isinstance(request.get("command"), str):
                raise RequestError('a request is one JSON object with a "command"')
            reply: dict[str, Any] = {"ok": True, "result": self.handler(request)}
        except (RequestError, ValueError, TimeoutError) as e:
            reply = {"ok": False, "error": str(e)}
        except Exception as e:  # a bug in a view must not kill the control socket
            reply = {"ok": False, "error": f"internal error: {e!r}"}
        conn.sendall(json.dumps(reply, separators=(",", ":")).encode() + b"\n")

    def close(self) -> None:
        """Stop answering and remove the socket file; idempotent."""
        self._stopping.set()
        if self.thread.is_alive():
            self.thread.join(timeout=2)
        self.sock.close()
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
        s.sendall(json.dumps({"command": command, **args}).encode() + b"\n")
        chunks = []
        while True:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    reply = json.loads(b"".join(chunks) or b"null")
    if not isinstance(reply, dict) or not reply.get("ok"):
        raise RequestError(reply.get("error", "no answer") if isinstance(reply, dict) else "no answer")
    return reply["result"]
