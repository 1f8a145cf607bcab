"""The Prometheus endpoint: kernel counters, target health and L7 requests.

    server = serve("127.0.0.1:9464", Collector(lambda: config, health=..., l7_stats=...))
    ...
    server.close()

:class:`Collector` reads everything at scrape time: the pinned maps (opened
for each scrape, so nothing goes stale across a restart of the program),
health rows, and the L7 workers' snapshots summed over workers. `serve`
exposes it on its own registry (never prometheus_client's global one), from
one thread (lb.metrics_http: bounded connections, idle ones timed out).

The daemon's health checker and L7 server belong to its event loop; the
scrape thread must not touch them directly: :func:`on_loop` runs them there
(awaiting L7Server.stats(), which never blocks the loop) with a timeout.
The L7 counters include those of workers that exited (L7Server.stats()),
so they do not go backwards when a worker is replaced.

Metrics (all prefixed ``lb_``; "vip" is "ADDRESS:PORT", "target" too):

==========================================  =======  ==========================================
lb_build_info{version,python}               gauge    1, with lb's version and Python's in the labels
lb_maps_loaded                              gauge    1 when the XDP maps are pinned
lb_vip_info{vip,protocol,listener,mode}     gauge    1 per L4 VIP; mode nat, full-nat or dsr
lb_vip_packets_total{vip,protocol,listener}  counter  client → target packets forwarded
lb_vip_bytes_total{...}                     counter  their bytes
lb_vip_new_flows_total{...}                 counter  flows hashed onto the ring
lb_vip_reply_packets_total{...}             counter  target → client packets rewritten
lb_vip_reply_bytes_total{...}               counter  their bytes
lb_target_packets_total{target}             counter  as the VIP ones, per target (a target
 (and _bytes, _new_flows, _reply_*)                   serving two VIPs counts both)
lb_xdp_packets_total{reason}                counter  global verdicts and events (structs.Counter)
lb_conntrack_entries{vip,protocol,state}    gauge    conntrack entries (one a flow); state live or
                                                     expired (idle past its TCP state's timeout)
lb_conntrack_tcp_entries{vip,tcp_state}     gauge    TCP entries by state: syn_sent, established,
                                                     closing, time_wait, closed
lb_conntrack_walk_truncated                 gauge    1 if the walk stopped at CONNTRACK_WALK_CAP
lb_flow_table_capacity{table}               gauge    entries the table holds (conntrack_size,
                                                     half_open_size; conntrack6 and half_open6
                                                     128 a CPU with no IPv6 TCP/UDP listener)
lb_flow_table_entries{table}                gauge    entries in it now: the program's inserts
                                                     less removals, at most the capacity (no walk)
lb_flow_table_inserts_total{table}          counter  new entries the program made
lb_flow_table_evictions_total{table}        counter  entries the LRU evicted (inserts beyond the
                                                     capacity; within 128 a CPU of the kernel's)
lb_full_nat_ports{source,target,protocol}   gauge    full-NAT flows (each holding a port) by lb's source
                                                     address and target endpoint
lb_target_health{group,target,port,state}   gauge    1 for the target's state, 0 for the others
lb_target_health_check_latency_seconds      gauge    the last check's latency
lb_target_health_check_success{...}         gauge    1 if the last check passed, 0 if not
lb_target_anomaly_mitigated{...}            gauge    1 while the target is weighted down for failing
                                                     far more requests than its peers (0: judged fine;
                                                     absent: anomaly_mitigation off, or no requests)
lb_http_requests_total{listener,rule,       counter  L7 requests answered; rule "default" for
  group,target,code}                                  the default rule, group and target "-" for none
lb_http_elb_5xx_total{listener,group,       counter  5xx answers lb made itself (502 connect refused,
  target}                                             503, 504...): ALB's HTTPCode_ELB_5XX_Count
lb_http_target_5xx_total{...}               counter  5xx answers of the targets, relayed:
                                                      ALB's HTTPCode_Target_5XX_Count
lb_http_elb_4xx_total{...},                 counter  the same for 4xx (lb's 400, 408, 460...; the
  lb_http_target_4xx_total{...}                       targets' own)
lb_http_upstream_latency_seconds            histo.   time to the target's response head
  {group,target}
lb_http_connections                         gauge    client connections open now
lb_l7_worker_restarts_total{worker}         counter  worker processes started to replace one that
                                                      exited or was killed (worker: slot 0..N-1)
lb_l7_worker_up{worker}                     gauge    1 if the worker answered this scrape in time
lb_l7_worker_start_time_seconds{worker}     gauge    when the worker process started
lb_l7_open_fds{worker}                      gauge    descriptors open (the worker's estimate)
lb_l7_fd_limit{worker}                      gauge    its limit on open files
lb_l7_connections_shed_total                counter  idle connections closed near the open files limit
lb_l7_connections_refused_total             counter  new ones closed there (nothing idle to close)
lb_http2_connections_calmed_total           counter  HTTP/2 connections ended with GOAWAY
                                                      ENHANCE_YOUR_CALM (floods, rapid reset)
lb_http_access_log_lines_lost_total         counter  access log lines dropped: their write failed (disk
                                                     full, file system read-only)
lb_certificate_expiry_seconds{listener,     gauge    when an HTTPS listener's certificate expires
  certificate,names,default}                         (Unix time: alert on it minus time())
lb_reloads_total                            counter  reloads asked for (SIGHUP, `lb reload`)
lb_reload_failures_total                    counter  those rejected (invalid config, a restart-only
                                                     change): the running config stayed
lb_reload_last_successful                   gauge    1 if the last reload was applied (or none was
                                                     asked for since the start), 0 if rejected
lb_reload_last_success_timestamp_seconds    gauge    when the running config was applied (Unix time)
==========================================  =======  ==========================================

Per-CPU maps are summed per scrape.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import gzip
import inspect
import logging
import platform
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.registry import Collector as PromCollector
from prometheus_client.registry import CollectorRegistry

from lb import __version__, tls
from lb.dataplane.maps import Maps, MapsNotLoaded, VipEntry, endpoint_text
from lb.dataplane.pins import open_pinned
from lb.dataplane.structs import COUNTER_HELP
from lb.inspect.kernel import entry_timeout
from lb.inspect.names import l4_listeners
from lb.metrics_http import IDLE_TIMEOUT, MAX_CONNECTIONS, ScrapeServer
from lb.model import LoadBalancer, TargetState

if TYPE_CHECKING:
    from lb.health import HealthChecker
    from lb.health.anomaly import PassiveHealth
    from lb.l7.server import L7Server
    from lb.reloads import Reloads

log = logging.getLogger("lb.metrics")

# The conntrack LRU is walked key by key at every scrape to count entries per
# VIP: fine at lab scale (a few thousand flows: milliseconds), too slow for a
# full 262144-entry table at a short scrape interval, so the walk is capped.
CONNTRACK_WALK_CAP = 65536
HEALTH_STATES = tuple(state.value for state in TargetState)

HealthRows = Callable[[], Iterable[dict[str, Any]]]
L7Stats = Callable[[], list[dict[str, Any]]]


def on_loop(loop: asyncio.AbstractEventLoop, fn: Callable[[], Any], timeout: float = 10.0) -> Callable[[], Any]:
    """`fn` made callable from another thread: it runs on `loop` (awaited
    there if it is a coroutine function), the caller waits at most `timeout` s
    (TimeoutError) and never blocks the loop itself."""

    def call() -> Any:
        try:
            if asyncio.get_running_loop() is loop:
                return fn()
        except RuntimeError:  # no loop in this thread: the usual case
            pass

        async def run() -> Any:
            result = fn()
            return await result if inspect.isawaitable(result) else result

        future = asyncio.run_coroutine_threadsafe(run(), loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"the event loop did not answer within {timeout:g} s") from None

    return call


def health_rows(config: LoadBalancer, checker: Any, passive: PassiveHealth | None = None) -> list[dict[str, Any]]:
    """Rows for the collector from a lb.health.HealthChecker (call on its loop):
    {"group", "target", "port", "state", "last_latency_ms", "last_ok",
    "mitigated" (None: anomaly mitigation off or no requests yet)}."""
    rows = []
    for group in config.target_groups:
        for target, record in checker.health(group.name).items():
            result = record.last_result
            verdict = passive.verdict(group.name, f"{target.address}:{record.port}") if passive else None
            rows.append({"group": group.name, "target": str(target.address), "port": record.port,
                         "state": record.state.value, "last_latency_ms": record.last_latency_ms,
                         "last_ok": None if result is None else result.ok,
                         "mitigated": None if verdict is None else verdict.mitigated})
    return rows


class Collector(PromCollector):
    """A prometheus_client custom collector for one load balancer."""

    def __init__(self, config: Callable[[], LoadBalancer], *, health: HealthRows | None = None,
                 l7_stats: L7Stats | None = None, reloads: Reloads | None = None) -> None:
        self._config = config  # a callable: the daemon's config changes on reload
        self._health = health
        self._l7_stats = l7_stats
        self._reloads = reloads  # read from the scrape thread: see lb.reloads

    def describe(self) -> Iterable[Metric]:
        return ()  # no describe-time scrape; names are not checked for collisions

    def collect(self) -> Iterator[Metric]:
        build = GaugeMetricFamily("lb_build_info", "lb's version (and Python's) in the labels",
                                  labels=["version", "python"])
        build.add_metric([__version__, platform.python_version()], 1)
        yield build
        config = self._config()
        for section in (self._kernel, self._health_metrics, self._l7, self._certificates, self._reload_metrics):
            try:
                yield from section(config)
            except TimeoutError as exc:  # the daemon's loop is busy: no traceback for that
                log.warning("metrics: %s: %s", section.__name__, exc)
            except Exception:  # one broken source must not hide the others
                log.exception("metrics: %s failed", section.__name__)

    # --- the XDP maps --------------------------------------------------------

    def _kernel(self, config: LoadBalancer) -> Iterator[Metric]:
        loaded = GaugeMetricFamily("lb_maps_loaded", "1 when the XDP program's maps are pinned")
        try:
            maps = open_pinned(config)
        except MapsNotLoaded:
            loaded.add_metric([], 0)
            yield loaded
            return
        loaded.add_metric([], 1)
        yield loaded
        with maps:
            vips = maps.vips()  # read once: both sections list every VIP
            yield from self._traffic(config, maps, vips)
            yield from self._conntrack(maps, vips)

    def _traffic(self, config: LoadBalancer, maps: Maps, vips: list[VipEntry]) -> Iterator[Metric]:
        listeners = {vip: name for vip, (name, _) in l4_listeners(config).items()}
        fields = (("packets", "client to target packets forwarded"), ("bytes", "client to target bytes forwarded"),
                  ("new_flows", "new flows hashed onto the ring"),
                  ("reply_packets", "target to client packets rewritten"),
                  ("reply_bytes", "target to client bytes rewritten"))
        vip_families = {f: CounterMetricFamily(f"lb_vip_{f}", f"Per VIP: {h}", labels=["vip", "protocol", "listener"])
                        for f, h in fields}
        info = GaugeMetricFamily("lb_vip_info", "1 per L4 VIP, with its forwarding mode (nat, full-nat, dsr)",
                                 labels=["vip", "protocol", "listener", "mode"])
        for entry in vips:
            info.add_metric([endpoint_text(entry.vip.address, entry.vip.port), entry.vip.protocol,
                             listeners.get(entry.vip, ""), entry.mode], 1)
        yield info
        for entry in vips:
            traffic = maps.vip_traffic(entry.vip_id)
            labels = [endpoint_text(entry.vip.address, entry.vip.port), entry.vip.protocol,
                      listeners.get(entry.vip, "")]
            for f, family in vip_families.items():
                family.add_metric(labels, getattr(traffic, f))
        yield from vip_families.values()
        target_families = {f: CounterMetricFamily(f"lb_target_{f}", f"Per target: {h}", labels=["target"])
                           for f, h in fields}
        for t in maps.targets():
            traffic = maps.target_traffic(t.target_id)
            for f, family in target_families.items():
                family.add_metric([str(t.endpoint)], getattr(traffic, f))
        yield from target_families.values()
        xdp = CounterMetricFamily("lb_xdp_packets", "XDP verdicts and events by reason: "
                                  + "; ".join(f"{c.label}: {h}" for c, h in COUNTER_HELP.items()), labels=["reason"])
        for counter, value in maps.counters().items():
            xdp.add_metric([counter.label], value)
        yield xdp

    def _conntrack(self, maps: Maps, vips: list[VipEntry]) -> Iterator[Metric]:
        counts: collections.Counter[tuple[str, str, str]] = collections.Counter()
        tcp: collections.Counter[tuple[str, str]] = collections.Counter()
        ports: collections.Counter[tuple[str, str, str]] = collections.Counter()
        targets = {t.target_id: str(t.endpoint) for t in maps.targets()}
        truncated = 0
        for n, flow in enumerate(maps.flows(limit=CONNTRACK_WALK_CAP + 1)):
            if n == CONNTRACK_WALK_CAP:
                truncated = 1
                break
            vip = endpoint_text(flow.vip.address, flow.vip.port)
            state = "expired" if flow.idle_s >= entry_timeout(flow, maps.limits) else "live"
            counts[(vip, flow.vip.protocol, state)] += 1
            if flow.tcp_state is not None:
                tcp[(vip, flow.tcp_state)] += 1
            if flow.source is not None:
                ports[(str(flow.source.address), targets.get(flow.target_id, "?"), flow.vip.protocol)] += 1
        for flow in maps.half_open_flows(limit=CONNTRACK_WALK_CAP):  # a SYN's flow holds its port too
            if flow.source is not None:
                ports[(str(flow.source.address), targets.get(flow.target_id, "?"), flow.vip.protocol)] += 1
        for entry in vips:  # every VIP shows, with 0 when it has no flows
            counts.update({(endpoint_text(entry.vip.address, entry.vip.port), entry.vip.protocol, "live"): 0})
        entries = GaugeMetricFamily("lb_conntrack_entries", "Conntrack entries (one a flow) per VIP (live, or "
                                    "expired but not yet evicted from the LRU)", labels=["vip", "protocol", "state"])
        for labels, value in sorted(counts.items()):
            entries.add_metric(list(labels), value)
        yield entries
        states = GaugeMetricFamily("lb_conntrack_tcp_entries", "TCP conntrack entries per VIP by TCP state",
                                   labels=["vip", "tcp_state"])
        for (vip, tcp_state), value in sorted(tcp.items()):
            states.add_metric([vip, tcp_state], value)
        yield states
        full_nat = GaugeMetricFamily("lb_full_nat_ports", "Full-NAT flows, each holding a source port, by lb's "
                                     "source address and target", labels=["source", "target", "protocol"])
        for (source, target, protocol), value in sorted(ports.items()):
            full_nat.add_metric([source, target, protocol], value)
        yield full_nat
        yield GaugeMetricFamily("lb_conntrack_walk_truncated",
                                f"1 if counting stopped at {CONNTRACK_WALK_CAP} entries", value=truncated)
        yield from self._flow_tables(maps)

    @staticmethod
    def _flow_tables(maps: Maps) -> Iterator[Metric]:
        """Fullness and LRU evictions of conntrack and half_open, from the
        program's bookkeeping: O(CPUs), whatever the table's size."""
        usage = maps.table_usage()
        families: list[tuple[GaugeMetricFamily | CounterMetricFamily, str]] = [
            (GaugeMetricFamily("lb_flow_table_capacity", "Entries the flow table holds", labels=["table"]),
             "capacity"),
            (GaugeMetricFamily("lb_flow_table_entries", "Entries in the flow table now (inserts less removals, at "
                               "most the capacity; no walk)", labels=["table"]), "entries"),
            (CounterMetricFamily("lb_flow_table_inserts", "New entries the XDP program made", labels=["table"]),
             "inserts"),
            (CounterMetricFamily("lb_flow_table_evictions", "Entries the LRU evicted to make room (inserts beyond "
                                 "the capacity; within 128 a CPU of the kernel's count)", labels=["table"]),
             "evictions"),
        ]
        for family, field in families:
            for table in usage:
                family.add_metric([table.table], getattr(table, field))
            yield family

    # --- health ----------------------------------------------------------------

    def _health_metrics(self, config: LoadBalancer) -> Iterator[Metric]:
        if self._health is None:
            return
        labels = ["group", "target", "port"]
        state = GaugeMetricFamily("lb_target_health", "1 for the target's current state (ELB's states)",
                                  labels=[*labels, "state"])
        latency = GaugeMetricFamily("lb_target_health_check_latency_seconds",
                                    "Latency of the target's last health check", labels=labels)
        success = GaugeMetricFamily("lb_target_health_check_success",
                                    "1 if the target's last health check passed", labels=labels)
        mitigated = GaugeMetricFamily("lb_target_anomaly_mitigated", "1 while passive health weighs the target "
                                      "down (anomaly_mitigation: it fails far more requests than its peers)",
                                      labels=labels)
        for row in self._health():
            ident = [row["group"], row["target"], str(row["port"])]
            for value in HEALTH_STATES:
                state.add_metric([*ident, value], 1 if row["state"] == value else 0)
            if row.get("last_latency_ms") is not None:
                latency.add_metric(ident, row["last_latency_ms"] / 1000.0)
            if row.get("last_ok") is not None:
                success.add_metric(ident, 1 if row["last_ok"] else 0)
            if row.get("mitigated") is not None:
                mitigated.add_metric(ident, 1 if row["mitigated"] else 0)
        yield from (state, latency, success, mitigated)

    # --- L7 ----------------------------------------------------------------------

    def _l7(self, config: LoadBalancer) -> Iterator[Metric]:
        if self._l7_stats is None:
            return
        snapshots = self._l7_stats()
        requests: collections.Counter[tuple[str, str, str, str, str]] = collections.Counter()
        # (by lb, class) → (listener, group, target) → count: ALB's HTTPCode_ELB_5XX_Count and the like
        origins: dict[tuple[bool, int], collections.Counter[tuple[str, str, str]]] = {
            (by_lb, kind): collections.Counter() for by_lb in (True, False) for kind in (4, 5)}
        buckets: tuple[float, ...] = ()
        series: dict[tuple[str, str], tuple[list[int], float]] = {}
        connections = 0
        for snap in snapshots:
            for listener, rule, group, target, status, by_lb, count in snap["requests"]:
                requests[(listener, "default" if rule is None else str(rule), group, target, str(status))] += count
                tally = origins.get((by_lb, status // 100))
                if tally is not None:
                    tally[(listener, group, target)] += count
            latency = snap["upstream_latency"]
            buckets = tuple(latency["buckets"])
            for group, target, counts, total in latency["series"]:
                mine = series.get((group, target))
                series[(group, target)] = (
                    ([a + b for a, b in zip(mine[0], counts)], mine[1] + total) if mine is not None
                    else (list(counts), total))
            connections += snap["connections"]
        family = CounterMetricFamily("lb_http_requests", "L7 requests answered, by listener, rule, target group, "
                                     "target and status code", labels=["listener", "rule", "group", "target", "code"])
        for labels, value in sorted(requests.items()):
            family.add_metric(list(labels), value)
        yield family
        for (by_lb, kind), tally in origins.items():
            who = "lb made itself" if by_lb else "targets sent (relayed by lb)"
            origin = CounterMetricFamily(f"lb_http_{'elb' if by_lb else 'target'}_{kind}xx",
                                         f"L7 {kind}xx responses {who}, by listener, target group and target",
                                         labels=["listener", "group", "target"])
            for labels3, value in sorted(tally.items()):
                origin.add_metric(list(labels3), value)
            yield origin
        if buckets:
            histogram = HistogramMetricFamily("lb_http_upstream_latency_seconds", "Time from sending a request to "
                                              "a target to its response head", labels=["group", "target"])
            for (group, target), (counts, total) in sorted(series.items()):
                cumulative, running = [], 0
                for bound, count in zip([*map(str, buckets), "+Inf"], counts):
                    running += count
                    cumulative.append((bound, running))
                histogram.add_metric([group, target], cumulative, total)
            yield histogram
        yield GaugeMetricFamily("lb_http_connections", "L7 client connections open now", value=connections)
        yield CounterMetricFamily("lb_l7_connections_shed", "Idle L7 client connections closed, oldest first, "
                                  "to keep descriptors free near the open files limit",
                                  value=sum(snap.get("shed", 0) for snap in snapshots))
        yield CounterMetricFamily("lb_l7_connections_refused", "New L7 client connections closed at once near "
                                  "the open files limit (no idle one to close instead)",
                                  value=sum(snap.get("refused", 0) for snap in snapshots))
        yield CounterMetricFamily("lb_http2_connections_calmed", "HTTP/2 client connections ended with GOAWAY "
                                  "ENHANCE_YOUR_CALM: control frame floods, rapid reset (lb.l7.h2client)",
                                  value=sum(snap.get("h2_calmed", 0) for snap in snapshots))
        yield CounterMetricFamily("lb_http_access_log_lines_lost", "Access log lines dropped because their write "
                                  "failed (disk full, file system read-only); requests were served",
                                  value=sum(snap.get("access_log_lost", 0) for snap in snapshots))
        yield from self._l7_workers([snap for snap in snapshots if snap.get("worker") is not None])

    def _certificates(self, config: LoadBalancer) -> Iterator[Metric]:
        """The certificates of the running config (a reload replaces them)."""
        rows = tls.certificate_rows(config)
        if not rows:
            return
        expiry = GaugeMetricFamily("lb_certificate_expiry_seconds", "When the certificate of an HTTPS listener "
                                   "expires (Unix time, its notAfter)",
                                   labels=["listener", "certificate", "names", "default"])
        for row in rows:
            expiry.add_metric([row["listener"], row["certificate"], ",".join(row["names"]),
                               "true" if row["default"] else "false"], row["not_after"])
        yield expiry

    def _reload_metrics(self, config: LoadBalancer) -> Iterator[Metric]:
        reloads = self._reloads
        if reloads is None:
            return
        yield CounterMetricFamily("lb_reloads", "Config reloads asked for (SIGHUP, lb reload)", value=reloads.total)
        yield CounterMetricFamily("lb_reload_failures", "Config reloads rejected; the running config stayed",
                                  value=reloads.failures)
        yield GaugeMetricFamily("lb_reload_last_successful", "1 if the last reload was applied (or none was asked "
                                "for since the start), 0 if it was rejected", value=1 if reloads.last_ok else 0)
        yield GaugeMetricFamily("lb_reload_last_success_timestamp_seconds", "When the running config was "
                                "applied, at the start or by the last successful reload (Unix time)",
                                value=reloads.last_success)

    def _l7_workers(self, rows: list[dict[str, Any]]) -> Iterator[Metric]:
        """Per worker slot (label "worker": 0..N-1; a replacement takes its slot)."""
        restarts = CounterMetricFamily("lb_l7_worker_restarts", "L7 worker processes started to replace one "
                                       "that exited or was killed", labels=["worker"])
        up = GaugeMetricFamily("lb_l7_worker_up", "1 if the L7 worker answered this scrape in time",
                               labels=["worker"])
        started = GaugeMetricFamily("lb_l7_worker_start_time_seconds", "When the L7 worker process started "
                                    "(Unix time)", labels=["worker"])
        fds = GaugeMetricFamily("lb_l7_open_fds", "Descriptors the L7 worker has open (its estimate: its own "
                                "files and listeners, client and upstream connections)", labels=["worker"])
        limit = GaugeMetricFamily("lb_l7_fd_limit", "The L7 worker's limit on open files", labels=["worker"])
        for row in rows:
            worker = [str(row["worker"])]
            restarts.add_metric(worker, row.get("restarts", 0))
            up.add_metric(worker, 1 if row.get("answered") else 0)
            if row.get("started") is not None:
                started.add_metric(worker, row["started"])
            if row.get("fds"):
                fds.add_metric(worker, row["fds"]["open"])
                limit.add_metric(worker, row["fds"]["limit"])
        yield from (restarts, up, started, fds, limit)


# --- serving ---------------------------------------------------------------------


class MetricsServer:
    """A running endpoint; close() stops it and frees the port."""

    def __init__(self, server: ScrapeServer) -> None:
        self._server = server
        self.address = server.address

    def close(self) -> None:
        self._server.close()


def start(address: str, config: Callable[[], LoadBalancer], health: HealthChecker | None,
          l7: L7Server | None, reloads: Reloads | None = None,
          passive: PassiveHealth | None = None) -> MetricsServer | None:
    """The daemon's endpoint on `address`, in its netns, called on its event
    loop. The scrape thread opens the pinned maps itself; the health checker
    (lb.health.HealthChecker) and the L7 workers (lb.l7.server.L7Server,
    or None) belong to the loop, so it asks the loop for them with a timeout
    (on_loop; the workers' stats are awaited there, never blocking it). A port
    already taken is logged, not fatal: L4 and L7 serve on without it."""
    loop = asyncio.get_running_loop()
    rows = on_loop(loop, lambda: health_rows(config(), health, passive))
    l7_stats = on_loop(loop, l7.stats) if l7 is not None else None
    try:
        server = serve(address, Collector(config, health=rows, l7_stats=l7_stats, reloads=reloads))
    except OSError as exc:
        log.error("metrics_address %s: %s; no metrics endpoint", address, exc)
        return None
    log.info("metrics on http://%s/metrics", address)
    return server


def split_address(address: str) -> tuple[str, int]:
    """"127.0.0.1:9464" / "[::1]:9464" → (host, port)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


def serve(address: str, collector: Collector, *, idle_timeout: float = IDLE_TIMEOUT,
          max_connections: int = MAX_CONNECTIONS) -> MetricsServer:
    """Serve /metrics for `collector` on ADDRESS:PORT, from one daemon thread
    (lb.metrics_http: bounded connections, idle ones closed after `idle_timeout`)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)

    def render(accept: str, accept_encoding: str) -> tuple[str, list[tuple[str, str]], bytes]:
        encoder, content_type = choose_encoder(accept)
        body = encoder(registry)
        if gzip_accepted(accept_encoding):
            return content_type, [("Content-Encoding", "gzip")], gzip.compress(body)
        return content_type, [], body

    return MetricsServer(ScrapeServer(split_address(address), render, idle_timeout=idle_timeout,
                                      max_connections=max_connections))
