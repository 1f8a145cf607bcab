"""Tests for lb.maglev: balance, disruption, weights, determinism, validation."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
from collections.abc import Sequence

import pytest

from lb.maglev import DEFAULT_SIZE, NO_BACKEND, build_table, is_prime, slot_shares


def names(n: int) -> list[str]:
    return [f"10.0.{k // 250}.{k % 250}:9000" for k in range(n)]


def unweighted(n: int) -> list[tuple[str, int]]:
    return [(name, 1) for name in names(n)]


def owners(table: Sequence[int], backends: Sequence[tuple[str, int]]) -> list[str | None]:
    """The table read as slot -> identity, independent of list order."""
    return [backends[b][0] if b >= 0 else None for b in table]


def digest(table: Sequence[int]) -> str:
    """A byte-order independent digest of a table."""
    return hashlib.sha256(",".join(map(str, table)).encode()).hexdigest()


def changed_fraction(before: list[str | None], after: list[str | None]) -> float:
    return sum(a != b for a, b in zip(before, after)) / len(before)


# Reference: the paper's Pseudocode 1 (explicit permutation lists, next[]),
# with the hash spelled out from the module docstring, and turns dealt by the
# credit loop the docstring describes (all quantities doubled to stay integer).
def reference_table(backends: Sequence[tuple[str, int]], size: int) -> list[int]:
    active = sorted(
        (identity, index, weight)
        for index, (identity, weight) in enumerate(backends)
        if weight > 0
    )
    permutation = []
    for identity, _, _ in active:
        d = hashlib.blake2b(identity.encode(), digest_size=16, person=b"lb.maglev.v1").digest()
        offset = int.from_bytes(d[:8], "big") % size
        skip = int.from_bytes(d[8:], "big") % (size - 1) + 1
        permutation.append([(offset + j * skip) % size for j in range(size)])
    top = max(weight for _, _, weight in active)
    credit = [top] * len(active)
    nxt = [0] * len(active)
    entry = [-1] * size
    n = 0
    while True:
        for i, (_, index, weight) in enumerate(active):
            credit[i] += 2 * weight
            if credit[i] < 2 * top:
                continue
            credit[i] -= 2 * top
            c = permutation[i][nxt[i]]
            while entry[c] >= 0:
                nxt[i] += 1
                c = permutation[i][nxt[i]]
            entry[c] = index
            nxt[i] += 1
            n += 1
            if n == size:
                return entry


# --- the algorithm --------------------------------------------------------


@pytest.mark.parametrize(
    "backends, size",
    [
        (unweighted(7), 251),
        (unweighted(10), 2003),
        ([("a", 1), ("b", 2), ("c", 3)], 1009),
        ([(f"t{k}", 1 + k % 4) for k in range(13)], 4099),
        ([("big", 50), ("small", 1), ("off", 0), ("mid", 7)], 1009),
    ],
)
def test_matches_paper_pseudocode(backends: list[tuple[str, int]], size: int) -> None:
    assert list(build_table(backends, size)) == reference_table(backends, size)


def test_golden_table() -> None:
    # Pinned so that an accidental change of hash or turn order, which would
    # make hosts running different versions disagree on every ring, fails here.
    backends = [("10.0.1.11:9000", 1), ("10.0.1.12:9000", 2), ("10.0.1.13:9000", 1)]
    assert list(build_table(backends, 13)) == [2, 1, 1, 2, 1, 0, 0, 0, 1, 0, 2, 1, 1]
    table = build_table([(f"10.0.1.{k}:9000", 1 + k % 3) for k in range(10)])
    assert digest(table) == "05e51e92618b9dff994040ec7ae2902c8b9e5a12b867332ee2d2a963816909cf"


def test_default_size_and_full_table() -> None:
    assert DEFAULT_SIZE == 65537
    table = build_table(unweighted(10))
    assert table.typecode == "i"
    assert len(table) == DEFAULT_SIZE
    assert set(table) == set(range(10))


def test_balance_n10_within_one_percent() -> None:
    n = 10
    shares = slot_shares(build_table(unweighted(n)), n)
    assert max(abs(share * n - 1) for share in shares) <= 0.01


def test_balance_n100_within_one_percent() -> None:
    # Unweighted turns are one per backend per round, so counts differ by at
    # most one slot: 655 or 656 of 65537 here, 0.06 % from even.
    n = 100
    shares = slot_shares(build_table(unweighted(n)), n)
    assert max(abs(share * n - 1) for share in shares) <= 0.01


@pytest.mark.parametrize("n, bound", [(10, 1.1), (100, 2.0)])
def test_disruption_on_removal(n: int, bound: float) -> None:
    backends = unweighted(n)
    before = owners(build_table(backends), backends)
    for removed in (0, n // 2, n - 1):
        rest = backends[:removed] + backends[removed + 1 :]
        after = owners(build_table(rest), rest)
        # The removed backend's 1/n of slots must move; the rest should not.
        assert changed_fraction(before, after) <= bound / n


def test_removal_equals_weight_zero() -> None:
    backends = unweighted(10)
    zeroed = [(name, 0 if k == 3 else w) for k, (name, w) in enumerate(backends)]
    removed = backends[:3] + backends[4:]
    assert owners(build_table(zeroed), zeroed) == owners(build_table(removed), removed)


# --- weights --------------------------------------------------------------


def test_weights_honoured() -> None:
    backends = [("a:1", 1), ("b:1", 2), ("c:1", 3)]
    shares = slot_shares(build_table(backends), 3)
    for share, want in zip(shares, (1 / 6, 2 / 6, 3 / 6)):
        assert abs(share / want - 1) <= 0.02


def test_weights_honoured_many_backends() -> None:
    # M = 65537 > 100 * N * max_weight: each share within 1 % of its weight.
    backends = [(name, 1 + k % 5) for k, name in enumerate(names(20))]
    total = sum(w for _, w in backends)
    shares = slot_shares(build_table(backends), len(backends))
    for share, (_, weight) in zip(shares, backends):
        assert abs(share / (weight / total) - 1) <= 0.01


def test_weights_scale_invariant() -> None:
    small = [("a", 1), ("b", 2), ("c", 3)]
    large = [("a", 10), ("b", 20), ("c", 30)]
    assert build_table(small, 1009) == build_table(large, 1009)


def test_equal_weights_are_unweighted() -> None:
    backends = unweighted(10)
    heavy = [(name, 7) for name, _ in backends]
    assert build_table(backends) == build_table(heavy)


def test_weight_zero_excluded() -> None:
    backends = [("a", 1), ("b", 0), ("c", 2)]
    table = build_table(backends, 1009)
    assert 1 not in table
    assert set(table) == {0, 2}


# --- determinism ----------------------------------------------------------


def test_same_table_in_other_processes() -> None:
    code = (
        "import hashlib; from lb.maglev import build_table; "
        "t = build_table([(f'10.0.1.{k}:9000', 1 + k % 3) for k in range(50)]); "
        "print(hashlib.sha256(','.join(map(str, t)).encode()).hexdigest())"
    )
    here = digest(build_table([(f"10.0.1.{k}:9000", 1 + k % 3) for k in range(50)]))
    for hashseed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hashseed)
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == here


def test_independent_of_backend_order() -> None:
    backends = [(name, 1 + k % 3) for k, name in enumerate(names(30))]
    shuffled = backends[:]
    random.Random(7).shuffle(shuffled)
    assert shuffled != backends
    assert owners(build_table(backends), backends) == owners(build_table(shuffled), shuffled)


def test_entries_index_the_callers_list() -> None:
    # Same slots per identity, but each entry indexes the list it was given.
    forward = build_table([("a", 1), ("z", 1)], 101)
    backward = build_table([("z", 1), ("a", 1)], 101)
    assert list(backward) == [1 - b for b in forward]


def test_seed_changes_table() -> None:
    backends = unweighted(10)
    plain = build_table(backends, 1009)
    assert build_table(backends, 1009, seed=b"") == plain
    assert build_table(backends, 1009, seed=b"vip-1") == build_table(backends, 1009, seed=b"vip-1")
    assert build_table(backends, 1009, seed=b"vip-1") != plain
    assert build_table(backends, 1009, seed=b"vip-1") != build_table(backends, 1009, seed=b"vip-2")


# --- edge cases and validation --------------------------------------------


def test_no_backends() -> None:
    assert list(build_table([], 13)) == [NO_BACKEND] * 13
    assert list(build_table([("a", 0), ("b", 0)], 13)) == [NO_BACKEND] * 13
    assert len(build_table([])) == DEFAULT_SIZE


def test_single_backend_fills_everything() -> None:
    assert list(build_table([("a", 5)], 101)) == [0] * 101
    assert list(build_table([("off", 0), ("a", 1)], 101)) == [1] * 101


def test_size_two_and_as_many_slots_as_backends() -> None:
    assert sorted(build_table([("a", 1), ("b", 1)], 2)) == [0, 1]
    assert sorted(build_table(unweighted(7), 7)) == list(range(7))


@pytest.mark.parametrize("size", [0, 1, 4, 65536, 65535, 561, -7])
def test_non_prime_size_rejected(size: int) -> None:
    with pytest.raises(ValueError, match="prime"):
        build_table(unweighted(2), size)


@pytest.mark.parametrize("size", [True, 13.0, "13"])
def test_non_int_size_rejected(size: object) -> None:
    with pytest.raises(TypeError):
        build_table(unweighted(2), size)  # type: ignore[arg-type]  # wrong on purpose: the check is under test


def test_size_smaller_than_backends_rejected() -> None:
    with pytest.raises(ValueError, match="smaller"):
        build_table(unweighted(6), 5)
    # Backends with weight 0 need no slot.
    build_table(unweighted(5) + [("off", 0)], 5)


@pytest.mark.parametrize(
    "backends, error",
    [
        ([("a", 1), ("a", 2)], ValueError),
        ([("a", -1)], ValueError),
        ([("a", 1.5)], TypeError),
        ([("a", True)], TypeError),
        ([(b"a", 1)], TypeError),
    ],
)
def test_bad_backends_rejected(backends: list[tuple[object, object]], error: type) -> None:
    with pytest.raises(error):
        build_table(backends, 13)  # type: ignore[arg-type]  # wrong on purpose: the check is under test


def test_seed_too_long_rejected() -> None:
    with pytest.raises(ValueError, match="seed"):
        build_table(unweighted(2), 13, seed=bytes(65))


def test_is_prime() -> None:
    primes = [n for n in range(200) if is_prime(n)]
    assert primes == [n for n in range(2, 200) if all(n % d for d in range(2, n))]
    assert is_prime(65537) and is_prime(655373) and is_prime(2**61 - 1)
    # Carmichael numbers and a strong pseudoprime to base 2.
    assert not any(is_prime(n) for n in (561, 1105, 41041, 2047, 65537 * 65539))


def test_slot_shares() -> None:
    assert slot_shares([0, 1, 1, NO_BACKEND], 3) == [0.25, 0.5, 0.0]
    assert slot_shares([], 2) == [0.0, 0.0]
