"""BIRD's control socket, spoken directly (what `birdc -s SOCKET` speaks).

BIRD greets with ``0001 BIRD 2.0.12 ready.``; each command is one line, each
reply is lines of a four-digit code followed by ``-`` (more follow) or a
space (the last line), or by nothing but a leading space (one more line of
the previous code). Codes 0xxx end a command that worked, 1xxx/2xxx are
table rows and headings, 8xxx and 9xxx are errors (doc/reply_codes in
BIRD's source). One connection per call: BIRD serves many, and lb calls
seldom (a change of what it announces, `lb status`).
"""

from __future__ import annotations

import shutil
import socket
from dataclasses import dataclass

BIRD_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"  # where Debian's bird2 puts bird, whatever PATH says
TIMEOUT = 5.0  # seconds for one command; `configure` of a small config takes milliseconds


class BirdError(RuntimeError):
    """BIRD is not reachable or refused a command; the message says which and why."""


@dataclass(frozen=True)
class Reply:
    """One reply: (code, text) per line, continuation lines carrying their code."""

    lines: tuple[tuple[int, str], ...]

    @property
    def code(self) -> int:
        return self.lines[-1][0] if self.lines else 0

    @property
    def ok(self) -> bool:
        return self.code < 8000

    def text(self) -> str:
        return "\n".join(text for _, text in self.lines)

    def rows(self, code: int) -> list[str]:
        return [text for c, text in self.lines if c == code]


def command(socket_path: str, line: str, timeout: float = TIMEOUT) -> Reply:
    """Send one command to the BIRD behind ``socket_path``; its whole reply."""
    if "\n" in line:
        raise ValueError("a BIRD command is one line")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(socket_path)
            with sock.makefile("rwb") as f:
                greeting = _read_reply(f)
                if greeting.code != 1:
                    raise BirdError(f"{socket_path}: not BIRD's control socket (it said {greeting.text()!r})")
                f.write(line.encode() + b"\n")
                f.flush()
                return _read_reply(f)
    except FileNotFoundError:
        installed = "" if shutil.which("bird", path=BIRD_PATH) else " (BIRD is not installed: apt install bird2)"
        raise BirdError(f"BIRD's control socket {socket_path} does not exist: is BIRD running?{installed}") \
            from None
    except ConnectionRefusedError:
        raise BirdError(f"nothing listens on BIRD's control socket {socket_path}: is BIRD running?") from None
    except PermissionError:
        raise BirdError(f"BIRD's control socket {socket_path}: permission denied") from None
    except (TimeoutError, socket.timeout):
        raise BirdError(f"BIRD did not answer {line!r} on {socket_path} within {timeout:g} s") from None
    except OSError as exc:
        raise BirdError(f"BIRD's control socket {socket_path}: {exc.strerror or exc}") from None


def _read_reply(f: object) -> Reply:
    readline = f.readline  # type: ignore[attr-defined]  # a binary file from makefile()
    lines: list[tuple[int, str]] = []
    code = 0
    while True:
        raw: bytes = readline()
        if not raw:
            raise BirdError("BIRD closed its control socket in the middle of a reply")
        text = raw.decode("utf-8", "replace").rstrip("\n")
        if text[:4].isdigit() and text[4:5] in ("-", " ", ""):
            code = int(text[:4])
            lines.append((code, text[5:]))
            if text[4:5] != "-":
                return Reply(tuple(lines))
        else:  # " more text": one more line of the previous code
            lines.append((code, text[1:]))


def configure(socket_path: str) -> str:
    """`birdc configure`: BIRD re-reads its config (and the fragments it includes).
    BIRD keeps its running config when the new one has an error; so does this."""
    reply = command(socket_path, "configure")
    if not reply.ok:
        raise BirdError(f"BIRD refused its new configuration: {reply.text()}")
    return reply.text()


@dataclass(frozen=True)
class ProtocolRow:
    """One line of `show protocols`."""

    name: str
    proto: str  # BGP, Static, BFD
    table: str
    state: str  # up, start, down
    since: str
    info: str  # BGP: Established, Active, Idle, Connect ... and the last error


def protocols(socket_path: str, pattern: str) -> list[ProtocolRow]:
    """`show protocols "PATTERN"` (a shell pattern over protocol names)."""
    reply = command(socket_path, f'show protocols "{pattern}"')
    if not reply.ok and "No protocols match" in reply.text():
        return []
    if not reply.ok:
        raise BirdError(f"show protocols: {reply.text()}")
    rows = []
    for text in reply.rows(1002):
        parts = text.split(None, 5)
        if len(parts) >= 5:
            rows.append(ProtocolRow(parts[0], parts[1], parts[2], parts[3], parts[4],
                                    parts[5].strip() if len(parts) > 5 else ""))
    return rows


def routes(socket_path: str, table: str) -> list[str]:
    """The prefixes in a BIRD table (`show route table T`); [] for an unknown table."""
    reply = command(socket_path, f"show route table {table}")
    if not reply.ok:
        return []
    prefixes = []
    for text in reply.rows(1007):
        first = text.split(None, 1)[0] if text and not text[0].isspace() else ""
        if "/" in first:
            prefixes.append(first)
    return prefixes
