"""The access log: one line per L7 request with ALB's fields, never through `logging`.

A worker records an exchange when it ends (the client protocol's
``_account``): one list append, no formatting, no system call, no lock.
The recorded exchanges are formatted into lines and written in one
``write(2)``:

- when :data:`PENDING` of them wait (about 64 KiB of text);
- at every sweep of the worker (a few times a second, half a second apart at
  most: :meth:`lb.l7.worker.Worker._sweep`);
- before the file is reopened (SIGUSR1 to the daemon, for logrotate: the
  lines written before go to the renamed file, the ones after to the new
  one) or closed (a reload that turns it off or moves it);
- when the worker stops (SIGTERM to the daemon stops the workers gracefully:
  every request they finish is logged first).

Several workers append to one file: it is opened ``O_APPEND`` and each
write holds whole lines, so lines never interleave (a regular file takes
one write whole; a pipe or terminal takes at most ``PIPE_BUF`` bytes at
once, so the buffer is cut into pieces of whole lines no longer than that).
A write that fails (disk full, a file system gone read-only) drops the
buffer, counts the lines lost and says so on the worker's log at most every
10 s: the proxy goes on serving.

Formats (``format`` in the config): ``text``, ALB's (space-separated, the
strings quoted, ``-`` for none), and ``json``, one object a line with the
same names (``null`` for none). The fields, in order: type, time, listener,
client, target, request_processing_time, target_processing_time,
response_processing_time, elb_status_code, target_status_code,
received_bytes, sent_bytes, request, user_agent, target_group, request_id,
matched_rule_priority, request_creation_time, actions_executed,
error_reason, redirect_url, ssl_cipher, ssl_protocol. The README ("The access log") says what each holds. Fields may
be added at the end, never in between (ALB's rule too).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from lb.model import AccessLog, AccessLogFormat

if TYPE_CHECKING:
    from lb.l7.exchange import Exchange

log = logging.getLogger("lb.l7")

PENDING = 256  # exchanges recorded before their lines are written (about 64 KiB of text)
_HOSTS = 1024  # Host values whose logged form is cached
PIPE_BUF = 4096  # bytes a pipe takes in one piece (Linux)
STDERR = "-"
_REPORT_EVERY = 10.0  # seconds between two reports of lost lines

_perf = time.perf_counter  # the exchange's t_start and t_sent are on this clock
_wall = time.time


class LoggedConnection(Protocol):
    """What a line needs of the client connection (:class:`lb.l7.client.ClientProtocol`)."""

    @property
    def peer(self) -> str: ...  # "ip:port"

    @property
    def listener(self) -> str: ...

    @property
    def authority(self) -> bytes: ...  # b"<our address>:<port>"

    @property
    def protocol(self) -> str: ...  # "http" or "https"

    @property
    def tls_cipher(self) -> str: ...  # the handshake's cipher (OpenSSL's name), "-" over HTTP

    @property
    def tls_protocol(self) -> str: ...  # "TLSv1.3", "-" over HTTP


# --- values ------------------------------------------------------------------------

_UNSAFE = re.compile(r'[^\x20\x21\x23-\x5b\x5d-\x7e]')  # all but printable ASCII less '"' and '\'
_UNSAFE_BYTES = re.compile(rb'[^\x20\x21\x23-\x5b\x5d-\x7e]')


def _escaped_text(value: bytes) -> str:
    """Bytes from the client, safe between double quotes: ``\\xHH`` for the rest (nginx's way)."""
    s = value.decode("latin-1")
    if _UNSAFE_BYTES.search(value) is None:
        return s
    return _UNSAFE.sub(lambda m: f"\\x{ord(m.group()):02x}", s)


def _escaped_json(value: bytes) -> str:
    """The same for a JSON string: ``\\u00HH`` (each byte as the Latin-1 character it is)."""
    s = value.decode("latin-1")
    if _UNSAFE_BYTES.search(value) is None:
        return s
    return _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", s)


def _json_string(value: str) -> str:
    """A per-connection string (the TLS cipher or protocol: OpenSSL's names, plain ASCII) as JSON, null for "-"."""
    return "null" if value == "-" else f'"{value}"'


def _request_line(ex: Exchange, scheme: bytes, authority: bytes) -> bytes:
    """``GET http://host:port/path?query HTTP/1.1`` (ALB's: the URL absolute, port included)."""
    if not ex.method:  # refused before its head was whole (its URL may be cut, or megabytes long)
        return b"- %s://%s- -" % (scheme, authority)
    host = ex.host
    if host is None:
        host = authority
    elif host.rfind(b":") <= host.rfind(b"]"):  # no port in it
        host += authority[authority.rfind(b":") :]
    return b"%s %s://%s%s HTTP/1.%d" % (ex.method, scheme, host, ex.url, 1 if ex.version11 else 0)


def _request_text(ex: Exchange, conn: LoggedConnection, escape: Callable[[bytes], str]) -> str:
    """The request line as a log string. httptools admits no control or non-ASCII
    byte in a method or URL, and Host is checked (lb.l7.request_head), so only a
    quote or a backslash in the URL needs escaping: two scans, no regex."""
    line = _request_line(ex, conn.protocol.encode("ascii"), conn.authority)
    if b'"' in line or b"\\" in line:
        return escape(line)
    return line.decode("ascii")


# The line of a request forwarded and answered by its target, lb adding no
# error: nearly all of them. One `%` formats it whole in C (times, numbers, the
# two ISO 8601 times from a cached prefix and the microseconds); any other
# exchange takes the general path (AccessLogFile._general).
_TEXT_FORWARDED = ('%s %s.%06dZ %s %s %s %.6f %.6f %.6f %d %d %d %d "%s %s://%s%s HTTP/1.%d" %s %s "%s" %d '
                   '%s.%06dZ "forward" "-" "-" %s %s\n')
_JSON_FORWARDED = (
    '{"type":"%s","time":"%s.%06dZ","listener":"%s","client":"%s","target":"%s",'
    '"request_processing_time":%.6f,"target_processing_time":%.6f,"response_processing_time":%.6f,'
    '"elb_status_code":%d,"target_status_code":%d,"received_bytes":%d,"sent_bytes":%d,'
    '"request":"%s %s://%s%s HTTP/1.%d","user_agent":%s,"target_group":"%s","request_id":"%s",'
    '"matched_rule_priority":%d,'
    '"request_creation_time":"%s.%06dZ","actions_executed":"forward","error_reason":null,'
    '"redirect_url":null,"ssl_cipher":%s,"ssl_protocol":%s}\n'
)


# --- the writer ----------------------------------------------------------------------


class _Writer:
    """A file opened for appending (or standard error), written whole lines at a time."""

    __slots__ = ("path", "fd", "regular", "lost", "_reported", "_report_after")

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1
        self.regular = False
        self.lost = 0  # lines dropped: their write failed
        self._reported = 0
        self._report_after = 0.0
        self._open()

    def _open(self) -> None:
        fd = 2 if self.path == STDERR else open_for_append(self.path)
        old, self.fd = self.fd, fd
        self.regular = stat.S_ISREG(os.fstat(fd).st_mode)
        if old > 2:
            os.close(old)

    def write(self, lines: list[str]) -> None:
        data = "".join(lines).encode("utf-8", "backslashreplace")
        try:
            if self.regular or len(data) <= PIPE_BUF:
                _write_all(self.fd, data)
            else:
                for piece in _pieces(data, PIPE_BUF):
                    _write_all(self.fd, piece)
        except OSError as exc:
            self.lost += len(lines)
            self._report(exc)

    def _report(self, exc: OSError) -> None:
        now = time.monotonic()
        if now < self._report_after:
            return
        self._report_after = now + _REPORT_EVERY
        lost, self._reported = self.lost - self._reported, self.lost
        log.error("access log %s: %s; %d lines lost since the last report", self.path, exc, lost)

    def reopen(self) -> None:
        """Open the path again (logrotate renamed the file)."""
        if self.path == STDERR:
            return
        try:
            self._open()
        except OSError as exc:  # keeps writing to the old file
            log.error("access log %s: cannot reopen: %s; still writing to the file open before", self.path, exc)

    def close(self) -> None:
        if self.fd > 2:
            os.close(self.fd)
        self.fd = -1


def open_for_append(path: str) -> int:
    """The access log file opened as the workers open it (created 0640 if missing)."""
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)


def check_path(path: str) -> str | None:
    """Why ``path`` cannot be an access log (the daemon asks before workers open it), or None."""
    if path == STDERR:
        return None
    try:
        os.close(open_for_append(path))
    except OSError as exc:
        return f"cannot open {path} for appending: {exc.strerror or exc}"
    return None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except InterruptedError:
            continue
        if written <= 0:
            raise OSError(errno.EIO, "nothing written")
        view = view[written:]


def _pieces(data: bytes, limit: int) -> list[bytes]:
    """``data`` cut at line ends into pieces of at most ``limit`` bytes (a longer line alone)."""
    pieces = []
    start = 0
    size = len(data)
    while start < size:
        end = start + limit
        if end >= size:
            end = size
        else:
            cut = data.rfind(b"\n", start, end) + 1
            end = cut if cut > start else data.find(b"\n", end) + 1 or size
        pieces.append(data[start:end])
        start = end
    return pieces


# --- the log -------------------------------------------------------------------------


class AccessLogFile:
    """One worker's access log: :meth:`record` per request, :meth:`flush` by the worker.

    :meth:`record` keeps what the exchange's line needs (a tuple of its
    values, or for the rare line that is not the usual one the exchange
    itself) and formats nothing: the lines are formatted when they are
    written, up to :data:`PENDING` at a time, in one tight loop. The same work
    costs less there than spread between requests, where every line's
    formatting would run with the rest of the request path's code and data
    out of the CPU's caches. An exchange is done when it is recorded: nothing
    changes it afterwards.
    """

    __slots__ = ("settings", "_pending", "_writer", "_ids", "_json", "_offset", "_second", "_prefix", "_hosts")

    def __init__(self, settings: AccessLog, request_id: Callable[[], bytes]) -> None:
        self.settings = settings
        # Per exchange: (conn, end, its line's values...) for the usual one (see record), else (conn, end, exchange).
        self._pending: list[tuple[Any, ...]] = []
        self._writer = _Writer(settings.path)
        self._ids = request_id  # for a request lb answered before it had one
        self._json = settings.format is AccessLogFormat.JSON
        # Wall-clock time from the exchange's perf_counter stamps: plus this
        # offset, measured anew at each flush (at least every half second).
        self._offset = _wall() - _perf()
        self._second = -1  # the second of _prefix
        self._prefix = ""  # "2026-12-02T08:12:22"
        # (Host, our address) as received → "host:port" as logged; bounded (cleared when full).
        self._hosts: dict[tuple[bytes, bytes], str] = {}

    @property
    def lost(self) -> int:
        return self._writer.lost

    def record(self, conn: LoggedConnection, ex: Exchange) -> None:
        """The exchange ``ex`` of ``conn`` has ended: its line is written with the next flush."""
        pending = self._pending
        sent = ex.t_sent
        url = ex.url
        if (sent and ex.response_started and not ex.local and ex.error_reason == "-" and ex.host is not None
                and not ex.upgrade and b'"' not in url and b"\\" not in url):
            # The usual exchange (see _TEXT_FORWARDED): only what its line needs, so
            # the exchange itself is freed now and its memory reused by the next one.
            pending.append((conn, _perf(), ex.t_start, sent, ex.upstream_time, ex.status, ex.req_bytes,
                            ex.resp_bytes, ex.method, ex.host, url, ex.version11, ex.user_agent, ex.target,
                            ex.group, ex.request_id, ex.rule))  # fmt: skip
        else:
            pending.append((conn, _perf(), ex))
        if len(pending) >= PENDING:
            self.flush()

    def flush(self) -> None:
        """Format the lines recorded so far and write them."""
        pending = self._pending
        if pending:
            self._pending = []
            line, general = self._line, self._general
            self._writer.write([general(*item) if len(item) == 3 else line(item) for item in pending])
        self._offset = _wall() - _perf()

    def reopen(self) -> None:
        self.flush()
        self._writer.reopen()

    def close(self) -> None:
        self.flush()
        self._writer.close()

    def _iso_prefix(self, second: int) -> str:
        """ISO 8601 UTC down to the second; the current second's is cached."""
        if second == self._second:
            return self._prefix
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        if second > self._second:  # not for a request's start in an earlier second
            self._second, self._prefix = second, prefix
        return prefix

    def _authority(self, host: bytes, authority: bytes) -> str:
        """``host`` with our port when it has none, as a string (cached)."""
        key = (host, authority)
        text = self._hosts.get(key)
        if text is None:
            if host.rfind(b":") <= host.rfind(b"]"):  # no port in it
                host += authority[authority.rfind(b":") :]
            text = host.decode("latin-1")  # Host's syntax is checked (lb.l7.request_head): no escape needed
            if len(self._hosts) >= _HOSTS:
                self._hosts.clear()
            self._hosts[key] = text
        return text

    def _line(self, item: tuple[Any, ...]) -> str:
        """The line of an exchange forwarded and answered (see record), in one `%` operation."""
        (conn, end, start, sent, upstream, status, received, sent_bytes, method, host, url, version11, agent,
         target, group, request_id, rule) = item  # fmt: skip
        offset = self._offset
        wall = end + offset
        second = int(wall)
        prefix = self._prefix if second == self._second else self._iso_prefix(second)
        created = start + offset
        created_second = int(created)
        created_prefix = prefix if created_second == second else self._iso_prefix(created_second)
        authority = self._authority(host, conn.authority)
        if self._json:
            return _JSON_FORWARDED % (
                conn.protocol, prefix, (wall - second) * 1e6, conn.listener, conn.peer, target,
                sent - start, upstream, end - sent - upstream, status, status, received, sent_bytes,
                method.decode("ascii"), conn.protocol, authority, url.decode("ascii"), version11,
                "null" if agent is None else f'"{_escaped_json(agent)}"', group,
                request_id.decode("ascii"), 0 if rule is None else rule,
                created_prefix, (created - created_second) * 1e6,
                _json_string(conn.tls_cipher), _json_string(conn.tls_protocol),
            )  # fmt: skip
        return _TEXT_FORWARDED % (
            conn.protocol, prefix, (wall - second) * 1e6, conn.listener, conn.peer, target,
            sent - start, upstream, end - sent - upstream, status, status, received, sent_bytes,
            method.decode("ascii"), conn.protocol, authority, url.decode("ascii"), version11,
            '"-"' if agent is None else f'"{_escaped_text(agent)}"', group,
            request_id.decode("ascii"), 0 if rule is None else rule,
            created_prefix, (created - created_second) * 1e6, conn.tls_cipher, conn.tls_protocol,
        )  # fmt: skip

    def _iso(self, wall: float) -> str:
        second = int(wall)
        return "%s.%06dZ" % (self._iso_prefix(second), (wall - second) * 1e6)

    def _general(self, conn: LoggedConnection, end: float, ex: Exchange) -> str:
        """Any line: lb's own answers, errors, exchanges cut short."""
        start = ex.t_start or end
        sent = ex.t_sent
        request = target = response = -1.0
        if sent:
            request = sent - start
            if ex.upstream_time >= 0.0:
                target = ex.upstream_time
                response = end - sent - target
        elif ex.local:  # answered by lb: until its answer
            request = end - start
        times = ["%.6f" % t if t >= 0.0 else "-1" for t in (request, target, response)]
        target_status = ex.status if ex.response_started and not ex.local else None
        agent = ex.user_agent
        rule = None if not ex.action else 0 if ex.rule is None else ex.rule
        request_id = (ex.request_id or self._ids()).decode("ascii")
        wall, created = self._iso(end + self._offset), self._iso(start + self._offset)
        # ALB's type: http or https; ws or wss for a WebSocket, whose line is written at its 101.
        kind = ("wss" if conn.protocol == "https" else "ws") if ex.status == 101 else conn.protocol
        # The Location lb sent: built from the request's Host, path and query, so escaped as they are.
        location = ex.redirect_url
        if self._json:
            redirect_json = "null" if location is None else f'"{_escaped_json(location.encode("latin-1"))}"'

            def string(value: str | None) -> str:
                return "null" if value is None or value == "-" else f'"{value}"'

            return (
                f'{{"type":"{kind}","time":"{wall}","listener":"{conn.listener}","client":"{conn.peer}",'
                f'"target":{string(ex.target)},"request_processing_time":{times[0]},'
                f'"target_processing_time":{times[1]},"response_processing_time":{times[2]},'
                f'"elb_status_code":{ex.status},'
                f'"target_status_code":{"null" if target_status is None else target_status},'
                f'"received_bytes":{ex.req_bytes},"sent_bytes":{ex.resp_bytes},'
                f'"request":"{_request_text(ex, conn, _escaped_json)}",'
                f'"user_agent":{"null" if agent is None else string(_escaped_json(agent))},'
                f'"target_group":{string(ex.group)},"request_id":"{request_id}",'
                f'"matched_rule_priority":{"null" if rule is None else rule},"request_creation_time":"{created}",'
                f'"actions_executed":{string(ex.action or None)},"error_reason":{string(ex.error_reason)},'
                f'"redirect_url":{redirect_json},"ssl_cipher":{string(conn.tls_cipher)},'
                f'"ssl_protocol":{string(conn.tls_protocol)}}}\n'
            )
        redirect_text = "-" if location is None else _escaped_text(location.encode("latin-1"))
        return (
            f"{kind} {wall} {conn.listener} {conn.peer} {ex.target} {times[0]} {times[1]} {times[2]} "
            f"{ex.status} {'-' if target_status is None else target_status} {ex.req_bytes} {ex.resp_bytes} "
            f'"{_request_text(ex, conn, _escaped_text)}" '
            f'"{"-" if agent is None else _escaped_text(agent)}" {ex.group} "{request_id}" '
            f"{'-' if rule is None else rule} {created} \"{ex.action or '-'}\" \"{ex.error_reason}\" "
            f'"{redirect_text}" {conn.tls_cipher} {conn.tls_protocol}\n'
        )
