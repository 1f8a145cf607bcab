"""The loader makes the maps itself and points bcc's program at them: the
first load creates and pins them, every later one opens them by path."""

from __future__ import annotations

import ctypes
import os
import struct
from dataclasses import replace

import pytest

from lb.dataplane import libbpf
from lb.dataplane.loader import (
    BPF_LD_IMM64,
    BPF_PSEUDO_MAP_FD,
    PROGRAM_PIN,
    LoaderError,
    Program,
    pin_dir,
    purge_pins,
    remap_maps,
)
from lb.dataplane.structs import Limits, MapName, map_specs
from tests.names import name

LIMITS = Limits(ring_size=13, max_vips=4, max_targets=8, conntrack_size=128)
NAME = name("loader")


def insn(code: int, src_reg: int = 0, imm: int = 0) -> bytes:
    return struct.pack("=BBhi", code, src_reg << 4 | 1, 0, imm)  # dst r1


def test_remap_points_map_references_at_the_given_fds() -> None:
    code = bytearray(
        insn(BPF_LD_IMM64, BPF_PSEUDO_MAP_FD, 7) + insn(0)  # r1 = map fd 7
        + insn(0xB7, 0, 7)  # r1 = 7: a plain immediate, untouched
        + insn(BPF_LD_IMM64, 0, 7) + insn(0)  # r1 = 7 (64-bit constant): untouched
        + insn(BPF_LD_IMM64, BPF_PSEUDO_MAP_FD, 9) + insn(0)
    )
    original = bytes(code)
    assert remap_maps(code, {7: 70, 9: 90}) == 2
    assert struct.unpack_from("=i", code, 4)[0] == 70
    assert struct.unpack_from("=i", code, 5 * 8 + 4)[0] == 90
    assert code[8:5 * 8] == original[8:5 * 8]


def test_remap_refuses_a_map_it_was_not_given() -> None:
    with pytest.raises(LoaderError, match="map fd 8"):
        remap_maps(bytearray(insn(BPF_LD_IMM64, BPF_PSEUDO_MAP_FD, 8) + insn(0)), {7: 70})


def pinned_maps() -> dict[MapName, libbpf.MapInfo]:
    infos = {}
    for map_name in MapName:
        fd = libbpf.obj_get(os.path.join(pin_dir(NAME), map_name.value))
        try:
            infos[map_name] = libbpf.map_info(fd)
        finally:
            os.close(fd)
    return infos


def pinned_program_id() -> int:
    fd = libbpf.obj_get(os.path.join(pin_dir(NAME), PROGRAM_PIN))
    try:
        return libbpf.prog_info(fd).prog_id
    finally:
        os.close(fd)


@pytest.mark.root
def test_first_load_creates_the_maps_and_later_loads_adopt_them() -> None:
    purge_pins(NAME)
    try:
        with Program.load(NAME, LIMITS) as first:
            made = pinned_maps()
            for map_name, spec in map_specs(LIMITS).items():
                info = made[map_name]
                assert (info.map_type, info.max_entries, info.flags, info.name) == \
                       (spec.map_type, spec.max_entries, spec.flags, map_name.value)
            first_id = first.prog_id
            assert pinned_program_id() == first_id
        with Program.load(NAME, LIMITS) as second:
            assert {n: i.map_id for n, i in pinned_maps().items()} == {n: i.map_id for n, i in made.items()}
            assert pinned_program_id() == second.prog_id != first_id
        with pytest.raises(LoaderError, match="other limits"):
            Program.load(NAME, Limits(ring_size=17, max_vips=4, max_targets=8, conntrack_size=128))
        with pytest.raises(LoaderError, match="other limits") as refused:  # a config key changed
            Program.load(NAME, replace(LIMITS, conntrack_size=256, half_open_size=LIMITS.half_open_size * 2))
        message = str(refused.value)
        assert "conntrack: pinned as lru_hash key 16 B value 40 B max 128" in message
        assert "max 256 flags 0x0 (its size follows the config's conntrack_size, changed since it was pinned)" in message
        assert "(its size follows the config's half_open_size, changed since it was pinned)" in message
        assert "rings" not in message and "`lb down`" in message
        assert {n: i.map_id for n, i in pinned_maps().items()} == {n: i.map_id for n, i in made.items()}
    finally:
        purge_pins(NAME)


@pytest.mark.root
def test_a_pinned_map_with_other_flags_is_refused() -> None:
    """Same type, sizes and entries, other flags (a per-CPU LRU list where the
    build wants one list, or the reverse): refused with a message naming the map."""
    from lb.dataplane.structs import BPF_F_NO_COMMON_LRU

    purge_pins(NAME)
    try:
        os.makedirs(pin_dir(NAME), exist_ok=True)
        spec = map_specs(LIMITS)[MapName.CONNTRACK]
        fd = libbpf.map_create(spec.map_type, spec.name.value, ctypes.sizeof(spec.key), ctypes.sizeof(spec.value),
                               spec.max_entries, spec.flags ^ BPF_F_NO_COMMON_LRU)
        try:
            libbpf.obj_pin(fd, os.path.join(pin_dir(NAME), MapName.CONNTRACK.value))
        finally:
            os.close(fd)
        with pytest.raises(LoaderError, match=r"conntrack: pinned as lru_hash .* flags 0x[02], this build needs .*"
                                              r"flags 0x[02]\n.*`lb down`"):
            Program.load(NAME, LIMITS)
    finally:
        purge_pins(NAME)
