"""The access log: one line per L7 request with ALB's fields, never through `logging`.

A worker formats a request's line when its exchange ends (the client
protocol's ``_account``) and appends it to a buffer: a request costs one
format and one list append, no system call and no lock. The buffer goes out
in one ``write(2)``:

- when it holds :data:`BUFFER_BYTES`;
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
error_reason. The README ("The access log") says what each holds. Fields may
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
from typing import TYPE_CHECKING, Protocol

from lb.model import AccessLog, AccessLogFormat

if TYPE_CHECKING:
    from lb.l7.exchange import Exchange

log = logging.getLogger("lb.l7")

BUFFER_BYTES = 64 * 1024  # written out when the buffer holds this much
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


# --- values ------------------------------------------------------------------------


class _IsoClock:
    """ISO 8601 UTC with microseconds (ALB's), the part down to the second cached."""

    __slots__ = ("_second", "_prefix")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, now: float) -> str:
        second = int(now)
        if second == self._second:
            prefix = self._prefix
        else:
            prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            if second > self._second:  # not for a request's start in an earlier second
                self._second, self._prefix = second, prefix
        return f"{prefix}.{int((now - second) * 1_000_000):06d}Z"


_UNSAFE = re.compile(r'[^\x20\x21\x23-\x5b\x5d-\x7e]')  # all but printable ASCII less '"' and '\'


def _escaped_text(value: bytes) -> str:
    """Bytes from the client, safe between double quotes: ``\\xHH`` for the rest (nginx's way)."""
    s = value.decode("latin-1")
    if s.isascii() and s.isprintable() and '"' not in s and "\\" not in s:
        return s
    return _UNSAFE.sub(lambda m: f"\\x{ord(m.group()):02x}", s)


def _escaped_json(value: bytes) -> str:
    """The same for a JSON string: ``\\u00HH`` (each byte as the Latin-1 character it is)."""
    s = value.decode("latin-1")
    if s.isascii() and s.isprintable() and '"' not in s and "\\" not in s:
        return s
    return _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", s)


def _request_line(ex: Exchange, authority: bytes) -> bytes:
    """``GET http://host:port/path?query HTTP/1.1`` (ALB's: the URL absolute, port included)."""
    if not ex.method:  # refused before its head was whole (its URL may be cut, or megabytes long)
        return b"- http://" + authority + b"- -"
    host = ex.host
    if host is None:
        host = authority
    elif host.rfind(b":") <= host.rfind(b"]"):  # no port in it
        host += authority[authority.rfind(b":") :]
    return b"%s http://%s%s HTTP/1.%d" % (ex.method, host, ex.url, 1 if ex.version11 else 0)


# --- the writer ----------------------------------------------------------------------


class _Writer:
    """A file opened for appending (or standard error), written from a buffer of lines."""

    __slots__ = ("path", "fd", "regular", "lines", "size", "lost", "_reported", "_report_after")

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1
        self.regular = False
        self.lines: list[str] = []
        self.size = 0
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

    def flush(self) -> None:
        lines = self.lines
        if not lines:
            return
        self.lines = []
        self.size = 0
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
        """Write what is buffered, then open the path again (logrotate renamed the file)."""
        self.flush()
        if self.path == STDERR:
            return
        try:
            self._open()
        except OSError as exc:  # keeps writing to the old file
            log.error("access log %s: cannot reopen: %s; still writing to the file open before", self.path, exc)

    def close(self) -> None:
        self.flush()
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
    """One worker's access log: :meth:`record` per request, flushed by the worker."""

    __slots__ = ("settings", "record", "_writer", "_iso", "_ids")

    def __init__(self, settings: AccessLog, request_id: Callable[[], bytes]) -> None:
        self.settings = settings
        self._writer = _Writer(settings.path)
        self._iso = _IsoClock()
        self._ids = request_id  # for a request lb answered before it had one
        self.record: Callable[[LoggedConnection, Exchange], None] = (
            self._json if settings.format is AccessLogFormat.JSON else self._text
        )

    @property
    def lost(self) -> int:
        return self._writer.lost

    def flush(self) -> None:
        self._writer.flush()

    def reopen(self) -> None:
        self._writer.reopen()

    def close(self) -> None:
        self._writer.close()

    def _times(self, ex: Exchange, end: float) -> tuple[float, float, float, float]:
        """request, target and response processing times (-1.0: none), and the start."""
        start = ex.t_start or end
        sent = ex.t_sent
        if sent:
            upstream = ex.upstream_time
            if upstream >= 0.0:
                return sent - start, upstream, end - sent - upstream, start
            return sent - start, -1.0, -1.0, start
        if ex.local:  # answered by lb: until its answer
            return end - start, -1.0, -1.0, start
        return -1.0, -1.0, -1.0, start

    def _text(self, conn: LoggedConnection, ex: Exchange) -> None:
        end = _perf()
        wall = _wall()
        request, target, response, start = self._times(ex, end)
        iso = self._iso
        agent = ex.user_agent
        rule = ex.rule
        line = (
            f"http {iso(wall)} {conn.listener} {conn.peer} {ex.target} "
            f"{'%.6f' % request if request >= 0.0 else '-1'} "
            f"{'%.6f' % target if target >= 0.0 else '-1'} "
            f"{'%.6f' % response if response >= 0.0 else '-1'} "
            f"{ex.status} {ex.status if ex.response_started and not ex.local else '-'} "
            f"{ex.req_bytes} {ex.resp_bytes} "
            f'"{_escaped_text(_request_line(ex, conn.authority))}" '
            f'"{"-" if agent is None else _escaped_text(agent)}" '
            f"{ex.group} "
            f'"{(ex.request_id or self._ids()).decode("ascii")}" '
            f"{'-' if not ex.action else 0 if rule is None else rule} "
            f"{iso(wall - (end - start))} "
            f'"{ex.action or "-"}" "{ex.error_reason}"\n'
        )
        writer = self._writer
        writer.lines.append(line)
        writer.size += len(line)
        if writer.size >= BUFFER_BYTES:
            writer.flush()

    def _json(self, conn: LoggedConnection, ex: Exchange) -> None:
        end = _perf()
        wall = _wall()
        request, target, response, start = self._times(ex, end)
        iso = self._iso
        agent = ex.user_agent
        rule = ex.rule
        line = (
            f'{{"type":"http","time":"{iso(wall)}","listener":"{conn.listener}","client":"{conn.peer}",'
            f'"target":{"null" if ex.target == "-" else chr(34) + ex.target + chr(34)},'
            f'"request_processing_time":{"%.6f" % request if request >= 0.0 else "-1"},'
            f'"target_processing_time":{"%.6f" % target if target >= 0.0 else "-1"},'
            f'"response_processing_time":{"%.6f" % response if response >= 0.0 else "-1"},'
            f'"elb_status_code":{ex.status},'
            f'"target_status_code":{ex.status if ex.response_started and not ex.local else "null"},'
            f'"received_bytes":{ex.req_bytes},"sent_bytes":{ex.resp_bytes},'
            f'"request":"{_escaped_json(_request_line(ex, conn.authority))}",'
            f'"user_agent":{"null" if agent is None else chr(34) + _escaped_json(agent) + chr(34)},'
            f'"target_group":{"null" if ex.group == "-" else chr(34) + ex.group + chr(34)},'
            f'"request_id":"{(ex.request_id or self._ids()).decode("ascii")}",'
            f'"matched_rule_priority":{"null" if not ex.action else 0 if rule is None else rule},'
            f'"request_creation_time":"{iso(wall - (end - start))}",'
            f'"actions_executed":{"null" if not ex.action else chr(34) + ex.action + chr(34)},'
            f'"error_reason":{"null" if ex.error_reason == "-" else chr(34) + ex.error_reason + chr(34)}}}\n'
        )
        writer = self._writer
        writer.lines.append(line)
        writer.size += len(line)
        if writer.size >= BUFFER_BYTES:
            writer.flush()
