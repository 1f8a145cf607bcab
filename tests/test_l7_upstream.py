"""lb.l7.upstream (connections and pools), lb.l7.balancer, lb.l7.stickiness.

Balancers and cookies are plain unit tests. Pools and the errors the proxy
generates for a failing target run on real loopback sockets against the
misbehaving backends of tests/l7_backends.py: each self-generated status is
triggered by its real cause.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass

import pytest

from lb.l7.balancer import (
    LeastOutstanding,
    RoundRobin,
    WeightedChoice,
    WeightedRandom,
    make_balancer,
)
from lb.l7.config import L7Config
from lb.l7.stickiness import CookieSigner, find_cookie
from lb.model import Algorithm
from tests.l7_backends import (
    HOST,
    Client,
    backend,
    blackhole,
    forward_to,
    free_port,
    http_listener,
    proxy,
    routing_table,
    run,
    target_group,
)


@dataclass
class P:
    name: str
    outstanding: int = 0


# --- balancers -------------------------------------------------------------------


def test_round_robin_takes_turns() -> None:
    pools = (P("a"), P("b"), P("c"))
    balancer = RoundRobin(pools)
    picks = [balancer.pick().name for _ in range(9)]
    assert Counter(picks) == {"a": 3, "b": 3, "c": 3}
    assert picks[:3] == picks[3:6] == picks[6:]


def test_least_outstanding_prefers_the_idlest_and_spreads_ties() -> None:
    a, b, c = P("a", 5), P("b", 1), P("c", 3)
    balancer = LeastOutstanding((a, b, c))
    assert {balancer.pick().name for _ in range(6)} == {"b"}
    b.outstanding = 7
    assert balancer.pick().name == "c"
    for pool in (a, b, c):
        pool.outstanding = 0
    assert {balancer.pick().name for _ in range(3)} == {"a", "b", "c"}


def test_weighted_random_follows_weights() -> None:
    pools = (P("a"), P("b"), P("z"))
    balancer = WeightedRandom(pools, (3, 1, 0))
    counts = Counter(balancer.pick().name for _ in range(20000))
    assert counts["z"] == 0
    assert abs(counts["a"] / 20000 - 0.75) < 0.03


def test_weighted_choice_all_zero_is_uniform_and_make_balancer() -> None:
    choice = WeightedChoice(("x", "y"), (0, 0))
    assert {choice.pick() for _ in range(200)} == {"x", "y"}
    pools = (P("a"),)
    assert isinstance(make_balancer(Algorithm.ROUND_ROBIN, pools, (1,)), RoundRobin)
    assert isinstance(make_balancer(Algorithm.LEAST_OUTSTANDING_REQUESTS, pools, (1,)), LeastOutstanding)
    assert isinstance(make_balancer(Algorithm.WEIGHTED_RANDOM, pools, (1,)), WeightedRandom)
    with pytest.raises(ValueError):
        RoundRobin(())


# --- stickiness cookies ------------------------------------------------------------


def test_cookie_round_trip_and_rejections() -> None:
    signer = CookieSigner(b"secret-1")
    value = signer.issue("web|10.0.0.1:80", int(time.time()) + 60)
    assert signer.verify(value) == "web|10.0.0.1:80"
    assert CookieSigner(b"secret-2").verify(value) is None  # another load balancer's key
    tampered = value[:-2] + (b"AA" if value[-2:] != b"AA" else b"BB")
    assert signer.verify(tampered) is None
    assert signer.verify(signer.issue("x", int(time.time()) - 1)) is None  # expired
    for garbage in (b"", b"!!!", b"AAAA", b"x" * 200):
        assert signer.verify(garbage) is None
    line = signer.set_cookie(b"AWSALB", "g|1.2.3.4:80", 3600)
    assert line.startswith(b"set-cookie: AWSALB=") and line.endswith(b"; Path=/\r\n") and b"; Expires=" in line


def test_find_cookie_matches_the_exact_name() -> None:
    headers = [b"AWSALBTG=tg; other=1", b" AWSALB = v1 ;x=2"]
    assert find_cookie(headers, b"AWSALB") == b"v1"
    assert find_cookie(headers, b"AWSALBTG") == b"tg"
    assert find_cookie([b"XAWSALB=no"], b"AWSALB") is None


# --- pools ---------------------------------------------------------------------------


def test_keep_alive_reuse_across_clients() -> None:
    async def body() -> None:
        async with backend("http") as b:
            table = routing_table(http_listener(forward_to("g")), (target_group("g", b),))
            async with proxy(table) as (worker, port):
                for _ in range(3):  # three clients, one after the other
                    async with await Client.open(port) as client:
                        for _ in range(5):
                            assert (await client.request()).status == 200
                assert b.stats.connections == 1 and b.stats.requests == 15
                pool = worker.pools.get(HOST, b.port)
                assert len(pool.idle) == 1 and pool.outstanding == 0

    run(body())


def test_max_idle_per_target_closes_the_excess() -> None:
    async def body() -> None:
        async with backend("http") as b:
            table = routing_table(http_listener(forward_to("g")), (target_group("g", b),))
            async with proxy(table, L7Config(max_idle_per_target=1)) as (worker, port):
                clients = [await Client.open(port) for _ in range(4)]
                try:
                    await asyncio.gather(*(c.request("GET", "/slow?ms=100") for c in clients))
                finally:
                    for c in clients:
                        await c.close()
                pool = worker.pools.get(HOST, b.port)
                assert b.stats.connections == 4
                assert len(pool.idle) == 1
                await asyncio.sleep(0.05)
                assert pool.connections == 1

    run(body())


def test_max_conns_per_target_queues_requests() -> None:
    async def body() -> None:
        async with backend("http") as b:
            table = routing_table(http_listener(forward_to("g")), (target_group("g", b),))
            async with proxy(table, L7Config(max_conns_per_target=1)) as (_, port):
                clients = [await Client.open(port) for _ in range(5)]
                try:
                    responses = await asyncio.gather(*(c.request("GET", "/slow?ms=20") for c in clients))
                finally:
                    for c in clients:
                        await c.close()
                assert [r.status for r in responses] == [200] * 5
                assert b.stats.connections == 1

    run(body())


def test_idle_upstream_connections_expire() -> None:
    async def body() -> None:
        async with backend("http") as b:
            table = routing_table(http_listener(forward_to("g")), (target_group("g", b),), idle_timeout=0.3)
            async with proxy(table) as (worker, port):
                async with await Client.open(port) as client:
                    assert (await client.request()).status == 200
                pool = worker.pools.get(HOST, b.port)
                assert len(pool.idle) == 1
                await asyncio.sleep(0.6)
                assert pool.idle == [] and pool.connections == 0

    run(body())


def test_target_closing_a_reused_connection_is_retried_once() -> None:
    async def body() -> None:
        async with backend("http", close_after=1) as b:  # every connection answers once, then drops
            table = routing_table(http_listener(forward_to("g")), (target_group("g", b),))
            async with proxy(table) as (_, port):
                async with await Client.open(port) as client:
                    assert (await client.request()).status == 200
                    await asyncio.sleep(0.05)  # the pooled connection looks fine
                    assert (await client.request()).status == 200  # dropped, retried on a new one
                    # a request with a body cannot be replayed: the same failure is a 502
                    assert (await client.request("POST", "/", body=b"abc")).status == 502
                assert b.stats.connections == 2

    run(body())


def test_connection_close_from_target_is_not_reused() -> None:
    async def body() -> None:
        async with backend("http") as b:
            table = routing_table(http_listener(forward_to("g")), (target_group("g", b),))
            async with proxy(table) as (_, port):
                async with await Client.open(port) as client:
                    response = await client.request("GET", "/close")
                    assert response.status == 200 and response.header("connection") is None
                    assert (await client.request()).status == 200  # the client's connection stays
                assert b.stats.connections == 2

    run(body())


def test_retired_pool_closes_idle_connections_after_swap() -> None:
    async def body() -> None:
        async with backend("http", "old") as old, backend("http", "new") as new:
            listener = http_listener(forward_to("g"))
            async with proxy(routing_table(listener, (target_group("g", old),))) as (worker, port):
                async with await Client.open(port) as client:
                    assert (await client.request()).json()["backend"] == "old"
                    await worker.update(routing_table(listener, (target_group("g", new),), version=2))
                    assert (await client.request()).json()["backend"] == "new"  # same client connection
                await asyncio.sleep(0.05)
                assert (HOST, old.port) not in worker.pools.pools
                assert old.stats.connections == 1 and new.stats.connections == 1

    run(body())


# --- errors the proxy generates for a failing target ------------------------------------


@pytest.mark.parametrize("kind", ["reset", "garbage", "close"])
def test_misbehaving_target_is_502(kind: str) -> None:
    async def body() -> None:
        async with backend(kind) as b:
            table = routing_table(http_listener(forward_to("g")), (target_group("g", b),))
            async with proxy(table) as (_, port):
                async with await Client.open(port) as client:
                    response = await client.request()
                    assert response.status == 502
                    assert response.body.startswith(b"<html>")
                    assert (await client.request()).status == 502  # the client connection survives

    run(body())


def test_refused_connection_is_502() -> None:
    async def body() -> None:
        table = routing_table(http_listener(forward_to("g")), (target_group("g", (HOST, free_port(), 1)),))
        async with proxy(table) as (_, port):
            async with await Client.open(port) as client:
                assert (await client.request()).status == 502

    run(body())


def test_hanging_target_is_504_after_the_idle_timeout() -> None:
    async def body() -> None:
        async with backend("hang") as b:
            table = routing_table(http_listener(forward_to("g")), (target_group("g", b),), idle_timeout=0.4)
            async with proxy(table) as (_, port):
                async with await Client.open(port) as client:
                    started = time.monotonic()
                    response = await client.request()
                    assert response.status == 504
                    assert 0.35 < time.monotonic() - started < 1.5

    run(body())


def test_connect_timeout_is_504() -> None:
    async def body() -> None:
        with blackhole() as dead_port:
            table = routing_table(http_listener(forward_to("g")), (target_group("g", (HOST, dead_port, 1)),))
            async with proxy(table, L7Config(connect_timeout=0.3)) as (_, port):
                async with await Client.open(port) as client:
                    started = time.monotonic()
                    assert (await client.request()).status == 504
                    assert time.monotonic() - started < 1.5

    run(body())


def test_no_registered_targets_is_503() -> None:
    async def body() -> None:
        table = routing_table(http_listener(forward_to("g")), (target_group("g"),))
        async with proxy(table) as (_, port):
            async with await Client.open(port) as client:
                response = await client.request()
                assert response.status == 503 and response.header("connection") is None

    run(body())


def test_response_cut_short_aborts_the_client_connection() -> None:
    async def body() -> None:
        async with backend("truncate") as b:
            table = routing_table(http_listener(forward_to("g")), (target_group("g", b),))
            async with proxy(table) as (_, port):
                async with await Client.open(port) as client:
                    client.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
                    with pytest.raises(ConnectionError):
                        await client.response()
                    assert client.raw.startswith(b"HTTP/1.1 200 OK\r\n") and client.raw.endswith(b"0123456789")

    run(body())
