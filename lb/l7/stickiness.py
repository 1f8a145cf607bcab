"""Stickiness cookies: ``AWSALB`` (target in a group), ``AWSALBTG`` (group).

A cookie value is opaque to the client but verifiable by every worker of
the load balancer: ``base64url(expiry "|" subject || HMAC-SHA256[:16])``
under a key shared by the process group. The subject names the target
(``group|address:port``) or the target group. A cookie that fails the MAC,
has expired, or names something no longer in service is ignored: the
balancer picks again and the response carries a new cookie (docs/elb-reference.md,
"Stickiness"). As ELB does, every response that used stickiness re-issues
the cookie, so its expiry slides.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time

from lb.l7.httputil import cookie_expires

TARGET_COOKIE = b"AWSALB"
GROUP_COOKIE = b"AWSALBTG"
_MAC_LEN = 16


class CookieSigner:
    """Issue and check stickiness cookie values."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if not key:
            raise ValueError("a stickiness key must not be empty")
        self._key = key

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()[:_MAC_LEN]

    def issue(self, subject: str, expires: int) -> bytes:
        payload = b"%d|%s" % (expires, subject.encode("utf-8"))
        return base64.urlsafe_b64encode(payload + self._mac(payload)).rstrip(b"=")

    def verify(self, value: bytes, now: float | None = None) -> str | None:
        """The subject of a valid, unexpired cookie value; None otherwise."""
        try:
            raw = base64.urlsafe_b64decode(value + b"=" * (-len(value) % 4))
        except (binascii.Error, ValueError):
            return None
        payload, mac = raw[:-_MAC_LEN], raw[-_MAC_LEN:]
        if len(raw) <= _MAC_LEN or not hmac.compare_digest(mac, self._mac(payload)):
            return None
        expires, _, subject = payload.partition(b"|")
        try:
            if int(expires) < (time.time() if now is None else now):
                return None
            return subject.decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return None

    def set_cookie(self, name: bytes, subject: str, duration: int) -> bytes:
        """A whole ``set-cookie:`` header line for ``subject``, valid ``duration`` s."""
        expires = int(time.time()) + duration
        return b"".join(
            (
                b"set-cookie: ",
                name,
                b"=",
                self.issue(subject, expires),
                b"; Expires=",
                cookie_expires(expires),
                b"; Path=/\r\n",
            )
        )


def find_cookie(headers: list[bytes], name: bytes) -> bytes | None:
    """The value of cookie ``name`` in the request's Cookie header values."""
    for header in headers:
        for piece in header.split(b";"):
            key, sep, value = piece.partition(b"=")
            if sep and key.strip() == name:
                return value.strip().strip(b'"')
    return None
