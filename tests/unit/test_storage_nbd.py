"""The libnbd adapter and the local endpoint against a real nbdkit on loopback."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from loopback_nbdkit import nbdkit_array

from netsvc.storage.endpoint import Endpoint
from netsvc.storage.multipath import Moved, PathFailed, PathId, PathState
from netsvc.storage.nbdpaths import Datastore, StorageIoError

MiB = 1024 * 1024


def _paths(arr: object) -> list[PathId]:
    return [PathId("lo", "stor-a", arr.port(0)),  # type: ignore[attr-defined]
            PathId("lo", "stor-b", arr.port(1))]  # type: ignore[attr-defined]


def settle(ds: Datastore) -> None:
    """Wait until the checks due at open are done (the next is ``check_every`` away)."""
    import time

    deadline = time.monotonic() + 5
    while True:
        with ds._lock:
            t = ds.core.next_timer()
        if t is not None and t > time.monotonic() + 1.0:
            return
        assert time.monotonic() < deadline, "the first checks did not finish"
        time.sleep(0.01)


def _writer(ds: Datastore, stop: threading.Event, acked: dict[int, bytes],
            errors: list[str], blocks: int = 256, first: int = 0, step: int = 1) -> None:
    """Write blocks ``first``, ``first + step``, ... (each writer its own blocks, so the last
    acknowledged write of a block is the one on disk, whatever the threads' order)."""
    i = 0
    while not stop.is_set():
        blk = first + (i % (blocks // step)) * step
        data = hashlib.sha256(f"{blk}-{i}".encode()).digest() * 128  # 4 KiB
        try:
            ds.pwrite(data, blk * 4096)
            acked[blk] = data
        except StorageIoError as exc:
            errors.append(str(exc))
        i += 1


def test_drain_under_load_moves_without_error(tmp_path: Path) -> None:
    with nbdkit_array(tmp_path, {"ds1": 4 * MiB}) as arr:
        events: list[object] = []
        ds = Datastore("ds1", "ds1", _paths(arr), check_every=0.2, on_event=events.append)
        ds.open()
        try:
            stop, acked, errors = threading.Event(), {}, []  # type: ignore[var-annotated]
            ts = [threading.Thread(target=_writer, args=(ds, stop, acked, errors),
                                   kwargs={"first": k, "step": 4})
                  for k in range(4)]
            for t in ts:
                t.start()
            threading.Event().wait(0.3)
            ds.hold_switch("stor-a", "maintenance of stor-a")
            assert ds.core.active == _paths(arr)[1].name
            assert ds.core.inflight(_paths(arr)[0].name) == 0
            threading.Event().wait(0.1)
            arr.kill(0)  # the switch really goes down: nothing is on it any more
            threading.Event().wait(0.5)
            stop.set()
            for t in ts:
                t.join()
            assert errors == []
            assert ds.stats["retries"] == 0  # proactive: nothing failed, nothing retried
            assert any(isinstance(e, Moved) and e.kind == "drain" for e in events)
            data = (arr.directory / "ds1").read_bytes()
            for blk, want in acked.items():
                assert data[blk * 4096:(blk + 1) * 4096] == want
        finally:
            ds.close()


def test_cut_link_fails_over_and_retries_once(tmp_path: Path) -> None:
    with nbdkit_array(tmp_path, {"ds1": 4 * MiB}) as arr:
        events: list[object] = []
        ds = Datastore("ds1", "ds1", _paths(arr), check_every=0.1, check_timeout=0.3,
                       io_timeout=1.0, on_event=events.append)
        ds.open()
        try:
            ds.pwrite(b"x" * 4096, 0)
            arr.stop(0)  # a cut: requests on path A hang
            ds.pwrite(b"y" * 4096, 4096)  # hangs, is aborted by the checker, retried on B
            assert ds.core.active == _paths(arr)[1].name
            assert ds.core.state(_paths(arr)[0].name) is PathState.FAILED
            assert any(isinstance(e, PathFailed) for e in events)
            assert ds.pread(4096, 4096) == b"y" * 4096
            arr.cont(0)
        finally:
            ds.close()


def test_server_closing_mid_request_moves_io(tmp_path: Path) -> None:
    with nbdkit_array(tmp_path, {"ds1": 1 * MiB}) as arr:
        ds = Datastore("ds1", "ds1", _paths(arr), check_every=5.0)
        ds.open()
        settle(ds)
        try:
            arr.kill(0)
            ds.pwrite(b"z" * 512, 0)  # path A's connection is closed: retried on B
            assert ds.stats["retries"] == 1 and ds.stats["io_errors"] == 0
            assert ds.core.state(_paths(arr)[0].name) is PathState.FAILED
            assert (arr.directory / "ds1").read_bytes()[:512] == b"z" * 512
        finally:
            ds.close()


def test_both_paths_gone_is_an_error(tmp_path: Path) -> None:
    with nbdkit_array(tmp_path, {"ds1": 1 * MiB}) as arr:
        ds = Datastore("ds1", "ds1", _paths(arr), check_every=5.0, queue_timeout=0.5)
        ds.open()
        try:
            arr.kill(0)
            arr.kill(1)
            with pytest.raises(StorageIoError):
                ds.pwrite(b"z" * 512, 0)
        finally:
            ds.close()


def test_local_endpoint_serves_nbdcopy_and_libnbd(tmp_path: Path) -> None:
    with nbdkit_array(tmp_path, {"ds1": 1 * MiB, "ds2": 1 * MiB}) as arr:
        ds = Datastore("ds1", "ds1", _paths(arr), check_every=5.0)
        ds.open()
        sock = str(tmp_path / "ep.sock")
        ep = Endpoint(sock, {"ds1": ds})
        ep.start()
        try:
            import nbd

            h = nbd.NBD()
            h.set_export_name("ds1")
            h.connect_unix(sock)
            assert h.get_size() == MiB
            h.pwrite(b"q" * 8192, 65536)
            h.flush()
            assert h.pread(8192, 65536) == b"q" * 8192
            with pytest.raises(nbd.Error):
                h.pread(4096, MiB)  # out of bounds: EINVAL, the connection stays
            assert h.pread(4, 65536) == b"qqqq"
            h.shutdown()
            del h
            ds.hold_switch("stor-a", "x")
            if shutil.which("nbdcopy"):
                out = tmp_path / "copy.img"
                subprocess.run(["nbdcopy", f"nbd+unix:///ds1?socket={sock}", str(out)],
                               check=True, timeout=30)
                assert out.read_bytes() == (arr.directory / "ds1").read_bytes()
        finally:
            ep.close()
            ds.close()
        assert not os.path.exists(sock)


def test_endpoint_cuts_off_garbage(tmp_path: Path) -> None:
    import socket

    class Mem:
        size = 4096

        def pread(self, count: int, offset: int) -> bytes:
            return bytes(count)

        def pwrite(self, buf: bytes, offset: int) -> None:
            pass

        def flush(self) -> None:
            pass

    sock = str(tmp_path / "g.sock")
    errs: list[str] = []
    ep = Endpoint(sock, {"m": Mem()}, on_error=errs.append)
    ep.start()
    try:
        c = socket.socket(socket.AF_UNIX)
        c.connect(sock)
        c.recv(18)
        c.sendall(b"\x00\x00\x00\x03" + b"garbage-garbage-garbage")
        c.settimeout(5)
        with contextlib.suppress(ConnectionResetError):  # closed with our garbage unread
            assert c.recv(100) == b""  # closed
        c.close()
        threading.Event().wait(0.1)
        assert errs and "magic" in errs[0]
    finally:
        ep.close()


class GarbageProxy:
    """A TCP proxy in front of an nbdkit port; once ``corrupt`` is set, every byte the server
    sends back is replaced by garbage (a server that answers garbage mid-request)."""

    def __init__(self, port: int) -> None:
        import socket

        self.target = port
        self.corrupt = threading.Event()
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(8)
        self.port = int(self.lsock.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket

        while True:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            s = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pump, args=(c, s, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(s, c, True), daemon=True).start()

    def _pump(self, src: object, dst: object, back: bool) -> None:
        try:
            while True:
                data = src.recv(65536)  # type: ignore[attr-defined]
                if not data:
                    break
                if back and self.corrupt.is_set():
                    data = b"\xde\xad\xbe\xef" * (len(data) // 4 + 1)
                dst.sendall(data)  # type: ignore[attr-defined]
        except OSError:
            pass
        finally:
            for x in (src, dst):
                with contextlib.suppress(OSError):
                    x.close()  # type: ignore[attr-defined]

    def close(self) -> None:
        self.lsock.close()


def test_garbage_reply_fails_the_path_and_the_io_moves(tmp_path: Path) -> None:
    with nbdkit_array(tmp_path, {"ds1": MiB}) as arr:
        proxy = GarbageProxy(arr.ports[0])
        paths = [PathId("lo", "stor-a", f"127.0.0.1:{proxy.port}"), _paths(arr)[1]]
        events: list[object] = []
        ds = Datastore("ds1", "ds1", paths, check_every=5.0, on_event=events.append)
        ds.open()
        settle(ds)
        try:
            ds.pwrite(b"a" * 4096, 0)
            proxy.corrupt.set()
            ds.pwrite(b"b" * 4096, 4096)  # the reply is garbage: path A fails, retried on B
            assert ds.stats["retries"] == 1 and ds.stats["io_errors"] == 0
            assert ds.core.state(paths[0].name) is PathState.FAILED
            assert ds.core.active == paths[1].name
            data = (arr.directory / "ds1").read_bytes()
            assert data[:4096] == b"a" * 4096 and data[4096:8192] == b"b" * 4096
        finally:
            ds.close()
            proxy.close()


def test_an_aborted_path_never_sends_what_it_still_held() -> None:
    """A path's abort resets its connection: bytes the socket still held to send (a write
    queued while the fabric was down) never reach the array, which sees a reset instead.
    With a plain ``shutdown`` (the old abort) the array got all of it, after the retry on
    another path could have written the same block anew. The array here stops reading, so the
    client's send queue fills, as it does when a link is down."""
    import socket

    from netsvc.storage.nbdpaths import _Conn, kill

    with contextlib.ExitStack() as st:
        srv = st.enter_context(socket.socket())
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        cli = st.enter_context(socket.create_connection(srv.getsockname()))
        arr, _ = srv.accept()
        st.enter_context(arr)
        cli.setblocking(False)
        sent = 0
        with contextlib.suppress(BlockingIOError):
            while True:
                sent += cli.send(b"w" * 65536)
        assert sent > 1 << 20  # the array's buffer is small: most of it is still queued
        fd = os.dup(cli.fileno())  # what the adapter keeps beside libnbd's handle
        kill(_Conn(None, fd))
        os.close(fd)
        arr.settimeout(5.0)
        got, error = 0, ""
        try:
            while chunk := arr.recv(1 << 20):
                got += len(chunk)
        except ConnectionResetError as exc:
            error = str(exc)
        assert got < sent // 4 and "reset" in error.lower(), (got, sent, error)
