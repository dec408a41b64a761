"""Reconnection on loopback: a TCP proxy between channel and server is cut and restored."""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Iterator

import pytest

from netsvc.usbip import client as cl
from netsvc.usbip import devices as dv
from netsvc.usbip import protocol as p
from netsvc.usbip.proxy import DropProxy
from netsvc.usbip.server import ServerThread


@pytest.fixture
def link() -> Iterator[tuple[ServerThread, DropProxy]]:
    devs = [dv.HidKeyboard(), dv.CdcAcm(), dv.BulkSourceSink()]
    with ServerThread(devs) as st, DropProxy(("127.0.0.1", st.port)) as px:
        yield st, px


def test_channel_resumes_after_a_drop_and_replays_its_configuration(
    link: tuple[ServerThread, DropProxy],
) -> None:
    st, px = link
    events: list[cl.ChannelEvent] = []
    with cl.Channel("127.0.0.1", "1-2", px.port, on_event=events.append) as ch:
        coding = struct.pack("<IBBB", 9600, 0, 0, 8)
        ch.control_out(0x21, 0x20, 0, 0, coding)
        assert ch.bulk_out(2, b"a") == 1 and ch.bulk_in(0x81, 8, timeout=2) == b"a"
        waiting_in = ch.submit(1, p.DIR_IN, 64)  # in flight across the drop: retried
        px.drop()
        _wait(lambda: ch.state is cl.ChannelState.RECONNECTING)
        queued = ch.submit(2, p.DIR_OUT, data=b"later")  # waits for the reconnection
        time.sleep(0.3)
        assert not queued.done()
        px.restore()
        assert queued.wait(5).actual_length == 5
        assert waiting_in.wait(5).data == b"later"
        assert ch.reconnects == 1 and ch.last_outage_s is not None
        assert ch.need_bps() == 9600  # SET_LINE_CODING was replayed on the new import
        assert [e.state for e in events][-1] is cl.ChannelState.READY
    acm = st.server.device("1-2")
    assert isinstance(acm, dv.CdcAcm)


def test_out_urbs_in_flight_fail_clearly(link: tuple[ServerThread, DropProxy]) -> None:
    _st, px = link
    with cl.Channel("127.0.0.1", "1-2", px.port) as ch:
        # more than the 256 KiB echo buffer holds: the last OUT URBs stay pending (NAK)
        outs = [ch.submit(2, p.DIR_OUT, data=bytes(60_000)) for _ in range(6)]
        time.sleep(0.2)
        out = outs[-1]
        assert outs[0].done() and not out.done()
        px.drop()
        with pytest.raises(cl.ChannelDropped, match="connection lost"):
            out.wait(5)
        px.restore()
        assert ch.bulk_out(2, b"x", timeout=5) == 1


def test_without_reconnect_everything_fails_and_the_channel_closes(
    link: tuple[ServerThread, DropProxy],
) -> None:
    _st, px = link
    ch = cl.Channel("127.0.0.1", "1-1", px.port, reconnect=False).open()
    pending = ch.submit(1, p.DIR_IN, 8)
    px.drop()
    with pytest.raises(cl.ChannelDropped):
        pending.wait(3)
    _wait(lambda: ch.state is cl.ChannelState.CLOSED)
    with pytest.raises(cl.ChannelClosed):
        ch.bulk_in(0x81, 8, timeout=1)
    ch.close()


def test_streaming_survives_repeated_drops(link: tuple[ServerThread, DropProxy]) -> None:
    _st, px = link
    got = 0
    errors: list[BaseException] = []
    stop = threading.Event()
    with cl.Channel("127.0.0.1", "1-3", px.port) as ch:

        def consume() -> None:
            nonlocal got
            try:
                while not stop.is_set():
                    got += len(ch.bulk_in(0x81, 65536, timeout=10))
            except BaseException as exc:  # the consumer must never see the drops
                errors.append(exc)

        th = threading.Thread(target=consume)
        th.start()
        for _ in range(3):
            time.sleep(0.1)
            px.drop()
            time.sleep(0.1)
            px.restore()
        time.sleep(0.2)
        stop.set()
        th.join(10)
        assert not errors and got > 0 and ch.reconnects >= 3


def _wait(cond: object, timeout: float = 5.0) -> None:
    assert callable(cond)
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.01)
