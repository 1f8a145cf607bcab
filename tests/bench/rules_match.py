"""Microseconds per Router.match for listeners of 1, 10 and 100 rules.

Usage: .venv/bin/python tests/bench/rules_match.py [--number N]

Every rule looks like a real one and mixes the condition types: a shared
wildcard host (so it passes and the path has to be checked too), a path
prefix, a method set, and on some rules a header or a query-string condition.
Three requests per size: one that hits the first rule, one that hits the last
(every earlier rule fails on its path, after its host has passed), and one
that hits nothing and gets the default action. The request carries the
headers and query string of a typical browser request.
"""

from __future__ import annotations

import argparse
import ipaddress
import timeit

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


def make_rule(i: int) -> Rule:
    conditions = [
        Condition(ConditionField.HOST_HEADER, ("*.example.com", "example.com")),
        Condition(ConditionField.PATH_PATTERN, (f"/svc{i}/*", f"/v?/svc{i}/*")),
        Condition(ConditionField.HTTP_REQUEST_METHOD, ("GET", "HEAD", "POST")),
    ]
    if i % 3 == 0:
        tenant = Condition(ConditionField.HTTP_HEADER, ("tenant-*",), header_name="X-Tenant")
        conditions.append(tenant)
    if i % 5 == 0:
        conditions.append(Condition(ConditionField.QUERY_STRING, query=(QueryPair("lang", "en*"),)))
    action = ForwardAction((WeightedTargetGroup(f"svc{i}"),))
    return Rule(10 * (i + 1), tuple(conditions), action)


def make_listener(size: int) -> Listener:
    return Listener(
        "bench",
        Protocol.HTTP,
        ipaddress.ip_address("192.0.2.1"),
        80,
        FixedResponseAction(404),
        tuple(make_rule(i) for i in range(size)),
    )


def make_request(path: str) -> Request:
    return Request(
        "GET",
        "shop.example.com:8080",
        path,
        "lang=en-GB&page=2&utm_source=news%20letter",
        HEADERS,
        ipaddress.ip_address("198.51.100.7"),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=20000, help="matches per measurement")
    args = parser.parse_args()
    print(f"{'rules':>5}  {'case':<10} {'µs/match':>9}  matched")
    for size in (1, 10, 100):
        router = Router.compile(make_listener(size))
        cases = {
            "first": make_request("/svc0/items/42"),
            "last": make_request(f"/svc{size - 1}/items/42"),
            "miss": make_request("/nowhere/items/42"),
        }
        for name, request in cases.items():
            timer = timeit.Timer(lambda: router.match(request))
            best = min(timer.repeat(repeat=5, number=args.number)) / args.number
            matched = router.match(request).rule_priority
            print(f"{size:>5}  {name:<10} {best * 1e6:>9.2f}  {matched}")


if __name__ == "__main__":
    main()
