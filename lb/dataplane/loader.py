"""Compile bpf/lb.c with bcc, pin its maps, attach and detach it with XDP.

    program = Program.load("demo", Limits())        # compiles; reuses pinned maps
    with program.attached(["eth0"], XdpMode.AUTO):   # detaches on the way out
        ...

Maps live under /sys/fs/bpf/lb/<name>/ and are reused by the next load, so
a restarted daemon adopts the running state. Before compiling, every pinned
map is checked against what this build needs: a map pinned by a build with
other limits is refused with a message, never silently reused.

The maps are the loader's, not bcc's: bcc would reopen a pinned map by id
(bpf_map_get_fd_by_id), which needs CAP_SYS_ADMIN, and deploy/lb.service
does not grant it. So bcc compiles bpf/lb.c with placeholder maps of one
entry (maps.h: LB_MAP_ENTRIES); the loader opens the pinned maps by path
(BPF_OBJ_GET), creating and pinning any that are missing (first start), then
points the program's map references at them and loads it through bcc
(the same BTF, verifier log and program name as bcc's own load_func). One
path for a first start and a restart; CAP_BPF, CAP_NET_ADMIN and
CAP_PERFMON are all it takes.

The program itself is pinned too (<pin dir>/prog), so `lb status` and
`lb down` can find it with no daemon running.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import struct
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from lb import netlink as nl
from lb.dataplane import libbpf
from lb.dataplane.pins import PROGRAM_PIN, pin_dir
from lb.dataplane.structs import (
    MAP_TYPE_NAMES,
    TABLE_NAMES,
    Limits,
    MapName,
    MapSpec,
    Resize,
    fill_held,
    fill_removed_by_lb,
    map_specs,
)
from lb.model import XdpMode

log = logging.getLogger("lb.dataplane")

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


BPFFS = "/sys/fs/bpf"


def ensure_bpffs() -> None:
    """Mount bpffs on /sys/fs/bpf if it is not (as cilium-agent does): the
    maps are pinned there. Only lb's pins use it, so mounting it changes
    nothing else on the host; said in the log."""
    if os.path.ismount(BPFFS):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"bpf", BPFFS.encode(), b"bpf", ctypes.c_ulong(0), None) != 0:
        err = ctypes.get_errno()
        raise LoaderError(f"bpffs is not mounted on {BPFFS} and mounting it failed: {os.strerror(err)} "
                          f"(mount it: mount -t bpf bpf {BPFFS}; deploy/install.sh --system does at boot)")
    log.warning("bpffs was not mounted on %s: mounted it (mount -t bpf bpf %s)", BPFFS, BPFFS)


def check_pinned_maps(directory: str, limits: Limits) -> list[str]:
    """Problems that stop pinned maps from being reused by this build (a map
    open_maps would replace is none: see replacement)."""
    problems = []
    for name, spec in map_specs(limits).items():
        path = os.path.join(directory, name.value)
        if not os.path.exists(path):
            continue
        fd = libbpf.obj_get(path)
        try:
            info = libbpf.map_info(fd)
            problem = map_mismatch(path, spec, info)
            if problem and replacement(spec, info, fd) is None:
                problems.append(problem + _why_kept(spec, info))
        finally:
            os.close(fd)
    return problems


def map_mismatch(path: str, spec: MapSpec, info: libbpf.MapInfo, *, reading: bool = False) -> str | None:
    """Why the map pinned at `path` (described by `info`) is not what `spec` needs; None if it is.
    reading=True (inspection, which only reads): a map the loader may resize
    (MapSpec.resize) is fine at any size, e.g. the small IPv6 flow tables of a
    daemon started before its config gained an IPv6 listener."""
    want = (spec.map_type, ctypes.sizeof(spec.key), ctypes.sizeof(spec.value), spec.max_entries, spec.flags)
    have = (info.map_type, info.key_size, info.value_size, info.max_entries, info.flags)
    if want == have or (reading and spec.resize is not Resize.REFUSE and _only_size_differs(spec, info)):
        return None
    sized = ""
    if _only_size_differs(spec, info) and spec.sized_by:
        sized = f" (its size follows the config's {' and '.join(spec.sized_by)}, changed since it was pinned)"
    return (
        f"{path}: pinned as {MAP_TYPE_NAMES.get(have[0], have[0])} key {have[1]} B value {have[2]} B "
        f"max {have[3]} flags {have[4]:#x}, this build needs {MAP_TYPE_NAMES.get(want[0], want[0])} key "
        f"{want[1]} B value {want[2]} B max {want[3]} flags {want[4]:#x}{sized}"
    )


def _only_size_differs(spec: MapSpec, info: libbpf.MapInfo) -> bool:
    return (info.map_type, info.key_size, info.value_size, info.flags) == \
           (spec.map_type, ctypes.sizeof(spec.key), ctypes.sizeof(spec.value), spec.flags) \
        and info.max_entries != spec.max_entries


@dataclass(frozen=True)
class Replacement:
    """A pinned map open_maps unpins and makes anew at its MapSpec's size."""

    had: int  # its max_entries
    why: str  # for the log
    lossy: bool  # it held entries (none of a VIP of this config)


def replacement(spec: MapSpec, info: libbpf.MapInfo, fd: int) -> Replacement | None:
    """Whether the pinned map `fd` (of `info`, not what `spec` needs) may be
    unpinned and made anew at spec's size, losing no flow; None if it may not.

    The IPv6 flow tables (MapSpec.resize): sized by whether the config has
    an IPv6 TCP/UDP listener, so the first one (a restart) would otherwise
    cost `lb down` and every IPv4 flow with it. An empty one is replaced;
    with no IPv6 listener one that holds flows is too (they belong to VIPs
    the config no longer has). The running program keeps the old map until
    the new program replaces it on the interfaces: unpinning only drops the
    pin's reference, and the kernel frees the map with its last one."""
    if spec.resize is Resize.REFUSE or not _only_size_differs(spec, info):
        return None
    if libbpf.map_is_empty(fd, info.key_size):
        return Replacement(info.max_entries, "it held no entries: no flow is lost", lossy=False)
    if spec.resize is Resize.ALWAYS:
        return Replacement(info.max_entries, "the flows it held are dropped: the config has no IPv6 TCP/UDP "
                                             "listener they could belong to (their VIPs are gone)", lossy=True)
    return None


def _why_kept(spec: MapSpec, info: libbpf.MapInfo) -> str:
    if spec.resize is Resize.WHEN_EMPTY and _only_size_differs(spec, info):
        return ", and it holds flows (an empty one would be replaced)"
    return ""


def compile_cflags(name: str, limits: Limits) -> list[str]:
    """bcc's flags for bpf/lb.c: the limits, and placeholder maps of one entry
    (the program is loaded against the maps open_maps gives)."""
    return [f"-I{bpf_source_dir()}", f'-DPIN_DIR="{pin_dir(name)}"', "-DLB_MAP_ENTRIES(n)=1", *limits.cflags()]


def open_maps(directory: str, limits: Limits) -> dict[MapName, int]:
    """An fd for each map of the program: the one pinned in `directory`,
    opened by path, else a new one, pinned there (also in place of a pinned
    one that replacement allows). The caller closes them."""
    fds: dict[MapName, int] = {}
    replaced = []
    try:
        for name, spec in map_specs(limits).items():
            fds[name], new = _open_or_create(os.path.join(directory, name.value), spec)
            if new:
                replaced.append(name)
        fill = libbpf.BpfMap(fds[MapName.TABLE_FILL], ctypes.c_uint32, ctypes.c_uint64, owned=False)
        for name in replaced:  # table_fill's model of a new table starts at 0, as the table does
            table = FILL_TABLES.get(name)
            if table is not None:
                for slot in (fill_held(table), fill_removed_by_lb(table)):
                    fill.update(ctypes.c_uint32(slot), ctypes.c_uint64(0))
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    return fds


FILL_TABLES = {MapName(table_name): table for table, table_name in TABLE_NAMES.items()}  # table_fill's index


def _open_or_create(path: str, spec: MapSpec) -> tuple[int, bool]:
    """(fd, whether it replaced a pinned map)."""
    try:
        pinned = _open_pinned(path, spec)
    except FileNotFoundError:
        pinned = None
    if isinstance(pinned, int):
        return pinned, False
    if pinned is not None:
        os.unlink(path)  # the old map lives on while a program holds it (replacement)
        log.log(logging.WARNING if pinned.lossy else logging.INFO, "%s: replaced, max %d -> %d (%s)",
                path, pinned.had, spec.max_entries, pinned.why)
    try:
        fd = libbpf.map_create(spec.map_type, spec.name.value, ctypes.sizeof(spec.key), ctypes.sizeof(spec.value),
                               spec.max_entries, spec.flags)
    except libbpf.BpfError as exc:
        raise LoaderError(str(exc)) from exc
    try:
        libbpf.obj_pin(fd, path)
    except libbpf.BpfError as exc:
        os.close(fd)
        if exc.errno == errno.EEXIST:  # another loader pinned one meanwhile: use that
            return _open_or_create(path, spec)
        raise LoaderError(str(exc)) from exc
    if pinned is None:
        log.info("created and pinned map %s", path)
    return fd, pinned is not None


def _open_pinned(path: str, spec: MapSpec) -> int | Replacement:
    """The map pinned at `path`, opened by path, or the Replacement that
    replacement() allows for it; FileNotFoundError if none is pinned."""
    try:
        fd = libbpf.obj_get(path)
    except libbpf.BpfError as exc:
        if exc.errno == errno.ENOENT:
            raise FileNotFoundError(path) from exc
        raise LoaderError(str(exc)) from exc
    info = libbpf.map_info(fd)
    problem = map_mismatch(path, spec, info)  # pinned since check_pinned_maps looked
    if problem:
        try:
            allowed = replacement(spec, info, fd)
        finally:
            os.close(fd)
        if allowed is None:
            raise LoaderError(problem + _why_kept(spec, info))
        return allowed
    return fd


BPF_LD_IMM64 = 0x18  # BPF_LD | BPF_DW | BPF_IMM: a 64-bit immediate, two instructions
BPF_PSEUDO_MAP_FD = 1  # ... whose imm is a map fd
BPF_PSEUDO_MAP_VALUE = 2  # ... whose imm is a map fd (and the next insn's an offset into its value)
INSN = struct.Struct("=BBhi")  # struct bpf_insn: code, dst_reg:4 src_reg:4, off, imm


def remap_maps(insns: bytearray, fds: Mapping[int, int]) -> int:
    """Point every map reference (ld_imm64 of a map fd) in `insns` from the fd
    it names to fds[fd], in place; returns how many were changed. A reference
    to an fd not in `fds` is an error: the program would use a map lb did not give it."""
    changed = 0
    at = 0
    while at + INSN.size <= len(insns):
        code, regs, off, imm = INSN.unpack_from(insns, at)
        if code == BPF_LD_IMM64:
            src_reg = regs >> 4 if sys.byteorder == "little" else regs & 0x0F
            if src_reg in (BPF_PSEUDO_MAP_FD, BPF_PSEUDO_MAP_VALUE):
                if imm not in fds:
                    raise LoaderError(f"instruction {at // INSN.size} refers to map fd {imm}, not one of lb's "
                                      "maps (a map in bpf/maps.h missing from map_specs in lb/dataplane/structs.py?)")
                INSN.pack_into(insns, at, code, regs, off, fds[imm])
                changed += 1
            at += INSN.size  # the second half of the immediate
        at += INSN.size
    return changed


def load_xdp(bpf: Any, map_fds: Mapping[MapName, int]) -> int:
    """Load ENTRY_POINT of a compiled bcc module, its placeholder maps swapped
    for `map_fds`; returns the program's fd (the caller owns it).

    bcc's own bcc_func_load does the load, as BPF.load_func would, so the
    program keeps the BTF, name and license bcc gives it, and a verifier
    rejection prints the verifier's log to stderr as before."""
    from bcc import BPF  # deferred, as in Program.load: the CLI reads maps without a compiler
    from bcc.libbcc import lib

    swap = {}
    for name, map_fd in map_fds.items():
        placeholder = lib.bpf_table_fd(bpf.module, name.value.encode())
        if placeholder < 0:
            raise LoaderError(f"bpf/maps.h declares no map {name.value}")
        swap[placeholder] = map_fd
        problem = declaration_mismatch(name, libbpf.map_info(placeholder), libbpf.map_info(map_fd))
        if problem:
            raise LoaderError(problem)
    insns = bytearray(bpf.dump_func(ENTRY_POINT))
    if not remap_maps(insns, swap):
        raise LoaderError(f"{ENTRY_POINT.decode()}: no map references found to point at the pinned maps")
    code = (ctypes.c_char * len(insns)).from_buffer(insns)
    fd: int = lib.bcc_func_load(bpf.module, BPF.XDP, ENTRY_POINT, code, len(insns), lib.bpf_module_license(bpf.module),
                                lib.bpf_module_kern_version(bpf.module), 0, None, 0, None, -1)
    if fd < 0:
        err = ctypes.get_errno()
        raise LoaderError(f"loading {ENTRY_POINT.decode()} failed: {os.strerror(err)}"
                          + (" (the verifier's log is above)" if err in (errno.EACCES, errno.EINVAL) else ""))
    return fd


def declaration_mismatch(name: MapName, declared: libbpf.MapInfo, real: libbpf.MapInfo) -> str | None:
    """Why the map lb gives the program (`real`: pinned, or made from map_specs)
    is not the kind maps.h declares (bcc's placeholder, `declared`)."""
    want = (declared.map_type, declared.key_size, declared.value_size, declared.flags)
    have = (real.map_type, real.key_size, real.value_size, real.flags)
    if want == have:
        return None
    return (f"map {name.value}: bpf/maps.h declares {MAP_TYPE_NAMES.get(want[0], want[0])} key {want[1]} B "
            f"value {want[2]} B flags {want[3]:#x}, but the map (pinned, or made from map_specs in "
            f"lb/dataplane/structs.py) is {MAP_TYPE_NAMES.get(have[0], have[0])} key {have[1]} B value {have[2]} B "
            f"flags {have[3]:#x}")


@dataclass(frozen=True)
class Attachment:
    netns: str | None
    ifname: str
    mode: str  # "native" or "generic": what was actually used


class Program:
    """The compiled and loaded XDP program with its pinned maps."""

    def __init__(self, name: str, limits: Limits, bpf: Any, fd: int) -> None:
        self.name = name
        self.limits = limits
        self.pin_dir = pin_dir(name)
        self._bpf = bpf
        self.fd = fd

    @classmethod
    def load(cls, name: str, limits: Limits | None = None, *, source: str | None = None) -> Program:
        """Compile bpf/lb.c (or `source`, C text in its place: the benchmark's
        variants), load it against the pinned maps (made on a first start), pin it."""
        limits = limits or Limits()
        ensure_bpffs()
        directory = pin_dir(name)
        problems = check_pinned_maps(directory, limits)
        if problems:
            raise LoaderError(
                "pinned maps were made by a build with other limits or layouts:\n  " + "\n  ".join(problems)
                + "\nremove them with `lb down` (flows in them are lost), or keep the old limits"
            )
        os.makedirs(directory, exist_ok=True)
        from bcc import BPF  # deferred: the CLI reads maps without a compiler

        what = "bpf/lb.c" if source is None else "the program text"
        try:
            if source is None:
                bpf = BPF(src_file=str(bpf_source_dir() / "lb.c").encode(), cflags=compile_cflags(name, limits))
            else:
                bpf = BPF(text=source.encode(), cflags=compile_cflags(name, limits))
        except Exception as exc:  # bcc raises bare Exception on compile errors
            raise LoaderError(f"compiling {what} failed: {exc}") from exc
        try:
            map_fds = open_maps(directory, limits)
            try:
                fd = load_xdp(bpf, map_fds)
            finally:
                for map_fd in map_fds.values():  # the program holds the maps now
                    os.close(map_fd)
            program = cls(name, limits, bpf, fd)
        except BaseException:
            bpf.cleanup()
            raise
        try:
            program._pin_program()
        except BaseException:
            program.close()
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
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
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
