"""Compiled (mypyc) copies of the L7 hot path, used only when built from these very sources.

``deploy/install.sh`` compiles the modules of :data:`MODULES` with mypyc
(``deploy/build_native.py``) into :data:`DIRECTORY` (in the venv, never in
the source tree): their extension modules, mypyc's shared runtime and a
manifest with the SHA-256 of each source compiled and the interpreter's
extension suffix. ``import lb.l7`` calls :func:`activate`, which puts that
directory first on the package's path when every hash matches the source
next to this file; otherwise (no build, a build that failed, a module edited
since, another interpreter, ``LB_PURE_PYTHON=1``) the package runs as plain
Python, as it always could: the compiled modules are the same code. All or
none: an interpreted class cannot subclass a compiled one (H2Stream is a
ClientProtocol), and compiled modules call each other's classes natively.

Measured: ``tests/bench/l7_path.py`` (the Python of a keep-alive GET) a
quarter to a third less CPU; ``tests/bench/l7_proxy.py --compare-pure``
(`lb up` both ways in one run) 5-30% less CPU per request end to end.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path

# The per-request modules (the client protocol and everything it calls per
# request), h2stream, whose H2Stream subclasses ClientProtocol, and tls_transport
# (an HTTPS connection's reads and writes; a plain class, its base being asyncio's).
MODULES = (
    "access_log",
    "balancer",
    "client",
    "clock",
    "exchange",
    "flow_control",
    "h2stream",
    "httputil",
    "request_head",
    "routing",
    "stats",
    "tls_transport",
    "upstream",
)
DIRECTORY = Path(sys.prefix) / "lib" / "lb-native"
MANIFEST = "manifest.json"
PURE_ENV = "LB_PURE_PYTHON"  # set (to anything but "" or "0"): never use the compiled modules


def source_hashes(package: Path) -> dict[str, str]:
    """SHA-256 of each module of MODULES in ``package`` (a copy of lb/l7)."""
    return {name: hashlib.sha256((package / f"{name}.py").read_bytes()).hexdigest() for name in MODULES}


def ext_suffix() -> str:
    return str(sysconfig.get_config_var("EXT_SUFFIX"))


def manifest(package: Path, runtime: str) -> dict[str, object]:
    """What build_native writes next to the modules it compiled from ``package``."""
    return {"ext_suffix": ext_suffix(), "runtime": runtime, "sources": source_hashes(package)}


def usable(directory: Path, package: Path) -> str | None:
    """Why the build in ``directory`` cannot stand in for the sources in ``package``; None if it can."""
    if os.environ.get(PURE_ENV, "") not in ("", "0"):
        return f"{PURE_ENV} is set"
    try:
        built = json.loads((directory / MANIFEST).read_text())
        current = source_hashes(package)
    except (OSError, ValueError) as exc:
        return f"no usable build: {exc}"
    if built.get("ext_suffix") != ext_suffix():
        return "built for another interpreter"
    stale = sorted(name for name in MODULES if built.get("sources", {}).get(name) != current[name])
    if stale:
        return f"built from other sources of {', '.join(stale)} (run deploy/install.sh again)"
    return None


def activate(path: list[str]) -> str | None:
    """Put the compiled modules first on ``path`` (lb.l7's ``__path__``) when they
    match the sources; returns why not, or None when they are in use."""
    package = Path(path[0])
    why = usable(DIRECTORY, package)
    if why is not None:
        return why
    if str(DIRECTORY) not in sys.path:
        sys.path.append(str(DIRECTORY))  # mypyc's shared runtime is a top-level module
    path.insert(0, str(DIRECTORY / "lb" / "l7"))
    return None
