"""Value checks for :mod:`lb.config`: each takes a string and returns it
normalised, or raises ValueError with the message to record (``Table.values``
in :mod:`lb.config._reader` takes one as its ``check``). Plus the prime
helpers the Maglev ring size needs.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

from lb.config._reader import shown

# RFC 3986: what a path segment may hold besides %XX escapes (pchar), and an escape.
# A path adds "/", a query "/" and "?". No space, no control character, nothing non-ASCII.
PCHAR = r"A-Za-z0-9\-._~!$&'()*+,;=:@"
PCT = r"%[0-9A-Fa-f]{2}"
URI_CHARS = "letters, digits, - . _ ~ ! $ & ' ( ) * + , ; = : @ and %XX escapes"


def matching(pattern: re.Pattern[str], rule: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if not pattern.fullmatch(value):
            raise ValueError(f"{shown(value)} is not valid: {rule}")
        return value

    return check


def cidr(value: str) -> str:
    try:
        return str(ipaddress.ip_network(value, strict=True))
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"{shown(value)} is not an IPv4 or IPv6 CIDR block, e.g. '10.0.0.0/24'") from None
    raise ValueError(f"{shown(value)} has host bits set; did you mean '{loose}'?")


def matcher_codes(value: str) -> str:
    def code(text: str) -> int:
        if not text.isdigit() or not 200 <= int(text) <= 499:
            raise ValueError
        return int(text)

    try:
        for part in value.split(","):
            lo, _, hi = part.partition("-")
            if code(lo) > (code(hi) if hi else code(lo)):
                raise ValueError
    except ValueError:
        codes = "codes 200..499 as '200', '200,202' or '200-299'"
        raise ValueError(f"{shown(value)} is not a valid matcher: {codes}") from None
    return value


def host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    try:
        if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError
        if host.startswith("[") and host.endswith("]"):
            ipaddress.IPv6Address(host[1:-1])
        else:
            ipaddress.IPv4Address(host)
    except ValueError:
        raise ValueError(f"{shown(value)} is not ADDRESS:PORT (IPv6 in brackets), e.g. '127.0.0.1:9464'") from None
    return value


def is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))


def next_prime(n: int) -> int:
    """The smallest prime >= n."""
    while not is_prime(n):
        n += 1
    return n
