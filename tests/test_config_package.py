"""lb.config is one public module: what it exports, who may import what.

The package's private modules (lb/config/_*.py) are reached only through
lb.config, and the L7 side (lb.model, lb.l7.*) never loads the config
package or the TOML parser: workers get a built model, not a file. No root
needed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from lb import config

REPO = Path(__file__).resolve().parents[1]

# What callers in lb/ and tests/ use today; the package must keep exporting it.
PUBLIC = {
    "ADMIN_COMMANDS",
    "AdminRequest",
    "admin_request",
    "ACCESS_LOG_KEYS",
    "ConfigError",
    "ConfigIssue",
    "DEFAULT_SOURCE",
    "GROUP_KEYS",
    "HEALTH_KEYS",
    "LB_KEYS",
    "LISTENER_KEYS",
    "default_config_text",
    "load",
    "load_default",
    "loads",
    "parse",
}


def test_the_public_api_is_exported() -> None:
    assert set(config.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(config, name) is not None


def test_private_modules_are_imported_only_inside_the_package() -> None:
    private = re.compile(r"\blb\.config\._|\bfrom lb\.config import _")
    offenders = [
        str(path.relative_to(REPO))
        for top in ("lb", "tests")
        for path in sorted((REPO / top).rglob("*.py"))
        if REPO / "lb" / "config" not in path.parents and private.search(path.read_text())
    ]
    assert offenders == []


def test_the_l7_side_does_not_load_the_config_reader() -> None:
    # A fresh interpreter: this one has imported lb.config already.
    probe = """
import importlib, pkgutil, sys
import lb.l7, lb.model
for module in pkgutil.walk_packages(lb.l7.__path__, "lb.l7."):
    importlib.import_module(module.name)
print(" ".join(sorted(m for m in sys.modules if m == "tomllib" or m.startswith("lb.config"))))
"""
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO)
    assert loaded.stdout.split() == []
