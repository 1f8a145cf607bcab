"""Maglev lookup tables: which backend owns each of M slots.

The algorithm is section 3.4 of Eisenbud et al., "Maglev: A Fast and Reliable
Software Network Load Balancer" (NSDI 2016). Each backend derives, from a hash
of its identity string, a preference order over the M slots (M prime)::

    offset = h1(identity) mod M
    skip   = h2(identity) mod (M - 1) + 1
    permutation[j] = (offset + j * skip) mod M      # j = 0 .. M-1

Because M is prime and 1 <= skip < M, every permutation visits every slot once.
The table is filled in turns: a backend whose turn it is takes the first slot
of its permutation that is still empty, then the next turn begins. The build
stops after exactly M turns, when every slot is full. The kernel then maps a
flow to ``table[hash(5-tuple) % M]``.

Choices made here (and why):

* Identity and hashing. Backends are named by a caller-given string such as
  ``"10.0.1.11:9000"``. h1 and h2 are the two 8-byte halves of one BLAKE2b
  digest of that string (personalised ``lb.maglev.v1``, optionally keyed by a
  ``seed``), never Python's ``hash()``: every process on every lb host derives
  the same permutations, so hosts sharing VIPs through ECMP build the same
  table. Changing the hash changes every table; bump the personalisation if
  that is ever done on purpose.
* Order independence. Backends are sorted by identity before turns are handed
  out, so the table (read as slot -> identity) does not depend on the order in
  which the config lists targets. Entries are still indexes into the caller's
  ``backends`` sequence. Identities must therefore be unique.
* Weighting. Weights are non-negative ints; 0 leaves a backend out entirely.
  Turns are dealt in rounds with credits, much as katran does: every backend
  starts with ``W / 2`` credits (``W = max(weight)``), earns ``weight`` credits
  per round, and takes a turn in a round where it holds at least ``W``,
  paying ``W``. So the k-th turn of a backend of weight w falls in round
  ``ceil((k - 1/2) * W / w)``; within a round, turns go in identity order.
  Every turn fills exactly one slot, so a backend's slot count is its turn
  count: after R rounds that is ``R * w / W`` rounded to nearest, i.e. the
  shares are proportional to the weights to within about one slot each (the
  half-credit start makes the rounding symmetric; katran's zero start always
  rounds low-weight backends down). With equal weights every backend takes one
  turn per round, which is the paper's unweighted algorithm exactly. Scaling
  all weights by a constant does not change the table (1:2:3 and 10:20:30
  build the same one).
* No backends (or all weights 0): every entry is ``NO_BACKEND`` (-1).

Cost: the paper's bound is O(M log M) probes for the whole build. The inner
loop is written for CPython (see the comment in :func:`build_table`); N=1000
backends at M=65537 builds in about 20 ms on a 2-core VM
(``tests/bench/maglev_build.py``).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

DEFAULT_SIZE = 65537
"""Default table size M: prime, and over 100 slots per backend up to ~650."""

NO_BACKEND = -1
"""Table entry of a slot that has no backend (only when there are none)."""

_PERSON = b"lb.maglev.v1"

# Miller-Rabin with these bases is exact for every n < 3.3e24, far past any
# table that fits in memory.
_MR_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)


def is_prime(n: int) -> bool:
    """True when ``n`` is prime (exact for n < 3.3e24)."""
    if n < 2:
        return False
    for p in _MR_BASES:
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d //= 2
        r += 1
    for a in _MR_BASES:
        x = pow(a, d, n)
        if x == 1 or x == n - 1:
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def _offset_skip(identity: str, size: int, seed: bytes) -> tuple[int, int]:
    """The (offset, skip) of ``identity``'s permutation in a table of ``size``."""
    digest = hashlib.blake2b(
        identity.encode("utf-8"), digest_size=16, key=seed, person=_PERSON
    ).digest()
    h1 = int.from_bytes(digest[:8], "big")
    h2 = int.from_bytes(digest[8:], "big")
    return h1 % size, h2 % (size - 1) + 1


def _turns(order: list[int], weights: list[int], size: int) -> list[int]:
    """Backend indexes in turn order, exactly ``size`` turns.

    ``order`` holds the backends' indexes sorted by identity, ``weights`` their
    weights (all > 0) in the same order.
    """
    n = len(order)
    top = max(weights)
    if all(w == top for w in weights):
        # One turn each per round: the paper's unweighted algorithm.
        return (order * (size // n + 1))[:size]
    # Backend p's k-th turn is in round ceil((k - 1/2) * top / w), computed
    # in integers with everything doubled. Sorting the keys round * n + p
    # deals the turns round by round, in identity order within a round.
    # Running to round `rounds` yields at least sum(rounds * w / top - 1/2)
    # >= size turns.
    rounds = -(-(size + n) * top // sum(weights))
    keys: list[int] = []
    for p, w in enumerate(weights):
        last = (2 * rounds * w + top) // (2 * top)
        keys.extend(-(-(2 * k - 1) * top // (2 * w)) * n + p for k in range(1, last + 1))
    keys.sort()
    del keys[size:]
    return [order[key % n] for key in keys]


def build_table(
    backends: Sequence[tuple[str, int]],
    size: int = DEFAULT_SIZE,
    *,
    seed: bytes = b"",
) -> array[int]:
    """Build a Maglev lookup table of ``size`` slots.

    ``backends`` are ``(identity, weight)`` pairs; each entry of the returned
    ``array('i')`` is the index in ``backends`` of the slot's owner, or
    ``NO_BACKEND`` when no backend has a positive weight. ``seed`` (at most 64
    bytes) keys the hash; hosts that must agree on a table use the same seed.

    Raises ``ValueError`` when ``size`` is not prime, when it is smaller than
    the number of backends with a positive weight, for a duplicate identity,
    a negative weight or a seed over 64 bytes; ``TypeError`` when an identity
    is not a str or a weight not an int.
    """
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"table size must be an int, got {size!r}")
    if not is_prime(size):
        raise ValueError(f"table size must be prime, got {size}")
    if len(seed) > hashlib.blake2b.MAX_KEY_SIZE:
        raise ValueError(f"seed is {len(seed)} bytes, at most 64 allowed")
    seen: set[str] = set()
    active: list[int] = []
    for index, (identity, weight) in enumerate(backends):
        if not isinstance(identity, str):
            raise TypeError(f"backend {index}: identity must be a str, got {identity!r}")
        if isinstance(weight, bool) or not isinstance(weight, int):
            raise TypeError(f"backend {identity!r}: weight must be an int, got {weight!r}")
        if weight < 0:
            raise ValueError(f"backend {identity!r}: weight must be >= 0, got {weight}")
        if identity in seen:
            raise ValueError(f"backend {identity!r} is listed twice")
        seen.add(identity)
        if weight > 0:
            active.append(index)
    if len(active) > size:
        raise ValueError(
            f"table size {size} is smaller than the {len(active)} weighted backends"
        )
    if not active:
        return array("i", [NO_BACKEND]) * size

    order = sorted(active, key=lambda index: backends[index][0])
    turns = _turns(order, [backends[index][1] for index in order], size)

    # Per-backend state, indexed like `backends` (unused entries stay 0):
    # skip[b] is the permutation's stride, cursor[b] the next slot it prefers.
    skip = [0] * len(backends)
    cursor = [0] * len(backends)
    for index in active:
        cursor[index], skip[index] = _offset_skip(backends[index][0], size, seed)

    # Hot loop, fewer than M * ln(M) probes in total. Measured choices: a plain
    # list as table doubling as the "filled" flags (-1 = empty) beats a
    # separate bytearray; `% size` beats compare-and-subtract; the turn order
    # is precomputed so the loop does no bookkeeping; everything is a local.
    table = [NO_BACKEND] * size
    for b in turns:
        slot = cursor[b]
        stride = skip[b]
        while table[slot] >= 0:
            slot = (slot + stride) % size
        table[slot] = b
        cursor[b] = (slot + stride) % size
    return array("i", table)


def slot_shares(table: Sequence[int], n: int) -> list[float]:
    """Fraction of ``table``'s slots owned by each of backends ``0 .. n-1``.

    ``NO_BACKEND`` slots count for no one; an empty table gives all zeros.
    """
    counts = [0] * n
    for owner in table:
        if owner >= 0:
            counts[owner] += 1
    total = len(table)
    return [count / total if total else 0.0 for count in counts]
