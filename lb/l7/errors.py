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

Each answer, and each exchange lb cuts, has a reason in the access log
(``error_reason``): ALB's field, in ALB's style (its own codes name the
authenticate, Lambda and WAF failures that lb does not have). The codes are
below; README "The access log" lists them with their status.
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


# error_reason: the request (lb answers it, then closes).
REQUEST_MALFORMED = "RequestMalformed"  # 400: bad syntax, framing or Host; a smuggling or desync attempt
REQUEST_HEAD_TOO_LARGE = "RequestHeadTooLarge"  # 400: the request line or headers over their limits
METHOD_REFUSED = "MethodNotAllowed"  # 405: TRACE, CONNECT
CLIENT_IDLE_TIMEOUT = "ClientIdleTimeout"  # 408: nothing (more) from the client within the idle timeout
REQUEST_HEAD_TIMEOUT = "RequestHeadTimeout"  # 408: the head not whole within header_timeout
REQUEST_BODY_TIMEOUT = "RequestBodyTimeout"  # 408: the body slower than body_timeout and min_body_rate allow
ENCODING_NOT_IMPLEMENTED = "TransferEncodingNotImplemented"  # 501
VERSION_REFUSED = "HttpVersionNotSupported"  # 505
INTERNAL_ERROR = "InternalError"  # 500: a bug in lb
CLIENT_CLOSED = "ClientClosed"  # 460: the client left before its response was whole
# error_reason: routing and the target (lb answers 502, 503 or 504; or cuts a response already begun).
LISTENER_REMOVED = "ListenerRemoved"  # 503: the listener left the routing table meanwhile
NO_TARGET = "NoTargetInService"  # 503: the target group has no target in service
TARGET_CONNECTION_ERROR = "TargetConnectionError"  # 502: connect refused, reset or unreachable
TARGET_TLS_ERROR = "TargetSSLHandshakeError"  # 502: the TLS handshake with an HTTPS target failed (its certificate)
TARGET_CONNECT_TIMEOUT = "TargetConnectTimeout"  # 504: no connection within the connect timeout
TARGET_CONNECTION_CLOSED = "TargetConnectionClosed"  # 502: closed or reset before the response was whole
TARGET_RESPONSE_MALFORMED = "TargetResponseMalformed"  # 502: not HTTP/1.x, bad framing, unexpected 101
TARGET_RESPONSE_HEAD_TOO_LARGE = "TargetResponseHeadTooLarge"  # 502: over max_response_head
TARGET_RESPONSE_TIMEOUT = "TargetResponseTimeout"  # 504: the target silent past the idle timeout

# The reason of an answer when nothing more precise was said.
REASONS = {
    BAD_REQUEST: REQUEST_MALFORMED,
    METHOD_NOT_ALLOWED: METHOD_REFUSED,
    REQUEST_TIMEOUT: CLIENT_IDLE_TIMEOUT,
    500: INTERNAL_ERROR,
    NOT_IMPLEMENTED: ENCODING_NOT_IMPLEMENTED,
    BAD_GATEWAY: TARGET_CONNECTION_CLOSED,
    SERVICE_UNAVAILABLE: NO_TARGET,
    GATEWAY_TIMEOUT: TARGET_RESPONSE_TIMEOUT,
    VERSION_NOT_SUPPORTED: VERSION_REFUSED,
}


class RequestRejected(Exception):
    """Raised from a parser callback: answer ``status`` and close."""

    def __init__(self, status: int, why: str, reason: str | None = None) -> None:
        super().__init__(f"{status}: {why}")
        self.status = status
        self.why = why
        self.reason = reason or REASONS.get(status, REQUEST_MALFORMED)  # the access log's error_reason


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
