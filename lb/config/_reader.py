"""A validating reader over parsed TOML tables, used throughout :mod:`lb.config`.

A :class:`Table` wraps one TOML table together with its key path (such as
``listeners[0].rules[2]``) and a shared list of issues. Its typed getters
never raise: a missing, mistyped or out-of-range value is recorded as a
:class:`ConfigIssue` naming the key path, the bad value and what is allowed,
so one pass over a file reports every mistake in it.

Getter convention: without ``default`` a key is required and the getter
returns None when it is missing or bad; with ``default`` the getter returns
the default in both cases (the issue is already recorded, so the value never
reaches a model).
"""

from __future__ import annotations

import difflib
import enum
import ipaddress
import json
import re
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, overload

T = TypeVar("T")
E = TypeVar("E", bound=enum.Enum)

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
# C0 controls, DEL and C1 controls: CR, LF and NUL among them. None of them
# belongs in a name, a path or anything that reaches a header or a request line.
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
SHOWN = 80  # characters of a bad value quoted in a message; a long one is cut


# --- nesting, before the TOML parser sees the text ----------------------------------

# tomllib parses arrays and inline tables recursively (a RecursionError near
# 1000 levels) and a dotted key of n parts costs it O(n²) memory; an lb config
# nests a handful of levels. So the text is measured first, without recursion:
# at each point, the open brackets and braces plus the dots of the key (or
# float) being read. Strings and comments are skipped, as TOML reads them.
_TOML_MARK = re.compile(r"[#\"'\[\]{}.=,\n]")
_STRING_END = {
    '"""': re.compile(r'\\.|"""', re.S),  # a backslash escapes the next character, newline included
    '"': re.compile(r'\\.|"|\n', re.S),
    "'''": re.compile(r"'''"),
    "'": re.compile(r"'|\n"),
}


def toml_too_deep(text: str, limit: int) -> int | None:
    """The offset at which ``text`` nests more than ``limit`` levels deep, or None."""
    depth = dots = 0
    pos = 0
    while match := _TOML_MARK.search(text, pos):
        at = match.start()
        char = text[at]
        pos = at + 1
        if char == "#":
            end = text.find("\n", at)
            pos = len(text) if end < 0 else end
        elif char in "\"'":
            pos = _string_end(text, at, char * 3 if text.startswith(char * 3, at) else char)
        elif char in "[{.":
            if char == ".":
                dots += 1
            else:
                depth, dots = depth + 1, 0
            if depth + dots > limit:
                return at
        elif char in "]}":
            depth, dots = max(depth - 1, 0), 0
        else:  # = , newline: a key or a value ends
            dots = 0
    return None


def _string_end(text: str, start: int, quote: str) -> int:
    """Where the string opened by ``quote`` at ``start`` ends (len(text) if it does not)."""
    end = _STRING_END[quote]
    pos = start + len(quote)
    while found := end.search(text, pos):
        if found.group() == "\n":  # a one-line string left open: the parser will say so
            return found.start()
        pos = found.end()
        if found.group() == quote:
            if len(quote) == 3:  # up to two quotes of the content may precede the closing three
                while pos < len(text) and pos - found.start() < 5 and text[pos] == quote[0]:
                    pos += 1
            return pos
    return len(text)


@dataclass(frozen=True)
class ConfigIssue:
    """One mistake in a configuration: where it is and what is wrong."""

    path: str  # e.g. "listeners[0].rules[2].priority"; "" for the whole file
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(Exception):
    """A configuration was rejected; ``errors`` lists every issue found."""

    def __init__(self, errors: Iterable[ConfigIssue], source: str | None = None) -> None:
        self.errors: list[ConfigIssue] = list(errors)
        self.source = source
        super().__init__(*self.lines())

    def lines(self) -> list[str]:
        """One line per issue, prefixed with the file name when known."""
        prefix = f"{self.source}: " if self.source else ""
        return [prefix + str(issue) for issue in self.errors]

    def __str__(self) -> str:
        return "\n".join(self.lines())


def shown(text: str) -> str:
    """A string quoted for a message: escaped (no raw control character reaches
    a terminal or a log line) and cut after SHOWN characters."""
    quoted = repr(text)
    return quoted if len(quoted) <= SHOWN else f"{quoted[: SHOWN - 4]}...{quoted[-1]}"


def describe(value: object) -> str:
    """A TOML-flavoured description of a value for error messages; never
    looks inside an array or a table, however deep it goes."""
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value}"
    if isinstance(value, str):
        return f"string {shown(value)}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"{type(value).__name__} {shown(str(value))}"


def literal(value: object) -> str:
    """A scalar as it was written ('HTTP_303', 307); anything else described."""
    if isinstance(value, str):
        return shown(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return describe(value)


def join(path: str, key: str) -> str:
    """Append a key to a key path, quoting it when it is not a bare TOML key."""
    part = key if _BARE_KEY.fullmatch(key) else json.dumps(key)
    return f"{path}.{part}" if path else part


class Table:
    """One TOML table at a key path; getters validate and record issues."""

    def __init__(self, data: Mapping[str, Any], path: str, issues: list[ConfigIssue]) -> None:
        self.data = data
        self.path = path
        self.issues = issues
        self.bad: set[str] = set()  # keys that already have an issue

    # --- paths and issues ----------------------------------------------------

    def at(self, key: str) -> str:
        return join(self.path, key)

    def error(self, key: str | None, message: str) -> None:
        """Record an issue at ``key`` (or at this table itself when None)."""
        if key is not None:
            self.bad.add(key)
        self.issues.append(ConfigIssue(self.at(key) if key is not None else self.path, message))

    def error_item(self, key: str, index: int, message: str) -> None:
        """Record an issue at one element of the array under ``key``."""
        self.bad.add(key)
        self.issues.append(ConfigIssue(f"{self.at(key)}[{index}]", message))

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def only(self, *allowed: str) -> None:
        """Reject every key that is not in ``allowed``."""
        for key in self.data:
            if key in allowed:
                continue
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            self.error(key, f"unknown key{hint}; allowed keys: {', '.join(allowed)}")

    def child(self, key: str, data: Mapping[str, Any]) -> Table:
        return Table(data, self.at(key), self.issues)

    # --- typed getters -------------------------------------------------------

    def raw(self, key: str, required: bool = True) -> object | None:
        """The value under ``key`` unchecked; None (and an issue) when missing.
        A None value (JSON's null; TOML has none) counts as missing."""
        if self.data.get(key) is None:
            if required:
                self.error(key, "required key is missing")
            return None
        value: object = self.data[key]
        return value

    def _typed(self, key: str, expected: type[T], kind: str, required: bool) -> T | None:
        value = self.raw(key, required)
        if value is None:
            return None
        # bool is a subclass of int, but `port = true` is not a port.
        if not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
            self.error(key, f"expected {kind}, got {describe(value)}")
            return None
        return value

    @overload
    def integer(self, key: str, lo: int, hi: int, *, rule: str | None = None) -> int | None: ...

    @overload
    def integer(self, key: str, lo: int, hi: int, default: int, *, rule: str | None = None) -> int: ...

    def integer(self, key: str, lo: int, hi: int, default: int | None = None, *, rule: str | None = None) -> int | None:
        """An integer in lo..hi; ``rule`` replaces the range in the message."""
        value = self._typed(key, int, "an integer", default is None)
        if value is None:
            return default
        if not lo <= value <= hi:
            allowed = f"is not allowed; use {rule}" if rule else f"is outside {lo}..{hi}"
            self.error(key, f"{value} {allowed}")
            return default
        return value

    @overload
    def boolean(self, key: str) -> bool | None: ...

    @overload
    def boolean(self, key: str, default: bool) -> bool: ...

    def boolean(self, key: str, default: bool | None = None) -> bool | None:
        value = self._typed(key, bool, "a boolean (true or false)", default is None)
        return default if value is None else value

    @overload
    def string(
        self,
        key: str,
        *,
        max_len: int = ...,
        pattern: re.Pattern[str] | None = ...,
        rule: str = ...,
        empty: bool = ...,
        text: bool = ...,
    ) -> str | None: ...

    @overload
    def string(
        self,
        key: str,
        default: str,
        *,
        max_len: int = ...,
        pattern: re.Pattern[str] | None = ...,
        rule: str = ...,
        empty: bool = ...,
        text: bool = ...,
    ) -> str: ...

    def string(
        self,
        key: str,
        default: str | None = None,
        *,
        max_len: int = 1024,
        pattern: re.Pattern[str] | None = None,
        rule: str = "",
        empty: bool = False,
        text: bool = False,
    ) -> str | None:
        """A string of at most ``max_len`` characters matching ``pattern``
        (described by ``rule``); "" only when ``empty``. Without a pattern, no
        control character (CR, LF, NUL, ...) unless ``text`` (free text such
        as a response body)."""
        value = self._typed(key, str, "a string", default is None)
        if value is None:
            return default
        control = None if text or pattern is not None else CONTROL.search(value)
        if len(value) > max_len:
            self.error(key, f"{len(value)} characters long; at most {max_len}")
        elif pattern is not None and not pattern.fullmatch(value):
            self.error(key, f"{shown(value)} is not valid: {rule}")
        elif control is not None:
            self.error(key, f"{shown(value)} contains a control character (U+{ord(control.group()):04X})")
        elif not value and not empty:
            self.error(key, "must not be empty")
        else:
            return value
        return default

    @overload
    def one_of(self, key: str, allowed: Sequence[str]) -> str | None: ...

    @overload
    def one_of(self, key: str, allowed: Sequence[str], default: str) -> str: ...

    def one_of(self, key: str, allowed: Sequence[str], default: str | None = None) -> str | None:
        """One of a fixed set of strings; the message lists them."""
        value = self._typed(key, str, "a string", default is None)
        if value is None:
            return default
        if value not in allowed:
            close = difflib.get_close_matches(value, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            self.error(key, f"{shown(value)} is not one of {', '.join(allowed)}{hint}")
            return default
        return value

    @overload
    def choice(self, key: str, kind: type[E]) -> E | None: ...

    @overload
    def choice(self, key: str, kind: type[E], default: E) -> E: ...

    def choice(self, key: str, kind: type[E], default: E | None = None) -> E | None:
        """A member of a string enum, spelled as its value."""
        allowed = [str(member.value) for member in kind]
        if default is None:
            value = self.one_of(key, allowed)
            return None if value is None else kind(value)
        return kind(self.one_of(key, allowed, str(default.value)))

    def lookup(self, key: str, table: Mapping[Any, T], allowed: str) -> T | None:
        """A required value that must be one of ``table``'s keys; what it maps to."""
        value = self.raw(key)
        if value is None:
            return None
        if isinstance(value, (int, str)) and not isinstance(value, bool) and value in table:
            return table[value]
        self.error(key, f"{literal(value)} is not one of {allowed}")
        return None

    def port_or(self, key: str, word: str, *, digits: bool = False) -> int | str | None:
        """An optional port 1..65535 or the keyword ``word`` (e.g. 'traffic-port');
        with ``digits`` a port may be spelled as a string, as ELB does."""
        value = self.raw(key, required=False)
        if value is None or value == word:
            return value if value is None else word
        number = int(value) if digits and isinstance(value, str) and value.isdigit() else value
        if isinstance(number, int) and not isinstance(number, bool) and 1 <= number <= 65535:
            return number
        self.error(key, f"{literal(value)} is not allowed; use 1..65535 or {word!r}")
        return None

    def strings(self, key: str, required: bool = True) -> list[str] | None:
        """An array of strings; None when missing (if required) or mistyped."""
        items = self._typed(key, list, "an array of strings", required)
        if items is None:
            return None
        good = True
        for index, item in enumerate(items):
            if not isinstance(item, str):
                self.error_item(key, index, f"expected a string, got {describe(item)}")
                good = False
        return list(items) if good else None

    def table(self, key: str, required: bool = True) -> Table | None:
        """The sub-table under ``key``, or None when missing or mistyped."""
        data = self._typed(key, dict, "a table", required)
        return None if data is None else self.child(key, data)

    def section(self, key: str) -> Table:
        """An optional sub-table; an empty one when missing or mistyped."""
        return self.table(key, required=False) or self.child(key, {})

    def tables(self, key: str, required: bool = False) -> list[Table]:
        """The tables of an array of tables; non-table elements are issues."""
        items = self._typed(key, list, "an array of tables", required)
        result: list[Table] = []
        for index, item in enumerate(items or []):
            if isinstance(item, dict):
                result.append(Table(item, f"{self.at(key)}[{index}]", self.issues))
            else:
                self.error_item(key, index, f"expected a table, got {describe(item)}")
        return result

    def address(self, key: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        """A required IPv4 or IPv6 address."""
        text = self.string(key)
        if text is None:
            return None
        try:
            return ipaddress.ip_address(text)
        except ValueError:
            self.error(key, f"{shown(text)} is not an IPv4 or IPv6 address")
            return None

    def values(
        self, key: str, check: Callable[[str], str], lo: int, hi: int, required: bool = True
    ) -> tuple[str, ...] | None:
        """An array of lo..hi strings, each passed through ``check``.

        An optional array that is missing reads as empty.
        """
        values = self.strings(key, required)
        if values is None:
            return None if required or self.has(key) else ()
        self.count(key, len(values), lo, hi)
        result: list[str] = []
        for index, value in enumerate(values):
            try:
                result.append(check(value))
            except ValueError as exc:
                self.error_item(key, index, str(exc))
        return None if key in self.bad else tuple(result)

    def count(self, key: str, n: int, lo: int, hi: int) -> None:
        """Check the number of values under ``key``."""
        if n < lo:
            self.error(key, f"needs at least {lo} value{'s' if lo > 1 else ''}")
        elif n > hi:
            self.error(key, f"{n} values; at most {hi}")

    def value_of(self, key: str) -> object | None:
        """The raw value under ``key`` if it exists and has no issue."""
        return None if key in self.bad else self.data.get(key)


def report_duplicates(entries: Sequence[tuple[Table, Hashable | None]], key: str, what: str) -> None:
    """Flag every entry whose value was already seen, pointing at the first."""
    first: dict[Hashable, Table] = {}
    for table, value in entries:
        if value is None:
            continue
        if value in first:
            table.error(key, f"duplicate {what} {value!r} (first at {first[value].path})")
        else:
            first[value] = table
