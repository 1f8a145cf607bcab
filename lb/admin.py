"""The local admin API: a unix socket speaking one JSON object per line.

    request:  {"cmd": "status"}                 response: {"ok": true, "result": {...}}
              {"cmd": "targets", "group": "web"}          {"ok": false, "error": "..."}
              {"cmd": "register", "group": "web", "target": "10.0.1.14", "port": 80}
              {"cmd": "deregister", "group": "web", "target": "10.0.1.11"}
              {"cmd": "reload"}

The socket is created mode 0600 in a 0700 directory, and every connection's
peer credentials (SO_PEERCRED) are checked: only root (uid 0) is served,
anyone else gets one error line and is disconnected.

Whatever a line holds, it gets one answer line and the server goes on: a line
that is not UTF-8, not JSON, not an object, has a key twice, or nests more
than MAX_DEPTH levels is answered with the error; a line over MAX_REQUEST
bytes too, and then the connection is closed. The handler validates the
object (lb.admin_commands, with lb.config's rules); anything else it raises
is logged and answered as an internal error, never a dropped connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("lb.admin")

Handler = Callable[[dict[str, Any]], Awaitable[Any]]
MAX_REQUEST = 64 * 1024  # bytes of one request line
MAX_DEPTH = 32  # JSON nesting of a request; one is a flat object (json.loads recurses)
DISCARD = 1 << 20  # after an over-long line: bytes read and dropped before closing
DISCARD_TIMEOUT = 1.0


class AdminError(RuntimeError):
    """The admin socket refused or failed a request; the message says why."""


class NotRunning(AdminError):
    """No daemon answers on the socket (none there, or nobody listening)."""


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
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):  # readline's way to say: over the limit
                    error = f"a request line is at most {MAX_REQUEST} bytes; closing the connection"
                    await self._send(writer, {"ok": False, "error": error})
                    await self._close_after_overrun(reader, writer)
                    break
                if not line:
                    break
                await self._send(writer, await self._answer(line))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:  # a bug here must not end the task with an unseen exception
            log.exception("admin: a connection failed")
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except ConnectionError:
                pass

    async def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            return {"ok": True, "result": await self.handler(parse_request(line))}
        except AdminError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:
            log.exception("admin: request %.200r failed", line)
            return {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc} (see the daemon's log)"}

    @staticmethod
    async def _close_after_overrun(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """End our side, then drop what the client is still sending (within bounds):
        closing with unread input would reset the connection under the answer."""
        if writer.can_write_eof():
            writer.write_eof()
        try:
            async with asyncio.timeout(DISCARD_TIMEOUT):
                dropped = 0
                while dropped < DISCARD and (chunk := await reader.read(65536)):
                    dropped += len(chunk)
        except TimeoutError:
            pass

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, response: dict[str, Any]) -> None:
        writer.write(json.dumps(response, default=str).encode() + b"\n")
        await writer.drain()


# --- one request line → a JSON object ---------------------------------------------------

_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}:,]')
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def parse_request(line: bytes) -> dict[str, Any]:
    """The JSON object of one request line; AdminError says what is wrong with it."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AdminError(f"a request is UTF-8 JSON; byte {exc.start} is not valid UTF-8") from None
    where = json_too_deep(text, MAX_DEPTH)
    if where is not None:
        raise AdminError(f"{where}nested more than {MAX_DEPTH} levels deep")
    try:
        request = json.loads(text, object_pairs_hook=_object)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise AdminError(f"invalid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise AdminError('a request is a JSON object, e.g. {"cmd": "status"}')
    return request


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"the key {key!r} appears twice")
        result[key] = value
    return result


def json_too_deep(text: str, limit: int) -> str | None:
    """None if ``text`` nests at most ``limit`` levels; else where it goes
    deeper, as a key path prefix ("register.target: ", "" at the top), found
    without recursion (json.loads recurses, and would run out of stack)."""
    depth = 0
    key: str | None = None
    cmd: str | None = None
    expect_key = False
    for token in _JSON_TOKEN.finditer(text):
        char = token.group()
        if char in "[{":
            depth += 1
            expect_key = char == "{" and depth == 1
            if depth > limit:
                if key is None:
                    return ""
                shown = key if _BARE_KEY.fullmatch(key) else json.dumps(key)
                return f"{cmd}.{shown}: " if cmd and _BARE_KEY.fullmatch(cmd) else f"{shown}: "
        elif char in "]}":
            depth, expect_key = depth - 1, False
        elif char == ",":
            expect_key = depth == 1
        elif char != ":" and depth == 1:  # a string in the request object: a key, or a key's value
            try:
                string = json.loads(char)
            except ValueError:
                string = char
            if expect_key:
                key, expect_key = string, False
            elif key == "cmd":
                cmd = string
    return None


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
        raise NotRunning(f"no daemon: {path} does not exist (is `lb up` running?)") from exc
    except ConnectionRefusedError as exc:
        raise NotRunning(f"no daemon listening on {path} (stale socket?)") from exc
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
