"""Small HTTP/1.x building blocks shared by the proxy's modules.

Everything here is computed once (status lines, header tables) or once
a second (the Date header), never per request, but for the request ids
(a counter).
"""

from __future__ import annotations

import http
import os
import re
import time
from email.utils import formatdate

CRLF = b"\r\n"

# Connection header options we act on ourselves; any other token names a header to drop.
CONNECTION_OPTIONS = frozenset((b"close", b"keep-alive", b"upgrade", b""))
# Headers that frame the message: a Connection header may not nominate them
# (RFC 9110 §7.6.1: a connection option never names a field meant for every
# recipient). Dropping one at the hop while framing by it is how
# "Connection: content-length" smuggles a request past the proxy.
FRAMING = frozenset((b"content-length", b"transfer-encoding"))
# ... nor, in a request, Host: the target would see another authority than the one routed on.
NOT_NOMINABLE = FRAMING | {b"host"}


def connection_names(value: bytes, names: set[bytes] | None) -> set[bytes] | None:
    """``names`` plus the header names a Connection header ``value`` lists
    (lowercased; our own options left out), the set made on first need."""
    for token in value.lower().split(b","):
        token = token.strip()
        if token not in CONNECTION_OPTIONS:
            if names is None:
                names = set()
            names.add(token)
    return names


def without_headers(parts: list[bytes], names: set[bytes], start: int) -> list[bytes]:
    """A head kept as a flat list (``start`` items of first line, then name,
    ": ", value, CRLF per header) less the headers in ``names``."""
    kept = parts[:start]
    for i in range(start, len(parts), 4):
        if parts[i].lower() not in names:
            kept += parts[i : i + 4]
    return kept


def reason(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


_STATUS_LINES = {code: b"HTTP/1.1 %d %s\r\n" % (code, reason(code)) for code in range(100, 600)}

# Reason phrases come from targets: a longer one is replaced by the standard
# phrase (RFC 9112 §4: a client ignores it anyway), and the cache of status
# lines with a target's own phrase is bounded in bytes, not only in entries
# (200 distinct 1 MB phrases once grew a worker by 411 MB for good).
MAX_PHRASE = 256
STATUS_CACHE_BYTES = 64 * 1024
_status_cache: dict[tuple[int, bytes], bytes] = {}
_status_cache_bytes = 0


def status_line(status: int, phrase: bytes | None = None) -> bytes:
    """``HTTP/1.1 <status> <phrase>\\r\\n``; the target's own phrase when given."""
    global _status_cache_bytes
    if phrase is None or len(phrase) > MAX_PHRASE:
        line = _STATUS_LINES.get(status)
        return line if line is not None else b"HTTP/1.1 %d \r\n" % status
    key = (status, phrase)
    line = _status_cache.get(key)
    if line is None:
        line = b"HTTP/1.1 %d %s\r\n" % (status, phrase)
        size = 2 * len(line)  # the key's phrase and the line
        if _status_cache_bytes + size <= STATUS_CACHE_BYTES:
            _status_cache[key] = line
            _status_cache_bytes += size
    return line


def status_cache_bytes() -> int:
    """Bytes of phrases and lines held by the status-line cache (for tests)."""
    return _status_cache_bytes


class HttpDate:
    """The ``date:`` header line, recomputed at most once a second."""

    __slots__ = ("_second", "_line")

    def __init__(self) -> None:
        self._second = -1
        self._line = b""

    def line(self) -> bytes:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._line = b"date: " + formatdate(now, usegmt=True).encode("ascii") + CRLF
        return self._line


http_date = HttpDate()


class RequestIds:
    """X-Request-Id values for requests that come without one (ALB's X-Amzn-Trace-Id
    pattern): 32 hex digits, when the process started (8, Unix time), a random
    part drawn then (8) and a counter (16), so unique across workers and
    restarts. A counter and a fixed prefix: no clock, no system call."""

    __slots__ = ("_prefix", "_count")

    def __init__(self) -> None:
        self._prefix = b"%08x%s" % (int(time.time()) & 0xFFFFFFFF, os.urandom(4).hex().encode("ascii"))
        self._count = 0

    def __call__(self) -> bytes:
        self._count = count = self._count + 1
        return b"%s%016x" % (self._prefix, count)


request_ids = RequestIds()  # per process: each worker draws its own random part
# An X-Request-Id a client (or a proxy before lb) sent is kept if it is 1-128
# printable ASCII characters other than '"' and '\\' (so a log line never
# needs to escape it); otherwise lb makes one.
REQUEST_ID_SYNTAX = re.compile(rb"[\x21\x23-\x5b\x5d-\x7e]{1,128}")


def cookie_expires(timestamp: float) -> bytes:
    return formatdate(timestamp, usegmt=True).encode("ascii")


UNKNOWN = -1  # a header_table() miss: look the lowercased name up


def header_table(special: dict[bytes, int], common: tuple[bytes, ...] = ()) -> dict[bytes, int | None]:
    """Header name → kind, for names as they usually arrive, without lowercasing.

    ``special`` maps lowercase names to a kind; the table also has their
    Title-Case and UPPER spellings, and maps the ``common`` names (which are
    not special) to None. A name not in the table (``UNKNOWN``) is looked up
    again lowercased: the table only saves a ``bytes.lower()`` per header.
    """
    table: dict[bytes, int | None] = {}
    for name in common:
        for spelling in (name, name.lower(), _title(name)):
            table[spelling] = None
    for name, kind in special.items():
        for spelling in (name, name.upper(), _title(name)):
            table[spelling] = kind
    return table


def _title(name: bytes) -> bytes:
    return b"-".join(part[:1].upper() + part[1:] for part in name.lower().split(b"-"))


COMMON_REQUEST_HEADERS = (
    b"Accept",
    b"Accept-Encoding",
    b"Accept-Language",
    b"Cache-Control",
    b"Content-Type",
    b"Origin",
    b"Pragma",
    b"Referer",
    b"User-Agent",
    b"Authorization",
    b"If-None-Match",
    b"If-Modified-Since",
    b"Sec-Fetch-Dest",
    b"Sec-Fetch-Mode",
    b"Sec-Fetch-Site",
    b"Upgrade-Insecure-Requests",
    b"DNT",
)
COMMON_RESPONSE_HEADERS = (
    b"Server",
    b"Date",
    b"Content-Type",
    b"Last-Modified",
    b"ETag",
    b"Accept-Ranges",
    b"Cache-Control",
    b"Expires",
    b"Vary",
    b"Set-Cookie",
    b"Location",
    b"Content-Encoding",
    b"X-Backend",
)
