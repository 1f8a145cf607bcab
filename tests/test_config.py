"""lb.config and `lb validate`: TOML → model, ELB defaults, every rejection.

Bad inputs are a table: each case edits a known-good config at one or more
key paths and names the one issue expected (its exact key path and words
of its message). No root needed.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from lb import config
from lb.cli import cli
from lb.cli.common import LAB_CONFIG, SYSTEM_CONFIG
from lb.cli.validate import describe_action
from lb.config import ConfigError, ConfigIssue
from lb.model import (
    Algorithm,
    Condition,
    ConditionField,
    FixedResponseAction,
    ForwardAction,
    ForwardingMode,
    GroupStickiness,
    HealthCheck,
    HealthCheckProtocol,
    Listener,
    LoadBalancer,
    Protocol,
    QueryPair,
    RedirectAction,
    Rule,
    Stickiness,
    Target,
    TargetGroup,
    WeightedTargetGroup,
    XdpMode,
)

# --- a known-good config and a way to edit it by key path ----------------------------


def good() -> dict[str, Any]:
    """An HTTP listener with three rules, a TCP and a UDP listener, four groups."""
    return copy.deepcopy(
        {
            "load_balancer": {"name": "t"},
            "listeners": [
                {
                    "name": "web",
                    "protocol": "HTTP",
                    "address": "10.0.0.100",
                    "port": 80,
                    "default_action": {"type": "forward", "target_group": "web"},
                    "rules": [
                        {
                            "priority": 10,
                            "conditions": [{"field": "path-pattern", "values": ["/api/*"]}],
                            "actions": [{"type": "forward", "target_groups": [{"name": "api", "weight": 1}]}],
                        },
                        {
                            "priority": 20,
                            "conditions": [{"field": "host-header", "values": ["old.example.com"]}],
                            "actions": [{"type": "redirect", "status_code": 301, "host": "www.example.com"}],
                        },
                        {
                            "priority": 30,
                            "conditions": [{"field": "path-pattern", "values": ["/ping"]}],
                            "actions": [{"type": "fixed-response", "status_code": 200, "body": "ok"}],
                        },
                    ],
                },
                {
                    "name": "echo",
                    "protocol": "TCP",
                    "address": "10.0.0.100",
                    "port": 9000,
                    "default_action": {"type": "forward", "target_group": "echo"},
                },
                {
                    "name": "dns",
                    "protocol": "UDP",
                    "address": "10.0.0.100",
                    "port": 53,
                    "default_action": {"type": "forward", "target_group": "dns"},
                },
            ],
            "target_groups": [
                {"name": "web", "protocol": "HTTP", "port": 80, "targets": [{"id": "10.0.1.11"}, {"id": "10.0.1.12"}]},
                {"name": "api", "protocol": "HTTP", "port": 80, "targets": [{"id": "10.0.1.13"}]},
                {"name": "echo", "protocol": "TCP", "port": 9000, "targets": [{"id": "10.0.1.11"}]},
                {"name": "dns", "protocol": "UDP", "port": 53, "targets": [{"id": "10.0.1.11"}]},
            ],
        }
    )


DELETE = object()
_TOKEN = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def edit(data: dict[str, Any], path: str, value: object) -> None:
    """Set (or with DELETE remove) the value at a key path such as a.b[0].c;
    an index one past the end appends."""
    tokens: list[str | int] = [int(i) if i else k for k, i in _TOKEN.findall(path)]
    node: Any = data
    for token in tokens[:-1]:
        node = node[token]
    last = tokens[-1]
    if value is DELETE:
        del node[last]
    elif isinstance(last, int) and last == len(node):
        node.append(value)
    else:
        node[last] = value


def issues_of(data: dict[str, Any]) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as info:
        config.parse(data)
    return info.value.errors


def test_the_good_config_is_good() -> None:
    lb = config.parse(good())
    assert [listener.name for listener in lb.listeners] == ["web", "echo", "dns"]


# --- bad inputs: one table ----------------------------------------------------------

R0 = "listeners[0].rules[0]"
R1 = "listeners[0].rules[1]"
R2 = "listeners[0].rules[2]"
C0 = f"{R0}.conditions[0]"
A0 = f"{R0}.actions[0]"
REDIRECT = f"{R1}.actions[0]"
FIXED = f"{R2}.actions[0]"
HC = "target_groups[0].health_check"
HTTP_GROUP = {"protocol": "HTTP", "port": 80}
SIX_GROUPS = [{"name": n} for n in ("web", "api", "g1", "g2", "g3", "g4")]
SIX_GROUPS_EDITS = {f"target_groups[{4 + i}]": {"name": f"g{i + 1}", **HTTP_GROUP} for i in range(4)}


def case(edits: dict[str, object], path: str, *words: str, id: str) -> Any:
    return pytest.param(edits, path, words, id=id)


BAD = [
    # unknown keys, at every level, naming the allowed ones
    case({"extra": 1}, "extra", "unknown key", "load_balancer, listeners, target_groups", id="unknown-top-level"),
    case({"load_balancer.nmae": "x"}, "load_balancer.nmae", "did you mean 'name'", "allowed keys", id="unknown-lb-key"),
    case({"listeners[0].protocl": "HTTP"}, "listeners[0].protocl", "did you mean 'protocol'",
         id="unknown-listener-key"),  # fmt: skip
    case({"target_groups[0].targets[0].ip": "1.2.3.4"}, "target_groups[0].targets[0].ip", "unknown key",
         "id, port, weight", id="unknown-target-key"),  # fmt: skip
    case({f"{HC}": {"intervall": 10}}, f"{HC}.intervall", "did you mean 'interval'", id="unknown-health-key"),
    case({f"{C0}.header_name": "X"}, f"{C0}.header_name", "unknown key", "field, values", id="header-name-on-path"),
    case({f"{REDIRECT}.target_group": "web"}, f"{REDIRECT}.target_group", "unknown key", "status_code",
         id="unknown-redirect-key"),  # fmt: skip
    case({f"{R0}.action": []}, f"{R0}.action", "did you mean 'actions'", id="unknown-rule-key"),
    # missing required keys
    case({"load_balancer.name": DELETE}, "load_balancer.name", "required key is missing", id="missing-lb-name"),
    case({"load_balancer": DELETE}, "load_balancer", "required key is missing", id="missing-lb-section"),
    case({"listeners[0].port": DELETE}, "listeners[0].port", "required key is missing", id="missing-port"),
    case({"listeners[1].default_action": DELETE}, "listeners[1].default_action", "required key is missing",
         id="missing-default-action"),  # fmt: skip
    case({"target_groups[2].protocol": DELETE}, "target_groups[2].protocol", "required key is missing",
         id="missing-group-protocol"),  # fmt: skip
    case({f"{R0}.actions": DELETE}, f"{R0}.actions", "required key is missing", id="missing-actions"),
    case({f"{C0}": {"field": "http-header", "values": ["x"]}}, f"{C0}.header_name", "required key is missing",
         id="missing-header-name"),  # fmt: skip
    case({f"{C0}": {"field": "query-string", "values": [{"key": "v"}]}}, f"{C0}.values[0].value",
         "required key is missing", id="missing-query-value"),  # fmt: skip
    case({f"{FIXED}.status_code": DELETE}, f"{FIXED}.status_code", "required key is missing",
         id="missing-fixed-status"),  # fmt: skip
    # wrong types (bool is not an int)
    case({"listeners[0].port": "80"}, "listeners[0].port", "expected an integer", "string '80'", id="port-string"),
    case({"target_groups[0].port": True}, "target_groups[0].port", "expected an integer", "boolean true",
         id="port-bool"),  # fmt: skip
    case({"load_balancer.idle_timeout": 1.5}, "load_balancer.idle_timeout", "expected an integer", "float 1.5",
         id="timeout-float"),  # fmt: skip
    case({"listeners": {"name": "x"}}, "listeners", "expected an array of tables", "a table", id="listeners-table"),
    case({"target_groups[0].targets": ["10.0.1.1"]}, "target_groups[0].targets[0]", "expected a table",
         "string '10.0.1.1'", id="target-not-table"),  # fmt: skip
    case({f"{C0}.values": [1]}, f"{C0}.values[0]", "expected a string", "integer 1", id="value-not-string"),
    case({f"{C0}.values": "/api/*"}, f"{C0}.values", "expected an array of strings", id="values-not-array"),
    case({f"{HC}": {"enabled": "yes"}}, f"{HC}.enabled", "expected a boolean", id="enabled-string"),
    # enums list what is allowed
    case({"listeners[0].protocol": "http"}, "listeners[0].protocol", "'http' is not one of HTTP, HTTPS, TCP, UDP",
         id="protocol-lowercase"),  # fmt: skip
    case({"load_balancer.xdp_mode": "fast"}, "load_balancer.xdp_mode", "'fast'", "native, generic, auto",
         id="xdp-mode"),  # fmt: skip
    case({"load_balancer.forwarding_mode": "dsr"}, "load_balancer.forwarding_mode", "'dsr'", "nat",
         id="forwarding-mode"),  # fmt: skip
    case({"target_groups[0].algorithm": "random"}, "target_groups[0].algorithm", "'random'",
         "round_robin, least_outstanding_requests, weighted_random", id="algorithm"),  # fmt: skip
    case({f"{C0}.field": "cookie"}, f"{C0}.field", "'cookie'", "host-header", "source-ip", id="condition-field"),
    case({f"{A0}.type": "reject"}, f"{A0}.type", "'reject'", "forward, redirect, fixed-response", id="action-type"),
    case({f"{FIXED}.content_type": "text/xml"}, f"{FIXED}.content_type", "'text/xml'", "application/json",
         id="content-type"),  # fmt: skip
    case({f"{REDIRECT}.protocol": "FTP"}, f"{REDIRECT}.protocol", "'FTP'", "HTTP, HTTPS, #{protocol}",
         id="redirect-protocol"),  # fmt: skip
    case({"target_groups[0].stickiness": {"enabled": True, "type": "app_cookie"}}, "target_groups[0].stickiness.type",
         "'app_cookie'", "lb_cookie", id="stickiness-type"),  # fmt: skip
    case({f"{HC}": {"method": "POST"}}, f"{HC}.method", "'POST'", "GET, HEAD", id="health-method"),
    # names
    case({"load_balancer.name": "-lab"}, "load_balancer.name", "'-lab'", "1-32 letters", id="lb-name"),
    case({"listeners[0].name": "a" * 33}, "listeners[0].name", "1-32 letters", id="listener-name-long"),
    case({"listeners[1].name": "web"}, "listeners[1].name", "duplicate listener name 'web'", "listeners[0]",
         id="duplicate-listener"),  # fmt: skip
    case({"target_groups[4]": {"name": "web", **HTTP_GROUP}}, "target_groups[4].name",
         "duplicate target group name 'web'", "target_groups[0]", id="duplicate-group"),  # fmt: skip
    # references and protocol pairing
    case({"listeners[0].default_action.target_group": "nope"}, "listeners[0].default_action.target_group",
         "'nope' is not a defined target group", "api, dns, echo, web", id="undefined-group-default"),  # fmt: skip
    case({f"{A0}.target_groups[0].name": "nope"}, f"{A0}.target_groups[0].name", "'nope' is not a defined",
         id="undefined-group-rule"),  # fmt: skip
    case({"listeners[0].default_action.target_group": "echo"}, "listeners[0].default_action.target_group",
         "target group 'echo' is TCP; an HTTP listener", id="http-to-tcp-group"),  # fmt: skip
    case({"listeners[1].default_action.target_group": "dns"}, "listeners[1].default_action.target_group",
         "target group 'dns' is UDP", "TCP listener", id="tcp-to-udp-group"),  # fmt: skip
    case({"listeners[2].default_action.target_group": "web"}, "listeners[2].default_action.target_group",
         "is HTTP", "UDP listener", id="udp-to-http-group"),  # fmt: skip
    case({"target_groups[4]": {"name": "echo2", "protocol": "TCP", "port": 9001},
          "listeners[1].default_action": {"type": "forward", "target_groups": [{"name": "echo"}, {"name": "echo2"}]}},
         "listeners[1].default_action.target_groups", "exactly one target group", "got 2",
         id="tcp-forward-two-groups"),  # fmt: skip
    case({"listeners[1].rules": [good()["listeners"][0]["rules"][2]]}, "listeners[1].rules",
         "only allowed on HTTP listeners", id="rules-on-tcp"),  # fmt: skip
    case({"listeners[2].default_action": {"type": "fixed-response", "status_code": 200}},
         "listeners[2].default_action.type", "'fixed-response' is not allowed on a UDP listener", "only 'forward'",
         id="fixed-on-udp"),  # fmt: skip
    case({"listeners[1].default_action.stickiness": {"enabled": True}}, "listeners[1].default_action.stickiness",
         "needs an HTTP listener", id="group-stickiness-on-tcp"),  # fmt: skip
    # forward actions
    case({f"{A0}.target_groups": SIX_GROUPS, **SIX_GROUPS_EDITS}, f"{A0}.target_groups", "6 target groups",
         "at most 5", id="six-groups"),  # fmt: skip
    case({f"{A0}.target_groups[0].weight": 1000}, f"{A0}.target_groups[0].weight", "1000 is outside 0..999",
         id="weight-1000"),  # fmt: skip
    case({f"{A0}.target_groups[0].weight": -1}, f"{A0}.target_groups[0].weight", "-1 is outside 0..999",
         id="weight-negative"),  # fmt: skip
    case({f"{A0}.target_groups": [{"name": "api", "weight": 0}]}, f"{A0}.target_groups", "every weight is 0",
         id="all-weights-zero"),  # fmt: skip
    case({f"{A0}.target_groups[1]": {"name": "api"}}, f"{A0}.target_groups[1].name",
         "duplicate target group 'api'", id="same-group-twice"),  # fmt: skip
    case({f"{A0}.target_groups": []}, f"{A0}.target_groups", "at least one target group", id="no-groups"),
    case({f"{A0}.target_group": "api"}, A0, "not both", id="both-forward-forms"),
    case({f"{A0}.target_groups": DELETE}, A0, "needs target_group", id="neither-forward-form"),
    case({f"{A0}.stickiness": {"enabled": True, "duration": 0}}, f"{A0}.stickiness.duration",
         "0 is outside 1..604800", id="group-stickiness-duration"),  # fmt: skip
    # rules
    case({f"{R2}.priority": 0}, f"{R2}.priority", "0 is outside 1..50000", id="priority-zero"),
    case({f"{R2}.priority": 50001}, f"{R2}.priority", "50001 is outside 1..50000", id="priority-high"),
    case({f"{R1}.priority": 10}, f"{R1}.priority", "duplicate priority 10", R0, id="duplicate-priority"),
    case({f"{R0}.actions[1]": {"type": "fixed-response", "status_code": 200}}, f"{R0}.actions",
         "exactly one action, got 2", id="two-actions"),  # fmt: skip
    case({f"{R0}.actions": []}, f"{R0}.actions", "exactly one action, got 0", id="no-action"),
    # conditions
    case({f"{R0}.conditions": []}, f"{R0}.conditions", "at least one condition", id="no-conditions"),
    case({f"{R0}.conditions[1]": {"field": "path-pattern", "values": ["/b"]}}, f"{R0}.conditions[1].field",
         "only one 'path-pattern' condition per rule", id="two-path-patterns"),  # fmt: skip
    case({f"{R1}.conditions[1]": {"field": "host-header", "values": ["b"]}}, f"{R1}.conditions[1].field",
         "only one 'host-header'", id="two-host-headers"),  # fmt: skip
    case({f"{C0}.values": ["/a", "/b", "/c", "/d"]}, f"{C0}.values", "4 values; at most 3", id="four-values"),
    case({f"{C0}.values": []}, f"{C0}.values", "at least 1 value", id="no-values"),
    case({f"{C0}.values": ["/a*b*c*", "/d*e?f*"]}, f"{R0}.conditions", "6 wildcards", "at most 5",
         id="six-wildcards"),  # fmt: skip
    case({f"{C0}": {"field": "http-request-method", "values": ["get"]}}, f"{C0}.values[0]", "'get'",
         "uppercase", id="method-lowercase"),  # fmt: skip
    case({f"{C0}": {"field": "http-request-method", "values": ["G*"]}}, f"{C0}.values[0]", "no wildcards",
         id="method-wildcard"),  # fmt: skip
    case({f"{C0}": {"field": "source-ip", "values": ["10.0.0.0/33"]}}, f"{C0}.values[0]", "'10.0.0.0/33'",
         "CIDR", id="bad-cidr"),  # fmt: skip
    case({f"{C0}": {"field": "source-ip", "values": ["10.0.0.1/24"]}}, f"{C0}.values[0]", "host bits",
         "10.0.0.0/24", id="cidr-host-bits"),  # fmt: skip
    case({f"{R1}.conditions[0].values": ["bad host"]}, f"{R1}.conditions[0].values[0]", "'bad host'",
         "letters, digits", id="host-space"),  # fmt: skip
    case({f"{C0}": {"field": "query-string", "values": []}}, f"{C0}.values", "at least 1 value",
         id="query-no-values"),  # fmt: skip
    # redirect
    case({REDIRECT: {"type": "redirect", "status_code": 301}}, REDIRECT, "changes nothing",
         "protocol, host, port or path", id="redirect-no-change"),  # fmt: skip
    case({REDIRECT: {"type": "redirect", "status_code": 302, "host": "#{host}", "path": "/#{path}"}}, REDIRECT,
         "changes nothing", id="redirect-placeholders-only"),  # fmt: skip
    case({f"{REDIRECT}.status_code": 307}, f"{REDIRECT}.status_code", "307 is not one of 301, 302", "HTTP_301",
         id="redirect-307"),  # fmt: skip
    case({f"{REDIRECT}.status_code": "HTTP_303"}, f"{REDIRECT}.status_code", "'HTTP_303'", id="redirect-http-303"),
    case({f"{REDIRECT}.path": "new"}, f"{REDIRECT}.path", "'new' must start with '/'", id="redirect-relative"),
    case({f"{REDIRECT}.port": 70000}, f"{REDIRECT}.port", "70000", "1..65535", id="redirect-port"),
    case({f"{REDIRECT}.query": "?a=1"}, f"{REDIRECT}.query", "must not start with '?'", id="redirect-query"),
    # fixed-response
    case({f"{FIXED}.status_code": 302}, f"{FIXED}.status_code", "302 is not allowed", "2xx, 4xx or 5xx",
         id="fixed-302"),  # fmt: skip
    case({f"{FIXED}.status_code": 600}, f"{FIXED}.status_code", "600 is not allowed", "200-299, 400-599",
         id="fixed-600"),  # fmt: skip
    case({f"{FIXED}.status_code": 100}, f"{FIXED}.status_code", "100 is not allowed", id="fixed-100"),
    case({f"{FIXED}.body": "x" * 1025}, f"{FIXED}.body", "1025 characters", "at most 1024", id="body-too-long"),
    # addresses and endpoints
    case({"listeners[0].address": "10.0.0.300"}, "listeners[0].address", "'10.0.0.300'", "IPv4 or IPv6",
         id="bad-ip"),  # fmt: skip
    case({"target_groups[0].targets[0].id": "backend1"}, "target_groups[0].targets[0].id", "'backend1'",
         "not an IPv4 or IPv6 address", id="target-hostname"),  # fmt: skip
    case({"listeners[1].port": 80}, "listeners[1].port", "10.0.0.100:80/TCP is already used by listeners[0]",
         id="tcp-on-http-endpoint"),  # fmt: skip
    case({"listeners[3]": {**good()["listeners"][2], "name": "dns2"}}, "listeners[3].port",
         "10.0.0.100:53/UDP is already used by listeners[2] ('dns')", id="same-udp-endpoint"),  # fmt: skip
    # a flow stays within one family: IPv6 VIPs forward to IPv6 targets, IPv4 to IPv4
    case({"listeners[2].address": "2001:db8::1"}, "listeners[2].default_action.target_group",
         "target group 'dns' has IPv4 targets (10.0.1.11)", "listener 'dns' is on 2001:db8::1, an IPv6 address",
         "one family", id="ipv6-udp-listener-ipv4-targets"),  # fmt: skip
    case({"target_groups[2].targets[0].id": "2001:db8::11"}, "listeners[1].default_action.target_group",
         "target group 'echo' has IPv6 targets (2001:db8::11)", "10.0.0.100, an IPv4 address", "one family",
         id="ipv4-tcp-listener-ipv6-targets"),  # fmt: skip
    case({"target_groups[3].targets[1]": {"id": "2001:db8::12"}}, "target_groups[3].targets[1].id",
         "2001:db8::12 is IPv6 but targets[0] (10.0.1.11) is IPv4", "of one family", id="mixed-family-group"),
    case({"target_groups[3].targets": [], "listeners[3]": {**good()["listeners"][2], "name": "dns6",
                                                           "address": "2001:db8::1"}},
         "listeners[3].default_action.target_group", "target group 'dns' serves listener 'dns' on 10.0.0.100",
         "one family", id="one-group-two-families"),  # fmt: skip
    case({"listeners[1].address": "fe80::1"}, "listeners[1].address", "cannot be a TCP listener address",
         "link-local", "fd00::/8", id="link-local-tcp-listener"),  # fmt: skip
    case({"target_groups[3].targets[0].id": "::ffff:10.0.1.11"}, "target_groups[3].targets[0].id",
         "cannot be a UDP target", "IPv4-mapped", "write 10.0.1.11", id="ipv4-mapped-udp-target"),  # fmt: skip
    case({"target_groups[0].targets[1].id": "10.0.1.11"}, "target_groups[0].targets[1].id",
         "duplicate target '10.0.1.11:80'", "targets[0]", id="duplicate-target"),  # fmt: skip
    case({"target_groups[0].targets[1]": {"id": "10.0.1.11", "port": 80}}, "target_groups[0].targets[1].id",
         "duplicate target '10.0.1.11:80'", id="duplicate-target-explicit-port"),  # fmt: skip
    case({"target_groups[0].targets[0].id": "0.0.0.0"}, "target_groups[0].targets[0].id", "not a unicast",
         id="unspecified-target"),  # fmt: skip
    # numbers out of range
    case({"listeners[0].port": 65536}, "listeners[0].port", "65536 is outside 1..65535", id="port-high"),
    case({"target_groups[0].targets[0].port": 0}, "target_groups[0].targets[0].port", "0 is outside 1..65535",
         id="target-port-zero"),  # fmt: skip
    case({"target_groups[0].targets[0].weight": 0}, "target_groups[0].targets[0].weight", "0 is outside 1..100",
         id="target-weight"),  # fmt: skip
    case({"load_balancer.idle_timeout": 4001}, "load_balancer.idle_timeout", "4001 is outside 1..4000",
         id="idle-timeout"),  # fmt: skip
    case({"load_balancer.udp_idle_timeout": 0}, "load_balancer.udp_idle_timeout", "0 is outside 1..86400",
         id="udp-idle-timeout"),  # fmt: skip
    case({"load_balancer.workers": 257}, "load_balancer.workers", "257 is outside 0..256", id="workers"),
    case({"load_balancer.tcp_closed_timeout": 0}, "load_balancer.tcp_closed_timeout", "0 is outside 1..3600",
         id="tcp-closed-timeout"),  # fmt: skip
    case({"load_balancer.tcp_time_wait_timeout": 3601}, "load_balancer.tcp_time_wait_timeout",
         "3601 is outside 1..3600", id="tcp-time-wait-timeout"),  # fmt: skip
    case({"load_balancer.new_flow_rate_limit": -1}, "load_balancer.new_flow_rate_limit",
         "-1 is outside 0..100000000", id="new-flow-rate-limit"),  # fmt: skip
    case({"target_groups[2].unhealthy_connection_termination": "yes"},
         "target_groups[2].unhealthy_connection_termination", "boolean", id="unhealthy-termination"),  # fmt: skip
    case({"target_groups[2].preserve_client_ip": "no"}, "target_groups[2].preserve_client_ip", "boolean",
         id="preserve-client-ip"),  # fmt: skip
    case({"target_groups[0].preserve_client_ip": False}, "target_groups[0].preserve_client_ip",
         "TCP and UDP target groups only", "HTTP", id="preserve-client-ip-http"),  # fmt: skip
    case({"target_groups[0].direct_server_return": True}, "target_groups[0].direct_server_return",
         "TCP and UDP target groups only", id="dsr-http"),  # fmt: skip
    case({"target_groups[2].direct_server_return": True, "target_groups[2].preserve_client_ip": False},
         "target_groups[2].direct_server_return", "needs preserve_client_ip = true", id="dsr-full-nat"),  # fmt: skip
    case({"target_groups[2].direct_server_return": True, "target_groups[2].port": 9001},
         "target_groups[2].port", "9001 differs", "cannot translate ports", "'echo' is on 9000",
         id="dsr-group-port"),  # fmt: skip
    case({"target_groups[2].direct_server_return": True, "target_groups[2].targets[0].port": 9002},
         "target_groups[2].targets[0].port", "9002 differs", "cannot translate ports", id="dsr-target-port"),
    case({"load_balancer.full_nat_port_range": [2000, 2010]}, "load_balancer.full_nat_port_range",
         "at least 64 ports", id="full-nat-range-small"),  # fmt: skip
    case({"load_balancer.full_nat_port_range": [80, 32767]}, "load_balancer.full_nat_port_range",
         "1024 <= LOW", id="full-nat-range-low"),  # fmt: skip
    case({"load_balancer.full_nat_port_range": "1024-32767"}, "load_balancer.full_nat_port_range",
         "[LOW, HIGH]", id="full-nat-range-string"),  # fmt: skip
    case({"load_balancer.ring_size": 65536}, "load_balancer.ring_size", "65536 is not a prime", "try 65537",
         id="ring-not-prime"),  # fmt: skip
    case({"load_balancer.ring_size": 2}, "load_balancer.ring_size", "2 is outside 3..1048576", id="ring-small"),
    # the XDP program's capacity
    case({"load_balancer.tcp_syn_timeout": 0}, "load_balancer.tcp_syn_timeout", "0 is outside 1..3600",
         id="tcp-syn-timeout"),  # fmt: skip
    case({"load_balancer.conntrack_size": 1000}, "load_balancer.conntrack_size", "1000 is outside 1024..33554432",
         id="conntrack-size-small"),  # fmt: skip
    case({"load_balancer.half_open_size": 16777217}, "load_balancer.half_open_size",
         "16777217 is outside 1024..16777216", id="half-open-size-big"),  # fmt: skip
    case({"load_balancer.max_targets": 0}, "load_balancer.max_targets", "0 is outside 1..65536",
         id="max-targets-zero"),  # fmt: skip
    case({"load_balancer.max_vips": 1}, "load_balancer.max_vips", "1 is fewer than the 2 TCP/UDP listeners",
         id="max-vips-under-listeners"),  # fmt: skip
    case({"load_balancer.max_targets": 1}, "load_balancer.max_targets",
         "1 is fewer than the 2 targets of TCP/UDP target groups", id="max-targets-under-targets"),  # fmt: skip
    case({"load_balancer.max_vips": 4096}, "load_balancer.max_vips", "536879104 ring slots", "at most 268435456",
         "lower max_vips or ring_size", id="max-vips-ring-memory"),  # fmt: skip
    case({"load_balancer.ring_size": 3, "target_groups[2].targets": [{"id": f"10.0.1.{i}"} for i in range(1, 5)]},
         "load_balancer.ring_size", "smaller than the 4 targets of target group 'echo'",
         id="ring-under-targets"),  # fmt: skip
    case({"target_groups[0].deregistration_delay": 3601}, "target_groups[0].deregistration_delay",
         "3601 is outside 0..3600", id="deregistration-delay"),  # fmt: skip
    case({"target_groups[0].slow_start": 10}, "target_groups[0].slow_start", "10 is not allowed",
         "0 (off) or 30..900", id="slow-start-10"),  # fmt: skip
    case({"target_groups[0].slow_start": 901}, "target_groups[0].slow_start", "901 is not allowed",
         id="slow-start-901"),  # fmt: skip
    case({"target_groups[0].stickiness": {"enabled": True, "duration": 604801}},
         "target_groups[0].stickiness.duration", "604801 is outside 1..604800", id="stickiness-duration"),  # fmt: skip
    case({"target_groups[2].stickiness": {"enabled": True}}, "target_groups[2].stickiness",
         "needs an HTTP target group", id="stickiness-on-tcp"),  # fmt: skip
    case({"target_groups[2].algorithm": "weighted_random"}, "target_groups[2].algorithm",
         "HTTP target groups only", id="algorithm-on-tcp"),  # fmt: skip
    # health checks
    case({HC: {"interval": 0}}, f"{HC}.interval", "0 is outside 1..300", id="interval-low"),
    case({HC: {"interval": 2, "timeout": 0}}, f"{HC}.timeout", "0 is outside 1..120", id="timeout-low"),
    case({HC: {"interval": 2, "timeout": 3}}, f"{HC}.timeout", "3 must be at most interval (2)",
         id="fast-timeout-above-interval"),  # fmt: skip
    case({HC: {"interval": 10, "timeout": 10}}, f"{HC}.timeout", "must be smaller than interval (10)",
         id="timeout-not-below-interval"),  # fmt: skip
    case({"target_groups[2].health_check": {"interval": 10}}, "target_groups[2].health_check.timeout",
         "10 (the TCP default) must be smaller than interval (10)", id="tcp-default-timeout"),  # fmt: skip
    case({HC: {"healthy_threshold": 11}}, f"{HC}.healthy_threshold", "11 is outside 2..10", id="healthy-threshold"),
    case({HC: {"unhealthy_threshold": 1}}, f"{HC}.unhealthy_threshold", "1 is outside 2..10",
         id="unhealthy-threshold"),  # fmt: skip
    case({HC: {"matcher": "100"}}, f"{HC}.matcher", "'100' is not a valid matcher", "200..499", id="matcher-100"),
    case({HC: {"matcher": "299-200"}}, f"{HC}.matcher", "not a valid matcher", id="matcher-reversed"),
    case({HC: {"matcher": "200,abc"}}, f"{HC}.matcher", "not a valid matcher", id="matcher-garbage"),
    case({HC: {"path": "health"}}, f"{HC}.path", "must start with '/'", id="health-path"),
    case({HC: {"port": "80"}}, f"{HC}.port", "'80' is not allowed", "traffic-port", id="health-port-string"),
    case({"target_groups[2].health_check": {"path": "/"}}, "target_groups[2].health_check.path",
         "only used by HTTP health checks", id="path-on-tcp-check"),  # fmt: skip
    case({HC: {"protocol": "UDP"}}, f"{HC}.protocol", "'UDP' is not one of HTTP, HTTPS, TCP", id="health-protocol"),
    # host settings
    case({"load_balancer.metrics_address": "localhost:9464"}, "load_balancer.metrics_address",
         "ADDRESS:PORT", id="metrics-hostname"),  # fmt: skip
    case({"load_balancer.metrics_address": "127.0.0.1:0"}, "load_balancer.metrics_address", "'127.0.0.1:0'",
         id="metrics-port"),  # fmt: skip
    case({"load_balancer.interfaces": ["eth0/1"]}, "load_balancer.interfaces[0]", "interface name",
         id="interface-slash"),  # fmt: skip
    case({"load_balancer.interfaces": ["eth0", "eth0"]}, "load_balancer.interfaces[1]", "'eth0' is listed twice",
         id="interface-twice"),  # fmt: skip
    case({"load_balancer.netns": "a/b"}, "load_balancer.netns", "'a/b' is not valid", id="netns"),
    case({"load_balancer.admin_socket": "/" + "x" * 107}, "load_balancer.admin_socket", "at most 107",
         id="admin-socket-long"),  # fmt: skip
    # strings that end up in a response head or a request line: no CR, LF, NUL or other
    # control characters, and ELB's (or, where ELB names none, RFC 3986's) characters
    case({f"{REDIRECT}.host": "evil.example\r\nSet-Cookie: a=b"}, f"{REDIRECT}.host",
         r"'evil.example\r\nSet-Cookie: a=b' is not valid", "letters, digits", id="redirect-host-crlf"),  # fmt: skip
    case({f"{REDIRECT}.path": "/a\r\nSet-Cookie: a=b"}, f"{REDIRECT}.path", r"'/a\r\nSet-Cookie: a=b'",
         "%XX", id="redirect-path-crlf"),  # fmt: skip
    case({f"{REDIRECT}.query": "a=1\r\nSet-Cookie: a=b"}, f"{REDIRECT}.query", r"'a=1\r\nSet-Cookie: a=b'",
         id="redirect-query-crlf"),  # fmt: skip
    case({f"{REDIRECT}.host": "a\x00b"}, f"{REDIRECT}.host", r"'a\x00b' is not valid", id="redirect-host-nul"),
    case({f"{REDIRECT}.path": "/a\tb"}, f"{REDIRECT}.path", r"'/a\tb' is not valid", id="redirect-path-tab"),
    case({f"{REDIRECT}.path": "/a b"}, f"{REDIRECT}.path", "'/a b' is not valid", id="redirect-path-space"),
    case({f"{REDIRECT}.query": "a=\x7f"}, f"{REDIRECT}.query", r"'a=\x7f' is not valid", id="redirect-query-del"),
    case({f"{REDIRECT}.host": "b\u00fccher.example"}, f"{REDIRECT}.host", "punycode", id="redirect-host-idn"),
    case({f"{REDIRECT}.path": "/\u65e5\u672c"}, f"{REDIRECT}.path", "%XX", id="redirect-path-non-ascii"),
    case({f"{REDIRECT}.host": "evil.example:8080"}, f"{REDIRECT}.host", "'evil.example:8080' is not valid",
         id="redirect-host-with-port"),  # fmt: skip
    case({f"{REDIRECT}.host": "evil.example/x"}, f"{REDIRECT}.host", "is not valid", id="redirect-host-slash"),
    case({f"{REDIRECT}.host": "#{path}.example"}, f"{REDIRECT}.host", "#{host}", id="redirect-host-placeholder"),
    case({f"{REDIRECT}.path": "/#{query}"}, f"{REDIRECT}.path", "#{host}, #{path}, #{port}",
         id="redirect-path-placeholder"),  # fmt: skip
    case({f"{REDIRECT}.query": "a=1#top"}, f"{REDIRECT}.query", "'a=1#top' is not valid", id="redirect-query-hash"),
    case({f"{REDIRECT}.path": "/a%zz"}, f"{REDIRECT}.path", "'/a%zz' is not valid", id="redirect-path-bad-escape"),
    case({f"{REDIRECT}.host": "[::1"}, f"{REDIRECT}.host", "'[::1' is not valid", id="redirect-host-bracket"),
    case({HC: {"path": "/health\r\nX-Injected: 1"}}, f"{HC}.path", r"'/health\r\nX-Injected: 1' is not valid",
         id="health-path-crlf"),  # fmt: skip
    case({HC: {"path": "/a b"}}, f"{HC}.path", "'/a b' is not valid", id="health-path-space"),
    case({HC: {"path": "/" + "a" * 1024}}, f"{HC}.path", "1025 characters long; at most 1024", id="health-path-long"),
    case({"load_balancer.admin_socket": "/run/lb/a\x00.sock"}, "load_balancer.admin_socket",
         r"'/run/lb/a\x00.sock' contains a control character (U+0000)", id="admin-socket-nul"),  # fmt: skip
    case({"load_balancer.interfaces": ["eth\x010"]}, "load_balancer.interfaces[0]", "interface name",
         id="interface-control"),  # fmt: skip
    # quotas (ALB's, docs/elb-reference.md)
    case({f"{C0}.values": ["/a", "/b", "/c"],
          f"{R0}.conditions[1]": {"field": "http-header", "header_name": "X", "values": ["1", "2", "3"]}},
         f"{R0}.conditions", "6 condition values in one rule; at most 5", id="six-values-per-rule"),  # fmt: skip
]


@pytest.mark.parametrize(("edits", "path", "words"), BAD)
def test_bad_input_is_reported_at_its_key_path(edits: dict[str, object], path: str, words: tuple[str, ...]) -> None:
    data = good()
    for key_path, value in edits.items():
        edit(data, key_path, value)
    issues = issues_of(data)
    assert [issue.path for issue in issues] == [path], issues  # exactly one issue, no cascade
    for word in words:
        assert word in issues[0].message


def test_forwarding_modes_per_target_group() -> None:
    data = good()
    edit(data, "target_groups[2].preserve_client_ip", False)
    edit(data, "target_groups[3].direct_server_return", True)
    edit(data, "load_balancer.full_nat_port_range", [10000, 20000])
    lb = config.parse(data)
    assert [g.forwarding_mode for g in lb.target_groups] == ["nat", "nat", "full-nat", "dsr"]
    assert lb.full_nat_port_range == (10000, 20000)
    assert config.parse(good()).full_nat_port_range == (1024, 32767)


def test_ipv6_tcp_and_udp_listeners_with_ipv6_targets_in_every_mode() -> None:
    data = good()
    edit(data, "listeners[1].address", "2001:db8::100")
    edit(data, "listeners[2].address", "2001:db8::100")
    edit(data, "listeners[3]", {**good()["listeners"][1], "name": "echo-dsr", "port": 9001, "address": "2001:db8::100",
                                "default_action": {"type": "forward", "target_group": "dsr"}})
    edit(data, "target_groups[2].targets", [{"id": "2001:db8:1::11"}, {"id": "fd00:1::12", "port": 9002}])
    edit(data, "target_groups[3].targets", [{"id": "2001:db8:1::11"}])
    edit(data, "target_groups[3].preserve_client_ip", False)
    edit(data, "target_groups[4]", {"name": "dsr", "protocol": "TCP", "port": 9001, "direct_server_return": True,
                                    "targets": [{"id": "2001:db8:1::13"}]})
    lb = config.parse(data)
    assert [str(x.address) for x in lb.listeners] == ["10.0.0.100", "2001:db8::100", "2001:db8::100",
                                                      "2001:db8::100"]
    assert [g.forwarding_mode for g in lb.target_groups[2:]] == ["nat", "full-nat", "dsr"]
    assert lb.target_group("echo").endpoints() == ((ipaddress.ip_address("2001:db8:1::11"), 9000),
                                                   (ipaddress.ip_address("fd00:1::12"), 9002))


def test_an_ipv6_and_an_ipv4_listener_may_share_a_port() -> None:
    data = good()
    edit(data, "listeners[3]", {**good()["listeners"][1], "name": "echo6", "address": "2001:db8::100",
                                "default_action": {"type": "forward", "target_group": "echo6"}})
    edit(data, "target_groups[4]", {"name": "echo6", "protocol": "TCP", "port": 9000,
                                    "targets": [{"id": "2001:db8:1::11"}]})
    lb = config.parse(data)
    assert [(str(x.address), x.port) for x in lb.listeners_of(Protocol.TCP)] == [("10.0.0.100", 9000),
                                                                                ("2001:db8::100", 9000)]


@pytest.mark.parametrize(
    ("group", "target", "error"),
    [
        pytest.param("echo", "2001:db8::14", "register.target: 2001:db8::14 is IPv6; target group 'echo' serves "
                     "listener 'echo' on 10.0.0.100: a flow stays within one family", id="ipv6-into-ipv4"),
        pytest.param("idle", "2001:db8::14", "register.target: 2001:db8::14 is IPv6; target group 'idle' has IPv4 "
                     "targets (10.0.1.12): they are of one family", id="ipv6-beside-ipv4"),
        pytest.param("echo", "fe80::14", "register.target: fe80::14 cannot be a TCP target: a link-local",
                     id="link-local"),
    ],
)  # fmt: skip
def test_a_registration_stays_within_the_family(group: str, target: str, error: str) -> None:
    data = good()
    edit(data, "target_groups[4]", {"name": "idle", "protocol": "TCP", "port": 9000})
    lb = config.parse(data)
    registered = {"idle": (Target(ipaddress.ip_address("10.0.1.12"), None, 1),)}
    with pytest.raises(ConfigError) as info:
        config.admin_request({"cmd": "register", "group": group, "target": target}, lb,
                             lambda name: registered.get(name, ()))
    assert str(info.value.errors[0]).startswith(error), info.value.errors
    assert len(info.value.errors) == 1
    ok = config.admin_request({"cmd": "register", "group": "idle", "target": "10.0.1.14"}, lb,
                              lambda name: registered.get(name, ()))
    assert ok.target is not None and str(ok.target.address) == "10.0.1.14"


def test_there_are_enough_bad_cases() -> None:
    assert len(BAD) >= 45


def test_every_error_in_a_file_is_reported(tmp_path: Path) -> None:
    text = """
[load_balancer]
name = "demo"
ring_size = 100
surprise = 1

[[listeners]]
name = "web"
protocol = "HTTP"
address = "10.0.0.100"
port = 0
default_action = { type = "forward", target_group = "missing" }

  [[listeners.rules]]
  priority = 0
  conditions = [{ field = "path-pattern", values = ["/a"] }, { field = "path-pattern", values = ["/b"] }]
  actions = [{ type = "fixed-response", status_code = 302 }]

[[target_groups]]
name = "web"
protocol = "TCP"
port = 80
targets = [{ id = "10.0.1.11" }, { id = "10.0.1.11" }, { id = "::1" }]
health_check = { interval = 5 }
"""
    path = tmp_path / "lb.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    expected = {
        "load_balancer.ring_size": "100 is not a prime",
        "load_balancer.surprise": "unknown key",
        "listeners[0].port": "0 is outside 1..65535",
        "listeners[0].default_action.target_group": "'missing' is not a defined target group",
        "listeners[0].rules[0].priority": "0 is outside 1..50000",
        "listeners[0].rules[0].conditions[1].field": "only one 'path-pattern'",
        "listeners[0].rules[0].actions[0].status_code": "302 is not allowed",
        "target_groups[0].targets[1].id": "duplicate target",
        "target_groups[0].targets[2].id": "IPv6",
        "target_groups[0].health_check.timeout": "10 (the TCP default) must be smaller than interval (5)",
    }
    found = {issue.path: issue.message for issue in info.value.errors}
    assert sorted(found) == sorted(expected)
    for key, words in expected.items():
        assert words in found[key]
    lines = str(info.value).splitlines()
    assert len(lines) == len(expected)
    assert all(line.startswith(f"{path}: ") for line in lines)
    assert f"{path}: listeners[0].port: 0 is outside 1..65535" in lines


# --- error objects and file-level errors ------------------------------------------------


def test_issue_and_error_formatting() -> None:
    issue = ConfigIssue("listeners[0].rules[2].priority", "0 is outside 1..50000")
    assert str(issue) == "listeners[0].rules[2].priority: 0 is outside 1..50000"
    error = ConfigError([issue, ConfigIssue("load_balancer.name", "required key is missing")], "lb.toml")
    assert str(error) == (
        "lb.toml: listeners[0].rules[2].priority: 0 is outside 1..50000\n"
        "lb.toml: load_balancer.name: required key is missing"
    )
    assert str(ConfigError([issue])) == str(issue)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml: cannot read: No such file"):
        config.load(tmp_path / "nope.toml")


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Is a directory"):
        config.load(tmp_path)


def test_toml_syntax_error_gives_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "lb.toml"
    path.write_text('[load_balancer]\nname = "x"\nidle_timeout = = 3\n')
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert str(info.value).startswith(f"{path}: invalid TOML: ")
    assert "line 3, column" in str(info.value)


def test_bad_utf8(tmp_path: Path) -> None:
    path = tmp_path / "lb.toml"
    path.write_bytes(b'[load_balancer]\nname = "\xff"\n')
    with pytest.raises(ConfigError, match="not valid UTF-8.*line 2"):
        config.load(path)


def test_loads_names_its_source() -> None:
    with pytest.raises(ConfigError) as info:
        config.loads("[load_balancer]\n", source="inline")
    assert str(info.value) == "inline: load_balancer.name: required key is missing"


def test_a_toml_datetime_is_described() -> None:
    with pytest.raises(ConfigError, match="load_balancer.name: expected a string, got datetime"):
        config.loads("[load_balancer]\nname = 1979-05-27T07:32:00Z\n")


# --- defaults ---------------------------------------------------------------------------

MINIMAL = """
[load_balancer]
name = "min"

[[listeners]]
name = "web"
protocol = "HTTP"
address = "10.0.0.100"
port = 80
default_action = { type = "forward", target_group = "h" }

[[target_groups]]
name = "h"
protocol = "HTTP"
port = 80
targets = [{ id = "10.0.1.11" }]

[[target_groups]]
name = "t"
protocol = "TCP"
port = 9000

[[target_groups]]
name = "u"
protocol = "UDP"
port = 53

[[target_groups]]
name = "th"
protocol = "TCP"
port = 9001
health_check = { protocol = "HTTP" }
"""


@pytest.fixture(scope="module")
def minimal() -> LoadBalancer:
    return config.loads(MINIMAL)


def test_load_balancer_defaults(minimal: LoadBalancer) -> None:
    assert (
        minimal.name,
        minimal.interfaces,
        minimal.xdp_mode,
        minimal.forwarding_mode,
        minimal.netns,
        minimal.idle_timeout,
        minimal.tcp_idle_timeout,
        minimal.udp_idle_timeout,
        minimal.ring_size,
        minimal.workers,
        minimal.admin_socket,
        minimal.metrics_address,
    ) == ("min", (), XdpMode.AUTO, ForwardingMode.NAT, None, 60, 350, 120, 65537, 0, "/run/lb/admin.sock",
          "127.0.0.1:9464")  # fmt: skip


def test_listener_and_forward_defaults(minimal: LoadBalancer) -> None:
    (listener,) = minimal.listeners
    assert listener == Listener(
        name="web",
        protocol=Protocol.HTTP,
        address=ipaddress.IPv4Address("10.0.0.100"),
        port=80,
        default_action=ForwardAction(
            target_groups=(WeightedTargetGroup(name="h", weight=1),),
            stickiness=GroupStickiness(enabled=False, duration=3600),
            type="forward",
        ),
        rules=(),
    )


def test_http_group_defaults(minimal: LoadBalancer) -> None:
    assert minimal.target_group("h") == TargetGroup(
        name="h",
        protocol=Protocol.HTTP,
        port=80,
        targets=(Target(address=ipaddress.IPv4Address("10.0.1.11"), port=None, weight=1),),
        health_check=HealthCheck(
            enabled=True,
            protocol=HealthCheckProtocol.HTTP,
            port=None,
            path="/",
            method="GET",
            interval=30,
            timeout=5,
            healthy_threshold=5,
            unhealthy_threshold=2,
            matcher="200",
        ),
        deregistration_delay=300,
        slow_start=0,
        algorithm=Algorithm.ROUND_ROBIN,
        stickiness=Stickiness(enabled=False, type="lb_cookie", duration=86400),
    )


L4_CHECK = HealthCheck(
    enabled=True,
    protocol=HealthCheckProtocol.TCP,
    port=None,
    path="/",
    method="GET",
    interval=30,
    timeout=10,
    healthy_threshold=5,
    unhealthy_threshold=2,
    matcher="200-399",
)


@pytest.mark.parametrize(("name", "protocol", "port"), [("t", Protocol.TCP, 9000), ("u", Protocol.UDP, 53)])
def test_l4_group_defaults(minimal: LoadBalancer, name: str, protocol: Protocol, port: int) -> None:
    assert minimal.target_group(name) == TargetGroup(
        name=name,
        protocol=protocol,
        port=port,
        targets=(),
        health_check=L4_CHECK,
        deregistration_delay=300,
        slow_start=0,
        algorithm=Algorithm.ROUND_ROBIN,
        stickiness=Stickiness(enabled=False, type="lb_cookie", duration=86400),
    )


def test_l4_group_http_check_defaults_to_200_399(minimal: LoadBalancer) -> None:
    check = minimal.target_group("th").health_check
    assert check == HealthCheck(
        enabled=True,
        protocol=HealthCheckProtocol.HTTP,
        port=None,
        path="/",
        method="GET",
        interval=30,
        timeout=10,
        healthy_threshold=5,
        unhealthy_threshold=2,
        matcher="200-399",
    )


def test_rules_are_sorted_by_priority() -> None:
    data = good()
    edit(data, "listeners[0].rules[0].priority", 300)
    edit(data, "listeners[0].rules[2].priority", 3)
    (web, _, _) = config.parse(data).listeners
    assert [rule.priority for rule in web.rules] == [3, 20, 300]


def test_explicit_values_are_kept() -> None:
    text = """
[load_balancer]
name = "x"
interfaces = ["eth0", "eth1"]
xdp_mode = "native"
netns = "ns1"
idle_timeout = 4000
tcp_idle_timeout = 1
udp_idle_timeout = 86400
tcp_closed_timeout = 3600
tcp_time_wait_timeout = 1
new_flow_rate_limit = 0
tcp_syn_timeout = 3600
max_vips = 128
max_targets = 65536
conntrack_size = 33554432
half_open_size = 1024
ring_size = 1048573
workers = 256
admin_socket = "/tmp/lb.sock"
metrics_address = "[::1]:9100"

[[target_groups]]
name = "g"
protocol = "HTTP"
port = 8080
targets = [{ id = "2001:db8::1", port = 81, weight = 100 }]
health_check = { enabled = false, port = "traffic-port", path = "/hc", method = "HEAD", interval = 300, timeout = 120, healthy_threshold = 10, unhealthy_threshold = 10, matcher = "200,202-204" }
deregistration_delay = 0
slow_start = 900
algorithm = "least_outstanding_requests"
stickiness = { enabled = true, type = "lb_cookie", duration = 604800 }
unhealthy_connection_termination = false
deregistration_connection_termination = true
"""  # noqa: E501
    lb = config.loads(text)
    assert lb == LoadBalancer(
        name="x",
        interfaces=("eth0", "eth1"),
        xdp_mode=XdpMode.NATIVE,
        netns="ns1",
        idle_timeout=4000,
        tcp_idle_timeout=1,
        udp_idle_timeout=86400,
        tcp_closed_timeout=3600,
        tcp_time_wait_timeout=1,
        new_flow_rate_limit=0,
        tcp_syn_timeout=3600,
        max_vips=128,
        max_targets=65536,
        conntrack_size=33554432,
        half_open_size=1024,
        ring_size=1048573,
        workers=256,
        admin_socket="/tmp/lb.sock",
        metrics_address="[::1]:9100",
        target_groups=(
            TargetGroup(
                name="g",
                protocol=Protocol.HTTP,
                port=8080,
                targets=(Target(ipaddress.IPv6Address("2001:db8::1"), 81, 100),),
                health_check=HealthCheck(False, HealthCheckProtocol.HTTP, None, "/hc", "HEAD", 300, 120, 10, 10,
                                         "200,202-204"),  # fmt: skip
                deregistration_delay=0,
                slow_start=900,
                algorithm=Algorithm.LEAST_OUTSTANDING_REQUESTS,
                stickiness=Stickiness(True, "lb_cookie", 604800),
                unhealthy_connection_termination=False,
                deregistration_connection_termination=True,
            ),
        ),
    )


# --- every action and condition form ----------------------------------------------------

ACTIONS = [
    pytest.param('{ type = "forward", target_group = "a" }', ForwardAction((WeightedTargetGroup("a", 1),)),
                 id="forward-shorthand"),  # fmt: skip
    pytest.param(
        '{ type = "forward", target_groups = [{ name = "a", weight = 3 }, { name = "b", weight = 0 }],'
        " stickiness = { enabled = true, duration = 60 } }",
        ForwardAction((WeightedTargetGroup("a", 3), WeightedTargetGroup("b", 0)), GroupStickiness(True, 60)),
        id="forward-weighted",
    ),
    pytest.param('{ type = "forward", target_groups = [{ name = "b" }] }', ForwardAction((WeightedTargetGroup("b"),)),
                 id="forward-default-weight"),  # fmt: skip
    pytest.param('{ type = "redirect", status_code = 301, protocol = "HTTPS" }', RedirectAction(301, protocol="HTTPS"),
                 id="redirect-https"),  # fmt: skip
    pytest.param(
        '{ type = "redirect", status_code = "HTTP_302", protocol = "HTTP", host = "h.example", port = 8080,'
        ' path = "/new/#{path}", query = "x=1&#{query}" }',
        RedirectAction(302, "HTTP", "h.example", "8080", "/new/#{path}", "x=1&#{query}"),
        id="redirect-all",
    ),
    pytest.param('{ type = "redirect", status_code = "HTTP_301", port = "8443" }', RedirectAction(301, port="8443"),
                 id="redirect-port-string"),  # fmt: skip
    pytest.param('{ type = "redirect", status_code = 302, path = "/x", query = "" }',
                 RedirectAction(302, path="/x", query=""), id="redirect-drop-query"),  # fmt: skip
    pytest.param('{ type = "fixed-response", status_code = 503 }', FixedResponseAction(503, "text/plain", ""),
                 id="fixed-defaults"),  # fmt: skip
    pytest.param(
        '{ type = "fixed-response", status_code = 404, content_type = "application/json", body = "{}" }',
        FixedResponseAction(404, "application/json", "{}"),
        id="fixed-json",
    ),
]


def _http_lb(action: str, condition: str = '{ field = "path-pattern", values = ["/x"] }') -> str:
    return f"""
[load_balancer]
name = "x"
[[listeners]]
name = "web"
protocol = "HTTP"
address = "10.0.0.100"
port = 80
default_action = {action}
  [[listeners.rules]]
  priority = 1
  conditions = [{condition}]
  actions = [{action}]
[[target_groups]]
name = "a"
protocol = "HTTP"
port = 80
[[target_groups]]
name = "b"
protocol = "HTTP"
port = 80
"""


@pytest.mark.parametrize(("text", "expected"), ACTIONS)
def test_action_forms(text: str, expected: object) -> None:
    (listener,) = config.loads(_http_lb(text)).listeners
    assert listener.default_action == expected
    assert listener.rules[0].action == expected


CONDITIONS = [
    pytest.param('{ field = "host-header", values = ["*.example.com", "example.com"] }',
                 Condition(ConditionField.HOST_HEADER, ("*.example.com", "example.com")),
                 id="host-header"),  # fmt: skip
    pytest.param('{ field = "path-pattern", values = ["/api/*", "/v?/x"] }',
                 Condition(ConditionField.PATH_PATTERN, ("/api/*", "/v?/x")), id="path-pattern"),  # fmt: skip
    pytest.param('{ field = "http-request-method", values = ["GET", "CUSTOM_METHOD-X"] }',
                 Condition(ConditionField.HTTP_REQUEST_METHOD, ("GET", "CUSTOM_METHOD-X")), id="method"),  # fmt: skip
    pytest.param('{ field = "source-ip", values = ["10.0.0.0/24", "2001:db8::/32", "192.0.2.7"] }',
                 Condition(ConditionField.SOURCE_IP, ("10.0.0.0/24", "2001:db8::/32", "192.0.2.7/32")),
                 id="source-ip"),  # fmt: skip
    pytest.param('{ field = "http-header", header_name = "User-Agent", values = ["*Mobile*"] }',
                 Condition(ConditionField.HTTP_HEADER, ("*Mobile*",), header_name="User-Agent"),
                 id="http-header"),  # fmt: skip
    pytest.param(
        '{ field = "query-string", values = [{ key = "version", value = "v1" }, { value = "example" }] }',
        Condition(ConditionField.QUERY_STRING, query=(QueryPair("version", "v1"), QueryPair(None, "example"))),
        id="query-string",
    ),
]


@pytest.mark.parametrize(("text", "expected"), CONDITIONS)
def test_condition_forms(text: str, expected: Condition) -> None:
    action = '{ type = "fixed-response", status_code = 200 }'
    (listener,) = config.loads(_http_lb(action, text)).listeners
    assert listener.rules[0] == Rule(1, (expected,), FixedResponseAction(200))


def test_http_header_and_query_string_conditions_may_repeat() -> None:
    data = good()
    header = {"field": "http-header", "header_name": "X-A", "values": ["1"]}
    query = {"field": "query-string", "values": [{"value": "a"}]}
    edit(data, "listeners[0].rules[0].conditions", [header, header, query, query])
    (web, _, _) = config.parse(data).listeners
    assert len(web.rules[0].conditions) == 4


# --- the embedded default: the namespace lab ---------------------------------------------


def test_default_config_text_is_the_package_file() -> None:
    text = config.default_config_text()
    package = Path(config.__file__).parents[1]  # lb/config/__init__.py -> lb/
    assert text == (package / "data" / "default.toml").read_text()
    assert text.count("#") > 40  # written for a reader


def test_default_config_describes_the_lab() -> None:
    lb = config.load_default()
    ip = ipaddress.IPv4Address
    assert lb.name == "lab"
    assert lb.netns == "lab-lb"
    assert lb.interfaces == ("to-client", "to-backend1", "to-backend2", "to-backend3")
    backends = tuple(ip(f"10.0.1.{n}") for n in (11, 12, 13))

    web, echo_tcp, echo_udp = lb.listeners
    assert (web.name, web.protocol, web.address, web.port) == ("web", Protocol.HTTP, ip("10.0.0.100"), 80)
    assert web.default_action == ForwardAction((WeightedTargetGroup("web"),))
    assert web.rules == (
        Rule(10, (Condition(ConditionField.PATH_PATTERN, ("/api/*",)),), ForwardAction((WeightedTargetGroup("api"),))),
        Rule(20, (Condition(ConditionField.HOST_HEADER, ("old.example.com",)),),
             RedirectAction(301, host="www.example.com")),  # fmt: skip
        Rule(30, (Condition(ConditionField.PATH_PATTERN, ("/health-of-lb",)),),
             FixedResponseAction(200, "text/plain", "ok")),  # fmt: skip
    )
    for listener, protocol in ((echo_tcp, Protocol.TCP), (echo_udp, Protocol.UDP)):
        assert (listener.protocol, listener.address, listener.port, listener.rules) == (
            protocol, ip("10.0.0.100"), 9000, ()
        )  # fmt: skip
        assert listener.default_action == ForwardAction((WeightedTargetGroup(listener.name),))
    assert (echo_tcp.name, echo_udp.name) == ("echo-tcp", "echo-udp")

    groups = {group.name: group for group in lb.target_groups}
    assert list(groups) == ["web", "api", "echo-tcp", "echo-udp"]
    assert [t.address for t in groups["web"].targets] == list(backends[:2])
    assert [t.address for t in groups["api"].targets] == list(backends[2:])
    for name in ("echo-tcp", "echo-udp"):
        assert tuple(t.address for t in groups[name].targets) == backends
        assert groups[name].port == 9000
    assert (groups["echo-tcp"].protocol, groups["echo-udp"].protocol) == (Protocol.TCP, Protocol.UDP)
    assert groups["echo-udp"].health_check.protocol is HealthCheckProtocol.TCP
    assert groups["echo-udp"].health_check.port == 9000
    for group in groups.values():
        check = group.health_check
        assert (check.interval, check.timeout, check.healthy_threshold, check.unhealthy_threshold) == (5, 2, 2, 2)
        assert group.deregistration_delay == 10
        assert all(t.port is None for t in group.targets)
    assert groups["web"].health_check.protocol is HealthCheckProtocol.HTTP


# --- `lb validate` ---------------------------------------------------------------------


def invoke(*args: str) -> Any:
    return CliRunner().invoke(cli, ["validate", *args])


def test_validate_lab_config() -> None:
    result = invoke(LAB_CONFIG)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"{LAB_CONFIG}: valid" in out
    assert "load balancer lab" in out
    assert re.search(r"web\s+HTTP\s+10\.0\.0\.100:80\s+3 rules\s+default: forward web", out)
    assert re.search(r"echo-udp\s+UDP\s+10\.0\.0\.100:9000\s+0 rules\s+default: forward echo-udp", out)
    assert re.search(r"echo-udp\s+UDP\s+port 9000\s+3 targets\s+health TCP port 9000 every 5s", out)
    assert re.search(r"web\s+HTTP\s+port 80\s+2 targets\s+health HTTP GET / every 5s", out)
    assert result.stderr == ""


def test_validate_file(tmp_path: Path) -> None:
    path = tmp_path / "lb.toml"
    path.write_text(MINIMAL)
    for args in ([str(path)], ["-c", str(path)], [str(path), "-c", str(path)]):  # -c as every command takes it
        result = invoke(*args)
        assert result.exit_code == 0, result.output
        assert f"{path}: valid" in result.stdout
        assert "target groups" in result.stdout
    other = tmp_path / "other.toml"
    result = invoke(str(path), "-c", str(other))
    assert result.exit_code == 2 and "two files" in result.output


@pytest.mark.skipif(os.path.exists(SYSTEM_CONFIG), reason=f"{SYSTEM_CONFIG} exists on this host")
def test_no_config_is_refused_not_replaced_by_the_lab_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LB_CONFIG", raising=False)
    for args in (["validate"], ["status"], ["targets"], ["reload"], ["vips"]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2, (args, result.output)
        assert f"no config: {SYSTEM_CONFIG} does not exist" in result.output and LAB_CONFIG in result.output


def test_validate_broken_file_lists_every_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text(MINIMAL.replace("port = 80\ndefault", "port = 0\ndefault").replace('"UDP"', '"SCTP"'))
    result = invoke(str(path))
    assert result.exit_code == 2
    assert result.stdout == ""
    assert f"{path}: listeners[0].port: 0 is outside 1..65535" in result.stderr.splitlines()
    assert f"{path}: target_groups[2].protocol: 'SCTP' is not one of HTTP, HTTPS, TCP, UDP" in result.stderr.splitlines()
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("name", "content", "words"),
    [
        pytest.param("missing.toml", None, "cannot read: No such file or directory", id="missing"),
        pytest.param("dir", "DIR", "cannot read: Is a directory", id="directory"),
        pytest.param("bad.toml", b"name = = 1\n", "invalid TOML", id="bad-toml"),
        pytest.param("latin1.toml", b'a = "\xe9"\n', "not valid UTF-8", id="bad-utf8"),
    ],
)
def test_validate_user_mistakes_never_trace(tmp_path: Path, name: str, content: object, words: str) -> None:
    path = tmp_path / name
    if content == "DIR":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    result = invoke(str(path))
    assert result.exit_code == 2
    assert result.stderr.startswith(f"{path}: {words}")
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_validate_json() -> None:
    result = invoke(LAB_CONFIG, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["valid"] is True and doc["schema"] == 2
    lb = doc["load_balancer"]
    assert [listener["name"] for listener in lb["listeners"]] == ["web", "echo-tcp", "echo-udp"]
    assert lb["listeners"][0]["address"] == "10.0.0.100"
    assert lb["listeners"][0]["rules"][1]["action"] == {
        "status_code": 301,
        "protocol": "#{protocol}",
        "host": "www.example.com",
        "port": "#{port}",
        "path": "/#{path}",
        "query": "#{query}",
        "type": "redirect",
    }
    assert lb["target_groups"][3]["health_check"]["protocol"] == "TCP"


def test_validate_json_errors(tmp_path: Path) -> None:
    path = tmp_path / "lb.toml"
    path.write_text("[load_balancer]\nname = 1\n")
    result = invoke(str(path), "--json")
    assert result.exit_code == 2
    doc = json.loads(result.stdout)
    assert doc == {
        "schema": 2,
        "valid": False,
        "source": str(path),
        "errors": [{"path": "load_balancer.name", "message": "expected a string, got integer 1"}],
    }


@pytest.mark.parametrize(
    ("action", "text"),
    [
        pytest.param(ForwardAction((WeightedTargetGroup("a"),)), "forward a", id="forward"),
        pytest.param(ForwardAction((WeightedTargetGroup("a", 3), WeightedTargetGroup("b", 1))), "forward a:3, b:1",
                     id="weighted"),  # fmt: skip
        pytest.param(RedirectAction(302, protocol="HTTPS"), "redirect 302 HTTPS://#{host}:#{port}/#{path}?#{query}",
                     id="redirect"),  # fmt: skip
        pytest.param(FixedResponseAction(503, "text/html"), "fixed-response 503 text/html", id="fixed-response"),
    ],
)
def test_summary_describes_each_action(action: Any, text: str) -> None:
    assert describe_action(action) == text


# --- operator input that must never reach the wire or the stack ----------------------------------
# (the "L7 hardening" issue: header injection through a redirect, quotas, deep nesting)

CONTROLS = [chr(c) for c in (*range(0x20), 0x7F, 0x85)]


@pytest.mark.parametrize("char", CONTROLS, ids=lambda c: f"U+{ord(c):04X}")
def test_no_control_character_reaches_a_response_head_or_a_request_line(char: str) -> None:
    """A redirect's host, path and query become the Location header; a health
    check's path, the request line of every check: each is rejected at its key."""
    where = {
        f"{REDIRECT}.host": f"a{char}b.example",
        f"{REDIRECT}.path": f"/a{char}b",
        f"{REDIRECT}.query": f"a={char}",
        f"{HC}.path": f"/a{char}b",
        "load_balancer.admin_socket": f"/run/lb/a{char}.sock",
    }
    for key_path, value in where.items():
        data = good()
        edit(data, HC, {})
        edit(data, key_path, value)
        issues = issues_of(data)
        assert [issue.path for issue in issues] == [key_path], (key_path, issues)
        assert repr(value) in issues[0].message  # escaped: an error line holds no raw control character


def test_what_a_redirect_accepts_renders_as_one_location_line() -> None:
    """The widest host, path and query the config accepts stay inside one header line."""
    from lb.l7.actions import Redirect  # the worker's renderer; lb.config never imports lb.l7

    path = "/AZaz09-._~!$&'()*+,;=:@%2F/#{host}/#{path}/#{port}"
    query = "AZaz09-._~!$&'()*+,;=:@/?%20&#{protocol}#{host}#{port}#{path}#{query}"
    data = good()
    edit(data, f"{REDIRECT}.host", "a-0.#{host}.example")
    edit(data, f"{REDIRECT}.path", path)
    edit(data, f"{REDIRECT}.query", query)
    action = config.parse(data).listeners[0].rules[1].action
    assert isinstance(action, RedirectAction)
    raw = Redirect(action).render(b"", False, "client.example:8080", "/p/q", "x=1", 80, "10.0.0.100")
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    (location,) = [line for line in head if line.startswith(b"location: ")]
    assert location == (
        b"location: http://a-0.client.example.example/AZaz09-._~!$&'()*+,;=:@%2F/client.example/p/q/80"
        b"?AZaz09-._~!$&'()*+,;=:@/?%20&httpclient.example80p/qx=1"
    )
    assert all(32 <= byte < 127 for byte in location)


@pytest.mark.parametrize("char", [c for c in CONTROLS if c < "\x80" and c != "\t"], ids=lambda c: f"U+{ord(c):04X}")
def test_the_request_parser_keeps_control_characters_out_of_the_placeholders(char: str) -> None:
    """At run time #{host} comes from the Host header and #{path}/#{query} from the
    target, as received (docs/elb-reference.md): the workers' parser must refuse
    CR, LF and the other C0 controls and DEL in both (HTAB is legal in a value;
    bytes 0x80-0xFF are obs-text there, and pass)."""
    import httptools

    class Sink:
        def on_header(self, name: bytes, value: bytes) -> None:
            pass

    byte = char.encode("latin-1")
    host = b"GET /x HTTP/1.1\r\nHost: a" + byte + b"b\r\n\r\n"
    target = b"GET /a" + byte + b"b HTTP/1.1\r\nHost: h\r\n\r\n"
    for head in (host, target):
        with pytest.raises(httptools.HttpParserError):
            httptools.HttpRequestParser(Sink()).feed_data(head)


def test_an_ipv6_redirect_host_is_accepted() -> None:
    data = good()
    edit(data, f"{REDIRECT}.host", "[2001:db8::1]")
    action = config.parse(data).listeners[0].rules[1].action
    assert isinstance(action, RedirectAction) and action.host == "[2001:db8::1]"


def test_a_fixed_response_body_is_free_text() -> None:
    """The body is framed by content-length, never part of the head: any text,
    newlines included (ELB names no character set for it)."""
    data = good()
    edit(data, f"{FIXED}.body", "line 1\r\nline 2\n\t\u00e9\u65e5")
    action = config.parse(data).listeners[0].rules[2].action
    assert isinstance(action, FixedResponseAction) and action.body == "line 1\r\nline 2\n\t\u00e9\u65e5"


# quotas: the limit is accepted, one more is rejected, once, at the key that went over


def _fixed_rule(priority: int) -> dict[str, Any]:
    return {
        "priority": priority,
        "conditions": [{"field": "path-pattern", "values": [f"/r{priority}"]}],
        "actions": [{"type": "fixed-response", "status_code": 200}],
    }


def _targets(n: int, third: int = 1) -> list[dict[str, Any]]:
    return [{"id": f"10.{third}.{i // 250}.{i % 250 + 1}"} for i in range(n)]


def with_rules(total: int) -> dict[str, Any]:
    """good() (3 rules on 'web') plus a second HTTP listener holding the rest."""
    data = good()
    second = {**copy.deepcopy(data["listeners"][0]), "name": "web2", "port": 8080}
    second["rules"] = [_fixed_rule(p) for p in range(1, total - 3 + 1)]
    edit(data, "listeners[3]", second)
    return data


def with_targets(per_group: dict[int, int]) -> dict[str, Any]:
    data = good()
    for group, n in per_group.items():
        edit(data, f"target_groups[{group}].targets", _targets(n, third=group + 1))
    return data


def with_listeners(total: int) -> dict[str, Any]:
    data = good()
    for i in range(3, total):
        listener = {"name": f"tcp{i}", "protocol": "TCP", "address": "10.0.0.100", "port": 10000 + i,
                    "default_action": {"type": "forward", "target_group": "echo"}}  # fmt: skip
        edit(data, f"listeners[{i}]", listener)
    return data


def with_groups(total: int) -> dict[str, Any]:
    data = good()
    for i in range(4, total):
        edit(data, f"target_groups[{i}]", {"name": f"g{i}", **HTTP_GROUP})
    return data


def with_values(n: int) -> dict[str, Any]:
    """Rule 0 with n condition values, 3 in its path-pattern and the rest in http-headers."""
    data = good()
    conditions: list[dict[str, Any]] = [{"field": "path-pattern", "values": [f"/p{i}" for i in range(min(n, 3))]}]
    rest = n - 3
    while rest > 0:
        conditions.append({"field": "http-header", "header_name": "X", "values": ["v"] * min(rest, 3)})
        rest -= 3
    edit(data, f"{R0}.conditions", conditions)
    return data


QUOTAS = [
    pytest.param(with_rules, 100, "listeners[3].rules[97]",
                 "rule 101 of the load balancer; at most 100 rules per load balancer", id="rules-per-lb"),
    pytest.param(lambda n: with_targets({0: n, 1: 0, 2: 0, 3: 0}), 1000, "target_groups[0].targets",
                 "1001 targets; at most 1000 per target group", id="targets-per-group"),
    pytest.param(lambda n: with_targets({0: 500, 1: n - 502}), 1000, "target_groups[3].targets",
                 "1001 targets in the load balancer; at most 1000", id="targets-per-lb"),
    pytest.param(with_values, 5, f"{R0}.conditions", "6 condition values in one rule; at most 5",
                 id="values-per-rule"),
    pytest.param(with_listeners, 50, "listeners", "51 listeners; at most 50", id="listeners-per-lb"),
    pytest.param(with_groups, 100, "target_groups", "101 target groups; at most 100", id="groups-per-lb"),
]


@pytest.mark.parametrize(("build", "limit", "path", "words"), QUOTAS)
def test_quotas_accept_the_limit_and_reject_one_more(build: Any, limit: int, path: str, words: str) -> None:
    config.parse(build(limit))
    issues = issues_of(build(limit + 1))
    assert [(issue.path, words in issue.message) for issue in issues] == [(path, True)], issues


def test_ten_thousand_rules_give_one_error_not_thousands() -> None:
    issues = issues_of(with_rules(10_000))
    assert [issue.path for issue in issues] == ["listeners[3].rules[97]"]


# nesting: tomllib recurses on arrays and inline tables, and a dotted key of n
# parts costs it O(n²) memory; the reader must not recurse into a value either


def _nested_list(depth: int) -> object:
    value: object = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    "key_path",
    [f"{REDIRECT}.status_code", f"{REDIRECT}.port", f"{HC}.port", "load_balancer.name", f"{C0}.values[0]"],
)
def test_the_reader_does_not_recurse_into_a_deep_value(key_path: str) -> None:
    data = good()
    edit(data, HC, {})
    edit(data, key_path, _nested_list(100_000))
    issues = issues_of(data)
    assert [issue.path for issue in issues] == [key_path]
    assert len(issues[0].message) < 200


DEEP = 100_000
DEEP_TOML = [
    pytest.param("x = " + "[" * DEEP + "]" * DEEP + "\n", 1, id="arrays"),
    pytest.param("x = " + "{ a = " * DEEP + "1" + " }" * DEEP + "\n", 1, id="inline-tables"),
    pytest.param(".".join(["a"] * DEEP) + " = 1\n", 1, id="dotted-key"),
    pytest.param("[load_balancer]\n[" + ".".join(["a"] * DEEP) + "]\n", 2, id="table-header"),
    pytest.param('[load_balancer]\nname = "x"\n[[' + ".".join(["b"] * DEEP) + "]]\n", 3, id="array-header"),
]


def _validate_in_a_child(path: Path) -> subprocess.CompletedProcess[str]:
    """`lb validate` in its own process, its memory capped: what it would do to a host."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1 << 31, 1 << 31))

    return subprocess.run([sys.executable, "-m", "lb", "validate", str(path)], capture_output=True, text=True,
                          timeout=120, preexec_fn=cap)  # fmt: skip


@pytest.mark.parametrize(("text", "line"), DEEP_TOML)
def test_validate_a_config_nested_100000_deep(tmp_path: Path, text: str, line: int) -> None:
    path = tmp_path / "deep.toml"
    path.write_text(text)
    started = time.monotonic()
    result = _validate_in_a_child(path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith(f"{path}: invalid TOML: nested more than 32 levels deep (line {line}, column ")
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 30


def test_a_config_nested_32_deep_is_read_normally() -> None:
    text = "[load_balancer]\nname = \"x\"\nx = " + "[" * 31 + "]" * 31 + "\n"
    with pytest.raises(ConfigError) as info:
        config.loads(text)
    assert [issue.path for issue in info.value.errors] == ["load_balancer.x"]


def test_nesting_inside_strings_and_comments_does_not_count() -> None:
    junk = "[" * 100 + "{" * 100 + "." * 100
    text = (
        f'# {junk}\n[load_balancer] # {junk}\nname = "x"\n'
        f'admin_socket = "/tmp/{"[" * 50}"\nnetns = \'{"{" * 20}\'\n'
        f'x = """\n{junk}\n"""\ny = \'\'\'{junk}\'\'\'\nz = """a\\"""{junk}"""\nw = """q""""\n'
        f"v = [1.5, 2.5, {', '.join(['3.5'] * 100)}]\n"
    )
    with pytest.raises(ConfigError) as info:
        config.loads(text)
    assert sorted(issue.path for issue in info.value.errors) == [
        "load_balancer.netns", "load_balancer.v", "load_balancer.w", "load_balancer.x", "load_balancer.y",
        "load_balancer.z",
    ]  # fmt: skip


# `lb validate` on each kind of bad input: exit 2, the key path, never a traceback


def to_toml(data: dict[str, Any]) -> str:
    """good()-style data as TOML text (inline tables; enough for these tests)."""

    def value(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, str)):
            return json.dumps(v, ensure_ascii=False)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        assert isinstance(v, dict)
        return "{ " + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + " }"

    return "".join(f"{key} = {value(v)}\n" for key, v in data.items())


def _edited(key_path: str, value: object) -> dict[str, Any]:
    data = good()
    edit(data, key_path, value)
    return data


CLI_BAD = [
    pytest.param(_edited(f"{REDIRECT}.host", "evil.example\r\nSet-Cookie: a=b"), f"{REDIRECT}.host",
                 id="redirect-host-crlf"),  # fmt: skip
    pytest.param(_edited(f"{REDIRECT}.path", "/\r\nSet-Cookie: a=b"), f"{REDIRECT}.path", id="redirect-path-crlf"),
    pytest.param(_edited(f"{REDIRECT}.query", "\r\nSet-Cookie: a=b"), f"{REDIRECT}.query", id="redirect-query-crlf"),
    pytest.param(_edited(HC, {"path": "/\r\nX: y"}), f"{HC}.path", id="health-path-crlf"),
    pytest.param(with_rules(10_000), "listeners[3].rules[97]", id="rules-10000"),
    pytest.param(with_targets({0: 100_000}), "target_groups[0].targets", id="targets-100000"),
    pytest.param(with_values(6), f"{R0}.conditions", id="values-per-rule"),
]


@pytest.mark.parametrize(("data", "key_path"), CLI_BAD)
def test_validate_rejects_each_with_its_key_path(tmp_path: Path, data: dict[str, Any], key_path: str) -> None:
    path = tmp_path / "lb.toml"
    path.write_text(to_toml(data), encoding="utf-8")
    result = invoke(str(path))
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"{path}: {key_path}: "), result.stderr[:500]
    assert "\r" not in result.stderr and "Traceback" not in result.output


def test_health_checks_down_to_1_s_are_lbs_extension() -> None:
    """ELB's minimum is 5 s (timeout 2 s); lb accepts 1 s, and 1 s / 1 s below 5 s."""
    for interval, timeout in ((1, 1), (2, 1), (4, 4), (5, 4)):
        text = MINIMAL.replace("[[target_groups]]", "[[target_groups]]\n"
                               f"health_check = {{ interval = {interval}, timeout = {timeout} }}", 1)
        check = config.loads(text, "t.toml").target_groups[0].health_check
        assert (check.interval, check.timeout) == (interval, timeout)
