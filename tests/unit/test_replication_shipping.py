"""The agent's shipping (``agent.Shipping``) with a real nbdkit replica store on loopback: a
long initial full copy of one VM does not hold a synced VM's epochs back (two workers under
one throttle), and both replicas end equal to their disks."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from test_replication_nbdkit import SIZE, MemDisk, read_replica, site_b  # noqa: F401

from netsvc.replication.agent import Shipping
from netsvc.replication.shipper import Shipped


def test_a_synced_vm_ships_while_another_is_in_its_initial_copy(
        site_b: tuple[int, Path]) -> None:  # noqa: F811 - the fixture
    port, _ = site_b
    # 16 Mbit/s: vm2's initial copy (4 MiB) takes about 2 s
    sh = Shipping(("127.0.0.1", port), link_bps=16e6, share=1.0, log=lambda m: None)
    d1 = sh.track("vm1", MemDisk(SIZE))
    d2 = sh.track("vm2", MemDisk(4 * SIZE))
    done: list[tuple[float, Shipped]] = []
    sh.on_shipped = lambda r: done.append((time.monotonic(), r))
    sh.protect("vm1", "vm1", 1.0)
    assert sh.step() is not None and done[-1][1].ok and done[-1][1].full  # vm1 synced
    sh.protect("vm2", "vm2", 1.0)
    stop = threading.Event()
    worker = threading.Thread(target=sh.run, args=(stop,), daemon=True)
    worker.start()
    try:
        for i in range(60):
            d1.pwrite(bytes([i % 250 + 1]) * 4096, (i % 16) * 4096)
            d2.pwrite(bytes([i % 250 + 1]) * 4096, (i % 64) * 4096)
            time.sleep(0.02)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(
                d.tracker.open_blocks or d.tracker.sealed for d in (d1, d2)):
            time.sleep(0.05)
    finally:
        stop.set()
        worker.join(20)
    full2 = [t for t, r in done if r.vm == "vm2" and r.full and r.ok]
    deltas1 = [t for t, r in done if r.vm == "vm1" and not r.full and r.ok]
    assert full2 and deltas1
    assert min(deltas1) < full2[0]  # vm1's epochs went on during vm2's initial copy
    for s in sh.ships.values():
        s.shipper.sink.close()
    assert read_replica(port) == bytes(d1.backend.data)  # type: ignore[attr-defined]
