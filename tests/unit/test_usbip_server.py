"""The server and client on 127.0.0.1: the Linux ``usbip`` tool as a peer, transfers, busy,
unlink, and bad input (each gives a clear error and a closed connection, never a crash)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator

import pytest

from netsvc.usbip import client as cl
from netsvc.usbip import devices as dv
from netsvc.usbip import protocol as p
from netsvc.usbip.server import ServerOptions, ServerThread


@pytest.fixture
def server() -> Iterator[ServerThread]:
    devs = [dv.HidKeyboard(), dv.CdcAcm(), dv.BulkSourceSink(need_bps=250_000_000)]
    opts = ServerOptions(max_connections=8, handshake_timeout=1.0)
    with ServerThread(devs, options=opts) as st:
        yield st


def _wait(cond: object, timeout: float = 3.0) -> None:
    assert callable(cond)
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.01)


@pytest.mark.skipif(shutil.which("usbip") is None, reason="usbip (Debian package usbip) missing")
def test_linux_usbip_lists_our_devices(server: ServerThread) -> None:
    r = subprocess.run(
        ["usbip", "--tcp-port", str(server.port), "list", "-r", "127.0.0.1"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "1-1:" in out and "(1209:0001)" in out
    assert "Human Interface Device / Boot Interface Subclass / Keyboard (03/01/01)" in out
    assert "1-2:" in out and "(1209:0002)" in out and "(02/00/00)" in out
    assert "(02/02/01)" in out and "CDC Data" in out and "(0a/00/00)" in out
    assert "1-3:" in out and "(1209:0003)" in out and "Vendor Specific Class" in out
    assert "/sys/devices/platform/netsvc-usbip/usb1/1-3" in out
    assert not server.server.errors


def test_list_and_transfers_through_a_channel(server: ServerThread) -> None:
    devs = cl.list_devices("127.0.0.1", server.port)
    assert [(x.busid, x.product, x.num_interfaces) for x in devs] == [
        ("1-1", 1, 1),
        ("1-2", 2, 2),
        ("1-3", 3, 1),
    ]
    with cl.Channel("127.0.0.1", "1-2", server.port) as ch:
        assert ch.strings[2] == "netsvc virtual serial port"
        assert ch.bulk_out(0x02, b"ping") == 4
        assert ch.bulk_in(0x81, 64, timeout=2) == b"ping"
        assert ch.need_bps() == 115200
    with cl.Channel("127.0.0.1", "1-3", server.port) as ch:
        assert ch.need_bps() == 250_000_000
        assert cl.query_need("127.0.0.1", "1-2", server.port) == 115200
        assert ch.bulk_in(0x81, 5000) == dv.pattern(5000)
        r = cl.measure_throughput(ch, 0.2, "in", 64 << 10, 4)
        assert r.bytes > 0 and r.bps > 0
        with pytest.raises(cl.UrbError, match="stall"):
            ch.bulk_in(0x85, 0)  # no such endpoint: the device stalls it


def test_keyboard_typing_and_unlink(server: ServerThread) -> None:
    kb = server.server.device("1-1")
    assert isinstance(kb, dv.HidKeyboard)
    with cl.Channel("127.0.0.1", "1-1", server.port) as ch:
        pending = ch.submit(1, p.DIR_IN, 8)
        time.sleep(0.05)
        ch.unlink(pending)
        with pytest.raises(cl.UrbError, match="unlinked"):
            pending.wait(2)
        urbs = [ch.submit(1, p.DIR_IN, 8) for _ in range(4)]
        server.call(kb.type_text, "Ok")
        text = "".join(dv.keyboard_report_text(u.wait(2).data) for u in urbs)
        assert text == "Ok"
        done = ch.submit(1, p.DIR_IN, 8)
        server.call(kb.type_text, "z")
        done.wait(2)
        ch.unlink(done)  # already complete: the server answers status 0, nothing changes
        assert done.result is not None and done.result.status == 0
        assert ch.need_bps() == 6400


def test_one_importer_per_device_and_release_on_disconnect(server: ServerThread) -> None:
    first = cl.Channel("127.0.0.1", "1-3", server.port).open()
    try:
        with pytest.raises(cl.ImportRefused, match="busy"):
            cl.Channel("127.0.0.1", "1-3", server.port, reconnect=False).open(timeout=0.1)
        with pytest.raises(cl.ImportRefused, match="no such device"):
            cl.Channel("127.0.0.1", "9-9", server.port).open(timeout=0.1)
    finally:
        first.close()
    second = cl.Channel("127.0.0.1", "1-3", server.port).open(timeout=3)
    second.close()
    assert server.server.stats["busy"] >= 1


def _raw(server: ServerThread) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", server.port), timeout=3)
    return s


def _closed(s: socket.socket) -> bool:
    try:
        data = s.recv(4096)
        while data:
            data = s.recv(4096)
        return True
    except ConnectionResetError:
        return True
    finally:
        s.close()


def _import(s: socket.socket, busid: str) -> p.UsbDevice:
    s.sendall(p.encode(p.OpReqImport(busid)))
    raw = b""
    while len(raw) < 8 + p.DEVICE_SIZE:
        raw += s.recv(4096)
    res = p.decode_op_reply(raw, p.OP_REP_IMPORT)
    assert res is not None
    rep = res[0]
    assert isinstance(rep, p.OpRepImport) and rep.device is not None
    return rep.device


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (bytes.fromhex("0111 9999 00000000"), "unexpected op code 0x9999"),
        (bytes.fromhex("0106 8005 00000000"), "unsupported USB/IP version 0x0106"),
        (b"GET / HTTP/1.1\r\n\r\n", "unsupported USB/IP version 0x4745"),
    ],
)
def test_bad_operations_close_with_a_named_error(
    server: ServerThread, payload: bytes, why: str
) -> None:
    s = _raw(server)
    s.sendall(payload)
    assert _closed(s)
    _wait(lambda: any(why in e for e in server.server.errors))


def test_bad_urbs_and_truncation_close_and_release(server: ServerThread) -> None:
    s = _raw(server)
    dev = _import(s, "1-3")
    huge = p.encode(p.CmdSubmit(1, dev.devid, p.DIR_OUT, 2, 0))
    huge = huge[:0x18] + struct.pack(">I", 0x7FFFFFFF) + huge[0x1C:]
    s.sendall(huge)  # no payload follows: the header alone is refused
    assert _closed(s)
    _wait(lambda: any("2147483647 exceeds the limit 1048576" in e for e in server.server.errors))
    s = _raw(server)
    _import(s, "1-3")
    s.sendall(struct.pack(">II", 77, 1) + bytes(40))
    assert _closed(s)
    _wait(lambda: any("unknown URB command 0x4d" in e for e in server.server.errors))
    # a client that vanishes in the middle of an OUT URB: the device is free again at once
    s = _raw(server)
    dev = _import(s, "1-3")
    s.sendall(p.encode(p.CmdSubmit(2, dev.devid, p.DIR_OUT, 2, 1000, data=bytes(1000)))[:500])
    time.sleep(0.05)
    s.close()
    _wait(lambda: any("mid-message (500 bytes" in e for e in server.server.errors))
    _wait(lambda: server.server.export("1-3").owner is None)  # type: ignore[union-attr]
    # a truncated operation header, then silence: the handshake timeout closes it
    s = _raw(server)
    s.sendall(bytes.fromhex("0111"))
    assert _closed(s)
    _wait(lambda: any("handshake timeout" in e for e in server.server.errors))
    with cl.Channel("127.0.0.1", "1-3", server.port) as ch:  # still serving
        assert ch.bulk_in(0x81, 16) == dv.pattern(16)


def test_a_flood_of_connections_is_capped(server: ServerThread) -> None:
    socks = [_raw(server) for _ in range(30)]
    try:
        _wait(lambda: server.server.stats["refused"] >= 30 - 8)
        assert len(server.server.active) <= 8
        _wait(lambda: any("connection limit 8" in e for e in server.server.errors))
    finally:
        for s in socks:
            s.close()
    _wait(lambda: not server.server.active)
    assert [x.busid for x in cl.list_devices("127.0.0.1", server.port)] == ["1-1", "1-2", "1-3"]


def test_a_reimport_takes_over_only_from_an_unresponsive_holder_at_the_same_address(
    server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    from netsvc.usbip import server as srv

    old = _raw(server)
    _import(old, "1-3")
    # A live holder keeps its device: the re-import is refused.
    with pytest.raises(cl.ImportRefused, match="busy"):
        cl.Channel("127.0.0.1", "1-3", server.port, reconnect=False).open(timeout=0.2)
    # A holder that left our data unacknowledged (TCP says its path is dead) loses it.
    monkeypatch.setattr(srv, "peer_unresponsive", lambda sock, after: True)
    new = cl.Channel("127.0.0.1", "1-3", server.port, reconnect=False).open(timeout=2)
    try:
        assert _closed(old)
        assert server.server.stats["takeovers"] == 1
    finally:
        new.close()


def test_peer_unresponsive_reads_tcp_info() -> None:
    from netsvc.usbip.server import peer_unresponsive

    assert not peer_unresponsive(None, 0.5)
    a, b = socket.socketpair()  # not TCP: TCP_INFO is refused, so never unresponsive
    with a, b:
        assert not peer_unresponsive(a, 0.0)
    listener = socket.create_server(("127.0.0.1", 0))
    with listener, socket.create_connection(listener.getsockname()) as c:
        peer, _ = listener.accept()
        with peer:
            c.sendall(b"x")
            _wait(lambda: peer.recv(1) == b"x")
            assert not peer_unresponsive(c, 0.0)  # everything acknowledged


def test_a_repeated_pending_seqnum_is_a_named_error(server: ServerThread) -> None:
    """The serial port's bulk IN pends until there is data: a second URB with its seqnum is
    refused with a named error and a closed connection (the device is free again)."""
    s = _raw(server)
    dev = _import(s, "1-2")
    set_config = struct.pack("<BBHHH", 0x00, 9, 1, 0, 0)
    urb = p.encode(p.CmdSubmit(5, dev.devid, p.DIR_IN, 1, 8))
    s.sendall(p.encode(p.CmdSubmit(1, dev.devid, p.DIR_OUT, 0, 0, setup=set_config)) + urb + urb)
    assert _closed(s)
    _wait(lambda: any("bad URB: seqnum 5 is already pending" in e for e in server.server.errors))
    _wait(lambda: server.server.export("1-2").owner is None)  # type: ignore[union-attr]


def test_a_client_that_never_reads_cannot_grow_the_servers_buffers(server: ServerThread) -> None:
    """400 bulk-IN URBs of 1 MiB, never read: the server stops taking requests instead of
    buffering 400 MiB of completions."""
    s = _raw(server)
    dev = _import(s, "1-3")
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    s.settimeout(0.5)
    set_config = struct.pack("<BBHHH", 0x00, 9, 1, 0, 0)
    urbs = p.encode(p.CmdSubmit(1000, dev.devid, p.DIR_OUT, 0, 0, setup=set_config))
    urbs += b"".join(p.encode(p.CmdSubmit(i, dev.devid, p.DIR_IN, 1, 1 << 20))
                     for i in range(1, 401))
    with contextlib.suppress(TimeoutError):  # the server stopped reading: that is the point
        s.sendall(urbs)
    time.sleep(0.5)
    conn = next(iter(server.server.active))
    assert conn.transport is not None
    buffered = conn.transport.get_write_buffer_size()
    assert server.server.stats["urbs"] >= 2  # it did serve some
    assert buffered <= 8 << 20, buffered
    s.close()


def test_an_urb_for_another_devid_is_refused(server: ServerThread) -> None:
    s = _raw(server)
    dev = _import(s, "1-3")
    s.sendall(p.encode(p.CmdSubmit(1, dev.devid ^ 1, p.DIR_IN, 1, 8)))
    assert _closed(s)
    _wait(lambda: any("but this connection imported" in e for e in server.server.errors))
