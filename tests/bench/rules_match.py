"""Microseconds per Router.match: three rule sets, 1 to 1,000 rules, first/last/no match.

Usage: .venv/bin/python tests/bench/rules_match.py [--sizes 1 10 100 1000] [--sets mixed hosts paths]
       PYTHONPATH=/path/to/other/checkout .venv/bin/python tests/bench/rules_match.py   # another lb's matcher

Rule sets (every rule looks like a real one):

- mixed: a wildcard host that every rule shares (so it holds and the path
  decides), a path prefix per rule plus a second one with a ``?``, a method
  set, and on some rules an http-header or a query-string condition. The
  set the first version of this benchmark had.
- hosts: one host per rule (an exact name and a ``*.`` wildcard under
  another domain), a path on every fourth rule, a method on every third.
- paths: no host condition; a path per rule (a directory prefix and a
  ``/svcN*`` prefix), a method on every third, a source-ip on every tenth.

Three requests per set and size: one that hits the first rule, one that
hits the last (and only it), one that hits nothing and gets the default
action. The request carries the headers and query string of a typical
browser request. Times are the best of several runs of the process's CPU
time (time.process_time), so other processes on a shared machine disturb
them less than wall time would; the load average is printed with them.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import time
import timeit
from collections.abc import Callable

from lb.l7.rules import Request, Router
from lb.model import (
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

F = ConditionField
HEADERS = (
    ("host", "shop.example.com"),
    ("user-agent", "Mozilla/5.0 (X11; Linux x86_64) Gecko/20100101 Firefox/128.0"),
    ("accept", "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
    ("accept-language", "en-GB,en;q=0.5"),
    ("accept-encoding", "gzip, deflate, br"),
    ("cookie", "session=0123456789abcdef; theme=dark"),
    ("x-tenant", "tenant-7"),
    ("connection", "keep-alive"),
)
METHODS = Condition(F.HTTP_REQUEST_METHOD, ("GET", "HEAD", "POST"))


def _rule(i: int, conditions: list[Condition]) -> Rule:
    return Rule(10 * (i + 1), tuple(conditions), ForwardAction((WeightedTargetGroup(f"svc{i}"),)))


def mixed_rule(i: int) -> Rule:
    conditions = [
        Condition(F.HOST_HEADER, ("*.example.com", "example.com")),
        Condition(F.PATH_PATTERN, (f"/svc{i}/*", f"/v?/svc{i}/*")),
        METHODS,
    ]
    if i % 3 == 0:
        conditions.append(Condition(F.HTTP_HEADER, ("tenant-*",), header_name="X-Tenant"))
    if i % 5 == 0:
        conditions.append(Condition(F.QUERY_STRING, query=(QueryPair("lang", "en*"),)))
    return _rule(i, conditions)


def hosts_rule(i: int) -> Rule:
    conditions = [Condition(F.HOST_HEADER, (f"app{i}.example.com", f"*.app{i}.example.net"))]
    if i % 4 == 0:
        conditions.append(Condition(F.PATH_PATTERN, ("/api/*", "/v?/api/*")))
    if i % 3 == 0:
        conditions.append(METHODS)
    return _rule(i, conditions)


def paths_rule(i: int) -> Rule:
    conditions = [Condition(F.PATH_PATTERN, (f"/api/svc{i}/*", f"/svc{i}*"))]
    if i % 3 == 0:
        conditions.append(METHODS)
    if i % 10 == 0:
        conditions.append(Condition(F.SOURCE_IP, ("198.51.100.0/24", "10.0.0.0/8")))
    return _rule(i, conditions)


# set → (rule builder, {case: (host, path) given the number of rules})
SETS: dict[str, tuple[Callable[[int], Rule], dict[str, Callable[[int], tuple[str, str]]]]] = {
    "mixed": (
        mixed_rule,
        {
            "first": lambda n: ("shop.example.com:8080", "/svc0/items/42"),
            "last": lambda n: ("shop.example.com:8080", f"/svc{n - 1}/items/42"),
            "none": lambda n: ("shop.example.com:8080", "/nowhere/items/42"),
        },
    ),
    "hosts": (
        hosts_rule,
        {
            "first": lambda n: ("app0.example.com", "/api/items/42"),
            "last": lambda n: (f"eu.app{n - 1}.example.net:8443", "/api/items/42"),
            "none": lambda n: ("shop.example.org", "/api/items/42"),
        },
    ),
    "paths": (
        paths_rule,
        {
            "first": lambda n: ("shop.example.com", "/api/svc0/items/42"),
            "last": lambda n: ("shop.example.com", f"/api/svc{n - 1}/items/42"),
            "none": lambda n: ("shop.example.com", "/nowhere/items/42"),
        },
    ),
}


def make_listener(rules: list[Rule]) -> Listener:
    return Listener(
        "bench", Protocol.HTTP, ipaddress.ip_address("192.0.2.1"), 80, FixedResponseAction(404), tuple(rules)
    )


def make_request(host: str, path: str) -> Request:
    return Request(
        "GET",
        host,
        path,
        "lang=en-GB&page=2&utm_source=news%20letter",
        HEADERS,
        ipaddress.ip_address("198.51.100.7"),
    )


def measure(match: Callable[[], object], repeat: int) -> float:
    """Best seconds of CPU time per call."""
    timer = timeit.Timer(match, timer=time.process_time)
    number, _ = timer.autorange()  # enough calls for 0.2 s
    number = max(1, number // 2)
    return min(timer.repeat(repeat=repeat, number=number)) / number


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 100, 1000], help="rules per listener")
    parser.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS), help="rule sets")
    parser.add_argument("--repeat", type=int, default=7, help="runs per figure; the best is shown")
    parser.add_argument("--goal", type=float, default=3.0, help="µs per match at 100 rules (default 3)")
    args = parser.parse_args()
    import lb.l7.rules

    print(f"matcher: {lb.l7.rules.__file__}")
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    print(f"{'set':<6} {'rules':>5}  {'case':<6} {'µs/match':>9}  matched")
    worst: dict[int, float] = {}
    for set_name in args.sets:
        build, cases = SETS[set_name]
        for size in args.sizes:
            router = Router.compile(make_listener([build(i) for i in range(size)]))
            for case, where in cases.items():
                request = make_request(*where(size))
                matched = router.match(request).rule_priority
                expected = {"first": 10, "last": 10 * size, "none": None}[case]
                if matched != expected:
                    raise SystemExit(f"{set_name} {size} {case}: matched {matched}, expected {expected}")
                seconds = measure(lambda: router.match(request), args.repeat)
                worst[size] = max(worst.get(size, 0.0), seconds)
                print(f"{set_name:<6} {size:>5}  {case:<6} {seconds * 1e6:>9.2f}  {matched}", flush=True)
    for size, seconds in sorted(worst.items()):
        met = "met" if seconds * 1e6 <= args.goal else "not met"
        goal = f" (goal ≤ {args.goal:g} µs: {met})" if size == 100 else ""
        print(f"worst at {size} rules: {seconds * 1e6:.2f} µs{goal}")
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
