"""Judge a pytest run from its output: the verdict of `make test-kernels`.

    python3 tests/kernels/summary.py LABEL PYTEST_LOG EXIT_STATUS

prints one line, "LABEL: ok, 57 passed in 80.1s" or "LABEL: FAILED, ...",
and exits 0 only when pytest exited 0, ran at least one test, and every test
passed: a skip counts as a failure here, since on a kernel under test a
skipped fixture is a fixture that did not run (no root, no bpffs, no BPF).
Warnings alone do not fail a run (the project's pytest turns warnings into
errors already). Standard library only: it runs on the host's python3.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field

# pytest's last line: "==== 55 passed, 2 skipped, 1 warning in 9.81s ====",
# or with -q "55 passed, 2 skipped in 9.81s", or "no tests ran in 0.01s".
_SUMMARY = re.compile(r"^=*\s*((?:\d+ [a-z]+(?:, )?)+|no tests ran) in ([\d.]+)s(?: \([\d:]+\))?\s*=*\s*$")
_COUNT = re.compile(r"(\d+) ([a-z]+)")
_HARMLESS = {"passed", "warning", "warnings"}


@dataclass
class Summary:
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float | None = None  # None: no summary line (pytest never finished)
    line: str = ""


def parse(output: str) -> Summary:
    """The last pytest summary line in output; an empty Summary when there is none."""
    for line in reversed(output.splitlines()):
        found = _SUMMARY.match(line.strip())
        if found:
            counts = {word: int(n) for n, word in _COUNT.findall(found.group(1))}
            if "error" in counts:  # pytest says "1 error" and "2 errors"
                counts["errors"] = counts.get("errors", 0) + counts.pop("error")
            return Summary(counts, float(found.group(2)), line.strip().strip("= "))
    return Summary()


def verdict(output: str, status: int | None) -> tuple[bool, str]:
    """(ok, reason): did this run prove that every test passes?"""
    summary = parse(output)
    if summary.seconds is None:
        return False, "no pytest summary (it crashed, or the guest died or timed out)"
    passed = summary.counts.get("passed", 0)
    bad = {word: n for word, n in summary.counts.items() if word not in _HARMLESS}
    if bad:
        return False, summary.line
    if passed == 0:
        return False, f"{summary.line} (nothing ran)"
    if status != 0:
        return False, f"{summary.line}, but pytest exited with status {status}"
    return True, summary.line


def main(argv: list[str]) -> int:
    label, log, status_text = argv
    try:
        with open(log, encoding="utf-8", errors="replace") as f:
            output = f.read()
    except FileNotFoundError:
        output = ""
    status = int(status_text) if status_text.strip().lstrip("-").isdigit() else None
    ok, reason = verdict(output, status)
    print(f"{label}: {'ok' if ok else 'FAILED'}, {reason}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
