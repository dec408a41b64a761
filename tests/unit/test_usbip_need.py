"""A device's need is measured where it is served, and netsvc's need request goes only to
devices that announce it: a bulk device that declares nothing (as real hardware) is no longer
read as 0 and tunnelled for ever."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

from netsvc.usbip import client as cl
from netsvc.usbip import connection as c
from netsvc.usbip import descriptors as d
from netsvc.usbip import devices as dv
from netsvc.usbip import protocol as p
from netsvc.usbip.need import RateMeter
from netsvc.usbip.placement import combine_need, decide, device_need
from netsvc.usbip.server import ServerOptions, ServerThread

# -- the meter (pure) --------------------------------------------------------------------------


def test_peak_rate_over_a_span_not_the_average_over_the_window() -> None:
    m = RateMeter(window_s=30.0, span_s=1.0, bucket_s=0.25)
    assert m.peak_bps(0.0) == 0
    for i in range(8):  # 2 s at 1 MB/s, in 125 ms steps
        m.add(10.0 + i * 0.25, 250_000)
    assert m.peak_bps(12.0) == 8_000_000  # 1 MB/s while busy
    assert m.peak_bps(30.0) == 8_000_000  # idle since: still the peak within the window
    assert m.peak_bps(45.0) == 0  # the window has passed


def test_a_single_burst_is_averaged_over_the_span() -> None:
    m = RateMeter(window_s=10.0, span_s=1.0, bucket_s=0.25)
    m.add(5.0, 1_000_000)
    assert m.peak_bps(5.1) == 8_000_000  # 1 MB within one span: 8 Mbit/s, not more


def test_memory_is_bounded_and_time_going_back_is_absorbed() -> None:
    m = RateMeter(window_s=2.0, span_s=1.0, bucket_s=0.5)
    for i in range(10_000):
        m.add(i * 0.1, 10)
    assert len(m._buckets) <= 2.0 / 0.5 + 1
    m.add(0.0, 10)  # backwards: counted in the newest bucket
    assert m.total == 10 * 10_001


@pytest.mark.parametrize("args", [(0, 1, 1), (10, 0, 0.5), (10, 1, 2), (1, 2, 0.5),
                                  (float("nan"), 1, 1), (10, 1, -1)])
def test_bad_meter_settings(args: tuple[float, float, float]) -> None:
    with pytest.raises(ValueError):
        RateMeter(*args)


def test_combine_takes_the_larger() -> None:
    assert combine_need(400, None) == 400
    assert combine_need(0, 97_000_000) == 97_000_000
    assert combine_need(400_000_000, 97_000_000) == 400_000_000


# -- the wire: OP_REQ_NEED / OP_REP_NEED -------------------------------------------------------


def test_need_op_bytes() -> None:
    req = p.encode(p.OpReqNeed("1-2"))
    assert req[:8] == bytes.fromhex("0111804e00000000") and len(req) == 40
    assert p.decode_op_request(req) == (p.OpReqNeed("1-2"), 40)
    rep = p.encode(p.OpRepNeed(p.ST_OK, 97_000_000, 30_000, 1_000))
    assert rep == bytes.fromhex("0111004e00000000") + struct.pack(">QII", 97_000_000, 30_000,
                                                                  1_000)
    assert p.decode_op_reply(rep, p.OP_REP_NEED) == (p.OpRepNeed(0, 97_000_000, 30_000, 1_000),
                                                     24)
    assert p.decode_op_reply(rep[:20], p.OP_REP_NEED) is None
    no = p.encode(p.OpRepNeed(p.ST_NODEV))
    assert p.decode_op_reply(no, p.OP_REP_NEED) == (p.OpRepNeed(p.ST_NODEV), 8)


def test_need_state_machines() -> None:
    srv, cli = c.ServerConnection(0.0), c.ClientConnection()
    srv.receive_data(cli.request_need("1-3"), 0.0)
    assert srv.next_event() == c.NeedRequested("1-3")
    out = srv.reply_need(p.ST_OK, 5, 30_000, 1_000)
    assert srv.state is c.ServerState.CLOSING
    cli.receive_data(out, 0.0)
    assert cli.next_event() == c.NeedReceived(p.ST_OK, 5, 30_000, 1_000)
    assert cli.state is c.ClientState.CLOSING
    with pytest.raises(c.UsageError):
        cli.request_need("1-3")


# -- end to end over 127.0.0.1 ------------------------------------------------------------------


class ForeignBulk(dv.VirtualDevice):
    """A vendor-class bulk device that announces nothing, as real hardware: it records every
    control request it gets, and streams as fast as asked."""

    kind = "foreign"

    def __init__(self) -> None:
        intf = d.Interface(0, 0, 0xFF, 0, 0, (d.Endpoint(0x81, d.EP_BULK, 512, 0),))
        cfg = d.Configuration(1, 0x80, 50, (intf,))
        desc = d.DeviceDescriptor(0x0200, 0xFF, 0, 0, 64, 0x04B4, 0x1004, 0x0100, 0, 1, 0, 1)
        super().__init__(desc, cfg, ("a camera",), p.SPEED_HIGH, 1 << 20)
        self.setups: list[dv.Setup] = []

    def control_in(self, s: dv.Setup) -> bytes:
        self.setups.append(s)
        return super().control_in(s)

    def on_data(self, ep: d.Endpoint, now: float) -> None:
        cmd = self._oldest(ep.address)
        if cmd is not None:
            self._done(cmd, bytes(cmd.transfer_buffer_length))


@pytest.fixture
def served() -> Iterator[tuple[ServerThread, ForeignBulk]]:
    foreign = ForeignBulk()
    devs = [foreign, dv.BulkSourceSink(need_bps=250_000_000), dv.CdcAcm()]
    with ServerThread(devs, options=ServerOptions(need_window=30.0, need_span=1.0)) as st:
        yield st, foreign


def test_unknown_hardware_never_gets_the_vendor_request(
        served: tuple[ServerThread, ForeignBulk]) -> None:
    st, foreign = served
    with cl.Channel("127.0.0.1", "1-1", st.port, reconnect=False) as ch:
        assert ch.need_bps() == 0  # no periodic endpoint, nothing announced
    assert foreign.setups and all(s.kind == 0 for s in foreign.setups), foreign.setups
    # The netsvc device announces it, and is asked on its interface.
    with cl.Channel("127.0.0.1", "1-2", st.port, reconnect=False) as ch:
        assert d.find_need_announcement(ch.configuration) == (0, dv.VENDOR_REQ_NEED)
        assert ch.need_bps() == 250_000_000
    with cl.Channel("127.0.0.1", "1-3", st.port, reconnect=False) as ch:
        assert ch.need_bps() == 115_200  # a serial port: its line rate (GET_LINE_CODING)


def test_a_busy_bulk_device_is_measured_and_pulls_its_vm(
        served: tuple[ServerThread, ForeignBulk]) -> None:
    st, _foreign = served
    idle = device_need("127.0.0.1", "1-1", st.port)
    assert (idle.declared_bps, idle.measured_bps, idle.need_bps) == (0, 0, 0)
    with cl.Channel("127.0.0.1", "1-1", st.port, reconnect=False) as ch:
        r = cl.measure_throughput(ch, 0.5, "in", 256 * 1024, 4)
        # Measured while in use: the server answers without an import.
        during = cl.query_measured_need("127.0.0.1", "1-1", st.port)
    assert during is not None and during.window_s == 30.0 and during.span_s == 1.0
    info = device_need("127.0.0.1", "1-1", st.port)
    assert info.declared_bps == 0 and info.need_source == "measured"
    assert info.measured_bps is not None and info.need_bps == info.measured_bps
    # Everything it moved within one span of the meter (0.5 s of transfers + a bucket).
    assert r.bytes * 8 // 2 <= info.measured_bps <= r.bytes * 8 + 8 * 256 * 1024
    # Its measured need, against an allocation of half of it: migrate (0 tunnelled before).
    decision = decide("h2:1-1", info.need_bps, max(8_000, info.need_bps // 2), 0.5)
    assert decision.action == "migrate"
    with pytest.raises(cl.ImportRefused):
        cl.query_measured_need("127.0.0.1", "9-9", st.port)


def test_a_server_without_the_op_gives_no_measurement() -> None:
    """Linux ``usbipd`` closes the connection on an op it does not know."""
    import socket
    import threading

    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = srv.accept()
        conn.recv(40)
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        assert cl.query_measured_need("127.0.0.1", "1-1", srv.getsockname()[1]) is None
    finally:
        t.join(5)
        srv.close()
