"""Virtual devices and the connection state machines, sans-IO: no sockets, no clock."""

from __future__ import annotations

import struct
from dataclasses import replace

import pytest

from netsvc.usbip import connection as c
from netsvc.usbip import descriptors as d
from netsvc.usbip import devices as dv
from netsvc.usbip import protocol as p


def ctl(dev: dv.VirtualDevice, seq: int, setup: dv.Setup, data: bytes = b"") -> dv.Completion:
    direction = p.DIR_IN if setup.is_in else p.DIR_OUT
    length = setup.length if setup.is_in else len(data)
    cmd = p.CmdSubmit(seq, 0, direction, 0, length, setup=setup.encode(), data=data)
    (comp,) = dev.submit(cmd, 0.0)
    return comp


def urb(seq: int, ep: int, direction: int, length: int, data: bytes = b"") -> p.CmdSubmit:
    return p.CmdSubmit(seq, 0, direction, ep, length, data=data)


@pytest.mark.parametrize("make", [dv.HidKeyboard, dv.CdcAcm, dv.BulkSourceSink])
def test_descriptors_are_answered_from_real_bytes(make: type[dv.VirtualDevice]) -> None:
    dev = make()
    raw = ctl(dev, 1, dv.Setup(0x80, 6, 0x0100, 0, 18)).data
    assert d.parse_device_descriptor(bytes(raw)) == dev.descriptor
    head = ctl(dev, 2, dv.Setup(0x80, 6, 0x0200, 0, 9)).data
    total = struct.unpack_from("<H", head, 2)[0]
    full = bytes(ctl(dev, 3, dv.Setup(0x80, 6, 0x0200, 0, 0xFFFF)).data)
    assert len(full) == total and d.parse_configuration(full) == dev.configuration
    name = bytes(ctl(dev, 4, dv.Setup(0x80, 6, 0x0302, 0x409, 255)).data)
    assert d.parse_string_descriptor(name) == dev.strings[1]
    assert ctl(dev, 5, dv.Setup(0x80, 6, 0x0309, 0x409, 255)).status == -p.EPIPE
    assert ctl(dev, 6, dv.Setup(0x80, 8, 0, 0, 1)).data == b"\0"
    assert ctl(dev, 7, dv.Setup(0x00, 9, 1, 0, 0)).status == 0
    assert dev.state is dv.DeviceState.CONFIGURED
    assert ctl(dev, 8, dv.Setup(0x80, 8, 0, 0, 1)).data == b"\1"
    assert ctl(dev, 9, dv.Setup(0x00, 9, 7, 0, 0)).status == -p.EPIPE  # no configuration 7
    assert ctl(dev, 10, dv.Setup(0x01, 11, 5, 0, 0)).status == -p.EPIPE  # no alt setting 5
    assert ctl(dev, 11, dv.Setup(0x80, 0, 0, 0, 2)).status == 0  # GET_STATUS
    # The need request: answered only by a device that announces it, on its interface.
    announced = d.find_need_announcement(dev.configuration)
    assert (announced is not None) == (make is dv.BulkSourceSink)
    assert ctl(dev, 12, dv.Setup(0xC0, dv.VENDOR_REQ_NEED, 0, 0, 8)).status == -p.EPIPE
    asked = ctl(dev, 14, dv.Setup(0xC1, dv.VENDOR_REQ_NEED, 0, 0, 8))
    if announced is None:
        assert asked.status == -p.EPIPE
    else:
        assert announced == (0, dv.VENDOR_REQ_NEED)
        assert struct.unpack("<Q", asked.data)[0] == dev.need_bps
    assert ctl(dev, 13, dv.Setup(0x40, 0x77, 0, 0, 0)).status == -p.EPIPE  # unknown vendor


def test_state_transitions_are_enforced() -> None:
    dev = dv.HidKeyboard()
    dev.state = dv.DeviceState.CONFIGURED
    dev._move(dv.DeviceState.ADDRESSED)
    bogus = type("S", (), {"value": "bogus"})()
    with pytest.raises(dv.IllegalTransition):
        dev._move(bogus)  # type: ignore[arg-type]
    with pytest.raises(dv.DeviceError, match="already pending"):
        ctl(dev, 1, dv.Setup(0x00, 9, 1, 0, 0))
        dev.submit(urb(2, 1, p.DIR_IN, 8), 0.0)
        dev.submit(urb(2, 1, p.DIR_IN, 8), 0.0)


def test_keyboard_reports_wait_for_keys_and_unlink() -> None:
    kb = dv.HidKeyboard()
    assert kb.need_bps == 6400  # 8 bytes every 10 ms
    assert dv.Completion(1, -p.EPIPE, 0) in kb.submit(urb(1, 1, p.DIR_IN, 8), 0.0)  # unconfigured
    ctl(kb, 2, dv.Setup(0x00, 9, 1, 0, 0))
    assert kb.submit(urb(3, 1, p.DIR_IN, 8), 0.0) == []  # pending: no key yet
    assert kb.submit(urb(4, 1, p.DIR_IN, 8), 0.0) == []
    kb.type_text("A")
    out = kb.poll(0.0)
    assert [c.seqnum for c in out] == [3, 4]
    assert dv.keyboard_report_text(bytes(out[0].data)) == "A" and out[1].data == bytes(8)
    assert kb.submit(urb(5, 1, p.DIR_IN, 8), 0.0) == []
    assert kb.unlink(5) and not kb.unlink(5)
    kb.type_text("b")
    assert kb.poll(0.0) == []  # the unlinked URB never completes
    report = bytes(ctl(kb, 6, dv.Setup(0x81, 6, 0x2200, 0, 100)).data)
    assert report == d.BOOT_KEYBOARD_REPORT
    assert ctl(kb, 7, dv.Setup(0x21, 0x09, 0x0200, 0, 1), b"\x02").status == 0
    assert kb.leds == 2


def test_keyboard_autotype_runs_on_the_injected_clock() -> None:
    kb = dv.HidKeyboard(autotype="hi", every=2.0)
    ctl(kb, 1, dv.Setup(0x00, 9, 1, 0, 0))
    got = kb.submit(urb(2, 1, p.DIR_IN, 8), 10.0)
    assert [dv.keyboard_report_text(bytes(c.data)) for c in got] == ["h"]
    assert kb.next_timer() == 12.0
    done = [c for s in range(3, 6) for c in kb.submit(urb(s, 1, p.DIR_IN, 8), 10.5)]
    assert "".join(dv.keyboard_report_text(bytes(c.data)) for c in done) == "i"
    assert kb.submit(urb(6, 1, p.DIR_IN, 8), 11.0) == [] and kb.poll(11.9) == []
    (again,) = kb.poll(12.0)
    assert again.seqnum == 6 and dv.keyboard_report_text(bytes(again.data)) == "h"


def test_cdc_acm_echoes_with_backpressure_and_line_coding() -> None:
    acm = dv.CdcAcm(buffer=8)
    ctl(acm, 1, dv.Setup(0x00, 9, 1, 0, 0))
    coding = struct.pack("<IBBB", 9600, 0, 0, 8)
    assert ctl(acm, 2, dv.Setup(0x21, 0x20, 0, 0, 7), coding).status == 0
    assert acm.need_bps == 9600
    assert bytes(ctl(acm, 3, dv.Setup(0xA1, 0x21, 0, 0, 7)).data) == coding
    assert ctl(acm, 4, dv.Setup(0x21, 0x20, 0, 0, 3), b"abc").status == -p.EPIPE
    assert acm.submit(urb(5, 2, p.DIR_OUT, 6, b"hello!"), 0.0) == [dv.Completion(5, 0, 6)]
    assert acm.submit(urb(6, 2, p.DIR_OUT, 6, b"world!"), 0.0) == []  # buffer full: NAK
    out = acm.submit(urb(7, 1, p.DIR_IN, 64), 0.0)
    assert [(c.seqnum, bytes(c.data)) for c in out] == [(7, b"hello!"), (6, b"")]
    out = acm.submit(urb(8, 1, p.DIR_IN, 4), 0.0)
    assert bytes(out[0].data) == b"worl"  # never more than asked


def test_bulk_device_sources_sinks_and_caps() -> None:
    blk = dv.BulkSourceSink(need_bps=123_000_000, max_transfer=4096)
    assert blk.need_bps == 123_000_000
    assert blk.cap(p.DIR_IN, 1) == 4096 and blk.cap(p.DIR_OUT, 2) == 4096
    assert blk.cap(p.DIR_IN, 5) == 0 and blk.cap(p.DIR_OUT, 0) == dv.CONTROL_CAP
    ctl(blk, 1, dv.Setup(0x00, 9, 1, 0, 0))
    (c1,) = blk.submit(urb(2, 1, p.DIR_IN, 1000), 0.0)
    assert bytes(c1.data) == dv.pattern(1000)
    (c2,) = blk.submit(urb(3, 2, p.DIR_OUT, 10, bytes(10)), 0.0)
    assert c2.actual_length == 10 and blk.sunk == 10
    halt = dv.Setup(0x02, 3, 0, 0x81, 0)
    assert ctl(blk, 4, halt).status == 0
    assert blk.submit(urb(5, 1, p.DIR_IN, 10), 0.0)[0].status == -p.EPIPE
    assert ctl(blk, 6, dv.Setup(0x02, 1, 0, 0x81, 0)).status == 0  # CLEAR_FEATURE(HALT)
    assert blk.submit(urb(7, 1, p.DIR_IN, 10), 0.0)[0].status == 0


def test_device_specs() -> None:
    assert isinstance(dv.from_spec("keyboard:type=hi,every=0.5"), dv.HidKeyboard)
    blk = dv.from_spec("bulk:need=25M,max=64k")
    assert isinstance(blk, dv.BulkSourceSink)
    assert blk.need_bps == 25_000_000 and blk.max_transfer == 65536
    for bad, why in [
        ("mouse", "unknown device kind"),
        ("bulk:need", "expected key=value"),
        ("bulk:speed=1", "unknown option"),
        ("bulk:max=1G", "max_transfer"),
        ("keyboard:every=0", "every"),
    ]:
        with pytest.raises(ValueError, match=why):
            dv.from_spec(bad)


# -- the connection state machines, over an in-memory link ---------------------------------


class Link:
    """Two ends joined in memory; ``drop()`` loses what is in flight."""

    def __init__(self) -> None:
        self.to_server: list[bytes] = []
        self.to_client: list[bytes] = []

    def drop(self) -> None:
        self.to_server.clear()
        self.to_client.clear()


def test_import_submit_unlink_over_an_in_memory_link() -> None:
    kb = dv.HidKeyboard()
    srv = c.ServerConnection(now=0.0)
    cli = c.ClientConnection()
    link = Link()
    link.to_server.append(cli.request_import("1-1"))
    srv.receive_data(b"".join(link.to_server), 0.1)
    assert srv.next_event() == c.ImportRequested("1-1")
    dev = kb.usb_device("1-1", 1, 2, "/x")
    cli.receive_data(srv.reply_import(p.ST_OK, dev, kb.cap), 0.2)
    assert cli.next_event() == c.ImportReplied(p.ST_OK, replace(dev, interfaces=()))
    assert cli.state is c.ClientState.IMPORTED and srv.next_timer() is None
    seq, raw = cli.submit(1, p.DIR_IN, 8)
    useq, uraw = cli.unlink(seq)
    srv.receive_data(raw + uraw, 0.3)
    ev1, ev2 = srv.next_event(), srv.next_event()
    assert isinstance(ev1, c.SubmitReceived) and ev1.cmd.devid == dev.devid
    assert isinstance(ev2, c.UnlinkReceived) and ev2.cmd.unlink_seqnum == seq
    cli.receive_data(srv.ret_unlink(useq, -p.ECONNRESET), 0.4)
    assert cli.next_event() == c.UnlinkCompleted(useq, seq, -p.ECONNRESET)
    assert seq not in cli.pending
    seq2, raw2 = cli.submit(1, p.DIR_IN, 8)
    link.to_server.append(raw2)
    link.drop()  # the request is lost: it stays pending until the adapter gives up
    assert seq2 in cli.pending
    cli.receive_data(b"", 1.0)
    assert isinstance(cli.next_event(), c.TransportClosed)
    with pytest.raises(c.UsageError):
        cli.submit(1, p.DIR_IN, 8)


def test_server_connection_bad_input_and_timeouts() -> None:
    srv = c.ServerConnection(now=0.0, handshake_timeout=5.0)
    srv.receive_data(bytes.fromhex("0111"), 1.0)
    assert srv.next_event() is None and srv.next_timer() == 5.0
    srv.handle_timer(4.9)
    assert srv.next_event() is None
    srv.handle_timer(5.0)
    ev = srv.next_event()
    assert isinstance(ev, c.RemoteError) and "handshake timeout" in ev.reason
    assert srv.state is c.ServerState.CLOSING
    srv.receive_data(b"garbage", 6.0)  # ignored once closing
    assert srv.next_event() is None

    srv = c.ServerConnection(now=0.0)
    srv.receive_data(bytes.fromhex("0111800300000000") + b"1-1" + bytes(29), 0.0)
    srv.next_event()
    srv.reply_import(p.ST_OK, dv.HidKeyboard().usb_device("1-1", 1, 2, "/x"), lambda a, b: 8)
    srv.receive_data(p.encode(p.CmdSubmit(1, 0, p.DIR_IN, 1, 9)), 0.0)
    ev = srv.next_event()
    assert isinstance(ev, c.RemoteError) and "exceeds the limit 8 of endpoint 1 IN" in ev.reason

    srv = c.ServerConnection(now=0.0)
    srv.receive_data(bytes.fromhex("0111800300000000") + b"1-1", 0.0)
    srv.receive_data(b"", 0.5)
    ev = srv.next_event()
    assert isinstance(ev, c.TransportClosed) and "mid-message (11 bytes" in ev.reason
    with pytest.raises(c.UsageError):
        srv.reply_devlist(())


def test_a_serial_port_never_accepts_an_urb_larger_than_its_echo_buffer() -> None:
    """Such an OUT URB could never fit and would wait forever: the endpoint limit refuses it."""
    assert dv.CdcAcm(buffer=64).max_transfer == 64
    assert dv.CdcAcm().max_transfer == 64 << 10
