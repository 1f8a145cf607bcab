"""Names of everything the tests create: namespaces, pin directories, sockets.

All derive from one prefix (LB_TEST_PREFIX, default "lbt"), distinct from the
demo's "lab", so a test run, the demo and a second test run (another prefix)
can share a machine without touching each other's namespaces or maps.
"""

from __future__ import annotations

import os

PREFIX = os.environ.get("LB_TEST_PREFIX", "lbt")


def name(suffix: str) -> str:
    return f"{PREFIX}-{suffix}"
