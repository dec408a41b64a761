"""The power lab's small distributed datastore (netsvc.power): off unless a scenario builds it.

For each host ``hN``:

- its **first storage resource**: nbdkit (``file`` plugin) in the host's own namespace, on
  port ``FIRST_PORT`` of its storage addresses, serving disk ``dN``. Its role ends in
  ``-hN``, so it dies when the host crashes or is powered off; the lab's ``after_power_on``
  hook starts it again over the same directory (the host's local disk keeps its data);
- its **second storage resource**: nbdkit in a namespace of its own, ``smN`` (the always-on
  storage module), added at run time with one leg on each storage fabric (198.18.2.(60+N),
  198.18.3.(60+N)), on ``SECOND_PORT``. It stays up while the host is off.

Disk ``dN`` (whose data lives on ``hN``) is served to its VM by another host's agent, its
*reader*: ``h2`` for ``d1``, ``h1`` for the others at the start (``--power-disk``); every
other host but the owner declares it can serve it too (``--power-disk-standby``), so the
manager can move the reader with the disk's VMs. So a VM's data lives on a host other than
the one that runs the VM (the readers serve the disks over their ``--power-socket``, at the
host's local storage endpoint: a lab VM given a region of ``dN`` with ``Lab.set_disk`` and
running on ``dN``'s reader keeps its writes there).

Invariants: every name starts with the run's prefix (``<prefix>smN``, ``<prefix>smN-a``);
every process is started with ``lab.popen`` (tracked, ended by id at teardown); nodes added
here are Mininet hosts of the run's net, removed with it.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from netsvc.lab.plan import LabPlan, host_index

if TYPE_CHECKING:
    from netsvc.lab.lab import Lab

FIRST_PORT = 10810
SECOND_PORT = 10811
MODULE_BASE = 60


def disk_of(host: str) -> str:
    return f"d{host_index(host)}"


def reader_of(host: str) -> str:
    return "h2" if host == "h1" else "h1"


def module_addr(host: str, fabric: str) -> str:
    net = {"storage-a": 2, "storage-b": 3}[fabric]
    return f"198.18.{net}.{MODULE_BASE + host_index(host)}"


def _dir(plan: LabPlan) -> Path:
    from netsvc.lab.registry import run_dir

    return run_dir(plan.prefix) / "power"


def socket_path(plan: LabPlan, host: str) -> str:
    """Where a reader's agent serves its power disks (``--power-socket``): the host's local
    storage endpoint, where the lab's hypervisor points a guest's ``--disk`` (``Lab.set_disk``)."""
    from netsvc.lab.hvstate import storage_socket
    from netsvc.lab.registry import run_dir

    return str(storage_socket(run_dir(plan.prefix) / "hv", host))


def demand_file(plan: LabPlan, host: str) -> str:
    return str(_dir(plan) / f"demand-{host}.json")


def disk_spec(plan: LabPlan, owner: str, reader: str | None = None) -> str:
    """``--power-disk`` for ``owner``'s disk, from ``reader`` (default: its first reader):
    two paths to each copy."""
    reader = reader or reader_of(owner)
    legs = [("eth3", "stor-a", "storage-a"), ("eth4", "stor-b", "storage-b")]
    first = ",".join(f"{plan.host_ifname(reader, nic)}>{sw}>"
                     f"{plan.host_addr(owner, fab)}:{FIRST_PORT}" for nic, sw, fab in legs)
    second = ",".join(f"{plan.host_ifname(reader, nic)}>{sw}>"
                      f"{module_addr(owner, fab)}:{SECOND_PORT}" for nic, sw, fab in legs)
    return f"{disk_of(owner)}@{owner}={first};{second}"


def agent_args(plan: LabPlan, host: str) -> list[str]:
    out: list[str] = []
    for owner in plan.host_names():
        if reader_of(owner) == host:
            out += ["--power-disk", disk_spec(plan, owner, host)]
        elif owner != host:
            out += ["--power-disk-standby", disk_spec(plan, owner, host)]
    if out:
        out += ["--power-socket", socket_path(plan, host),
                "--power-state-dir", str(_dir(plan) / f"state-{host}")]
    return [*out, "--power-demand-file", demand_file(plan, host), "--power-capacity", "4,16",
            "--power-network", "vmnet", "--power-report-every", "0.5"]


class PowerStorage:
    """Builds the datastore in a running lab (see the module docstring)."""

    def __init__(self, lab: Lab, size: int) -> None:
        self.lab = lab
        self.plan = lab.require_plan()
        self.size = size
        self.dir = _dir(self.plan)

    def first_dir(self, host: str) -> Path:
        return self.dir / f"first-{host}"

    def second_dir(self, host: str) -> Path:
        return self.dir / f"second-{host}"

    def build(self, seed: bool = True) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        for h in self.plan.host_names():
            (self.dir / f"state-{h}").mkdir(exist_ok=True)
            for d in (self.first_dir(h), self.second_dir(h)):
                d.mkdir(exist_ok=True)
                with open(d / disk_of(h), "wb") as f:
                    f.truncate(self.size)
            if seed:  # some VM data on the first resource before anything moves
                with open(self.first_dir(h) / disk_of(h), "r+b") as f:
                    for off in range(0, self.size, 1 << 20):
                        f.seek(off)
                        f.write(f"{h}:{off}".encode().ljust(4096, b"."))
            self._add_module(h)
            self._start_second(h)
            self._start_first(h)
        self.lab.after_power_on.append(self._powered_on)
        for h in self.plan.host_names():
            self._wait(h, "first", FIRST_PORT)
            self._wait(f"sm{host_index(h)}", "second", SECOND_PORT, disk_of(h))
        self.lab.record("event", "lab", "power-storage-ready", hosts=self.plan.hosts,
                        disk_bytes=self.size)

    def _add_module(self, host: str) -> None:
        lab, plan = self.lab, self.plan
        name = plan.node(f"sm{host_index(host)}")
        with lab._marked():
            node = lab.net.addHost(name, ip=None)
            ipr = lab.ipr(None)
            for fab, leg in (("storage-a", "a"), ("storage-b", "b")):
                link = lab.net.addLink(node, lab.net[plan.switch(fab)],
                                       intfName1=f"{name}-{leg}")
                sw_if = link.intf2.name
                ipr.link("set", index=lab.link_index(None, sw_if),
                         master=lab.link_index(None, plan.switch(fab)), state="up")
                node.cmd(f"ip addr add {module_addr(host, fab)}/24 dev {name}-{leg} && "
                         f"ip link set {name}-{leg} up")
            node.cmd("ip link set lo up")

    def _nbdkit(self, where: str, port: int, d: Path, role: str) -> None:
        self.lab.popen(where, ["nbdkit", "-f", "-p", str(port), "--threads", "16", "file",
                               f"dir={d}"], role=role)

    def _start_first(self, host: str) -> None:
        self._nbdkit(host, FIRST_PORT, self.first_dir(host), f"nbd1-{host}")

    def _start_second(self, host: str) -> None:
        sm = f"sm{host_index(host)}"
        self._nbdkit(sm, SECOND_PORT, self.second_dir(host), f"nbd2-{sm}")

    def _powered_on(self, host: str) -> None:
        self._start_first(host)
        self.lab.record("event", host, "first-resource-started", port=FIRST_PORT)

    def _wait(self, node: str, what: str, port: int, disk: str | None = None) -> None:
        export = disk or disk_of(node)
        deadline = time.monotonic() + 10
        while True:
            r = subprocess.run(["mnexec", "-a", str(self.lab.pid(node)), "nbdinfo", "--size",
                                f"nbd://127.0.0.1:{port}/{export}"], capture_output=True,
                               timeout=5)
            if r.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"nbdkit ({what}) on {node} did not answer: "
                                   f"{r.stderr.decode()[:200]}")
            time.sleep(0.1)

    def kill_second(self, host: str) -> None:
        """Fault: the storage module's nbdkit dies (the second resource fails)."""
        import signal

        self.lab.procs.end(f"nbd2-sm{host_index(host)}", signal.SIGKILL)
        self.lab.record("fault-start", f"sm{host_index(host)}", "second-resource-killed",
                        fault_id=f"second-{host}")

    def restart_second(self, host: str) -> None:
        """End of the fault: the storage module's nbdkit starts again over the same files."""
        self._start_second(host)
        self._wait(f"sm{host_index(host)}", "second", SECOND_PORT, disk_of(host))
        self.lab.record("fault-end", f"sm{host_index(host)}", "second-resource-killed",
                        fault_id=f"second-{host}")

    def figures(self) -> dict[str, Any]:
        return {"disks": {disk_of(h): {"owner": h, "reader": reader_of(h)}
                          for h in self.plan.host_names()}}
