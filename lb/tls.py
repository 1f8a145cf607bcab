"""TLS for HTTPS listeners: ELB's security policies, certificates, SNI.

- :data:`POLICIES`: ELB's security policies by name, each its TLS versions
  and (TLS 1.2 and older) cipher suites, in OpenSSL's names and AWS's order
  (docs/elb-reference.md has the table and its source). TLS 1.3 suites are
  the same three in every ELB policy that has TLS 1.3, which are OpenSSL's
  defaults, so only the older versions' ciphers are set.
- :func:`read_certificate`: a certificate file (the chain, leaf first) and
  its key file, read and checked the way lb.config reports problems (the
  file and what is wrong with it: unreadable, no certificate, no key, a key
  of another certificate, expired, not yet valid, refused by OpenSSL).
- :class:`SniContexts`: one SSLContext per certificate and the choice among
  them by SNI, as ALB makes it: an exact name, then a wildcard, then the
  default certificate (no SNI, or a name no certificate has).
  :func:`listening_context` is the context a listening socket is given: its
  ``sni_callback`` switches each new connection to the context chosen, so a
  listener's certificates can be replaced (``SniContexts.replace``) without
  closing the socket: new handshakes use the new ones, connections
  established keep theirs.

Session resumption: OpenSSL's stateless tickets, on by default (TLS 1.3
PSK and TLS 1.2 tickets). They are encrypted with the keys of the context
the connection started on, the listening one, whatever certificate is
chosen; OpenSSL makes those keys at random when the context is made and
never rotates them. :func:`set_ticket_keys` sets them instead, so that
every worker of a listener shares them and lb.l7.server rotates them
(docs/architecture.md, "TLS"). :func:`set_session_cache` turns OpenSSL's
session id cache (TLS 1.2 resumption without tickets) off, for a listener
that must not resume at all (the load balancer's ``tls_session_resumption``).

TLS to targets (HTTPS target groups): :func:`read_ca_bundle` reads and
checks a group's CA bundle; :func:`target_context` is the client context
the proxy and the health checks connect with (no verification without a
bundle, as ALB; the chain verified against it with one; names never
checked, since targets are addresses); :func:`tls_failure` says why a
handshake with a target failed, in a line for `lb targets` and the logs.

Nothing here imports the rest of lb but the model.
"""

from __future__ import annotations

import ctypes
import datetime
import os
import re
import ssl
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from lb.model import DEFAULT_SSL_POLICY, Certificate, ListenerTls, LoadBalancer, TargetTls

# --- ELB's security policies -------------------------------------------------------

TLS13_SUITES = ("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256")

# The TLS 1.2 (and older) ciphers of ELB's policies, in AWS's order.
_RES = (
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
)  # fmt: skip
_TLS13_1_2 = (
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES128-SHA256",
    "ECDHE-RSA-AES128-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-AES256-SHA384", "ECDHE-RSA-AES256-SHA384", "AES128-GCM-SHA256", "AES128-SHA256",
    "AES256-GCM-SHA384", "AES256-SHA256",
)  # fmt: skip
_EXT = (
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES128-SHA256",
    "ECDHE-RSA-AES128-SHA256", "ECDHE-ECDSA-AES128-SHA", "ECDHE-RSA-AES128-SHA",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-ECDSA-AES256-SHA384",
    "ECDHE-RSA-AES256-SHA384", "ECDHE-RSA-AES256-SHA", "ECDHE-ECDSA-AES256-SHA", "AES128-GCM-SHA256",
    "AES128-SHA256", "AES128-SHA", "AES256-GCM-SHA384", "AES256-SHA256", "AES256-SHA",
)  # fmt: skip
_FS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES128-SHA256",
    "ECDHE-RSA-AES128-SHA256", "ECDHE-ECDSA-AES128-SHA", "ECDHE-RSA-AES128-SHA",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-ECDSA-AES256-SHA384",
    "ECDHE-RSA-AES256-SHA384", "ECDHE-RSA-AES256-SHA", "ECDHE-ECDSA-AES256-SHA",
)  # fmt: skip
_FS_RES_2019 = (
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES128-SHA256",
    "ECDHE-RSA-AES128-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-AES256-SHA384", "ECDHE-RSA-AES256-SHA384",
)  # fmt: skip

_V = ssl.TLSVersion


@dataclass(frozen=True)
class Policy:
    """One ELB security policy: the TLS versions it allows and its ciphers."""

    name: str
    minimum: ssl.TLSVersion
    maximum: ssl.TLSVersion
    ciphers: tuple[str, ...]  # TLS 1.2 and older, OpenSSL's names, in order of preference

    @property
    def versions(self) -> tuple[str, ...]:
        order = (_V.TLSv1, _V.TLSv1_1, _V.TLSv1_2, _V.TLSv1_3)
        return tuple(v.name.replace("v", " ").replace("_", ".") for v in order if self.minimum <= v <= self.maximum)

    @property
    def cipher_string(self) -> str:
        # OpenSSL 3 refuses TLS 1.0 and 1.1 (SHA-1 and MD5 signatures) above
        # security level 0, so the policies that allow them lower it.
        level = 0 if self.minimum < _V.TLSv1_2 else 1
        return ":".join(self.ciphers) + f":@SECLEVEL={level}"


POLICIES: dict[str, Policy] = {
    p.name: p
    for p in (
        Policy("ELBSecurityPolicy-TLS13-1-2-2021-06", _V.TLSv1_2, _V.TLSv1_3, _TLS13_1_2),
        Policy("ELBSecurityPolicy-TLS13-1-2-Res-2021-06", _V.TLSv1_2, _V.TLSv1_3, _RES),
        Policy("ELBSecurityPolicy-TLS13-1-2-Ext1-2021-06", _V.TLSv1_2, _V.TLSv1_3, _EXT),
        Policy("ELBSecurityPolicy-TLS13-1-3-2021-06", _V.TLSv1_3, _V.TLSv1_3, ()),
        Policy("ELBSecurityPolicy-TLS13-1-1-2021-06", _V.TLSv1_1, _V.TLSv1_3, _EXT),
        Policy("ELBSecurityPolicy-TLS13-1-0-2021-06", _V.TLSv1, _V.TLSv1_3, _EXT),
        Policy("ELBSecurityPolicy-TLS-1-2-2017-01", _V.TLSv1_2, _V.TLSv1_2, _TLS13_1_2),
        Policy("ELBSecurityPolicy-TLS-1-2-Ext-2018-06", _V.TLSv1_2, _V.TLSv1_2, _EXT),
        Policy("ELBSecurityPolicy-FS-2018-06", _V.TLSv1, _V.TLSv1_2, _FS),
        Policy("ELBSecurityPolicy-FS-1-1-2019-08", _V.TLSv1_1, _V.TLSv1_2, _FS),
        Policy("ELBSecurityPolicy-FS-1-2-2019-08", _V.TLSv1_2, _V.TLSv1_2, _FS),
        Policy("ELBSecurityPolicy-FS-1-2-Res-2019-08", _V.TLSv1_2, _V.TLSv1_2, _FS_RES_2019),
        Policy("ELBSecurityPolicy-FS-1-2-Res-2020-10", _V.TLSv1_2, _V.TLSv1_2, _RES),
    )
}


# --- certificates ---------------------------------------------------------------------


class CertificateError(ValueError):
    """A certificate or key file lb cannot serve; the message names the file."""

    def __init__(self, file: str, problem: str) -> None:
        super().__init__(f"{file}: {problem}")
        self.file = file


_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?-----END CERTIFICATE-----", re.S)
_PEM_KEY = re.compile(rb"-----BEGIN (?:RSA |EC |)PRIVATE KEY-----\r?\n.+?-----END (?:RSA |EC |)PRIVATE KEY-----", re.S)
_ENCRYPTED = b"-----BEGIN ENCRYPTED PRIVATE KEY-----"


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(1 << 20)
    except OSError as exc:
        raise CertificateError(path, f"cannot read: {exc.strerror or exc}") from None


def _when(stamp: float) -> str:
    return datetime.datetime.fromtimestamp(stamp, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def read_certificate(certificate_file: str, key_file: str | None = None, now: float | None = None) -> Certificate:
    """Read and check a certificate (PEM: the certificate, then its chain) and
    its private key (PEM, unencrypted; by default in the same file).

    Raises CertificateError naming the file and the problem."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    key_file = key_file or certificate_file
    cert_data = _read(certificate_file)
    key_data = cert_data if key_file == certificate_file else _read(key_file)
    blocks = _PEM_CERT.findall(cert_data)
    if not blocks:
        raise CertificateError(certificate_file, "no PEM certificate in it")
    try:
        chain = [x509.load_pem_x509_certificate(block) for block in blocks]
    except ValueError as exc:
        raise CertificateError(certificate_file, f"not a valid PEM certificate: {exc}") from None
    if _ENCRYPTED in key_data:
        raise CertificateError(key_file, "the private key is encrypted; lb needs it unencrypted")
    found = _PEM_KEY.search(key_data)
    if found is None:
        raise CertificateError(key_file, "no PEM private key in it")
    try:
        key = serialization.load_pem_private_key(found.group(), None)
    except (ValueError, TypeError) as exc:
        raise CertificateError(key_file, f"not a valid PEM private key: {exc}") from None
    leaf = chain[0]
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise CertificateError(key_file, f"the private key does not match the certificate in {certificate_file}")
    not_before = leaf.not_valid_before.replace(tzinfo=datetime.timezone.utc).timestamp()
    not_after = leaf.not_valid_after.replace(tzinfo=datetime.timezone.utc).timestamp()
    now = time.time() if now is None else now
    if not_after < now:
        raise CertificateError(certificate_file, f"the certificate expired on {_when(not_after)}")
    if not_before > now:
        raise CertificateError(certificate_file, f"the certificate is not valid before {_when(not_before)}")
    names: list[str] = []
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [name.lower() for name in san.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        pass
    if not names:
        names = [str(a.value).lower() for a in leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
    public = leaf.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        key_type = {"secp256r1": "ECDSA P-256", "secp384r1": "ECDSA P-384", "secp521r1": "ECDSA P-521"}.get(
            public.curve.name, f"ECDSA {public.curve.name}")
    elif isinstance(public, rsa.RSAPublicKey):
        key_type = f"RSA {public.key_size}"
    else:
        key_type = type(public).__name__
    pem_chain = b"\n".join(blocks) + b"\n"
    pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    cert = Certificate(certificate_file, key_file, pem_chain, pem_key, tuple(names), not_before, not_after, key_type)
    try:  # what the workers will do with it: OpenSSL may refuse what parsed (a weak key)
        certificate_context(cert, POLICIES[DEFAULT_SSL_POLICY])
    except ssl.SSLError as exc:
        raise CertificateError(certificate_file, f"OpenSSL refuses it: {exc.reason or exc}") from None
    return cert


def certificate_rows(config: LoadBalancer) -> list[dict[str, Any]]:
    """Every HTTPS listener's certificates, for `lb status` and the metrics:
    {"listener", "default" (bool), "certificate" (its file), "names",
    "key_type", "not_before", "not_after" (Unix time)}."""
    rows: list[dict[str, Any]] = []
    for listener in config.listeners:
        if listener.tls is None:
            continue
        for index, cert in enumerate(listener.tls.all_certificates()):
            rows.append({"listener": listener.name, "default": index == 0, "certificate": cert.certificate_file,
                         "names": list(cert.names), "key_type": cert.key_type, "not_before": cert.not_before,
                         "not_after": cert.not_after})
    return rows


# --- contexts -------------------------------------------------------------------------


def _apply_policy(ctx: ssl.SSLContext, policy: Policy, alpn: Iterable[str]) -> None:
    with warnings.catch_warnings():  # TLS 1.0 and 1.1 are deprecated (policies that still allow them exist)
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = policy.minimum
        ctx.maximum_version = policy.maximum
    if policy.ciphers:  # none: TLS 1.3 only, whose suites are OpenSSL's defaults
        ctx.set_ciphers(policy.cipher_string)
    # ALB: the server's cipher order; no client-initiated renegotiation; no compression.
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    protocols = list(alpn)
    if protocols:
        ctx.set_alpn_protocols(protocols)


def _load_chain(ctx: ssl.SSLContext, cert: Certificate) -> None:
    """load_cert_chain from the bytes in the model (Python's ssl reads files
    only): through memory files, never on disk."""
    fds = []
    try:
        for name, data in (("chain", cert.chain), ("key", cert.key)):
            fd = os.memfd_create(f"lb-{name}", os.MFD_CLOEXEC)
            fds.append(fd)
            os.write(fd, data)
        ctx.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}")
    finally:
        for fd in fds:
            os.close(fd)


def certificate_context(cert: Certificate, policy: Policy, alpn: Iterable[str] = ("http/1.1",)) -> ssl.SSLContext:
    """A server context serving ``cert`` under ``policy``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _apply_policy(ctx, policy, alpn)
    _load_chain(ctx, cert)
    return ctx


def name_matches(pattern: str, name: str) -> bool:
    """A certificate name against a host name: exact, or ``*.`` matching one label."""
    if pattern.startswith("*."):
        head, dot, rest = name.partition(".")
        return bool(head) and bool(dot) and rest == pattern[2:]
    return pattern == name


class SniContexts:
    """The contexts of one HTTPS listener and the choice among them by SNI."""

    def __init__(self, tls: ListenerTls, alpn: Iterable[str] = ("http/1.1",)) -> None:
        self.alpn = tuple(alpn)
        self.policy = POLICIES[tls.ssl_policy]
        self.tls = tls
        self._build(tls)

    def _build(self, tls: ListenerTls) -> None:
        contexts = [certificate_context(cert, self.policy, self.alpn) for cert in tls.all_certificates()]
        exact: dict[str, ssl.SSLContext] = {}
        wildcard: dict[str, ssl.SSLContext] = {}
        for cert, ctx in zip(tls.all_certificates(), contexts):
            for name in cert.names:  # the first certificate to have a name keeps it (the default first)
                if name.startswith("*."):
                    wildcard.setdefault(name[2:], ctx)
                else:
                    exact.setdefault(name, ctx)
        self.default, self.exact, self.wildcard = contexts[0], exact, wildcard

    def adopt(self, other: SniContexts) -> None:
        """Serve ``other``'s certificates from now on (the same policy): the
        listening context's callback reads this object, so new handshakes
        get them and established connections keep theirs."""
        if other.tls.ssl_policy != self.tls.ssl_policy:
            raise ValueError("a new policy needs a new listening context")
        self.default, self.exact, self.wildcard, self.tls = other.default, other.exact, other.wildcard, other.tls

    def select(self, server_name: str | None) -> ssl.SSLContext:
        """ALB's choice: an exact name, then a wildcard, then the default."""
        if not server_name:
            return self.default
        name = server_name.lower().rstrip(".")
        ctx = self.exact.get(name)
        if ctx is not None:
            return ctx
        _, dot, parent = name.partition(".")
        if dot:
            ctx = self.wildcard.get(parent)
            if ctx is not None:
                return ctx
        return self.default

    def sni_callback(self, sslobj: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
                     _ctx: ssl.SSLContext) -> int | None:
        ctx = self.select(server_name)
        if ctx is not sslobj.context:  # switching (SSL_set_SSL_CTX copies the certificate) costs a handshake ~5%
            sslobj.context = ctx
        return None


def listening_context(contexts: SniContexts) -> ssl.SSLContext:
    """The context a listening socket is created with: the default certificate's
    own (the policy, the default certificate), given the callback that picks
    each connection's certificate. So a connection for the default certificate
    (no SNI, an unknown name, the default's names) keeps the context it starts
    on, until a reload brings another default (``SniContexts.adopt``)."""
    ctx = contexts.default
    ctx.sni_callback = contexts.sni_callback
    return ctx


# --- session ticket keys --------------------------------------------------------------

TICKET_KEY_BYTES = 80  # OpenSSL's SSL_CTRL_SET_TLSEXT_TICKET_KEYS: 16 name + 32 HMAC + 32 AES
_SSL_CTRL_SET_TLSEXT_TICKET_KEYS = 59
_libssl: ctypes.CDLL | None = None


def _ssl_ctx_pointer(ctx: ssl.SSLContext) -> int:
    # CPython's PySSLContext starts with PyObject_HEAD, then SSL_CTX *ctx.
    return ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value or 0


def _load_libssl() -> bool:
    """SSL_CTX_ctrl, through the _ssl module (its libssl's symbols resolve through it)."""
    global _libssl
    if _libssl is None:
        import _ssl  # only here: a private module, loaded only where ticket keys or the cache are set

        try:
            libssl = ctypes.CDLL(_ssl.__file__)
            libssl.SSL_CTX_ctrl.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p)
            libssl.SSL_CTX_ctrl.restype = ctypes.c_long
        except (OSError, AttributeError):
            return False
        _libssl = libssl
    return True


def set_ticket_keys(ctx: ssl.SSLContext, key: bytes) -> bool:
    """Make ``ctx`` encrypt and decrypt session tickets with ``key`` (80 bytes).
    False where it cannot (no libssl found): OpenSSL's random keys stay."""
    if len(key) != TICKET_KEY_BYTES:
        raise ValueError(f"a ticket key is {TICKET_KEY_BYTES} bytes")
    if not _load_libssl():
        return False
    assert _libssl is not None
    pointer = _ssl_ctx_pointer(ctx)
    if not pointer:
        return False
    buffer = ctypes.create_string_buffer(key, len(key))
    return bool(_libssl.SSL_CTX_ctrl(pointer, _SSL_CTRL_SET_TLSEXT_TICKET_KEYS, len(key), buffer))


_SSL_CTRL_SET_SESS_CACHE_MODE = 44
_SSL_SESS_CACHE_OFF, _SSL_SESS_CACHE_SERVER = 0, 2


def set_session_cache(ctx: ssl.SSLContext, on: bool) -> bool:
    """Turn OpenSSL's server session cache (TLS 1.2 resumption by session id) on
    or off; Python's ssl has no call for it. False where it cannot (no libssl found)."""
    if not _load_libssl():
        return False
    pointer = _ssl_ctx_pointer(ctx)
    if not pointer:
        return False
    assert _libssl is not None
    mode = _SSL_SESS_CACHE_SERVER if on else _SSL_SESS_CACHE_OFF
    _libssl.SSL_CTX_ctrl(pointer, _SSL_CTRL_SET_SESS_CACHE_MODE, mode, None)
    return True


# --- TLS to targets ------------------------------------------------------------------


def read_ca_bundle(path: str) -> bytes:
    """A CA bundle (PEM certificates) as bytes, checked by OpenSSL; raises
    CertificateError naming the file and the problem."""
    data = _read(path)
    blocks = _PEM_CERT.findall(data)
    if not blocks:
        raise CertificateError(path, "no PEM certificate in it")
    pem = b"\n".join(blocks) + b"\n"
    try:
        ssl.create_default_context(cadata=pem.decode("ascii"))
    except (ssl.SSLError, ValueError, UnicodeDecodeError) as exc:
        raise CertificateError(path, f"not a valid CA bundle: {exc}") from None
    return pem


def target_context(target: TargetTls) -> ssl.SSLContext:
    """The client context for an HTTPS target group's targets."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # targets are addresses, registered by the operator
    if target.ca_pem:
        ctx.load_verify_locations(cadata=target.ca_pem.decode("ascii"))
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def tls_failure(exc: BaseException) -> str | None:
    """Why a TLS handshake with a target failed, or None if ``exc`` is no TLS error."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or exc}"
    return None
