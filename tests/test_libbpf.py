"""The ctypes binding's batch operations, on a map of its own (no program)."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator

import pytest

from lb.dataplane import libbpf
from lb.dataplane.structs import BPF_MAP_TYPE_LRU_HASH

pytestmark = pytest.mark.root


@pytest.fixture()
def table() -> Iterator[libbpf.BpfMap]:
    fd = libbpf.map_create(BPF_MAP_TYPE_LRU_HASH, "lb_test_batch", 4, 8, 20000)
    bpf_map = libbpf.BpfMap(fd, ctypes.c_uint32, ctypes.c_uint64)
    yield bpf_map
    bpf_map.close()


def test_items_batch_reads_every_entry_across_chunks(table: libbpf.BpfMap) -> None:
    for i in range(10000):
        table.update(ctypes.c_uint32(i), ctypes.c_uint64(i * 3))
    seen = {int(k.value): int(v.value) for k, v in table.items_batch(chunk=777)}
    assert seen == {i: i * 3 for i in range(10000)}


def test_items_batch_of_an_empty_map(table: libbpf.BpfMap) -> None:
    assert list(table.items_batch()) == []


def test_delete_batch_skips_keys_already_gone(table: libbpf.BpfMap) -> None:
    for i in range(100):
        table.update(ctypes.c_uint32(i), ctypes.c_uint64(i))
    keys = (ctypes.c_uint32 * 6)(1, 2, 500, 3, 600, 4)  # 500 and 600 were never there
    assert table.delete_batch(keys, 6) == 4
    assert {int(k.value) for k, _ in table.items_batch()} == set(range(100)) - {1, 2, 3, 4}
