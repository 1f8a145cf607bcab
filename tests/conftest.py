"""Shared fixtures: root detection and the namespace lab.

Tests marked `root` need root, BPF and network namespaces. In CI they run as
root and must pass; on a laptop without root they are skipped with the reason
printed (pytest -ra).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from lb.lab import Lab
from tests.names import PREFIX

IS_ROOT = os.geteuid() == 0
TEST_LAB_PREFIX = PREFIX  # tests/names.py


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if IS_ROOT:
        return
    skip = pytest.mark.skip(reason="needs root (BPF, XDP, network namespaces): run `sudo make test`")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    """The namespace lab, built once for the session and removed at its end."""
    the_lab = Lab(TEST_LAB_PREFIX)
    the_lab.down()  # leftovers of an interrupted run
    the_lab.up()
    try:
        yield the_lab
    finally:
        the_lab.down()
