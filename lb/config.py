"""TOML configuration → :class:`lb.model.LoadBalancer`, with ELB's defaults.

The file has three parts: ``[load_balancer]`` (host settings),
``[[listeners]]`` (each with a default action and, for HTTP, rules) and
``[[target_groups]]`` (targets, health check, draining). Names, limits and
defaults follow Elastic Load Balancing (shared/REFERENCE.md) so an ELB user
can read a file without a manual; ``lb/data/default.toml`` is a commented
example describing the namespace lab.

Validation reports every mistake at once, each naming its key path, the
bad value and what is allowed, e.g.
``listeners[0].rules[2].priority: 0 is outside 1..50000``. The result is
either a whole model or a :class:`ConfigError`, never a half-built model.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Hashable, Mapping
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

from lb import model as m
from lb.config_reader import (
    ConfigError,
    ConfigIssue,
    Table,
    cidr,
    host_port,
    is_prime,
    matcher_codes,
    matching,
    next_prime,
    report_duplicates,
)

__all__ = ["ConfigError", "ConfigIssue", "default_config_text", "load", "load_default", "loads", "parse"]

DEFAULT_SOURCE = "<embedded default.toml>"

# --- limits (ELB's, REFERENCE.md, unless marked as ours) ---------------------

NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,30}[A-Za-z0-9])?")
NAME_RULE = "1-32 letters, digits and hyphens, not starting or ending with a hyphen"
IFNAME = re.compile(r"(?!\.{1,2}$)[^/:\s]{1,15}")  # Linux dev_valid_name
NETNS = re.compile(r"(?!\.{1,2}$)[A-Za-z0-9_.-]{1,64}")
HOST_PATTERN = re.compile(r"[A-Za-z0-9.*?-]{1,128}")
PATH_PATTERN = re.compile(r"[A-Za-z0-9_\-.$/~\"'@:+&*?]{1,128}")
METHOD = re.compile(r"[A-Z_-]{1,40}")
HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'+.^_`|~-]{1,40}")
PRINTABLE = re.compile(r"[\x20-\x7e]{1,128}")
PRINTABLE_RULE = "1-128 printable ASCII characters"

MAX_PRIORITY = 50000
MAX_VALUES = 3  # per condition
MAX_WILDCARDS = 5  # per rule
MAX_FORWARD_GROUPS = 5
MAX_RING_SIZE = 2**20  # ours: Maglev table size bound
SINGLE_CONDITIONS = (
    m.ConditionField.HOST_HEADER,
    m.ConditionField.HTTP_REQUEST_METHOD,
    m.ConditionField.PATH_PATTERN,
    m.ConditionField.SOURCE_IP,
)
CONTENT_TYPES = ("text/plain", "text/css", "text/html", "application/javascript", "application/json")
REDIRECT_STATUS: dict[int | str, int] = {301: 301, 302: 302, "HTTP_301": 301, "HTTP_302": 302}
REDIRECT_PROTOCOLS = ("HTTP", "HTTPS", "#{protocol}")
ACTION_TYPES = ("forward", "redirect", "fixed-response")
LB_KEYS = (
    "name", "interfaces", "xdp_mode", "forwarding_mode", "netns", "idle_timeout", "tcp_idle_timeout",
    "udp_idle_timeout", "ring_size", "workers", "admin_socket", "metrics_address",
)  # fmt: skip
LISTENER_KEYS = ("name", "protocol", "address", "port", "default_action", "rules")
GROUP_KEYS = (
    "name", "protocol", "port", "targets", "health_check", "deregistration_delay", "slow_start",
    "algorithm", "stickiness",
)  # fmt: skip
HEALTH_KEYS = (
    "enabled", "protocol", "port", "path", "method", "interval", "timeout", "healthy_threshold",
    "unhealthy_threshold", "matcher",
)  # fmt: skip
HTTP_ONLY_HEALTH_KEYS = ("path", "method", "matcher")


# --- public API ----------------------------------------------------------------


def load(path: str | Path) -> m.LoadBalancer:
    """Read and validate a TOML file; every problem raises ConfigError."""
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
    return loads(text, source)


def loads(text: str, source: str | None = "<string>") -> m.LoadBalancer:
    """Parse and validate TOML text."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([ConfigIssue("", f"invalid TOML: {exc}")], source) from None
    return parse(data, source)


def parse(data: Mapping[str, Any], source: str | None = None) -> m.LoadBalancer:
    """Validate already-parsed TOML data and build the model."""
    issues: list[ConfigIssue] = []
    result = _Builder().load_balancer(Table(data, "", issues))
    if issues or result is None:
        raise ConfigError(issues, source)
    return result


def default_config_text() -> str:
    """The embedded default configuration (the namespace lab), as TOML text."""
    return resources.files("lb").joinpath("data/default.toml").read_text(encoding="utf-8")


def load_default() -> m.LoadBalancer:
    """The embedded default configuration, validated."""
    return loads(default_config_text(), DEFAULT_SOURCE)


# --- checks that need the model ------------------------------------------------


def _wildcards(condition: m.Condition) -> int:
    texts = list(condition.values) + [q.value + (q.key or "") for q in condition.query]
    if condition.field in (m.ConditionField.SOURCE_IP, m.ConditionField.HTTP_REQUEST_METHOD):
        return 0
    return sum(text.count("*") + text.count("?") for text in texts)


def _a(protocol: m.Protocol) -> str:
    """'an HTTP', 'a TCP', 'a UDP': the protocol with its article."""
    return f"{'an' if protocol is m.Protocol.HTTP else 'a'} {protocol.value}"


# --- the builder -----------------------------------------------------------------


class _Builder:
    """Builds the model section by section, recording issues as it goes."""

    def __init__(self) -> None:
        # Declared target groups by name; protocol None when it is invalid.
        self.groups: dict[str, m.Protocol | None] = {}
        # (address, port, transport) → the listener table that took it.
        self.endpoints: dict[tuple[m.IPAddress, int, str], Table] = {}

    def load_balancer(self, root: Table) -> m.LoadBalancer | None:
        root.only("load_balancer", "listeners", "target_groups")
        section = root.table("load_balancer")
        settings = None if section is None else self.settings(section)
        group_tables = root.tables("target_groups")
        self._index_groups(group_tables)
        groups = [self.target_group(t) for t in group_tables]
        report_duplicates([(t, t.value_of("name")) for t in group_tables], "name", "target group name")
        listener_tables = root.tables("listeners")
        listeners = [self.listener(t) for t in listener_tables]
        report_duplicates([(t, t.value_of("name")) for t in listener_tables], "name", "listener name")
        if section is None or settings is None or None in groups or None in listeners:
            return None
        valid_groups = tuple(g for g in groups if g is not None)
        self._check_ring(section, settings.ring_size, valid_groups)
        return replace(settings, listeners=tuple(x for x in listeners if x is not None), target_groups=valid_groups)

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
        settings = m.LoadBalancer(
            name=name or "",
            interfaces=interfaces or (),
            xdp_mode=t.choice("xdp_mode", m.XdpMode, m.XdpMode.AUTO),
            forwarding_mode=t.choice("forwarding_mode", m.ForwardingMode, m.ForwardingMode.NAT),
            netns=t.string("netns", pattern=NETNS, rule=netns_rule) if t.has("netns") else None,
            idle_timeout=t.integer("idle_timeout", 1, 4000, 60),
            tcp_idle_timeout=t.integer("tcp_idle_timeout", 1, 86400, 350),
            udp_idle_timeout=t.integer("udp_idle_timeout", 1, 86400, 120),
            ring_size=ring_size,
            workers=t.integer("workers", 0, 256, 0),
            admin_socket=t.string("admin_socket", "/run/lb/admin.sock", max_len=107),  # sun_path
            metrics_address=metrics,
        )
        return settings if name is not None and interfaces is not None else None

    def _check_ring(self, t: Table, ring_size: int, groups: tuple[m.TargetGroup, ...]) -> None:
        for group in groups:
            if group.protocol.is_l4 and len(group.targets) > ring_size:
                targets = f"the {len(group.targets)} targets of target group {group.name!r}"
                t.error("ring_size", f"{ring_size} is smaller than {targets}")

    # --- [[target_groups]] -------------------------------------------------------

    def _index_groups(self, tables: list[Table]) -> None:
        protocols = {p.value: p for p in m.Protocol}
        for t in tables:
            name, protocol = t.data.get("name"), t.data.get("protocol")
            if isinstance(name, str):
                self.groups.setdefault(name, protocols.get(protocol) if isinstance(protocol, str) else None)

    def target_group(self, t: Table) -> m.TargetGroup | None:
        t.only(*GROUP_KEYS)
        name = t.string("name", pattern=NAME, rule=NAME_RULE)
        protocol = t.choice("protocol", m.Protocol)
        port = t.integer("port", 1, 65535)
        targets = self.targets(t, protocol, port)
        health = self.health_check(t.section("health_check"), protocol or m.Protocol.HTTP)
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
        dereg = t.integer("deregistration_delay", 0, 3600, 300)
        if name is None or protocol is None or port is None or targets is None:
            return None
        return m.TargetGroup(name, protocol, port, targets, health, dereg, slow_start, algorithm, stickiness)

    def targets(self, group: Table, protocol: m.Protocol | None, port: int | None) -> tuple[m.Target, ...] | None:
        result: list[m.Target | None] = []
        seen: list[tuple[Table, Hashable | None]] = []
        for t in group.tables("targets"):
            t.only("id", "port", "weight")
            address = t.address("id")
            target_port = t.integer("port", 1, 65535) if t.has("port") else None
            weight = t.integer("weight", 1, 100, 1)
            if address is not None and protocol is not None and protocol.is_l4 and address.version == 6:
                why = f"{protocol.value} target groups are served by the IPv4-only XDP path"
                t.error("id", f"{address} is IPv6; {why}")
            elif address is not None and (address.is_unspecified or address.is_multicast):
                t.error("id", f"{address} is not a unicast address")
            resolved = target_port or port
            endpoint = f"{address}:{resolved}" if address is not None and resolved is not None else None
            seen.append((t, endpoint))
            result.append(None if address is None else m.Target(address, target_port, weight))
        report_duplicates(seen, "id", "target")
        return None if None in result else tuple(t for t in result if t is not None)

    def health_check(self, t: Table, protocol: m.Protocol) -> m.HealthCheck:
        t.only(*HEALTH_KEYS)
        l4 = protocol.is_l4
        HC = m.HealthCheckProtocol  # noqa: N806
        check = t.choice("protocol", HC, HC.TCP if l4 else HC.HTTP)
        if check is HC.TCP:
            for key in HTTP_ONLY_HEALTH_KEYS:
                if t.has(key):
                    t.error(key, "only used by HTTP health checks; this one is TCP")
        interval = t.integer("interval", 5, 300, 30)
        timeout = t.integer("timeout", 2, 120, 10 if l4 else 5)
        if timeout >= interval and not {"timeout", "interval"} & t.bad:
            origin = "" if t.has("timeout") else f" (the {protocol.value} default)"
            t.error("timeout", f"{timeout}{origin} must be smaller than interval ({interval})")
        path = t.string("path", "/")
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
        protocol = t.choice("protocol", m.Protocol)
        address = t.address("address")
        port = t.integer("port", 1, 65535)
        if address is not None and protocol is not None:
            self._check_address(t, address, protocol)
            if port is not None:
                self._claim_endpoint(t, address, port, protocol)
        default = t.table("default_action")
        action = None if default is None else self.action(default, protocol)
        rules = self.rules(t, protocol)
        if name is None or protocol is None or address is None or port is None:
            return None
        if action is None or rules is None:
            return None
        return m.Listener(name, protocol, address, port, action, rules)

    def _check_address(self, t: Table, address: m.IPAddress, protocol: m.Protocol) -> None:
        if protocol.is_l4 and address.version == 6:
            served = f"{protocol.value} listeners are served by the IPv4-only XDP path"
            t.error("address", f"{address} is IPv6; {served}")
        elif address.is_multicast or (protocol.is_l4 and address.is_unspecified):
            t.error("address", f"{address} cannot be {_a(protocol)} listener address")

    def _claim_endpoint(self, t: Table, address: m.IPAddress, port: int, protocol: m.Protocol) -> None:
        transport = "UDP" if protocol is m.Protocol.UDP else "TCP"  # HTTP listens on TCP too
        other = self.endpoints.setdefault((address, port, transport), t)
        if other is not t:
            where = f"[{address}]" if address.version == 6 else str(address)
            owner = f"{other.path} ({other.data.get('name')!r})"
            t.error("port", f"{where}:{port}/{transport} is already used by {owner}")

    def rules(self, listener: Table, protocol: m.Protocol | None) -> tuple[m.Rule, ...] | None:
        tables = listener.tables("rules")
        if tables and protocol is not None and protocol.is_l4:
            why = f"a {protocol.value} listener sends every flow to its default_action"
            listener.error("rules", f"rules are only allowed on HTTP listeners; {why}")
            return None
        rules = [self.rule(t, protocol) for t in tables]
        report_duplicates([(t, t.value_of("priority")) for t in tables], "priority", "priority")
        if None in rules:
            return None
        return tuple(sorted((r for r in rules if r is not None), key=lambda rule: rule.priority))

    def rule(self, t: Table, protocol: m.Protocol | None) -> m.Rule | None:
        t.only("priority", "conditions", "actions")
        priority = t.integer("priority", 1, MAX_PRIORITY)
        conditions = self.conditions(t)
        actions = t.tables("actions", required=True)
        if len(actions) != 1 and "actions" not in t.bad:
            t.error("actions", f"a rule takes exactly one action, got {len(actions)}")
        built = [self.action(a, protocol) for a in actions]
        if priority is None or conditions is None or len(built) != 1 or built[0] is None:
            return None
        return m.Rule(priority, conditions, built[0])

    # --- conditions -----------------------------------------------------------------

    def conditions(self, rule: Table) -> tuple[m.Condition, ...] | None:
        tables = rule.tables("conditions", required=True)
        if not tables and "conditions" not in rule.bad:
            rule.error("conditions", "a rule needs at least one condition")
        built = [self.condition(t) for t in tables]
        first: dict[m.ConditionField, Table] = {}
        for t, condition in zip(tables, built, strict=True):
            if condition is not None and condition.field in SINGLE_CONDITIONS:
                if condition.field in first:
                    where = first[condition.field].path
                    t.error("field", f"only one {condition.field.value!r} condition per rule (first at {where})")
                first.setdefault(condition.field, t)
        wildcards = sum(_wildcards(c) for c in built if c is not None)
        if wildcards > MAX_WILDCARDS:
            rule.error("conditions", f"{wildcards} wildcards ('*' or '?') in one rule; at most {MAX_WILDCARDS}")
        if not tables or None in built:
            return None
        return tuple(c for c in built if c is not None)

    def condition(self, t: Table) -> m.Condition | None:
        field = t.choice("field", m.ConditionField)
        F = m.ConditionField  # noqa: N806 - reads like the enum it is
        if field is None:
            t.only("field", "values", "header_name")
            return None
        if field is F.QUERY_STRING:
            t.only("field", "values")
            return self._query_condition(t)
        header = None
        if field is F.HTTP_HEADER:
            t.only("field", "header_name", "values")
            header = t.string("header_name", pattern=HEADER_NAME, rule="1-40 header name characters, no '*'")
        else:
            t.only("field", "values")
        check = {
            F.HOST_HEADER: matching(HOST_PATTERN, "up to 128 letters, digits, '-', '.', '*' and '?'"),
            F.PATH_PATTERN: matching(PATH_PATTERN, "up to 128 of A-Z a-z 0-9 _ - . $ / ~ \" ' @ : + & * ?"),
            F.HTTP_HEADER: matching(PRINTABLE, PRINTABLE_RULE),
            F.HTTP_REQUEST_METHOD: matching(METHOD, "1-40 uppercase letters, '-' or '_' (no wildcards)"),
            F.SOURCE_IP: cidr,
        }[field]
        values = t.values("values", check, 1, MAX_VALUES, True)
        if values is None or (field is F.HTTP_HEADER and header is None):
            return None
        return m.Condition(field, values, header_name=header)

    def _query_condition(self, t: Table) -> m.Condition | None:
        pairs: list[m.QueryPair | None] = []
        tables = t.tables("values", required=True)
        if "values" not in t.bad:
            t.count("values", len(tables), 1, MAX_VALUES)
        for pair in tables:
            pair.only("key", "value")
            key = pair.string("key", pattern=PRINTABLE, rule=PRINTABLE_RULE) if pair.has("key") else None
            value = pair.string("value", pattern=PRINTABLE, rule=PRINTABLE_RULE)
            pairs.append(None if value is None else m.QueryPair(key, value))
        if not tables or None in pairs or "values" in t.bad:
            return None
        return m.Condition(m.ConditionField.QUERY_STRING, query=tuple(p for p in pairs if p is not None))

    # --- actions ----------------------------------------------------------------

    def action(self, t: Table, protocol: m.Protocol | None) -> m.Action | None:
        kind = t.one_of("type", ACTION_TYPES)
        if kind is None:
            return None
        if protocol is not None and protocol.is_l4 and kind != "forward":
            t.error("type", f"{kind!r} is not allowed on a {protocol.value} listener; only 'forward'")
            return None
        if kind == "forward":
            return self.forward(t, protocol)
        if kind == "redirect":
            return self.redirect(t)
        return self.fixed_response(t)

    def forward(self, t: Table, protocol: m.Protocol | None) -> m.ForwardAction | None:
        t.only("type", "target_group", "target_groups", "stickiness")
        refs: list[tuple[Table, str, m.WeightedTargetGroup | None]] = []
        if t.has("target_group") and t.has("target_groups"):
            t.error(None, "set target_group (one group) or target_groups (a weighted list), not both")
        elif not t.has("target_group") and not t.has("target_groups"):
            t.error(None, "needs target_group (one group) or target_groups (a weighted list)")
        elif t.has("target_group"):
            name = t.string("target_group")
            refs.append((t, "target_group", None if name is None else m.WeightedTargetGroup(name)))
        else:
            refs = self._weighted_groups(t)
        for table, key, ref in refs:
            if ref is not None:
                self._check_reference(table, key, ref.name, protocol)
        stickiness = t.section("stickiness")
        stickiness.only("enabled", "duration")
        sticky = m.GroupStickiness(
            enabled=stickiness.boolean("enabled", False),
            duration=stickiness.integer("duration", 1, 604800, 3600),
        )
        if protocol is not None and protocol.is_l4:
            if len(refs) > 1:
                one = f"a {protocol.value} listener forwards to exactly one target group"
                t.error("target_groups", f"{one}, got {len(refs)}")
            if sticky.enabled:
                t.error("stickiness", f"group stickiness needs an HTTP listener, not {protocol.value}")
        groups = [ref for _, _, ref in refs]
        if not groups or None in groups:
            return None
        return m.ForwardAction(tuple(g for g in groups if g is not None), sticky)

    def _weighted_groups(self, t: Table) -> list[tuple[Table, str, m.WeightedTargetGroup | None]]:
        tables = t.tables("target_groups")
        if not tables and "target_groups" not in t.bad:
            t.error("target_groups", "needs at least one target group")
        elif len(tables) > MAX_FORWARD_GROUPS:
            most = f"a forward action takes at most {MAX_FORWARD_GROUPS}"
            t.error("target_groups", f"{len(tables)} target groups; {most}")
        refs: list[tuple[Table, str, m.WeightedTargetGroup | None]] = []
        for g in tables:
            g.only("name", "weight")
            name, weight = g.string("name"), g.integer("weight", 0, 999, 1)
            refs.append((g, "name", None if name is None else m.WeightedTargetGroup(name, weight)))
        report_duplicates([(g, g.value_of("name")) for g in tables], "name", "target group")
        weights = [ref.weight for _, _, ref in refs if ref is not None]
        if weights and len(weights) == len(refs) and not any(weights):
            t.error("target_groups", "every weight is 0; at least one group needs a weight above 0")
        return refs

    def _check_reference(self, t: Table, key: str, name: str, protocol: m.Protocol | None) -> None:
        if name not in self.groups:
            defined = ", ".join(sorted(self.groups)) or "none"
            t.error(key, f"{name!r} is not a defined target group (defined: {defined})")
            return
        group_protocol = self.groups[name]
        if protocol is not None and group_protocol is not None and group_protocol is not protocol:
            only = f"{_a(protocol)} listener forwards only to {protocol.value} target groups"
            t.error(key, f"target group {name!r} is {group_protocol.value}; {only}")

    def redirect(self, t: Table) -> m.RedirectAction | None:
        t.only("type", "status_code", "protocol", "host", "port", "path", "query")
        default = m.RedirectAction(status_code=301)
        status = t.lookup("status_code", REDIRECT_STATUS, "301, 302 (or 'HTTP_301', 'HTTP_302')")
        protocol = t.one_of("protocol", REDIRECT_PROTOCOLS, default.protocol)
        host = t.string("host", default.host, max_len=128)
        port_number = t.port_or("port", default.port, digits=True)
        port = default.port if port_number is None else str(port_number)
        path = t.string("path", default.path, max_len=128)
        if not path.startswith("/"):
            t.error("path", f"{path!r} must start with '/' (an absolute path)")
        query = t.string("query", default.query, max_len=128, empty=True)  # "" drops the query
        if query.startswith("?"):
            t.error("query", f"{query!r} must not start with '?'")
        changed = (protocol, host, port, path) != (default.protocol, default.host, default.port, default.path)
        if not changed and not {"protocol", "host", "port", "path"} & t.bad:
            what = "at least one of protocol, host, port or path to something other than its #{...} placeholder"
            t.error(None, f"redirect changes nothing: set {what}")
        if status is None:
            return None
        return m.RedirectAction(status, protocol, host, port, path, query)

    def fixed_response(self, t: Table) -> m.FixedResponseAction | None:
        t.only("type", "status_code", "content_type", "body")
        rule = "a 2xx, 4xx or 5xx code (200-299, 400-599)"
        status = t.integer("status_code", 200, 599, rule=rule)
        if status is not None and 300 <= status <= 399:
            t.error("status_code", f"{status} is not allowed; use {rule}")
            status = None
        content_type = t.one_of("content_type", CONTENT_TYPES, "text/plain")
        body = t.string("body", "", max_len=1024, empty=True)
        if status is None:
            return None
        return m.FixedResponseAction(status, content_type, body)
