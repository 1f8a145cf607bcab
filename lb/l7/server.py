"""Running the L7 proxy: in worker processes, or inside the caller's loop.

:class:`L7Server` starts N worker processes ("spawn" context, ``uvloop.run``
in each), every one binding every HTTP listener with SO_REUSEPORT so the
kernel spreads connections across them. The parent talks to each worker over
a Pipe: a new routing table, a stats request, or stop. :func:`serve` runs one
worker in the caller's event loop, for tests and embedding.

A listener on port 0 gets one ephemeral port for all workers: the parent
binds a placeholder socket (SO_REUSEPORT, never listening, so it takes no
connections) to reserve the port until every worker has bound it too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import uvloop

from lb.l7.config import L7Config
from lb.l7.table import RoutingTable
from lb.l7.worker import Worker

log = logging.getLogger("lb.l7")


async def serve(
    table: RoutingTable, loop: asyncio.AbstractEventLoop | None = None, config: L7Config | None = None
) -> Worker:
    """Serve ``table`` in ``loop`` (default: the running one), one worker, no processes.

    Returns the started :class:`Worker`: ``worker.addresses`` has the bound
    (host, port) of each listener, ``await worker.update(table)`` swaps the
    table, ``worker.stats.snapshot()`` reads the counters, and
    ``await worker.stop(grace)`` ends it.
    """
    config = config or L7Config()
    worker = Worker(table, config, loop or asyncio.get_running_loop(), config.cookie_secret or os.urandom(32))
    await worker.start()
    return worker


class L7Server:
    """N worker processes serving the HTTP listeners of a routing table."""

    def __init__(self, config: L7Config | None = None) -> None:
        config = config or L7Config()
        # One stickiness key for all workers, so any of them accepts any cookie.
        self.config = dataclasses.replace(config, cookie_secret=config.cookie_secret or os.urandom(32))
        self._workers: list[tuple[multiprocessing.process.BaseProcess, multiprocessing.connection.Connection]] = []
        self._ports: dict[str, int] = {}  # listener on port 0 → the port chosen for it
        self.addresses: dict[str, tuple[str, int]] = {}
        # One conversation at a time on the workers' pipes (update and stats
        # may be called from different threads); replies are matched to their
        # request, so a late answer to a timed-out one is skipped, never taken
        # for the next one's.
        self._pipes = threading.Lock()

    def start(self, table: RoutingTable) -> None:
        """Start the workers; returns once every one has bound every listener."""
        if self._workers:
            raise RuntimeError("already started")
        placeholders = self._reserve_ports(table)
        table = self._resolved(table)
        ctx = multiprocessing.get_context("spawn")
        try:
            for index in range(self.config.worker_count()):
                parent, child = ctx.Pipe()
                process = ctx.Process(
                    target=_worker_main, args=(child, table, self.config), name=f"lb-l7-{index}", daemon=True
                )
                process.start()
                child.close()
                self._workers.append((process, parent))
            for started, pipe in self._workers:
                reply = _receive(pipe, self.config.ready_timeout, started)
                if reply[0] != "ready":
                    raise OSError(f"{started.name}: {reply[1]}")
                self.addresses = reply[1]
        except BaseException:
            self._kill()
            raise
        finally:
            for sock in placeholders:
                sock.close()

    def update(self, table: RoutingTable) -> None:
        """Push ``table`` to every worker; returns once all have swapped it in.

        Listeners that are new are bound, those that left are closed; their
        connections stay until they end.
        """
        with self._pipes:
            placeholders = self._reserve_ports(table)
            try:
                payload = pickle.dumps(("table", self._resolved(table)))
                for _, pipe in self._workers:
                    pipe.send_bytes(payload)
                for process, pipe in self._workers:
                    reply = _receive(pipe, self.config.ready_timeout, process,
                                     lambda r: r[0] == "error" or (r[0] == "updated" and r[1] == table.version))
                    if reply[0] != "updated":
                        raise RuntimeError(f"{process.name}: {reply[1]}")
                    self.addresses = reply[2]
            finally:
                for sock in placeholders:
                    sock.close()

    def stats(self) -> list[dict[str, Any]]:
        """Each worker's :meth:`WorkerStats.snapshot`."""
        with self._pipes:
            for _, pipe in self._workers:
                pipe.send(("stats",))
            return [_receive(pipe, 5.0, process, lambda r: r[0] == "stats")[1] for process, pipe in self._workers]

    def stop(self, grace: float = 30.0) -> None:
        """Stop accepting, finish requests in flight for up to ``grace`` s, exit."""
        for _, pipe in self._workers:
            try:
                pipe.send(("stop", grace))
            except OSError:
                pass
        for process, _ in self._workers:
            process.join(grace + 5.0)
        self._kill()

    def pids(self) -> list[int]:
        return [process.pid for process, _ in self._workers if process.pid is not None]

    def _kill(self) -> None:
        for process, pipe in self._workers:
            if process.is_alive():
                process.terminate()
                process.join(2.0)
            if process.is_alive():
                process.kill()
                process.join()
            pipe.close()
        self._workers.clear()

    def _reserve_ports(self, table: RoutingTable) -> list[socket.socket]:
        sockets = []
        try:
            for listener in table.listeners:
                if listener.port == 0 and listener.name not in self._ports:
                    family = socket.AF_INET6 if listener.address.version == 6 else socket.AF_INET
                    sock = socket.socket(family, socket.SOCK_STREAM)
                    sockets.append(sock)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                    sock.bind((str(listener.address), 0))
                    self._ports[listener.name] = sock.getsockname()[1]
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        return sockets

    def _resolved(self, table: RoutingTable) -> RoutingTable:
        listeners = tuple(
            dataclasses.replace(listener, port=self._ports[listener.name])
            if listener.port == 0 and listener.name in self._ports
            else listener
            for listener in table.listeners
        )
        return dataclasses.replace(table, listeners=listeners)


def _receive(
    pipe: multiprocessing.connection.Connection,
    timeout: float,
    process: multiprocessing.process.BaseProcess,
    wanted: Callable[[tuple[Any, ...]], bool] = lambda reply: True,
) -> tuple[Any, ...]:
    """The next reply `wanted` accepts; others (late answers to requests that
    timed out) are dropped."""
    deadline = time.monotonic() + timeout
    while True:
        if not pipe.poll(max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"{process.name} did not answer within {timeout} s")
        try:
            reply: tuple[Any, ...] = pipe.recv()
        except EOFError:
            raise RuntimeError(f"{process.name} exited (code {process.exitcode})") from None
        if wanted(reply):
            return reply
        log.warning("%s: dropped a late reply %r", process.name, reply[0])


# --- inside a worker process ---------------------------------------------------------


def _worker_main(pipe: multiprocessing.connection.Connection, table: RoutingTable, config: L7Config) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    _setup_logging(config)
    uvloop.run(_worker(pipe, table, config))


async def _worker(pipe: multiprocessing.connection.Connection, table: RoutingTable, config: L7Config) -> None:
    loop = asyncio.get_running_loop()
    worker = Worker(table, config, loop, config.cookie_secret)
    try:
        await worker.start()
    except OSError as exc:
        pipe.send(("error", str(exc)))
        return
    pipe.send(("ready", worker.addresses))
    # What startup built lives as long as the worker: keep it out of the
    # collector's way, and collect young objects less often (our per-request
    # cycles are broken by hand; refcounting frees nearly everything).
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)
    finished = loop.create_future()
    tasks: set[asyncio.Task[None]] = set()

    def spawn(coro: Any) -> None:
        task = loop.create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def update(new: RoutingTable) -> None:
        try:
            await worker.update(new)
            pipe.send(("updated", new.version, worker.addresses))
        except Exception as exc:  # a bad table must not kill the worker
            log.exception("routing table %d rejected", new.version)
            pipe.send(("error", f"{type(exc).__name__}: {exc}"))

    async def stop(grace: float) -> None:
        loop.remove_reader(pipe.fileno())
        await worker.stop(grace)
        if not finished.done():
            finished.set_result(None)

    def on_message() -> None:
        try:
            message = pickle.loads(pipe.recv_bytes())
        except (EOFError, OSError):  # the parent is gone
            spawn(stop(config.ready_timeout))
            return
        kind = message[0]
        if kind == "table":
            spawn(update(message[1]))
        elif kind == "stats":
            pipe.send(("stats", worker.stats.snapshot()))
        elif kind == "stop":
            spawn(stop(message[1]))

    loop.add_reader(pipe.fileno(), on_message)
    loop.add_signal_handler(signal.SIGTERM, lambda: spawn(stop(config.ready_timeout)))
    await finished


def _setup_logging(config: L7Config) -> None:
    errors = logging.StreamHandler(sys.stderr)
    errors.setFormatter(logging.Formatter("%(asctime)s %(processName)s %(name)s %(levelname)s %(message)s"))
    logging.getLogger("lb.l7").addHandler(errors)
    logging.getLogger("lb.l7").setLevel(logging.WARNING)
    if config.access_log is None:
        return
    access = logging.getLogger("lb.access")
    handler: logging.Handler
    if config.access_log == "-":
        handler = logging.StreamHandler(sys.stderr)
    else:
        handler = logging.FileHandler(config.access_log)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    access.propagate = False
