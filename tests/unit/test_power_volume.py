"""A VM disk's two copies against real nbdkit on loopback: the copy with checksums, dirty
tracking, drain-then-switch under load, the resync of only the changed blocks, and a second
resource that fails mid-copy."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from loopback_nbdkit import nbdkit_array

from netsvc.power.copier import CopyError, Resource, coalesce, copy_ranges
from netsvc.power.volcore import Copy, VolumeCore, VolumeError
from netsvc.power.volume import MoveError, PowerVolume
from netsvc.storage.multipath import PathId
from netsvc.storage.nbdpaths import Datastore, StorageIoError

MiB = 1024 * 1024
BLOCK = 65536


@contextmanager
def two_copies(tmp: Path, size: int = 8 * MiB) -> Iterator[tuple[PowerVolume, list[object]]]:
    (tmp / "a").mkdir()
    (tmp / "b").mkdir()
    with ExitStack() as st:
        first = st.enter_context(nbdkit_array(tmp / "a", {"d1": size}, ports=1))
        second = st.enter_context(nbdkit_array(tmp / "b", {"d1": size}, ports=1))
        # some data on the first copy before anything moves
        with open(first.directory / "d1", "r+b") as f:
            for i in range(0, size, MiB):
                f.seek(i)
                f.write(hashlib.sha256(str(i).encode()).digest() * 32)
        arrays = [first, second]
        res = [Resource(n, "d1", (PathId("lo", "stor-a", a.port(0)),))
               for n, a in zip(("first", "second"), arrays, strict=True)]
        dss = [Datastore(f"d1-{n}", "d1", list(r.paths), check_every=0.2)
               for n, r in zip(("first", "second"), res, strict=True)]
        for d in dss:
            d.open()
            st.callback(d.close)
        yield PowerVolume("d1", dss[0], dss[1], res[0], res[1], size=size,
                          block=BLOCK), arrays  # type: ignore[list-item]


def writer(vol: PowerVolume, stop: threading.Event, acked: dict[int, bytes],
           errors: list[str], first: int, step: int, nblocks: int) -> None:
    i = 0
    while not stop.is_set():
        blk = first + (i * step) % nblocks
        data = hashlib.sha256(f"{blk}-{i}".encode()).digest() * (4096 // 32)
        try:
            vol.pwrite(data, blk * 4096)
            acked[blk] = data
        except StorageIoError as exc:
            errors.append(str(exc))
        i += 1


def test_core_rules() -> None:
    c = VolumeCore(10 * BLOCK, BLOCK)
    c.track()
    assert c.submit(1, range(2, 4)) is not None
    c.begin_switch()
    assert c.submit(2, None) is None  # waits for the switch
    assert not c.drained
    with pytest.raises(VolumeError):
        c.finish_switch()
    c.done(1, True)
    assert c.drained and c.take_dirty() == [2, 3]
    [go] = c.finish_switch()
    assert (go.rid, go.copy, c.where) == (2, Copy.SECOND, Copy.SECOND)
    c.done(2, True)
    with pytest.raises(VolumeError, match="power of two"):
        VolumeCore(100, 3000)


def test_a_failed_write_is_not_marked_and_a_late_write_is_in_the_next_set() -> None:
    c = VolumeCore(10 * BLOCK, BLOCK)
    c.track()
    c.submit(1, range(1, 2))
    c.submit(2, range(5, 6))
    c.done(1, False)
    assert c.take_dirty() == []
    c.done(2, True)  # completed after the take: in the next set
    assert c.take_dirty() == [5]


def test_coalesce_clips_to_size() -> None:
    assert coalesce([0, 1, 3, 9], 100, 950) == [(0, 200), (300, 100), (900, 50)]


def test_move_out_and_back_under_load_loses_nothing(tmp_path: Path) -> None:
    size = 8 * MiB
    with two_copies(tmp_path, size) as (vol, arrays):
        original = (arrays[0].directory / "d1").read_bytes()  # type: ignore[attr-defined]
        stop = threading.Event()
        acked: list[dict[int, bytes]] = [{}, {}]
        errors: list[str] = []
        nblocks = size // 4096
        ts = [threading.Thread(target=writer, args=(vol, stop, acked[i], errors, i, 2,
                                                    nblocks // 2)) for i in range(2)]
        for t in ts:
            t.start()
        try:
            out = vol.move(Copy.SECOND)
            assert vol.where is Copy.SECOND and out.full and out.verified
            assert out.bytes_copied >= size
        finally:
            stop.set()
            for t in ts:
                t.join()
        assert errors == []
        # while "off": write aligned blocks only to the second copy
        off_blocks = [3, 17, 40, 41, 100]
        for b in off_blocks:
            vol.pwrite(bytes([b % 251 + 1]) * BLOCK, b * BLOCK)
        dirty = vol.dirty_blocks()  # the writers' last writes after the switch, and ours
        assert set(off_blocks) <= set(dirty) and len(dirty) < size // BLOCK
        back = vol.move(Copy.FIRST)
        assert vol.where is Copy.FIRST and not back.full
        assert back.bytes_copied == len(dirty) * BLOCK  # only the changed blocks
        for a in acked:
            for blk, data in a.items():
                if blk * 4096 // BLOCK not in off_blocks:
                    assert vol.pread(4096, blk * 4096) == data
        for b in off_blocks:
            assert vol.pread(BLOCK, b * BLOCK) == bytes([b % 251 + 1]) * BLOCK
        # both copies equal now, and the first holds what was written everywhere
        a = (arrays[0].directory / "d1").read_bytes()  # type: ignore[attr-defined]
        b = (arrays[1].directory / "d1").read_bytes()  # type: ignore[attr-defined]
        assert hashlib.sha256(a).digest() == hashlib.sha256(b).digest()
        assert a != original
        assert vol.stats["io_errors"] == 0


def test_second_resource_failing_mid_copy_aborts_and_data_stays_on_first(
        tmp_path: Path) -> None:
    with two_copies(tmp_path) as (vol, arrays):
        vol.pwrite(b"\x5a" * 4096, 0)
        arrays[1].kill(0)  # type: ignore[attr-defined]
        with pytest.raises(MoveError) as exc:
            vol.move(Copy.SECOND)
        assert exc.value.step == "copy" and "dst failed" in str(exc.value)
        assert vol.where is Copy.FIRST
        assert vol.pread(4096, 0) == b"\x5a" * 4096  # still readable, from the first copy
        vol.pwrite(b"\x6b" * 4096, 4096)
        assert vol.pread(4096, 4096) == b"\x6b" * 4096


def test_copy_detects_a_missing_source(tmp_path: Path) -> None:
    with two_copies(tmp_path) as (vol, arrays):
        arrays[0].kill(0)  # type: ignore[attr-defined]
        with pytest.raises(CopyError) as exc:
            copy_ranges(vol.res[Copy.FIRST], vol.res[Copy.SECOND], [(0, MiB)])
        assert exc.value.side == "src"


@pytest.mark.parametrize("checksum", ["crc32", "sha256"])
def test_copy_ranges_copies_exactly_the_ranges(tmp_path: Path, checksum: str) -> None:
    with two_copies(tmp_path) as (vol, arrays):
        out = copy_ranges(vol.res[Copy.FIRST], vol.res[Copy.SECOND],
                          [(0, 3 * MiB), (5 * MiB, 100_000)], checksum=checksum, chunk=MiB)
        assert (out.bytes, out.verified, out.checksum) == (3 * MiB + 100_000, True, checksum)
        a = (arrays[0].directory / "d1").read_bytes()  # type: ignore[attr-defined]
        b = (arrays[1].directory / "d1").read_bytes()  # type: ignore[attr-defined]
        assert a[:3 * MiB] == b[:3 * MiB] and a[5 * MiB:5 * MiB + 100_000] == \
            b[5 * MiB:5 * MiB + 100_000]
        assert b[3 * MiB:5 * MiB] == bytes(2 * MiB)  # outside the ranges: untouched
    with pytest.raises(ValueError, match="checksum"):
        copy_ranges(vol.res[Copy.FIRST], vol.res[Copy.SECOND], [], checksum="md5")


def test_sparse_copy_zeroes_holes_and_overwrites_stale_bytes(tmp_path: Path) -> None:
    with two_copies(tmp_path) as (vol, arrays):
        # stale bytes on the second copy where the first has a hole
        with open(arrays[1].directory / "d1", "r+b") as f:  # type: ignore[attr-defined]
            f.seek(2 * MiB + 8192)
            f.write(b"stale" * 1000)
        out = copy_ranges(vol.res[Copy.FIRST], vol.res[Copy.SECOND], [(0, 8 * MiB)])
        assert out.bytes == 8 * MiB and 0 < out.zero_bytes < 8 * MiB
        a = (arrays[0].directory / "d1").read_bytes()  # type: ignore[attr-defined]
        b = (arrays[1].directory / "d1").read_bytes()  # type: ignore[attr-defined]
        assert a == b
        dense = copy_ranges(vol.res[Copy.FIRST], vol.res[Copy.SECOND], [(0, MiB)],
                            sparse=False)
        assert dense.zero_bytes == 0


@contextmanager
def lossy_nbdkit(size: int) -> Iterator[Resource]:
    """A real nbdkit ``null`` export: it acknowledges every write and reads back zeroes (a
    second copy that silently loses what it is sent)."""
    import subprocess

    from loopback_nbdkit import free_port, wait_listening

    port = free_port()
    p = subprocess.Popen(["nbdkit", "-f", "--exit-with-parent", "-i", "127.0.0.1", "-p",
                          str(port), "null", f"size={size}"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port)
        yield Resource("lossy", "", (PathId("lo", "stor-a", f"127.0.0.1:{port}"),))
    finally:
        p.kill()
        p.wait()


@pytest.mark.parametrize("checksum", ["exact", "crc32", "sha256"])
def test_verified_copy_detects_a_second_copy_that_loses_writes(tmp_path: Path,
                                                               checksum: str) -> None:
    """Fails if the read-back is removed: the null export acknowledges every write. (A new
    null server for the second copy: nbdkit 1.32 can die of an assertion, ``raw_send_socket:
    sock >= 0``, when a client drops its connections with replies in flight, as the failed
    copy does.)"""
    with two_copies(tmp_path) as (vol, _):
        with lossy_nbdkit(8 * MiB) as lossy, pytest.raises(CopyError) as exc:
            copy_ranges(vol.res[Copy.FIRST], lossy, [(0, 8 * MiB)], checksum=checksum,
                        sparse=False)
        assert exc.value.side == "dst" and "mismatch" in str(exc)
        # without the check the same copy "succeeds": the test above is what catches it
        with lossy_nbdkit(8 * MiB) as lossy:
            out = copy_ranges(vol.res[Copy.FIRST], lossy, [(0, 8 * MiB)], verify=False,
                              sparse=False)
        assert out.bytes == 8 * MiB and not out.verified


def test_a_failed_copy_drops_its_connections_with_nothing_in_flight(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed copy lets its requests in flight finish before it closes its connections
    (nbdkit 1.32 can die of an assertion when a client drops a connection with replies in
    flight); the first failure is still what it raises."""
    import netsvc.power.copier as copier

    at_close: list[int] = []
    real_close = copier.close

    def counting_close(conn: object) -> None:
        h = getattr(conn, "handle", None)
        if h is not None:
            at_close.append(h.aio_in_flight())
        real_close(conn)  # type: ignore[arg-type]

    monkeypatch.setattr(copier, "close", counting_close)
    with two_copies(tmp_path) as (vol, _), lossy_nbdkit(8 * MiB) as lossy, \
            pytest.raises(CopyError, match="mismatch"):
        copy_ranges(vol.res[Copy.FIRST], lossy, [(0, 8 * MiB)], sparse=False)
    assert at_close and set(at_close) == {0}, at_close


def test_a_copier_bug_is_a_copy_error_not_a_finished_copy(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """An unexpected exception inside the copy's event loop fails the copy (before, the
    worker thread died and the copy returned 0 bytes as if done)."""
    import netsvc.power.copier as copier

    def broken(data: object, checksum: str) -> bytes:
        raise RuntimeError("boom")

    monkeypatch.setattr(copier, "digest", broken)
    with two_copies(tmp_path) as (vol, _), pytest.raises(CopyError, match="boom"):
        copy_ranges(vol.res[Copy.FIRST], vol.res[Copy.SECOND], [(0, MiB)], sparse=False,
                    checksum="crc32")
