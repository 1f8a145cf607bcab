"""ELB's wildcard patterns, compiled to one fast test per condition.

``*`` is zero or more characters, ``?`` exactly one; every other character is
literal. With ``escapes`` (query-string patterns), ``\\*``, ``\\?`` and
``\\\\`` stand for a literal ``*``, ``?`` and backslash. Pure: used by
:mod:`lb.l7.rules`, which documents where each kind of pattern applies.
"""

from __future__ import annotations

import enum
import operator
import re
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["Test", "Token", "compile_patterns", "is_star", "tokenize"]


class _Wild(enum.Enum):
    STAR = "*"
    ONE = "?"


_Token = str | _Wild
Token = _Token  # a literal run (str) or a wildcard; see tokenize()
Test = Callable[[Any], object]  # truthy when the fact it is given matches


def _tokenize(pattern: str, escapes: bool) -> list[_Token]:
    """Split a pattern into literal runs and wildcards; runs of ``*`` collapse."""
    tokens: list[_Token] = []
    literal: list[str] = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        i += 1
        if escapes and char == "\\" and pattern[i : i + 1] in ("*", "?", "\\"):
            literal.append(pattern[i])
            i += 1
        elif char != "*" and char != "?":
            literal.append(char)
        else:
            if literal:
                tokens.append("".join(literal))
                literal.clear()
            if not (char == "*" and tokens and tokens[-1] is _Wild.STAR):
                tokens.append(_Wild.STAR if char == "*" else _Wild.ONE)
    if literal:
        tokens.append("".join(literal))
    return tokens


def tokenize(pattern: str, *, fold: bool, escapes: bool = False) -> list[Token]:
    """A pattern as compile_patterns() sees it: literal runs and wildcards.

    Literal runs are never adjacent, runs of ``*`` are one ``*``, and with
    ``fold`` the pattern is lowercased first, exactly as compile_patterns()
    does, so a literal here is what the compiled test compares against.
    The rules index derives its keys from these.
    """
    return _tokenize(pattern.lower() if fold else pattern, escapes)


def is_star(token: Token) -> bool:
    return token is _Wild.STAR


def _shape(tokens: list[_Token]) -> tuple[str, str] | None:
    """(kind, literal) for the shapes that have a cheap check; None for the rest."""
    match tokens:
        case []:
            return "exact", ""
        case [str() as literal]:
            return "exact", literal
        case [str() as literal, _Wild.STAR]:
            return "prefix", literal
        case [_Wild.STAR, str() as literal]:
            return "suffix", literal
        case [_Wild.STAR, str() as literal, _Wild.STAR]:
            return "infix", literal
    return None


def _anything(_: object) -> bool:
    return True


_CHEAP: dict[str, Callable[[list[str]], Test]] = {
    "exact": lambda literals: frozenset(literals).__contains__,
    "prefix": lambda literals: operator.methodcaller("startswith", tuple(literals)),
    "suffix": lambda literals: operator.methodcaller("endswith", tuple(literals)),
    "infix": lambda literals: re.compile("|".join(map(re.escape, literals))).search,
}
_REGEX = {_Wild.STAR: ".*", _Wild.ONE: "."}


def compile_patterns(patterns: Iterable[str], *, fold: bool, escapes: bool = False) -> Test:
    """One C-level test for a set of patterns, true when any of them matches.

    When all the patterns have one of the simple shapes, its cheap check: no
    wildcard → set membership, ``lit*`` → ``startswith``, ``*lit`` →
    ``endswith``, ``*lit*`` → substring search. Otherwise a single
    precompiled alternation used with ``fullmatch``. With ``fold`` the
    patterns are lowercased here and the caller lowercases the subject.
    """
    parsed = [_tokenize(p.lower() if fold else p, escapes) for p in patterns]
    if not parsed:
        raise ValueError("a condition needs at least one value")
    if [_Wild.STAR] in parsed:
        return _anything
    shapes = [_shape(tokens) for tokens in parsed]
    kinds = {shape[0] for shape in shapes if shape}
    if len(kinds) == 1 and all(shapes):
        return _CHEAP[kinds.pop()]([shape[1] for shape in shapes if shape])
    alternatives = (
        "".join(_REGEX[t] if isinstance(t, _Wild) else re.escape(t) for t in tokens)
        for tokens in parsed
    )
    return re.compile("|".join(f"(?:{a})" for a in alternatives), re.DOTALL).fullmatch
