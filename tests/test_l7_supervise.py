"""L7Server supervises its worker processes: real processes on 127.0.0.1,
killed (-9), stopped (SIGSTOP) and crash-looping, with short supervision
timeouts so the slow paths run in seconds."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from lb.l7.config import L7Config
from lb.l7.server import L7Server, Supervision, describe_exit
from lb.l7.table import RoutingTable
from tests.l7_backends import (
    Backend,
    Client,
    ThreadedBackends,
    forward_to,
    http_listener,
    routing_table,
    run,
    target_group,
)

LISTENER = http_listener(forward_to("g"))


def table_to(backend: Backend, version: int) -> RoutingTable:
    return routing_table(LISTENER, (target_group("g", backend),), version=version)


@asynccontextmanager
async def l7_server(table: RoutingTable, workers: int, supervision: Supervision | None = None) \
        -> AsyncIterator[L7Server]:
    server = L7Server(L7Config(workers=workers, connect_timeout=2.0), supervision)
    await server.start(table)
    try:
        yield server
    finally:
        await server.stop(grace=0.5)


async def until(check: Callable[[], object], timeout: float, interval: float = 0.01) -> float:
    """Seconds until check() is true (AssertionError after timeout)."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s")
        await asyncio.sleep(interval)
    return time.monotonic() - started


async def backends_serving(port: int, n: int, timeout: float = 2.0) -> list[bytes | None]:
    """`n` requests, a new connection each (so every worker gets some): who answered."""
    out = []
    for _ in range(n):
        async with await Client.open(port) as client:
            out.append((await asyncio.wait_for(client.request(), timeout)).header("x-backend"))
    return out


def replaced(server: L7Server, victim: int, workers: int) -> Callable[[], bool]:
    return lambda: len(pids := server.pids()) == workers and victim not in pids and all(
        row["state"] == "running" for row in server.workers())


def test_describe_exit() -> None:
    assert describe_exit(-9) == "was killed by SIGKILL"
    assert describe_exit(1) == "exited with code 1"
    assert describe_exit(None) == "exited (status unknown)"


def test_restart_delay_doubles_up_to_the_cap() -> None:
    policy = Supervision(backoff_first=1.0, backoff_max=30.0)
    assert [policy.restart_delay(n) for n in range(1, 9)] == [0, 1, 2, 4, 8, 16, 30, 30]


def test_a_killed_worker_is_replaced_at_once_with_the_current_table(caplog: pytest.LogCaptureFixture) -> None:
    with ThreadedBackends(("http", "p1"), ("http", "p2")) as (p1, p2):

        async def body() -> None:
            async with l7_server(table_to(p1, 1), workers=2) as server:
                port = server.addresses["web"][1]
                server.update(table_to(p2, 2))
                assert await server.settle() == []
                assert set(await backends_serving(port, 20)) == {b"p2"}
                counted = sum(sum(r[-1] for r in row["requests"]) for row in await server.stats())
                victim = server.pids()[0]
                os.kill(victim, signal.SIGKILL)
                took = await until(replaced(server, victim, 2), 5.0)
                assert took <= 1.0, f"replaced after {took:.2f} s"
                # The replacement serves the table of the last update, not the first one.
                assert set(await backends_serving(port, 20)) == {b"p2"}
                row = next(r for r in server.workers() if r["restarts"])
                assert row["last_exit"] == "was killed by SIGKILL" and row["state"] == "running"
                assert row["pid"] not in (victim, None) and row["started"] > time.time() - 5
                # Updates reach it, and the counters of the dead worker are still counted.
                server.update(table_to(p1, 3))
                assert await server.settle() == []
                assert set(await backends_serving(port, 20)) == {b"p1"}
                stats = await server.stats()
                assert sum(sum(r[-1] for r in row["requests"]) for row in stats) >= counted + 40
                assert [row["worker"] for row in stats] == [0, 1, None]  # None: the workers that exited

        with caplog.at_level(logging.INFO, logger="lb.l7"):
            run(body())
    assert any("SIGKILL" in r.getMessage() and "pid" in r.getMessage() and r.levelno == logging.ERROR
               for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_with_one_worker_its_listener_is_back_within_a_second() -> None:
    with ThreadedBackends(("http", "p1")) as (p1,):

        async def body() -> None:
            async with l7_server(table_to(p1, 1), workers=1) as server:
                port = server.addresses["web"][1]  # an ephemeral port: kept for the replacement
                (victim,) = server.pids()
                os.kill(victim, signal.SIGKILL)
                started = time.monotonic()
                while True:
                    try:
                        assert await backends_serving(port, 1, timeout=0.5) == [b"p1"]
                        break
                    except OSError:
                        assert time.monotonic() - started < 5.0
                        await asyncio.sleep(0.01)
                took = time.monotonic() - started
                assert took <= 1.0, f"the listener was back after {took:.2f} s"

        run(body())


def test_a_crash_loop_backs_off_and_routing_updates_go_on() -> None:
    policy = Supervision(backoff_first=0.4, stable_after=30.0)
    with ThreadedBackends(("http", "p1"), ("http", "p2")) as (p1, p2):

        async def body() -> None:
            async with l7_server(table_to(p1, 1), workers=2, supervision=policy) as server:
                port = server.addresses["web"][1]
                appeared = []
                for n in range(4):  # kill slot 0's worker as soon as each one serves
                    victim = next(r["pid"] for r in server.workers() if r["worker"] == 0)
                    killed = time.monotonic()
                    os.kill(victim, signal.SIGKILL)
                    if n == 3:  # the 4th death in a row waits 0.8 s: meanwhile ...
                        await until(lambda: server.workers()[0]["state"] == "restarting", 1.0)
                        assert server.workers()[0]["restart_in"] > 0.3
                        server.update(table_to(p2, 2))  # ... updates reach the other worker
                        problems = await server.settle()
                        assert len(problems) == 1 and "lb-l7-0 is restarting" in problems[0], problems
                        assert set(await backends_serving(port, 10)) == {b"p2"}
                    await until(replaced(server, victim, 2), 5.0)
                    appeared.append(time.monotonic() - killed)
                assert appeared[0] < 1.0
                for n, delay in ((1, 0.4), (2, 0.8), (3, 1.6)):  # 0, then 0.4 s doubling
                    assert delay - 0.05 <= appeared[n] <= delay + 1.5, appeared
                assert server.workers()[0]["restarts"] == 4 and server.workers()[1]["restarts"] == 0
                # The last replacement started with the table of the update made while it waited.
                assert set(await backends_serving(port, 20)) == {b"p2"}

        run(body(), timeout=40)


def test_a_stopped_worker_is_reported_then_killed_and_replaced(caplog: pytest.LogCaptureFixture) -> None:
    policy = Supervision(heartbeat=0.2, answer_timeout=0.5, kill_after=3.0)
    with ThreadedBackends(("http", "p1"), ("http", "p2")) as (p1, p2):

        async def body() -> int:
            async with l7_server(table_to(p1, 1), workers=2, supervision=policy) as server:
                port = server.addresses["web"][1]
                stuck = server.pids()[0]
                os.kill(stuck, signal.SIGSTOP)
                try:
                    started = time.monotonic()
                    server.update(table_to(p2, 2))  # returns at once
                    assert time.monotonic() - started < 0.1
                    problems = await server.settle()
                    assert time.monotonic() - started < 1.0
                    assert len(problems) == 1 and f"pid {stuck}" in problems[0], problems
                    started = time.monotonic()
                    stats = await server.stats()
                    assert time.monotonic() - started < 1.0
                    assert [row["answered"] for row in stats] == [False, True]
                    await until(lambda: server.workers()[0]["state"] == "unresponsive", 1.0)
                finally:
                    os.kill(stuck, signal.SIGCONT)
                # It answers again: the queued table and the late replies are sorted out.
                await until(lambda: server.workers()[0]["state"] == "running", 2.0)
                assert server.pids()[0] == stuck
                assert set(await backends_serving(port, 20)) == {b"p2"}
                stats = await server.stats()
                assert all(row["answered"] for row in stats[:2])
                assert sum(sum(r[-1] for r in row["requests"]) for row in stats) == 20
                # Stopped for good: killed after kill_after, and replaced.
                os.kill(stuck, signal.SIGSTOP)
                took = await until(replaced(server, stuck, 2), policy.kill_after + 3.0)
                assert policy.kill_after - 0.5 <= took <= policy.kill_after + 2.0
                assert server.workers()[0]["last_exit"] == "was killed by SIGKILL"
                assert set(await backends_serving(port, 20)) == {b"p2"}
                return stuck

        with caplog.at_level(logging.INFO, logger="lb.l7"):
            stuck = run(body(), timeout=40)
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"pid {stuck}) has not answered" in m and "killing it if still silent" in m for m in messages)
    assert any(f"pid {stuck}) answers again" in m for m in messages)
    assert any(f"pid {stuck}) has not answered" in m and "killing it (SIGKILL)" in m for m in messages)
    assert any("it had stopped answering" in m for m in messages), messages
