"""The pool's record codecs (netsvc.memory.layout): round trips, torn writes, fuzzing."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netsvc.memory.errors import PoolCorrupt, PoolUsageError
from netsvc.memory.layout import (
    HEADER_SIZE,
    HOST_HALF,
    Access,
    Geometry,
    Header,
    HostRecord,
    PageTable,
    PageTableEntry,
    VmRecord,
    decode_header,
    decode_host,
    decode_lease,
    decode_pt,
    decode_vm,
    encode_half,
    encode_header,
    encode_host,
    encode_lease,
    encode_pt,
    encode_vm,
    pick,
)
from netsvc.memory.lease import Lease

G = Geometry(4096, 1000, 4, 8, 8, 4)


def test_header_round_trip_and_refusals() -> None:
    h = Header(G, b"\x01" * 16, 1234.5)
    raw = encode_header(h)
    assert len(raw) == HEADER_SIZE
    assert decode_header(raw, G.file_size) == h
    with pytest.raises(PoolCorrupt, match="all zero"):
        decode_header(bytes(HEADER_SIZE))
    bad = bytearray(raw)
    bad[20] ^= 1
    with pytest.raises(PoolCorrupt, match="checksum"):
        decode_header(bytes(bad))
    with pytest.raises(PoolCorrupt, match="bad magic"):
        decode_header(b"X" + raw[1:])
    with pytest.raises(PoolCorrupt, match="file is"):
        decode_header(raw, G.file_size - 4096)
    with pytest.raises(PoolCorrupt, match="truncated"):
        decode_header(raw[:10])


def test_geometry_checks() -> None:
    with pytest.raises(PoolUsageError):
        Geometry(1000, 10, 1, 1, 1, 1)
    with pytest.raises(PoolUsageError):
        Geometry(4096, 0, 1, 1, 1, 1)
    with pytest.raises(PoolUsageError):
        Geometry.for_size(4096)
    g = Geometry.for_size(8 << 20)
    assert g.file_size <= 8 << 20 and g.data_offset % g.page_size == 0


def test_records_round_trip() -> None:
    host = HostRecord("h1", {"mem_mib": 2048, "cpus": 4})
    assert decode_host(encode_host(host), "x") == host
    lease = Lease("master", 7, 12.5, 11.0, 10.0)
    assert decode_lease(encode_lease(lease), "x") == lease
    pt = PageTable(
        3, (PageTableEntry(2, Access.RW, 0, 10, 5), PageTableEntry(1, Access.RO, 0, 0, 4))
    )
    assert decode_pt(encode_pt(pt, G), G, "x") == pt
    vm = VmRecord("vm1", 1, ((10, 5), (40, 3)))
    assert decode_vm(encode_vm(vm, G), G, "x") == vm
    with pytest.raises(PoolUsageError):
        encode_host(HostRecord("h1", {"x": "y" * 500}))


def test_impossible_page_table_entries_named() -> None:
    out_of_range = PageTable(1, (PageTableEntry(0, Access.RW, 0, 999, 2),))
    with pytest.raises(PoolCorrupt, match=r"entry 0.*pool pages 999\+2 out of range"):
        decode_pt(encode_pt(out_of_range, G), G, "page table of 'h1'")
    bad_vm = PageTable(1, (PageTableEntry(100, Access.RW, 0, 0, 2),))
    with pytest.raises(PoolCorrupt, match="VM slot 100 out of range"):
        decode_pt(encode_pt(bad_vm, G), G, "pt")
    raw = bytearray(encode_pt(PageTable(1, (PageTableEntry(0, Access.RW, 0, 0, 2),)), G))
    raw[12] = 7  # access byte of entry 0
    with pytest.raises(PoolCorrupt, match="access mode 7"):
        decode_pt(bytes(raw), G, "pt")


def test_vm_record_overlap_and_count_refused() -> None:
    with pytest.raises(PoolCorrupt, match="overlap"):
        decode_vm(encode_vm(VmRecord("vm1", 1, ((10, 5), (12, 3))), G), G, "vm")
    raw = bytearray(encode_vm(VmRecord("vm1", 1, ((10, 5),)), G))
    raw[36] = 9  # n_pages
    with pytest.raises(PoolCorrupt, match="page count"):
        decode_vm(bytes(raw), G, "vm")


def test_pick_newest_valid_half_and_every_torn_prefix() -> None:
    old = encode_half(HOST_HALF, 5, encode_host(HostRecord("h1", {"v": 1})))
    new = encode_half(HOST_HALF, 6, encode_host(HostRecord("h1", {"v": 2})))
    assert pick(old, new, "r")[1] == 6
    assert pick(new, old, "r")[1] == 6
    older = encode_half(HOST_HALF, 4, encode_host(HostRecord("h1", {"v": 0})))
    for cut in range(HOST_HALF + 1):  # the writer died after ``cut`` bytes of gen 6 over gen 4
        torn = new[:cut] + older[cut:]
        _, gen, body = pick(torn, old, "r") if cut % 2 else pick(old, torn, "r")
        want = 6 if torn == new else 5
        assert gen == want
        assert decode_host(body, "r").profile == {"v": want - 4}
    # first write torn over an empty record: still empty
    assert pick(new[:20] + bytes(HOST_HALF - 20), bytes(HOST_HALF), "r") == (-1, 0, b"")
    with pytest.raises(PoolCorrupt, match="both copies fail"):
        pick(b"\x01" * HOST_HALF, b"\x02" * HOST_HALF, "host slot 0")
    with pytest.raises(PoolCorrupt, match="claim generation 5"):
        pick(old, old, "r")


FUZZ = settings(max_examples=200, deadline=None)


@FUZZ
@given(st.binary(max_size=HEADER_SIZE))
def test_fuzz_header(data: bytes) -> None:
    with contextlib.suppress(PoolCorrupt):
        decode_header(data)


@FUZZ
@given(st.binary(max_size=600), st.sampled_from(["host", "lease", "pt", "vm"]))
def test_fuzz_bodies(data: bytes, kind: str) -> None:
    try:
        if kind == "host":
            decode_host(data, "x")
        elif kind == "lease":
            decode_lease(data, "x")
        elif kind == "pt":
            decode_pt(data, G, "x")
        else:
            decode_vm(data, G, "x")
    except PoolCorrupt:
        pass


@FUZZ
@given(st.binary(min_size=64, max_size=64), st.binary(min_size=64, max_size=64))
def test_fuzz_pick(a: bytes, b: bytes) -> None:
    with contextlib.suppress(PoolCorrupt):
        pick(a, b, "x")
