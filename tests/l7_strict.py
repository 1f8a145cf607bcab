"""A small, strict HTTP/1.1 request-stream parser: the tests' independent view of framing.

It is deliberately not httptools (which lb uses): the smuggling tests parse
what a client sent and what a target received with this parser, and compare.
The grammar is RFC 9112's, with no leniency except the ones lb takes on
purpose and documents (a ``chunked`` transfer coding preceded by
``identity`` codings, chunk extensions, trailers; all framing-neutral):

- request-line: ``method SP request-target SP HTTP/1.0|HTTP/1.1 CRLF``;
  method a token; the target visible ASCII without ``#`` (a fragment is not
  part of a request-target, RFC 9112 §3.2).
- field lines: ``token ":" OWS value OWS CRLF``; no obs-fold, no bare CR or
  LF, no CTL but HTAB in a value, no space before the colon.
- framing (RFC 9112 §6): Transfer-Encoding, whose last coding is chunked,
  wins, but one with Content-Length too, or in HTTP/1.0, or with any other
  coding, is an error; Content-Length is one header of digits; a
  ``Connection`` header naming a framing header or Host is an error (the
  message would change framing or authority at the next hop); HTTP/1.1
  needs exactly one Host.
- chunked bodies: hex sizes that fit 64 bits, CRLF everywhere, trailers
  without framing fields.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_TARGET = re.compile(rb"[\x21-\x22\x24-\x7e]+\Z")  # VCHAR less "#"
_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*\Z")
_DIGITS = re.compile(rb"[0-9]+\Z")
_HEX = re.compile(rb"0*[0-9A-Fa-f]{1,16}\Z")  # the value fits 64 bits
_FRAMING = frozenset((b"content-length", b"transfer-encoding"))


class StrictError(Exception):
    pass


class Incomplete(Exception):
    pass


@dataclass
class ParsedRequest:
    method: bytes
    target: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]  # names lowercased, values stripped
    body: bytes
    chunked: bool
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)

    def values(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n == name]

    def header(self, name: bytes) -> bytes | None:
        found = self.values(name)
        return found[0] if found else None

    def effective(self) -> tuple[bytes, bytes]:
        """(authority, origin-form target): what the request is for, either form."""
        if self.target.startswith(b"/"):
            return (self.header(b"host") or b"").lower(), self.target
        url = urlsplit(self.target)
        path = url.path or b"/"
        return url.netloc.lower(), path + (b"?" + url.query if url.query else b"")

    def connection_tokens(self) -> set[bytes]:
        return {t.strip().lower() for v in self.values(b"connection") for t in v.split(b",") if t.strip()}


@dataclass
class Stream:
    requests: list[ParsedRequest]
    rest: bytes  # bytes after the last complete request: an incomplete one (or nothing)
    error: str | None  # why parsing stopped at ``rest``, if it did not just run out


def parse_stream(data: bytes) -> Stream:
    """Every complete request in ``data``; stops at the first error or incomplete one."""
    requests: list[ParsedRequest] = []
    pos = 0
    while pos < len(data):
        try:
            request, used = _parse_one(data, pos)
        except Incomplete:
            return Stream(requests, data[pos:], None)
        except StrictError as exc:
            return Stream(requests, data[pos:], str(exc))
        requests.append(request)
        pos = used
    return Stream(requests, b"", None)


def _line(data: bytes, pos: int) -> tuple[bytes, int]:
    end = data.find(b"\n", pos)
    if end < 0:
        if b"\r" in data[pos:-1]:
            raise StrictError("bare CR")
        raise Incomplete
    line = data[pos:end]
    if not line.endswith(b"\r"):
        raise StrictError("bare LF")
    line = line[:-1]
    if b"\r" in line:
        raise StrictError("bare CR")
    return line, end + 1


def _fields(data: bytes, pos: int) -> tuple[list[tuple[bytes, bytes]], int]:
    fields: list[tuple[bytes, bytes]] = []
    while True:
        line, pos = _line(data, pos)
        if not line:
            return fields, pos
        if line[:1] in (b" ", b"\t"):
            raise StrictError("obs-fold")
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.match(name):
            raise StrictError(f"bad field name {name!r}")
        value = value.strip(b" \t")
        if not _VALUE.match(value):
            raise StrictError(f"bad field value {value!r}")
        fields.append((name.lower(), value))


def _parse_one(data: bytes, pos: int) -> tuple[ParsedRequest, int]:
    line, pos = _line(data, pos)
    parts = line.split(b" ")
    if len(parts) != 3:
        raise StrictError(f"bad request line {line!r}")
    method, target, version = parts
    if not _TOKEN.match(method):
        raise StrictError("bad method")
    if not _TARGET.match(target):
        raise StrictError(f"bad request-target {target!r}")
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise StrictError(f"bad version {version!r}")
    headers, pos = _fields(data, pos)
    request = ParsedRequest(method, target, version, headers, b"", False)
    hosts = request.values(b"host")
    if len(hosts) > 1 or (version == b"HTTP/1.1" and not hosts):
        raise StrictError("Host")
    nominated = request.connection_tokens()
    if nominated & (_FRAMING | {b"host"}):
        raise StrictError("Connection nominates a framing header or Host")
    te = request.values(b"transfer-encoding")
    cl = request.values(b"content-length")
    if te:
        if cl:
            raise StrictError("Transfer-Encoding and Content-Length")
        if version == b"HTTP/1.0":
            raise StrictError("Transfer-Encoding in HTTP/1.0")
        codings = [c.strip().lower() for v in te for c in v.split(b",")]
        if [c for c in codings if c != b"identity"] != [b"chunked"] or codings[-1] != b"chunked":
            raise StrictError(f"Transfer-Encoding {te!r}")
        request.chunked = True
        body, request.trailers, pos = _chunked(data, pos)
        request.body = body
        return request, pos
    if len(cl) > 1:
        raise StrictError("more than one Content-Length")
    if cl:
        if not _DIGITS.match(cl[0]):
            raise StrictError("bad Content-Length")
        n = int(cl[0])
        if len(data) - pos < n:
            raise Incomplete
        request.body = data[pos : pos + n]
        pos += n
    return request, pos


def _chunked(data: bytes, pos: int) -> tuple[bytes, list[tuple[bytes, bytes]], int]:
    body: list[bytes] = []
    while True:
        line, pos = _line(data, pos)
        size, _, ext = line.partition(b";")
        if not _HEX.match(size):
            raise StrictError(f"bad chunk size {size!r}")
        if not _VALUE.match(ext):
            raise StrictError("bad chunk extension")
        n = int(size, 16)
        if n == 0:
            trailers, pos = _fields(data, pos)
            if any(name in _FRAMING for name, _ in trailers):
                raise StrictError("framing field in trailers")
            return b"".join(body), trailers, pos
        if len(data) - pos < n + 2:
            raise Incomplete
        body.append(data[pos : pos + n])
        pos += n
        if data[pos : pos + 2] != b"\r\n":
            raise StrictError("chunk not followed by CRLF")
        pos += 2
