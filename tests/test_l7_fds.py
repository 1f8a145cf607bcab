"""A worker near its open files limit (lb.l7.worker): the oldest idle
connections make room for new ones; requests in flight are never cut; with
nothing idle a new connection is refused. The limit is lowered on the worker
itself (its fd_high), so the test needs neither root nor a low rlimit; real
sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio

from tests.l7_backends import (
    Client,
    backend,
    build_request,
    forward_to,
    http_listener,
    proxy,
    routing_table,
    run,
    target_group,
)


def test_the_oldest_idle_connections_make_room_and_requests_in_flight_finish() -> None:
    async def body() -> None:
        async with backend("http", "b1") as b:
            table = routing_table(http_listener(forward_to("g")), (target_group("g", b),), idle_timeout=60)
            async with proxy(table) as (worker, port):
                worker.fd_high = worker.open_fds() + 13  # the 13th descriptor from now is one too many
                busy = await Client.open(port)
                busy.send(build_request("GET", "/slow?ms=1000"))  # in flight: a client and an upstream descriptor
                await asyncio.sleep(0.2)
                idle = [await Client.open(port) for _ in range(10)]
                await asyncio.sleep(0.1)
                slow = idle[-1]
                slow.send(b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: ")  # a head that never ends is idle too
                late = [await Client.open(port) for _ in range(5)]
                await asyncio.sleep(0.1)
                try:
                    shed = [await c.closed_by_peer(0.2) if i < 5 else False for i, c in enumerate(idle)]
                    assert shed == [True] * 5 + [False] * 5  # the five oldest idle ones, in order
                    assert worker.shed == 5 and worker.refused == 0
                    for client in late[:2]:  # the newcomers are served
                        assert (await client.request()).status == 200
                    assert (await busy.response()).status == 200  # the request in flight finished
                finally:
                    for client in (busy, *idle, *late):
                        await client.close()

    run(body())


def test_with_nothing_idle_a_new_connection_is_refused() -> None:
    async def body() -> None:
        async with backend("http", "b1") as b:
            table = routing_table(http_listener(forward_to("g")), (target_group("g", b),), idle_timeout=60)
            async with proxy(table) as (worker, port):
                worker.fd_high = worker.open_fds() + 4  # two requests in flight fill it
                busy = [await Client.open(port) for _ in range(2)]
                for client in busy:
                    client.send(build_request("GET", "/slow?ms=800"))
                await asyncio.sleep(0.3)
                refused = await Client.open(port)
                try:
                    assert await refused.closed_by_peer(1.0)
                    assert worker.refused == 1 and worker.shed == 0
                    assert [(await c.response()).status for c in busy] == [200, 200]
                    await asyncio.sleep(0.1)  # their upstream connections go back to the pool: room again
                    worker.pools.expire(float("inf"))
                    async with await Client.open(port) as client:
                        assert (await client.request()).status == 200
                finally:
                    for client in (*busy, refused):
                        await client.close()

    run(body())
