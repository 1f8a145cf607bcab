"""lb.l7.rules: ALB listener rule semantics, as tables of (condition, request, expected)."""

from __future__ import annotations

import ipaddress
import random
import re
from typing import Any
from urllib.parse import unquote

import pytest

from lb.l7.rules import Request, Router
from lb.model import (
    Action,
    Condition,
    ConditionField,
    FixedResponseAction,
    ForwardAction,
    Listener,
    Protocol,
    QueryPair,
    Rule,
    WeightedTargetGroup,
)

HIT = FixedResponseAction(200, body="hit")
DEFAULT = FixedResponseAction(404, body="default")

# --- builders -------------------------------------------------------------------


def host(*values: str) -> Condition:
    return Condition(ConditionField.HOST_HEADER, values)


def path(*values: str) -> Condition:
    return Condition(ConditionField.PATH_PATTERN, values)


def method(*values: str) -> Condition:
    return Condition(ConditionField.HTTP_REQUEST_METHOD, values)


def header(name: str, *values: str) -> Condition:
    return Condition(ConditionField.HTTP_HEADER, values, header_name=name)


def query(*pairs: tuple[str | None, str]) -> Condition:
    return Condition(ConditionField.QUERY_STRING, query=tuple(QueryPair(k, v) for k, v in pairs))


def source(*values: str) -> Condition:
    return Condition(ConditionField.SOURCE_IP, values)


def rule(priority: int, *conditions: Condition, action: Action = HIT) -> Rule:
    return Rule(priority, conditions, action)


def listener(*rules: Rule, default: Action = DEFAULT) -> Listener:
    return Listener("web", Protocol.HTTP, ipaddress.ip_address("192.0.2.1"), 80, default, rules)


def request(
    method: str = "GET",
    host: str | None = "example.com",
    path: str = "/",
    query: str = "",
    headers: tuple[tuple[str, str], ...] = (),
    source: str = "198.51.100.7",
) -> Request:
    return Request(method, host, path, query, headers, ipaddress.ip_address(source))


def forward(name: str) -> ForwardAction:
    return ForwardAction((WeightedTargetGroup(name),))


# --- one condition against one request --------------------------------------------

P = pytest.param
H = "headers"

MIXED = ("/exact", "/pre/*", "*.css", "*/mid/*", "/r?x")

CONDITION_CASES = [
    # wildcards (path-pattern: case-sensitive, so these test the wildcard engine alone)
    P(path("/api*"), {"path": "/api"}, True, id="star-matches-zero-chars"),
    P(path("/api/*"), {"path": "/api/v1/users"}, True, id="star-matches-many-chars"),
    P(path("/api/*"), {"path": "/apix"}, False, id="star-needs-the-literal-before-it"),
    P(path("/v?/x"), {"path": "/v1/x"}, True, id="qmark-matches-one-char"),
    P(path("/v?/x"), {"path": "/v/x"}, False, id="qmark-not-zero-chars"),
    P(path("/v?/x"), {"path": "/v12/x"}, False, id="qmark-not-two-chars"),
    P(path("/a/*/c"), {"path": "/a/b/b/c"}, True, id="star-in-the-middle"),
    P(path("/a*/c"), {"path": "/a/c"}, True, id="star-in-the-middle-zero-chars"),
    P(path("/img/*.???"), {"path": "/img/x/cat.png"}, True, id="star-and-qmarks-in-the-middle"),
    P(path("/img/*.???"), {"path": "/img/cat.jpeg"}, False, id="star-and-qmarks-too-long"),
    P(path("*.css"), {"path": "/static/site.css"}, True, id="leading-star-suffix"),
    P(path("*.css"), {"path": "/static/site.cssx"}, False, id="leading-star-suffix-miss"),
    P(path("*/admin/*"), {"path": "/x/admin/y"}, True, id="star-both-ends-infix"),
    P(path("*/admin/*"), {"path": "/x/Admin/y"}, False, id="star-both-ends-case-sensitive"),
    P(path("*"), {"path": "/anything/at/all"}, True, id="lone-star-matches-anything"),
    P(path("/a**b"), {"path": "/ab"}, True, id="double-star-is-one-star"),
    P(path("/health"), {"path": "/health"}, True, id="no-wildcard-exact"),
    P(path("/health"), {"path": "/health/"}, False, id="no-wildcard-exact-miss"),
    # one condition, values of every shape: any of them matching is enough
    P(path(*MIXED), {"path": "/exact"}, True, id="mixed-shapes-exact"),
    P(path(*MIXED), {"path": "/pre/x"}, True, id="mixed-shapes-prefix"),
    P(path(*MIXED), {"path": "/s/site.css"}, True, id="mixed-shapes-suffix"),
    P(path(*MIXED), {"path": "/a/mid/b"}, True, id="mixed-shapes-infix"),
    P(path(*MIXED), {"path": "/r1x"}, True, id="mixed-shapes-general"),
    P(path(*MIXED), {"path": "/r12x"}, False, id="mixed-shapes-none"),
    # regex metacharacters are literal
    P(path("/?.html"), {"path": "/a-html"}, False, id="literal-dot"),
    P(path("/?.html"), {"path": "/a.html"}, True, id="literal-dot-matches-dot"),
    P(path("/a+?"), {"path": "/aax"}, False, id="literal-plus"),
    P(path("/a+?"), {"path": "/a+x"}, True, id="literal-plus-matches-plus"),
    P(path("/(x)?"), {"path": "/x1"}, False, id="literal-parens"),
    P(path("/(x)?"), {"path": "/(x)1"}, True, id="literal-parens-match-parens"),
    P(path("/[a-z]*"), {"path": "/b"}, False, id="literal-bracket"),
    P(path("/[a-z]*"), {"path": "/[a-z]/q"}, True, id="literal-bracket-matches-bracket"),
    P(path("/a|b?"), {"path": "/a1"}, False, id="literal-pipe"),
    P(path("/^a$?"), {"path": "/^a$1"}, True, id="literal-caret-dollar"),
    P(path("/a\\*"), {"path": "/a\\xyz"}, True, id="path-backslash-is-literal-star-is-wild"),
    P(path("/a?c"), {"path": "/a\nc"}, True, id="qmark-matches-newline"),
    # path-pattern: case-sensitive, path only
    P(path("/API/*"), {"path": "/api/x"}, False, id="path-case-sensitive"),
    P(path("*x=1*"), {"path": "/", "query": "x=1"}, False, id="path-never-sees-query"),
    P(path("/search?q=1"), {"path": "/search", "query": "q=1"}, False, id="path-qmark-not-query"),
    P(path("/a%20b"), {"path": "/a%20b"}, True, id="path-not-decoded"),
    # host-header
    P(host("*.example.com"), {"host": "a.example.com"}, True, id="host-wildcard-subdomain"),
    P(host("*.example.com"), {"host": "example.com"}, False, id="host-wildcard-not-apex"),
    P(host("*.example.com"), {"host": "a.b.example.com"}, True, id="host-wildcard-deep"),
    P(host("Example.COM"), {"host": "eXample.com"}, True, id="host-case-insensitive"),
    P(host("*.EXAMPLE.com"), {"host": "A.Example.Com"}, True, id="host-wildcard-case-insensitive"),
    P(host("example.com"), {"host": "example.com:8080"}, True, id="host-port-stripped"),
    P(host("*:8080"), {"host": "example.com:8080"}, False, id="host-port-not-matched"),
    P(host("[::1]"), {"host": "[::1]:80"}, True, id="host-ipv6-with-port"),
    P(host("[::1]"), {"host": "[::1]"}, True, id="host-ipv6-without-port"),
    P(host("[2001:db8::*]"), {"host": "[2001:DB8::5]:443"}, True, id="host-ipv6-wildcard-case"),
    P(host("*"), {"host": None}, False, id="host-missing-never-matches"),
    P(host("*"), {"host": ""}, False, id="host-empty-never-matches"),
    P(host("api-?.example.com"), {"host": "api-1.example.com"}, True, id="host-qmark"),
    P(host("api-?.example.com"), {"host": "api-12.example.com"}, False, id="host-qmark-one"),
    P(host("?.example.com"), {"host": "a-example.com"}, False, id="host-dot-literal"),
    P(host("a.com", "b.com"), {"host": "B.com"}, True, id="host-any-value"),
    P(host("a.com", "b.com", "*.c.com"), {"host": "c.com"}, False, id="host-none-of-values"),
    # http-request-method
    P(method("GET"), {"method": "GET"}, True, id="method-exact"),
    P(method("GET"), {"method": "get"}, False, id="method-case-sensitive"),
    P(method("G*"), {"method": "GET"}, False, id="method-no-wildcards"),
    P(method("G*"), {"method": "G*"}, True, id="method-star-literal"),
    P(method("GET", "HEAD"), {"method": "HEAD"}, True, id="method-any-value"),
    # http-header
    P(header("X-Env", "prod"), {H: (("x-env", "prod"),)}, True, id="header-name-case"),
    P(header("x-env", "PROD"), {H: (("x-env", "Prod"),)}, True, id="header-value-case"),
    P(header("user-agent", "*mobile*"), {H: (("user-agent", "Moz (iPhone; Mobile)"),)}, True,
      id="header-value-wildcard"),
    P(header("x-env", "*"), {H: ()}, False, id="header-missing"),
    P(header("x-env", "prod"), {H: (("x-env", "dev"), ("x-env", "prod"))}, True,
      id="header-repeated-later-one-matches"),
    P(header("x-env", "prod"), {H: (("x-env", "dev"), ("x-env", "qa"))}, False,
      id="header-repeated-none-matches"),
    P(header("x-*", "a"), {H: (("x-env", "a"),)}, False, id="header-name-not-wildcard"),
    P(header("x-env", "prod"), {H: (("x-envy", "prod"),)}, False, id="header-other-name"),
    P(header("x-env", "dev", "prod"), {H: (("x-env", "prod"),)}, True, id="header-any-value"),
    P(header("accept", "text/html"), {H: (("accept", "text/html, */*"),)}, False,
      id="header-value-whole-not-split"),
    # query-string
    P(query(("version", "v1")), {"query": "version=v1"}, True, id="query-key-value"),
    P(query(("Version", "V1")), {"query": "VERSION=v1"}, True, id="query-case-insensitive"),
    P(query((None, "v1")), {"query": "a=v1"}, True, id="query-value-only"),
    P(query((None, "v1")), {"query": "v1=x"}, False, id="query-value-only-not-key"),
    P(query(("*", "v1")), {"query": "x=v1"}, True, id="query-wildcard-key"),
    P(query(("utm_*", "*")), {"query": "ref=x"}, False, id="query-wildcard-key-miss"),
    P(query(("v", "1?")), {"query": "v=1"}, False, id="query-wildcard-value-qmark"),
    P(query(("tag", "b")), {"query": "tag=a&tag=b"}, True, id="query-repeated-key"),
    P(query(("a", "2")), {"query": "a=1&b=2"}, False, id="query-pair-same-param"),
    P(query(("a", "9"), ("b", "2")), {"query": "a=1&b=2"}, True, id="query-any-pair"),
    P(query(("debug", "")), {"query": "debug"}, True, id="query-no-equals-empty-value"),
    P(query((None, "debug")), {"query": "debug"}, False, id="query-no-equals-is-a-key"),
    P(query(("x", "a=b")), {"query": "x=a=b"}, True, id="query-value-with-equals"),
    P(query(("a", "1")), {"query": "&&a=1&"}, True, id="query-empty-pieces-skipped"),
    P(query(("name", "john doe")), {"query": "name=John%20Doe"}, True, id="query-value-decoded"),
    P(query(("a b", "1")), {"query": "a%20b=1"}, True, id="query-key-decoded"),
    P(query(("x", "a&b")), {"query": "x=a%26b"}, True, id="query-decoded-after-split"),
    P(query(("a", "abc")), {"query": "a=%41bc"}, True, id="query-decoded-then-case-folded"),
    P(query(("a", "%zz")), {"query": "a=%zz"}, True, id="query-bad-escape-kept-literal"),
    P(query(("a", "é")), {"query": "a=%C3%A9"}, True, id="query-decoded-as-utf8"),
    P(query(("x", "a b")), {"query": "x=a+b"}, False, id="query-plus-is-not-space"),
    P(query(("x", "a\\*")), {"query": "x=a*"}, True, id="query-escaped-star-literal"),
    P(query(("x", "a\\*")), {"query": "x=ab"}, False, id="query-escaped-star-not-wild"),
    P(query(("x", "a\\?")), {"query": "x=ab"}, False, id="query-escaped-qmark-not-wild"),
    P(query(("x", "\\\\*")), {"query": "x=%5Cabc"}, True, id="query-escaped-backslash"),
    P(query(("*", "*")), {"query": ""}, False, id="query-empty-never-matches"),
    # source-ip
    P(source("10.0.0.0/8"), {"source": "10.1.2.3"}, True, id="source-v4-inside"),
    P(source("10.0.0.0/8"), {"source": "11.0.0.1"}, False, id="source-v4-outside"),
    P(source("192.0.2.10/32"), {"source": "192.0.2.10"}, True, id="source-v4-slash-32"),
    P(source("192.0.2.10/32"), {"source": "192.0.2.11"}, False, id="source-v4-slash-32-miss"),
    P(source("0.0.0.0/0"), {"source": "203.0.113.9"}, True, id="source-v4-slash-0"),
    P(source("0.0.0.0/0"), {"source": "2001:db8::1"}, False, id="source-v4-slash-0-not-v6"),
    P(source("::/0"), {"source": "2001:db8::1"}, True, id="source-v6-slash-0"),
    P(source("2001:db8::/32"), {"source": "2001:db8:1::5"}, True, id="source-v6-inside"),
    P(source("2001:db8::/32"), {"source": "2001:db9::1"}, False, id="source-v6-outside"),
    P(source("10.0.0.0/8"), {"source": "::ffff:10.0.0.2"}, True, id="source-mapped-v4-peer"),
    P(source("::/0"), {"source": "::ffff:10.0.0.2"}, False, id="source-mapped-v4-peer-not-v6"),
    P(source("::ffff:10.0.0.0/104"), {"source": "10.0.0.7"}, True, id="source-mapped-cidr"),
    P(source("192.168.0.0/16", "10.0.0.0/8"), {"source": "10.9.9.9"}, True, id="source-any"),
    P(source("10.0.0.1/8"), {"source": "10.200.0.1"}, True, id="source-host-bits-ignored"),
    P(source("10.0.0.0/8"), {H: (("x-forwarded-for", "10.0.0.1"),)}, False,
      id="source-never-x-forwarded-for"),
]


@pytest.mark.parametrize(("condition", "fields", "expected"), CONDITION_CASES)
def test_condition(condition: Condition, fields: dict[str, Any], expected: bool) -> None:
    router = Router.compile(listener(rule(1, condition)))
    found = router.match(request(**fields))
    assert (found.rule_priority == 1) is expected
    assert found.action == (HIT if expected else DEFAULT)
    # explain agrees with match
    first = router.explain(request(**fields))[0]
    assert first.matched is expected
    assert (first.reason is None) is expected


# --- several rules: order, conjunction, default -----------------------------------

ROUTING_CASES = [
    P(
        [
            rule(20, path("/api/*"), action=forward("late")),
            rule(10, path("/*"), action=forward("early")),
        ],
        request(path="/api/x"),
        10,
        id="lower-priority-number-wins-even-listed-later",
    ),
    P(
        [rule(1, host("a.com")), rule(2, path("/*"))],
        request(host="b.com", path="/x"),
        2,
        id="falls-through-to-later-rule",
    ),
    P(
        [rule(5, host("*.example.com"), path("/api/*"))],
        request(host="a.example.com", path="/web"),
        None,
        id="all-conditions-must-match",
    ),
    P(
        [rule(5, host("*.example.com"), path("/api/*"), method("POST"))],
        request(method="POST", host="a.example.com", path="/api/x"),
        5,
        id="all-conditions-match",
    ),
    P(
        [rule(5, header("x-a", "1"), header("x-b", "2"))],
        request(headers=(("x-a", "1"), ("x-b", "3"))),
        None,
        id="two-header-conditions-both-needed",
    ),
    P(
        [rule(5, query(("a", "1")), query(("b", "2")))],
        request(query="b=2&a=1"),
        5,
        id="two-query-conditions-both-hold",
    ),
    P(
        [rule(1, host("*"), path("/*")), rule(2, path("/*"))],
        request(host=None, path="/x"),
        2,
        id="no-host-skips-host-rules",
    ),
    P(
        [rule(1, method("GET"), path("/a")), rule(2, method("GET"), path("/b"))],
        request(path="/b"),
        2,
        id="shared-condition-then-distinct-one",
    ),
    P([rule(1, path("/x")), rule(2, path("/y"))], request(path="/z"), None, id="default-when-none"),
    P([], request(), None, id="no-rules-default"),
    P([rule(7)], request(), 7, id="rule-without-conditions-always-matches"),
]


@pytest.mark.parametrize(("rules", "req", "expected"), ROUTING_CASES)
def test_routing(rules: list[Rule], req: Request, expected: int | None) -> None:
    the_listener = listener(*rules, default=forward("default"))
    found = Router.compile(the_listener).match(req)
    assert found.rule_priority == expected
    by_priority = {r.priority: r.action for r in rules}
    want = the_listener.default_action if expected is None else by_priority[expected]
    assert found.action == want


# --- explain ----------------------------------------------------------------------

EXPLAIN_CASES = [
    P(host("*.example.com"), request(host="a.com:8080"),
      "host-header: 'a.com' matches none of ['*.example.com']", id="host"),
    P(host("*"), request(host=None), "host-header: the request has no Host header", id="no-host"),
    P(path("/api/*"), request(path="/web"), "path-pattern: '/web' matches none of ['/api/*']",
      id="path"),
    P(method("GET", "HEAD"), request(method="POST"),
      "http-request-method: 'POST' is none of ['GET', 'HEAD']", id="method"),
    P(header("X-Env", "prod*"), request(headers=(("x-env", "Dev"),)),
      "http-header 'x-env': 'dev' matches none of ['prod*']", id="header"),
    P(header("X-Env", "prod*"), request(),
      "http-header 'x-env': the request has no such header", id="no-header"),
    P(query(("v", "1"), (None, "x")), request(query="v=2&a=b"),
      "query-string: 'v=2&a=b' matches none of ['v=1', 'x']", id="query"),
    P(query(("v", "1")), request(), "query-string: the request has no query string", id="no-query"),
    P(source("10.0.0.0/8"), request(source="192.0.2.1"),
      "source-ip: '192.0.2.1' is in none of ['10.0.0.0/8']", id="source"),
]


@pytest.mark.parametrize(("condition", "req", "reason"), EXPLAIN_CASES)
def test_explain_names_the_failing_condition(
    condition: Condition, req: Request, reason: str
) -> None:
    verdicts = Router.compile(listener(rule(3, condition))).explain(req)
    assert [(v.priority, v.matched, v.selected, v.reason) for v in verdicts] == [
        (3, False, False, reason),
        (None, True, True, None),
    ]


@pytest.mark.parametrize(
    ("conditions", "failing"),
    [
        P((host("a.com"), path("/a")), "host-header", id="host-listed-first"),
        P((path("/a"), host("a.com")), "path-pattern", id="path-listed-first"),
        P(
            (method("GET"), source("10.0.0.0/8"), query(("a", "1"))),
            "source-ip",
            id="skips-conditions-that-hold",
        ),
    ],
)
def test_explain_reports_the_first_failing_condition_in_config_order(
    conditions: tuple[Condition, ...], failing: str
) -> None:
    verdict = Router.compile(listener(rule(1, *conditions))).explain(request(host="b.com"))[0]
    assert verdict.reason is not None and verdict.reason.startswith(failing + ":")


def test_explain_lists_every_rule_in_priority_order_and_selects_one() -> None:
    the_listener = listener(
        rule(30, path("/*"), action=forward("shadowed")),
        rule(10, host("other.com"), action=forward("other")),
        rule(20, path("/api/*"), action=forward("api")),
        default=forward("default"),
    )
    verdicts = Router.compile(the_listener).explain(request(path="/api/v1"))
    assert [(v.priority, v.matched, v.selected) for v in verdicts] == [
        (10, False, False),
        (20, True, True),
        (30, True, False),
        (None, True, False),
    ]
    names = ("other", "api", "shadowed", "default")
    assert [v.action for v in verdicts] == [forward(name) for name in names]


# --- compile ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        P([rule(1, path("/a")), rule(1, path("/b"))], "priority 1 is used twice", id="duplicate"),
        P([rule(4, host())], "rule 4, host-header: a condition needs at least one value",
          id="no-values"),
        P([rule(4, method())], "rule 4, http-request-method", id="no-methods"),
        P([rule(4, source())], "rule 4, source-ip", id="no-cidrs"),
        P([rule(4, query())], "rule 4, query-string", id="no-pairs"),
        P([rule(4, Condition(ConditionField.HTTP_HEADER, ("x",)))], "header_name",
          id="no-header-name"),
        P([rule(4, source("10.0.0.0/33"))], "10.0.0.0/33", id="bad-cidr"),
    ],
)
def test_compile_rejects(rules: list[Rule], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        Router.compile(listener(*rules))


def test_match_builds_no_regex_per_request(monkeypatch: pytest.MonkeyPatch) -> None:
    router = Router.compile(
        listener(
            rule(1, path("/a?c*d")),
            rule(2, host("*.x.com"), header("x-a", "*b*c")),
            rule(3, query(("k?", "v*w"))),
        )
    )

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("re.compile called while matching")

    monkeypatch.setattr(re, "compile", refuse)
    req = request(host="y.x.com", path="/abcxd", query="k1=v%5Aw", headers=(("x-a", "abc"),))
    assert router.match(req).rule_priority == 1
    assert router.explain(req)[0].selected
    assert router.match(request(path="/", query="k1=v%5Aw")).rule_priority == 3


# --- the index: compiled match() against a linear reference -----------------------
#
# The reference is written here from docs/elb-reference.md and rules.py's
# documented choices, sharing no code with lb.l7.rules: a regex per pattern
# (``*`` → ``.*``, ``?`` → ``.``), every rule walked in priority order. Random
# rule sets and requests are drawn from tiny alphabets, so that patterns of
# every shape (exact, prefix, suffix, infix, ``?`` anywhere, dots and slashes
# where index keys are cut) collide with the requests often. A seed that
# fails is named in the assertion.


def _reference_regex(pattern: str, escapes: bool = False) -> re.Pattern[str]:
    out = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if escapes and char == "\\" and pattern[i + 1 : i + 2] in ("*", "?", "\\"):
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        out.append(".*" if char == "*" else "." if char == "?" else re.escape(char))
        i += 1
    return re.compile("".join(out), re.DOTALL)


def _reference_any(patterns: tuple[str, ...], text: str, fold: bool, escapes: bool = False) -> bool:
    if fold:
        patterns, text = tuple(p.lower() for p in patterns), text.lower()
    return any(_reference_regex(p, escapes).fullmatch(text) for p in patterns)


def _reference_host(value: str | None) -> str | None:
    if not value:
        return None
    if value.startswith("["):
        end = value.find("]")
        name = value if end < 0 else value[: end + 1]
    elif value.count(":") == 1:
        name = value.split(":")[0]
    else:
        name = value
    return name.lower() or None


def _reference_params(query: str) -> list[tuple[str, str]]:
    pairs = []
    for piece in query.split("&"):
        if piece:
            key, _, value = piece.partition("=")
            pairs.append((unquote(key, errors="replace").lower(), unquote(value, errors="replace").lower()))
    return pairs


def _reference_holds(condition: Condition, req: Request) -> bool:
    field = condition.field
    if field is ConditionField.HOST_HEADER:
        name = _reference_host(req.host)
        return name is not None and _reference_any(condition.values, name, fold=True)
    if field is ConditionField.PATH_PATTERN:
        return _reference_any(condition.values, req.path, fold=False)
    if field is ConditionField.HTTP_REQUEST_METHOD:
        return req.method in condition.values
    if field is ConditionField.HTTP_HEADER:
        assert condition.header_name is not None
        wanted = condition.header_name.lower()
        return any(
            _reference_any(condition.values, value, fold=True) for name, value in req.headers if name == wanted
        )
    if field is ConditionField.QUERY_STRING:
        return any(
            _reference_any((pair.value,), value, fold=True, escapes=True)
            and (pair.key is None or _reference_any((pair.key,), key, fold=True, escapes=True))
            for key, value in _reference_params(req.query)
            for pair in condition.query
        )
    peer = req.source_ip
    if isinstance(peer, ipaddress.IPv6Address) and peer.ipv4_mapped is not None:
        peer = peer.ipv4_mapped
    for cidr in condition.values:
        net = ipaddress.ip_network(cidr, strict=False)
        if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(ipaddress.IPv6Network("::ffff:0:0/96")):
            net = ipaddress.ip_network(f"{net.network_address.ipv4_mapped}/{net.prefixlen - 96}", strict=False)
        if peer in net:
            return True
    return False


def reference_match(rules: list[Rule], req: Request) -> int | None:
    """The straightforward matcher: every rule, lowest priority number first."""
    for r in sorted(rules, key=lambda r: r.priority):
        if all(_reference_holds(c, req) for c in r.conditions):
            return r.priority
    return None


def _soup(rng: random.Random, alphabet: str, longest: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, longest)))


_HOST_VALUES = ("a.ex.com", "*.ex.com", "*.a.ex.com", "a.*", "www.ex.*", "a-?.ex.com", "*", "*a*", "a*",
                "?.ex.com", "A.EX.com", "ex.com", "[::1]", "*.ex.net", "b.a.ex.com")  # fmt: skip
_PATH_VALUES = ("/a", "/a/*", "/a*", "/a/b/*", "*.css", "/a/*.css", "/v?/a/*", "*", "*/b/*", "/a?b", "/?",
                "/a/?/c*", "", "/ab/*", "/a/b", "/A/*", "*.min.css", "/a.b/*", "/ab*")  # fmt: skip
_CIDRS = ("10.0.0.0/8", "10.1.0.0/16", "192.0.2.0/24", "::/0", "2001:db8::/32", "::ffff:10.0.0.0/104", "0.0.0.0/0")


def _random_values(rng: random.Random, pool: tuple[str, ...], alphabet: str, longest: int) -> tuple[str, ...]:
    count = rng.choice((1, 1, 2, 3))
    return tuple(rng.choice(pool) if rng.random() < 0.5 else _soup(rng, alphabet, longest) for _ in range(count))


def _random_condition(rng: random.Random, field: ConditionField) -> Condition:
    if field is ConditionField.HOST_HEADER:
        return host(*_random_values(rng, _HOST_VALUES, "ab.-*?A", 7))
    if field is ConditionField.PATH_PATTERN:
        return path(*_random_values(rng, _PATH_VALUES, "/ab.*?", 8))
    if field is ConditionField.HTTP_REQUEST_METHOD:
        return method(*rng.sample(("GET", "HEAD", "POST", "get"), rng.randint(1, 3)))
    if field is ConditionField.HTTP_HEADER:
        return header(rng.choice(("x-a", "X-A", "x-b")), *_random_values(rng, ("a", "*b*", "A?"), "ab*?", 4))
    if field is ConditionField.QUERY_STRING:
        keys = (None, "a", "b", "a*", "?", "A", "a\\*", "%61")
        return query(*((rng.choice(keys), rng.choice(("1", "*", "a?", "x", "", "%20", "a b"))) for _ in range(2)))
    return source(*rng.sample(_CIDRS, rng.randint(1, 2)))


_FIELDS = tuple(ConditionField)
_FIELD_WEIGHTS = (6, 6, 2, 2, 2, 1)  # host, path, header, method, query, source: as ConditionField lists them


def _random_rules(rng: random.Random, count: int) -> list[Rule]:
    priorities = rng.sample(range(1, 50001), count)
    rules = []
    for priority in priorities:
        fields = set(rng.choices(_FIELDS, weights=_FIELD_WEIGHTS, k=rng.choice((0, 1, 2, 2, 3, 4))))
        conditions = [_random_condition(rng, field) for field in fields]
        if rng.random() < 0.05:  # a second condition on the host or the path: both must hold
            conditions.append(_random_condition(rng, rng.choice(_FIELDS[:2])))
        rules.append(rule(priority, *conditions, action=forward(f"g{priority}")))
    return rules


def _random_request(rng: random.Random) -> Request:
    hosts = (None, "", "a.ex.com", "A.Ex.Com:8080", "b.a.ex.com", "a-1.ex.com", "ex.com", "www.ex.net", "[::1]:80",
             "a.ex.com.", "x", "a.b", "c.ex.net")  # fmt: skip
    paths = ("/", "/a", "/a/", "/a/b", "/a/b/c", "/a/x.css", "/v1/a/z", "/ab", "/ab/c", "/a.b/c", "/x.min.css",
             "/A/b", "", "/a?b", "/axb", "/a/q/c/d")  # fmt: skip
    return request(
        method=rng.choice(("GET", "HEAD", "POST", "get", "PUT")),
        host=rng.choice(hosts) if rng.random() < 0.6 else _soup(rng, "aAb.-", 8) + rng.choice(("", ":80")),
        path=rng.choice(paths) if rng.random() < 0.6 else _soup(rng, "/ab.", 9),
        query=rng.choice(("", "a=1", "A=x&b=a%20b", "a*=1", "%61=x", "b&&a=ab", "a=%2a", "x=a+b")),
        headers=tuple((name, rng.choice(("a", "xby", "AB"))) for name in ("x-a", "x-b") if rng.random() < 0.5),
        source=rng.choice(("10.1.2.3", "192.0.2.9", "198.51.100.1", "2001:db8::1", "::ffff:10.0.0.2", "::1")),
    )


@pytest.mark.parametrize("seed", range(40))
def test_compiled_match_equals_the_linear_reference(seed: int) -> None:
    rng = random.Random(seed)
    for round_ in range(12):
        # mostly small listeners, some past a machine word of rule bits
        count = rng.choice((0, 1, 2, 3, 5, 8, 13, 30, 70, 150)) if round_ else 100
        rules = _random_rules(rng, count)
        router = Router.compile(listener(*rules))
        for _ in range(25):
            req = _random_request(rng)
            want = reference_match(rules, req)
            found = router.match(req)
            context = f"seed {seed}, round {round_}, {count} rules, {req}"
            assert found.rule_priority == want, context
            assert found.action == (DEFAULT if want is None else forward(f"g{want}")), context
            selected = [v.priority for v in router.explain(req) if v.selected]
            assert selected == [want], context


def _tenant_rules(count: int) -> list[Rule]:
    """Rules like a big listener's: hosts, directories, suffixes, methods, spread over the index's kinds."""
    rules = []
    for i in range(count):
        kind = i % 6
        if kind == 0:
            conditions: tuple[Condition, ...] = (host(f"t{i}.example.com", f"*.t{i}.example.net"),)
        elif kind == 1:
            conditions = (path(f"/api/svc{i}/*", f"/v?/svc{i}/*"), method("GET", "HEAD"))
        elif kind == 2:
            conditions = (path(f"/svc{i}*"),)
        elif kind == 3:
            conditions = (host(f"www{i}.example.*"), path(f"*.t{i}"))
        elif kind == 4:
            conditions = (path(f"/exact/{i}"), header("x-t", f"t{i}"))
        else:
            conditions = (host(f"*t{i}*"), query((f"k{i}", "*")))
        rules.append(rule(i + 1, *conditions, action=forward(f"g{i + 1}")))
    return rules


def test_compiled_match_finds_each_of_many_rules() -> None:
    rules = _tenant_rules(300)
    router = Router.compile(listener(*rules))
    requests = [
        request(host="t0.example.com"),
        request(host="a.t6.example.net:443", path="/x"),
        request(path="/api/svc7/items"),
        request(path="/v2/svc13/x", method="HEAD"),
        request(path="/v2/svc13/x", method="POST"),
        request(path="/svc8"),
        request(path="/svc80/x"),
        request(host="WWW9.example.org", path="/a/b.t9"),
        request(path="/exact/10", headers=(("x-t", "T10"),)),
        request(path="/exact/10"),
        request(host="at11b.com", query="K11=v"),
        request(host="nowhere.example.org", path="/nothing"),
        request(host=None, path="/svc2/x"),
    ]
    for req in requests:
        assert router.match(req).rule_priority == reference_match(rules, req), req
