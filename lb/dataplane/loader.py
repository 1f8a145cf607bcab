"""Compile bpf/lb.c with bcc, pin its maps, attach and detach it with XDP.

    program = Program.load("demo", Limits())        # compiles; reuses pinned maps
    with program.attached(["eth0"], XdpMode.AUTO):   # detaches on the way out
        ...

Maps live under /sys/fs/bpf/lb/<name>/ and are reused by the next load, so
a restarted daemon adopts the running state. Before compiling, every pinned
map is checked against what this build needs: a map pinned by a build with
other limits is refused with a message, never silently reused.

The program itself is pinned too (<pin dir>/prog), so `lb status` and
`lb down` can find it with no daemon running.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from lb import netlink as nl
from lb.dataplane import libbpf
from lb.dataplane.structs import MAP_TYPE_NAMES, Limits, MapSpec, map_specs
from lb.model import XdpMode

log = logging.getLogger("lb.dataplane")

PIN_ROOT = "/sys/fs/bpf/lb"
PROGRAM_PIN = "prog"
ENTRY_POINT = b"xdp_lb"


class LoaderError(RuntimeError):
    """The program could not be compiled, loaded or attached; says why."""


def bpf_source_dir() -> Path:
    """bpf/ beside the package (a checkout, an editable install), else the
    copy a regular install put in <prefix>/share/lb/bpf."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent.parent / "bpf", Path(sys.prefix) / "share" / "lb" / "bpf"):
        if (candidate / "lb.c").is_file():
            return candidate
    raise LoaderError(f"bpf/lb.c found neither beside {here.parent} nor in {sys.prefix}/share/lb/bpf")


def pin_dir(name: str) -> str:
    return f"{PIN_ROOT}/{name}"


def ensure_bpffs() -> None:
    if not os.path.ismount("/sys/fs/bpf"):
        raise LoaderError(
            "bpffs is not mounted on /sys/fs/bpf (deploy/install.sh mounts it: mount -t bpf bpf /sys/fs/bpf)"
        )


def check_pinned_maps(directory: str, limits: Limits) -> list[str]:
    """Problems that stop pinned maps from being reused by this build."""
    problems = []
    for name, spec in map_specs(limits).items():
        path = os.path.join(directory, name.value)
        if not os.path.exists(path):
            continue
        fd = libbpf.obj_get(path)
        try:
            info = libbpf.map_info(fd)
        finally:
            os.close(fd)
        problem = map_mismatch(path, spec, info)
        if problem:
            problems.append(problem)
    return problems


def map_mismatch(path: str, spec: MapSpec, info: libbpf.MapInfo) -> str | None:
    """Why the map pinned at `path` (described by `info`) is not what `spec` needs; None if it is."""
    want = (spec.map_type, ctypes.sizeof(spec.key), ctypes.sizeof(spec.value), spec.max_entries)
    have = (info.map_type, info.key_size, info.value_size, info.max_entries)
    if want == have:
        return None
    return (
        f"{path}: pinned as {MAP_TYPE_NAMES.get(have[0], have[0])} key {have[1]} B value {have[2]} B "
        f"max {have[3]}, this build needs {MAP_TYPE_NAMES.get(want[0], want[0])} key {want[1]} B "
        f"value {want[2]} B max {want[3]}"
    )


def compile_cflags(name: str, limits: Limits) -> list[str]:
    return [f"-I{bpf_source_dir()}", f'-DPIN_DIR="{pin_dir(name)}"', *limits.cflags()]


@dataclass(frozen=True)
class Attachment:
    netns: str | None
    ifname: str
    mode: str  # "native" or "generic": what was actually used


class Program:
    """The compiled and loaded XDP program with its pinned maps."""

    def __init__(self, name: str, limits: Limits, bpf: Any) -> None:
        self.name = name
        self.limits = limits
        self.pin_dir = pin_dir(name)
        self._bpf = bpf
        self._fn = bpf.load_func(ENTRY_POINT, bpf.XDP)
        self.fd: int = self._fn.fd

    @classmethod
    def load(cls, name: str, limits: Limits | None = None) -> Program:
        limits = limits or Limits()
        ensure_bpffs()
        directory = pin_dir(name)
        problems = check_pinned_maps(directory, limits)
        if problems:
            raise LoaderError(
                "pinned maps were made by a build with other limits:\n  " + "\n  ".join(problems)
                + "\nremove them with `lb down --purge` (flows in them are lost), or keep the old limits"
            )
        os.makedirs(directory, exist_ok=True)
        from bcc import BPF  # deferred: the CLI reads maps without a compiler

        try:
            bpf = BPF(src_file=str(bpf_source_dir() / "lb.c").encode(), cflags=compile_cflags(name, limits))
        except Exception as exc:  # bcc raises bare Exception on compile errors
            raise LoaderError(f"compiling bpf/lb.c failed: {exc}") from exc
        try:
            program = cls(name, limits, bpf)
            program._pin_program()
        except BaseException:
            bpf.cleanup()
            raise
        return program

    def _pin_program(self) -> None:
        path = os.path.join(self.pin_dir, PROGRAM_PIN)
        if os.path.exists(path):
            os.unlink(path)  # the previous build's; ours replaces it
        libbpf.obj_pin(self.fd, path)

    def decoded_types(self, map_name: str) -> tuple[Any, Any]:
        """(Key, Leaf) ctypes types bcc decoded from the compiled program."""
        table = self._bpf[map_name.encode()]
        return table.Key, table.Leaf

    @property
    def prog_id(self) -> int:
        return libbpf.prog_info(self.fd).prog_id

    def close(self) -> None:
        """Release this process's handles. Attached interfaces and pinned maps stay."""
        self._bpf.cleanup()

    def __enter__(self) -> Program:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- attach ------------------------------------------------------------

    def attach(self, ifname: str, mode: XdpMode, netns: str | None = None) -> Attachment:
        """Attach on one interface, replacing any program there (an adoption
        after restart swaps programs atomically, so traffic never stops).
        AUTO tries native first and falls back to generic, logging which."""
        with nl.iproute(netns) as ipr:
            if mode is XdpMode.AUTO:
                try:
                    nl.attach_xdp(ipr, ifname, self.fd, "native")
                    used = "native"
                except NetlinkError as exc:
                    if exc.code not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOTSUP):
                        raise LoaderError(f"attach XDP to {ifname}: {exc}") from exc
                    log.warning("%s: native XDP not supported (%s); using generic mode", ifname, exc)
                    nl.attach_xdp(ipr, ifname, self.fd, "generic")
                    used = "generic"
            else:
                try:
                    nl.attach_xdp(ipr, ifname, self.fd, mode.value)
                except NetlinkError as exc:
                    raise LoaderError(f"attach XDP ({mode.value}) to {ifname}: {exc}") from exc
                used = mode.value
            # A program left in the other mode by an earlier run would shadow ours.
            other = "generic" if used == "native" else "native"
            current_mode, _ = nl.xdp_info(ipr, ifname)
            if current_mode not in (None, used):
                nl.detach_xdp(ipr, ifname, other)
        log.info("xdp: program %s attached to %s%s in %s mode", self.prog_id,
                 f"{netns}/" if netns else "", ifname, used)
        return Attachment(netns, ifname, used)

    @contextmanager
    def attached(self, interfaces: Sequence[str], mode: XdpMode,
                 netns: str | None = None) -> Iterator[list[Attachment]]:
        """Attach on every interface; detach them all on the way out."""
        done: list[Attachment] = []
        try:
            for ifname in interfaces:
                done.append(self.attach(ifname, mode, netns))
            yield done
        finally:
            for attachment in done:
                detach(attachment)


def detach(attachment: Attachment) -> None:
    with nl.iproute(attachment.netns) as ipr:
        nl.detach_xdp(ipr, attachment.ifname, attachment.mode)


def detach_all(interfaces: Sequence[str], netns: str | None = None) -> list[str]:
    """Detach whatever XDP program is on these interfaces; returns those that had one."""
    detached = []
    with nl.iproute(netns) as ipr:
        for ifname in interfaces:
            try:
                mode, _ = nl.xdp_info(ipr, ifname)
            except nl.NetlinkLookupError:
                continue
            if mode in ("native", "generic"):
                nl.detach_xdp(ipr, ifname, mode)
                detached.append(ifname)
    return detached


def purge_pins(name: str) -> bool:
    """Remove the pinned program and maps of `name` (flows in them are lost)."""
    directory = pin_dir(name)
    if not os.path.isdir(directory):
        return False
    shutil.rmtree(directory)
    return True
