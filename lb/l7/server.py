"""Running the L7 proxy: supervised worker processes, or one worker in the caller's loop.

:class:`L7Server` starts N worker processes ("spawn" context, ``uvloop.run``
in each), every one binding every HTTP listener with SO_REUSEPORT so the
kernel spreads connections across them, and supervises them from the
caller's event loop, as nginx's master or gunicorn's arbiter do. It talks to
each worker over a :class:`~lb.l7.channel.Channel` (a socketpair; nothing
ever blocks the loop): the routing table, stats, stop. :func:`serve` runs
one worker in the caller's event loop, for tests and embedding.

Supervision (the numbers are :class:`Supervision`'s defaults):

- A worker's exit is seen at once: a pidfd per worker is watched on the
  loop (the channel's EOF backs it up). The exit is logged with its signal
  or exit code, and a replacement starts with the current routing table.
  The other workers serve and take routing updates meanwhile; the
  listeners' ports stay reserved (see below) so a replacement can always
  bind them.
- A crash loop backs off: a worker that dies within 10 s of its start (or
  before it was ready) is a quick death; the first is replaced at once, the
  next ones after 1, 2, 4 ... 30 s. A worker that lived 10 s resets it.
- Every call to a worker has a timeout and none blocks the loop. Each worker
  is asked for its stats every second (the heartbeat; it also keeps the
  cached counters fresh). A worker with a request unanswered for 2 s is
  reported ("unresponsive": logged, in :meth:`L7Server.workers`, in
  :meth:`L7Server.settle`'s answer), and one silent for 10 s is killed
  (SIGKILL) and replaced: stopped or wedged, its share of the listeners'
  connections would wait on it forever.
- Counters survive a worker: :meth:`L7Server.stats` adds the last snapshot
  of every worker that exited to the live ones', so Prometheus counters do
  not go backwards (at most the dead worker's last heartbeat interval is
  lost).

A listener on port 0 gets one ephemeral port for all workers: the parent
binds a placeholder socket (SO_REUSEPORT, never listening, so it takes no
connections) and keeps it while the listener exists, so the port stays
ours even when every worker is gone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import itertools
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from functools import partial
from typing import Any

import uvloop

from lb import rlimits, tls
from lb.l7.channel import Channel, ChannelClosed, open_channel
from lb.l7.config import L7Config
from lb.l7.stats import WorkerStats
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


@dataclass(frozen=True)
class Supervision:
    """How :class:`L7Server` watches its workers (seconds)."""

    heartbeat: float = 1.0  # each worker is asked for its stats this often
    answer_timeout: float = 2.0  # a request unanswered this long: the worker is reported unresponsive
    kill_after: float = 10.0  # ... this long: it is killed (SIGKILL) and replaced
    stable_after: float = 10.0  # a worker that lived this long ends a crash loop
    backoff_first: float = 1.0  # the delay before the second quick restart in a row; doubles from there
    backoff_max: float = 30.0

    def restart_delay(self, quick_deaths: int) -> float:
        """Before restarting a worker after its `quick_deaths`-th quick death in a row."""
        if quick_deaths <= 1:
            return 0.0
        return float(min(self.backoff_max, self.backoff_first * 2 ** (quick_deaths - 2)))


class WorkerGone(RuntimeError):
    """The worker exited (or lost its channel) before answering."""


class WorkerError(RuntimeError):
    """The worker answered with an error."""


def describe_exit(code: int | None) -> str:
    """"was killed by SIGKILL", "exited with code 1", ... for a process exit code."""
    if code is None:
        return "exited (status unknown)"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class _Slot:
    """One of the N worker places: its current process and its history."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.name = f"lb-l7-{index}"
        self.proc: _Proc | None = None
        self.restarts = 0  # replacements started
        self.quick_deaths = 0  # in a row (see Supervision)
        self.last_exit: str | None = None
        self.last_exit_at: float | None = None
        self.restart_at: float | None = None  # monotonic, while a restart waits
        self.restart_timer: asyncio.TimerHandle | None = None


class _Proc:
    """One worker process, from its spawn to its reaping."""

    def __init__(self, slot: _Slot, process: multiprocessing.process.BaseProcess,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.slot = slot
        self.process = process
        self.pid: int = process.pid or 0
        self.label = f"L7 worker {slot.name} (pid {self.pid})"
        self.channel: Channel | None = None
        self.pidfd: int | None = None
        self.pending: dict[int, tuple[asyncio.Future[Any], float]] = {}  # request id → (future, sent at)
        self.started = time.time()
        self.started_mono = time.monotonic()
        self.state = "starting"  # running, unresponsive, stopping
        self.ready = False
        self.killed = False  # by us, for its silence
        self.gone = False  # reaped (or given up on)
        self.snapshot: dict[str, Any] | None = None  # its last stats
        self.exited: asyncio.Future[int | None] = loop.create_future()

    def silent_for(self, now: float) -> float:
        """Seconds since its oldest unanswered request was sent."""
        return max((now - sent for _, sent in self.pending.values()), default=0.0)


def _consume(future: asyncio.Future[Any]) -> None:
    """Mark a request's outcome seen: nobody may wait for it any more."""
    if not future.cancelled():
        future.exception()


class L7Server:
    """N supervised worker processes serving the HTTP listeners of a routing table.

    Lives on the event loop that called :meth:`start`; call everything from it.
    """

    def __init__(self, config: L7Config | None = None, supervision: Supervision | None = None) -> None:
        config = config or L7Config()
        # One stickiness key for all workers, so any of them accepts any cookie.
        self.config = dataclasses.replace(config, cookie_secret=config.cookie_secret or os.urandom(32))
        self.supervision = supervision or Supervision()
        self.addresses: dict[str, tuple[str, int]] = {}
        self._ctx = multiprocessing.get_context("spawn")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots: list[_Slot] = []
        self._table: RoutingTable | None = None  # the current one, resolved: what a replacement starts with
        self._acks: tuple[int, dict[str, tuple[_Proc, asyncio.Future[Any]]]] = (0, {})  # of the last update
        self._ports: dict[str, int] = {}  # listener on port 0 → the port chosen for it
        self._placeholders: dict[str, socket.socket] = {}
        self._retired: dict[str, Any] | None = None  # the summed last stats of the workers that exited
        self._ids = itertools.count(1)
        # TLS session tickets: one key for every worker, so a ticket resumes on
        # any of them; replaced every config.ticket_key_rotation seconds.
        self._ticket_key = os.urandom(tls.TICKET_KEY_BYTES)
        self._ticket_key_at = time.monotonic()
        self._tick: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._running = False  # started, not stopping: exits are restarted
        self._stopping = False

    # --- lifetime -------------------------------------------------------------------

    async def start(self, table: RoutingTable) -> None:
        """Start the workers; returns once every one has bound every listener."""
        if self._slots:
            raise RuntimeError("already started")
        self._loop = asyncio.get_running_loop()
        self._slots = [_Slot(i) for i in range(self.config.worker_count())]
        try:
            self._reserve_ports(table)
            self._table = self._resolved(table)
            results = await asyncio.gather(*(self._launch(slot) for slot in self._slots), return_exceptions=True)
            failed = [r for r in results if isinstance(r, BaseException)]
            if failed:
                raise failed[0]
        except BaseException:
            await self._kill_all()
            self._slots.clear()
            self._close_placeholders()
            raise
        self._running = True
        self._tick = self._loop.call_later(self.supervision.heartbeat, self._heartbeat)

    def stopping(self) -> None:
        """No more replacements from now on: call it as soon as the stop is
        decided (a worker that dies meanwhile, say to the OOM killer, stays dead)."""
        self._running, self._stopping = False, True

    async def stop(self, grace: float = 30.0) -> None:
        """Stop accepting, finish requests in flight for up to ``grace`` s, exit."""
        self.stopping()
        procs = []
        for slot in self._slots:
            if slot.restart_timer is not None:
                slot.restart_timer.cancel()
                slot.restart_timer = None
            if slot.proc is not None:
                procs.append(slot.proc)
        for proc in procs:
            if proc.state == "unresponsive":  # it would not finish anything: do not wait for it
                self._kill(proc)
            proc.state = "stopping"
            try:
                if proc.channel is not None:
                    proc.channel.send(("stop", 0, grace))
            except ChannelClosed:
                pass
        if procs:  # the heartbeat goes on meanwhile: one silent for kill_after is killed
            await asyncio.wait([p.exited for p in procs], timeout=grace + 5.0)
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        await self._kill_all()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._slots.clear()
        self._close_placeholders()

    # --- talking to the workers -------------------------------------------------------

    def update(self, table: RoutingTable) -> None:
        """Send ``table`` to every worker; returns at once (see :meth:`settle`).

        A worker that is restarting starts with it. Listeners that are new
        are bound, those that left are closed; their connections stay until
        they end. A worker that rejects it is logged and keeps its table.
        """
        if not self._slots or self._stopping:  # nothing to update (a reconcile racing the daemon's stop)
            return
        self._reserve_ports(table)
        resolved = self._table = self._resolved(table)
        acks = {}
        for slot in self._slots:
            proc = slot.proc
            if proc is None or proc.gone or proc.state == "stopping":
                continue
            future = self._request(proc, "table", resolved)
            future.add_done_callback(partial(self._updated, proc, resolved.version))
            acks[slot.name] = (proc, future)
        self._acks = (resolved.version, acks)
        for name in [n for n in self._placeholders if n not in {li.name for li in table.listeners}]:
            self._placeholders.pop(name).close()
            self._ports.pop(name, None)

    async def settle(self, timeout: float | None = None) -> list[str]:
        """Wait up to ``timeout`` s (the answer timeout) for every worker to
        confirm the last :meth:`update`; returns what went wrong, one line a worker."""
        timeout = self.supervision.answer_timeout if timeout is None else timeout
        version, acks = self._acks
        if acks:
            await asyncio.wait([future for _, future in acks.values()], timeout=timeout)
        problems = []
        for proc, future in acks.values():
            if not future.done():
                problems.append(f"{proc.label} has not confirmed routing table {version} within {timeout:g} s "
                                f"(stopped or wedged?): it takes it when it answers, or is replaced after "
                                f"{self.supervision.kill_after:g} s of silence")
            elif future.cancelled() or isinstance(future.exception(), WorkerGone):
                problems.append(f"{proc.label} exited; its replacement starts with routing table {version}")
            elif future.exception() is not None:
                problems.append(f"{proc.label} rejected routing table {version}: {future.exception()}")
        problems += [f"L7 worker {slot.name} is restarting; it starts with routing table {version}"
                     for slot in self._slots if slot.name not in acks and slot.proc is None]
        return problems

    async def stats(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """Each worker's :meth:`Worker.snapshot` plus its :meth:`workers` row and
        ``answered`` (False: it did not answer within ``timeout`` s, the answer
        timeout; its last snapshot stands in). A last row with ``worker`` None
        holds the summed counters of the workers that exited."""
        timeout = self.supervision.answer_timeout if timeout is None else timeout
        asked = {}
        for slot in self._slots:
            proc = slot.proc
            if proc is not None and proc.ready and not proc.gone:
                asked[slot.index] = (proc, self._ask_stats(proc))
        if asked:
            await asyncio.wait([future for _, future in asked.values()], timeout=timeout)
        rows = []
        for slot, row in zip(self._slots, self.workers()):
            proc = slot.proc  # the one asked may have exited meanwhile: its counters are in _retired now
            asked_proc, future = asked.get(slot.index, (None, None))
            answered = asked_proc is proc and future is not None and future.done() and not future.cancelled() \
                and not future.exception()
            snapshot = proc.snapshot if proc is not None and proc.snapshot is not None else _EMPTY
            rows.append({**snapshot, **row, "answered": answered})
        if self._retired is not None:
            rows.append({**self._retired, "worker": None, "answered": False})
        return rows

    def workers(self) -> list[dict[str, Any]]:
        """One row a worker: {"worker" (index), "name", "pid", "state" (starting,
        running, unresponsive, stopping, restarting), "started" (epoch s),
        "restarts", "restart_in" (s, while restarting), "last_exit", "last_exit_at"}."""
        now = time.monotonic()
        rows = []
        for slot in self._slots:
            proc = slot.proc
            rows.append({
                "worker": slot.index,
                "name": slot.name,
                "pid": proc.pid if proc is not None else None,
                "state": proc.state if proc is not None else "restarting",
                "started": proc.started if proc is not None else None,
                "restarts": slot.restarts,
                "restart_in": None if slot.restart_at is None else round(max(0.0, slot.restart_at - now), 1),
                "last_exit": slot.last_exit,
                "last_exit_at": slot.last_exit_at,
            })
        return rows

    async def reopen_access_logs(self, timeout: float | None = None) -> list[str]:
        """Every worker reopens its access log (SIGUSR1 to the daemon, for
        logrotate), after writing what it buffered; waits up to ``timeout`` s
        (the answer timeout) for them. Returns the workers that did not answer."""
        timeout = self.supervision.answer_timeout if timeout is None else timeout
        asked = {proc.label: self._request(proc, "reopen") for proc in
                 (slot.proc for slot in self._slots) if proc is not None and proc.ready and not proc.gone}
        if asked:
            await asyncio.wait(asked.values(), timeout=timeout)
        return [f"{label} did not reopen its access log within {timeout:g} s" for label, future in asked.items()
                if not future.done() or future.cancelled() or future.exception() is not None]

    def rotate_ticket_key(self) -> None:
        """A new TLS session ticket key for every worker (and every replacement):
        tickets made with the old one get a full handshake from now on."""
        self._ticket_key = os.urandom(tls.TICKET_KEY_BYTES)
        self._ticket_key_at = time.monotonic()
        for slot in self._slots:
            proc = slot.proc
            if proc is not None and proc.ready and not proc.gone:
                self._request(proc, "ticket_key", self._ticket_key)

    def pids(self) -> list[int]:
        return [slot.proc.pid for slot in self._slots if slot.proc is not None and not slot.proc.gone]

    def _request(self, proc: _Proc, kind: str, *args: Any) -> asyncio.Future[Any]:
        assert self._loop is not None
        future: asyncio.Future[Any] = self._loop.create_future()
        future.add_done_callback(_consume)
        if proc.gone or proc.channel is None:
            future.set_exception(WorkerGone(f"{proc.label} is gone"))
            return future
        ident = next(self._ids)
        try:
            proc.channel.send((kind, ident, *args))
        except ChannelClosed:
            future.set_exception(WorkerGone(f"{proc.label} is gone"))
            return future
        proc.pending[ident] = (future, time.monotonic())
        return future

    def _ask_stats(self, proc: _Proc) -> asyncio.Future[Any]:
        def keep(future: asyncio.Future[Any]) -> None:
            if not future.cancelled() and future.exception() is None:
                proc.snapshot = future.result()

        future = self._request(proc, "stats")
        future.add_done_callback(keep)
        return future

    def _on_message(self, proc: _Proc, message: tuple[str, int, Any]) -> None:
        status, ident, payload = message
        entry = proc.pending.pop(ident, None)
        if proc.state == "unresponsive" and proc.silent_for(time.monotonic()) < self.supervision.answer_timeout:
            proc.state = "running"
            log.warning("%s answers again", proc.label)
        if entry is None or entry[0].done():  # nobody waits for it any more
            return
        if status == "ok":
            entry[0].set_result(payload)
        else:
            entry[0].set_exception(WorkerError(str(payload)))

    def _updated(self, proc: _Proc, version: int, future: asyncio.Future[Any]) -> None:
        if future.cancelled() or isinstance(future.exception(), WorkerGone):
            return
        if future.exception() is not None:
            log.error("%s rejected routing table %d: %s", proc.label, version, future.exception())
            return
        self.addresses = future.result()

    # --- processes ------------------------------------------------------------------

    async def _launch(self, slot: _Slot) -> _Proc:
        """Spawn slot's worker with the current table; returns once it serves."""
        assert self._loop is not None and self._table is not None
        parent, child = socket.socketpair()
        try:
            process = self._ctx.Process(target=_worker_main, args=(child, self.config), name=slot.name, daemon=True)
            process.start()  # fork+exec, and a few hundred bytes into a pipe: does not wait for the child
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        proc = slot.proc = _Proc(slot, process, self._loop)
        self._watch(proc)
        try:
            proc.channel = await open_channel(parent, partial(self._on_message, proc),
                                              partial(self._channel_lost, proc))
        except BaseException:
            parent.close()
            self._kill(proc)
            raise
        try:
            self.addresses = await asyncio.wait_for(self._request(proc, "start", self._table, self._ticket_key),
                                                    self.config.ready_timeout)
        except WorkerError as exc:  # it could not bind: it exits by itself
            raise OSError(f"{slot.name}: {exc}") from None
        except TimeoutError:
            self._kill(proc)
            raise TimeoutError(f"{proc.label} did not start within {self.config.ready_timeout:g} s") from None
        proc.ready = True
        if proc.state == "starting":
            proc.state = "running"
        return proc

    def _watch(self, proc: _Proc) -> None:
        """Learn of proc's exit the moment it happens: its pidfd turns readable."""
        assert self._loop is not None
        try:
            proc.pidfd = os.pidfd_open(proc.pid)
        except OSError:  # no pidfds (Linux < 5.3), or already reaped: the heartbeat polls instead
            return
        self._loop.add_reader(proc.pidfd, self._reap, proc)

    def _channel_lost(self, proc: _Proc) -> None:
        """Its end closed: it is exiting (the pidfd tells when), or broken (killed soon)."""
        if proc.gone or self._loop is None:
            return
        for future, _ in proc.pending.values():
            if not future.done():
                future.set_exception(WorkerGone(f"{proc.label} closed its channel"))
        proc.pending.clear()
        self._loop.call_later(1.0, self._kill_if_running, proc)

    def _kill_if_running(self, proc: _Proc) -> None:
        if not proc.gone:
            if proc.process.exitcode is not None:
                self._reap(proc)
            else:
                log.error("%s lost its channel but still runs: killing it", proc.label)
                self._kill(proc)

    def _kill(self, proc: _Proc) -> None:
        """SIGKILL, through the pidfd when there is one (never a recycled pid)."""
        if proc.gone:
            return
        try:
            if proc.pidfd is not None:
                signal.pidfd_send_signal(proc.pidfd, signal.SIGKILL)
            else:
                proc.process.kill()
        except ProcessLookupError:
            pass

    async def _kill_all(self) -> None:
        procs = [slot.proc for slot in self._slots if slot.proc is not None and not slot.proc.gone]
        for proc in procs:
            self._kill(proc)
        if procs:
            await asyncio.wait([p.exited for p in procs], timeout=5.0)
        for proc in procs:
            if not proc.gone:  # not seen exiting (no pidfd): wait for it here
                proc.process.join(1.0)
                self._reap(proc)

    def _reap(self, proc: _Proc) -> None:
        """proc exited: collect its status, log it, and (while running) start a replacement."""
        assert self._loop is not None
        if proc.pidfd is not None:
            self._loop.remove_reader(proc.pidfd)
            os.close(proc.pidfd)
            proc.pidfd = None
        if proc.gone:
            return
        proc.gone = True
        code = proc.process.exitcode
        if proc.channel is not None:
            proc.channel.close()
        for future, _ in proc.pending.values():
            if not future.done():
                future.set_exception(WorkerGone(f"{proc.label} {describe_exit(code)}"))
        proc.pending.clear()
        proc.exited.set_result(code)
        if code is not None:
            proc.process.close()  # its sentinel pipe: a crash loop must not leak descriptors
        if proc.snapshot is not None:
            self._retired = merge_snapshots(self._retired, proc.snapshot)
        slot = proc.slot
        if slot.proc is proc:
            slot.proc = None
        if not self._running:  # starting (start() reports it) or stopping
            if self._stopping and proc.state != "stopping":
                log.warning("%s %s while stopping", proc.label, describe_exit(code))
            return
        lived = time.monotonic() - proc.started_mono
        slot.last_exit, slot.last_exit_at = describe_exit(code), time.time()
        quick = not proc.ready or lived < self.supervision.stable_after
        slot.quick_deaths = slot.quick_deaths + 1 if quick else 1
        delay = self.supervision.restart_delay(slot.quick_deaths)
        why = " (it had stopped answering)" if proc.killed else ""
        when = "now" if delay == 0 else f"in {delay:g} s ({slot.quick_deaths} quick exits in a row)"
        log.error("%s %s after %.1f s%s; starting a replacement %s", proc.label, slot.last_exit, lived, why, when)
        self._schedule_restart(slot, delay)

    def _schedule_restart(self, slot: _Slot, delay: float) -> None:
        assert self._loop is not None
        slot.restart_at = time.monotonic() + delay
        slot.restart_timer = self._loop.call_later(delay, lambda: self._spawn(self._relaunch(slot)))

    async def _relaunch(self, slot: _Slot) -> None:
        slot.restart_timer = slot.restart_at = None
        if not self._running:
            return
        slot.restarts += 1
        try:
            proc = await self._launch(slot)
        except Exception as exc:
            if not self._running:
                return
            log.error("L7 worker %s: the replacement did not start: %s", slot.name, exc)
            if slot.proc is None and slot.restart_timer is None:  # no process whose exit would retry
                slot.quick_deaths += 1
                self._schedule_restart(slot, max(1.0, self.supervision.restart_delay(slot.quick_deaths)))
            return
        assert self._table is not None
        log.warning("%s replaces the one that exited (restart %d of %s), serving routing table %d", proc.label,
                    slot.restarts, slot.name, self._table.version)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _heartbeat(self) -> None:
        """Every second: ask each worker for its stats; report, then kill, the silent ones."""
        assert self._loop is not None
        self._tick = self._loop.call_later(self.supervision.heartbeat, self._heartbeat)
        now = time.monotonic()
        if now - self._ticket_key_at >= self.config.ticket_key_rotation:
            self.rotate_ticket_key()
        for slot in self._slots:
            proc = slot.proc
            if proc is None or proc.gone:
                continue
            if proc.pidfd is None and proc.process.exitcode is not None:
                self._reap(proc)
                continue
            if not proc.ready:
                continue
            if not proc.pending:
                self._ask_stats(proc)
            silent = proc.silent_for(now)
            if silent >= self.supervision.kill_after and not proc.killed:
                proc.killed = True
                log.error("%s has not answered for %.0f s: killing it (SIGKILL)", proc.label, silent)
                self._kill(proc)
            elif silent >= self.supervision.answer_timeout and proc.state == "running":
                proc.state = "unresponsive"
                log.warning("%s has not answered for %.1f s (stopped or wedged?); killing it if still silent "
                            "after %g s", proc.label, silent, self.supervision.kill_after)

    # --- ports ----------------------------------------------------------------------

    def _reserve_ports(self, table: RoutingTable) -> None:
        for listener in table.listeners:
            if listener.port == 0 and listener.name not in self._ports:
                family = socket.AF_INET6 if listener.address.version == 6 else socket.AF_INET
                sock = socket.socket(family, socket.SOCK_STREAM)
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                    sock.bind((str(listener.address), 0))
                except BaseException:
                    sock.close()
                    raise
                self._placeholders[listener.name] = sock
                self._ports[listener.name] = sock.getsockname()[1]

    def _close_placeholders(self) -> None:
        for sock in self._placeholders.values():
            sock.close()
        self._placeholders.clear()

    def _resolved(self, table: RoutingTable) -> RoutingTable:
        listeners = tuple(
            dataclasses.replace(listener, port=self._ports[listener.name])
            if listener.port == 0 and listener.name in self._ports
            else listener
            for listener in table.listeners
        )
        return dataclasses.replace(table, listeners=listeners)


_EMPTY = WorkerStats().snapshot()


def merge_snapshots(total: dict[str, Any] | None, snapshot: dict[str, Any]) -> dict[str, Any]:
    """The counters of two :meth:`Worker.snapshot` results added up (gauges dropped)."""
    if total is None:
        total = {"requests": [], "upstream_latency": {**snapshot["upstream_latency"], "series": []},
                 "connections": 0}
    requests: dict[tuple[Any, ...], int] = {tuple(row[:-1]): row[-1] for row in total["requests"]}
    for *key, count in snapshot["requests"]:
        requests[tuple(key)] = requests.get(tuple(key), 0) + count
    series: dict[tuple[str, str], tuple[list[int], float]] = {
        (group, target): (list(counts), total_s) for group, target, counts, total_s in total["upstream_latency"]["series"]
    }
    for group, target, counts, total_s in snapshot["upstream_latency"]["series"]:
        mine = series.get((group, target))
        series[(group, target)] = (
            ([a + b for a, b in zip(mine[0], counts)], mine[1] + total_s) if mine is not None else (list(counts), total_s)
        )
    merged = {
        "requests": [(*key, count) for key, count in requests.items()],
        "upstream_latency": {**total["upstream_latency"],
                             "series": [(group, target, counts, s) for (group, target), (counts, s) in series.items()]},
        "connections": 0,
    }
    for counter in ("shed", "refused", "access_log_lost"):
        merged[counter] = total.get(counter, 0) + snapshot.get(counter, 0)
    return merged


# --- inside a worker process ---------------------------------------------------------


def _worker_main(sock: socket.socket, config: L7Config) -> None:
    # The parent decides when we stop, and with which grace: systemd sends
    # SIGTERM to every process of the unit, and a worker that left on its own
    # would race the parent's stop (and be replaced). A parent that is gone
    # closes our channel: we stop then.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Likewise SIGUSR1 (logrotate's "reopen your logs"): the parent passes it on
    # as a message, and `systemctl kill -s USR1` (every process of the unit)
    # must not end a worker.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    _setup_logging()
    rlimits.raise_nofile()  # the daemon did too; not every parent does (lb.rlimits)
    if not uvloop.run(_worker(sock, config)):
        sys.exit(1)  # could not start: the parent logs why


async def _worker(sock: socket.socket, config: L7Config) -> bool:
    """Serve what the parent sends until told to stop (or the parent is gone).
    False if the listeners could not be bound."""
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[bool] = loop.create_future()
    tasks: set[asyncio.Task[None]] = set()
    serialized = asyncio.Lock()  # start and table updates, one at a time, in order
    worker: Worker | None = None

    def spawn(coro: Coroutine[Any, Any, None]) -> None:
        task = loop.create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def reply(ident: int, status: str, payload: Any) -> None:
        try:
            channel.send((status, ident, payload))
        except ChannelClosed:
            pass

    async def start(ident: int, table: RoutingTable, ticket_key: bytes) -> None:
        nonlocal worker
        async with serialized:
            started = Worker(table, config, loop, config.cookie_secret)
            started.ticket_key = ticket_key
            try:
                await started.start()
            except OSError as exc:
                reply(ident, "error", str(exc))
                if not finished.done():
                    finished.set_result(False)
                return
            worker = started
            reply(ident, "ok", started.addresses)
            # What startup built lives as long as the worker: keep it out of the
            # collector's way, and collect young objects less often (our per-request
            # cycles are broken by hand; refcounting frees nearly everything).
            gc.freeze()
            gc.set_threshold(10_000, 20, 20)

    async def update(ident: int, table: RoutingTable) -> None:
        async with serialized:
            try:
                if worker is None:
                    raise RuntimeError("not started")
                await worker.update(table)
                reply(ident, "ok", worker.addresses)
            except Exception as exc:  # a bad table must not kill the worker
                log.exception("routing table %d rejected", table.version)
                reply(ident, "error", f"{type(exc).__name__}: {exc}")

    async def stop(grace: float) -> None:
        async with serialized:
            if worker is not None:
                await worker.stop(grace)
        if not finished.done():
            finished.set_result(True)

    def on_message(message: tuple[Any, ...]) -> None:
        kind, ident = message[0], message[1]
        if kind == "start":
            spawn(start(ident, message[2], message[3]))
        elif kind == "table":
            spawn(update(ident, message[2]))
        elif kind == "stats":
            reply(ident, "ok", worker.snapshot() if worker is not None else _EMPTY)
        elif kind == "reopen":
            if worker is not None:
                worker.reopen_access_log()
        elif kind == "ticket_key":
            if worker is not None:
                worker.set_ticket_key(message[2])
            reply(ident, "ok", None)
        elif kind == "stop":
            spawn(stop(message[2]))

    def parent_gone() -> None:
        spawn(stop(config.ready_timeout))

    sock.setblocking(False)
    channel = await open_channel(sock, on_message, parent_gone)
    try:
        return await finished
    finally:
        await channel.flush_and_close()  # the last answer (an error at start) reaches the parent


def _setup_logging() -> None:
    """The worker's own log (warnings and errors) to standard error; the access
    log is not a `logging` log (lb.l7.access_log)."""
    errors = logging.StreamHandler(sys.stderr)
    errors.setFormatter(logging.Formatter("%(asctime)s %(processName)s %(name)s %(levelname)s %(message)s"))
    logging.getLogger("lb.l7").addHandler(errors)
    logging.getLogger("lb.l7").setLevel(logging.WARNING)
