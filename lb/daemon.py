"""`lb up`: wire config, data plane, L7 workers, health checks and controller.

    run(config, config_path)    the foreground daemon (systemd Type=notify)
    SIGHUP / `lb reload`        re-read the config: all or nothing
    SIGUSR1                     the L7 workers reopen the access log (logrotate)
    SIGTERM / SIGINT            L7 finishes in-flight requests, then exit; the XDP
                                program and pinned maps stay, so L4 flows go on
    `lb down`                   detach, unpin, remove the addresses lb added

A new `lb up` adopts what the last one left: the loader reuses the pinned maps, the
program is swapped in atomically on each interface, and the data plane
reads target and VIP ids back from the maps, so established L4 flows never
notice that the control plane was gone.

Only the wiring is here. The parts: lb.hostnet (netns, addresses, interfaces),
lb.dataplane (program, pinned maps), lb.runstate (/run/lb), lb.admin_commands,
lb.metrics, lb.rlimits (open files), lb.systemd (sd_notify), lb.health, lb.controller
and lb.l7.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

import uvloop

from lb import admin, metrics, rlimits, runstate
from lb import config as configmod
from lb import netlink as nl
from lb.admin_commands import AdminCommands
from lb.bgp import speaker as bgp
from lb.controller import Controller
from lb.dataplane.dataplane import Dataplane
from lb.dataplane.loader import Attachment, LoaderError, Program, detach_all, purge_pins
from lb.dataplane.maps import Maps
from lb.dataplane.pins import has_ipv6_flows, limits_for, open_pinned, pin_dir
from lb.health import HealthChecker
from lb.health.anomaly import PassiveHealth
from lb.health.checker import FIRST_ROUND_SPREAD
from lb.hostcheck import host_problems
from lb.hostnet import (
    NoSuchNetns,
    enter_netns,
    full_nat_port_clash,
    place_addresses,
    remove_addresses,
    xdp_interfaces,
)
from lb.model import LoadBalancer, Protocol
from lb.registrations import Registrations
from lb.runstate import RuntimeState
from lb.reloads import Reloads
from lb.systemd import Watchdog, sd_notify

if TYPE_CHECKING:
    from lb.l7.server import L7Server

log = logging.getLogger("lb.daemon")

GRACE_SECONDS = 30.0
WITHDRAW_SETTLE = 0.5  # seconds between the BGP withdrawal on SIGTERM and anything stopping
BGP_RETRY_SECONDS = 2.0

# Settings a running daemon cannot change: a reload that changes one is refused.
RESTART_ONLY = ("name", "interfaces", "xdp_mode", "forwarding_mode", "netns", "ring_size", "full_nat_port_range",
                "tcp_idle_timeout", "udp_idle_timeout", "workers", "admin_socket", "metrics_address",
                "header_timeout", "body_timeout", "min_body_rate", "max_response_head",
                "tcp_closed_timeout", "tcp_time_wait_timeout", "new_flow_rate_limit", "http2", "tls_session_resumption",
                "tcp_syn_timeout", "max_vips", "max_targets", "conntrack_size", "half_open_size")


class DaemonError(RuntimeError):
    """lb up cannot start; the message says why and what to do."""


# --- the daemon --------------------------------------------------------------------


class Daemon:
    def __init__(self, config: LoadBalancer, config_path: str | None) -> None:
        # --- for the daemon's life
        self.config = config
        self.config_path = config_path
        self.state = RuntimeState(config.name, os.getpid(), config_path, time.time(), config.netns,
                                  pin_dir(config.name), admin_socket=config.admin_socket)
        self.state.record_bgp(config)
        # What `lb targets register|deregister` changed, over the config (lb.registrations).
        self.registrations = Registrations.load(config.name)
        self.registrations.reconcile(config)
        self._stop = asyncio.Event()
        self.reloads = Reloads(started=time.time())  # lb_reload_* in the metrics
        self._reconcile_pending = False
        self._ramp_timer: asyncio.TimerHandle | None = None
        # --- parts, created in prepare() and start()
        self.program: Program | None = None
        self.maps: Maps | None = None
        self.dataplane: Dataplane | None = None
        self.health: HealthChecker | None = None
        self.l7: L7Server | None = None
        self.controller: Controller | None = None
        self.metrics_server: metrics.MetricsServer | None = None
        self.admin: admin.AdminServer | None = None
        self._health_task: asyncio.Task[None] | None = None
        self.passive: PassiveHealth | None = None  # with the L7 workers: anomaly mitigation
        self._passive_task: asyncio.Task[None] | None = None
        self.bgp: bgp.Speaker | None = None  # [load_balancer.bgp]: what BIRD announces (lb.bgp)
        self._bgp_retry: asyncio.TimerHandle | None = None

    # --- lifecycle ---------------------------------------------------------------

    def prepare(self) -> None:
        """The kernel-facing setup, before the event loop runs: pyroute2's
        synchronous API drives an event loop of its own, so inside ours its
        calls go to a worker thread instead (see reload)."""
        if self.config.bgp is not None:  # first: a BIRD that cannot carry our routes stops lb up before anything
            self.bgp = bgp.Speaker(self.config, runstate.bgp_withdrawn_path(self.config.name))
            try:
                self.bgp.start()
            except bgp.SpeakerError as exc:
                raise DaemonError(str(exc)) from None
        # We hold the lock: a state file left now is from an `lb up` that died
        # without `lb down`. The addresses it placed are still ours to remove.
        previous = RuntimeState.load(self.config.name)
        earlier = previous.addresses if previous is not None and previous.netns == self.config.netns else []
        self.state.addresses = place_addresses(self.config, earlier)
        if self.config.listeners_of(Protocol.TCP, Protocol.UDP):
            self._start_dataplane()
            clash = full_nat_port_clash(self.config)
            if clash:
                log.warning("%s", clash)
        # Saved again once serving; saved now so that a daemon killed during its
        # first health round still leaves `lb down` the addresses and attachments.
        self.state.save()

    async def start(self) -> None:
        config = self.config
        self.registrations.save()
        self.health = HealthChecker(self.registrations.effective_groups(config),
                                    on_change=lambda change: self.schedule_reconcile())
        self.registrations.resume(config, self.health)  # a drain a restart interrupted goes on
        self._health_task = asyncio.get_running_loop().create_task(self.health.run())
        # Reconcile only once every target has had its first check: after a
        # restart the adopted ring keeps serving meanwhile, instead of being
        # narrowed to whichever target answered first.
        longest = max((g.health_check.timeout for g in config.target_groups), default=0)
        if not await self.health.first_round(timeout=min(10.0, longest + FIRST_ROUND_SPREAD + 0.5)):
            log.warning("not every target answered its first health check in time; starting anyway")
        self.controller = Controller(config, self.health, self.dataplane, None)
        if config.listeners_of(Protocol.HTTP):
            # Imported here: the L7 proxy (httptools, multiprocessing, the worker
            # code) loads only when an HTTP listener exists, never for L4 alone.
            from lb.l7.config import L7Config
            from lb.l7.server import L7Server

            problem = access_log_problem(config)
            if problem is not None:
                raise DaemonError(problem)
            # The cookie key outlives the process: sticky sessions stay put across restarts.
            self.l7 = L7Server(replace(L7Config.for_load_balancer(config),
                                       cookie_secret=runstate.cookie_key(config.name)))
            await self.l7.start(self.controller.routing_table())
            self.controller.l7 = self.l7
            self.passive = PassiveHealth(self.l7.stats, self._anomaly_groups, self.schedule_reconcile)
            self.controller.mitigated = self.passive.mitigated
            self._passive_task = asyncio.get_running_loop().create_task(self.passive.run())
        self._after_reconcile(self.controller.reconcile())
        self.metrics_server = metrics.start(self.config.metrics_address, lambda: self.config, self.health, self.l7,
                                            reloads=self.reloads, passive=self.passive)
        self.admin = admin.AdminServer(config.admin_socket, AdminCommands(self).handle)
        await self.admin.start()
        self.state.save()
        log.info("lb %s up: %d listeners, %d target groups", config.name, len(config.listeners),
                 len(config.target_groups))
        sd_notify("READY=1\nSTATUS=serving")

    def _start_dataplane(self) -> None:
        config = self.config
        interfaces = xdp_interfaces(config)
        if not interfaces:
            raise DaemonError("no interface to attach XDP to: set load_balancer.interfaces")
        problems = host_problems(config, interfaces)
        if problems:
            raise DaemonError("the host is not ready for lb:\n  " + "\n  ".join(problems))
        limits = limits_for(config)
        try:
            self.program = Program.load(config.name, limits)
        except LoaderError as exc:
            raise DaemonError(str(exc)) from exc
        attachments: list[Attachment] = []
        for ifname in interfaces:
            try:
                attachments.append(self.program.attach(ifname, config.xdp_mode))
            except (LoaderError, nl.NetlinkLookupError) as exc:
                raise DaemonError(f"load_balancer.interfaces: {exc}") from exc
        self.state.attachments = [asdict(a) for a in attachments]
        self.maps = open_pinned(config)
        self.dataplane = Dataplane(self.maps, source_of=nl.source_toward)

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self._reload_on_signal()))
        loop.add_signal_handler(signal.SIGUSR1, lambda: loop.create_task(self.reopen_logs()))
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping)
        await self._stop.wait()

    def _stopping(self) -> None:
        if self.l7 is not None:  # no worker is replaced from now on
            self.l7.stopping()
        self._stop.set()

    async def stop(self) -> None:
        """Graceful: the L7 workers finish in-flight requests; XDP stays attached."""
        sd_notify("STOPPING=1")
        if self.bgp is not None:  # first: the router moves the traffic before anything here stops
            announced = bool(self.bgp.announced)
            self.bgp.withdraw_all()
            if announced:
                await asyncio.sleep(WITHDRAW_SETTLE)
        if self._ramp_timer is not None:
            self._ramp_timer.cancel()
        if self._bgp_retry is not None:
            self._bgp_retry.cancel()
        if self.metrics_server is not None:  # first: a scrape may be waiting on this loop
            await asyncio.get_running_loop().run_in_executor(None, self.metrics_server.close)
            self.metrics_server = None
        if self.admin is not None:
            await self.admin.close()
        if self._passive_task is not None:
            self._passive_task.cancel()
            await asyncio.gather(self._passive_task, return_exceptions=True)
        if self.health is not None:
            self.health.stop()
        if self._health_task is not None:
            await asyncio.gather(self._health_task, return_exceptions=True)
        if self.l7 is not None:
            await self.l7.stop(GRACE_SECONDS)
        self.close_dataplane()
        log.info("lb %s stopped; XDP program and maps left in place (lb down removes them)", self.config.name)

    def close_dataplane(self) -> None:
        """Close our handles only: the attachments and the pins stay."""
        if self.maps is not None:
            self.maps.close()
            self.maps = None
        if self.program is not None:
            self.program.close()
            self.program = None

    # --- control -----------------------------------------------------------------

    def schedule_reconcile(self) -> None:
        """Coalesce a burst of health changes into one reconcile."""
        if self._reconcile_pending:
            return
        self._reconcile_pending = True

        def run() -> None:
            self._reconcile_pending = False
            if self.controller is not None:
                self._after_reconcile(self.controller.reconcile())

        asyncio.get_running_loop().call_soon(run)

    def _anomaly_groups(self) -> frozenset[str]:
        return frozenset(g.name for g in self.config.target_groups if g.anomaly_mitigation)

    def _after_reconcile(self, again_in: float | None) -> None:
        """While a target is in slow start, reconcile again as its share grows;
        announce by BGP what is served now."""
        self._announce()
        if self._ramp_timer is not None:
            self._ramp_timer.cancel()
            self._ramp_timer = None
        if again_in is not None:
            self._ramp_timer = asyncio.get_running_loop().call_later(again_in, self.schedule_reconcile)

    def _announce(self) -> None:
        if self.bgp is None or self.health is None:
            return
        if self._bgp_retry is not None:
            self._bgp_retry.cancel()
            self._bgp_retry = None
        self.bgp.update(bgp.served(self.config, self.health, self.dataplane is not None, self.l7 is not None))
        if self.bgp.dirty:  # BIRD did not answer: try again until it does
            self._bgp_retry = asyncio.get_running_loop().call_later(BGP_RETRY_SECONDS, self._announce)

    async def reload(self) -> dict[str, Any]:
        """Re-read the config: apply it whole, or change nothing (counted in self.reloads)."""
        with self.reloads.attempt():
            return await self._reload()

    async def _reload(self) -> dict[str, Any]:
        sd_notify("RELOADING=1")
        try:
            new = configmod.load(self.config_path) if self.config_path else configmod.load_default()
        except configmod.ConfigError as exc:
            for line in str(exc).splitlines():
                log.error("reload rejected: %s", line)
            sd_notify("READY=1")
            raise admin.AdminError(f"reload rejected, running config unchanged:\n{exc}") from exc
        problem = access_log_problem(new) if new.access_log != self.config.access_log else None
        if problem is not None:
            log.error("reload rejected: %s; running config unchanged", problem)
            sd_notify("READY=1")
            raise admin.AdminError(f"reload rejected: {problem}; running config unchanged")
        changed = [key for key in RESTART_ONLY if getattr(new, key) != getattr(self.config, key)]
        if (new.bgp is None) != (self.config.bgp is None):
            changed.append("bgp")  # BGP on or off; its settings themselves reload
        needs_dataplane = bool(new.listeners_of(Protocol.TCP, Protocol.UDP)) and self.dataplane is None
        needs_l7 = bool(new.listeners_of(Protocol.HTTP)) and self.l7 is None
        if changed or needs_dataplane or needs_l7:
            what = ", ".join(changed) or ("the first L4 listener" if needs_dataplane else "the first HTTP listener")
            log.error("reload rejected: %s needs a restart (lb up again); running config unchanged", what)
            sd_notify("READY=1")
            raise admin.AdminError(f"reload rejected: {what} needs a restart; running config unchanged")
        if self.program is not None and has_ipv6_flows(new) != self.program.limits.ipv6_flows:
            problem = ipv6_flows_change(self.config, new)
            log.error("reload rejected: %s; running config unchanged", problem)
            sd_notify("READY=1")
            raise admin.AdminError(f"reload rejected: {problem}; running config unchanged")
        loop = asyncio.get_running_loop()
        self.state.addresses += await loop.run_in_executor(None, place_addresses, new)
        self.config = new
        assert self.health is not None and self.controller is not None
        dropped = self.registrations.reconcile(new)
        self.registrations.save()
        self.health.update_groups(self.registrations.effective_groups(new))
        self.controller.set_config(new)
        if self.bgp is not None:
            self.bgp.set_config(new)
        self._after_reconcile(self.controller.reconcile())
        warnings = await self.l7.settle() if self.l7 is not None else []  # a stuck worker is named, not waited for
        for warning in warnings:
            log.warning("reload: %s", warning)
        self.state.loaded_at = time.time()
        self.state.record_bgp(new)
        self.state.save()
        log.info("reloaded %s", self.config_path or "the embedded config")
        sd_notify("READY=1")
        return {"reloaded": True, "listeners": len(new.listeners), "target_groups": len(new.target_groups),
                "warnings": warnings, "registrations_dropped": dropped}


    async def _reload_on_signal(self) -> None:
        """SIGHUP: a rejection is logged (and counted) by reload; nobody awaits the answer."""
        try:
            await self.reload()
        except admin.AdminError:
            pass

    async def reopen_logs(self) -> None:
        """SIGUSR1: the workers write what they buffered and reopen the access
        log's path (logrotate renamed the file: deploy/logrotate)."""
        if self.l7 is None:
            return
        for problem in await self.l7.reopen_access_logs():
            log.warning("SIGUSR1: %s", problem)
        if self.config.access_log.enabled:
            log.info("access log %s reopened", self.config.access_log.path)


def ipv6_flows_change(old: LoadBalancer, new: LoadBalancer) -> str:
    """Why a reload from `old` to `new` cannot resize the IPv6 flow tables,
    and what to do: they are compiled in (Limits.ipv6_flows), and a restart
    keeps the flows (the loader replaces only empty or unused IPv6 tables)."""
    if has_ipv6_flows(new):
        index, listener = next((i, x) for i, x in enumerate(new.listeners)
                               if x.protocol in (Protocol.TCP, Protocol.UDP) and x.address.version == 6)
        what = (f'listeners[{index}] ("{listener.name}", {listener.address}) is the first IPv6 TCP/UDP listener: '
                "the IPv6 flow tables (conntrack6, half_open6, fullnat_flows6) get their full sizes")
        kept = "every flow"
    else:
        had = [f'"{x.name}"' for x in old.listeners_of(Protocol.TCP, Protocol.UDP) if x.address.version == 6]
        what = (f"the config has no IPv6 TCP/UDP listener any more (it had {', '.join(had)}): the IPv6 flow "
                "tables (conntrack6, half_open6, fullnat_flows6) shrink")
        kept = "every IPv4 flow"
    return (f"{what}, which takes a restart: restart lb (`systemctl restart lb`, or stop it and `lb up` again), "
            f"which keeps {kept}; not `lb down`, which drops them")


def access_log_problem(config: LoadBalancer) -> str | None:
    """Why the workers could not open the access log ``config`` asks for, or None."""
    settings = config.access_log
    if not settings.enabled or not config.listeners_of(Protocol.HTTP):
        return None
    from lb.l7.access_log import check_path  # with the rest of lb.l7: only for HTTP listeners

    problem = check_path(settings.path)
    return None if problem is None else f"load_balancer.access_log.path: {problem}"


# --- entry points ----------------------------------------------------------------


async def _main(daemon: Daemon) -> None:
    watchdog = Watchdog.from_environment()  # WatchdogSec= in the unit: pinged from this loop
    watchdog.start(asyncio.get_running_loop())
    try:
        await daemon.start()
        await daemon.serve()
    finally:
        try:
            await daemon.stop()
        finally:
            watchdog.stop()


def run(config: LoadBalancer, config_path: str | None) -> None:
    """Run in the foreground until SIGTERM/SIGINT. Raises DaemonError for
    problems a user can fix (already running, no such namespace, ...)."""
    if os.geteuid() != 0:
        raise DaemonError("lb up needs root (BPF, XDP, addresses): run it with sudo")
    rlimits.raise_and_report()  # open files: the soft limit up to the hard one (the workers inherit it)
    try:
        enter_netns(config.netns)  # the main thread, before any other thread or socket exists
        lock = runstate.lock(config.name)
    except (NoSuchNetns, runstate.AlreadyRunning) as exc:
        raise DaemonError(str(exc)) from None
    try:
        daemon = Daemon(config, config_path)
        try:
            daemon.prepare()
        except BaseException:
            daemon.close_dataplane()
            if daemon.bgp is not None:
                daemon.bgp.remove()
            raise
        uvloop.run(_main(daemon))
    finally:
        runstate.unlock(config.name, lock)


def down(name: str, interfaces: list[str], netns: str | None, *, purge: bool = True,
         bgp_fragment: tuple[str, str] | None = None) -> dict[str, Any]:
    """Remove what `lb up` left in the kernel: XDP programs, pinned maps, the
    addresses it added; first, lb's BGP announcements (`bgp_fragment`: the
    fragment's path and BIRD's control socket). Safe to run twice."""
    try:
        lock = runstate.lock(name)
    except runstate.AlreadyRunning:
        raise DaemonError(f"`lb up` is still running for {name!r}: stop it first (SIGTERM, or systemctl stop lb)") \
            from None
    runstate.unlock(name, lock)  # not running: this also removes a lock file a killed daemon left
    try:  # first: the routers move the traffic away before anything here goes
        withdrawn: bool | str = bgp.remove_fragment(*bgp_fragment) if bgp_fragment is not None else False
    except bgp.SpeakerError as exc:  # the fragment is gone: a BIRD that comes back announces nothing
        withdrawn = f"load_balancer.bgp: {exc}"
    bgp.write_withdrawn(runstate.bgp_withdrawn_path(name), None)  # the next `lb up` is in rotation again
    state = RuntimeState.load(name)
    detached = detach_all(interfaces, netns)
    removed_addresses = remove_addresses(state.addresses, netns) if state is not None else []
    unpinned = purge_pins(name) if purge else False
    if purge:
        Registrations.remove(name)
        runstate.remove_cookie_key(name)
    RuntimeState.remove(name)
    return {"detached": detached, "addresses_removed": removed_addresses, "maps_removed": unpinned,
            "bgp_withdrawn": withdrawn}
