"""TOML → :class:`lb.model.LoadBalancer`: the entry points of :mod:`lb.config`
and the builder of its three top-level parts.

``[load_balancer]``, ``[[listeners]]`` and ``[[target_groups]]`` are built
here; listener rules, conditions and actions by :mod:`lb.config._rules`,
every table is read through :mod:`lb.config._reader`, values checked by
:mod:`lb.config._checks`.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

from lb import model as m
from lb import tls
from lb.config._bgp import read_bgp, resolve_announce
from lb.config._checks import PCHAR, PCT, URI_CHARS, host_port, is_prime, matcher_codes, matching, next_prime
from lb.config._reader import ConfigError, ConfigIssue, Table, report_duplicates, shown, toml_too_deep
from lb.config._rules import RuleBuilder, with_article

DEFAULT_SOURCE = "<embedded default.toml>"

# --- limits (ELB's, docs/elb-reference.md, unless marked as ours) -----------

ELB_MIN_HEALTH_INTERVAL = 5  # seconds; ELB's minimum
MIN_HEALTH_INTERVAL = 1  # ours: down to 1 s (keepalived's delay_loop), README "health_check"
MIN_HEALTH_TIMEOUT = 1  # ours (ELB: 2)

NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,30}[A-Za-z0-9])?")
NAME_RULE = "1-32 letters, digits and hyphens, not starting or ending with a hyphen"
IFNAME = re.compile(r"(?!\.{1,2}$)[^/:\s\x00-\x1f\x7f]{1,15}")  # Linux dev_valid_name, no control characters
NETNS = re.compile(r"(?!\.{1,2}$)[A-Za-z0-9_.-]{1,64}")
MAX_RING_SIZE = 2**20  # ours: Maglev table size bound
MAX_LISTENERS = 50  # per load balancer
MAX_TARGET_GROUPS = 100  # per load balancer
MAX_TARGETS_PER_GROUP = 1000
MAX_TARGETS = 1000  # per load balancer, each target of each group counted
# The XDP program's capacity (docs/architecture.md, "Capacity"): each value
# sizes a map. The rings map holds max_vips x 2 x ring_size u32 slots: at most
# MAX_RING_SLOTS (1 GiB) of them.
CAPACITY_RANGES = {"max_vips": (1, 4096, 64), "max_targets": (1, 65536, 1024),
                   "conntrack_size": (1024, 33_554_432, 524288), "half_open_size": (1024, 16_777_216, 131072)}
MAX_RING_SLOTS = 1 << 28
MAX_NESTING = 32  # ours: TOML levels (an lb config needs about 6); see toml_too_deep
# The health check's path (and query) goes into the request line of every check:
# RFC 3986's characters, as ELB names none (it says 1-1024 characters).
HEALTH_PATH = re.compile(rf"(?:[{PCHAR}/]|{PCT})*(?:\?(?:[{PCHAR}/?]|{PCT})*)?")
HEALTH_PATH_RULE = f"a URI path and optional ?query: {URI_CHARS}, '/' (and '?' in the query)"
LB_KEYS = (
    "name", "interfaces", "xdp_mode", "forwarding_mode", "netns", "idle_timeout", "tcp_idle_timeout",
    "udp_idle_timeout", "tcp_closed_timeout", "tcp_time_wait_timeout", "new_flow_rate_limit", "header_timeout",
    "body_timeout", "min_body_rate", "max_response_head", "ring_size", "full_nat_port_range",
    "tcp_syn_timeout", "max_vips", "max_targets", "conntrack_size", "half_open_size",
    "workers", "access_log", "admin_socket", "metrics_address", "bgp", "http2",
    "tls_session_resumption",
)  # fmt: skip
ACCESS_LOG_KEYS = ("enabled", "path", "format")
LISTENER_KEYS = (
    "name", "protocol", "address", "port", "default_action", "rules", "default_certificate", "certificates",
    "ssl_policy",
)  # fmt: skip
LISTENER_PROTOCOLS = ("HTTP", "HTTPS", "TCP", "UDP")
GROUP_PROTOCOLS = LISTENER_PROTOCOLS
TLS_KEYS = ("default_certificate", "certificates", "ssl_policy")
MAX_CERTIFICATES = 25  # ALB: certificates per load balancer, not counting default certificates
GROUP_KEYS = (
    "name", "protocol", "port", "targets", "health_check", "deregistration_delay", "slow_start",
    "algorithm", "stickiness", "unhealthy_connection_termination", "deregistration_connection_termination",
    "anomaly_mitigation", "ca_bundle", "preserve_client_ip", "direct_server_return",
)  # fmt: skip
L4_ONLY_GROUP_KEYS = ("preserve_client_ip", "direct_server_return")
# Full NAT's source ports: at least this many, none below 1024 (services'
# well-known ports).
MIN_FULL_NAT_PORTS = 64
HEALTH_KEYS = (
    "enabled", "protocol", "port", "path", "method", "interval", "timeout", "healthy_threshold",
    "unhealthy_threshold", "matcher",
)  # fmt: skip
HTTP_ONLY_HEALTH_KEYS = ("path", "method", "matcher")


# --- entry points (re-exported by lb.config) ---------------------------------


def load(path: str | Path) -> m.LoadBalancer:
    """Read and validate a TOML file; every problem raises ConfigError.

    Relative certificate paths are read from the file's directory."""
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError([ConfigIssue("", f"cannot read: {exc.strerror or exc}")], source) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        issue = ConfigIssue("", f"not valid UTF-8 (byte {exc.start}, line {line})")
        raise ConfigError([issue], source) from None
    return loads(text, source, Path(path).resolve().parent)


def loads(text: str, source: str | None = "<string>", base: Path | None = None) -> m.LoadBalancer:
    """Parse and validate TOML text; relative paths are taken from ``base``
    (default: the current directory)."""
    too_deep = toml_too_deep(text, MAX_NESTING)
    if too_deep is not None:
        line = text.count("\n", 0, too_deep) + 1
        column = too_deep - (text.rfind("\n", 0, too_deep) + 1) + 1
        where = f"(line {line}, column {column})"
        issue = ConfigIssue("", f"invalid TOML: nested more than {MAX_NESTING} levels deep {where}")
        raise ConfigError([issue], source)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([ConfigIssue("", f"invalid TOML: {exc}")], source) from None
    except RecursionError:  # toml_too_deep should have caught it first
        raise ConfigError([ConfigIssue("", "invalid TOML: nested too deep for the parser")], source) from None
    return parse(data, source, base)


def parse(data: Mapping[str, Any], source: str | None = None, base: Path | None = None) -> m.LoadBalancer:
    """Validate already-parsed TOML data and build the model (reading the
    certificate files it names, relative to ``base``)."""
    issues: list[ConfigIssue] = []
    result = _Builder(base).load_balancer(Table(data, "", issues))
    if issues or result is None:
        raise ConfigError(issues, source)
    return result


def default_config_text() -> str:
    """The embedded default configuration (the namespace lab), as TOML text."""
    return resources.files("lb").joinpath("data/default.toml").read_text(encoding="utf-8")


def load_default() -> m.LoadBalancer:
    """The embedded default configuration, validated."""
    return loads(default_config_text(), DEFAULT_SOURCE)


# --- the builder -----------------------------------------------------------------


class _Builder:
    """Builds the model section by section, recording issues as it goes."""

    def __init__(self, base: Path | None = None) -> None:
        # Relative certificate paths are taken from here.
        self.base = base
        # Certificates in the lists of HTTPS listeners, for ALB's quota.
        self.certificate_count = 0
        # Listener rules and actions; knows the declared target groups.
        self.routing = RuleBuilder()
        # (address, port, transport) → the listener table that took it.
        self.endpoints: dict[tuple[m.IPAddress, int, str], Table] = {}
        # Targets of the groups read so far, for the per-load-balancer quota.
        self.target_count = 0

    def load_balancer(self, root: Table) -> m.LoadBalancer | None:
        root.only("load_balancer", "listeners", "target_groups")
        section = root.table("load_balancer")
        settings = None if section is None else self.settings(section)
        group_tables = root.tables("target_groups")
        if len(group_tables) > MAX_TARGET_GROUPS:
            root.error("target_groups", f"{len(group_tables)} target groups; at most {MAX_TARGET_GROUPS}")
        self.routing.declare_groups(group_tables)
        groups = [self.target_group(t) for t in group_tables]
        report_duplicates([(t, t.value_of("name")) for t in group_tables], "name", "target group name")
        listener_tables = root.tables("listeners")
        if len(listener_tables) > MAX_LISTENERS:
            root.error("listeners", f"{len(listener_tables)} listeners; at most {MAX_LISTENERS}")
        listeners = [self.listener(t) for t in listener_tables]
        report_duplicates([(t, t.value_of("name")) for t in listener_tables], "name", "listener name")
        if section is None or settings is None or None in groups or None in listeners:
            return None
        valid_groups = tuple(g for g in groups if g is not None)
        self._check_ring(section, settings.ring_size, valid_groups)
        valid_listeners = tuple(x for x in listeners if x is not None)
        self._check_capacity(section, settings, valid_listeners, valid_groups)
        self._check_dsr_ports(dict(zip(valid_groups, group_tables)), listeners)
        self._check_families(valid_groups, list(zip(listener_tables, listeners)))
        bgp = settings.bgp
        if bgp is not None:  # announced addresses default to (or must be) the listeners'
            bgp = resolve_announce(section.section("bgp"), bgp, valid_listeners)
            if bgp is None:
                return None
        return replace(settings, listeners=valid_listeners, target_groups=valid_groups, bgp=bgp)

    # --- [load_balancer] -------------------------------------------------------

    def settings(self, t: Table) -> m.LoadBalancer | None:
        """The host settings, as a LoadBalancer without listeners or groups."""
        t.only(*LB_KEYS)
        name = t.string("name", pattern=NAME, rule=NAME_RULE)
        interfaces = t.values("interfaces", matching(IFNAME, "a Linux interface name"), 0, 64, False)
        listed = interfaces or ()
        for index, ifname in enumerate(listed):
            if ifname in listed[:index]:
                t.error_item("interfaces", index, f"{ifname!r} is listed twice")
        ring_size = t.integer("ring_size", 3, MAX_RING_SIZE, 65537)
        if not is_prime(ring_size):
            prime = next_prime(ring_size)
            t.error("ring_size", f"{ring_size} is not a prime (a Maglev table size must be); try {prime}")
        metrics = t.string("metrics_address", "127.0.0.1:9464")
        try:
            host_port(metrics)
        except ValueError as exc:
            t.error("metrics_address", str(exc))
        netns_rule = "1-64 letters, digits, '.', '_' or '-'"
        bgp_table = t.table("bgp", required=False)
        settings = m.LoadBalancer(
            name=name or "",
            interfaces=interfaces or (),
            xdp_mode=t.choice("xdp_mode", m.XdpMode, m.XdpMode.AUTO),
            forwarding_mode=t.choice("forwarding_mode", m.ForwardingMode, m.ForwardingMode.NAT),
            netns=t.string("netns", pattern=NETNS, rule=netns_rule) if t.has("netns") else None,
            idle_timeout=t.integer("idle_timeout", 1, 4000, 60),
            tcp_idle_timeout=t.integer("tcp_idle_timeout", 1, 86400, 350),
            udp_idle_timeout=t.integer("udp_idle_timeout", 1, 86400, 120),
            tcp_closed_timeout=t.integer("tcp_closed_timeout", 1, 3600, 10),
            tcp_time_wait_timeout=t.integer("tcp_time_wait_timeout", 1, 3600, 120),
            new_flow_rate_limit=t.integer("new_flow_rate_limit", 0, 100_000_000, 20000),
            tcp_syn_timeout=t.integer("tcp_syn_timeout", 1, 3600, 60),
            max_vips=t.integer("max_vips", *CAPACITY_RANGES["max_vips"]),
            max_targets=t.integer("max_targets", *CAPACITY_RANGES["max_targets"]),
            conntrack_size=t.integer("conntrack_size", *CAPACITY_RANGES["conntrack_size"]),
            half_open_size=t.integer("half_open_size", *CAPACITY_RANGES["half_open_size"]),
            header_timeout=t.integer("header_timeout", 1, 4000, 20),
            body_timeout=t.integer("body_timeout", 1, 4000, 20),
            min_body_rate=t.integer("min_body_rate", 1, 1 << 30, 500),
            max_response_head=t.integer("max_response_head", 1024, 1 << 20, 32 * 1024),
            http2=t.boolean("http2", True),
            tls_session_resumption=t.boolean("tls_session_resumption", True),
            ring_size=ring_size,
            full_nat_port_range=self.port_range(t, "full_nat_port_range", m.LoadBalancer.full_nat_port_range),
            workers=t.integer("workers", 0, 256, 0),
            access_log=self.access_log(t.section("access_log")),
            admin_socket=t.string("admin_socket", "/run/lb/admin.sock", max_len=107),  # sun_path
            metrics_address=metrics,
            bgp=None if bgp_table is None else read_bgp(bgp_table),
        )
        bgp_bad = t.has("bgp") and settings.bgp is None
        return settings if name is not None and interfaces is not None and not bgp_bad else None

    def access_log(self, t: Table) -> m.AccessLog:
        t.only(*ACCESS_LOG_KEYS)
        default = m.AccessLog()
        path = t.string("path", default.path, max_len=4095)
        if path != "-" and not path.startswith("/"):
            t.error("path", f"{shown(path)} is not an absolute path (or \"-\", the daemon's standard error)")
        elif path.endswith("/"):
            t.error("path", f"{shown(path)} names a directory; name the file")
        return m.AccessLog(
            enabled=t.boolean("enabled", default.enabled),
            path=path,
            format=t.choice("format", m.AccessLogFormat, default.format),
        )

    def port_range(self, t: Table, key: str, default: tuple[int, int]) -> tuple[int, int]:
        """[LOW, HIGH], both included (ip_local_port_range's two numbers)."""
        if not t.has(key):
            return default
        value = t.raw(key)
        ok = (isinstance(value, list) and len(value) == 2
              and all(isinstance(v, int) and not isinstance(v, bool) for v in value))
        low, high = (int(value[0]), int(value[1])) if ok and isinstance(value, list) else (0, 0)
        if not ok or not 1024 <= low <= high <= 65535 or high - low + 1 < MIN_FULL_NAT_PORTS:
            rule = f"[LOW, HIGH] with 1024 <= LOW <= HIGH <= 65535, at least {MIN_FULL_NAT_PORTS} ports"
            t.error(key, f"{value!r} is not a port range: {rule}")
            return default
        return low, high

    def _check_dsr_ports(self, groups: dict[m.TargetGroup, Table], listeners: list[m.Listener | None]) -> None:
        """DSR leaves the packet's destination alone: its targets must listen on the listener's port."""
        for listener in listeners:
            if listener is None or not listener.protocol.is_l4:
                continue
            action = listener.default_action
            if not isinstance(action, m.ForwardAction):
                continue
            for group, table in groups.items():
                if group.name != action.target_groups[0].name or not group.direct_server_return:
                    continue
                why = f"direct_server_return cannot translate ports: listener {listener.name!r} is on {listener.port}"
                if group.port != listener.port and any(t.port is None for t in group.targets):
                    table.error("port", f"{group.port} differs; {why}")
                for target, target_table in zip(group.targets, table.tables("targets")):
                    if target.port is not None and target.port != listener.port:
                        target_table.error("port", f"{target.port} differs; {why}")

    def _check_families(self, groups: tuple[m.TargetGroup, ...],
                        listeners: list[tuple[Table, m.Listener | None]]) -> None:
        """A flow stays within one family (the XDP program rewrites addresses,
        never translates between IPv4 and IPv6): a TCP/UDP listener forwards
        to targets of its own address's family, and a group serves listeners
        of one family (its registrations must then be of that one too)."""
        by_name = {g.name: g for g in groups}
        first_listener: dict[str, m.Listener] = {}
        for t, listener in listeners:
            if listener is None or not listener.protocol.is_l4 or "address" in t.bad:
                continue
            action = listener.default_action
            if not isinstance(action, m.ForwardAction) or action.target_groups[0].name not in by_name:
                continue
            group = by_name[action.target_groups[0].name]
            if len({x.address.version for x in group.targets}) > 1:
                continue  # reported at the group's targets
            family = family_name(listener.address)
            where = f"listener {listener.name!r} is on {listener.address}, an {family} address"
            rule = f"a flow stays within one family, so {with_article(listener.protocol)} listener forwards to " \
                   f"targets of its own address's family"
            default = t.section("default_action")
            key = "target_group" if default.has("target_group") else "target_groups"
            other = next((x for x in group.targets if x.address.version != listener.address.version), None)
            earlier = first_listener.setdefault(group.name, listener)
            if other is not None:
                default.error(key, f"target group {group.name!r} has {family_name(other.address)} targets "
                                   f"({other.address}); {where}: {rule}")
            elif earlier.address.version != listener.address.version:
                default.error(key, f"target group {group.name!r} serves listener {earlier.name!r} on "
                                   f"{earlier.address} already; {where}: {rule}")

    def _check_ring(self, t: Table, ring_size: int, groups: tuple[m.TargetGroup, ...]) -> None:
        for group in groups:
            if group.protocol.is_l4 and len(group.targets) > ring_size:
                targets = f"the {len(group.targets)} targets of target group {group.name!r}"
                t.error("ring_size", f"{ring_size} is smaller than {targets}")

    def _check_capacity(self, t: Table, lb: m.LoadBalancer, listeners: tuple[m.Listener, ...],
                        groups: tuple[m.TargetGroup, ...]) -> None:
        """What the config asks of the XDP program fits the capacity it sets."""
        slots = lb.max_vips * 2 * lb.ring_size
        if slots > MAX_RING_SLOTS:
            t.error("max_vips", f"{lb.max_vips} VIPs x 2 x ring_size {lb.ring_size} = {slots} ring slots; at most "
                                f"{MAX_RING_SLOTS} (1 GiB): lower max_vips or ring_size")
        vips = sum(1 for listener in listeners if listener.protocol.is_l4)
        if vips > lb.max_vips:
            t.error("max_vips", f"{lb.max_vips} is fewer than the {vips} TCP/UDP listeners (one VIP each)")
        endpoints = len(l4_endpoints(groups, lambda g: g.targets))
        if endpoints > lb.max_targets:
            t.error("max_targets", f"{lb.max_targets} is fewer than the {endpoints} targets of TCP/UDP target groups "
                                   "(each address and port counted once)")

    # --- [[target_groups]] -------------------------------------------------------

    def target_group(self, t: Table) -> m.TargetGroup | None:
        t.only(*GROUP_KEYS)
        name = t.string("name", pattern=NAME, rule=NAME_RULE)
        scheme = t.one_of("protocol", GROUP_PROTOCOLS)
        # An HTTPS group is an HTTP one with TLS to its targets (m.TargetGroup.tls).
        protocol = None if scheme is None else m.Protocol.HTTP if scheme == "HTTPS" else m.Protocol(scheme)
        port = t.integer("port", 1, 65535)
        targets = self.targets(t, protocol, port)
        group_tls = self.target_tls(t) if scheme == "HTTPS" else None
        if scheme is not None and scheme != "HTTPS" and t.has("ca_bundle"):
            t.error("ca_bundle", f"only for HTTPS target groups; this one is {scheme}")
        health = self.health_check(t.section("health_check"), protocol or m.Protocol.HTTP, scheme == "HTTPS")
        slow_start = t.integer("slow_start", 0, 900, 0, rule="0 (off) or 30..900")
        if 0 < slow_start < 30:
            t.error("slow_start", f"{slow_start} is not allowed; use 0 (off) or 30..900")
        algorithm = t.choice("algorithm", m.Algorithm, m.Algorithm.ROUND_ROBIN)
        stickiness = self.stickiness(t.section("stickiness"))
        if protocol is not None and protocol.is_l4:
            if algorithm is not m.Algorithm.ROUND_ROBIN:
                why = f"{protocol.value} flows are spread by the Maglev flow hash"
                t.error("algorithm", f"{algorithm.value!r} applies to HTTP target groups only; {why}")
            if stickiness.enabled:
                why = "L4 flows already stay on one target"
                t.error("stickiness", f"lb_cookie stickiness needs an HTTP target group, not {protocol.value}; {why}")
        anomaly = t.boolean("anomaly_mitigation", False)
        if anomaly and protocol is not None and protocol.is_l4:
            t.error("anomaly_mitigation", f"needs an HTTP target group, not {protocol.value}; "
                    "it judges targets by their requests' outcomes")
        dereg = t.integer("deregistration_delay", 0, 3600, 300)
        unhealthy_termination = t.boolean("unhealthy_connection_termination", True)
        dereg_termination = t.boolean("deregistration_connection_termination", False)
        preserve = t.boolean("preserve_client_ip", True)
        dsr = t.boolean("direct_server_return", False)
        if protocol is not None and not protocol.is_l4:
            for key in L4_ONLY_GROUP_KEYS:
                if t.has(key):
                    t.error(key, f"applies to TCP and UDP target groups only; this one is {protocol.value}")
        if dsr and not preserve:
            why = "the target answers the client directly, so it must see the client's address"
            t.error("direct_server_return", f"true needs preserve_client_ip = true; {why}")
        if name is None or protocol is None or port is None or targets is None or "ca_bundle" in t.bad:
            return None
        return m.TargetGroup(name, protocol, port, targets, health, dereg, slow_start, algorithm, stickiness,
                             unhealthy_termination, dereg_termination, anomaly, group_tls,
                             preserve_client_ip=preserve, direct_server_return=dsr)

    def target_tls(self, t: Table) -> m.TargetTls:
        """An HTTPS group's TLS: a CA bundle to verify its targets with, if any (read now)."""
        path = t.string("ca_bundle") if t.has("ca_bundle") else None
        if path is None:
            return m.TargetTls()
        file = self._path(path)
        try:
            return m.TargetTls(file, tls.read_ca_bundle(file))
        except tls.CertificateError as exc:
            t.error("ca_bundle", str(exc))
            return m.TargetTls()

    def targets(self, group: Table, protocol: m.Protocol | None, port: int | None) -> tuple[m.Target, ...] | None:
        tables = group.tables("targets")
        before, self.target_count = self.target_count, self.target_count + len(tables)
        if len(tables) > MAX_TARGETS_PER_GROUP:
            group.error("targets", f"{len(tables)} targets; at most {MAX_TARGETS_PER_GROUP} per target group")
        elif before <= MAX_TARGETS < self.target_count:
            each = "each target of each group counts"
            group.error("targets", f"{self.target_count} targets in the load balancer; at most {MAX_TARGETS} ({each})")
        result: list[m.Target | None] = []
        seen: list[tuple[Table, Hashable | None]] = []
        for t in tables:
            t.only("id", "port", "weight")
            target = read_target(t, "id", protocol)
            resolved = target.traffic_port(port) if target is not None and port is not None else None
            seen.append((t, None if target is None or resolved is None else f"{target.address}:{resolved}"))
            first = next((x for x in result if x is not None), None)
            if protocol is not None and protocol.is_l4 and target is not None and first is not None \
                    and first.address.version != target.address.version:
                index = result.index(first)
                t.error("id", f"{target.address} is {family_name(target.address)} but targets[{index}] "
                              f"({first.address}) is {family_name(first.address)}: the targets of "
                              f"{with_article(protocol)} target group are of one family, as a flow stays within "
                              "its listener's")
            result.append(target)
        report_duplicates(seen, "id", "target")
        return None if None in result else tuple(t for t in result if t is not None)

    def health_check(self, t: Table, protocol: m.Protocol, https: bool = False) -> m.HealthCheck:
        t.only(*HEALTH_KEYS)
        l4 = protocol.is_l4
        HC = m.HealthCheckProtocol  # noqa: N806
        check = t.choice("protocol", HC, HC.TCP if l4 else HC.HTTPS if https else HC.HTTP)
        if check is HC.TCP:
            for key in HTTP_ONLY_HEALTH_KEYS:
                if t.has(key):
                    t.error(key, "only used by HTTP health checks; this one is TCP")
        # lb's extension: intervals and timeouts down to 1 s (ELB: 5 and 2), as
        # keepalived (1 s) and HAProxy (2 s) check; below ELB's minimum interval a
        # timeout may equal it (1 s / 1 s): checks still never overlap.
        interval = t.integer("interval", MIN_HEALTH_INTERVAL, 300, 30)
        timeout = t.integer("timeout", MIN_HEALTH_TIMEOUT, 120, 10 if l4 else 5)
        fast = interval < ELB_MIN_HEALTH_INTERVAL
        if (timeout > interval or (timeout == interval and not fast)) and not {"timeout", "interval"} & t.bad:
            origin = "" if t.has("timeout") else f" (the {protocol.value} default)"
            limit = "at most" if fast else "smaller than"
            t.error("timeout", f"{timeout}{origin} must be {limit} interval ({interval})")
        path = t.string("path", "/", max_len=1024, pattern=HEALTH_PATH, rule=HEALTH_PATH_RULE)
        if not path.startswith("/"):
            t.error("path", f"{path!r} must start with '/'")
        health_port = t.port_or("port", "traffic-port")
        matcher = t.string("matcher", "200-399" if l4 else "200")
        try:
            matcher_codes(matcher)
        except ValueError as exc:
            t.error("matcher", str(exc))
        return m.HealthCheck(
            enabled=t.boolean("enabled", True),
            protocol=check,
            port=health_port if isinstance(health_port, int) else None,  # None: the traffic port
            path=path,
            method=t.one_of("method", ("GET", "HEAD"), "GET"),
            interval=interval,
            timeout=timeout,
            healthy_threshold=t.integer("healthy_threshold", 2, 10, 5),
            unhealthy_threshold=t.integer("unhealthy_threshold", 2, 10, 2),
            matcher=matcher,
        )

    def stickiness(self, t: Table) -> m.Stickiness:
        t.only("enabled", "type", "duration")
        return m.Stickiness(
            enabled=t.boolean("enabled", False),
            type=t.one_of("type", ("lb_cookie",), "lb_cookie"),
            duration=t.integer("duration", 1, 604800, 86400),
        )

    # --- [[listeners]] -----------------------------------------------------------

    def listener(self, t: Table) -> m.Listener | None:
        t.only(*LISTENER_KEYS)
        name = t.string("name", pattern=NAME, rule=NAME_RULE)
        scheme = t.one_of("protocol", LISTENER_PROTOCOLS)
        # An HTTPS listener is the HTTP proxy with TLS in front (m.Listener.tls).
        protocol = None if scheme is None else m.Protocol.HTTP if scheme == "HTTPS" else m.Protocol(scheme)
        address = t.address("address")
        port = t.integer("port", 1, 65535, 443) if scheme == "HTTPS" else t.integer("port", 1, 65535)
        listener_tls = self.listener_tls(t) if scheme == "HTTPS" else None
        if scheme is not None and scheme != "HTTPS":
            for key in TLS_KEYS:
                if t.has(key):
                    t.error(key, f"only for HTTPS listeners; this one is {scheme}")
        if address is not None and protocol is not None:
            self._check_address(t, address, protocol)
            if port is not None:
                self._claim_endpoint(t, address, port, protocol)
        default = t.table("default_action")
        action = None if default is None else self.routing.action(default, protocol)
        rules = self.routing.rules(t, protocol)
        if name is None or protocol is None or address is None or port is None:
            return None
        if action is None or rules is None or (scheme == "HTTPS" and listener_tls is None):
            return None
        return m.Listener(name, protocol, address, port, action, rules, listener_tls)

    def listener_tls(self, t: Table) -> m.ListenerTls | None:
        """An HTTPS listener's certificates (each file read and checked) and policy."""
        policy = t.one_of("ssl_policy", tuple(tls.POLICIES), m.DEFAULT_SSL_POLICY)
        default_table = t.table("default_certificate")
        default = None if default_table is None else self.certificate(default_table)
        tables = t.tables("certificates")
        before, self.certificate_count = self.certificate_count, self.certificate_count + len(tables)
        if before <= MAX_CERTIFICATES < self.certificate_count:
            most = f"at most {MAX_CERTIFICATES} in the certificate lists of a load balancer (defaults not counted)"
            tables[MAX_CERTIFICATES - before].error(None, f"certificate {MAX_CERTIFICATES + 1}; {most}")
        others = [self.certificate(c) for c in tables]
        if default is None or None in others:
            return None
        return m.ListenerTls(default, tuple(c for c in others if c is not None), policy)

    def certificate(self, t: Table) -> m.Certificate | None:
        """``{ certificate = "chain.pem", key = "key.pem" }``: read and checked now,
        so a reload with a bad file changes nothing (lb.tls.read_certificate)."""
        t.only("certificate", "key")
        cert_path = t.string("certificate")
        key_path = t.string("key") if t.has("key") else None
        if cert_path is None or "key" in t.bad:
            return None
        cert_file = self._path(cert_path)
        key_file = self._path(key_path) if key_path is not None else cert_file
        try:
            return tls.read_certificate(cert_file, key_file)
        except tls.CertificateError as exc:
            t.error("key" if exc.file == key_file and key_path is not None else "certificate", str(exc))
            return None

    def _path(self, path: str) -> str:
        if self.base is None or Path(path).is_absolute():
            return str(Path(path).absolute())
        return str(self.base / path)

    def _check_address(self, t: Table, address: m.IPAddress, protocol: m.Protocol) -> None:
        if address.is_multicast or (protocol.is_l4 and address.is_unspecified):
            t.error("address", f"{address} cannot be {with_article(protocol)} listener address")
        elif protocol.is_l4 and (why := unusable_ipv6(address)):
            t.error("address", f"{address} cannot be {with_article(protocol)} listener address: {why}")

    def _claim_endpoint(self, t: Table, address: m.IPAddress, port: int, protocol: m.Protocol) -> None:
        transport = "UDP" if protocol is m.Protocol.UDP else "TCP"  # HTTP listens on TCP too
        other = self.endpoints.setdefault((address, port, transport), t)
        if other is not t:
            where = f"[{address}]" if address.version == 6 else str(address)
            owner = f"{other.path} ({other.data.get('name')!r})"
            t.error("port", f"{where}:{port}/{transport} is already used by {owner}")


# --- one target: of a [[target_groups]] table, or of an admin request ----------------


def family_name(address: m.IPAddress) -> str:
    return "IPv4" if address.version == 4 else "IPv6"


def unusable_ipv6(address: m.IPAddress) -> str | None:
    """Why an IPv6 address cannot be a TCP/UDP VIP or target, or None: the
    XDP path forwards by global routes (bpf_fib_lookup), so an address that
    needs an interface (link-local) or is IPv4 in disguise (mapped) cannot be one."""
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.is_link_local:
        return "a link-local address (fe80::/10) needs an interface; use a global or unique local (fd00::/8) one"
    if address.ipv4_mapped is not None:
        return f"an IPv4-mapped address; write {address.ipv4_mapped}"
    return None


def read_target(t: Table, key: str, protocol: m.Protocol | None) -> m.Target | None:
    """The address under ``key`` (``id`` in a file), an optional port and a
    weight, checked against the group's protocol; None if anything is wrong."""
    address = t.address(key)
    port = t.integer("port", 1, 65535) if t.has("port") else None
    weight = t.integer("weight", 1, 100, 1)
    if address is not None and (address.is_unspecified or address.is_multicast):
        t.error(key, f"{address} is not a unicast address")
    elif address is not None and protocol is not None and protocol.is_l4 and (why := unusable_ipv6(address)):
        t.error(key, f"{address} cannot be a {protocol.value} target: {why}")
    if address is None or {key, "port", "weight"} & t.bad:
        return None
    return m.Target(address, port, weight)


# --- the admin socket's requests, read like a file --------------------------------------

# Each command and the keys it takes besides "cmd".
ADMIN_COMMANDS: dict[str, tuple[str, ...]] = {
    "status": (),
    "targets": ("group",),
    "register": ("group", "target", "port", "weight"),
    "deregister": ("group", "target", "port"),
    "reload": (),
    "bgp_withdraw": (),  # lb bgp withdraw / announce: out of and back into rotation
    "bgp_announce": (),
}


@dataclass(frozen=True)
class AdminRequest:
    """A validated admin request: the command and what it names."""

    cmd: str
    group: m.TargetGroup | None = None  # targets (optional), register, deregister
    target: m.Target | None = None  # register, deregister


def l4_endpoints(groups: Sequence[m.TargetGroup],
                 targets_of: Callable[[m.TargetGroup], Sequence[m.Target]]) -> set[tuple[Hashable, int]]:
    """The (address, port) of every target of the TCP/UDP groups: one target id each in the XDP program."""
    return {(t.address, t.traffic_port(g.port)) for g in groups if g.protocol.is_l4 for t in targets_of(g)}


def admin_request(
    request: Mapping[str, Any],
    lb: m.LoadBalancer,
    registered: Callable[[str], Sequence[m.Target]] = lambda group: (),
) -> AdminRequest:
    """Validate one admin socket request against the running config.

    The same reader, rules, ranges and messages as a file, with the command
    as the key path (``register.weight: -5 is outside 1..100``): unknown keys
    with a did-you-mean, a target as a ``[[target_groups]]`` target (``target``
    is its ``id``), and a new registration within the quotas, counting what
    ``registered(group)`` says each group has now. Raises ConfigError with
    every issue; nothing is changed here.
    """
    issues: list[ConfigIssue] = []
    cmd = Table(request, "", issues).one_of("cmd", tuple(ADMIN_COMMANDS))
    if cmd is None:
        raise ConfigError(issues)
    t = Table(request, cmd, issues)
    keys = ADMIN_COMMANDS[cmd]
    t.only("cmd", *keys)
    group = None
    if "group" in keys and (t.has("group") or "target" in keys):
        name = t.string("group")
        groups = {g.name: g for g in lb.target_groups}
        group = groups.get(name) if name is not None else None
        if name is not None and group is None:
            t.error("group", f"{shown(name)} is not a defined target group (defined: {', '.join(sorted(groups))})")
    protocol = None if group is None else group.protocol
    target = read_target(t, "target", protocol) if "target" in keys else None
    if cmd == "register" and group is not None and target is not None:
        if group.protocol.is_l4:
            _registration_family(t, lb, group, target, registered)
        if "target" not in t.bad:
            _registration_quota(t, lb, group, target, registered)
    if issues:
        raise ConfigError(issues)
    return AdminRequest(cmd, group, target)


def _registration_family(
    t: Table,
    lb: m.LoadBalancer,
    group: m.TargetGroup,
    target: m.Target,
    registered: Callable[[str], Sequence[m.Target]],
) -> None:
    """A TCP/UDP group's targets are of the family of the listeners that forward
    to it and of its other targets: a flow stays within one family."""
    family = family_name(target.address)
    for listener in lb.listeners_of(m.Protocol.TCP, m.Protocol.UDP):
        action = listener.default_action
        if isinstance(action, m.ForwardAction) and action.target_groups[0].name == group.name \
                and listener.address.version != target.address.version:
            t.error("target", f"{target.address} is {family}; target group {shown(group.name)} serves listener "
                              f"{listener.name!r} on {listener.address}: a flow stays within one family")
            return
    other = next((x for x in registered(group.name) if x.address.version != target.address.version), None)
    if other is not None:
        t.error("target", f"{target.address} is {family}; target group {shown(group.name)} has "
                          f"{family_name(other.address)} targets ({other.address}): they are of one family")


def _registration_quota(
    t: Table,
    lb: m.LoadBalancer,
    group: m.TargetGroup,
    target: m.Target,
    registered: Callable[[str], Sequence[m.Target]],
) -> None:
    """A new target must fit the group's and the load balancer's quotas, as in a file."""
    endpoint = (target.address, target.traffic_port(group.port))
    current = registered(group.name)
    if any((other.address, other.traffic_port(group.port)) == endpoint for other in current):
        return  # registered already (perhaps draining): a new weight, not one more target
    count = len(current) + 1
    total = sum(len(registered(g.name)) for g in lb.target_groups) + 1
    known = l4_endpoints(lb.target_groups, lambda g: registered(g.name))
    name = shown(group.name)
    if count > MAX_TARGETS_PER_GROUP:
        t.error("target", f"target group {name} would have {count} targets; at most {MAX_TARGETS_PER_GROUP}")
    elif group.protocol.is_l4 and count > lb.ring_size:
        t.error("target", f"target group {name} would have {count} targets, more than ring_size ({lb.ring_size})")
    elif group.protocol.is_l4 and endpoint not in known and len(known) >= lb.max_targets:
        t.error("target", f"the load balancer would have {len(known) + 1} TCP/UDP targets; at most max_targets "
                          f"({lb.max_targets})")
    elif total > MAX_TARGETS:
        each = "each target of each group counts"
        t.error("target", f"the load balancer would have {total} targets; at most {MAX_TARGETS} ({each})")
