"""A setting compiled into the XDP program or fixed in the L7 workers at start
cannot be changed by `lb reload`: the daemon must refuse it, naming the key."""

from __future__ import annotations

import dataclasses

from lb.daemon import RESTART_ONLY
from lb.dataplane.pins import limits_for
from lb.l7.config import L7Config
from lb.model import LoadBalancer


def test_every_setting_fixed_at_start_is_restart_only() -> None:
    base = LoadBalancer("x")
    fixed_at_start = []
    for field in dataclasses.fields(LoadBalancer):
        value = getattr(base, field.name)
        if type(value) is not int:  # the int settings are the ones baked into cflags or L7Config
            continue
        changed = dataclasses.replace(base, **{field.name: value + 1})
        if limits_for(changed) != limits_for(base) or \
                L7Config.for_load_balancer(changed) != L7Config.for_load_balancer(base):
            fixed_at_start.append(field.name)
    assert fixed_at_start, "the probe found nothing: it no longer works"
    missing = sorted(set(fixed_at_start) - set(RESTART_ONLY))
    assert not missing, f"lb reload would accept a change it cannot apply: add {missing} to RESTART_ONLY"
