"""Time lb.maglev.build_table (not a pytest test).

Usage:
    .venv/bin/python tests/bench/maglev_build.py
    .venv/bin/python tests/bench/maglev_build.py --repeat 9
"""

from __future__ import annotations

import argparse
import statistics
import time

from lb.maglev import DEFAULT_SIZE, build_table

GOAL_MS = 100.0
CASES = [(10, DEFAULT_SIZE), (100, DEFAULT_SIZE), (1000, DEFAULT_SIZE), (1000, 655373)]


def backends(n: int) -> list[tuple[str, int]]:
    return [(f"10.{k // 65536}.{k // 256 % 256}.{k % 256}:9000", 1) for k in range(n)]


def time_build(n: int, size: int, repeat: int) -> list[float]:
    """Wall-clock seconds of `repeat` builds of an n-backend table."""
    pool = backends(n)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        build_table(pool, size)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="builds per case (default 5)")
    args = parser.parse_args()
    goal = 0.0
    for n, size in CASES:
        times = time_build(n, size, args.repeat)
        best, median = min(times) * 1e3, statistics.median(times) * 1e3
        print(f"N={n:<5} M={size:<7} best {best:8.1f} ms   median {median:8.1f} ms")
        if (n, size) == (1000, DEFAULT_SIZE):
            goal = best
    print(f"N=1000 M={DEFAULT_SIZE}: {goal:.1f} ms (goal ≤ {GOAL_MS:.0f} ms)")


if __name__ == "__main__":
    main()
