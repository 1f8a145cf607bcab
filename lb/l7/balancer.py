"""Choosing a target within a group, and a group within a weighted forward.

A balancer is built per target group each time a routing table is swapped
in, over the pools (:class:`lb.l7.upstream.Pool`) of the group's endpoints
in service. Pools outlive tables, so ``outstanding`` (this worker's requests
in flight to an endpoint, summed over every group that has it) survives a
swap; a balancer's own position does not need to.

- round_robin: each endpoint in turn (target weights are ignored, as ELB's
  round robin does).
- least_outstanding_requests: fewest requests in flight from this worker;
  ties go round robin, so an idle group still spreads.
- weighted_random: in proportion to the targets' weights.

Slow start (``slow_start`` on the group) wraps whichever of these in
:class:`SlowStart` while a newly healthy target ramps up.
"""

from __future__ import annotations

import random
from bisect import bisect
from itertools import accumulate
from typing import Generic, Protocol, TypeVar

from lb.model import Algorithm


class Balanceable(Protocol):
    outstanding: int


P = TypeVar("P", bound=Balanceable)
T = TypeVar("T")


class Balancer(Generic[P]):
    """Picks one of ``pools`` (never empty) per request."""

    __slots__ = ("pools",)

    def __init__(self, pools: tuple[P, ...]) -> None:
        if not pools:
            raise ValueError("a balancer needs at least one endpoint")
        self.pools = pools

    def pick(self) -> P:
        raise NotImplementedError


class _Rotating(Balancer[P]):
    """A balancer that goes round its pools from a position of its own."""

    __slots__ = ("_next",)

    def __init__(self, pools: tuple[P, ...]) -> None:
        super().__init__(pools)
        # Workers start at different places, so they do not all send their
        # first request to the same target.
        self._next = random.randrange(len(pools))


class RoundRobin(_Rotating[P]):
    __slots__ = ()

    def pick(self) -> P:
        pools = self.pools
        i = self._next
        self._next = i + 1 if i + 1 < len(pools) else 0
        return pools[i]


class LeastOutstanding(_Rotating[P]):
    __slots__ = ()

    def pick(self) -> P:
        pools = self.pools
        n = len(pools)
        start = self._next
        self._next = start + 1 if start + 1 < n else 0
        best = pools[start]
        low = best.outstanding
        k = 1
        while low and k < n:
            pool = pools[(start + k) % n]
            if pool.outstanding < low:
                best, low = pool, pool.outstanding
            k += 1
        return best


class WeightedChoice(Generic[T]):
    """A random pick in proportion to integer weights; zero weights never win."""

    __slots__ = ("items", "_bounds", "_total")

    def __init__(self, items: tuple[T, ...], weights: tuple[int, ...]) -> None:
        if len(items) != len(weights) or not items:
            raise ValueError("one weight per item, at least one item")
        if sum(weights) <= 0:
            weights = (1,) * len(items)
        self.items = items
        self._bounds = tuple(accumulate(weights))
        self._total = self._bounds[-1]

    def pick(self) -> T:
        return self.items[bisect(self._bounds, random.random() * self._total)]


class WeightedRandom(Balancer[P]):
    __slots__ = ("_choice",)

    def __init__(self, pools: tuple[P, ...], weights: tuple[int, ...]) -> None:
        super().__init__(pools)
        self._choice = WeightedChoice(pools, weights)

    def pick(self) -> P:
        return self._choice.pick()


class SlowStart(Balancer[P]):
    """Any balancer, with some endpoints in slow start: when the inner
    balancer picks one whose share is s (0 < s < 1), the pick stands with
    probability s; otherwise the request goes to the endpoints that are not
    ramping (their own balancer of the same kind). A ramping endpoint thus
    takes about s of what it would take at full share. Built only while some
    endpoint ramps; the plain balancers stay the hot path."""

    __slots__ = ("inner", "shares", "settled")

    def __init__(self, inner: Balancer[P], shares: dict[int, float], settled: Balancer[P] | None) -> None:
        super().__init__(inner.pools)
        self.inner = inner
        self.shares = shares  # id(pool) -> share, for the pools that ramp
        self.settled = settled  # over the pools that do not ramp (None: every pool ramps)

    def pick(self) -> P:
        pool = self.inner.pick()
        share = self.shares.get(id(pool))
        if share is None or self.settled is None or random.random() < share:
            return pool
        return self.settled.pick()


def make_balancer(algorithm: Algorithm, pools: tuple[P, ...], weights: tuple[int, ...],
                  shares: tuple[float, ...] = ()) -> Balancer[P]:
    """The group's balancer; `shares` (one per pool, 1.0 = full) wraps it in
    SlowStart when any is below 1."""
    inner: Balancer[P]
    if algorithm is Algorithm.LEAST_OUTSTANDING_REQUESTS:
        inner = LeastOutstanding(pools)
    elif algorithm is Algorithm.WEIGHTED_RANDOM:
        inner = WeightedRandom(pools, weights)
    else:
        inner = RoundRobin(pools)
    ramping = {id(pool): share for pool, share in zip(pools, shares) if share < 1.0}
    if not ramping:
        return inner
    rest = [(pool, weight) for pool, weight in zip(pools, weights or (1,) * len(pools)) if id(pool) not in ramping]
    settled = make_balancer(algorithm, tuple(p for p, _ in rest), tuple(w for _, w in rest)) if rest else None
    return SlowStart(inner, ramping, settled)
