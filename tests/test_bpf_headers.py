"""Every header in bpf/ compiles on its own, so none depends on lb.c's include order.

Each one is compiled by bcc, with the loader's own cflags (include path,
PIN_DIR, limits) and -Werror, from a file that includes only that header,
twice: a header that leans on something it does not include fails, and so
does one without an include guard. maps.h's maps compile into one-entry
placeholders (the loader makes and pins the real ones), so nothing is
pinned; the pin directory of the test's own is removed after all the same.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from lb.dataplane.loader import bpf_source_dir, compile_cflags, purge_pins
from lb.dataplane.structs import Limits
from tests.names import name

HEADERS = sorted(path.name for path in bpf_source_dir().glob("*.h"))
LIMITS = Limits(ring_size=13, max_vips=4, max_targets=8, conntrack_size=128)
NAME = name("headers")


def test_the_headers_are_found() -> None:
    assert {"consts.h", "csum.h", "maps.h", "nat.h", "parse.h", "structs.h"} <= set(HEADERS)


@pytest.mark.parametrize("header", HEADERS)
def test_header_has_an_include_guard(header: str) -> None:
    guard = "LB_" + Path(header).stem.upper() + "_H"
    text = (bpf_source_dir() / header).read_text()
    code = re.sub(r"/\*.*?\*/", "", text, flags=re.S).strip()
    assert code.startswith(f"#ifndef {guard}\n#define {guard}\n")
    assert code.endswith("#endif")


@pytest.fixture(scope="module")
def pins() -> Iterator[str]:
    purge_pins(NAME)
    try:
        yield NAME
    finally:
        purge_pins(NAME)


@pytest.mark.root
@pytest.mark.parametrize("header", HEADERS)
def test_header_compiles_on_its_own(pins: str, header: str) -> None:
    from bcc import BPF  # deferred, as in lb.dataplane.loader: loading libbcc is for root tests only

    source = f'#include "{header}"\n#include "{header}"\n'.encode()
    try:
        bpf = BPF(text=source, cflags=[*compile_cflags(pins, LIMITS), "-Werror"])
    except Exception as exc:  # bcc raises a bare Exception; clang's messages went to stderr
        pytest.fail(f"{header} does not compile on its own: {exc}")
    bpf.cleanup()
