"""Site B's replica plugin in a real nbdkit (its Python plugin), driven over NBD by libnbd on
loopback: epochs staged then committed, a connection lost mid-epoch discards what it staged,
a bad commit is refused, the replica's content is read back with nbdcopy."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from loopback_nbdkit import free_port, require_libnbd
from peer_binary import require_binary

import netsvc.replication
from netsvc.replication.shipper import NbdSink, Shipper
from netsvc.replication.tracking import TrackingBackend
from netsvc.replication.wire import OP_BEGIN, OP_COMMIT, Command

SIZE = 1 << 20
BS = 4096
PLUGIN = Path(netsvc.replication.__file__).with_name("nbdkit_replica.py")


class MemDisk:
    def __init__(self, size: int) -> None:
        self.size = size
        self.data = bytearray(size)

    def pread(self, count: int, offset: int) -> bytes:
        return bytes(self.data[offset:offset + count])

    def pwrite(self, buf: bytes, offset: int) -> None:
        self.data[offset:offset + len(buf)] = buf

    def flush(self) -> None:
        pass


@pytest.fixture
def site_b(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    nbdkit = require_binary("nbdkit", "/usr/sbin/nbdkit", "nbdkit")
    require_libnbd()
    d = tmp_path / "replicas"
    d.mkdir()
    port = free_port()
    log = open(tmp_path / "nbdkit.log", "wb")  # noqa: SIM115 - closed below
    p = subprocess.Popen([nbdkit, "-f", "-v", "--exit-with-parent", "-i", "127.0.0.1", "-p",
                          str(port), "python", str(PLUGIN), f"dir={d}", f"disk=vm1:{SIZE}",
                          f"disk=vm2:{4 * SIZE}"],
                         stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if p.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((tmp_path / "nbdkit.log").read_text()[-2000:]) from None
                time.sleep(0.05)
        yield port, d
    finally:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGTERM)
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        log.close()


def read_replica(port: int) -> bytes:
    """The replica's content through the plain export, with nbdcopy (a standard client)."""
    nbdcopy = require_binary("nbdcopy", "/usr/bin/nbdcopy", "libnbd-bin")
    r = subprocess.run([nbdcopy, f"nbd://127.0.0.1:{port}/vm1", "-"], capture_output=True,
                       timeout=30, check=True)
    return r.stdout


def test_epochs_through_nbdkit_and_a_cut_connection(site_b: tuple[int, Path]) -> None:
    port, d = site_b
    disk = MemDisk(SIZE)
    tracked = TrackingBackend(disk, block_size=BS)
    sink = NbdSink("127.0.0.1", port, "vm1")
    shipper = Shipper("vm1", tracked, sink, max_extent_blocks=8)
    disk.data[:] = os.urandom(SIZE)
    r = shipper.ship_next(full=True)
    assert r.ok, r.error
    assert sink.status().applied == 0
    assert read_replica(port) == bytes(disk.data)
    epoch0 = bytes(disk.data)

    for b in range(0, 200, 3):
        tracked.pwrite(bytes([b % 251 + 1]) * BS, b * BS)

    class Cut:
        """Drops the NBD connection (no COMMIT) after five data writes: a flapping link."""

        def __init__(self) -> None:
            self.n = 0

        def write(self, data: bytes, offset: int) -> None:
            self.n += 1
            if self.n > 5:
                sink.close()
                raise ConnectionError("link flapped")
            NbdSink.write(sink, data, offset)

    cut = Cut()
    sink.write = cut.write  # type: ignore[method-assign]
    r = shipper.ship_next()
    assert not r.ok and "flapped" in r.error
    # a new connection sees the replica at epoch 0, whole, and nothing staged is left
    deadline = time.monotonic() + 5
    while list(d.glob("vm1.stage-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not list(d.glob("vm1.stage-*"))
    probe = NbdSink("127.0.0.1", port, "vm1")
    assert probe.status().applied == 0
    probe.close()
    assert read_replica(port) == epoch0

    del sink.write  # the link is back
    r = shipper.ship_next()
    assert r.ok and r.epoch == 2, r.error
    st = sink.status()
    assert st.applied == 2 and st.staging == -1 and st.size == SIZE
    assert read_replica(port) == bytes(disk.data)

    # a COMMIT whose digest does not match what was staged is refused, nothing applied
    epoch2 = bytes(disk.data)
    tracked.pwrite(b"\xee" * BS, 0)
    sealed = tracked.seal()
    bad = NbdSink("127.0.0.1", port, "vm1")
    bad.control(Command(OP_BEGIN, sealed.epoch))
    bad.write(b"\xee" * BS, 0)
    with pytest.raises(ConnectionError):
        bad.control(Command(OP_COMMIT, sealed.epoch, 1, BS, bytes(32)))
    bad.close()
    assert sink.status().applied == 2
    assert read_replica(port) == epoch2
    sink.close()


def test_a_late_watchdog_never_resets_a_later_connection() -> None:
    """The watchdog set for one connection fires after the sink moved on to the next: it
    leaves that one alone (it used to act on whatever descriptor the sink held then); set
    for the current one, it resets it (the peer sees a reset, not an orderly end)."""
    import socket

    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        cli = socket.create_connection(srv.getsockname())
        peer, _ = srv.accept()
        sink = NbdSink("127.0.0.1", 1, "vm1")
        sink._fd, sink._gen = os.dup(cli.fileno()), 2  # the sink's second connection
        try:
            sink._kill(1)  # the first connection's watchdog, late
            cli.sendall(b"still here")
            peer.settimeout(5.0)
            assert peer.recv(100) == b"still here"
            sink._kill(2)
            with pytest.raises(ConnectionResetError):
                peer.recv(100)
        finally:
            sink.close()
            cli.close()
            peer.close()
