"""Certificates made in the test (trustme) and a blocking TLS client for the HTTPS tests.

:class:`Certs` issues leaf certificates from one test CA into PEM files
(the chain, then the key, in one file or two) and reads them back through
:func:`lb.tls.read_certificate`, as lb.config does. :func:`tls_request` is a
blocking client, run in a thread while the proxy serves in the test's loop:
one handshake (pinned to a version or cipher if asked), one request, and
what the handshake chose.
"""

from __future__ import annotations

import datetime
import socket
import ssl
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trustme

from lb import model as m
from lb import tls


class Certs:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.ca = trustme.CA()
        self.count = 0

    def files(
        self,
        *names: str,
        rsa: bool = False,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
        split: bool = True,
    ) -> tuple[Path, Path]:
        """(certificate file, key file) of a new leaf for ``names``; one file if not ``split``."""
        self.count += 1
        leaf = self.ca.issue_cert(*names, not_before=not_before, not_after=not_after,
                                  key_type=trustme.KeyType.RSA if rsa else trustme.KeyType.ECDSA)
        cert = self.dir / f"cert{self.count}.pem"
        key = self.dir / f"key{self.count}.pem"
        if split:
            cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
            key.write_bytes(leaf.private_key_pem.bytes())
            return cert, key
        leaf.private_key_and_cert_chain_pem.write_to_path(str(cert))
        return cert, cert

    def certificate(self, *names: str, rsa: bool = False) -> m.Certificate:
        cert, key = self.files(*names, rsa=rsa)
        return tls.read_certificate(str(cert), str(key))

    def listener_tls(self, *names: str, others: tuple[tuple[str, ...], ...] = (), rsa: bool = False,
                     policy: str = m.DEFAULT_SSL_POLICY) -> m.ListenerTls:
        """A default certificate for ``names`` and one more per tuple of ``others``."""
        return m.ListenerTls(self.certificate(*names, rsa=rsa),
                             tuple(self.certificate(*n, rsa=rsa) for n in others), policy)

    def client(self, version: ssl.TLSVersion | None = None, cipher: str | None = None,
               alpn: tuple[str, ...] = ()) -> ssl.SSLContext:
        """A client context trusting the test CA (names not checked: the tests read them),
        pinned to one TLS version and one TLS 1.2 cipher if asked."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.ca.configure_trust(ctx)
        ctx.check_hostname = False
        if version is not None:
            with warnings.catch_warnings():  # TLS 1.0 and 1.1: deprecated, and tested as refused
                warnings.simplefilter("ignore", DeprecationWarning)
                ctx.minimum_version = ctx.maximum_version = version
        low = version is not None and version < ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers((cipher or "DEFAULT") + (":@SECLEVEL=0" if low else ""))
        if alpn:
            ctx.set_alpn_protocols(list(alpn))
        return ctx


@dataclass
class Handshake:
    names: tuple[str, ...]  # the DNS names of the certificate served
    serial: int
    version: str
    cipher: str
    alpn: str | None
    reused: bool
    session: ssl.SSLSession | None
    response: bytes


def tls_request(port: int, ctx: ssl.SSLContext, server_name: str | None = "www.example.com",
                session: ssl.SSLSession | None = None, request: bytes | None = None,
                host: str = "127.0.0.1") -> Handshake:
    """One TLS connection: handshake, one request (GET / by default), read the answer."""
    with socket.create_connection((host, port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_name, session=session) as conn:
            cert: dict[str, Any] = conn.getpeercert() or {}
            names = tuple(value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS")
            default = f"GET / HTTP/1.1\r\nHost: {server_name or 'x'}\r\nConnection: close\r\n\r\n".encode()
            conn.sendall(request or default)
            chunks = []
            while True:
                try:
                    data = conn.recv(65536)
                except (ssl.SSLZeroReturnError, ConnectionResetError):
                    break
                if not data:
                    break
                chunks.append(data)
            cipher = conn.cipher()
            return Handshake(names, int(cert.get("serialNumber", "0"), 16), conn.version() or "",
                             cipher[0] if cipher else "", conn.selected_alpn_protocol(), conn.session_reused,
                             conn.session, b"".join(chunks))
