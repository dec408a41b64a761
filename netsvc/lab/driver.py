"""The lab's hypervisor driver: one host's agent runs its own host's lab VMs.

A lab VM is a network namespace running the guest (``netsvc.lab.guest``). Its NIC is a bridge
``vnic`` inside that namespace holding the VM's MAC and address; the bridge's ports are veths
named ``plan.vm_port(vm, generation)`` whose peer, ``plan.vif_name(vm)``, sits in the holding
host's namespace, enslaved to the host's virtual switch its record names (``vs0``, ``vs1``).
``LabDriver`` carries out the hypervisor's side of every VM operation with pyroute2 (one
``IPRoute`` per namespace, opened on ``/proc/<pid>/ns/net``), ``mnexec`` (to start a guest
inside its namespace) and packet sockets (gratuitous ARP). The mechanics are those of
``netsvc.lab.lab.Lab``: make-before-break migration with silent and speaking bridge ports,
break-before-make re-cabling on restart.

Where things are is ``netsvc.lab.hvstate``: the inventory (namespace pids) and one record per
VM (host, port generation, address, MAC, state, guest pid), shared with the lab and with the
other hosts' drivers.

Invariants:
- A driver acts only for VMs whose record names its host, except ``migrate_prepare``,
  ``restart`` and ``recable``, which bring a VM here, ``migrate_abort``, which only removes
  what prepare made here, and ``guest_exec``, which starts a program in the VM's namespace for
  this host (a pooled-memory secondary runs on another host than its primary; in the lab every
  copy of a VM lives in the VM's one namespace). Every refusal and failure is a
  ``DriverError`` naming the VM and where it is; nothing else escapes a public method.
- Operations on one VM run one at a time; operations on different VMs run at once (each
  namespace's ``IPRoute`` is called by one thread at a time).
- The record's ``host`` and ``generation`` change in the same locked update that follows the
  switch of the VM's speaking port (handover) or the new cable (restart), so a record never
  names a host the VM is not cabled to for longer than that one step.
- Migration is make before break: the target's prepared port is silent (no learning, no
  flooding) and isolated from the VM's other port, so two cables never loop and nothing is
  forwarded through it before the switch. (What the VM's own stack broadcasts or multicasts
  still leaves through every port, silent or not: a Linux bridge ignores the flood flags for
  its own frames.) A handover that fails before the switch leaves the VM on the source (and
  says so); once the new port speaks, the VM is on the target and the handover reports
  success, with a ``warning`` for what could not be finished.
- A guest is signalled by the pid in its record, after checking that the pid is still a
  live process inside that VM's namespace (or ``mnexec`` entering it), so a reused pid is
  never killed, whoever started the guest. Only guests this driver started are reaped by it;
  guests outlive the driver.
- Gratuitous ARP goes out one port of ``vnic`` (a packet socket bound to it), never through
  ``vnic`` itself: a bridge floods its own broadcasts out of every port.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from netsvc.hypervisor.driver import DomainInfo, DriverError
from netsvc.lab import registry
from netsvc.lab.client import request
from netsvc.lab.garp import announcement, open_sender
from netsvc.lab.hvstate import HvState, HvStateError, Inventory, VmRecord, storage_socket
from netsvc.lab.netns import connector, netns_path, run_in_netns
from netsvc.lab.plan import GUEST_PORT, PREFIX_RE, LabPlan, PlanError, vm_index

__all__ = ["LabDriver", "open_lab_driver", "wait_operstate_up"]

# Bridge-port flags of a VM's NIC ports (as ``netsvc.lab.lab``): a silent port delivers what
# it receives but sends nothing and learns nothing; a speaking port is an ordinary port.
_SILENT = {"learning": 0, "unicast_flood": 0, "bcast_flood": 0, "mcast_flood": 0}
_SPEAKING = {"learning": 1, "unicast_flood": 1, "bcast_flood": 1, "mcast_flood": 1}
# The flood flags above do not stop the VM's own stack: IGMP/MLD reports and IPv6 neighbour
# discovery leave a bridge through every forwarding port whatever its flags, and a port state
# cannot be held at "blocking" on a bridge without STP (the kernel recomputes it). Such a frame
# out of a prepared port teaches the network the target's location early, and the old host
# then drops the VM's traffic (one lost TCP segment: a 200 ms retransmission). So a prepared
# port is *held*: an nftables egress chain on it drops everything until just before the switch.
HOLD_TABLE = "nvhold"
DRAIN_S = 0.05  # how long the old port keeps delivering after the switch
ANNOUNCE_REPEATS = (0.0, 0.005, 0.02, 0.1)  # gratuitous ARP offsets, seconds
GUEST_READY_S = 10.0  # how long a started guest has to answer PING
SHUTDOWN_S = 10.0  # how long a guest has to exit after SIGTERM
KILL_WAIT_S = 5.0  # how long a guest has to disappear after SIGKILL
PORT_UP_S = 2.0  # how long a new cable has to report operstate UP at both ends
_EXEC_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # a guest_exec log's name


def wait_operstate_up(links: list[tuple[Any, int]], timeout: float) -> bool:
    """Poll until every (IPRoute, ifindex) link reports operstate UP; False on timeout."""
    deadline = time.monotonic() + timeout
    pending = list(links)
    while pending:
        ipr, idx = pending[0]
        if ipr.get_links(idx)[0].get_attr("IFLA_OPERSTATE") == "UP":
            pending.pop(0)
            continue
        if time.monotonic() > deadline:
            return False
        time.sleep(0.0002)
    return True


def _ms(t0: float) -> float:
    return round((time.monotonic() - t0) * 1000, 3)


def _proc_state(pid: int) -> str | None:
    """The one-letter state of ``pid`` (``Z`` for a zombie), or None if there is no such pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()[0]


def _netns_id(pid: int) -> tuple[int, int]:
    """The identity (device, inode) of the network namespace of ``pid``; OSError if gone."""
    st = os.stat(netns_path(pid))
    return st.st_dev, st.st_ino


def _is_guest(pid: int | None, ns_pid: int) -> bool:
    """True if ``pid`` is alive (not a zombie) and is a guest of the VM whose namespace is held
    by ``ns_pid``: a process in that namespace other than its holder, or ``mnexec`` on its
    way in (``mnexec -a ns_pid ...``, before its setns). Whatever the guest program is (the
    key-value guest, a pooled-memory guest), and never a reused pid elsewhere."""
    if pid is None or pid <= 0 or pid == ns_pid:
        return False
    try:
        want = _netns_id(ns_pid)
    except OSError:
        return False  # the VM's namespace is gone, and every process in it
    deadline = time.monotonic() + 0.2
    while True:
        state = _proc_state(pid)
        if state is None or state in ("Z", "X"):
            return False
        try:
            if _netns_id(pid) == want:
                return True
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        # A process in the middle of execve(2) shows an empty command line for a few ms.
        if args != [b""] or time.monotonic() > deadline:
            break
        time.sleep(0.001)
    if not args[0].endswith(b"mnexec") or b"-a" not in args:
        return False
    with contextlib.suppress(IndexError):
        return args[args.index(b"-a") + 1] == str(ns_pid).encode()
    return False


class LabDriver:
    """``HypervisorDriver`` for the lab's namespace VMs on host ``host``.

    ``hv_root`` is the lab's hypervisor state (``<run_dir>/hv``); guests' output goes to
    ``log_dir`` (default: ``<run_dir>/logs``, next to ``hv_root``).
    """

    def __init__(self, host: str, hv_root: Path | str, log_dir: Path | str | None = None) -> None:
        self.host = host
        self.state = HvState(hv_root)
        self.log_dir = Path(log_dir) if log_dir is not None else self.state.root.parent / "logs"
        try:
            self._inv = self.state.inventory()
            self.plan = LabPlan(self._inv.prefix, self._inv.hosts_n, self._inv.vms_per_host)
        except Exception as exc:  # HvStateError, PlanError
            raise DriverError(f"lab driver for {host}: {exc}") from None
        if host not in self._inv.host_pids:
            raise DriverError(
                f"no host {host!r} in the lab {self._inv.prefix} "
                f"(hosts: {', '.join(sorted(self._inv.host_pids))})"
            )
        self._lock = threading.RLock()  # the driver's own tables; held only briefly
        self._vm_locks: dict[str, threading.Lock] = {}  # one operation per VM at a time
        self._ipr: dict[int, _Serial] = {}  # namespace pid -> its IPRoute
        self._garp: dict[tuple[str, str], tuple[int, socket.socket]] = {}  # (vm, port) -> ...
        self._loose: set[socket.socket] = set()  # senders owned by announcement threads
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._closed = False

    # --- plumbing ------------------------------------------------------------------------
    @contextlib.contextmanager
    def _op(self, vm: str, what: str, exclusive: bool = True) -> Iterator[None]:
        """One operation: ``exclusive`` ones on the same VM run one at a time (operations on
        different VMs run at once); any failure becomes a DriverError about ``vm``."""
        with self._lock:
            if self._closed:
                raise DriverError(f"{vm}: {what} on {self.host}: the driver is closed")
            self._reap()
            vm_lock = self._vm_locks.setdefault(vm, threading.Lock())
        with vm_lock if exclusive else contextlib.nullcontext():
            try:
                yield
            except DriverError:
                raise
            except Exception as exc:
                where = self._where(vm)
                raise DriverError(
                    f"{vm}: {what} on {self.host} failed: {type(exc).__name__}: {exc} ({where})"
                ) from exc

    def _where(self, vm: str) -> str:
        try:
            rec = self.state.get(vm)
        except Exception:
            return "its record cannot be read"
        return f"the VM is on {rec.host}, {rec.state}"

    def _reap(self) -> None:
        with self._lock:
            for vm, proc in list(self._children.items()):
                if proc.poll() is not None:
                    del self._children[vm]

    def _inventory(self, vm: str | None = None) -> Inventory:
        if vm is not None and vm not in self._inv.vm_pids:
            self._inv = self.state.inventory()  # a VM created after the build (a clone)
        return self._inv

    def _host_pid(self, host: str) -> int:
        pids = self._inventory().host_pids
        if host not in pids:
            raise DriverError(f"no host {host!r} in the lab {self._inv.prefix}")
        return pids[host]

    def _vm_pid(self, vm: str) -> int:
        pids = self._inventory(vm).vm_pids
        if vm not in pids:
            raise DriverError(f"no VM {vm!r} in the lab {self._inv.prefix}")
        return pids[vm]

    def _alive(self, pid: int | None, vm: str) -> bool:
        """True if ``pid`` is a live guest of ``vm`` (see ``_is_guest``)."""
        return _is_guest(pid, self._vm_pid(vm))

    def _record(self, vm: str) -> VmRecord:
        try:
            vm_index(vm)
        except PlanError as exc:
            raise DriverError(str(exc)) from None
        self._vm_pid(vm)
        return self.state.get(vm)

    def _here(self, vm: str, what: str) -> VmRecord:
        """The record of ``vm``, which must be on this host."""
        rec = self._record(vm)
        if rec.host != self.host:
            raise DriverError(f"cannot {what} {vm} on {self.host}: it is on {rec.host}")
        return rec

    def _ipr_of(self, pid: int) -> Any:
        """The IPRoute of the network namespace of ``pid`` (ours: a plain IPRoute)."""
        from pyroute2 import IPRoute

        with self._lock:
            if pid not in self._ipr:
                # flags=0: never let pyroute2 create a namespace that is not there
                self._ipr[pid] = _Serial(
                    IPRoute() if _same_netns(pid) else IPRoute(netns=netns_path(pid), flags=0)
                )
            return self._ipr[pid]

    def _nft(self, vm: str, script: str) -> None:
        """Run an nftables script inside ``vm``'s namespace."""
        r = subprocess.run(["mnexec", "-a", str(self._vm_pid(vm)), "nft", "-f", "-"],
                           input=script, capture_output=True, text=True, timeout=10)
        if r.returncode != 0:
            raise DriverError(f"{vm}: nft failed: {r.stderr.strip()[:200]}")

    def _hold(self, vm: str, port: str) -> None:
        """Drop everything ``vm``'s stack sends out of ``port`` (see ``HOLD_TABLE``). A chain
        left by an earlier port of the same name is replaced."""
        self._release(vm, port)
        self._nft(vm, f"table netdev {HOLD_TABLE} {{\n chain {port.replace('-', '_')} {{\n"
                      f"  type filter hook egress device \"{port}\" priority 0; policy drop;\n"
                      " }\n}\n")

    def _release(self, vm: str, port: str) -> None:
        """Let ``port`` send again (no error if it was not held)."""
        chain = port.replace("-", "_")
        with contextlib.suppress(DriverError):
            self._nft(vm, f"delete chain netdev {HOLD_TABLE} {chain}\n")

    def warm(self) -> None:
        """Do the slow first steps now, so the first action an agent carries out does not pay
        for them: import pyroute2, open this host's namespace and every VM's (about 10 ms
        each), and open a GARP sender on the current port of each VM held here."""
        with self._op("the lab VMs", "warm up"):
            self._host_ipr()
            for vm in self._inventory().vm_pids:
                with contextlib.suppress(Exception):
                    self._vm_ipr(vm)
            for rec in self.state.all().values():
                if rec.host == self.host:
                    with contextlib.suppress(Exception):
                        self._sender(rec.name, self.plan.vm_port(rec.name, rec.generation))

    def _host_ipr(self, host: str | None = None) -> Any:
        return self._ipr_of(self._host_pid(host or self.host))

    def _vm_ipr(self, vm: str) -> Any:
        return self._ipr_of(self._vm_pid(vm))

    @staticmethod
    def _lookup(ipr: Any, ifname: str) -> int | None:
        idx = ipr.link_lookup(ifname=ifname)
        return int(idx[0]) if idx else None

    def _index(self, ipr: Any, ifname: str, where: str) -> int:
        idx = self._lookup(ipr, ifname)
        if idx is None:
            raise DriverError(f"interface {ifname} not found in {where}")
        return idx

    # --- gratuitous ARP --------------------------------------------------------------------
    def _open_sender(self, vm: str, port: str) -> tuple[int, socket.socket]:
        idx = self._index(self._vm_ipr(vm), port, f"{vm}'s namespace")
        return idx, run_in_netns(self._vm_pid(vm), lambda: open_sender(port))

    def _sender(self, vm: str, port: str) -> socket.socket:
        """A cached sender on ``vm``'s ``port``; reopened if the port was re-made since (the
        names alternate between generations, and another host's driver may have deleted it)."""
        idx = self._index(self._vm_ipr(vm), port, f"{vm}'s namespace")
        with self._lock:
            cached = self._garp.get((vm, port))
        if cached is not None and cached[0] == idx:
            return cached[1]
        self._drop_sender(vm, port)
        entry = self._open_sender(vm, port)
        with self._lock:
            self._garp[(vm, port)] = entry
        return entry[1]

    def _drop_sender(self, vm: str, port: str) -> None:
        with self._lock:
            cached = self._garp.pop((vm, port), None)
        if cached is not None:
            cached[1].close()

    def _send_announcements(
        self, sock: socket.socket, frame: bytes, repeats: tuple[float, ...], owned: bool
    ) -> None:
        """Send ``frame`` now, and at the later offsets of ``repeats`` from a thread. An
        ``owned`` socket is closed once the last one is sent."""
        sock.send(frame)
        if len(repeats) <= 1:
            if owned:
                sock.close()
            return
        if owned:
            self._loose.add(sock)

        def later() -> None:
            start = time.monotonic()
            try:
                for offset in repeats[1:]:
                    time.sleep(max(0.0, start + offset - time.monotonic()))
                    with contextlib.suppress(OSError):
                        sock.send(frame)
            finally:
                if owned:
                    self._loose.discard(sock)
                    sock.close()

        threading.Thread(target=later, name="garp-repeats", daemon=True).start()

    def _announce(self, rec: VmRecord, repeats: tuple[float, ...] = ANNOUNCE_REPEATS) -> None:
        port = self.plan.vm_port(rec.name, rec.generation)
        self._send_announcements(
            self._sender(rec.name, port), announcement(rec.mac, rec.ip), repeats, owned=False
        )

    # --- guests ----------------------------------------------------------------------------
    def _spawn_guest(self, vm: str) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env[registry.ENV_MARKER] = self._inv.prefix  # teardown and `lab clean` find it
        argv = [sys.executable, "-m", "netsvc.lab.guest", "--name", vm, "--port", str(GUEST_PORT)]
        rec = self.state.get(vm)
        if rec.datastore:
            argv += ["--datastore", rec.datastore]
        elif rec.disk:
            argv += ["--disk", self._disk_uri(rec.disk), "--control", str(self._control(vm))]
            if rec.disk_region:
                argv += ["--disk-region", rec.disk_region]
        with open(self.log_dir / f"guest-{vm}.log", "ab") as log:
            proc = subprocess.Popen(
                ["mnexec", "-a", str(self._vm_pid(vm)), *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        with self._lock:
            self._children[vm] = proc
        return proc

    # --- disks --------------------------------------------------------------------------
    def _disk_uri(self, export: str, host: str | None = None) -> str:
        """``export`` through ``host``'s (default: this host's) local storage endpoint."""
        return f"nbd+unix:///{export}?socket={storage_socket(self.state.root, host or self.host)}"

    def _control(self, vm: str) -> Path:
        return self.state.vms_dir / f"{vm}.ctl"

    def _check_disk(self, rec: VmRecord) -> None:
        """Refuse to take ``rec`` here unless this host's endpoint serves its disk (as a
        migration's target must open the same datastore)."""
        if not rec.disk:
            return
        try:
            import nbd  # type: ignore[import-untyped]

            h = nbd.NBD()
            h.set_export_name(rec.disk)
            h.connect_unix(str(storage_socket(self.state.root, self.host)))
            size = int(h.get_size())
            h.shutdown()
        except Exception as exc:  # ImportError, nbd.Error
            raise DriverError(f"{rec.name}'s disk {rec.disk} is not served on {self.host}: "
                              f"{exc}") from None
        from netsvc.lab.disklog import DiskError, parse_region

        try:
            off, length = parse_region(rec.disk_region or "0:1048576")
        except DiskError as exc:
            raise DriverError(f"{rec.name}: {exc}") from None
        if off + length > size:
            raise DriverError(f"{rec.name}'s disk region {rec.disk_region} is past the end of "
                              f"{rec.disk} ({size} bytes) on {self.host}")

    def _disk_back(self, vm: str, export: str) -> str:
        """Ask ``vm``'s guest to have its disk through this host's endpoint again (a failed
        handover); "" if it did, else what went wrong, for the error."""
        try:
            self._guest_control(vm, f"DISK {self._disk_uri(export)}", timeout=40.0)
        except DriverError as exc:
            return f"; and its disk could not be brought back to {self.host}: {exc}"
        return ""

    def _guest_control(self, vm: str, line: str, timeout: float = 10.0) -> str:
        """One line to ``vm``'s guest over its control socket (the hypervisor's channel to
        the guest, as QMP is to qemu), and its answer; ``DriverError`` unless it is OK."""
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(timeout)
                s.connect(str(self._control(vm)))
                s.sendall(line.encode() + b"\n")
                reply = s.makefile("rb").readline().decode(errors="replace").strip()
        except OSError as exc:
            raise DriverError(f"{vm}'s guest control: {exc}") from None
        if not reply.startswith("OK"):
            raise DriverError(f"{vm}'s guest refused {line.split()[0]}: {reply or 'no answer'}")
        return reply

    def _wait_guest(
        self, vm: str, ip: str, proc: subprocess.Popen[bytes], timeout: float = GUEST_READY_S
    ) -> None:
        """Wait until ``vm``'s guest answers PING on ``ip`` from inside the VM's namespace."""
        conn = connector(self._vm_pid(vm))
        deadline = time.monotonic() + timeout
        while True:
            try:
                reply = request(lambda: conn(ip, GUEST_PORT, 0.5), "PING", timeout=1.0)
                if reply.startswith(f"PONG {vm} "):
                    return
                raise DriverError(f"{vm}'s guest answered {reply!r} on {self.host}")
            except OSError:
                pass
            if proc.poll() is not None:
                raise DriverError(
                    f"{vm}'s guest (pid {proc.pid}) exited with {proc.returncode} on "
                    f"{self.host}; see "
                    f"{self.log_dir}/guest-{vm}.log"
                )
            if time.monotonic() > deadline:
                raise DriverError(
                    f"{vm}'s guest did not answer within {timeout:.0f} s on {self.host}"
                )
            time.sleep(0.02)

    def _start_guest(self, rec: VmRecord) -> dict[str, float]:
        """Start ``rec``'s guest, record it running, and wait until it answers."""
        vm = rec.name
        steps: dict[str, float] = {}
        t = time.monotonic()
        proc = self._spawn_guest(vm)
        rec = self.state.update(vm, lambda r: r.with_(state="running", guest_pid=proc.pid))
        steps["spawn"], t = _ms(t), time.monotonic()
        try:
            self._wait_guest(vm, rec.ip, proc)
        except BaseException:
            self._end_guest(vm, proc.pid, signal.SIGKILL, KILL_WAIT_S)
            self.state.update(vm, lambda r: r.with_(state="stopped", guest_pid=None))
            raise
        steps["ready"] = _ms(t)
        return steps

    def _end_guest(self, vm: str, pid: int | None, sig: int, wait: float) -> bool:
        """Signal ``vm``'s guest ``pid`` (if it still is that guest) and wait up to ``wait``
        seconds for it to be gone; True if it is."""
        if not self._alive(pid, vm):
            return True
        assert pid is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        with self._lock:
            child = self._children.get(vm)
        if child is not None and child.pid == pid:
            try:
                child.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                return False
            with self._lock:
                self._children.pop(vm, None)
            return True
        deadline = time.monotonic() + wait
        while self._alive(pid, vm):  # not ours: its parent reaps it; a zombie counts as gone
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    # --- the VMs' NIC configuration ---------------------------------------------------------
    def vm_switches(self, vm: str) -> list[str]:
        """The host switches ``vm``'s NICs use (its configuration, wherever it runs)."""
        try:
            return [self.state.get(vm).switch]
        except HvStateError as exc:
            raise DriverError(f"no VM {vm!r} in this lab: {exc}") from None

    def vm_of_port(self, ifname: str) -> str | None:
        """The VM whose host-side port (``plan.vif_name``) is ``ifname``, or None."""
        m = re.fullmatch(rf"{re.escape(self.plan.prefix)}v([0-9]+)-vif", ifname)
        return f"vm{int(m.group(1))}" if m else None

    # --- HypervisorDriver ------------------------------------------------------------------
    def list(self) -> list[DomainInfo]:
        """The VMs whose record puts them on this host; running only if the guest lives."""
        with self._op("the lab VMs", "list", exclusive=False):
            out = []
            for rec in self.state.all().values():
                if rec.host != self.host:
                    continue
                state = rec.state
                if state == "running" and not (
                    rec.name in self._inventory(rec.name).vm_pids
                    and self._alive(rec.guest_pid, rec.name)
                ):
                    state = "crashed"
                out.append(DomainInfo(rec.name, state, rec.mac, rec.ip))
            return out

    def start(self, vm: str) -> dict[str, Any]:
        """Boot ``vm``'s guest here (its NIC must be cabled here) and announce it once."""
        with self._op(vm, "start"):
            rec = self._here(vm, "start")
            if self._alive(rec.guest_pid, vm):
                raise DriverError(f"{vm} is already running on {self.host} (pid {rec.guest_pid})")
            port = self.plan.vm_port(vm, rec.generation)
            self._index(self._vm_ipr(vm), port, f"{vm}'s namespace")
            steps = self._start_guest(rec)
            rec = self.state.get(vm)
            t = time.monotonic()
            self._announce(rec, repeats=(0.0,))  # as a booting guest does (arp_notify)
            steps["announce"] = _ms(t)
            return {"vm": vm, "host": self.host, "pid": rec.guest_pid, "steps_ms": steps}

    def shutdown(self, vm: str) -> dict[str, Any]:
        """SIGTERM the guest and wait (bounded) until it has exited."""
        with self._op(vm, "shutdown"):
            return self._stop(vm, "shutdown", SHUTDOWN_S, force=False)

    def stop(self, vm: str, timeout: float = 10.0) -> dict[str, Any]:
        """SIGTERM the guest; SIGKILL it if it has not exited after ``timeout`` seconds."""
        with self._op(vm, "stop"):
            return self._stop(vm, "stop", timeout, force=True)

    def power_off(self, vm: str) -> dict[str, Any]:
        """SIGKILL the guest: it stops at once and its state is lost."""
        with self._op(vm, "power off"):
            rec = self._here(vm, "power off")
            t = time.monotonic()
            alive = self._alive(rec.guest_pid, vm)
            if alive and not self._end_guest(vm, rec.guest_pid, signal.SIGKILL, KILL_WAIT_S):
                raise DriverError(
                    f"{vm}'s guest (pid {rec.guest_pid}) survived SIGKILL on {self.host}"
                )
            self.state.update(vm, lambda r: r.with_(state="stopped", guest_pid=None))
            return {"vm": vm, "host": self.host, "was_running": alive, "steps_ms": {"kill": _ms(t)}}

    def _stop(self, vm: str, what: str, timeout: float, force: bool) -> dict[str, Any]:
        rec = self._here(vm, what)
        if rec.state != "running":
            raise DriverError(f"{vm} is not running on {self.host} (state {rec.state})")
        t = time.monotonic()
        alive = self._alive(rec.guest_pid, vm)
        killed = False
        if alive and not self._end_guest(vm, rec.guest_pid, signal.SIGTERM, timeout):
            if not force:
                raise DriverError(
                    f"{vm}'s guest (pid {rec.guest_pid}) did not exit within {timeout:.0f} s "
                    f"of SIGTERM on {self.host}; it is still running"
                )
            killed = True
            if not self._end_guest(vm, rec.guest_pid, signal.SIGKILL, KILL_WAIT_S):
                raise DriverError(
                    f"{vm}'s guest (pid {rec.guest_pid}) survived SIGKILL on {self.host}"
                )
        self.state.update(vm, lambda r: r.with_(state="stopped", guest_pid=None))
        return {
            "vm": vm,
            "host": self.host,
            "was_running": alive,
            "killed": killed,
            "steps_ms": {what: _ms(t)},
        }

    def restart(self, vm: str, from_host: str | None) -> dict[str, Any]:
        """Re-cable ``vm``'s NIC to this host (break before make), start a fresh guest and
        announce it. Refused while its guest is alive."""
        with self._op(vm, "restart"):
            rec = self._record(vm)
            if self._alive(rec.guest_pid, vm):
                raise DriverError(
                    f"{vm} is running on {rec.host} (pid {rec.guest_pid}); "
                    "restarting it would run it twice"
                )
            if from_host is not None and rec.host not in (from_host, self.host):
                raise DriverError(f"{vm} is on {rec.host}, not on {from_host}")
            steps: dict[str, float] = {}
            t = time.monotonic()
            rec = self._recable(rec)
            steps["recable"] = _ms(t)
            steps.update(self._start_guest(rec))
            t = time.monotonic()
            rec = self.state.get(vm)
            self._announce(rec)
            steps["announce"] = _ms(t)
            return {
                "vm": vm,
                "host": self.host,
                "from": from_host,
                "pid": rec.guest_pid,
                "generation": rec.generation,
                "steps_ms": steps,
            }

    def recable(self, vm: str) -> dict[str, Any]:
        """Cable ``vm``'s NIC to this host's switch (its record's) at once (break before make)
        and announce it, whatever runs in the VM: for a VM whose host is gone and whose guest
        is started by someone else (a pooled-memory guest). A live VM moves with the migration."""
        with self._op(vm, "recable"):
            rec = self._record(vm)
            t = time.monotonic()
            rec = self._recable(rec)
            steps = {"recable": _ms(t)}
            t = time.monotonic()
            self._announce(rec)
            steps["announce"] = _ms(t)
            return {"vm": vm, "host": self.host, "generation": rec.generation, "steps_ms": steps}

    def guest_exec(self, vm: str, argv: Sequence[str], name: str) -> int:
        """Start ``argv`` inside ``vm``'s namespace, as the qemu guest agent's ``guest-exec``
        does, and return its pid without waiting for it. Its output is appended to
        ``<log_dir>/<name>.log``; it runs in a session of its own with this process's
        environment (the lab's marker kept, so teardown finds it). The driver keeps it to reap
        it; the caller records what it is (a hypervisor record, a file) so it can be found."""
        if not _EXEC_NAME.fullmatch(name):
            raise DriverError(f"{vm}: bad log name {name!r} for guest-exec (letters, digits "
                              "and ._- only)")
        with self._op(vm, "run a program in"):
            ns_pid = self._vm_pid(vm)
            self.log_dir.mkdir(parents=True, exist_ok=True)
            env = dict(os.environ)
            env[registry.ENV_MARKER] = self._inv.prefix  # teardown and `lab clean` find it
            with open(self.log_dir / f"{name}.log", "ab") as log:
                proc = subprocess.Popen(
                    ["mnexec", "-a", str(ns_pid), *argv],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            with self._lock:
                self._children[f"exec:{name}:{proc.pid}"] = proc  # reaped with the guests
            return proc.pid

    def _recable(self, rec: VmRecord) -> VmRecord:
        """Move ``rec``'s NIC to this host's switch at once (break before make: for a VM whose
        guest is dead). Its namespace and address stay; nothing is announced."""
        vm = rec.name
        old_port = self.plan.vm_port(vm, rec.generation)
        new_port = self.plan.vm_port(vm, rec.generation + 1)
        vif = self.plan.vif_name(vm)
        vm_ipr, host_ipr = self._vm_ipr(vm), self._host_ipr()
        for port in (old_port, new_port):  # the old cable, and any prepared, never used one
            self._drop_sender(vm, port)
            idx = self._lookup(vm_ipr, port)
            if idx is not None:
                vm_ipr.link("del", index=idx)
        stale = self._lookup(host_ipr, vif)
        if stale is not None:
            host_ipr.link("del", index=stale)
        vm_ipr.link(
            "add",
            ifname=new_port,
            kind="veth",
            peer={"ifname": vif, "net_ns_pid": self._host_pid(self.host)},
        )
        new_idx = self._index(vm_ipr, new_port, f"{vm}'s namespace")
        vm_ipr.link("set", index=new_idx, master=self._index(vm_ipr, "vnic", f"{vm}'s namespace"))
        vm_ipr.brport("set", index=new_idx, isolated=1, **_SPEAKING)
        host_vif = self._index(host_ipr, vif, f"{self.host}'s namespace")
        host_ipr.link(
            "set",
            index=host_vif,
            master=self._index(host_ipr, rec.switch, f"{self.host}'s namespace"),
            state="up",
        )
        vm_ipr.link("set", index=new_idx, state="up")
        if not wait_operstate_up([(vm_ipr, new_idx), (host_ipr, host_vif)], timeout=PORT_UP_S):
            raise DriverError(f"the new port of {vm} on {self.host} did not come up")
        return self.state.update(
            vm, lambda r: r.with_(host=self.host, generation=rec.generation + 1)
        )

    def migrate_prepare(self, vm: str, source: str) -> dict[str, Any]:
        """Target side: cable ``vm``'s NIC to this host's switch with a new port that is up,
        silent and isolated. The VM still runs on ``source``."""
        with self._op(vm, "prepare the migration of"):
            rec = self._record(vm)
            if source == self.host:
                raise DriverError(f"{vm} cannot migrate from {source} to itself")
            if rec.host != source:
                raise DriverError(f"{vm} is on {rec.host}, not on {source}")
            if rec.state != "running" or not self._alive(rec.guest_pid, vm):
                raise DriverError(f"{vm} is not running on {source} (state {rec.state})")
            self._check_disk(rec)  # the target must open the same datastore
            generation = rec.generation + 1
            new_port = self.plan.vm_port(vm, generation)
            vif = self.plan.vif_name(vm)
            vm_ipr, host_ipr = self._vm_ipr(vm), self._host_ipr()
            steps: dict[str, float] = {}
            t = time.monotonic()
            # Leftovers of a prepare that was never handed over nor aborted.
            self._drop_sender(vm, new_port)
            stale = self._lookup(vm_ipr, new_port)
            if stale is not None:
                vm_ipr.link("del", index=stale)
            stale = self._lookup(host_ipr, vif)
            if stale is not None:
                host_ipr.link("del", index=stale)
            steps["clean"], t = _ms(t), time.monotonic()
            try:
                vm_ipr.link(
                    "add",
                    ifname=new_port,
                    kind="veth",
                    peer={"ifname": vif, "net_ns_pid": self._host_pid(self.host)},
                )
                vnic = self._index(vm_ipr, "vnic", f"{vm}'s namespace")
                new_idx = self._index(vm_ipr, new_port, f"{vm}'s namespace")
                vm_ipr.link("set", index=new_idx, master=vnic)
                vm_ipr.brport("set", index=new_idx, isolated=1, **_SILENT)
                self._hold(vm, new_port)
                host_vif = self._index(host_ipr, vif, f"{self.host}'s namespace")
                vswitch = self._index(host_ipr, rec.switch, f"{self.host}'s namespace")
                host_ipr.link("set", index=host_vif, master=vswitch, state="up")
                vm_ipr.link("set", index=new_idx, state="up")
                steps["make"], t = _ms(t), time.monotonic()
                # The kernel enables a bridge port from its link-watch work, right after it
                # sets the port's operstate to UP; wait for that on both ends.
                if not wait_operstate_up(
                    [(vm_ipr, new_idx), (host_ipr, host_vif)], timeout=PORT_UP_S
                ):
                    raise DriverError(f"the new port of {vm} on {self.host} did not come up")
                steps["up"] = _ms(t)
            except Exception as exc:
                with contextlib.suppress(Exception):
                    idx = self._lookup(vm_ipr, new_port)
                    if idx is not None:
                        vm_ipr.link("del", index=idx)
                raise DriverError(
                    f"{vm}: prepare on {self.host} failed, the VM is still on {source}: {exc}"
                ) from exc
            return {
                "port": new_port,
                "generation": generation,
                "target": self.host,
                "steps_ms": steps,
            }

    def migrate_handover(self, vm: str, target: str, token: Mapping[str, Any]) -> dict[str, Any]:
        """Source side: switch ``vm`` to the port ``token`` names (it speaks, the old one goes
        silent), record the VM on ``target``, announce it there, let the old port drain for
        ``DRAIN_S`` and delete it."""
        with self._op(vm, "hand over"):
            rec = self._here(vm, "hand over")
            if target == self.host:
                raise DriverError(f"{vm} is already on {target}")
            if rec.state != "running" or not self._alive(rec.guest_pid, vm):
                raise DriverError(f"{vm} is not running on {self.host} (state {rec.state})")
            generation = rec.generation + 1
            new_port = self.plan.vm_port(vm, generation)
            old_port = self.plan.vm_port(vm, rec.generation)
            if token.get("port") != new_port or token.get("generation") != generation:
                raise DriverError(
                    f"{vm}: the token {dict(token)} is not for generation {generation} "
                    f"({new_port}); the VM is still on {self.host}"
                )
            steps: dict[str, float] = {}
            t = time.monotonic()
            vm_ipr = self._vm_ipr(vm)
            try:
                new_idx = self._index(vm_ipr, new_port, f"{vm}'s namespace")
                old_idx = self._index(vm_ipr, old_port, f"{vm}'s namespace")
                oper = vm_ipr.get_links(new_idx)[0].get_attr("IFLA_OPERSTATE")
                if oper != "UP":
                    raise DriverError(f"the prepared port {new_port} is {oper}, not UP")
                # Open the sender before the switch: entering a namespace takes time.
                _, sock = self._open_sender(vm, new_port)
            except Exception as exc:
                raise DriverError(
                    f"{vm}: handover to {target} failed before the switch, the VM is still on "
                    f"{self.host}: {exc}"
                ) from exc
            frame = announcement(rec.mac, rec.ip)
            steps["ready"], t = _ms(t), time.monotonic()
            if rec.disk:
                # The disk goes first: the guest reopens it through the target's endpoint
                # (its requests wait meanwhile); a refusal leaves it all here. A timeout may
                # hide a reopen that still happened: the disk is asked back here then.
                try:
                    self._guest_control(vm, f"DISK {self._disk_uri(rec.disk, target)}")
                except DriverError as exc:
                    sock.close()
                    back = self._disk_back(vm, rec.disk)
                    raise DriverError(f"{vm}: handover to {target} failed at the disk, the VM "
                                      f"is still on {self.host}: {exc}{back}") from exc
                steps["disk"] = _ms(t)
            # Switch: the VM now sends only through the new port; the old port still delivers
            # what is in flight towards this host, so nothing is dropped.
            self._release(vm, new_port)  # the new port may send from here on (it is silent)
            t0 = time.monotonic()
            try:
                vm_ipr.brport("set", index=new_idx, **_SPEAKING)
            except Exception as exc:
                sock.close()
                with contextlib.suppress(Exception):
                    vm_ipr.brport("set", index=new_idx, **_SILENT)
                    self._hold(vm, new_port)
                back = self._disk_back(vm, rec.disk) if rec.disk else ""
                raise DriverError(
                    f"{vm}: handover to {target} failed at the switch, the VM is still on "
                    f"{self.host}: {exc}{back}"
                ) from exc
            warnings: list[str] = []
            try:
                vm_ipr.brport("set", index=old_idx, **_SILENT)
                vm_ipr.brport("set", index=old_idx, flush=True)
            except Exception as exc:
                warnings.append(f"silencing the old port {old_port}: {exc}")
            steps["switch"], t = _ms(t0), time.monotonic()
            try:
                self.state.update(vm, lambda r: r.with_(host=target, generation=generation))
            except Exception as exc:
                try:
                    self.state.update(vm, lambda r: r.with_(host=target, generation=generation))
                except Exception:
                    warnings.append(f"the record still says {self.host}: {exc}")
            steps["record"], t = _ms(t), time.monotonic()
            try:
                self._send_announcements(sock, frame, ANNOUNCE_REPEATS, owned=True)
            except Exception as exc:
                warnings.append(f"announce: {exc}")
                sock.close()
            switch_ms = _ms(t0)
            steps["announce"], t = _ms(t), time.monotonic()
            # Break: once the network has learned the new place, drop the old cable.
            time.sleep(DRAIN_S)
            steps["drain"], t = _ms(t), time.monotonic()
            self._drop_sender(vm, old_port)
            self._drop_sender(vm, new_port)  # the target announces it from now on
            try:
                vm_ipr.link("del", index=old_idx)
            except Exception as exc:
                warnings.append(f"deleting the old port {old_port}: {exc}")
            steps["break"] = _ms(t)
            out: dict[str, Any] = {
                "vm": vm,
                "source": self.host,
                "target": target,
                "generation": generation,
                "switch_ms": switch_ms,
                "steps_ms": steps,
            }
            if warnings:
                out["warning"] = f"{vm} is on {target}, but: " + "; ".join(warnings)
            return out

    def migrate_abort(self, vm: str, token: Mapping[str, Any]) -> dict[str, Any]:
        """Target side: delete the port prepare made, unless the VM moved here after all."""
        with self._op(vm, "abort the migration of"):
            rec = self._record(vm)
            port = token.get("port")
            if rec.host == self.host:
                return {"vm": vm, "deleted": False, "reason": f"{vm} is on {self.host}"}
            if not isinstance(port, str) or port not in (
                self.plan.vm_port(vm, 0),
                self.plan.vm_port(vm, 1),
            ):
                raise DriverError(f"{vm}: the token {dict(token)} names no port of {vm}")
            if port == self.plan.vm_port(vm, rec.generation):
                return {
                    "vm": vm,
                    "deleted": False,
                    "reason": f"{port} is {vm}'s port on {rec.host} now",
                }
            t = time.monotonic()
            vm_ipr, host_ipr = self._vm_ipr(vm), self._host_ipr()
            self._drop_sender(vm, port)
            deleted = False
            idx = self._lookup(vm_ipr, port)
            if idx is not None:
                vm_ipr.link("del", index=idx)
                self._release(vm, port)
                deleted = True
            vif = self._lookup(host_ipr, self.plan.vif_name(vm))
            if vif is not None:  # normally gone with its peer
                host_ipr.link("del", index=vif)
            return {"vm": vm, "deleted": deleted, "steps_ms": {"delete": _ms(t)}}

    def detach_nic(self, vm: str) -> dict[str, Any]:
        """Set this host's end of the VM's cable down; the guest keeps running."""
        return self._set_nic(vm, up=False)

    def attach_nic(self, vm: str) -> dict[str, Any]:
        """Set this host's end of the VM's cable up and wait until it forwards."""
        return self._set_nic(vm, up=True)

    def _set_nic(self, vm: str, up: bool) -> dict[str, Any]:
        what = "attach the NIC of" if up else "detach the NIC of"
        with self._op(vm, what):
            self._here(vm, what)
            host_ipr = self._host_ipr()
            t = time.monotonic()
            vif = self._index(host_ipr, self.plan.vif_name(vm), f"{self.host}'s namespace")
            host_ipr.link("set", index=vif, state="up" if up else "down")
            if up and not wait_operstate_up([(host_ipr, vif)], timeout=PORT_UP_S):
                raise DriverError(f"{vm}'s NIC on {self.host} did not come up")
            return {"vm": vm, "steps_ms": {"attach" if up else "detach": _ms(t)}}

    def readdress(
        self, vm: str, old_ip: str, new_ip: str, prefixlen: int, gateway: str | None
    ) -> dict[str, Any]:
        """Inside the VM's namespace: drop ``old_ip`` from ``vnic``, add ``new_ip``, and put the
        default route back (via ``gateway``, or the one it had). Nothing is announced."""
        with self._op(vm, "readdress"):
            self._here(vm, "readdress")
            vm_ipr = self._vm_ipr(vm)
            t = time.monotonic()
            vnic = self._index(vm_ipr, "vnic", f"{vm}'s namespace")
            have = [
                a.get_attr("IFA_ADDRESS")
                for a in vm_ipr.get_addr(family=socket.AF_INET, index=vnic)
            ]
            if gateway is None:
                gateway = next(
                    (
                        r.get_attr("RTA_GATEWAY")
                        for r in vm_ipr.get_default_routes(family=socket.AF_INET)
                        if r.get_attr("RTA_GATEWAY")
                    ),
                    None,
                )
            if old_ip not in have and new_ip not in have and have:
                raise DriverError(f"{vm}'s vnic holds {have}, not {old_ip}")
            # Old first: a second address in the same subnet would be a secondary one, which
            # the kernel deletes together with the primary.
            if old_ip in have and old_ip != new_ip:
                vm_ipr.addr("del", index=vnic, address=old_ip, prefixlen=prefixlen)
            if new_ip not in have:
                vm_ipr.addr("add", index=vnic, address=new_ip, prefixlen=prefixlen)
            if gateway is not None:
                vm_ipr.route("replace", dst="0.0.0.0/0", gateway=gateway, oif=vnic)
            self.state.update(vm, lambda r: r.with_(ip=new_ip))
            return {
                "vm": vm,
                "old_ip": old_ip,
                "new_ip": new_ip,
                "gateway": gateway,
                "steps_ms": {"configure": _ms(t)},
            }

    def announce(self, vm: str) -> dict[str, Any]:
        """Gratuitous ARP for the VM's (MAC, address) out of its current port, now and at
        5, 20 and 100 ms (from a thread)."""
        with self._op(vm, "announce"):
            rec = self._here(vm, "announce")
            t = time.monotonic()
            self._announce(rec)
            return {
                "vm": vm,
                "ip": rec.ip,
                "mac": rec.mac,
                "port": self.plan.vm_port(vm, rec.generation),
                "steps_ms": {"announce": _ms(t)},
            }

    def close(self) -> None:
        """Close netlink and packet sockets; reap exited guests. Running guests stay up."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._reap()
            for _, sock in self._garp.values():
                sock.close()
            self._garp.clear()
            for sock in list(self._loose):
                sock.close()
            for ipr in self._ipr.values():
                with contextlib.suppress(Exception):
                    ipr.close()
            self._ipr.clear()

    def __enter__(self) -> LabDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Serial:
    """One IPRoute, called by one thread at a time (operations on different VMs share the
    host's namespace)."""

    def __init__(self, ipr: Any) -> None:
        self._ipr = ipr
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._ipr, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return attr(*args, **kwargs)

        return call


def _same_netns(pid: int) -> bool:
    """True if ``pid`` lives in our own network namespace."""
    a, b = os.stat(netns_path(pid)), os.stat("/proc/self/ns/net")
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def open_lab_driver(host: str, spec: str) -> LabDriver:
    """Open the lab driver for ``host`` from a driver spec.

    ``lab`` (or an empty rest): the run named by ``NETSVC_LAB_PREFIX`` in our environment;
    ``lab:nvXY``: the run with that prefix; ``lab:/path/to/hv`` (or just a path): that
    hypervisor-state directory. Guests log to ``logs`` next to it.
    """
    spec = spec.strip()
    rest = "" if spec == "lab" else spec[4:] if spec.startswith("lab:") else spec
    if not rest:
        prefix = os.environ.get(registry.ENV_MARKER, "")
        if not PREFIX_RE.match(prefix):
            raise DriverError(
                f"driver spec {spec!r} names no lab run and {registry.ENV_MARKER} is not set"
            )
        root = registry.run_dir(prefix) / "hv"
    elif PREFIX_RE.match(rest) and not Path(rest).exists():
        root = registry.run_dir(rest) / "hv"
    else:
        root = Path(rest)
    if not (root / "inventory.json").is_file():
        raise DriverError(f"no lab hypervisor state at {root} (driver spec {spec!r})")
    return LabDriver(host, root)
