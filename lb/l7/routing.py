"""A routing table compiled for one worker: listeners → rules → plans.

Compiled once per table push, read by every request; a swap replaces the
whole :class:`Routes` object in one assignment, so a request sees either
the old table or the new one, never a mix. A plan is what an action becomes:
a :class:`Forward` (target groups with their balancers and stickiness), a
:class:`~lb.l7.actions.FixedResponse` or a :class:`~lb.l7.actions.Redirect`.
"""

from __future__ import annotations

from lb.l7.actions import FixedResponse, Redirect
from lb.l7.balancer import Balancer, WeightedChoice, make_balancer
from lb.l7.rules import Router
from lb.l7.stickiness import GROUP_COOKIE, TARGET_COOKIE, CookieSigner, find_cookie
from lb.l7.table import GroupTargets, RoutingTable
from lb.l7.upstream import Pool, PoolSet
from lb.model import (
    Action,
    ConditionField,
    FixedResponseAction,
    ForwardAction,
    Listener,
    RedirectAction,
)


class GroupRoute:
    """A target group's endpoints in service, its balancer and its stickiness."""

    __slots__ = ("name", "balancer", "sticky", "duration", "_by_subject")

    def __init__(self, name: str, entry: GroupTargets | None, pools: PoolSet) -> None:
        self.name = name
        self.balancer: Balancer[Pool] | None = None
        self.sticky = False
        self.duration = 0
        self._by_subject: dict[str, Pool] = {}
        if entry is None:
            return
        live = [e for e in entry.in_service if (e[0], e[1]) not in entry.draining]
        if not live:
            return
        group_pools = tuple(pools.get(address, port, entry.group.tls) for address, port, _ in live)
        weights = tuple(weight for _, _, weight in live)
        ramp = {(address, port): share for address, port, share in entry.ramp}
        shares = tuple(ramp.get((address, port), 1.0) for address, port, _ in live)
        self.balancer = make_balancer(entry.group.algorithm, group_pools, weights, shares)
        stickiness = entry.group.stickiness
        self.sticky = stickiness.enabled and stickiness.type == "lb_cookie"
        self.duration = stickiness.duration
        self._by_subject = {self._subject(pool): pool for pool in group_pools}

    def _subject(self, pool: Pool) -> str:
        return f"{self.name}|{pool.label}"

    def pick(self, cookies: list[bytes] | None, signer: CookieSigner) -> tuple[Pool, bytes]:
        """An endpoint's pool and the set-cookie line to send (b"" if none)."""
        balancer = self.balancer
        assert balancer is not None
        if not self.sticky:
            return balancer.pick(), b""
        pool = None
        if cookies:
            value = find_cookie(cookies, TARGET_COOKIE)
            if value:
                subject = signer.verify(value)
                if subject is not None:
                    pool = self._by_subject.get(subject)
        if pool is None:  # no cookie, a bad one, or its target is out of service
            pool = balancer.pick()
        return pool, signer.set_cookie(TARGET_COOKIE, self._subject(pool), self.duration)


class Forward:
    """A forward action: one group, or a weighted choice with group stickiness."""

    __slots__ = ("single", "direct", "direct_group", "_choice", "_by_name", "_sticky", "_duration")

    def __init__(self, action: ForwardAction, groups: dict[str, GroupRoute]) -> None:
        weighted = [(groups[wg.name], wg.weight) for wg in action.target_groups]
        self.single = weighted[0][0] if len(weighted) == 1 else None
        # One group without stickiness (the common case): its balancer, called
        # directly by the client protocol without going through choose().
        self.direct = self.single.balancer if self.single is not None and not self.single.sticky else None
        self.direct_group = self.single.name if self.single is not None else "-"
        live = [(group, weight) for group, weight in weighted if weight > 0]
        self._choice = WeightedChoice(tuple(g for g, _ in live), tuple(w for _, w in live)) if live else None
        self._by_name = {g.name: g for g, _ in live if g.balancer is not None}
        self._sticky = action.stickiness.enabled and self.single is None
        self._duration = action.stickiness.duration

    def choose(self, cookies: list[bytes] | None, signer: CookieSigner) -> tuple[str, Pool | None, bytes]:
        """The chosen group's name ("-": none), the pool of the chosen target
        (None: no target → 503) and set-cookie lines."""
        group = self.single
        set_cookies = b""
        if group is None:
            if self._choice is None:
                return "-", None, b""
            if self._sticky and cookies:
                value = find_cookie(cookies, GROUP_COOKIE)
                name = signer.verify(value) if value else None
                group = self._by_name.get(name) if name is not None else None
            if group is None:
                group = self._choice.pick()
            if self._sticky:
                set_cookies = signer.set_cookie(GROUP_COOKIE, group.name, self._duration)
        if group.balancer is None:
            return group.name, None, set_cookies
        pool, cookie = group.pick(cookies, signer)
        return group.name, pool, set_cookies + cookie if cookie else set_cookies


Plan = Forward | FixedResponse | Redirect


class ListenerRoute:
    """One listener: its compiled rules and the plan of every action."""

    __slots__ = ("name", "router", "default", "plans", "needs_headers")

    def __init__(self, listener: Listener, groups: dict[str, GroupRoute], pools: PoolSet, table: RoutingTable):
        self.name = listener.name
        # No rules (the common case, and the benchmark's): no matching at all.
        self.router = Router.compile(listener) if listener.rules else None

        def plan(action: Action) -> Plan:
            if isinstance(action, ForwardAction):
                for wg in action.target_groups:
                    if wg.name not in groups:
                        groups[wg.name] = GroupRoute(wg.name, table.group(wg.name), pools)
                return Forward(action, groups)
            if isinstance(action, FixedResponseAction):
                return FixedResponse(action)
            if isinstance(action, RedirectAction):
                return Redirect(action)
            raise TypeError(f"unknown action {action!r}")

        self.default = plan(listener.default_action)
        self.plans = {rule.priority: plan(rule.action) for rule in listener.rules}
        # The rules engine reads headers only for http-header conditions.
        self.needs_headers = any(
            c.field is ConditionField.HTTP_HEADER for rule in listener.rules for c in rule.conditions
        )


class Routes:
    """Everything a request needs from the table, compiled."""

    __slots__ = ("listeners", "idle_timeout", "version", "endpoints")

    def __init__(self, table: RoutingTable, pools: PoolSet) -> None:
        groups: dict[str, GroupRoute] = {}
        self.listeners = {listener.name: ListenerRoute(listener, groups, pools, table) for listener in table.listeners}
        self.idle_timeout = table.idle_timeout
        self.version = table.version
        # Endpoints new requests may go to: every other pool is retired.
        self.endpoints = {
            (address, port, entry.group.tls)
            for entry in table.groups
            for address, port, _ in entry.in_service
            if (address, port) not in entry.draining
        }
