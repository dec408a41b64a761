"""A lab guest's disk (``netsvc.lab.disklog``) and the guest on it: the codec's prefix rule,
and the real path: guest -> the host's local endpoint (``netsvc.storage``) -> libnbd paths ->
a real nbdkit. A restarted guest replays its disk; a reopen through another endpoint (a
migration's target host) keeps the disk and refuses another one."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from loopback_nbdkit import free_port, nbdkit_array

from netsvc.lab.disklog import (
    SECTOR,
    DiskError,
    DiskLog,
    encode_record,
    label,
    parse_region,
    parse_uri,
    read_ahead,
    read_label,
    scan,
)

MiB = 1024 * 1024
LOG = b"L" * 16


def _region(records: list[bytes]) -> bytearray:
    buf = bytearray(64 * SECTOR)
    buf[0:SECTOR] = label(LOG)
    at = SECTOR
    for seq, payload in enumerate(records, 1):
        rec = encode_record(LOG, seq, payload)
        buf[at:at + len(rec)] = rec
        at += len(rec)
    return buf


def _read(buf: bytearray):  # type: ignore[no-untyped-def]
    return lambda count, at: bytes(buf[at:at + count])


def test_scan_returns_exactly_what_was_appended() -> None:
    payloads = [b"SET a 1", b"SET b " + b"x" * 900, b"SET c 3"]
    buf = _region(payloads)
    assert read_label(bytes(buf[:SECTOR])) == LOG
    got = scan(_read(buf), len(buf), LOG)
    assert got.records == payloads
    assert got.end == SECTOR + SECTOR + 2 * SECTOR + SECTOR


def test_scan_stops_at_a_torn_record_and_at_another_logs_record() -> None:
    buf = _region([b"SET a 1", b"SET b 2", b"SET c 3"])
    torn = bytearray(buf)
    torn[2 * SECTOR + 40] ^= 0xFF  # record 2's payload: its CRC fails
    assert scan(_read(torn), len(torn), LOG).records == [b"SET a 1"]
    # a record of another log (an older disk's leftovers) is not this log's
    other = bytearray(buf)
    other[3 * SECTOR:4 * SECTOR] = encode_record(b"O" * 16, 3, b"SET c 3")
    assert scan(_read(other), len(other), LOG).records == [b"SET a 1", b"SET b 2"]
    # a seq out of order ends the log too
    skip = bytearray(buf)
    skip[2 * SECTOR:3 * SECTOR] = encode_record(LOG, 5, b"SET b 2")
    assert scan(_read(skip), len(skip), LOG).records == [b"SET a 1"]


def test_a_replay_read_ahead_gives_the_same_records_in_few_reads() -> None:
    payloads = [f"SET k{n} ".encode() + b"x" * (n * 37 % 900) for n in range(40)]
    buf = _region(payloads) + bytearray(64 * SECTOR)
    calls: list[tuple[int, int]] = []

    def counted(count: int, at: int) -> bytes:
        calls.append((count, at))
        return bytes(buf[at:at + count])

    direct = scan(_read(buf), len(buf), LOG)
    ahead = scan(read_ahead(counted, len(buf), chunk=8 * SECTOR), len(buf), LOG)
    assert ahead == direct and ahead.records == payloads
    assert len(calls) < len(payloads)  # not one or two reads per record
    assert all(at + count <= len(buf) for count, at in calls)  # never past the region


def test_bad_uris_and_regions_are_refused_with_the_reason() -> None:
    assert parse_uri("nbd+unix:///ds1?socket=/run/x.sock") == ("ds1", "/run/x.sock")
    for bad in ("nbd://host/ds1", "nbd+unix:///ds1", "nbd+unix:///?socket=/x"):
        with pytest.raises(DiskError, match="bad disk URI"):
            parse_uri(bad)
    assert parse_region("1048576:65536") == (MiB, 65536)
    for bad in ("1:65536", "0:100", "x:y", "-512:4096"):
        with pytest.raises(DiskError, match="bad disk region"):
            parse_region(bad)


@contextlib.contextmanager
def _endpoints(tmp: Path, n: int = 2) -> Iterator[list[str]]:
    """``n`` hosts' local endpoints (each its own path manager) onto one real nbdkit array
    with ``ds1``: their URIs for ``ds1``."""
    from netsvc.storage.endpoint import Endpoint
    from netsvc.storage.multipath import PathId
    from netsvc.storage.nbdpaths import Datastore

    with nbdkit_array(tmp, {"ds1": 4 * MiB, "ds2": 4 * MiB}) as arr:
        opened: list[tuple[Datastore, Datastore, Endpoint]] = []
        uris = []
        try:
            for i in range(n):
                dss = [Datastore(name, name, [PathId("lo", "stor-a", arr.port(0)),
                                              PathId("lo", "stor-b", arr.port(1))],
                                 check_every=5.0) for name in ("ds1", "ds2")]
                for ds in dss:
                    ds.open()
                sock = str(tmp / f"h{i + 1}.sock")
                ep = Endpoint(sock, {"ds1": dss[0], "ds2": dss[1]})
                ep.start()
                opened.append((dss[0], dss[1], ep))
                uris.append(f"nbd+unix:///ds1?socket={sock}")
            yield uris
        finally:
            for a, b, ep in opened:
                ep.close()
                a.close()
                b.close()


def test_the_log_survives_a_reopen_elsewhere_and_a_fresh_open(tmp_path: Path) -> None:
    with _endpoints(tmp_path) as (h1, h2):
        log = DiskLog(h1, MiB, 256 * 1024)
        assert log.replayed == []
        for i in range(10):
            log.append(f"SET k{i} v{i}".encode())
        log.reopen(h2)  # the migration's target host opens the same disk
        for i in range(10, 20):
            log.append(f"SET k{i} v{i}".encode())
        assert log.info()["uri"] == h2
        log.close()
        again = DiskLog(h2, MiB, 256 * 1024)  # a fresh boot reads all 20, through h2
        assert again.replayed == [f"SET k{i} v{i}".encode() for i in range(20)]
        assert again.log_id == log.log_id
        # another disk (ds2 has no label of this log): refused, the old connection stays
        with pytest.raises(DiskError, match="not this disk"):
            again.reopen(h1.replace("ds1", "ds2"))
        # a region whose sector 0 holds something else (here: inside the log) is refused,
        # never labelled over
        with pytest.raises(DiskError, match="neither this log's label nor blank"):
            DiskLog(h1, MiB + SECTOR, 64 * 1024)
        again.append(b"SET after refused")
        again.close()
        assert DiskLog(h1, MiB, 256 * 1024).replayed[-1] == b"SET after refused"


def _guest(tmp: Path, uri: str, port: int, name: str = "vm1") -> subprocess.Popen[bytes]:
    ctl = str(tmp / f"{name}.ctl")
    proc = subprocess.Popen(
        [sys.executable, "-m", "netsvc.lab.guest", "--name", name, "--bind", "127.0.0.1",
         "--port", str(port), "--disk", uri, "--disk-region", f"{MiB}:{MiB}", "--control", ctl],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), 0.5) as s:
                s.sendall(b"PING\n")
                if s.recv(100).startswith(b"PONG"):
                    return proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            out = proc.stdout.read() if proc.stdout else b""
            raise AssertionError(f"guest did not start: {out!r}")
        time.sleep(0.05)


def _ask(port: int, lines: list[str]) -> list[str]:
    with socket.create_connection(("127.0.0.1", port), 5) as s:
        f = s.makefile("rwb")
        out = []
        for line in lines:
            f.write(line.encode() + b"\n")
            f.flush()
            out.append(f.readline().decode().strip())
        return out


def _control(tmp: Path, line: str, name: str = "vm1") -> str:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(tmp / f"{name}.ctl"))
        s.sendall(line.encode() + b"\n")
        return s.makefile("rb").readline().decode().strip()


def test_a_guest_on_its_disk_moves_endpoints_and_replays_after_a_kill(tmp_path: Path) -> None:
    with _endpoints(tmp_path) as (h1, h2):
        port = free_port()
        g = _guest(tmp_path, h1, port)
        try:
            acks = _ask(port, [f"SET k{i} v{i}" for i in range(50)])
            assert acks == [f"OK {i + 1}" for i in range(50)]
            reply = _control(tmp_path, f"DISK {h2}")
            assert reply.startswith("OK ") and h2 in reply
            assert _control(tmp_path, "DISK nbd+unix:///nope?socket=/nonexistent").startswith(
                "ERR cannot open")
            acks = _ask(port, [f"SET k{i} v{i}" for i in range(50, 80)])
            assert acks == [f"OK {i + 1}" for i in range(50, 80)]
        finally:
            os.kill(g.pid, signal.SIGKILL)  # a crash: nothing is flushed on the way out
            g.wait()
        g = _guest(tmp_path, h1, port)  # a fresh boot through the first host's endpoint
        try:
            got = _ask(port, ["PING", *(f"GET k{i}" for i in range(80))])
            assert got[0] == "PONG vm1 80"  # the write counter is back too
            assert got[1:] == [f"VALUE v{i}" for i in range(80)]
        finally:
            g.terminate()
            g.wait(timeout=10)


def test_a_full_disk_refuses_the_write_and_changes_nothing(tmp_path: Path) -> None:
    with _endpoints(tmp_path, n=1) as (h1,):
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "netsvc.lab.guest", "--name", "vm2", "--bind", "127.0.0.1",
             "--port", str(port), "--disk", h1, "--disk-region", f"0:{4 * SECTOR}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    got = _ask(port, ["SET a 1", "SET b 2", "SET c 3", "SET d 4", "GET d",
                                      "PING"])
                    break
                except OSError:
                    assert time.monotonic() < deadline and proc.poll() is None
                    time.sleep(0.05)
            # 3 sectors of records fit (one each); the 4th is refused and not applied
            assert got == ["OK 1", "OK 2", "OK 3", "ERR disk full", "MISSING", "PONG vm2 3"]
        finally:
            proc.terminate()
            proc.wait(timeout=10)


class _FailingDisk:
    """A disk whose writes fail (the array gone): what ``OnDisk`` must not acknowledge."""

    def __init__(self) -> None:
        self.replayed: list[bytes] = []

    def fits(self, n: int) -> bool:
        return True

    def append(self, payload: bytes) -> None:
        raise DiskError("write of 512 bytes at 512: the connection was closed")


def test_a_disk_error_stops_the_guest_and_acknowledges_nothing() -> None:
    from netsvc.lab.guest import DiskStopped, GuestStore, OnDisk

    store = OnDisk(GuestStore("vm1"), _FailingDisk())
    with pytest.raises(DiskStopped, match="connection was closed"):
        store.handle_many([b"SET a 1", b"SET b 2"])
