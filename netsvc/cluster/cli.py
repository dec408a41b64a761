"""The ``manager``, ``agent`` and ``status`` subcommands.

``register(subparsers)`` adds them to a parent parser; each sets ``func(args) -> int``.

Invariants:

- Exit codes: 0 fine; 1 the thing asked about is bad (``status``: a host is DOWN, a VM
  CRASHED, or the manager is fenced); 2 a usage or environment error, reported on stderr as one
  line ``netsvc <command>: error: <what is wrong>`` (bad address, unreadable key file, invalid
  config, manager unreachable or key rejected).
- Options come from the command line, then the TOML config (``manager --config``), then the
  environment (``NETSVC_MANAGER``, ``NETSVC_KEY_FILE`` for ``agent`` and ``status``). A config
  file with an unknown key or a value of the wrong type is an error (exit 2), never ignored;
  that holds inside its ``[acd]`` table too (``conflicts.AcdConfig``), whose DNS key file is
  read, and must be mode 0600, before the manager listens.
- Importing this module imports only ``argparse``, ``os`` and ``sys``; each command imports what
  it needs when it runs, so ``netsvc agent`` stays small.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

ENV_MANAGER = "NETSVC_MANAGER"
ENV_KEY_FILE = "NETSVC_KEY_FILE"

#: Keys allowed in the manager's TOML config, with their types.
MANAGER_CONFIG_KEYS: dict[str, tuple[type, ...]] = {
    "listen": (str,),
    "key_file": (str,),
    "state_dir": (str,),
    "store": (str,),
    "heartbeat_interval": (int, float),
    "missed_heartbeats": (int,),
    "action_timeout": (int, float),
    "access_log": (bool,),
    "networks": (list,),
    "acd": (dict,),
    "partition": (dict,),
}
NETWORK_KEYS = {"name", "cidr", "kind"}


class UsageError(Exception):
    """A usage or environment problem: exit 2 with a one-line message."""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``manager``, ``agent`` and ``status`` subcommands."""
    p = subparsers.add_parser(
        "manager",
        help="run the cluster manager (HTTP+JSON API, decisions, audit journal)",
        description="Run the cluster manager. The state dir holds the SQLite state store "
        "(state.sqlite, unless --store names etcd) and the audit journal (journal.jsonl).",
    )
    p.add_argument("--listen", metavar="ADDR:PORT", help="address to serve the API on")
    p.add_argument("--key-file", metavar="F", help="file holding the shared API key (mode 0600)")
    p.add_argument("--state-dir", metavar="DIR", help="directory for state.sqlite and journal")
    p.add_argument(
        "--store",
        metavar="URL",
        help="state store: sqlite (default, in the state dir) or etcd://HOST:PORT[/PREFIX]",
    )
    p.add_argument(
        "--heartbeat-interval",
        metavar="S",
        type=float,
        help="seconds between agent heartbeats (default 1.0)",
    )
    p.add_argument(
        "--missed-heartbeats",
        metavar="N",
        type=int,
        help="missed heartbeats before a host is DOWN (default 3)",
    )
    p.add_argument(
        "--action-timeout",
        metavar="S",
        type=float,
        help="seconds before an unclaimed action expires (default 60)",
    )
    p.add_argument("--config", metavar="FILE", help="TOML file with the same options")
    p.add_argument(
        "--access-log", action="store_true", default=None, help="log every request on stderr"
    )
    p.set_defaults(func=cmd_manager)

    p = subparsers.add_parser(
        "agent",
        help="run the per-host agent (heartbeats to the manager)",
        description="Heartbeat to the manager every interval with this host's interface "
        "states. Exits 0 on SIGTERM/SIGINT.",
    )
    p.add_argument("--host", metavar="NAME", required=True, help="this host's cluster name")
    p.add_argument("--manager", metavar="URL", help=f"manager URL (default ${ENV_MANAGER})")
    p.add_argument("--key-file", metavar="F", help=f"shared key file (default ${ENV_KEY_FILE})")
    p.add_argument(
        "--interval",
        metavar="S",
        type=float,
        default=1.0,
        help="seconds between heartbeats until the manager says otherwise",
    )
    p.add_argument("--mgmt-addr", metavar="A", help="this host's management address")
    p.add_argument("--vm-addr", metavar="A", help="this host's VM-network address")
    p.add_argument(
        "--sysfs",
        metavar="DIR",
        default=None,
        help="read interface states from DIR/*/operstate (e.g. /sys/class/net) "
        "instead of asking the kernel for this network namespace",
    )
    p.add_argument(
        "--acd-watch",
        metavar="IFACE",
        action="append",
        default=[],
        help="run the ARP conflict monitor on IFACE and report conflicts to the "
        "manager (repeatable)",
    )
    p.add_argument(
        "--acd-promisc",
        action="store_true",
        help="with --acd-watch: see forwarded frames too (a bridge's segment)",
    )
    p.add_argument(
        "--partition-bmc",
        metavar="HOST=ADDR",
        action="append",
        default=[],
        help="a peer's BMC address, the second channel asked before a peer is declared down",
    )
    p.add_argument(
        "--partition-link",
        metavar="NET=IFACE,TARGET",
        action="append",
        default=[],
        help="probe NET (mgmt or vm) on IFACE: heartbeats to the other agents and ARP to the "
        "isolation address TARGET; uses --mgmt-addr / --vm-addr (repeatable)",
    )
    p.set_defaults(func=cmd_agent)

    p = subparsers.add_parser(
        "status",
        help="the cluster at a glance",
        description="Show hosts, VMs and placements. Exit 1 if a host is DOWN or a VM CRASHED.",
    )
    p.add_argument("--manager", metavar="URL", help=f"manager URL (default ${ENV_MANAGER})")
    p.add_argument("--key-file", metavar="F", help=f"shared key file (default ${ENV_KEY_FILE})")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.add_argument("--timeout", metavar="S", type=float, default=5.0, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_status)


def _fail(command: str, message: str) -> int:
    print(f"netsvc {command}: error: {message}", file=sys.stderr, flush=True)
    return 2


# -- parsing helpers --------------------------------------------------------------------------


def parse_listen(text: str) -> tuple[str, int]:
    """``ADDR:PORT`` or ``[V6ADDR]:PORT`` -> (addr, port); raise UsageError naming the problem."""
    import ipaddress

    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise UsageError(f"bad --listen {text!r}: expected ADDR:PORT, e.g. 127.0.0.1:7700")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        raise UsageError(f"bad --listen {text!r}: {host!r} is not an IP address") from None
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise UsageError(f"bad --listen {text!r}: port must be 0..65535")
    return host, int(port_text)


def load_manager_config(path: str) -> dict[str, Any]:
    """Read and check a manager TOML config; paths in it are relative to its directory."""
    import tomllib

    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise UsageError(f"cannot read config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config {path} is not valid TOML: {exc}") from None
    base = os.path.dirname(os.path.abspath(path))
    for key, value in data.items():
        types = MANAGER_CONFIG_KEYS.get(key)
        if types is None:
            raise UsageError(
                f"config {path}: unknown key {key!r} "
                f"(known: {', '.join(sorted(MANAGER_CONFIG_KEYS))})"
            )
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            want = " or ".join(t.__name__ for t in types)
            raise UsageError(f"config {path}: {key!r} must be {want}, not {type(value).__name__}")
        if key in ("key_file", "state_dir"):
            data[key] = os.path.join(base, os.path.expanduser(str(value)))
    for i, net in enumerate(data.get("networks", [])):
        if not isinstance(net, dict):
            raise UsageError(f"config {path}: networks[{i}] must be a table")
        unknown = sorted(set(net) - NETWORK_KEYS)
        missing = sorted(NETWORK_KEYS - set(net))
        if unknown:
            raise UsageError(f"config {path}: networks[{i}]: unknown key {unknown[0]!r}")
        if missing:
            raise UsageError(f"config {path}: networks[{i}]: missing key {missing[0]!r}")
        for k in NETWORK_KEYS:
            if not isinstance(net[k], str):
                raise UsageError(f"config {path}: networks[{i}].{k} must be a string")
    if "acd" in data:
        from netsvc.cluster.conflicts import AcdConfig
        from netsvc.cluster.errors import ValidationError

        acd = dict(data["acd"])
        if isinstance(acd.get("dns_key_file"), str) and acd["dns_key_file"]:
            acd["dns_key_file"] = os.path.join(base, os.path.expanduser(acd["dns_key_file"]))
        try:
            AcdConfig.from_mapping(acd)
        except ValidationError as exc:
            raise UsageError(f"config {path}: [acd] {exc}") from None
        data["acd"] = acd
    if "partition" in data:
        from netsvc.partition.response import Policy, ResponseError

        try:
            Policy.from_mapping(data["partition"])
        except ResponseError as exc:
            raise UsageError(f"config {path}: [partition] {exc}") from None
    return data


# -- manager ----------------------------------------------------------------------------------


def cmd_manager(args: argparse.Namespace) -> int:
    from pathlib import Path

    from netsvc.cluster.auth import load_key
    from netsvc.cluster.conflicts import AcdConfig
    from netsvc.cluster.errors import ClusterError
    from netsvc.cluster.journal import Journal
    from netsvc.cluster.manager import ManagerConfig, ManagerServer
    from netsvc.cluster.model import Network
    from netsvc.cluster.store import open_store
    from netsvc.partition.response import Policy

    def log(message: str) -> None:
        print(f"netsvc manager: {message}", file=sys.stderr, flush=True)

    try:
        cfg = load_manager_config(args.config) if args.config else {}
        opts = {
            "listen": args.listen,
            "key_file": args.key_file,
            "state_dir": args.state_dir,
            "store": args.store,
            "heartbeat_interval": args.heartbeat_interval,
            "missed_heartbeats": args.missed_heartbeats,
            "action_timeout": args.action_timeout,
            "access_log": args.access_log,
        }
        for k, v in opts.items():
            if v is not None:
                cfg[k] = v
        for k, flag in (
            ("listen", "--listen"),
            ("key_file", "--key-file"),
            ("state_dir", "--state-dir"),
        ):
            if not cfg.get(k):
                raise UsageError(f"missing {flag} (or {k!r} in the --config file)")
        address = parse_listen(cfg["listen"])
        try:
            networks = tuple(Network(**n) for n in cfg.get("networks", []))
            config = ManagerConfig(
                heartbeat_interval=cfg.get("heartbeat_interval", 1.0),
                missed_heartbeats=cfg.get("missed_heartbeats", 3),
                action_timeout=cfg.get("action_timeout", 60.0),
                networks=networks,
                acd=AcdConfig.from_mapping(cfg.get("acd", {})),
                partition=Policy.from_mapping(cfg.get("partition", {})),
            )
        except ClusterError as exc:
            raise UsageError(f"invalid setting: {exc}") from None
        key = load_key(cfg["key_file"])
        state_dir = Path(cfg["state_dir"])
        try:
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise UsageError(f"cannot create state dir {state_dir}: {exc.strerror}") from None
        store = open_store(cfg.get("store"), state_dir)
        try:
            journal = Journal(state_dir / "journal.jsonl", repair=True)
        except BaseException:
            store.close()
            raise
        try:
            server = ManagerServer(
                address,
                key,
                store,
                journal,
                config=config,
                log=log,
                access_log=bool(cfg.get("access_log", False)),
            )
        except OSError as exc:
            journal.close()
            store.close()
            raise UsageError(f"cannot listen on {cfg['listen']}: {exc.strerror or exc}") from None
        except BaseException:
            journal.close()
            store.close()
            raise
    except UsageError as exc:
        return _fail("manager", str(exc))
    except ClusterError as exc:
        return _fail("manager", str(exc))
    def ready() -> None:
        log(f"listening on {server.url} (state in {state_dir}, pid {os.getpid()})")

    try:
        reason = server.serve_until_signal(on_ready=ready)
    finally:
        server.stop()
        journal.close()
        store.close()
    log(f"stopped: {reason}")
    return 0


# -- agent ------------------------------------------------------------------------------------


def _manager_and_key(args: argparse.Namespace) -> tuple[str, str]:
    url = args.manager or os.environ.get(ENV_MANAGER)
    key_file = args.key_file or os.environ.get(ENV_KEY_FILE)
    if not url:
        raise UsageError(f"no manager URL: give --manager or set {ENV_MANAGER}")
    if not key_file:
        raise UsageError(f"no key file: give --key-file or set {ENV_KEY_FILE}")
    return url, key_file


def cmd_agent(args: argparse.Namespace) -> int:
    from netsvc.cluster.agent import MAX_INTERVAL, MIN_INTERVAL, run_agent
    from netsvc.cluster.auth import load_key
    from netsvc.cluster.client import ManagerClient
    from netsvc.cluster.errors import ClusterError
    from netsvc.cluster.model import check_ip, check_name

    def log(message: str) -> None:
        print(f"netsvc agent {args.host}: {message}", file=sys.stderr, flush=True)

    try:
        url, key_file = _manager_and_key(args)
        check_name(args.host, "host name")
        if not MIN_INTERVAL <= args.interval <= MAX_INTERVAL:
            raise UsageError(
                f"bad --interval {args.interval}: must be {MIN_INTERVAL}..{MAX_INTERVAL} s"
            )
        mgmt = check_ip(args.mgmt_addr, "--mgmt-addr") if args.mgmt_addr else None
        vm = check_ip(args.vm_addr, "--vm-addr") if args.vm_addr else None
        key = load_key(key_file)
        try:
            ManagerClient(url, key)
        except ValueError as exc:
            raise UsageError(f"bad --manager: {exc}") from None
    except (UsageError, ClusterError) as exc:
        return _fail("agent", str(exc))
    log(f"heartbeating to {url} every {args.interval:g} s (pid {os.getpid()})")
    try:
        links = _partition_links(args.partition_link, mgmt, vm)
    except UsageError as exc:
        return _fail("agent", str(exc))
    if links:
        bmcs = {}
        for spec in args.partition_bmc:
            name, _, addr = spec.partition("=")
            try:
                bmcs[check_name(name, "--partition-bmc host")] = check_ip(addr, "--partition-bmc")
            except ClusterError as exc:
                return _fail("agent", str(exc))
        _start_partition(args.host, key, links, lambda: ManagerClient(url, key, timeout=2.0),
                         log, bmcs)
    for iface in args.acd_watch:
        _start_acd_watch(
            iface, args.acd_promisc, ManagerClient(url, key, timeout=2.0), args.host, log
        )
    code = run_agent(
        args.host,
        url,
        key,
        interval=args.interval,
        mgmt_addr=mgmt,
        vm_addr=vm,
        net_dir=args.sysfs,
        log=log,
    )
    log("stopped")
    return code


def _partition_links(specs: list[str], mgmt: str | None, vm: str | None) -> list[Any]:
    """``--partition-link NET=IFACE,TARGET`` values as ``netsvc.partition.agent.Link``s."""
    import ipaddress

    if not specs:
        return []
    from netsvc.partition.agent import Link
    from netsvc.partition.heartbeat import Network

    links = []
    for spec in specs:
        net, _, rest = spec.partition("=")
        iface, _, target = rest.partition(",")
        if net not in ("mgmt", "vm") or not iface or not target:
            raise UsageError(f"bad --partition-link {spec!r}: expected mgmt|vm=IFACE,TARGET")
        try:
            target = str(ipaddress.IPv4Address(target))
        except ValueError:
            raise UsageError(f"bad --partition-link {spec!r}: invalid target address") from None
        addr = mgmt if net == "mgmt" else vm
        if addr is None:
            raise UsageError(f"--partition-link {net}=... needs --{net}-addr")
        links.append(Link(Network.MGMT if net == "mgmt" else Network.VM, iface, addr, target))
    return links


def _start_partition(host: str, key: bytes, links: list[Any], make_client: Callable[[], Any],
                     log: Callable[[str], None], bmcs: dict[str, str] | None = None) -> None:
    """Run the partition prober in a daemon thread, and a poster thread that sends its
    classifications (to the journal) and its views (to ``/v1/partition/reports``) to the
    manager, so a slow or unreachable manager never stalls the probing. Undelivered
    classifications are kept (at most 256); of the views only the latest counts. Each thread
    has its own ``ManagerClient``: a client's connection is not shared between threads."""
    import collections
    import contextlib
    import json
    import threading

    from netsvc.cluster.client import ApiError
    from netsvc.partition.agent import run_prober
    from netsvc.partition.heartbeat import Network

    client, poster_client = make_client(), make_client()

    def peers() -> dict[str, dict[Network, str]]:
        try:
            hosts = client.status()["hosts"]
        except ApiError as exc:
            log(f"partition prober: no peer list yet: {exc}")
            raise OSError(str(exc)) from exc
        out = {}
        for name, h in hosts.items():
            addrs = {}
            if h.get("mgmt_addr"):
                addrs[Network.MGMT] = h["mgmt_addr"]
            if h.get("vm_addr"):
                addrs[Network.VM] = h["vm_addr"]
            out[name] = addrs
        return out

    events: collections.deque[tuple[str, dict[str, Any]]] = collections.deque(maxlen=256)
    latest: list[dict[str, object] | None] = [None]
    wake = threading.Event()

    def report(ev: Any) -> None:
        details = {"old": ev.old.value, "new": ev.new.value, "reporter": host, "at": ev.at}
        log(json.dumps({"event": "Classification", "subject": ev.subject, **details}))
        events.append((ev.subject, {"reason": ev.reason, **details}))
        wake.set()

    def publish(view: dict[str, object]) -> None:
        latest[0] = view
        wake.set()

    def poster() -> None:
        while True:
            wake.wait(1.0)
            wake.clear()
            while events:
                subject, details = events[0]
                body = {k: v for k, v in details.items() if k != "reason"}
                try:
                    poster_client.post_event(f"agent:{host}", "classification", f"host:{subject}",
                                      details["reason"] or "classification changed", body)
                except (ApiError, OSError) as exc:
                    log(f"could not report a classification: {exc}")
                    break
                events.popleft()
            view, latest[0] = latest[0], None
            if view is not None:
                with contextlib.suppress(ApiError, OSError):  # the next view replaces it
                    poster_client.partition_report(view)

    def run() -> None:
        try:
            run_prober(host, key, links, peers, report, threading.Event(), publish=publish,
                       bmcs=bmcs)
        except OSError as exc:
            log(f"partition prober stopped: {exc}")

    threading.Thread(target=poster, name="partition-poster", daemon=True).start()
    threading.Thread(target=run, name="partition-prober", daemon=True).start()


def _start_acd_watch(
    iface: str, promisc: bool, client: Any, host: str, log: Callable[[str], None]
) -> None:
    """Run netsvc.acd's passive monitor on ``iface`` in a daemon thread of the agent."""
    import json
    import threading

    from netsvc.acd.watcher import manager_reporter, watch

    def emit(d: dict[str, Any]) -> None:
        log(json.dumps(d))

    def event(ev: object) -> None:
        if type(ev).__name__ in ("Conflict", "FlipFlop", "ChangedMac", "ProbeForTaken"):
            fields = {k: v for k, v in vars(ev).items() if not isinstance(v, bytes)}
            emit({"event": type(ev).__name__, **fields})

    def run() -> None:
        try:
            watch(
                iface,
                emit=event,
                stop=threading.Event(),
                promisc=promisc,
                report=manager_reporter(client, host, False, emit),
                on_ready=lambda: emit({"event": "Listening", "iface": iface}),
            )
        except OSError as exc:
            log(f"acd watch on {iface} stopped: {exc}")

    threading.Thread(target=run, name=f"acd-watch-{iface}", daemon=True).start()


# -- status -----------------------------------------------------------------------------------


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def format_status(st: dict[str, Any], url: str) -> tuple[list[str], list[str]]:
    """(lines to print, problems) for a status document."""
    hosts: dict[str, Any] = st.get("hosts", {})
    vms: dict[str, Any] = st.get("vms", {})
    problems = []
    if st.get("fenced"):
        problems.append(f"manager is fenced: {st['fenced']}")
    counts: dict[str, int] = {}
    for name, h in hosts.items():
        counts[h["state"]] = counts.get(h["state"], 0) + 1
        if h["state"] == "DOWN":
            problems.append(f"host {name} is DOWN")
    for name, v in vms.items():
        if v["state"] == "CRASHED":
            problems.append(f"VM {name} is CRASHED")
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    actions = st.get("actions", [])
    lines = [
        f"cluster at {url}: {len(hosts)} hosts ({summary or 'none'}), {len(vms)} VMs, "
        f"{len(actions)} open actions, journal seq {st.get('journal_seq', 0)}"
    ]
    if hosts:
        rows = [["HOST", "STATE", "LAST-HB", "MGMT-ADDR", "VM-ADDR", "IFACES-DOWN", "VMS"]]
        for name, h in hosts.items():
            ago = h.get("seconds_since_heartbeat")
            down = [i for i, s in sorted(h.get("interfaces", {}).items()) if s != "up"]
            rows.append(
                [
                    name,
                    h["state"],
                    "-" if ago is None else f"{ago:.1f}s",
                    h.get("mgmt_addr") or "-",
                    h.get("vm_addr") or "-",
                    ",".join(down) or "-",
                    ",".join(h.get("vms", [])) or "-",
                ]
            )
        lines += ["", *_table(rows)]
    if vms:
        rows = [["VM", "STATE", "HOST", "IP", "MAC"]]
        for name, v in vms.items():
            rows.append([name, v["state"], v.get("host") or "-", v["ip"], v["mac"]])
        lines += ["", *_table(rows)]
    if actions:
        rows = [["ACTION", "KIND", "VM", "FROM", "TO", "STATE", "EXECUTOR"]]
        for a in actions:
            if a["kind"] == "readdress":  # from one address to another
                src, dst = a.get("old_ip"), a.get("new_ip")
            else:
                src, dst = a.get("from"), a.get("to")
            rows.append(
                [
                    a["id"],
                    a["kind"],
                    a["vm"],
                    src or "-",
                    dst or "-",
                    a["state"],
                    a.get("executor") or "-",
                ]
            )
        lines += ["", *_table(rows)]
    if problems:
        lines += [""] + [f"problem: {p}" for p in problems]
    return lines, problems


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from netsvc.cluster.auth import load_key
    from netsvc.cluster.client import ApiError, ConnectionFailed, ManagerClient
    from netsvc.cluster.errors import ClusterError

    try:
        url, key_file = _manager_and_key(args)
        key = load_key(key_file)
        try:
            client = ManagerClient(url, key, timeout=args.timeout)
        except ValueError as exc:
            raise UsageError(f"bad --manager: {exc}") from None
        try:
            st = client.status()
        except ConnectionFailed as exc:
            raise UsageError(exc.message) from None
        except ApiError as exc:
            if exc.status == 401:
                raise UsageError(f"the manager at {url} rejected the key in {key_file}") from None
            raise UsageError(f"the manager at {url} answered {exc}") from None
    except (UsageError, ClusterError) as exc:
        return _fail("status", str(exc))
    try:
        lines, problems = format_status(st, url)
    except (KeyError, TypeError, AttributeError) as exc:
        return _fail("status", f"the manager sent a status this version cannot read: {exc!r}")
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True))
    else:
        print("\n".join(lines))
    return 1 if problems else 0
