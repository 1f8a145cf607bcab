"""A request's head: which headers pass, which we act on, what goes upstream.

Headers are kept as the flat list the upstream head is joined from
(``Exchange.parts``: method, " ", target, " HTTP/1.1\\r\\n", then name,
": ", value, CRLF per header), so forwarding them costs one ``b"".join``.
Hop-by-hop headers (RFC 9110 §7.6.1, and any the Connection header names)
are dropped, except that a Connection header may not name a framing header
or Host (the request is refused: see the client's on_headers_complete);
X-Forwarded-For is appended to, X-Forwarded-Proto/-Port are replaced with
ours. X-Request-Id goes on as received when it is a sane token, else lb
makes one (:class:`lb.l7.httputil.RequestIds`); either way the target gets
exactly one, and the access log line names it.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

import httptools

from lb.l7 import errors
from lb.l7.exchange import Exchange
from lb.l7.httputil import (
    COMMON_REQUEST_HEADERS,
    CRLF,
    REQUEST_ID_SYNTAX,
    connection_names,
    header_table,
    request_ids,
    without_headers,
)
from lb.l7.rules import Request
from lb.model import IPAddress

COLON = b": "
# Host = uri-host [ ":" port ] (RFC 9110 §7.2): an IP-literal, or a reg-name
# (unreserved, pct-encoded, sub-delims; an IPv4 address is one too), then an
# optional port. A server must answer 400 to anything else, and a redirect's
# #{host} copies this value into Location, so nothing else may pass.
HOST_SYNTAX = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~%!$&'()*+,;=]*)(?::[0-9]*)?")
# Host values HOST_SYNTAX accepted: nearly every request repeats one, and a set
# lookup costs a tenth of the match. Bounded: at most 1024 values of at most
# 255 bytes (a DNS name and a port), cleared when full.
VALID_HOSTS: set[bytes] = set()


def valid_host(value: bytes) -> bool:
    """Whether ``value`` is a Host header lb passes on (and remember it if so)."""
    if value in VALID_HOSTS:
        return True
    if HOST_SYNTAX.fullmatch(value) is None:
        return False
    if len(value) <= 255:
        if len(VALID_HOSTS) >= 1024:
            VALID_HOSTS.clear()
        VALID_HOSTS.add(value)
    return True
_CHUNKED = b"transfer-encoding: chunked\r\n"

# What a request header is to us.
(HOST, CONNECTION, HOP, TRANSFER_ENCODING, UPGRADE, XFF, OURS, EXPECT, COOKIE, LENGTH, LOOKALIKE, USER_AGENT,
 REQUEST_ID) = range(13)
SPECIAL = {
    b"host": HOST,
    b"connection": CONNECTION,
    b"keep-alive": HOP,
    b"proxy-connection": HOP,
    b"te": HOP,
    b"trailer": HOP,
    b"transfer-encoding": TRANSFER_ENCODING,
    b"upgrade": UPGRADE,
    b"x-forwarded-for": XFF,
    b"x-forwarded-proto": OURS,
    b"x-forwarded-port": OURS,
    b"expect": EXPECT,
    b"cookie": COOKIE,
    b"content-length": LENGTH,
    # Valid names that a target normalising "_" to "-" (CGI, WSGI, PHP: both
    # become HTTP_CONTENT_LENGTH) reads as framing lb did not frame by: refused
    # (ALB's desync mitigation calls them SuspiciousHeader).
    b"content_length": LOOKALIKE,
    b"transfer_encoding": LOOKALIKE,
    # Kept for the access log; the request id is forwarded as lb's own line.
    b"user-agent": USER_AGENT,
    b"x-request-id": REQUEST_ID,
}
TABLE = header_table(SPECIAL, COMMON_REQUEST_HEADERS)  # most names without a lower()
_CODINGS = (b"chunked", b"identity")


def special_header(ex: Exchange, kind: int, name: bytes, value: bytes) -> None:
    """Record a header we act on (Host is handled inline by the caller)."""
    if kind == USER_AGENT:
        if ex.user_agent is None:
            ex.user_agent = value
        ex.parts += (name, COLON, value, CRLF)
    elif kind == LENGTH:
        ex.has_body = value.strip() != b"0"
        ex.parts += (name, COLON, value, CRLF)
    elif kind == COOKIE:
        if ex.cookies is None:
            ex.cookies = []
        ex.cookies.append(value)
        ex.parts += (name, COLON, value, CRLF)
    elif kind == XFF:
        ex.xff = value if ex.xff is None else ex.xff + b", " + value
    elif kind == TRANSFER_ENCODING:
        ex.chunked = True  # the parser checks that chunked comes last; we re-chunk
        for coding in value.lower().split(b","):
            if coding.strip() not in _CODINGS:
                ex.bad_te = True  # → 501
    elif kind == EXPECT:
        ex.expect_continue = value.strip().lower() == b"100-continue"
        ex.parts += (name, COLON, value, CRLF)
    elif kind == UPGRADE:
        ex.upgrade_value = value
    elif kind == CONNECTION:
        ex.drop = connection_names(value, ex.drop)
    elif kind == HOST:
        if ex.host is not None:
            raise errors.RequestRejected(errors.BAD_REQUEST, "more than one Host header")
        if not valid_host(value):
            raise errors.RequestRejected(errors.BAD_REQUEST, "Host is not host[:port]")
        ex.host = value
        ex.parts += (name, COLON, value, CRLF)
    elif kind == REQUEST_ID:  # the first valid one; the others are dropped (build_head adds one)
        if ex.request_id is None and REQUEST_ID_SYNTAX.fullmatch(value):
            ex.request_id = value
    elif kind == LOOKALIKE:
        raise errors.RequestRejected(errors.BAD_REQUEST, f"header {name!r} looks like a framing header")
    # HOP and OURS: dropped (ours are added by build_head)


def build_head(ex: Exchange, xff_line: bytes, fwd_tail: bytes, local: bytes) -> bytes:
    """The request head as the target gets it; kept on the exchange for a retry."""
    parts = ex.parts
    if ex.drop is not None:
        parts = without_headers(parts, ex.drop, 4)  # after method, " ", target, version
    if ex.xff is None:
        parts.append(xff_line)
    else:  # "x-forwarded-for: " is 17 bytes
        parts += (b"x-forwarded-for: ", ex.xff, b", ", xff_line[17:])
    parts.append(fwd_tail)
    request_id = ex.request_id
    if request_id is None:
        request_id = ex.request_id = request_ids()
    parts += (b"x-request-id: ", request_id, CRLF)
    if ex.chunked:
        parts.append(_CHUNKED)
    if ex.upgrade:
        parts += (b"connection: upgrade\r\nupgrade: ", ex.upgrade_value, CRLF)
    if ex.host is None:  # HTTP/1.0 without Host: name ourselves
        parts += (b"host: ", local, CRLF)
    parts.append(CRLF)
    head = ex.head = b"".join(parts)
    return head


def origin_form(ex: Exchange) -> bool:
    """Absolute-form target → origin-form, its authority replacing Host (RFC 9112 §3.2.2)."""
    if ex.url == b"*":
        return True
    try:
        # Any: httptools' stubs say bytes (int for the port), but a part the URL
        # lacks is None; typed below as it is, which compiled code (mypyc) checks.
        url: Any = httptools.parse_url(ex.url)
    except httptools.HttpParserInvalidURLError:
        return False
    schema: bytes | None = url.schema
    host: bytes | None = url.host
    port: int | None = url.port
    path: bytes | None = url.path
    query: bytes | None = url.query
    userinfo: bytes | None = url.userinfo
    if not schema or not host or userinfo:
        return False  # userinfo: an error in a received http URI (RFC 9110 §4.2.4)
    authority = host + (b":%d" % port if port else b"")
    ex.url = (path or b"/") + (b"?" + query if query else b"")
    parts = ex.parts
    parts[2] = ex.url
    for i in range(4, len(parts), 4):
        if parts[i].lower() == b"host":
            parts[i + 2] = authority
            break
    else:
        parts += (b"host", COLON, authority, CRLF)
    ex.host = authority
    return True


def rules_request(ex: Exchange, peer: IPAddress, with_headers: bool) -> Request:
    """The rules engine's view of the request (built only when there are rules)."""
    path, _, query = ex.url.partition(b"?")
    headers: tuple[tuple[str, str], ...] = ()
    if with_headers:
        parts = ex.parts
        headers = tuple(
            (name.lower().decode("latin-1"), value.decode("latin-1")) for name, value in zip(parts[4::4], parts[6::4])
        )
    return Request(
        ex.method.decode("latin-1"),
        ex.host.decode("latin-1") if ex.host is not None else None,
        path.decode("latin-1"),
        query.decode("latin-1"),
        headers,
        peer,
    )


def peer_address(ip: str) -> IPAddress:
    return ipaddress.ip_address(ip.partition("%")[0])  # no IPv6 zone
