"""The responses the load balancer generates itself, and why it sends them.

Causes (docs/elb-reference.md, "L7 behaviour"):

====  ==========================================================================
400   malformed request, header or request line over its limit, smuggling
      (Content-Length with Transfer-Encoding, conflicting or non-numeric
      Content-Length, obs-fold, invalid header name, a Connection header
      nominating Content-Length, Transfer-Encoding or Host, a
      Content_Length / Transfer_Encoding lookalike, Transfer-Encoding in
      HTTP/1.0, a WebSocket upgrade with a body), HTTP/1.1 without Host, a
      fragment ("#") or userinfo in the request-target
405   TRACE (and CONNECT: this is not a forward proxy)
408   the client sent nothing, or not a whole request, within the idle
      timeout; a request head not whole within L7Config.header_timeout; a
      body slower than L7Config.body_timeout and min_body_rate allow
501   Transfer-Encoding other than chunked
502   target refused or reset, sent a malformed response (one whose
      Connection header nominates Content-Length or Transfer-Encoding is,
      and one whose head is over L7Config.max_response_head), or closed
      with the request outstanding
503   the target group has no registered targets (in service)
504   connect timeout, or the target idle past the idle timeout
505   HTTP version other than 1.0 and 1.1
====  ==========================================================================

Bodies are fixed HTML like ELB's; only the Date line changes.
"""

from __future__ import annotations

from lb.l7.httputil import CRLF, http_date, reason, status_line

BAD_REQUEST = 400
METHOD_NOT_ALLOWED = 405
REQUEST_TIMEOUT = 408
NOT_IMPLEMENTED = 501
BAD_GATEWAY = 502
SERVICE_UNAVAILABLE = 503
GATEWAY_TIMEOUT = 504
VERSION_NOT_SUPPORTED = 505


class RequestRejected(Exception):
    """Raised from a parser callback: answer ``status`` and close."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(f"{status}: {why}")
        self.status = status
        self.why = why


def html_body(status: int) -> bytes:
    title = b"%d %s" % (status, reason(status))
    return (
        b"<html>\r\n<head><title>" + title + b"</title></head>\r\n<body>\r\n"
        b"<center><h1>" + title + b"</h1></center>\r\n</body>\r\n</html>\r\n"
    )


def _parts(status: int) -> tuple[bytes, bytes, bytes]:
    body = html_body(status)
    head = status_line(status) + b"server: lb\r\n"
    framing = b"content-type: text/html\r\ncontent-length: %d\r\n" % len(body)
    return head, framing, body


_PARTS = {
    code: _parts(code)
    for code in (
        BAD_REQUEST,
        METHOD_NOT_ALLOWED,
        REQUEST_TIMEOUT,
        NOT_IMPLEMENTED,
        BAD_GATEWAY,
        SERVICE_UNAVAILABLE,
        GATEWAY_TIMEOUT,
        VERSION_NOT_SUPPORTED,
    )
}

CONNECTION_CLOSE = b"connection: close\r\n"
CONNECTION_KEEP_ALIVE = b"connection: keep-alive\r\n"


def error_response(status: int, connection: bytes = b"", head_only: bool = False) -> bytes:
    """The whole response for ``status``; ``connection`` is a header line or b""."""
    parts = _PARTS.get(status) or _parts(status)
    head, framing, body = parts
    return b"".join((head, http_date.line(), framing, connection, CRLF, b"" if head_only else body))
