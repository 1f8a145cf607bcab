"""Listener rules: compiled once per listener, matched against every request.

Pure: no I/O and no import from :mod:`lb.dataplane`. :meth:`Router.compile`
turns a :class:`~lb.model.Listener` into a table of predicates;
:meth:`Router.match` walks it from the lowest priority number up and returns
the first rule whose conditions all hold, else the default action
(docs/elb-reference.md, "Listener rules"). All that the config decides is
decided at compile time; a match builds no regex and keeps no cache.

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
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote_to_bytes

from lb.l7.wildcards import Test, compile_patterns
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


def _parse_query(query: str) -> list[tuple[str, str]]:
    params = []
    for piece in query.lower().split("&"):
        if piece:
            key, _, value = piece.partition("=")
            if "%" in key:  # lowercased again once decoded: %41 is "A"
                key = _decode(key)
            if "%" in value:
                value = _decode(value)
            params.append((key, value))
    return params


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
# Relative cost of each check, to break ties in the order match() runs them.
_COST = {_METHOD: 0, _HOST: 1, _PATH: 1, _PEER: 2, _HEADERS: 3, _PARAMS: 4}


# --- the router -------------------------------------------------------------------

_Table = tuple[tuple[tuple[tuple[int, Test], ...], Match], ...]


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


class Router:
    """A listener's rules, compiled. Immutable: share it between requests freely."""

    __slots__ = ("_rules", "_default", "_with_host", "_without_host", "_header_names", "_query")

    def __init__(
        self,
        rules: tuple[_CompiledRule, ...],
        default: Match,
        tables: tuple[_Table, _Table],
        header_names: frozenset[str],
        query: bool,
    ) -> None:
        self._rules = rules  # for explain
        self._default = default
        # For match: a request with a Host, and one without (rules testing it left out).
        self._with_host, self._without_host = tables
        # Per-request work only when some rule needs it.
        self._header_names = header_names
        self._query = query

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
        ordered = sorted(listener.rules, key=lambda rule: rule.priority)
        rules = tuple(_compile_rule(rule) for rule in ordered)
        conditions = [c for rule in ordered for c in rule.conditions]
        # match() first runs the check on the field whose values differ most
        # between rules: it tells them apart, while a host that every rule
        # shares passes every time. Cheaper checks first on ties.
        variety = Counter(c.field for c in set(conditions))

        def order(check: _Check) -> tuple[int, int]:
            return -variety[check.field], _COST[check.slot]

        def table(host: bool) -> _Table:
            return tuple(
                (tuple((c.slot, c.test) for c in sorted(rule.checks, key=order)), rule.found)
                for rule in rules
                if host or all(check.slot != _HOST for check in rule.checks)
            )

        return cls(
            rules,
            Match(None, listener.default_action),
            (table(True), table(False)),
            frozenset(c.header_name.lower() for c in conditions if c.header_name),
            any(c.field == ConditionField.QUERY_STRING for c in conditions),
        )

    def match(self, request: Request) -> Match:
        """The first rule, by priority, whose conditions all hold; else the default."""
        facts = self._facts(request)
        for tests, found in self._with_host if facts[_HOST] is not None else self._without_host:
            for slot, test in tests:
                if not test(facts[slot]):
                    break
            else:
                return found
        return self._default

    def explain(self, request: Request) -> list[RuleVerdict]:
        """Every rule in priority order with its verdict, then the default rule."""
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
        headers: dict[str, list[str]] = {}
        wanted = self._header_names
        if wanted:
            for name, value in request.headers:
                if name in wanted:
                    headers.setdefault(name, []).append(value.lower())
        return (
            request.method,
            _host_key(request.host),
            request.path,
            headers,
            _parse_query(request.query) if self._query else [],
            _unmapped(request.source_ip),
            request.query,
        )
