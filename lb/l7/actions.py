"""The actions answered without a target: fixed-response and redirect.

Each is compiled once per routing table into an object whose ``render``
only joins precomputed bytes with the few per-request parts (the Date line,
the Connection line, and for a redirect the Location).
"""

from __future__ import annotations

from lb.l7.errors import html_body
from lb.l7.httputil import CRLF, http_date, status_line
from lb.model import FixedResponseAction, RedirectAction

_TEXT_TYPES = ("text/", "application/javascript", "application/json")


class FixedResponse:
    """A fixed-response action, rendered to bytes but for Date and Connection."""

    __slots__ = ("status", "_head", "_body")

    def __init__(self, action: FixedResponseAction) -> None:
        body = action.body.encode("utf-8")
        content_type = action.content_type
        if content_type.startswith(_TEXT_TYPES):
            content_type += "; charset=utf-8"
        self.status = action.status_code
        self._head = b"".join(
            (
                status_line(action.status_code),
                b"server: lb\r\n",
                b"content-type: " + content_type.encode("ascii") + CRLF,
                b"content-length: %d\r\n" % len(body),
            )
        )
        self._body = body

    def render(self, connection: bytes, head_only: bool) -> bytes:
        return b"".join((self._head, http_date.line(), connection, CRLF, b"" if head_only else self._body))


_PLACEHOLDERS = ("#{protocol}", "#{host}", "#{port}", "#{path}", "#{query}")
_DEFAULT_PORTS = {"http": "80", "https": "443"}


def host_without_port(host: str) -> str:
    """``example.com:8080`` → ``example.com``; ``[::1]:80`` → ``[::1]``."""
    if host.startswith("["):
        end = host.find("]")
        return host if end < 0 else host[: end + 1]
    name, _, port = host.partition(":")
    return host if ":" in port else name


class Redirect:
    """A redirect action: components with ``#{...}`` placeholders → Location."""

    __slots__ = ("status", "_action", "_head", "_body", "_templated")

    def __init__(self, action: RedirectAction) -> None:
        self.status = action.status_code
        self._action = action
        body = html_body(action.status_code)
        self._head = b"".join(
            (
                status_line(action.status_code),
                b"server: lb\r\n",
                b"content-type: text/html\r\n",
                b"content-length: %d\r\n" % len(body),
            )
        )
        self._body = body
        self._templated = tuple(
            any(p in value for p in _PLACEHOLDERS)
            for value in (action.protocol, action.host, action.port, action.path, action.query)
        )

    def location(
        self, host: str | None, path: str, query: str, port: int, fallback_host: str, protocol: str = "http"
    ) -> str:
        """The Location for a request; unset components keep the request's values."""
        values = {
            "#{protocol}": protocol,
            "#{host}": host_without_port(host) if host else fallback_host,
            "#{port}": str(port),
            "#{path}": path.removeprefix("/"),
            "#{query}": query,
        }
        a = self._action
        protocol, new_host, new_port, new_path, new_query = (
            _fill(value, values) if templated else value
            for value, templated in zip((a.protocol, a.host, a.port, a.path, a.query), self._templated)
        )
        protocol = protocol.lower()
        if not new_path.startswith("/"):
            new_path = "/" + new_path
        authority = new_host if _DEFAULT_PORTS.get(protocol) == new_port else f"{new_host}:{new_port}"
        return f"{protocol}://{authority}{new_path}" + (f"?{new_query}" if new_query else "")

    def render(
        self,
        connection: bytes,
        head_only: bool,
        host: str | None,
        path: str,
        query: str,
        port: int,
        fallback_host: str,
        protocol: str = "http",
    ) -> bytes:
        return self.answer(connection, head_only, self.location(host, path, query, port, fallback_host, protocol))

    def answer(self, connection: bytes, head_only: bool, location: str) -> bytes:
        """The response that sends the client to ``location`` (from :meth:`location`)."""
        return b"".join(
            (
                self._head,
                http_date.line(),
                b"location: ",
                location.encode("latin-1"),
                CRLF,
                connection,
                CRLF,
                b"" if head_only else self._body,
            )
        )


def _fill(template: str, values: dict[str, str]) -> str:
    # One pass, so a value that itself contains "#{...}" is not expanded again.
    out = []
    i = 0
    while True:
        j = template.find("#{", i)
        if j < 0:
            out.append(template[i:])
            return "".join(out)
        k = template.find("}", j)
        key = template[j : k + 1] if k >= 0 else ""
        if key in values:
            out.append(template[i:j])
            out.append(values[key])
            i = k + 1
        else:
            out.append(template[i : j + 2])
            i = j + 2
