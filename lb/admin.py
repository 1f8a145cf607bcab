"""The local admin API: a unix socket speaking one JSON object per line.

    request:  {"cmd": "status"}                 response: {"ok": true, "result": {...}}
              {"cmd": "targets", "group": "web"}          {"ok": false, "error": "..."}
              {"cmd": "register", "group": "web", "target": "10.0.1.14", "port": 80}
              {"cmd": "deregister", "group": "web", "target": "10.0.1.11"}
              {"cmd": "reload"}

The socket is created mode 0600 in a 0700 directory, and every connection's
peer credentials (SO_PEERCRED) are checked: only root (uid 0) is served,
anyone else gets one error line and is disconnected.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("lb.admin")

Handler = Callable[[dict[str, Any]], Awaitable[Any]]
MAX_REQUEST = 64 * 1024


class AdminError(RuntimeError):
    """The admin socket refused or failed a request; the message says why."""


def peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


class AdminServer:
    """Serves requests with `handler(request) -> result`; raise AdminError for a clean error."""

    def __init__(self, path: str, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        directory = os.path.dirname(self.path)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        if os.path.exists(self.path):
            os.unlink(self.path)  # a previous daemon's (lb up refuses to run twice before this)
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve, self.path, limit=MAX_REQUEST)
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            uid = peer_uid(sock)
            if uid != 0:
                log.warning("admin: refused a client with uid %d", uid)
                await self._send(writer, {"ok": False, "error": "permission denied: the admin socket serves root only"})
                return
            while line := await reader.readline():
                try:
                    request = json.loads(line)
                    if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
                        raise AdminError('a request is a JSON object with a "cmd" string')
                    response = {"ok": True, "result": await self.handler(request)}
                except (AdminError, json.JSONDecodeError, ValueError, KeyError) as exc:
                    response = {"ok": False, "error": str(exc)}
                await self._send(writer, response)
        except (ConnectionError, asyncio.LimitOverrunError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except ConnectionError:
                pass

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, response: dict[str, Any]) -> None:
        writer.write(json.dumps(response, default=str).encode() + b"\n")
        await writer.drain()


def request(path: str, cmd: str, timeout: float = 30.0, **args: Any) -> Any:
    """One request to a running daemon (blocking; for the CLI and tests)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except FileNotFoundError as exc:
        raise AdminError(f"no daemon: {path} does not exist (is `lb up` running?)") from exc
    except ConnectionRefusedError as exc:
        raise AdminError(f"no daemon listening on {path} (stale socket?)") from exc
    except PermissionError as exc:
        raise AdminError(f"permission denied on {path}: run as root") from exc
    except OSError as exc:
        raise AdminError(f"admin socket {path}: {exc}") from exc
    if not data:
        raise AdminError(f"the daemon closed {path} without answering")
    response = json.loads(data)
    if not response.get("ok"):
        raise AdminError(response.get("error", "unknown error"))
    return response["result"]
