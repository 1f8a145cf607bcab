"""TOML configuration → :class:`lb.model.LoadBalancer`, with ELB's defaults.

The file has three parts: ``[load_balancer]`` (host settings),
``[[listeners]]`` (each with a default action and, for HTTP, rules) and
``[[target_groups]]`` (targets, health check, draining). Names, limits and
defaults follow Elastic Load Balancing (docs/elb-reference.md) so an ELB user
can read a file without a manual; ``lb/data/default.toml`` is a commented
example describing the namespace lab.

Validation reports every mistake at once, each naming its key path, the
bad value and what is allowed, e.g.
``listeners[0].rules[2].priority: 0 is outside 1..50000``. The result is
either a whole model or a :class:`ConfigError`, never a half-built model.
Strings that reach a response head or a request line are held to ELB's
character sets (or RFC 3986's), counts to ALB's quotas, and the TOML's
nesting is measured before it is parsed (docs/elb-reference.md).

:func:`admin_request` reads an admin socket request the same way, against
the running model: the target rules, ranges, quotas and messages of a file,
with the command as the key path (``register.weight: -5 is outside 1..100``).

This module is the whole public API; the modules beside it are private:
``_builder`` (the entry points and the top-level parts), ``_rules`` (listener
rules, conditions and actions), ``_reader`` (the validating table reader and
its issues) and ``_checks`` (checks of single values). Only the control plane imports this package: the L7 workers
get a built :class:`lb.model.LoadBalancer` and never load the TOML reader.
"""

from lb.config._builder import (
    ACCESS_LOG_KEYS,
    ADMIN_COMMANDS,
    DEFAULT_SOURCE,
    GROUP_KEYS,
    HEALTH_KEYS,
    LB_KEYS,
    LISTENER_KEYS,
    AdminRequest,
    admin_request,
    default_config_text,
    load,
    load_default,
    loads,
    parse,
)
from lb.config._reader import ConfigError, ConfigIssue

__all__ = [
    "ACCESS_LOG_KEYS",
    "ADMIN_COMMANDS",
    "DEFAULT_SOURCE",
    "GROUP_KEYS",
    "HEALTH_KEYS",
    "LB_KEYS",
    "LISTENER_KEYS",
    "AdminRequest",
    "ConfigError",
    "ConfigIssue",
    "admin_request",
    "default_config_text",
    "load",
    "load_default",
    "loads",
    "parse",
]
