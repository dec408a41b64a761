"""Scenarios ``site-failover`` (replication to site B, the primary site lost, failover through
the sleeping site-B host's BMC) and ``site-migration`` (the same set-up, then a planned
migration: ``netsvc replication migrate`` shuts the VMs down at the primary, the guests
quiesce, their last epochs ship, they start at site B: checked to lose nothing).

Lab layout (these two scenarios build the lab with ``site_b_hosts=1``; nothing changes for the
other scenarios):

- the primary site is ``h1``/``h2`` (management, VM network, storage as always);
- the **site-B network** is the site network 198.18.4.0/24 behind ``gw``. On it: the
  **site-B host** ``b1`` (198.18.4.21; its one NIC is its switch ``vs0``'s port, so a VM
  started there is on the site-B network), **its BMC** ``bmcb1`` (198.18.4.31, the same lab
  BMC as every host's, serving a configuration store: ``Lab.bmc_config_store``), and the
  **site-B storage node** ``site`` (198.18.4.10): nbdkit with ``nbdkit_replica.py`` holds the
  replicas of ``ds1`` and ``ds2``. ``b1`` starts **powered off** (before the cluster starts:
  it has never run an agent) and stays off until the failover;
- the **site link** is ``gw``'s interface toward the site network, shaped with ``tc tbf``
  (100 Mbit/s) in both directions (``gw`` toward site B, the ``site`` node back). Everything
  between the sites crosses it: the shipping, and the manager's IPMI to ``bmcb1`` and its
  traffic with ``b1``'s agent (``gw``'s leg on management routes it);
- each VM is protected with its site-B network (``site-b``) and its address there
  (198.18.4.100 + N); ``b1``'s agent carries ``--replication-network
  site-b=198.18.4.1/24``, so a replica starts on the site-B network with that address;
- the primary hosts ``h1``/``h2`` run ``vm1``/``vm2``, lab VMs whose disks are regions of the
  array's datastores ``ds1``/``ds2`` (``Lab.set_disk``; ``netsvc.storage``: each agent serves
  them on its local NBD endpoint, which the replication agent wraps: changed-block tracking).
  Each guest keeps its writes there as a disk log (``netsvc.lab.disklog``): a ``SET`` is
  acknowledged only after its record (RECORD bytes, four to a block) was written and flushed
  through its host's endpoint. At site B, ``b1``'s agent serves a started replica's disk on
  b1's lab storage socket (``--replication-socket``, tracked for the way back), so the replica
  VM's guest opens and replays its replicated disk there as it boots.

Steps: a client on the gateway sends each guest a ``SET`` at a steady rate (``write_mb_s`` /
RECORD a second; ``netsvc.lab.client.GuestClient``, keys ``<vm>a<n>``) and keeps the replies:
the acknowledged writes; both VMs are protected (RPO target 1 s); the manager writes their
configuration to b1's BMC while b1 is off; the status is sampled during the load; a failover
is asked while the primary lives (refused, exit 1); then the primary site is lost: the primary
hosts' traffic to site B is dropped at ``gw`` (the site link cut on the primary side) and
``h1`` and ``h2`` crash (their guests die with them); once the manager has them down,
``netsvc replication failover`` runs: b1 is powered on through IPMI, its agent reads the
configuration from its BMC before its first heartbeat, and the replicas start on b1. In
``site-migration`` the clients stop first (the guests' writes end as their shutdown begins).

Checks: the failover was refused while the primary lived; no client write failed before the
loss and each guest's counter grew by one per acknowledged write; every replica VM answers at
site B, on b1, with its site-B address; each guest's disk log at site B (read off the site
node's store with ``nbdcopy``, decoded with the disk log's codec) is a prefix of what its
client sent, in order, nothing else in it and nothing after it (a later record without the
ones before it: a mixture), ending at most one write past the acknowledged ones (the one in
flight at the loss: written, never acknowledged; none for a migration, which loses nothing);
what was lost was acknowledged within the RPO target before the loss; the started replica's
guest holds that state (``PING``'s counter and the last key's value) and has its disk
through b1's endpoint (its ``INFO``); the configuration came through the BMC (the journal's
``replication-config-loaded``, and ``ipmitool raw 0x30 0x70`` shows the same SHA-256).

Report: ``rpo_ms`` (p99 of the replicas' age during the load, sampled from the manager's
status every 0.2 s once every VM's initial copy has committed: the RPO of protected VMs; the
time to protection is not in it), ``data_lost_writes``,
``rto_s`` (from the failover command to every replica answering), ``config_via_bmc``,
``initial_sync_s`` (from the guests' first writes to every initial copy committed).
``site-failback`` adds ``failback_s`` (from the failback command to every VM answering at
home), ``failback_lost_writes`` (writes acknowledged at site B missing at the primary's disk
log, read off the array; the VM started at home holds that state),
``failback_steps_s``, ``reverse_sync_s`` (from the primary's return to the way back synced)
and the way back's RPO while the guests write at site B. It then goes on (``_reprotect``): the
guests write at home at once; b1 releases site B's images and is powered off through its BMC;
the VMs are protected toward site B again from the failback's common point (checked: no full
copy, the bytes shipped near the bytes written, each epoch's two control blocks apart, not
the disk size); the configuration with the
new epochs is written to b1's BMC; the primary site is lost a second time and the failover
runs again, checked as the first (each replica's log a prefix of every acknowledged write,
the writes at site B and at home after the failback included, the started guest holding it).
Keys: ``reprotect_bytes_shipped``,
``reprotect_bytes_written``, ``reprotect_ratio``, ``reprotect_protected_s``,
``reprotect_asleep_s`` (from the failback's end), ``second_rto_s``, ``second_lost_writes``.
"""

from __future__ import annotations

import importlib
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from netsvc.lab.client import GuestClient, ReplyLog
from netsvc.lab.config import ConfigError
from netsvc.lab.disklog import record_size
from netsvc.lab.lab import Lab, LabError
from netsvc.lab.plan import ARRAY_PORT, GATEWAY, SERVICES_MGMT, SITE_GATEWAY, LabPlan
from netsvc.lab.scenarios import Checks, Scenario, wait_for
from netsvc.replication.wire import CONTROL

SITE_B_ADDR = "198.18.4.10"  # the lab's ``site`` node
SITE_B_NET = "site-b"  # the protected VMs' network at site B (the lab's site network)
#: the primary site's receiver for failback: nbdkit with ``nbdkit_replica.py`` on ``svc``,
#: whose images are the array's datastore files (the array node is on the storage fabrics
#: only, which site B cannot reach; ``svc`` is on management, which it can, through gw)
PRIMARY_RECEIVER = (SERVICES_MGMT, ARRAY_PORT + 1)
REPLICA_PORT = ARRAY_PORT
BLOCK = 4096
SECTOR = 512  # the disk log's unit (``netsvc.lab.disklog``)
#: each guest write is one disk-log record of RECORD bytes: a ``SET`` line padded to LINE
RECORD = 1024
LINE = max(n for n in range(RECORD) if record_size(n) <= RECORD)
DISKS = {"vm1": ("h1", "ds1"), "vm2": ("h2", "ds2")}
#: with ``vms = 4``: two more VMs, protected for their configuration only (the array has two
#: datastores), so the failover powers on, loads and starts four VMs
CONFIG_ONLY = {"vm3": "h1", "vm4": "h2"}
PARAMS: dict[str, type | tuple[type, ...]] = {"load_s": (int, float),
                                             "write_mb_s": (int, float), "vms": int,
                                             "reprotect": str}


def check(params: dict[str, Any], plan: LabPlan) -> dict[str, Any]:
    load = float(params.get("load_s", 8.0))
    rate = float(params.get("write_mb_s", 0.1))
    if not 2 <= load <= 60:
        raise ConfigError(f"load_s {load} must be in [2, 60] seconds")
    if not 0.02 <= rate <= 0.2:
        raise ConfigError(f"write_mb_s {rate} must be in [0.02, 0.2] per VM (each write a "
                          f"{RECORD}-byte record of the guest's disk log, up to "
                          f"{rate * 1e6 / RECORD:.0f} a second; the log must not fill the "
                          "disk)")
    if plan.hosts != 2:
        raise ConfigError("site-failover runs with 2 hosts (h1, h2 at the primary site; b1 at "
                          "site B is added)")
    vms = int(params.get("vms", 2))
    if vms not in (2, 4):
        raise ConfigError(f"vms {vms} must be 2 or 4")
    reprotect = str(params.get("reprotect", "auto"))
    if reprotect not in ("auto", "full"):
        raise ConfigError(f"reprotect {reprotect!r} must be auto or full")
    return {"load_s": load, "write_mb_s": rate, "vms": vms, "reprotect": reprotect}


def site_b_host(plan: LabPlan) -> str:
    return plan.site_b_names()[0]


def agent_args(plan: LabPlan, host: str) -> list[str]:
    """Primary hosts ship to the site node; the site-B host reads its BMC at start, and
    ships what the started replicas write back to the primary's receiver (failback)."""
    from netsvc.lab.registry import run_dir

    site = ["--replication-site-b", f"{SITE_B_ADDR}:{REPLICA_PORT}",
            "--replication-primary", "{}:{}".format(*PRIMARY_RECEIVER),
            "--replication-link-mbit", "100", "--replication-share", "0.8",
            "--replication-report-every", "0.5"]
    if plan.is_site_b(host):
        return [*site, "--replication-network", f"{SITE_B_NET}={SITE_GATEWAY}/24",
                "--replication-socket", site_b_socket(plan, host),
                "--replication-bmc", plan.bmc_addr(host),
                "--replication-bmc-password-file", str(run_dir(plan.prefix) / "bmc" /
                                                       f"{host}.pw")]
    return [*site, "--replication-network", f"vmnet={GATEWAY}/24"]


def site_b_socket(plan: LabPlan, host: str) -> str:
    """Where the site-B host serves its started replicas' disks (tracked for the way back):
    the lab's local storage endpoint of that host (``hvstate.storage_socket``; site B runs no
    storage agent), so the guest of a replica started there opens its disk through it."""
    from netsvc.lab.scenarios.storage import socket_path

    return socket_path(plan, host)


def disk_region() -> tuple[int, int]:
    """Each guest's part of its datastore (``Lab.set_disk``): the label in the sector before
    the second block, so that the records (RECORD bytes each) start on a block and none
    straddles two blocks."""
    from netsvc.lab.scenarios.storage import DS_SIZE

    return BLOCK - SECTOR, DS_SIZE - BLOCK


def wants(vm: str, tag: str, count: int) -> list[bytes]:
    """The first ``count`` lines the client of ``vm`` with ``tag`` sent (in order)."""
    from netsvc.lab.client import set_line

    return [set_line(f"{vm}{tag}", n, LINE).encode() for n in range(1, count + 1)]


def _clients(lab: Lab, tag: str, rate: float) -> dict[str, GuestClient]:
    """A client on the gateway per guest with a disk: a ``SET`` (key ``<vm><tag><n>``, padded
    to LINE) every RECORD / ``rate`` seconds, each acknowledged only once its record is
    written and flushed on the guest's disk."""
    return {vm: GuestClient(lab.guest_connect(vm), interval=RECORD / rate, key_prefix=f"{vm}{tag}",
                            pad_to=LINE).start() for vm in DISKS}


def _stop(clients: dict[str, GuestClient]) -> dict[str, ReplyLog]:
    return {vm: c.stop() for vm, c in clients.items()}


def _writing(clients: dict[str, GuestClient]) -> dict[str, str]:
    """Why a client is not writing now (none: all are: a reply within the last second)."""
    now = time.monotonic()
    out = {}
    for vm, c in clients.items():
        if c.log.errors or not c.log.times or now - c.log.times[-1] > 1.0:
            out[vm] = (f"{c.sent} writes, last {now - c.log.times[-1]:.2f} s ago" if c.log.times
                       else "no write") + (f", error {c.log.errors[-1][1]}" if c.log.errors
                                           else "")
    return out


@dataclass
class DiskLogRead:
    """A guest's disk log as read off a disk image: its lines in order, and whether every
    byte after its last whole record is zero (``clean``: no later record without the ones
    before it)."""

    lines: list[bytes]
    clean: bool

    def match(self, *parts: list[bytes]) -> tuple[list[int], bool]:
        """How many lines of each part, in turn, the log holds from its start (a part must
        be whole before the next counts), and whether that is the whole log."""
        got, at = [], 0
        for part in parts:
            n = 0
            while n < len(part) and at + n < len(self.lines) and self.lines[at + n] == part[n]:
                n += 1
            got.append(n)
            at += n
            if n < len(part):
                got += [0] * (len(parts) - len(got))
                break
        return got, at == len(self.lines)


def decode_log(image: bytes) -> DiskLogRead:
    """The disk log in the guests' region (``disk_region``) of a disk image, decoded with the
    disk log's codec."""
    from netsvc.lab.disklog import read_label, scan

    off, length = disk_region()
    data = image[off:off + length]
    log_id = read_label(data[:SECTOR])
    if log_id is None:
        return DiskLogRead([], not any(data))
    got = scan(lambda count, at: data[at:at + count], length, log_id)
    return DiskLogRead([ln for rec in got.records for ln in rec.split(b"\n")],
                       not any(data[got.end:]))


def _read_log(lab: Lab, node: str, url: str, name: str) -> DiskLogRead:
    """The guest's disk log in the image at ``url`` (``nbdcopy`` in ``node``'s namespace)."""
    out = lab.run_dir / f"{name}.img"
    r = _mnexec(lab, node, ["nbdcopy", url, str(out)], timeout=120)
    if r.returncode != 0:
        raise LabError(f"nbdcopy {url}: {r.stderr}")
    try:
        return decode_log(out.read_bytes())
    finally:
        out.unlink()


def _guest_state(lab: Lab, vm: str, lines: list[bytes], host: str) -> tuple[bool, str]:
    """Whether ``vm``'s running guest holds the state of the disk log ``lines`` (its counter,
    its last key's value, nothing after) and has its disk through ``host``'s endpoint (its
    own ``INFO``)."""
    from netsvc.lab.client import request
    from netsvc.lab.disklog import guest_info
    from netsvc.lab.scenarios.storage import socket_path

    assert lab.hv is not None
    conn = lab.guest_connect(vm)
    try:
        pong = request(conn, "PING")
        info = guest_info(str(lab.hv.vms_dir / f"{vm}.ctl"))
        last = lines[-1].split() if lines else []
        value = request(conn, f"GET {last[1].decode()}") if last else ""
    except (OSError, RuntimeError, LabError) as exc:
        return False, f"no answer: {exc}"
    ok = (pong == f"PONG {vm} {len(lines)}" and info.get("records") == len(lines)
          and str(info.get("uri", "")).endswith(f"socket={socket_path(lab.require_plan(), host)}")
          and (not last or value == f"VALUE {last[2].decode()}"))
    return ok, (f"{pong!r}; {info.get('records')} records on {info.get('uri')}; last key "
                f"{last[1].decode() if last else None}: {value[:24]!r}")


def _mnexec(lab: Lab, node: str, argv: list[str], timeout: float = 30
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mnexec", "-a", str(lab.pid(node)), *argv], capture_output=True,
                          text=True, timeout=timeout)


def _cut_site_link(lab: Lab) -> dict[str, float]:
    """Drop the primary hosts' traffic to site B at gw, host by host; when each host's rule was
    in (monotonic): from then on, nothing more of its guests' writes reaches site B. Each
    guest's loss is timed by its own host's rule, not by when the lab was done with both (one
    more ``mnexec``, slow on a loaded machine, would count against the RPO)."""
    plan = lab.require_plan()
    cut: dict[str, float] = {}
    for h in ("h1", "h2"):
        _mnexec(lab, "gw", ["iptables", "-I", "FORWARD", "-s", plan.host_addr(h, "vmnet"),
                            "-d", "198.18.4.0/24", "-j", "DROP"])
        cut[h] = time.monotonic()
    return cut


def _iface_with(lab: Lab, node: str, addr: str) -> str:
    out = _mnexec(lab, node, ["ip", "-o", "-4", "addr", "show"]).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) > 3 and parts[3].startswith(addr + "/"):
            return parts[1]
    raise LabError(f"{node} has no interface with {addr}")


def _shape(lab: Lab, node: str, ifname: str) -> None:
    r = _mnexec(lab, node, ["tc", "qdisc", "replace", "dev", ifname, "root", "tbf", "rate",
                            "100mbit", "burst", "128kb", "latency", "20ms"])
    if r.returncode != 0:
        raise LabError(f"tc tbf on {node}/{ifname}: {r.stderr.strip()}")


def _replication(lab: Lab) -> dict[str, Any]:
    status, body = lab.manager().request("GET", "/v1/replication")
    if status != 200:
        raise LabError(f"GET /v1/replication: HTTP {status}: {body}")
    return dict(body)


def _cli(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    assert lab.key_file is not None
    return _mnexec(lab, "svc", [sys.executable, "-m", "netsvc", "replication", *args,
                                "--manager", lab.manager_url, "--key-file", str(lab.key_file)],
                   timeout=60)


def _steps(journal: list[dict[str, Any]]) -> dict[str, float]:
    """The failover's steps from the manager's journal, seconds after its decision."""
    decided = [e for e in journal if e["action"] in ("replication-failover-decision",
                                                     "replication-migrate-decision")
               and not e["dry_run"]]
    if not decided:
        return {}
    t0 = decided[-1]["wall"]
    out: dict[str, float] = {}
    for step in ("replication-quiesced", "replication-final-epochs", "replication-power-on",
                 "replication-config-loaded", "replication-start-done",
                 "replication-failover-done"):
        times = [e["wall"] for e in journal if e["action"] == step and e["wall"] >= t0]
        if times:
            out[step.removeprefix("replication-")] = round(max(times) - t0, 3)
    return out


def run(lab: Lab, checks: Checks, params: dict[str, Any]) -> dict[str, Any]:
    return _run(lab, checks, params, planned=False)


def run_planned(lab: Lab, checks: Checks, params: dict[str, Any]) -> dict[str, Any]:
    return _run(lab, checks, params, planned=True)


def run_failback(lab: Lab, checks: Checks, params: dict[str, Any]) -> dict[str, Any]:
    return _run(lab, checks, params, planned=False, failback=True)


def _start_primary_receiver(lab: Lab, array: Path, size: int, plugin: Path) -> None:
    """The primary's receiver for failback, on ``svc``: its images are the array's datastore
    files (links), so an epoch shipped back lands in the disk the primary host serves."""
    rdir = lab.run_dir / "primary-receiver"
    rdir.mkdir(exist_ok=True)
    for _, ds in DISKS.values():
        (rdir / f"{ds}.img").symlink_to(array / ds)
    addr, port = PRIMARY_RECEIVER
    lab.popen("svc", ["nbdkit", "-f", "-i", addr, "-p", str(port), "python", str(plugin),
                      f"dir={rdir}", *(f"disk={ds}:{size}" for _, ds in DISKS.values())],
              role="nbdkit-primary-receiver")


def _run(lab: Lab, checks: Checks, params: dict[str, Any], *, planned: bool,
         failback: bool = False) -> dict[str, Any]:
    from netsvc.lab.scenarios.storage import DS_SIZE, _start_array

    plan = lab.require_plan()
    b = site_b_host(plan)
    lab.crash_host(b)  # b1 starts powered off: it sleeps until the failover
    lab.record("event", b, "site-b-host-asleep")
    # site B's storage node: nbdkit holding the replicas
    rdir = lab.run_dir / "site-b"
    rdir.mkdir(exist_ok=True)
    plugin = Path(importlib.import_module("netsvc.replication").__file__ or "").with_name(
        "nbdkit_replica.py")
    lab.popen("site", ["nbdkit", "-f", "-i", SITE_B_ADDR, "-p", str(REPLICA_PORT), "python",
                       str(plugin), f"dir={rdir}",
                       *(f"disk={ds}:{DS_SIZE}" for _, ds in DISKS.values())],
              role="nbdkit-site-b")
    _start_primary_receiver(lab, _start_array(lab), DS_SIZE, plugin)
    gw_if = _iface_with(lab, "gw", "198.18.4.1")
    _shape(lab, "gw", gw_if)
    _shape(lab, "site", _iface_with(lab, "site", SITE_B_ADDR))
    _shape(lab, b, plan.host_ifname(b, "eth0"))  # b1's way back (failback) crosses it too
    lab.record("event", "site", "site-link-shaped", rate="100mbit", gw_if=gw_if)
    extra = dict(CONFIG_ONLY) if params["vms"] == 4 else {}
    for vm, (host, _) in DISKS.items():
        lab.create_vm(vm, host)
    for vm, host in extra.items():
        lab.create_vm(vm, host)
    lab.bmc_config_store = True
    pw = lab.run_dir / "bmc" / f"{b}.pw"
    config = (f'[replication]\nsite_b_host = "{b}"\nprimary_hosts = ["h1", "h2"]\n'
              f'rpo_s = 1.0\nconfig_every_s = 2.0\ndefault_network = "{SITE_B_NET}"\n'
              f'reprotect = "{params["reprotect"]}"\n'
              f'[replication.bmc]\naddr = "{plan.bmc_addr(b)}"\nuser = "{lab.BMC_USER}"\n'
              f'password_file = "{pw}"\n')
    lab.start_services(services=("storage", "replication"), config=config)
    mgr = lab.manager()
    off, length = disk_region()
    for vm, (_, ds) in DISKS.items():  # the guests' own disks, through their hosts' endpoints
        lab.set_disk(vm, ds, f"{off}:{length}")
    lab.wait_guests(list(DISKS), timeout=60.0)
    lab.record("event", "lab", "replication-guests",
               disks={vm: f"{ds}@{off}" for vm, (_, ds) in DISKS.items()})
    for vm, (_, ds) in DISKS.items():
        status, body = mgr.request("POST", f"/v1/replication/protect/{vm}", {
            "rpo_s": 1.0, "cpus": 1, "memory_mib": 256, "network": SITE_B_NET,
            "site_b_ip": plan.site_b_vm_addr(vm),
            "disks": [{"name": ds, "size": DS_SIZE}], "reason": "site-failover scenario"})
        if status != 200:
            raise LabError(f"protect {vm}: HTTP {status}: {body}")
    for vm in extra:
        status, body = mgr.request("POST", f"/v1/replication/protect/{vm}", {
            "rpo_s": 1.0, "network": SITE_B_NET, "site_b_ip": plan.site_b_vm_addr(vm),
            "reason": "site-failover scenario (no disk)"})
        if status != 200:
            raise LabError(f"protect {vm}: HTTP {status}: {body}")
    rate = params["write_mb_s"] * 1e6
    t_w0 = time.monotonic()
    clients = _clients(lab, "a", rate)
    try:
        wait_for("the initial copies at site B", lambda: all(
            r.get("synced") and r.get("remote_epoch", -1) >= 0
            for vm, r in _replication(lab)["vms"].items() if vm in DISKS), 60.0, 0.2)
        lab.record("event", "replication", "synced")
        initial_sync = time.monotonic() - t_w0
        samples: list[float] = []
        t_end = time.monotonic() + params["load_s"]
        while time.monotonic() < t_end:
            for vm, r in _replication(lab)["vms"].items():
                if vm in DISKS:
                    samples.append(float(r["rpo_ms"]))
            time.sleep(0.2)
        st = _replication(lab)
        written = st["config"]["written"]
        checks.check("the configuration is in the site-B host's BMC while it is off",
                     bool(written) and sorted(written.get("vms", [])) == sorted([*DISKS, *extra])
                     and b in lab.crashed, f"{written}")

        refused = _cli(lab, "failover", "--reason", "only the link?")
        checks.check("a failover while the primary lives is refused (exit 1, primary-alive)",
                     refused.returncode == 1 and "primary-alive" in refused.stderr,
                     (refused.stdout + refused.stderr)[-300:])
        idle = _writing(clients)
        checks.check("the guests were still writing at the " + ("migration" if planned else
                                                               "site's loss"), not idle,
                     f"{idle} (a guest whose disk filled, or that stopped on a disk error, "
                     "makes the checks after vacuous)")
        cut: dict[str, float] = {}  # the site's loss: when each host's traffic was cut
        if planned:
            # The guests' writes end as their shutdown begins: the clients stop first (a
            # write acknowledged by a guest on its way down would race its last epoch; the
            # migration does not promise it). The primary stays up.
            logs = _stop(clients)
            t_fo = t_loss = time.monotonic()
            fo = _cli(lab, "migrate", "--reason", "site-migration scenario")
            if fo.returncode != 0:
                raise LabError(f"migrate: {fo.stdout}{fo.stderr}")
        else:
            # the primary site is lost: its traffic to site B dropped at gw, its hosts crashed
            # (their guests die with them: a write in flight is not acknowledged)
            cut = _cut_site_link(lab)
            lab.record("fault-start", "site-a", "site-link-cut", fault_id="site-a-lost")
            t_loss = time.monotonic()
            for h in ("h1", "h2"):
                lab.crash_host(h)
            logs = _stop(clients)
            wait_for("the primary hosts down at the manager", lambda: all(
                mgr.status()["hosts"][h]["state"] == "DOWN" for h in ("h1", "h2")), 30.0, 0.1)
            t_fo = time.monotonic()
            fo = _cli(lab, "failover", "--reason", "site A lost (site-failover scenario)")
            if fo.returncode != 0:
                raise LabError(f"failover: {fo.stdout}{fo.stderr}")
    finally:
        _stop(clients)
    checks.client_logs(logs, "no guest write failed before the " + (
        "migration" if planned else "site's loss"), until=t_loss)
    wait_for("every replica answering at site B",
             lambda: all(lab.answers(vm) for vm in [*DISKS, *extra]), 60.0, 0.1)
    rto = time.monotonic() - t_fo
    wait_for("the failover's end at the manager", lambda: (
        _replication(lab).get("failover") or {}).get("phase") in ("DONE", "FAILED"), 30.0, 0.1)
    st = _replication(lab)
    checks.check("the failover is DONE", (st.get("failover") or {}).get("phase") == "DONE",
                 str(st.get("failover"))[:300])
    where = {vm: (lab.vm(vm).host, lab.vm(vm).ip) for vm in [*DISKS, *extra]}
    checks.check("every replica VM answers at site B, on b1, with its site-B address",
                 all(h == b and ip == plan.site_b_vm_addr(vm) for vm, (h, ip) in where.items()),
                 f"in {rto:.2f} s: {where}")

    # the replicas' state: each guest's disk log as site B holds it, a prefix of what its
    # client sent (at most the one write in flight at the loss past what was acknowledged),
    # the started guest holding that state; the loss within the RPO
    lost = 0
    figures: dict[str, Any] = {}
    for vm, (_, ds) in DISKS.items():
        sent = len(logs[vm].times)  # one reply per acknowledged write
        got = _read_log(lab, "site", f"nbd://{SITE_B_ADDR}:{REPLICA_PORT}/{ds}", f"replica-{ds}")
        want = wants(vm, "a", sent + 1)
        [k], whole = got.match(want)
        checks.check(f"{vm}'s replica is a prefix of its acknowledged writes",
                     whole and got.clean and k <= sent + (0 if planned else 1),
                     f"{k} of {sent} acknowledged writes in order"
                     + (" and the one in flight at the loss" if k > sent else "")
                     + f"; nothing else in its log: {whole}; nothing after it: {got.clean}")
        if planned:
            checks.check(f"{vm} lost nothing (planned migration)", k == sent,
                         f"{k} of {sent} acknowledged writes at site B")
        acked = logs[vm].times
        host = DISKS[vm][0]
        gap = (t_loss if planned else cut[host]) - acked[k] if k < len(acked) else 0.0
        checks.check(f"{vm} lost only writes acknowledged within the RPO target (1 s)",
                     gap <= 1.0, f"the oldest lost write was acknowledged {gap:.3f} s "
                     "before the loss")
        ok, detail = _guest_state(lab, vm, got.lines, b)
        checks.check(f"{vm}'s replica answers at site B with the state of its replicated disk "
                     "(its guest replayed it)", ok and k > 0, detail)
        lost += max(0, sent - k)
        figures[vm] = {"acked": sent, "replica_writes": k, "in_flight_kept": k > sent,
                       "oldest_lost_age_s": round(gap, 3), "guest_state": detail}

    # the configuration came through the BMC: the journal, and ipmitool itself
    journal = mgr.journal(0, limit=100000)
    loaded = [e for e in journal if e["action"] == "replication-config-loaded"]
    info = _mnexec(lab, "svc", ["ipmitool", "-I", "lanplus", "-H", plan.bmc_addr(b), "-U",
                                lab.BMC_USER, "-f", str(pw), "raw", "0x30", "0x70"])
    raw = bytes(int(x, 16) for x in info.stdout.split()) if info.returncode == 0 else b""
    via_bmc = bool(loaded) and len(raw) == 42 and raw[1] == 1 and \
        loaded[-1]["details"]["sha256"] == raw[10:42].hex()
    checks.check("the configuration came through the BMC (journal and ipmitool raw agree)",
                 via_bmc, f"journal: {loaded[-1]['details'] if loaded else None}; ipmitool: "
                 f"{raw.hex()[:40]}... {info.stderr.strip()[:100]}")
    starts = [e for e in journal if e["action"] == "replication-start-done"]
    back = _failback(lab, checks, params, figures) if failback else {}
    if failback:
        back.update(_reprotect(lab, checks, params, figures, back))
    return {**back, "rpo_ms": round(sorted(samples)[min(len(samples) - 1,
                                                round(0.99 * (len(samples) - 1)))], 1)
            if samples else None,
            "rpo_p50_ms": round(statistics.median(samples), 1) if samples else None,
            "data_lost_writes": lost, "rto_s": round(rto, 3), "config_via_bmc": via_bmc,
            "initial_sync_s": round(initial_sync, 3),
            "replicas": figures, "write_mb_s_per_vm": params["write_mb_s"],
            "vms": len(DISKS) + len(extra),
            "failover_steps_s": _steps(journal),
            "start_epochs": {e["subject"]: e["details"].get("epoch") for e in starts},
            "manager": SERVICES_MGMT}


def _failback(lab: Lab, checks: Checks, params: dict[str, Any], figures: dict[str, Any]
              ) -> dict[str, Any]:
    """After the failover: the guests write at site B (each started replica's guest on its
    disk through b1's endpoint, tracked), a failback while the primary is still down is
    refused, the primary comes back, the replication reverses (a full copy first, then
    epochs), the clients stop, ``netsvc replication failback`` brings the VMs home. Checked:
    each VM answers on its primary host with its primary address and the state of its disk
    there, and each guest's disk log at the primary (read off the array) holds exactly the
    writes kept at the failover then every write acknowledged at site B, nothing after (the
    primary's writes that never reached site B are overwritten)."""
    plan = lab.require_plan()
    mgr = lab.manager()
    first = {vm: int(figures[vm]["replica_writes"]) for vm in DISKS}
    clients = _clients(lab, "b", params["write_mb_s"] * 1e6)
    try:
        early = _cli(lab, "failback", "--reason", "too early")
        checks.check("a failback while the primary is down is refused (exit 1, "
                     "primary-not-back)",
                     early.returncode == 1 and "primary-not-back" in early.stderr,
                     (early.stdout + early.stderr)[-300:])
        # the primary site comes back: its link to site B, its hosts (their agents restart)
        for h in ("h1", "h2"):
            _mnexec(lab, "gw", ["iptables", "-D", "FORWARD", "-s", plan.host_addr(h, "vmnet"),
                                "-d", "198.18.4.0/24", "-j", "DROP"])
            lab.power_on(h)
        lab.record("fault-end", "site-a", "site-link-cut", fault_id="site-a-lost")
        wait_for("the primary hosts up at the manager", lambda: all(
            mgr.status()["hosts"][h]["state"] == "UP" for h in ("h1", "h2")), 30.0, 0.1)
        t_back = time.monotonic()
        wait_for("the way back synced (a full copy, then an epoch, at the primary)",
                 lambda: all((_replication(lab).get("reverse") or {}).get(vm, {}).get("synced")
                             and (_replication(lab)["reverse"][vm].get("remote_epoch")
                                  or -1) >= 0 for vm in DISKS), 180.0, 0.5)
        reverse_sync_s = time.monotonic() - t_back
        samples: list[float] = []
        t_end = time.monotonic() + params["load_s"] / 2
        while time.monotonic() < t_end:
            for vm, r in (_replication(lab).get("reverse") or {}).items():
                if vm in DISKS and r.get("rpo_ms") is not None:
                    samples.append(float(r["rpo_ms"]))
            time.sleep(0.2)
        idle = _writing(clients)
        checks.check("the guests were writing at site B until the failback", not idle,
                     str(idle))
    finally:
        logs = _stop(clients)  # the guests' writes end as their shutdown begins
    checks.client_logs(logs, "no guest write failed at site B")
    dry = _cli(lab, "failback", "--dry-run", "--reason", "site A is back (dry run)")
    checks.check("a failback dry run passes its checks and changes nothing",
                 dry.returncode == 0 and "dry run" in dry.stdout
                 and (_replication(lab).get("failback") is None),
                 (dry.stdout + dry.stderr)[-300:])
    t0 = time.monotonic()
    fb = _cli(lab, "failback", "--reason", "site A is back (site-failback scenario)")
    if fb.returncode != 0:
        raise LabError(f"failback: {fb.stdout}{fb.stderr}")
    wait_for("the failback's end at the manager", lambda: (
        _replication(lab).get("failback") or {}).get("phase") in ("DONE", "FAILED"), 90.0, 0.1)
    wait_for("every VM answering at home", lambda: all(lab.answers(vm) for vm in DISKS),
             30.0, 0.1)
    took = time.monotonic() - t0
    st = _replication(lab)
    checks.check("the failback is DONE", (st.get("failback") or {}).get("phase") == "DONE",
                 str(st.get("failback"))[:300])
    home = {vm: (lab.vm(vm).host, lab.vm(vm).ip) for vm in DISKS}
    checks.check("every VM answers at home, on its primary host with its primary address",
                 all(home[vm] == (h, plan.vm_addr(vm)) for vm, (h, _) in DISKS.items()),
                 f"in {took:.2f} s: {home}")
    lost = 0
    out: dict[str, Any] = {}
    for vm, (host, ds) in DISKS.items():
        got = _read_log(lab, "arr", f"nbd://127.0.0.1:{ARRAY_PORT}/{ds}", f"home-{ds}")
        k0, m = first[vm], len(logs[vm].times)
        (kept, at_b), whole = got.match(wants(vm, "a", k0), wants(vm, "b", m))
        checks.check(f"{vm}: every write acknowledged at site B reads back at the primary",
                     kept == k0 and at_b == m and m > 0 and whole and got.clean,
                     f"{kept} of the {k0} writes kept at the failover; {at_b} of {m} written at "
                     f"site B; nothing else in the log: {whole}; nothing after it (the "
                     f"primary's unshipped writes overwritten): {got.clean}")
        ok, detail = _guest_state(lab, vm, got.lines, host)
        checks.check(f"{vm} answers at home with the state of its disk there (its guest "
                     "replayed it)", ok, detail)
        lost += m - at_b
        out[vm] = {"kept_at_failover": k0, "written_at_site_b": m, "at_primary": at_b,
                   "guest_state": detail}
    journal = mgr.journal(0, limit=100000)
    decided = [e for e in journal if e["action"] == "replication-failback-decision"
               and not e["dry_run"]]
    steps: dict[str, float] = {}
    if decided:
        for step in ("replication-failback-quiesced", "replication-failback-final-epochs",
                     "replication-failback-start-done", "replication-failback-done"):
            times = [e["wall"] for e in journal if e["action"] == step
                     and e["wall"] >= decided[-1]["wall"]]
            if times:
                steps[step.removeprefix("replication-failback-")] = round(
                    max(times) - decided[-1]["wall"], 3)
    out["_written_at_b"] = {vm: len(logs[vm].times) for vm in DISKS}
    return {"failback_s": round(took, 3), "failback_lost_writes": lost,
            "failback_steps_s": steps, "failback_disks": out,
            "reverse_sync_s": round(reverse_sync_s, 3),
            "reverse_rpo_p50_ms": round(statistics.median(samples), 1) if samples else None,
            "reverse_rpo_max_ms": round(max(samples), 1) if samples else None}


def _reprotect(lab: Lab, checks: Checks, params: dict[str, Any], figures: dict[str, Any],
               back: dict[str, Any]) -> dict[str, Any]:
    """After the failback: b1 releases site B's images and goes back to sleep (powered off
    through its BMC); the guests write at home; their epochs reach site B again from the
    failback's common point, with no full copy (the bytes shipped are checked against the
    bytes written, not the disk size); the configuration with the new epochs is written to
    b1's BMC; then the primary site is lost a SECOND time and the failover runs from those
    epochs: each replica is a prefix of every acknowledged write, the writes made at home after
    the failback included."""
    t0 = time.monotonic()

    def rows() -> dict[str, Any]:
        return {vm: r.get("reprotect") or {} for vm, r in _replication(lab)["vms"].items()
                if vm in DISKS}

    # the guests write at home at once (before site B's images are released and the
    # shipping resumes: those writes must be in the first epoch after the common point),
    # after the writes kept at the first failover and those made at site B
    written_at_b = back["failback_disks"].pop("_written_at_b")
    clients = _clients(lab, "h", params["write_mb_s"] * 1e6)
    try:
        return _reprotect_run(lab, checks, params, figures, written_at_b, clients, t0, rows)
    finally:
        _stop(clients)


def _reprotect_run(lab: Lab, checks: Checks, params: dict[str, Any], figures: dict[str, Any],
                   written_at_b: dict[str, int], clients: dict[str, GuestClient], t0: float,
                   rows: Any) -> dict[str, Any]:
    from netsvc.lab.scenarios.storage import DS_SIZE

    plan = lab.require_plan()
    b = site_b_host(plan)
    mgr = lab.manager()
    wait_for("site B's images released (re-protection resuming or re-seeding)", lambda: all(
        r.get("state") in ("RESUMING", "RESEEDING", "PROTECTED", "FAILED")
        for r in rows().values()), 60.0, 0.2)
    wait_for("every VM protected toward site B again", lambda: all(
        r.get("state") in ("PROTECTED", "FAILED") for r in rows().values()), 120.0, 0.2)
    protected_s = time.monotonic() - t0
    wait_for(f"{b} asleep again (powered off through its BMC)", lambda: b in lab.crashed
             and not (_replication(lab).get("site_b") or {}).get("awake"), 60.0, 0.2)
    asleep_s = time.monotonic() - t0
    got = rows()
    full = params["reprotect"] == "full"
    checks.check("every VM is protected toward site B again " + (
        "after a full re-seed (reprotect = full)" if full
        else "from the failback's common point (no full re-seed)"),
                 all(r.get("state") == "PROTECTED"
                     and r.get("mode") == ("full" if full else "delta")
                     for r in got.values()), json.dumps(got)[:600])
    time.sleep(params["load_s"] / 2)  # the guests keep writing at home; epochs ship
    st = _replication(lab)
    figs: dict[str, Any] = {}
    for vm in DISKS:
        r = st["vms"][vm]
        shipped, written = int(r.get("bytes_shipped", 0)), int(r.get("bytes_written", 0))
        epochs = int(r.get("remote_epoch", -1)) - int(got[vm].get("base_epoch", 0))
        # each epoch carries two control blocks (BEGIN, COMMIT) whatever it holds: the
        # guests' small writes (about 25 KiB an epoch) make them a visible share, so the
        # bytes shipped are held against the bytes written with them counted apart
        control = 2 * CONTROL * max(0, epochs)
        figs[vm] = {"bytes_shipped": shipped, "bytes_written": written,
                    "base_epoch": got[vm].get("base_epoch"), "epoch": r.get("remote_epoch"),
                    "epochs_since_base": epochs, "control_bytes": control,
                    "bytes_behind": r.get("bytes_behind")}
        near = shipped - control <= 1.25 * written + 65536 and shipped < DS_SIZE // 4
        checks.check(f"{vm}: the re-protection shipped " + (
            "the whole disk (a full re-seed)" if full
            else "about what was written at home, not the disk"),
                     written > 0 and (shipped >= DS_SIZE if full else near) and epochs > 0,
                     f"{shipped} bytes shipped ({control} of them the control blocks of "
                     f"{epochs} epochs) for {written} written (disk {DS_SIZE}); epoch "
                     f"{r.get('remote_epoch')} after the base {got[vm].get('base_epoch')}")
    journal = mgr.journal(0, limit=100000)
    asleep = [e["wall"] for e in journal if e["action"] == "replication-site-b-asleep"]
    bases = {vm: int(got[vm].get("base_epoch") or 0) for vm in DISKS}
    wait_for("the configuration with the new epochs in b1's BMC", lambda: any(
        e["action"] == "replication-config-written" and asleep and e["wall"] >= asleep[-1]
        and all(int((e["details"].get("epochs") or {}).get(vm, -1)) > bases[vm]
                for vm in DISKS)
        for e in mgr.journal(0, limit=100000)), 30.0, 0.3)
    checks.check(f"{b} went back to sleep through its BMC with a journaled reason, and its "
                 "BMC holds the new epochs", bool(asleep) and b in lab.crashed,
                 f"asleep {asleep_s:.2f} s after the failback")

    # the primary site is lost a second time; the failover runs from the new epochs
    idle = _writing(clients)
    checks.check("the guests were writing at home at the second loss", not idle, str(idle))
    cut = _cut_site_link(lab)
    t_loss = time.monotonic()
    for h in ("h1", "h2"):
        lab.crash_host(h)
    logs = _stop(clients)
    checks.client_logs(logs, "no guest write failed at home before the second loss",
                       until=t_loss)
    wait_for("the primary hosts down at the manager (second loss)", lambda: all(
        mgr.status()["hosts"][h]["state"] == "DOWN" for h in ("h1", "h2")), 30.0, 0.1)
    t_fo, t_fo_wall = time.monotonic(), time.time()
    fo = _cli(lab, "failover", "--reason", "site A lost again (after the failback)")
    if fo.returncode != 0:
        raise LabError(f"second failover: {fo.stdout}{fo.stderr}")
    wait_for("every replica answering at site B (second failover)",
             lambda: all(lab.answers(vm) for vm in DISKS), 60.0, 0.1)
    rto2 = time.monotonic() - t_fo
    wait_for("the second failover's end", lambda: (
        _replication(lab).get("failover") or {}).get("phase") in ("DONE", "FAILED"), 30.0, 0.1)
    checks.check("the second failover is DONE",
                 (_replication(lab).get("failover") or {}).get("phase") == "DONE",
                 str(_replication(lab).get("failover"))[:300])
    lost = 0
    for vm, (_, ds) in DISKS.items():
        got = _read_log(lab, "site", f"nbd://{SITE_B_ADDR}:{REPLICA_PORT}/{ds}",
                        f"replica2-{ds}")
        k0, m = int(figures[vm]["replica_writes"]), int(written_at_b[vm])
        acked = logs[vm].times
        (kept, at_b, j), whole = got.match(wants(vm, "a", k0), wants(vm, "b", m),
                                           wants(vm, "h", len(acked) + 1))
        before = kept == k0 and at_b == m
        checks.check(f"{vm}'s replica after the second failover is a prefix of every "
                     "acknowledged write, the writes at home after the failback included",
                     before and whole and got.clean and 0 < j <= len(acked) + 1,
                     f"{kept} of {k0} kept at the first failover and {at_b} of {m} written at "
                     f"site B; {j} of {len(acked)} acknowledged at home"
                     + (" and the one in flight at the loss" if j > len(acked) else "")
                     + f"; nothing else in the log: {whole}; nothing after it: {got.clean}")
        gap = cut[DISKS[vm][0]] - acked[j] if j < len(acked) else 0.0
        checks.check(f"{vm} lost only writes acknowledged within the RPO target (1 s) at the "
                     "second loss", gap <= 1.0, f"the oldest lost write was acknowledged "
                     f"{gap:.3f} s before the loss")
        ok, detail = _guest_state(lab, vm, got.lines, b)
        checks.check(f"{vm}'s replica answers at site B again with the state of its replicated "
                     "disk", ok and j > 0, detail)
        lost += max(0, len(acked) - j)
        figs[vm].update(acked_at_home=len(acked), at_site_b=j, in_flight_kept=j > len(acked),
                        oldest_lost_age_s=round(gap, 3), guest_state=detail)
    shipped = sum(f["bytes_shipped"] for f in figs.values())
    written = sum(f["bytes_written"] for f in figs.values())
    journal = mgr.journal(0, limit=100000)
    done = [e["wall"] for e in journal if e["action"] == "replication-failback-done"]
    steps: dict[str, float] = {}
    for step in ("reprotect-released", "reprotect-done", "site-b-asleep"):
        times = [e["wall"] for e in journal if e["action"] == f"replication-{step}"
                 and done and done[-1] <= e["wall"] <= t_fo_wall]
        if times:
            steps[step] = round(max(times) - done[-1], 3)
    written_cfg = [e["wall"] for e in journal if e["action"] == "replication-config-written"
                   and asleep and asleep[-1] <= e["wall"] <= t_fo_wall]
    if written_cfg and done:
        steps["config-written"] = round(min(written_cfg) - done[-1], 3)
    return {"reprotect": figs, "reprotect_asleep_s": round(asleep_s, 3),
            "reprotect_steps_s": steps,
            "reprotect_protected_s": round(protected_s, 3),
            "reprotect_bytes_shipped": shipped, "reprotect_bytes_written": written,
            "reprotect_ratio": round(shipped / written, 3) if written else None,
            "second_rto_s": round(rto2, 3), "second_lost_writes": lost,
            "second_failover_steps_s": _steps(mgr.journal(0, limit=100000))}


PLANNED = Scenario("site-migration", "planned migration to site B: the VMs quiesce, their "
                   "last epochs ship, they start on the site-B host powered on through its "
                   "BMC; zero loss", run_planned, min_hosts=2, vms_per_host=0, params=PARAMS,
                   check=check, site_b_hosts=1)
FAILBACK = Scenario("site-failback", "site-failover, then failback: the guests write at site B, "
                    "the primary comes back, the replication reverses, the VMs come home "
                    "with a planned migration; every write acknowledged at site B reads back "
                    "at the primary", run_failback, min_hosts=2, vms_per_host=0,
                    params=PARAMS, check=check, site_b_hosts=1)
SCENARIO = Scenario("site-failover", "replication to site B; the primary site lost; failover "
                    "through the sleeping site-B host's BMC", run, min_hosts=2,
                    vms_per_host=0, params=PARAMS, check=check, site_b_hosts=1)
