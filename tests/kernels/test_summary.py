"""tests/kernels/summary.py: when does a kernel's pytest run count as passed?"""

from __future__ import annotations

import pytest

from tests.kernels.summary import parse, verdict

FULL = """\
tests/test_structs.py .....................                              [100%]

============================== 57 passed in 34.26s ==============================
"""


def test_all_passed_is_ok() -> None:
    assert verdict(FULL, 0) == (True, "57 passed in 34.26s")


@pytest.mark.parametrize("line, reason", [
    ("==== 55 passed, 2 skipped in 9.81s ====", "55 passed, 2 skipped in 9.81s"),
    ("1 failed, 13 passed, 8 errors in 43.01s", "1 failed, 13 passed, 8 errors in 43.01s"),
    ("==== 56 passed, 1 error in 3.00s ====", "56 passed, 1 error in 3.00s"),
    ("==== 56 passed, 1 xfailed in 3.00s ====", "56 passed, 1 xfailed in 3.00s"),
])
def test_a_skip_or_a_failure_fails(line: str, reason: str) -> None:
    assert verdict(line + "\n", 1) == (False, reason)


def test_warnings_alone_do_not_fail() -> None:
    assert verdict("==== 57 passed, 2 warnings in 1.50s ====\n", 0)[0]


def test_nothing_ran_fails() -> None:
    assert verdict("==== no tests ran in 0.01s ====\n", 5) == (False, "no tests ran in 0.01s (nothing ran)")


def test_a_run_that_never_finished_fails() -> None:
    ok, reason = verdict("tests/test_xdp_packets.py ......\n", None)
    assert not ok and reason.startswith("no pytest summary")


def test_a_summary_with_a_bad_status_fails() -> None:
    assert verdict(FULL, 3) == (False, "57 passed in 34.26s, but pytest exited with status 3")


def test_the_last_summary_counts_and_long_runs_parse() -> None:
    output = "==== 1 failed in 1.00s ====\nretry\n==== 57 passed in 700.12s (0:11:40) ====\n"
    summary = parse(output)
    assert summary.counts == {"passed": 57} and summary.seconds == 700.12
