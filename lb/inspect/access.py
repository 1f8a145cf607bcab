"""How inspection reaches its sources: root, the pinned maps, the admin socket."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lb import admin
from lb.dataplane.libbpf import BpfError
from lb.dataplane.loader import map_mismatch
from lb.dataplane.maps import Maps, MapsNotLoaded
from lb.dataplane.pins import open_pinned, pin_dir
from lb.dataplane.structs import map_specs
from lb.model import LoadBalancer


class InspectError(RuntimeError):
    """The question cannot be answered; the message says why and what to do."""


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise InspectError(f"{what} needs root: run with sudo (it reads pinned BPF maps and /run/lb)")


@contextmanager
def open_maps(config: LoadBalancer, what: str) -> Iterator[Maps]:
    """The pinned maps of `config.name`, read-only in spirit (nothing here writes)."""
    require_root(what)
    directory = pin_dir(config.name)
    try:
        maps = open_pinned(config)
    except MapsNotLoaded:
        raise InspectError(f"nothing loaded for {config.name}: is lb up? (no maps pinned under {directory})") from None
    except BpfError as exc:
        raise InspectError(f"{directory}: {exc}") from None
    # Checked on the maps just opened (each BpfMap already holds its info): no second open.
    problems = [problem for name, spec in map_specs(maps.limits).items()
                if (problem := map_mismatch(os.path.join(directory, name.value), spec, maps.raw(name).info,
                                             reading=True))]
    if problems:
        maps.close()
        raise InspectError("the pinned maps do not match this config's limits:\n  " + "\n  ".join(problems))
    with maps:
        yield maps


def ask_daemon(config: LoadBalancer, cmd: str, **args: Any) -> tuple[Any, str | None]:
    """(result, None) from the admin socket, or (None, why the daemon could not answer)."""
    try:
        return admin.request(config.admin_socket, cmd, timeout=5, **args), None
    except admin.AdminError as exc:
        return None, str(exc)
