"""A thin ctypes binding to libbpf.so.1 for what bcc does not offer.

bcc compiles and loads the program; everything that touches a map or a
program by file descriptor goes through here: create a map, open a pinned
one, read its info, look up / update / delete / iterate, batch updates, and
BPF_PROG_TEST_RUN. The CLI uses it to read pinned maps with no compiler.

libbpf 1.x returns -errno (and sets errno); failures raise BpfError.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any


class BpfError(OSError):
    """A bpf(2) call failed; errno and the operation are in the message."""


@lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL:
    lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    c_int, c_void_p, c_char_p = ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p
    c_uint32_p = ctypes.POINTER(ctypes.c_uint32)
    signatures: dict[str, tuple[Any, list[Any]]] = {
        "bpf_obj_get": (c_int, [c_char_p]),
        "bpf_obj_pin": (c_int, [c_int, c_char_p]),
        "bpf_obj_get_info_by_fd": (c_int, [c_int, c_void_p, c_uint32_p]),
        "bpf_map_create": (c_int, [c_int, c_char_p, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, c_void_p]),
        "bpf_map_lookup_elem": (c_int, [c_int, c_void_p, c_void_p]),
        "bpf_map_update_elem": (c_int, [c_int, c_void_p, c_void_p, ctypes.c_uint64]),
        "bpf_map_delete_elem": (c_int, [c_int, c_void_p]),
        "bpf_map_get_next_key": (c_int, [c_int, c_void_p, c_void_p]),
        "bpf_map_get_fd_by_id": (c_int, [ctypes.c_uint32]),
        "bpf_map_update_batch": (c_int, [c_int, c_void_p, c_void_p, c_uint32_p, c_void_p]),
        "bpf_map_lookup_batch": (c_int, [c_int, c_void_p, c_void_p, c_void_p, c_void_p, c_uint32_p, c_void_p]),
        "bpf_map_delete_batch": (c_int, [c_int, c_void_p, c_uint32_p, c_void_p]),
        "bpf_prog_test_run_opts": (c_int, [c_int, c_void_p]),
        "libbpf_num_possible_cpus": (c_int, []),
        "bpf_prog_load": (c_int, [c_int, c_char_p, c_char_p, c_void_p, ctypes.c_size_t, c_void_p]),
    }
    for name, (restype, argtypes) in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def _check(rc: int, what: str) -> int:
    if rc < 0:
        code = -rc if rc != -1 else ctypes.get_errno()
        raise BpfError(code, f"{what}: {os.strerror(code)}")
    return rc


@lru_cache(maxsize=1)
def possible_cpus() -> int:
    return _check(_lib().libbpf_num_possible_cpus(), "libbpf_num_possible_cpus")


# --- info ----------------------------------------------------------------------


class _MapInfo(ctypes.Structure):  # struct bpf_map_info (uapi/linux/bpf.h)
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
        ("ifindex", ctypes.c_uint32),
        ("btf_vmlinux_value_type_id", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32),
        ("btf_key_type_id", ctypes.c_uint32),
        ("btf_value_type_id", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("map_extra", ctypes.c_uint64),
    ]


class _ProgInfo(ctypes.Structure):  # the leading fields of struct bpf_prog_info
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
    ]


@dataclass(frozen=True)
class MapInfo:
    map_type: int
    map_id: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str


@dataclass(frozen=True)
class ProgInfo:
    prog_id: int
    name: str
    load_time_ns: int  # since boot


def obj_pin(fd: int, path: str) -> None:
    _check(_lib().bpf_obj_pin(fd, path.encode()), f"pin {path}")


def obj_get(path: str) -> int:
    """A new fd for the object pinned at `path`."""
    fd: int = _lib().bpf_obj_get(path.encode())
    if fd < 0:
        code = ctypes.get_errno() or errno.ENOENT
        raise BpfError(code, f"open pinned object {path}: {os.strerror(code)}")
    return fd


class _MapCreateOpts(ctypes.Structure):  # struct bpf_map_create_opts (libbpf 1.1)
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("btf_fd", ctypes.c_uint32),
        ("btf_key_type_id", ctypes.c_uint32),
        ("btf_value_type_id", ctypes.c_uint32),
        ("btf_vmlinux_value_type_id", ctypes.c_uint32),
        ("inner_map_fd", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("map_extra", ctypes.c_uint64),
        ("numa_node", ctypes.c_uint32),
        ("map_ifindex", ctypes.c_uint32),
    ]


def map_create(map_type: int, name: str, key_size: int, value_size: int, max_entries: int, flags: int = 0) -> int:
    """A new map (BPF_MAP_CREATE; CAP_BPF is enough); returns its fd."""
    opts = _MapCreateOpts(sz=ctypes.sizeof(_MapCreateOpts), map_flags=flags)
    return _check(_lib().bpf_map_create(map_type, name.encode(), key_size, value_size, max_entries,
                                        ctypes.byref(opts)), f"create map {name}")


def map_fd_by_id(map_id: int) -> int | None:
    """A new fd for the map of id `map_id`, None if there is none (any more).
    CAP_SYS_ADMIN: tests and diagnostics only, never the daemon (deploy/lb.service)."""
    fd: int = _lib().bpf_map_get_fd_by_id(map_id)
    if fd < 0:
        code = -fd if fd != -1 else ctypes.get_errno()
        if code == errno.ENOENT:
            return None
        _check(-code, f"open map id {map_id}")
    return fd


def map_is_empty(fd: int, key_size: int) -> bool:
    """Whether the hash map `fd` holds no entry (one BPF_MAP_GET_NEXT_KEY)."""
    key = ctypes.create_string_buffer(key_size)
    rc = _lib().bpf_map_get_next_key(fd, None, key)
    if rc < 0:
        code = -rc if rc != -1 else ctypes.get_errno()
        if code == errno.ENOENT:
            return True
        _check(-code, "first key")
    return False


BPF_PROG_TYPE_XDP = 6
# mov64 r0, XDP_PASS (2); exit: struct bpf_insn {u8 code; u8 regs; s16 off; s32 imm} each.
_XDP_PASS_INSNS = bytes([0xB7, 0, 0, 0, 2, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0])


def load_xdp_pass() -> int:
    """A two-instruction XDP program that passes every frame; returns its fd.

    The namespace lab loads it on the far end of each veth lb's program
    sends frames into: veth flushes frames sent with XDP_TX to its peer only
    when the peer has an XDP program (docs/kernel-notes.md)."""
    insns = ctypes.create_string_buffer(_XDP_PASS_INSNS, len(_XDP_PASS_INSNS))
    return _check(_lib().bpf_prog_load(BPF_PROG_TYPE_XDP, b"xdp_pass", b"GPL", insns, 2, None), "load xdp_pass")


def prog_info(fd: int) -> ProgInfo:
    info = _ProgInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(_lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "program info")
    return ProgInfo(info.id, info.name.decode(), info.load_time)


def map_info(fd: int) -> MapInfo:
    info = _MapInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(_lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "map info")
    return MapInfo(info.type, info.id, info.key_size, info.value_size, info.max_entries, info.map_flags,
                   info.name.decode())


# --- maps ----------------------------------------------------------------------


class BpfMap:
    """A map by file descriptor, with raw ctypes keys and values.

    Per-CPU maps take and return one value per possible CPU, each rounded up
    to 8 bytes, as the kernel lays them out.
    """

    def __init__(self, fd: int, key_type: Any, value_type: Any, per_cpu: bool = False, owned: bool = True) -> None:
        self.fd = fd
        self.info = map_info(fd)
        self.key_type = key_type
        self.value_type = value_type
        self.per_cpu = per_cpu
        self.owned = owned
        if per_cpu:
            stride = (ctypes.sizeof(value_type) + 7) & ~7
            if stride != ctypes.sizeof(value_type):
                raise ValueError("per-CPU value types must be 8-byte multiples")
            self.cell_type: Any = value_type * possible_cpus()
        else:
            self.cell_type = value_type

    @classmethod
    def open_pinned(cls, path: str, key_type: Any, value_type: Any, per_cpu: bool = False) -> BpfMap:
        fd = obj_get(path)
        try:
            return cls(fd, key_type, value_type, per_cpu)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        if self.owned and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> BpfMap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def lookup(self, key: Any) -> Any | None:
        value = self.cell_type()
        rc = _lib().bpf_map_lookup_elem(self.fd, ctypes.byref(key), ctypes.byref(value))
        if rc < 0:
            code = -rc if rc != -1 else ctypes.get_errno()
            if code == errno.ENOENT:
                return None
            _check(rc, f"lookup in {self.info.name}")
        return value

    def update(self, key: Any, value: Any, flags: int = 0) -> None:
        _check(_lib().bpf_map_update_elem(self.fd, ctypes.byref(key), ctypes.byref(value), flags),
               f"update {self.info.name}")

    def delete(self, key: Any) -> bool:
        rc = _lib().bpf_map_delete_elem(self.fd, ctypes.byref(key))
        if rc < 0:
            code = -rc if rc != -1 else ctypes.get_errno()
            if code == errno.ENOENT:
                return False
            _check(rc, f"delete from {self.info.name}")
        return True

    def keys(self) -> Iterator[Any]:
        key = self.key_type()
        rc = _lib().bpf_map_get_next_key(self.fd, None, ctypes.byref(key))
        while rc == 0:
            yield key
            following = self.key_type()
            rc = _lib().bpf_map_get_next_key(self.fd, ctypes.byref(key), ctypes.byref(following))
            key = following

    def items(self) -> Iterator[tuple[Any, Any]]:
        for key in self.keys():
            value = self.lookup(key)
            if value is not None:  # gone between the two calls (LRU)
                yield key, value

    def update_batch(self, keys: Any, values: Any, count: int) -> None:
        """Write `count` entries in one bpf(2) call (arrays of key_type/value_type)."""
        opts = _BatchOpts(ctypes.sizeof(_BatchOpts), 0, 0)
        n = ctypes.c_uint32(count)
        _check(_lib().bpf_map_update_batch(self.fd, keys, values, ctypes.byref(n), ctypes.byref(opts)),
               f"batch update {self.info.name}")

    def items_batch(self, chunk: int = 4096) -> Iterator[tuple[Any, Any]]:
        """Every entry, `chunk` per bpf(2) call (BPF_MAP_LOOKUP_BATCH): a hash
        map of half a million entries in a fraction of a second, where
        items() takes two calls per entry. Keys and values are copies."""
        key_size, value_size = ctypes.sizeof(self.key_type), ctypes.sizeof(self.cell_type)
        for keys, values, n in self.scan_batch(chunk):
            for i in range(n):
                yield (self.key_type.from_buffer_copy(keys, i * key_size),
                       self.cell_type.from_buffer_copy(values, i * value_size))

    def scan_batch(self, chunk: int = 8192) -> Iterator[tuple[Any, Any, int]]:
        """The map in chunks, as BPF_MAP_LOOKUP_BATCH gives them: (keys,
        values, n), arrays of key_type and cell_type of which the first n are
        entries; both are reused by the next chunk. For scans that look at
        raw fields of many entries without making an object of each."""
        keys = (self.key_type * chunk)()
        values = (self.cell_type * chunk)()
        size = max(ctypes.sizeof(self.key_type), 8)  # the batch token: a key, or the kernel's bucket index
        tokens = [ctypes.create_string_buffer(size), ctypes.create_string_buffer(size)]
        opts = _BatchOpts(ctypes.sizeof(_BatchOpts), 0, 0)
        first = True
        while True:
            n = ctypes.c_uint32(chunk)
            rc = _lib().bpf_map_lookup_batch(self.fd, None if first else tokens[0], tokens[1], keys, values,
                                             ctypes.byref(n), ctypes.byref(opts))
            code = 0 if rc >= 0 else (-rc if rc != -1 else ctypes.get_errno())
            if code not in (0, errno.ENOENT):
                _check(-code, f"batch lookup in {self.info.name}")
            if n.value:
                yield keys, values, n.value
            if code == errno.ENOENT:  # no more entries
                return
            first = False
            tokens.reverse()

    def delete_batch(self, keys: Any, count: int) -> int:
        """Delete `count` keys (an array of key_type) in as few bpf(2) calls as
        possible; keys already gone (an LRU may evict) are skipped. Returns
        how many were deleted."""
        opts = _BatchOpts(ctypes.sizeof(_BatchOpts), 0, 0)
        size = ctypes.sizeof(self.key_type)
        deleted = at = 0
        while at < count:
            n = ctypes.c_uint32(count - at)
            rc = _lib().bpf_map_delete_batch(self.fd, ctypes.byref(keys, at * size), ctypes.byref(n),
                                             ctypes.byref(opts))
            deleted += n.value
            if rc >= 0:
                break
            code = -rc if rc != -1 else ctypes.get_errno()
            if code != errno.ENOENT:
                _check(-code, f"batch delete from {self.info.name}")
            at += n.value + 1  # the kernel stopped at a missing key: go on after it
        return deleted


class _BatchOpts(ctypes.Structure):  # struct bpf_map_batch_opts
    _fields_ = [("sz", ctypes.c_size_t), ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


# --- BPF_PROG_TEST_RUN -----------------------------------------------------------


class _TestRunOpts(ctypes.Structure):  # struct bpf_test_run_opts (libbpf 1.1)
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


class XdpMd(ctypes.Structure):  # struct xdp_md, the context of an XDP test run
    _fields_ = [
        ("data", ctypes.c_uint32),
        ("data_end", ctypes.c_uint32),
        ("data_meta", ctypes.c_uint32),
        ("ingress_ifindex", ctypes.c_uint32),
        ("rx_queue_index", ctypes.c_uint32),
        ("egress_ifindex", ctypes.c_uint32),
    ]


@dataclass(frozen=True)
class RunResult:
    retval: int  # the XDP action
    data: bytes  # the frame as the program left it
    duration_ns: int  # mean per run


def prog_test_run(prog_fd: int, frame: bytes, *, ingress_ifindex: int = 0, repeat: int = 1) -> RunResult:
    """Run an XDP program on `frame` in the kernel (BPF_PROG_TEST_RUN).

    With ingress_ifindex set, the run happens "on" that interface of the
    calling thread's network namespace (bpf_fib_lookup resolves there).
    """
    data_in = ctypes.create_string_buffer(frame, len(frame))
    data_out = ctypes.create_string_buffer(len(frame) + 256)
    ctx = XdpMd(0, len(frame), 0, ingress_ifindex, 0, 0)
    opts = _TestRunOpts()
    opts.sz = ctypes.sizeof(opts)
    opts.data_in = ctypes.cast(data_in, ctypes.c_void_p)
    opts.data_size_in = len(frame)
    opts.data_out = ctypes.cast(data_out, ctypes.c_void_p)
    opts.data_size_out = ctypes.sizeof(data_out)
    if ingress_ifindex:
        opts.ctx_in = ctypes.cast(ctypes.pointer(ctx), ctypes.c_void_p)
        opts.ctx_size_in = ctypes.sizeof(ctx)
    opts.repeat = repeat
    _check(_lib().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts)), "BPF_PROG_TEST_RUN")
    return RunResult(opts.retval, data_out.raw[: opts.data_size_out], opts.duration)
