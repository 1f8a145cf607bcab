"""`lb validate [FILE]`: check a configuration and summarise what it describes.

Examples::

    lb validate                 # $LB_CONFIG, else /etc/lb/lb.toml (none: exit 2, saying so)
    lb validate /etc/lb/lb.toml # or: lb validate -c /etc/lb/lb.toml, as every other command
    lb validate lb.toml --json  # the whole model (or the errors) as JSON

Exit status 0 when the file is valid, 2 when it is not; every problem is
printed as ``FILE: key.path: message`` on stderr (or as JSON on stdout with
``--json``), never as a traceback.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import json
from collections.abc import Sequence

import click

from lb import config
from lb import model as m
from lb.cli.common import EXIT_INVALID, JSON_SCHEMA, config_option, resolve_config_path
from lb.config import ConfigError


@click.command()
@click.argument("file", required=False)
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the model (or the errors) as JSON.")
@click.pass_context
def validate(ctx: click.Context, file: str | None, config_path: str | None, as_json: bool) -> None:
    """Check FILE (or -c FILE; default: $LB_CONFIG, else /etc/lb/lb.toml) and summarise it.

    Exit status 0 when valid; 2 when not, with every problem listed on
    stderr as FILE: KEY.PATH: MESSAGE.
    """
    given = ctx.get_parameter_source("config_path") is click.core.ParameterSource.COMMANDLINE
    if file is not None and given and file != config_path:
        raise click.UsageError(f"two files: {file} and -c {config_path}; give one")
    source = resolve_config_path(file or config_path)
    try:
        lb = config.load(source)
    except ConfigError as exc:
        _report(exc, source, as_json)
        ctx.exit(EXIT_INVALID)
    if as_json:
        click.echo(json.dumps({"schema": JSON_SCHEMA, "valid": True, "source": source, "load_balancer": to_json(lb)},
                              indent=2))
    else:
        click.echo(f"{source}: valid")
        click.echo(summary(lb))


def _report(exc: ConfigError, source: str, as_json: bool) -> None:
    if as_json:
        errors = [{"path": issue.path, "message": issue.message} for issue in exc.errors]
        click.echo(json.dumps({"schema": JSON_SCHEMA, "valid": False, "source": source, "errors": errors}, indent=2))
        return
    for line in exc.lines():
        click.echo(line, err=True)
    if len(exc.errors) > 1:
        click.echo(f"{source}: {len(exc.errors)} problems", err=True)


# --- text summary ----------------------------------------------------------------


def summary(lb: m.LoadBalancer) -> str:
    """A short aligned description of a load balancer, for people."""
    where = [f"netns {lb.netns}" if lb.netns else "current netns"]
    where.append("interfaces " + (", ".join(lb.interfaces) if lb.interfaces else "from routes"))
    where.append(f"xdp {lb.xdp_mode.value}")
    lines = [f"load balancer {lb.name} ({'; '.join(where)})", "", "listeners"]
    lines += _aligned([_listener_row(listener) for listener in lb.listeners])
    lines += ["", "target groups"]
    lines += _aligned([_group_row(group) for group in lb.target_groups])
    return "\n".join(lines)


def _aligned(rows: Sequence[Sequence[str]]) -> list[str]:
    if not rows:
        return ["  (none)"]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def _endpoint(address: m.IPAddress, port: int) -> str:
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


def _listener_row(listener: m.Listener) -> list[str]:
    count = len(listener.rules)
    rules = f"{count} rule{'s' if count != 1 else ''}"
    row = [
        listener.name,
        listener.scheme,
        _endpoint(listener.address, listener.port),
        rules,
        "default: " + describe_action(listener.default_action),
    ]
    if listener.tls is not None:
        certificates = listener.tls.all_certificates()
        names = ", ".join(name for cert in certificates for name in cert.names)
        row[-1] += f"; {listener.tls.ssl_policy}, certificates for {names}"
    return row


def describe_action(action: m.Action) -> str:
    """One line per action: forward GROUP[:WEIGHT,..], redirect CODE URL, fixed-response CODE TYPE."""
    if isinstance(action, m.ForwardAction):
        groups = action.target_groups
        if len(groups) == 1:
            return f"forward {groups[0].name}"
        return "forward " + ", ".join(f"{g.name}:{g.weight}" for g in groups)
    if isinstance(action, m.RedirectAction):
        url = f"{action.protocol}://{action.host}:{action.port}{action.path}?{action.query}"
        return f"redirect {action.status_code} {url}"
    return f"fixed-response {action.status_code} {action.content_type}"


def _group_row(group: m.TargetGroup) -> list[str]:
    count = len(group.targets)
    return [
        group.name,
        group.scheme,
        f"port {group.port}",
        f"{count} target{'s' if count != 1 else ''}",
        "health " + describe_health(group.health_check),
    ]


def describe_health(check: m.HealthCheck) -> str:
    """e.g. 'HTTP GET / every 30s, timeout 5s, healthy 5, unhealthy 2, matcher 200'."""
    if not check.enabled:
        return "disabled"
    http = check.protocol.is_http
    text = f"{check.protocol.value} {check.method} {check.path}" if http else "TCP"
    if check.port is not None:
        text += f" port {check.port}"
    text += f" every {check.interval}s, timeout {check.timeout}s, "
    text += f"healthy {check.healthy_threshold}, unhealthy {check.unhealthy_threshold}"
    return text + (f", matcher {check.matcher}" if http else "")


# --- JSON ----------------------------------------------------------------------


def to_json(value: object) -> object:
    """The model as plain JSON types: dataclasses → objects, enums → values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [to_json(item) for item in value]
    return value
