"""USB/IP in the lab: VMs' bandwidth allocations, device servers on hosts, consumers in VMs.

- ``shape_vm(lab, vm, rate_bps)`` gives a VM its allocated bandwidth on its current host, as
  an operator would: an htb qdisc ``1:`` whose default class ``1:10`` runs at ``rate_bps`` on
  the host end of the VM's veth (``netsvc.usbip.shaping.apply_htb``, the same code the
  agents use). It covers what the VM receives (the host end's egress), the direction a
  device streams to its consumer. One flow is exempt (``shaping.Exemption``): TCP from the
  host's own USB/IP server (its VM-network address, port ``USBIP_PORT``), the lab's stand-in
  for a device the VM's own hypervisor passes through, which never crosses the VM network.
  A tunnel from a device on *another* host is charged to the allocation.
- After a migration the lab does nothing: the agents' usbip part applies the VM's allocation
  to its new port (``netsvc.usbip.agent``). ``vm_allocation`` and ``class_bytes`` only read.
- ``start_usb_server(lab, host, devices)`` runs ``netsvc usbip serve`` in the host's namespace,
  bound to its VM-network address, with role ``usbip-<host>`` (``crash_host`` kills it).
- ``place_in_lab`` runs ``netsvc usbip place`` in the VM's host's namespace (where an agent
  would run it), reading the allocation from tc and asking the lab's manager.
- ``start_consumer(lab, vm, ...)`` runs this module (``python -m netsvc.lab.usb keyboard|bulk``)
  in the VM's namespace: a stand-in for a container that imports a device and writes one JSON
  object per line to its log (``lab.run_dir / "logs" / f"{role}.log"``).

Invariants:

- Every process is started with ``lab.popen`` (so it carries the run's marker and is ended
  by the lab's teardown) and every qdisc lives on an interface the lab made, so tearing the
  lab down removes all of it.
- pyroute2 is used only through ``lab.ipr(node)`` (opened with ``IPRoute(netns=...)`` on the
  calling thread, never inside a setns thread).
- Consumer log lines are JSON objects with ``t`` (``time.monotonic()``: one clock for every
  namespace, so the scenario can compare them with its own times) and ``event``; the
  consumer never restarts itself, and says so once (``opened``) per process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from netsvc.lab.lab import Lab
    from netsvc.usbip.placement import HtbAllocation
    from netsvc.usbip.shaping import Exemption

USBIP_PORT = 3240


def _err(message: str) -> Exception:
    from netsvc.lab.lab import LabError

    return LabError(message)


def _vif(lab: Lab, vm: str) -> tuple[str, str, int]:
    """(host, interface, ifindex) of the host end of ``vm``'s veth."""
    if vm not in lab.vms:
        raise _err(f"no VM {vm!r} in this lab")
    host = lab.vms[vm].host
    vif = lab.require_plan().vif_name(vm)
    return host, vif, lab.link_index(host, vif)


def local_exemption(lab: Lab, host: str) -> Exemption:
    """The flow ``host``'s own USB/IP server sends its VMs: not charged to allocations."""
    from netsvc.usbip.shaping import Exemption

    return Exemption(lab.require_plan().host_addr(host, "vmnet"), USBIP_PORT)


def shape_vm(lab: Lab, vm: str, rate_bps: int) -> HtbAllocation:
    """Set ``vm``'s allocation to ``rate_bps`` on its current host; return it as read back."""
    from netsvc.usbip.shaping import ShapingError, apply_htb

    host, vif, _ = _vif(lab, vm)
    try:
        got = apply_htb(lab.ipr(host), vif, rate_bps, local_exemption(lab, host))
    except ShapingError as exc:
        raise _err(f"cannot shape {vm} on {host}: {exc}") from None
    lab.record("action", vm, "shape", host=host, iface=vif, rate_bps=rate_bps,
               classid=got.classid_text)  # fmt: skip
    return got


def vm_allocation(lab: Lab, vm: str) -> HtbAllocation:
    """``vm``'s allocation as tc has it now, on its current host."""
    from netsvc.usbip.placement import read_allocation_ipr

    host, vif, _ = _vif(lab, vm)
    return read_allocation_ipr(lab.ipr(host), vif)


def class_bytes(lab: Lab, vm: str) -> tuple[int, int]:
    """(bytes sent through ``vm``'s allocation class 1:10, bytes sent by the whole qdisc)
    on its current host's port, as tc counts them."""
    from netsvc.usbip.shaping import ALLOC_CLASS, QDISC

    _host, _vif_name, idx = _vif(lab, vm)
    ipr = lab.ipr(lab.vms[vm].host)

    def sent(msg: Any) -> int:
        stats = msg.get_attr("TCA_STATS2")
        basic = stats.get_attr("TCA_STATS_BASIC") if stats is not None else None
        if basic is not None:
            return int(basic["bytes"])
        old = msg.get_attr("TCA_STATS")
        return int(old["bytes"]) if old is not None else 0

    cls = next((m for m in ipr.get_classes(index=idx) if int(m["handle"]) == ALLOC_CLASS), None)
    qd = next((m for m in ipr.get_qdiscs(index=idx) if int(m["handle"]) == QDISC), None)
    if cls is None or qd is None:
        raise _err(f"{vm} has no htb allocation on {lab.vms[vm].host}")
    return sent(cls), sent(qd)


def _json_lines(path: Path, start: int = 0) -> list[dict[str, Any]]:
    try:
        data = path.read_bytes()[start:]
    except OSError:
        return []
    out = []
    for line in data.decode("utf-8", "replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                obj = json.loads(line)
                if isinstance(obj, dict):
                    out.append(obj)
    return out


def _log(lab: Lab, role: str) -> tuple[Path, int]:
    path = lab.run_dir / "logs" / f"{role}.log"
    return path, (path.stat().st_size if path.exists() else 0)


def _tail(path: Path, start: int) -> str:
    try:
        return path.read_bytes()[start:].decode("utf-8", "replace").strip()[-600:]
    except OSError:
        return ""


def start_usb_server(
    lab: Lab, host: str, devices: list[str], port: int = USBIP_PORT, timeout: float = 15.0
) -> tuple[str, int, int]:
    """Serve ``devices`` (``--device`` specs) from ``host``'s VM-network address.

    Returns (address, port, pid) once the server listens."""
    lab.check_host(host)
    addr = lab.require_plan().host_addr(host, "vmnet")
    role = f"usbip-{host}"
    path, start = _log(lab, role)
    argv = [sys.executable, "-m", "netsvc", "usbip", "serve", "--bind", addr, "--port",
            str(port), "--json"]  # fmt: skip
    for spec in devices:
        argv += ["--device", spec]
    proc = lab.popen(host, argv, role=role)
    deadline = time.monotonic() + timeout
    while True:
        ready = [e for e in _json_lines(path, start) if "port" in e and "devices" in e]
        if ready:
            lab.record("event", host, "usbip-serve", addr=addr, port=ready[0]["port"],
                       devices=[d["kind"] for d in ready[0]["devices"]], pid=proc.pid)
            return addr, int(ready[0]["port"]), proc.pid
        if proc.poll() is not None or time.monotonic() > deadline:
            lab.procs.end(role)
            raise _err(f"the USB/IP server on {host} did not start: {_tail(path, start)}")
        time.sleep(0.02)


def run_role(
    lab: Lab, node: str, argv: list[str], role: str, timeout: float
) -> tuple[int, list[dict[str, Any]], str]:
    """Run ``argv`` in ``node``'s namespace to its end: (exit code, JSON lines, log text)."""
    path, start = _log(lab, role)
    proc = lab.popen(node, argv, role=role)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        lab.procs.end(role)
        raise _err(f"{role} did not finish within {timeout} s: {_tail(path, start)}") from None
    lab.procs.by_role.pop(role, None)  # it has ended: nothing left to stop
    return code, _json_lines(path, start), _tail(path, start)


def place_in_lab(
    lab: Lab,
    vm: str,
    device_host: str,
    busid: str,
    addr: str,
    port: int = USBIP_PORT,
    threshold: float = 0.5,
    dry_run: bool = False,
) -> tuple[int, dict[str, Any]]:
    """``netsvc usbip place`` for ``vm``, run in its host's namespace: the allocation from tc,
    the need from the device, the decision journaled and, to migrate, asked of the manager;
    to tunnel, the channel opened by ``place`` in the VM's namespace (``--channel-netns``),
    relaying the device on ``channel_path(lab, vm, busid)``.

    Returns (exit code, the command's JSON answer)."""
    if lab.key_file is None:
        raise _err("place_in_lab needs the manager (lab.start_services())")
    host, vif, _ = _vif(lab, vm)
    argv = [sys.executable, "-m", "netsvc", "usbip", "place", vm, device_host, busid,
            "--device-addr", addr, "--port", str(port), "--from-tc", f"{lab.pid(host)},{vif}",
            "--threshold", str(threshold), "--manager", lab.manager_url, "--key-file",
            str(lab.key_file), *lab.ca_args(), "--json",
            "--channel", str(channel_path(lab, vm, busid)),
            "--channel-netns", str(lab.pid(vm)), "--channel-user-timeout", "0.8",
            *(["--dry-run"] if dry_run else [])]  # fmt: skip
    code, lines, text = run_role(lab, host, argv, f"place-{vm}-{busid}", timeout=30)
    if not lines:
        raise _err(f"netsvc usbip place for {vm} answered nothing (exit {code}): {text}")
    out = lines[-1]
    lab.record("event", vm, "usbip-placement", device=out.get("device"),
               need_bps=out.get("need_bps"), allocation_bps=out.get("allocation_bps"),
               action=out.get("action"), exit=code)  # fmt: skip
    return code, out


def channel_path(lab: Lab, vm: str, busid: str) -> Path:
    """Where the channel ``place`` opens for ``vm`` relays the device (in the run's dir: the
    VM's namespace shares the filesystem, so the consumer in the VM connects there)."""
    return lab.run_dir / "usb" / f"{vm}-{busid}.sock"


def wait_json(path: Path, pred: Callable[[dict[str, Any]], bool], timeout: float
              ) -> dict[str, Any] | None:
    """The first JSON line of ``path`` for which ``pred`` holds, waiting up to ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        hit = next((e for e in _json_lines(path) if pred(e)), None)
        if hit is not None or time.monotonic() > deadline:
            return hit
        time.sleep(0.02)


def end_channel(lab: Lab, channel: dict[str, Any], wait: float = 5.0) -> bool:
    """End the channel ``place`` opened (by its pid, once it is known to be that channel:
    a ``usbip attach`` carrying this run's marker). True once it is gone."""
    from netsvc.lab.registry import ENV_MARKER

    pid = int(channel["pid"])
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return True  # already gone
    marker = f"{ENV_MARKER}={lab.prefix}".encode()
    if b"attach" not in cmdline or marker not in environ:
        raise _err(f"pid {pid} is not this run's channel: {cmdline[:6]}")
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + wait
    while Path(f"/proc/{pid}").exists():
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            return False
        time.sleep(0.02)
    return True


@dataclass
class Consumer:
    """A consumer process in a VM, and its JSON log."""

    vm: str
    role: str
    proc: subprocess.Popen[bytes]
    log: Path
    start: int

    def events(self) -> list[dict[str, Any]]:
        return _json_lines(self.log, self.start)

    def wait_for(
        self, pred: Callable[[dict[str, Any]], bool], timeout: float
    ) -> dict[str, Any] | None:
        """The first event for which ``pred`` holds, waiting up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            hit = next((e for e in self.events() if pred(e)), None)
            if hit is not None or time.monotonic() > deadline:
                return hit
            if self.proc.poll() is not None:
                return next((e for e in self.events() if pred(e)), None)
            time.sleep(0.02)

    def tail(self) -> str:
        return _tail(self.log, self.start)


def start_consumer(
    lab: Lab, vm: str, mode: str, addr: str, busid: str, role: str, *args: str,
    port: int = USBIP_PORT,
) -> Consumer:
    """Run ``python -m netsvc.lab.usb MODE ADDR BUSID --port P ARGS`` in ``vm``'s namespace
    (``relay``: ADDR is the Unix socket of a channel ``place`` opened)."""
    if mode not in ("keyboard", "bulk", "relay"):
        raise _err(f"unknown consumer mode {mode!r}")
    if vm not in lab.vms or lab.vms[vm].state != "running":
        raise _err(f"VM {vm} is not running")
    path, start = _log(lab, role)
    argv = [sys.executable, "-m", "netsvc.lab.usb", mode, addr, busid, "--port", str(port),
            *args]  # fmt: skip
    proc = lab.popen(vm, argv, role=role)
    lab.record("action", vm, "usb-consumer", mode=mode, device=f"{addr}:{busid}", pid=proc.pid)
    return Consumer(vm, role, proc, path, start)


def stop_consumer(lab: Lab, c: Consumer, wait: float = 5.0) -> list[dict[str, Any]]:
    """SIGTERM the consumer (it writes a summary line and exits); return its events."""
    lab.procs.end(c.role, signal.SIGTERM, wait=wait)
    return c.events()


# ---------------------------------------------------------------------------------------------
# The consumer itself (runs inside a VM's namespace): only netsvc.usbip is imported here.


def _emitter() -> Callable[..., None]:
    lock = threading.Lock()

    def emit(**kw: Any) -> None:
        line = json.dumps({"t": round(time.monotonic(), 6), **kw})
        with lock:
            print(line, flush=True)

    return emit


def _on_event(emit: Callable[..., None]) -> Callable[[Any], None]:
    def on_event(ev: Any) -> None:
        emit(event="state", state=ev.state.value, detail=ev.detail, at=round(ev.at, 6),
             outage_ms=None if ev.outage_s is None else round(ev.outage_s * 1000, 1))  # fmt: skip

    return on_event


def _keyboard(args: argparse.Namespace, emit: Callable[..., None]) -> int:
    from netsvc.usbip import descriptors as d
    from netsvc.usbip.client import Channel, ChannelState, UrbError
    from netsvc.usbip.devices import keyboard_report_text

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    # Quick loss detection: unacknowledged data for user_timeout aborts the connection, and
    # each reconnection attempt gives up after connect_timeout.
    ch = Channel(args.host, args.busid, args.port, user_timeout=args.user_timeout,
                 connect_timeout=0.5, on_event=_on_event(emit))  # fmt: skip
    ch.open(timeout=15)
    ep = ch.find_endpoint(d.EP_INTERRUPT, True)
    if ep is None:
        emit(event="error", error="the device has no interrupt IN endpoint")
        ch.close()
        return 1
    emit(event="opened", pid=os.getpid(), need_bps=ch.need_bps())
    chars = errors = 0
    try:
        while not stop.is_set():
            try:
                data = ch.interrupt_in(ep.address, 8, timeout=args.poll)
            except TimeoutError:
                continue
            except UrbError as exc:
                if ch.state is ChannelState.CLOSED:
                    break
                errors += 1
                emit(event="urb-error", error=str(exc))
                time.sleep(0.02)
                continue
            text = keyboard_report_text(data)
            if text:
                chars += len(text)
                emit(event="text", text=text)
    finally:
        emit(event="summary", chars=chars, errors=errors, reconnects=ch.reconnects,
             last_outage_ms=None if ch.last_outage_s is None
             else round(ch.last_outage_s * 1000, 1))  # fmt: skip
        ch.close()
    return 0


def _bulk(args: argparse.Namespace, emit: Callable[..., None]) -> int:
    from netsvc.usbip.client import Channel, measure_throughput

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    emit(event="waiting", pid=os.getpid(), wait_file=args.wait_file)
    if args.wait_file:
        deadline = time.monotonic() + args.wait_timeout
        while not os.path.exists(args.wait_file):
            if stop.is_set() or time.monotonic() > deadline:
                emit(event="gave-up", reason="no go before the deadline")
                return 1
            time.sleep(0.01)
    t0 = time.monotonic()
    with Channel(args.host, args.busid, args.port, on_event=_on_event(emit)) as ch:
        emit(event="opened", pid=os.getpid(), need_bps=ch.need_bps(),
             open_ms=round((time.monotonic() - t0) * 1000, 1))  # fmt: skip
        r = measure_throughput(ch, args.seconds, "in", args.urb_size, args.depth)
        emit(event="measured", bytes=r.bytes, seconds=round(r.seconds, 4),
             mbytes_per_s=round(r.mbytes_per_s, 2), bps=round(r.bps), urb_size=r.urb_size,
             depth=r.depth, reconnects=ch.reconnects)  # fmt: skip
    return 0


def _relay_text(args: argparse.Namespace, emit: Callable[..., None]) -> int:
    """Read the text a keyboard channel relays on its Unix socket (``host`` is its path)."""
    import socket

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    deadline = time.monotonic() + 15
    while True:
        try:
            s.connect(args.host)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    s.settimeout(args.poll)
    emit(event="opened", pid=os.getpid(), unix=args.host)
    chars = 0
    try:
        while not stop.is_set():
            try:
                data = s.recv(4096)
            except TimeoutError:
                continue
            if not data:
                emit(event="error", error="the channel closed its socket")
                return 1
            chars += len(data)
            emit(event="text", text=data.decode("utf-8", "replace"))
    finally:
        emit(event="summary", chars=chars)
        s.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m netsvc.lab.usb",
                                 description="A lab consumer of a USB/IP device.")
    ap.add_argument("mode", choices=("keyboard", "bulk", "relay"))
    ap.add_argument("host")
    ap.add_argument("busid")
    ap.add_argument("--port", type=int, default=USBIP_PORT)
    ap.add_argument("--poll", type=float, default=0.3, help="keyboard: URB timeout (s)")
    ap.add_argument("--user-timeout", type=float, default=0.8, help="keyboard: TCP (s)")
    ap.add_argument("--wait-file", help="bulk: open the device once this file exists")
    ap.add_argument("--wait-timeout", type=float, default=120.0)
    ap.add_argument("--seconds", type=float, default=2.0, help="bulk: measure this long")
    ap.add_argument("--urb-size", type=int, default=256 * 1024)
    ap.add_argument("--depth", type=int, default=4)
    args = ap.parse_args(argv)
    emit = _emitter()
    from netsvc.usbip.client import UsbipError

    try:
        if args.mode == "relay":
            return _relay_text(args, emit)
        return _keyboard(args, emit) if args.mode == "keyboard" else _bulk(args, emit)
    except (OSError, UsbipError) as exc:
        emit(event="error", error=f"{type(exc).__name__}: {exc}")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
