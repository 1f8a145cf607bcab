"""The XDP program passes the verifier with the production limits.

The packet fixtures load it with small maps; the daemon loads it with
Limits() (or what the config sets). `make test-kernels` runs this on every
supported kernel, since older verifiers reject code that newer ones accept.
"""

from __future__ import annotations

import pytest

from lb.dataplane.loader import Program, purge_pins
from lb.dataplane.structs import Limits
from tests.names import name

NAME = name("defaults")


@pytest.mark.root
def test_loads_with_the_default_limits() -> None:
    purge_pins(NAME)
    try:
        with Program.load(NAME, Limits()) as program:
            assert program.fd >= 0
    finally:
        purge_pins(NAME)
