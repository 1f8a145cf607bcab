"""Listener rules, their conditions and actions: TOML tables → model, for :mod:`lb.config`.

The same conventions as the rest of the config (:mod:`lb.config._reader`):
every mistake is recorded with its key path, and a part that is wrong comes
back as None. Forward actions are checked against the target groups the
file declares (:meth:`RuleBuilder.declare_groups`), so a listener may name a
group defined further down.
"""

from __future__ import annotations

import ipaddress
import re

from lb import model as m
from lb.config._checks import PCHAR, PCT, URI_CHARS, cidr, matching
from lb.config._reader import Table, report_duplicates, shown

# --- limits (ELB's, docs/elb-reference.md) ------------------------------------

HOST_PATTERN = re.compile(r"[A-Za-z0-9.*?-]{1,128}")
PATH_PATTERN = re.compile(r"[A-Za-z0-9_\-.$/~\"'@:+&*?]{1,128}")
METHOD = re.compile(r"[A-Z_-]{1,40}")
HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'+.^_`|~-]{1,40}")
PRINTABLE = re.compile(r"[\x20-\x7e]{1,128}")
PRINTABLE_RULE = "1-128 printable ASCII characters"

MAX_PRIORITY = 50000
MAX_RULES = 100  # per load balancer, default actions not counted
MAX_VALUES = 3  # per condition
MAX_RULE_VALUES = 5  # per rule, all its conditions together
MAX_WILDCARDS = 5  # per rule
MAX_FORWARD_GROUPS = 5

# A redirect's host, path and query become the Location header. ELB gives each
# 1-128 characters (a query 0-128), "not percent-encoded", and names the
# placeholders each may hold; lb adds the characters: a host name, or RFC 3986's
# path and query characters. Nothing else, so no CR, LF, space or control
# character can reach the response head.
REDIRECT_HOST = re.compile(r"(?:[A-Za-z0-9.-]|#\{host\})+|\[[0-9A-Fa-f:.]+\]")
REDIRECT_HOST_RULE = (
    "a host name of letters, digits, '-' and '.' (an IDN in punycode, xn--...) that may hold #{host}, "
    "or an IPv6 address in brackets"
)
REDIRECT_PATH = re.compile(rf"(?:[{PCHAR}/]|{PCT}|#\{{(?:host|path|port)\}})+")
REDIRECT_PATH_RULE = f"URI path characters: {URI_CHARS}, '/', and #{{host}}, #{{path}}, #{{port}}"
REDIRECT_QUERY = re.compile(rf"(?:[{PCHAR}/?]|{PCT}|#\{{(?:protocol|host|port|path|query)\}})*")
REDIRECT_QUERY_RULE = (
    f"URI query characters: {URI_CHARS}, '/', '?', and #{{protocol}}, #{{host}}, #{{port}}, #{{path}}, #{{query}}"
)
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


def _wildcards(condition: m.Condition) -> int:
    texts = list(condition.values) + [q.value + (q.key or "") for q in condition.query]
    if condition.field in (m.ConditionField.SOURCE_IP, m.ConditionField.HTTP_REQUEST_METHOD):
        return 0
    return sum(text.count("*") + text.count("?") for text in texts)


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def with_article(protocol: m.Protocol) -> str:
    """'an HTTP', 'a TCP', 'a UDP': the protocol with its article."""
    return f"{'an' if protocol is m.Protocol.HTTP else 'a'} {protocol.value}"


class RuleBuilder:
    """Builds rules and actions, recording issues in the tables it is given."""

    def __init__(self) -> None:
        # Declared target groups by name; protocol None when it is invalid.
        self.groups: dict[str, m.Protocol | None] = {}
        # Rules of the listeners read so far, for the per-load-balancer quota.
        self.rule_count = 0

    def declare_groups(self, tables: list[Table]) -> None:
        """Index the file's target groups, before any action refers to one."""
        protocols = {p.value: p for p in m.Protocol}
        protocols["HTTPS"] = m.Protocol.HTTP  # the HTTP proxy with TLS to the targets
        for t in tables:
            name, protocol = t.data.get("name"), t.data.get("protocol")
            if isinstance(name, str):
                self.groups.setdefault(name, protocols.get(protocol) if isinstance(protocol, str) else None)

    # --- rules ----------------------------------------------------------------------

    def rules(self, listener: Table, protocol: m.Protocol | None) -> tuple[m.Rule, ...] | None:
        tables = listener.tables("rules")
        if tables and protocol is not None and protocol.is_l4:
            why = f"a {protocol.value} listener sends every flow to its default_action"
            listener.error("rules", f"rules are only allowed on HTTP listeners; {why}")
            return None
        before, self.rule_count = self.rule_count, self.rule_count + len(tables)
        if before <= MAX_RULES < self.rule_count:
            most = f"at most {MAX_RULES} rules per load balancer, not counting default actions"
            tables[MAX_RULES - before].error(None, f"rule {MAX_RULES + 1} of the load balancer; {most}")
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
        values = sum(len(c.values) + len(c.query) for c in built if c is not None)
        if values > MAX_RULE_VALUES:
            most = f"at most {MAX_RULE_VALUES} (and {MAX_VALUES} per condition)"
            rule.error("conditions", f"{values} condition values in one rule; {most}")
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
            kinds = "HTTP and HTTPS" if protocol is m.Protocol.HTTP else protocol.value
            only = f"{with_article(protocol)} listener forwards only to {kinds} target groups"
            t.error(key, f"target group {name!r} is {group_protocol.value}; {only}")

    def redirect(self, t: Table) -> m.RedirectAction | None:
        t.only("type", "status_code", "protocol", "host", "port", "path", "query")
        default = m.RedirectAction(status_code=301)
        status = t.lookup("status_code", REDIRECT_STATUS, "301, 302 (or 'HTTP_301', 'HTTP_302')")
        protocol = t.one_of("protocol", REDIRECT_PROTOCOLS, default.protocol)
        host = t.string("host", default.host, max_len=128, pattern=REDIRECT_HOST, rule=REDIRECT_HOST_RULE)
        if host.startswith("[") and not _is_ipv6(host[1:-1]):
            t.error("host", f"{shown(host)} is not valid: {REDIRECT_HOST_RULE}")
        port_number = t.port_or("port", default.port, digits=True)
        port = default.port if port_number is None else str(port_number)
        path = t.string("path", default.path, max_len=128, pattern=REDIRECT_PATH, rule=REDIRECT_PATH_RULE)
        if not path.startswith("/"):
            t.error("path", f"{shown(path)} must start with '/' (an absolute path)")
        rule = REDIRECT_QUERY_RULE
        query = t.string("query", default.query, max_len=128, empty=True, pattern=REDIRECT_QUERY, rule=rule)
        if query.startswith("?"):  # "" drops the query
            t.error("query", f"{shown(query)} must not start with '?'")
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
        body = t.string("body", "", max_len=1024, empty=True, text=True)  # the body, never the head
        if status is None:
            return None
        return m.FixedResponseAction(status, content_type, body)
