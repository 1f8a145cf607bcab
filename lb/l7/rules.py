"""Listener rules: compiled once per listener, matched against every request.

Pure: no I/O and no import from :mod:`lb.dataplane`. :meth:`Router.compile`
turns a :class:`~lb.model.Listener` into predicates and an index;
:meth:`Router.match` returns the first rule, from the lowest priority number
up, whose conditions all hold, else the default action
(docs/elb-reference.md, "Listener rules"). It does not walk every rule: an
index on host-header, path-pattern and http-request-method gives the rules
that may match, as bits in priority order, and the lowest of those whose
conditions all hold (each checked in full) wins: the answer of a walk of
every rule. :meth:`Router.explain` is that walk. All that the config decides
is decided at compile time; a match builds no regex and keeps no cache.

Choices made where ELB leaves room:

- Wildcards (compiled by :mod:`lb.l7.wildcards`): ``*`` is zero or more
  characters, ``?`` exactly one; every other character is literal (``.``,
  ``+``, ``(``, ``[`` ...). In query-string patterns only, ``\\*``, ``\\?``
  and ``\\\\`` stand for a literal ``*``, ``?`` and backslash (ELB's
  documented escape for query strings).
- Case-insensitive fields (host, header values, query keys and values) are
  compared after ``str.lower()`` on both sides: the pattern once here, the
  request value once per request, so no regex needs IGNORECASE.
- host-header: the Host value without its ``:port``; an IPv6 literal keeps its
  brackets (``[::1]:80`` is matched as ``[::1]``). A missing or empty Host
  never matches, not even ``*``.
- path-pattern: the path as received (not percent-decoded, not normalised).
- http-header: every instance of the named header is a candidate, each value
  as a whole (a comma-separated list is not split).
- query-string: the raw query is split on ``&``; ``k=v`` gives (k, v), a bare
  ``k`` gives (k, ''), empty pieces are skipped. Keys and values are then
  percent-decoded (UTF-8; ``+`` stays ``+``, form encoding is not assumed):
  we take ALB to match decoded values, which ALB's documentation does not state.
- source-ip: the immediate peer. An IPv4-mapped IPv6 peer (``::ffff:10.0.0.2``)
  is its IPv4 address, and a configured CIDR inside ``::ffff:0:0/96`` is
  compiled to its IPv4 equivalent. Host bits in a CIDR are ignored.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import unquote_to_bytes

from lb.l7.wildcards import Test, Token, compile_patterns, is_star, tokenize
from lb.model import Action, Condition, ConditionField, IPAddress, Listener, Rule

# --- the API --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    """What the matcher needs from one HTTP request."""

    method: str  # as received, e.g. "GET"
    host: str | None  # the Host header as received (may carry :port); None: absent
    path: str  # the path only, as received: no query string, not decoded
    query: str  # the raw query string without '?'; '' if none
    headers: tuple[tuple[str, str], ...]  # (lowercased name, value), repeats kept
    source_ip: IPAddress  # the immediate peer, never X-Forwarded-For


@dataclass(frozen=True, slots=True)
class Match:
    """The outcome of :meth:`Router.match`."""

    rule_priority: int | None  # None: the default rule
    action: Action


@dataclass(frozen=True, slots=True)
class RuleVerdict:
    """One line of :meth:`Router.explain`."""

    priority: int | None  # None: the default rule (always the last verdict)
    matched: bool  # all conditions hold (always True for the default rule)
    selected: bool  # the rule match() picks: exactly one verdict has it
    reason: str | None  # why the first failing condition (config order) failed
    action: Action


# --- the request as the checks see it ---------------------------------------------

# One request's facts, normalised once per match: a tuple indexed by these.
_METHOD: Final = 0
_HOST: Final = 1  # lowercased, without port; None: missing or empty
_PATH: Final = 2
_HEADERS: Final = 3  # name -> lowercased values, only names some rule asks for
_PARAMS: Final = 4  # decoded, lowercased (key, value); only if some rule asks
_PEER: Final = 5  # an IPv4-mapped IPv6 peer unwrapped to IPv4
_QUERY: Final = 6  # raw, for explain
_Facts = tuple[str, str | None, str, dict[str, list[str]], list[tuple[str, str]], IPAddress, str]


def _host_key(host: str | None) -> str | None:
    """The Host value without its port, lowercased; None if absent or empty."""
    if not host:
        return None
    if host[0] == "[":  # [v6]:port
        end = host.find("]")
        name = host if end < 0 else host[: end + 1]
    else:
        name, _, port = host.partition(":")
        if ":" in port:  # a bare IPv6 address (invalid in Host): no port to strip
            name = host
    return name.lower() or None


def _decode(text: str) -> str:
    # Twice as fast as urllib.parse.unquote, same result on valid UTF-8.
    return unquote_to_bytes(text).decode("utf-8", "replace").lower()


def _parse_query(query: str, keys: frozenset[str] | None = None) -> list[tuple[str, str]]:
    """The decoded, lowercased (key, value) pairs; only those whose key is in ``keys`` if given."""
    params = []
    for piece in query.lower().split("&"):
        if piece:
            key, _, value = piece.partition("=")
            if "%" in key:  # lowercased again once decoded: %41 is "A"
                key = _decode(key)
            if keys is not None and key not in keys:
                continue
            if "%" in value:
                value = _decode(value)
            params.append((key, value))
    return params


def _literal_query_key(key: str | None) -> str | None:
    """The one key a query-string key pattern matches (as parsed), None if not just one."""
    if key is None:
        return None
    tokens = tokenize(key, fold=True, escapes=True)
    if len(tokens) <= 1 and all(isinstance(t, str) for t in tokens):
        return "".join(t for t in tokens if isinstance(t, str))
    return None


def _headers(request: Request, wanted: frozenset[str]) -> dict[str, list[str]]:
    """Name → lowercased values, for the names some rule asks for."""
    headers: dict[str, list[str]] = {}
    if wanted:
        for name, value in request.headers:
            if name in wanted:
                headers.setdefault(name, []).append(value.lower())
    return headers


def _unmapped(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


# --- conditions -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Check:
    """A compiled condition: a test of one fact and, for explain, why it failed."""

    field: ConditionField
    slot: int  # the fact the test is given
    test: Test
    why_not: Callable[[_Facts], str]


def _none_of(what: str, subject: object, patterns: Iterable[str]) -> str:
    return f"{what}: {subject!r} matches none of {list(patterns)!r}"


def _host_check(condition: Condition) -> _Check:
    def why_not(f: _Facts) -> str:
        if f[_HOST] is None:
            return "host-header: the request has no Host header"
        return _none_of("host-header", f[_HOST], condition.values)

    return _Check(condition.field, _HOST, compile_patterns(condition.values, fold=True), why_not)


def _path_check(condition: Condition) -> _Check:
    test = compile_patterns(condition.values, fold=False)
    return _Check(
        condition.field, _PATH, test, lambda f: _none_of("path-pattern", f[_PATH], condition.values)
    )


def _method_check(condition: Condition) -> _Check:
    if not condition.values:
        raise ValueError("a condition needs at least one value")
    shown = list(condition.values)
    return _Check(
        condition.field,
        _METHOD,
        frozenset(condition.values).__contains__,
        lambda f: f"http-request-method: {f[_METHOD]!r} is none of {shown!r}",
    )


def _header_check(condition: Condition) -> _Check:
    if not condition.header_name:
        raise ValueError("an http-header condition needs a header_name")
    name = condition.header_name.lower()
    value_test = compile_patterns(condition.values, fold=True)
    what = f"http-header {name!r}"

    def test(headers: dict[str, list[str]]) -> bool:
        return any(map(value_test, headers.get(name, ())))

    def why_not(f: _Facts) -> str:
        values = f[_HEADERS].get(name)
        if not values:
            return f"{what}: the request has no such header"
        return _none_of(what, values[0] if len(values) == 1 else values, condition.values)

    return _Check(condition.field, _HEADERS, test, why_not)


def _query_check(condition: Condition) -> _Check:
    if not condition.query:
        raise ValueError("a query-string condition needs at least one key/value pair")
    pairs = [
        (
            None if pair.key is None else compile_patterns((pair.key,), fold=True, escapes=True),
            compile_patterns((pair.value,), fold=True, escapes=True),
        )
        for pair in condition.query
    ]
    shown = [p.value if p.key is None else f"{p.key}={p.value}" for p in condition.query]

    def test(params: list[tuple[str, str]]) -> bool:
        for key, value in params:
            for key_test, value_test in pairs:
                if value_test(value) and (key_test is None or key_test(key)):
                    return True
        return False

    def why_not(f: _Facts) -> str:
        if not f[_PARAMS]:
            return "query-string: the request has no query string"
        return _none_of("query-string", f[_QUERY], shown)

    return _Check(condition.field, _PARAMS, test, why_not)


_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def _source_check(condition: Condition) -> _Check:
    if not condition.values:
        raise ValueError("a condition needs at least one value")
    networks: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
    for cidr in condition.values:
        net = ipaddress.ip_network(cidr, strict=False)
        if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(_MAPPED):
            net = ipaddress.IPv4Network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))
        networks[net.version].append((int(net.network_address), int(net.netmask)))

    def test(peer: IPAddress) -> bool:
        address = int(peer)
        for network, mask in networks[peer.version]:
            if address & mask == network:
                return True
        return False

    shown = list(condition.values)
    return _Check(
        condition.field,
        _PEER,
        test,
        lambda f: f"source-ip: {str(f[_PEER])!r} is in none of {shown!r}",
    )


_COMPILERS: dict[ConditionField, Callable[[Condition], _Check]] = {
    ConditionField.HOST_HEADER: _host_check,
    ConditionField.PATH_PATTERN: _path_check,
    ConditionField.HTTP_REQUEST_METHOD: _method_check,
    ConditionField.HTTP_HEADER: _header_check,
    ConditionField.QUERY_STRING: _query_check,
    ConditionField.SOURCE_IP: _source_check,
}
# Relative cost of each check: match() runs a candidate's checks cheapest first.
_COST = {_METHOD: 0, _HOST: 1, _PATH: 1, _PEER: 2, _HEADERS: 3, _PARAMS: 4}


# --- the index --------------------------------------------------------------------
#
# Rule number i (0 for the lowest priority number) is bit i of an int. Each
# of host, path and method has an index from what a request shows to the
# rules whose condition on that field *may* hold; a request's candidates are
# the AND of the three. The index is sound, not exact: every rule whose
# conditions all hold is a candidate (each key below is something that every
# string the pattern matches shows), and every candidate is still checked in
# full, lowest bit (priority) first. A rule with no condition on a field, or
# with a value that has no key (``*``, ``*api*``, ``api*`` for hosts), is a
# candidate for every value of that field ("always").


def _literal(token: Token) -> str | None:
    return token if isinstance(token, str) else None


def _host_index_key(tokens: list[Token]) -> tuple[str, str] | None:
    """(kind, key) of a lowercased host pattern; None: no key, always a candidate.

    - exact: no wildcard: the host itself.
    - suffix: the last literal, from its first dot: ``*.example.com`` and
      ``api-?.example.com`` → ``.example.com``. Every host they match ends
      with it, and it starts with a dot: it is one of the host's dot-suffixes.
    - label: the first literal, up to its first dot: ``www.example.*`` →
      ``www.``. Every host it matches starts with it: the host's first label.
    """
    if len(tokens) <= 1 and all(isinstance(t, str) for t in tokens):
        return "exact", "".join(t for t in tokens if isinstance(t, str))
    last, first = _literal(tokens[-1]), _literal(tokens[0])
    if last is not None and "." in last:
        return "suffix", last[last.index(".") :]
    if first is not None and "." in first:
        return "label", first[: first.index(".") + 1]
    return None


def _path_index_key(tokens: list[Token]) -> tuple[str, tuple[int, str]] | None:
    """(kind, (offset, key)) of a path pattern; None: no key, always a candidate.

    Keys come from the literals before the first ``*``, each at a fixed
    offset (a ``?`` is one character):

    - exact: no wildcard: the path itself.
    - dir: a literal up to its last ``/``, two characters or more
      (``/api/v1/*`` → ``/api/v1/`` at 0, ``/v?/svc5/*`` → ``/svc5/`` at 3).
      Every path it matches has it at that offset, ending at a ``/``: the
      request's keys are the pieces from the offset to each later ``/``.
    - run: a literal of two characters or more, whole (``/admin*`` →
      ``/admin`` at 0): every path it matches has it at that offset.
    - ext: otherwise the last literal from its last dot (``*.css`` →
      ``.css``): every path it matches ends with it, and its last dot is the
      path's last dot.

    The longest dir or run wins (a dir on a tie: it needs no slice per length).
    """
    if len(tokens) <= 1 and all(isinstance(t, str) for t in tokens):
        return "exact", (0, "".join(t for t in tokens if isinstance(t, str)))
    best: tuple[str, tuple[int, str]] | None = None
    offset = 0
    for token in tokens:
        if is_star(token):
            break
        if not isinstance(token, str):
            offset += 1  # ?: exactly one character
            continue
        cut = token.rfind("/")
        for kind, key in (("dir", token[: cut + 1] if cut >= 1 else ""), ("run", token)):
            if len(key) >= 2 and (best is None or len(key) > len(best[1][1])):
                best = kind, (offset, key)
        offset += len(token)
    if best is not None:
        return best
    last = _literal(tokens[-1])
    if last is not None and "." in last:
        return "ext", (0, last[last.rindex(".") :])
    return None


def _add(table: dict[str, int], key: str, bit: int) -> None:
    table[key] = table.get(key, 0) | bit


# A field with this many distinct conditions or fewer is not keyed: each
# distinct condition is tested once per request (the bits of the rules that
# share it set when it holds), which is both cheaper and exact. So are up to
# this many distinct conditions that have no key; past that, their rules are
# always candidates (testing them all would cost more than pruning saves).
_FEW = 2

Probe = Callable[[Any], int]  # a request's fact → the rules that may match it


class _FieldIndex:
    """One field's index as it is built; probe() compiles it to one function."""

    def __init__(self, conditions: list[Condition | None], fold: bool) -> None:
        """Index rule i's condition on the field (None: it has none)."""
        self.without = 0  # the rules without the condition
        distinct: dict[tuple[str, ...], int] = {}
        for number, condition in enumerate(conditions):
            bit = 1 << number
            if condition is None:
                self.without |= bit
            else:
                values = tuple(sorted({v.lower() if fold else v for v in condition.values}))
                distinct[values] = distinct.get(values, 0) | bit
        self.always = self.without  # candidates whatever the value
        # Conditions tested once per request: (the condition's test, its rules).
        self.tested: list[tuple[Test, int]] = []
        if len(distinct) <= _FEW:
            unkeyed = list(distinct.items())
        else:
            unkeyed = [(values, bits) for values, bits in distinct.items() if not self.keyed(values, bits)]
        if len(unkeyed) <= _FEW:
            self.tested = [(compile_patterns(values, fold=fold), bits) for values, bits in unkeyed]
        else:
            for _, bits in unkeyed:
                self.always |= bits
        # How well the field tells rules apart: its distinct conditions that prune.
        self.distinct = len(distinct) - (0 if len(unkeyed) <= _FEW else len(unkeyed))

    def keyed(self, values: tuple[str, ...], bits: int) -> bool:
        """Add the rules ``bits`` under the key of each value; False if one has none."""
        raise NotImplementedError


class _HostIndex(_FieldIndex):
    """Rules by the host keys their host-header condition may match (see _host_index_key)."""

    def __init__(self, conditions: list[Condition | None]) -> None:
        self.exact: dict[str, int] = {}
        self.suffix: dict[str, int] = {}
        self.label: dict[str, int] = {}
        super().__init__(conditions, fold=True)

    def keyed(self, values: tuple[str, ...], bits: int) -> bool:
        keys = [_host_index_key(tokenize(value, fold=True)) for value in values]
        if any(key is None for key in keys):
            return False
        tables = {"exact": self.exact, "suffix": self.suffix, "label": self.label}
        for kind, key in filter(None, keys):
            _add(tables[kind], key, bits)
        return True

    def probe(self) -> Probe:
        """The candidates for a host fact (lowercased, no port; None: no Host)."""
        always, tested, exact, suffix, label = self.always, tuple(self.tested), self.exact, self.suffix, self.label
        without = self.without
        # Dot-suffixes longer than the longest key, or shorter than the shortest, are not looked up.
        longest, shortest = max(map(len, suffix), default=0), min(map(len, suffix), default=0)

        def candidates(host: str | None) -> int:
            if host is None:
                return without
            found = always
            for test, bits in tested:
                if test(host):
                    found |= bits
            if exact:
                found |= exact.get(host, 0)
            if suffix:
                last = len(host) - shortest
                i = host.find(".", max(0, len(host) - longest), last + 1)
                while i >= 0:
                    found |= suffix.get(host[i:], 0)
                    i = host.find(".", i + 1, last + 1)
            if label:
                i = host.find(".")
                if i >= 0:
                    found |= label.get(host[: i + 1], 0)
            return found

        return candidates


class _PathIndex(_FieldIndex):
    """Rules by the path keys their path-pattern condition may match (see _path_index_key)."""

    def __init__(self, conditions: list[Condition | None]) -> None:
        self.exact: dict[str, int] = {}
        self.dirs: dict[int, dict[str, int]] = {}  # offset → key → bits
        self.runs: dict[tuple[int, int], dict[str, int]] = {}  # (start, end) → key → bits
        self.ext: dict[str, int] = {}
        super().__init__(conditions, fold=False)

    def keyed(self, values: tuple[str, ...], bits: int) -> bool:
        keys = [_path_index_key(tokenize(value, fold=False)) for value in values]
        if any(key is None for key in keys):
            return False
        for kind, (offset, key) in filter(None, keys):
            if kind == "exact":
                _add(self.exact, key, bits)
            elif kind == "dir":
                _add(self.dirs.setdefault(offset, {}), key, bits)
            elif kind == "run":
                _add(self.runs.setdefault((offset, offset + len(key)), {}), key, bits)
            else:
                _add(self.ext, key, bits)
        return True

    def probe(self) -> Probe:
        """The candidates for a path."""
        always, tested, exact, ext = self.always, tuple(self.tested), self.exact, self.ext
        # (offset, where the "/" ending its shortest key is, past its longest key's, table)
        dirs = tuple(
            (offset, offset + min(map(len, table)) - 1, offset + max(map(len, table)), table)
            for offset, table in sorted(self.dirs.items())
        )
        runs = tuple((start, end, table) for (start, end), table in self.runs.items())

        def candidates(path: str) -> int:
            found = always
            for test, bits in tested:
                if test(path):
                    found |= bits
            if exact:
                found |= exact.get(path, 0)
            for offset, first, limit, table in dirs:
                i = path.find("/", first)
                while 0 <= i < limit:
                    found |= table.get(path[offset : i + 1], 0)
                    i = path.find("/", i + 1)
            for start, end, table in runs:
                found |= table.get(path[start:end], 0)
            if ext:
                i = path.rfind(".")
                if i >= 0:
                    found |= ext.get(path[i:], 0)
            return found

        return candidates


def _method_probe(conditions: list[Condition | None]) -> Probe:
    """Rules by method: methods have no wildcards, so one lookup is exact."""
    without = sum(1 << number for number, condition in enumerate(conditions) if condition is None)
    table: dict[str, int] = {}
    for number, condition in enumerate(conditions):
        for method in condition.values if condition is not None else ():
            _add(table, method, 1 << number)
    table = {method: bits | without for method, bits in table.items()}
    return lambda method: table.get(method, without)


# --- the router -------------------------------------------------------------------

_UNSET: Final[Any] = object()  # a fact match() has not needed yet


@dataclass(frozen=True, slots=True)
class _CompiledRule:
    priority: int
    checks: tuple[_Check, ...]  # config order, for explain
    found: Match  # built once, returned as is


def _compile_rule(rule: Rule) -> _CompiledRule:
    checks = []
    for condition in rule.conditions:
        try:
            checks.append(_COMPILERS[condition.field](condition))
        except ValueError as error:
            raise ValueError(f"rule {rule.priority}, {condition.field.value}: {error}") from None
    return _CompiledRule(rule.priority, tuple(checks), Match(rule.priority, rule.action))


def _holds(check: _Check, facts: _Facts) -> bool:
    fact = facts[check.slot]
    return fact is not None and bool(check.test(fact))


def _first(rule: Rule, field: ConditionField) -> Condition | None:
    return next((c for c in rule.conditions if c.field is field), None)


# What match() runs for one candidate: the facts to compute first if not yet
# done (slot, how), its tests (slot, test) cheapest first, the Match to return.
_Candidate = tuple[tuple[tuple[int, Callable[[Request], object]], ...], tuple[tuple[int, Test], ...], Match]


class Router:
    """A listener's rules, compiled. Immutable: share it between requests freely."""

    __slots__ = (
        "_rules",
        "_default",
        "_all",
        "_candidates",
        "_probes",
        "_no_host",
        "_header_names",
        "_query",
        "_query_keys",
    )

    def __init__(self, rules: tuple[Rule, ...], default: Match) -> None:
        """``rules`` in priority order; rule i is bit i of a candidate set."""
        self._rules = tuple(_compile_rule(rule) for rule in rules)  # for explain
        self._default = default
        self._all = (1 << len(rules)) - 1
        conditions = [c for rule in rules for c in rule.conditions]
        self._header_names = frozenset(c.header_name.lower() for c in conditions if c.header_name)
        self._query = any(c.field == ConditionField.QUERY_STRING for c in conditions)
        # When every query-string pair names its key without wildcards, match()
        # parses (and decodes) only the parameters with one of those keys: no
        # check could pass on any other (explain still parses them all).
        keys = [_literal_query_key(p.key) for c in conditions for p in c.query]
        self._query_keys = None if None in keys else frozenset(k for k in keys if k is not None)
        # Facts match() computes only for a candidate that tests them.
        header_names, query_keys = self._header_names, self._query_keys
        lazy: dict[int, Callable[[Request], object]] = {
            _HEADERS: lambda request: _headers(request, header_names),
            _PARAMS: lambda request: _parse_query(request.query, query_keys),
            _PEER: lambda request: _unmapped(request.source_ip),
        }
        self._candidates: tuple[_Candidate, ...] = tuple(
            (
                tuple((slot, how) for slot, how in lazy.items() if any(c.slot == slot for c in rule.checks)),
                tuple((c.slot, c.test) for c in sorted(rule.checks, key=lambda c: _COST[c.slot])),
                rule.found,
            )
            for rule in self._rules
        )
        # Each field is indexed by a rule's first condition on it; any further
        # one (ALB allows one per rule) is still checked. A field that no rule
        # tests has no index; the others are probed in the order that tells
        # rules apart best (the most distinct conditions first).
        indexes: list[tuple[int, int, Probe]] = []
        hosts = [_first(rule, ConditionField.HOST_HEADER) for rule in rules]
        self._no_host = self._all  # the rules without a host-header condition
        if any(hosts):
            host_index = _HostIndex(hosts)
            self._no_host = host_index.without
            indexes.append((host_index.distinct, _HOST, host_index.probe()))
        paths = [_first(rule, ConditionField.PATH_PATTERN) for rule in rules]
        if any(paths):
            path_index = _PathIndex(paths)
            indexes.append((path_index.distinct, _PATH, path_index.probe()))
        methods = [_first(rule, ConditionField.HTTP_REQUEST_METHOD) for rule in rules]
        if any(methods):
            indexes.append((len({c.values for c in methods if c}), _METHOD, _method_probe(methods)))
        indexes.sort(key=lambda index: -index[0])  # stable: host, path, method on ties
        self._probes = tuple((slot, probe) for _, slot, probe in indexes)

    @classmethod
    def compile(cls, listener: Listener) -> Router:
        """Compile ``listener``'s rules; ValueError names the rule that is wrong."""
        seen: set[int] = set()
        for rule in listener.rules:
            if rule.priority in seen:
                raise ValueError(
                    f"listener {listener.name}: priority {rule.priority} is used twice"
                )
            seen.add(rule.priority)
        ordered = tuple(sorted(listener.rules, key=lambda rule: rule.priority))
        return cls(ordered, Match(None, listener.default_action))

    def match(self, request: Request) -> Match:
        """The first rule, by priority, whose conditions all hold; else the default.

        The index gives the candidates; the lowest-numbered one whose checks
        all pass is the answer, as if every rule had been walked in order."""
        host = _host_key(request.host) if self._no_host != self._all else None  # None: no rule tests it
        facts: list[Any] = [request.method, host, request.path, _UNSET, _UNSET, _UNSET]
        # Without a Host (or with an empty one), no host-header condition holds,
        # not even "*": only the rules without one are candidates.
        found = self._all if host is not None else self._no_host
        for slot, probe in self._probes:
            if not found & (found - 1):
                break  # one candidate (or none) left: checking it costs less than probing
            found &= probe(facts[slot])
        if not found:
            return self._default
        candidates = self._candidates
        while found:
            low = found & -found
            lazy, tests, result = candidates[low.bit_length() - 1]
            for slot, how in lazy:
                if facts[slot] is _UNSET:
                    facts[slot] = how(request)
            for slot, test in tests:
                if not test(facts[slot]):
                    break
            else:
                return result
            found ^= low
        return self._default

    def explain(self, request: Request) -> list[RuleVerdict]:
        """Every rule in priority order with its verdict, then the default rule.

        Walks every rule (no index): match() is tested to agree with it."""
        facts = self._facts(request)
        verdicts = []
        selected = False
        for rule in self._rules:
            failed = next((check for check in rule.checks if not _holds(check, facts)), None)
            matched = failed is None
            reason = None if failed is None else failed.why_not(facts)
            chosen = matched and not selected
            verdicts.append(RuleVerdict(rule.priority, matched, chosen, reason, rule.found.action))
            selected = selected or matched
        verdicts.append(RuleVerdict(None, True, not selected, None, self._default.action))
        return verdicts

    def _facts(self, request: Request) -> _Facts:
        return (
            request.method,
            _host_key(request.host),
            request.path,
            _headers(request, self._header_names),
            _parse_query(request.query) if self._query else [],
            _unmapped(request.source_ip),
            request.query,
        )
