"""The ``manager``, ``agent`` and ``status`` subcommands (and, from ``tools``, ``journal`` and
``migrate``).

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
import gc
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from netsvc.cluster.service import ServicePlugin

ENV_MANAGER = "NETSVC_MANAGER"
ENV_KEY_FILE = "NETSVC_KEY_FILE"
ENV_CA_FILE = "NETSVC_CA_FILE"



class UsageError(Exception):
    """A usage or environment problem: exit 2 with a one-line message."""


def _daemon_arguments(p: argparse.ArgumentParser, log_default: str | None = "info") -> None:
    """``--log-level`` and ``--metrics-addr``, which every long-running command takes."""
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error", "critical"),
                   default=log_default, help="least severe level logged (default info)")
    p.add_argument("--metrics-addr", metavar="ADDR:PORT", default=None,
                   help="serve Prometheus metrics on http://ADDR:PORT/metrics")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
             plugins: Sequence[ServicePlugin] = ()) -> None:
    """Add the ``manager``, ``agent`` and ``status`` subcommands; ``plugins`` (from the
    composition root) add their config tables, agent arguments and agent loops."""
    p = subparsers.add_parser(
        "manager",
        help="run the cluster manager (HTTP+JSON API, decisions, audit journal)",
        description="Run the cluster manager. The state dir holds the SQLite state store "
        "(state.sqlite, unless --store names etcd) and the audit journal (journal.jsonl).",
    )
    p.add_argument("--listen", metavar="ADDR:PORT", help="address to serve the API on")
    p.add_argument("--key-file", metavar="F",
                   help="the keyring: one secret per line, the first signs new tokens (mode "
                   "0600; `netsvc key generate`); a change is picked up while serving")
    p.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate")
    p.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    p.add_argument("--client-ca", metavar="PEM",
                   help="with --tls-cert: require client certificates issued by this CA")
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
    p.add_argument("--config", metavar="FILE",
                   help="TOML file with the same options (default /etc/netsvc/manager.toml, "
                   "if it exists)")
    p.add_argument(
        "--access-log", action="store_true", default=None, help="log every request on stderr"
    )
    p.add_argument("--ha", action="store_true", default=None,
                   help="one of several managers on an etcd --store: lead or stand by")
    p.add_argument("--advertise-url", metavar="URL",
                   help="with --ha: this manager's URL, which standbys tell clients")
    p.add_argument("--leader-ttl", metavar="S", type=int,
                   help="with --ha: seconds of the leader's etcd lease (default 2)")
    _daemon_arguments(p, log_default=None)
    p.set_defaults(func=cmd_manager, plugins=tuple(plugins))

    p = subparsers.add_parser(
        "agent",
        help="run the per-host agent (heartbeats to the manager)",
        description="Heartbeat to the manager every interval with this host's interface "
        "states. Exits 0 on SIGTERM/SIGINT.",
    )
    p.add_argument("--host", metavar="NAME", required=True, help="this host's cluster name")
    add_connection_args(p)
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
        "--driver",
        metavar="SPEC",
        default=None,
        help="carry out this host's actions through a hypervisor driver: lab:HV_DIR (the "
        "lab's namespace VMs) or libvirt:URI (e.g. libvirt:qemu:///system); without it the "
        "agent only reports",
    )
    for plugin in plugins:
        if plugin.agent is not None:
            plugin.agent.add_arguments(p)
    _daemon_arguments(p)
    from netsvc.ops import config

    config.register(p, "agent")
    p.set_defaults(func=cmd_agent, plugins=tuple(plugins))

    p = subparsers.add_parser(
        "status",
        help="the cluster at a glance",
        description="Show hosts, VMs and placements. Exit 1 if a host is DOWN or a VM CRASHED.",
    )
    add_connection_args(p)
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.add_argument("--timeout", metavar="S", type=float, default=5.0, help=argparse.SUPPRESS)
    p.add_argument("--watch", metavar="S", type=float, nargs="?", const=2.0, default=None,
                   help="redraw every S seconds (default 2) until Ctrl-C, like crm_mon")
    p.set_defaults(func=cmd_status)

    from netsvc.cluster import tools

    tools.register(subparsers, _manager_arguments)


def _manager_arguments(p: argparse.ArgumentParser) -> None:
    add_connection_args(p)


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


def load_manager_config(path: str, plugins: Sequence[ServicePlugin] = ()) -> dict[str, Any]:
    """Read and check a manager TOML config; paths in it are relative to its directory.
    Each service's table (``[acd]``, ``[partition]``) is checked by its plugin; the result has
    the validated configs under ``"services"``."""
    import tomllib

    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise UsageError(f"cannot read config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config {path} is not valid TOML: {exc}") from None
    base = os.path.dirname(os.path.abspath(path))
    import msgspec

    from netsvc.cluster.errors import ValidationError
    from netsvc.cluster.schemas import split_manager_config

    tables = {pl.name: pl for pl in plugins if pl.config is not None}
    try:
        kernel, service_tables = split_manager_config(data, [*tables, "fencing"])
    except ValidationError as exc:
        raise UsageError(f"config {path}: {exc}") from None
    data = {k: v for k, v in msgspec.structs.asdict(kernel).items()
            if v is not None or k in data}
    data["networks"] = [msgspec.structs.asdict(n) for n in kernel.networks]
    for key in ("key_file", "state_dir", "tls_cert", "tls_key", "client_ca"):
        if data.get(key):
            data[key] = os.path.join(base, os.path.expanduser(str(data[key])))
    services: dict[str, Any] = {}
    for name, pl in tables.items():
        assert pl.config is not None
        try:
            services[name] = pl.config(service_tables.get(name, {}), base)
        except ValidationError as exc:
            raise UsageError(f"config {path}: [{name}] {exc}") from None
    data["services"] = services
    from netsvc.cluster.fencing import FencingConfig

    try:
        data["fencing"] = FencingConfig.from_table(service_tables.get("fencing", {}), base)
    except ValidationError as exc:
        raise UsageError(f"config {path}: [fencing] {exc}") from None
    return data


def _fence_agent(config: Any) -> Any:
    """The BMC fence agent (IPMI), when the config names any BMC; None otherwise."""
    if not config.fencing.bmcs:
        return None
    from netsvc.bmc.fence import ipmi_fence, warm_up

    warm_up(config.fencing.bmcs)
    return ipmi_fence


def load_manager_config_defaults(plugins: Sequence[ServicePlugin]) -> dict[str, Any]:
    """The config with no file: every service's table empty (its defaults)."""
    from netsvc.cluster.errors import ValidationError

    services = {}
    for pl in plugins:
        if pl.config is not None:
            try:
                services[pl.name] = pl.config({}, None)
            except ValidationError as exc:
                raise UsageError(f"[{pl.name}] defaults: {exc}") from None
    return {"services": services}


# -- manager ----------------------------------------------------------------------------------


def cmd_manager(args: argparse.Namespace) -> int:
    from pathlib import Path

    from netsvc.cluster.auth import load_keyring
    from netsvc.cluster.errors import ClusterError
    from netsvc.cluster.journal import Journal
    from netsvc.cluster.manager import ManagerConfig, ManagerServer
    from netsvc.cluster.model import Network
    from netsvc.cluster.server import KeyringWatcher, ServerLimits, TlsConfig
    from netsvc.cluster.store import open_store
    from netsvc.ops import logs, notify

    plugins: Sequence[ServicePlugin] = args.plugins
    logger = logs.setup("netsvc manager", args.log_level or "info").getChild("manager")

    def log(message: str) -> None:
        if message.startswith("WARNING: "):
            logger.warning(message[len("WARNING: "):])
        else:
            logger.info(message)

    try:
        config_path = args.config or _default_config("manager")
        cfg = load_manager_config(config_path, plugins) if config_path else \
            load_manager_config_defaults(plugins)
        if args.log_level is None and cfg.get("log_level"):
            logs.setup("netsvc manager", cfg["log_level"])
        opts = {
            "listen": args.listen,
            "key_file": args.key_file,
            "state_dir": args.state_dir,
            "store": args.store,
            "heartbeat_interval": args.heartbeat_interval,
            "missed_heartbeats": args.missed_heartbeats,
            "action_timeout": args.action_timeout,
            "access_log": args.access_log,
            "metrics_addr": args.metrics_addr,
            "tls_cert": args.tls_cert,
            "tls_key": args.tls_key,
            "client_ca": args.client_ca,
            "ha": getattr(args, "ha", None),
            "advertise_url": getattr(args, "advertise_url", None),
            "leader_ttl": getattr(args, "leader_ttl", None),
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
                services=cfg["services"],
                **({"fencing": cfg["fencing"]} if "fencing" in cfg else {}),
            )
            services = [pl.manager(cfg["services"].get(pl.name)) for pl in plugins
                        if pl.manager is not None]
        except ClusterError as exc:
            raise UsageError(f"invalid setting: {exc}") from None
        keyring = load_keyring(cfg["key_file"])
        tls = None
        if cfg.get("tls_cert") or cfg.get("tls_key") or cfg.get("client_ca"):
            if not (cfg.get("tls_cert") and cfg.get("tls_key")):
                raise UsageError("TLS needs both --tls-cert and --tls-key")
            tls = TlsConfig(cfg["tls_cert"], cfg["tls_key"], cfg.get("client_ca"))
            try:
                tls.context()
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                raise UsageError(f"cannot use the TLS files: {exc}") from None
        limits = ServerLimits(
            max_connections=cfg.get("max_connections", 4096),
            max_per_peer=cfg.get("max_per_peer", 64),
            request_timeout=cfg.get("request_timeout", 10.0),
            idle_timeout=cfg.get("idle_timeout", 60.0),
        )
        state_dir = Path(cfg["state_dir"])
        try:
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise UsageError(f"cannot create state dir {state_dir}: {exc.strerror}") from None
        metrics = metrics_server = None
        if cfg.get("metrics_addr"):
            from netsvc.ops.metrics import ManagerMetrics, MetricsServer, parse_addr

            try:
                parse_addr(cfg["metrics_addr"])
            except ValueError as exc:
                raise UsageError(str(exc)) from None
            metrics = ManagerMetrics()
        if cfg.get("ha"):
            from netsvc.cluster.leader import run_manager_ha

            if metrics is not None:
                from netsvc.ops.metrics import MetricsServer

                metrics_server = MetricsServer(cfg["metrics_addr"], metrics.registry)
            try:
                return run_manager_ha(cfg, address, keyring, config, plugins, log,
                                      fence_agent=_fence_agent(config), observer=metrics,
                                      limits=limits, tls=tls)
            finally:
                if metrics_server is not None:
                    metrics_server.close()
        store = open_store(cfg.get("store"), state_dir)
        try:
            journal = Journal(state_dir / "journal.jsonl", repair=True)
        except BaseException:
            store.close()
            raise
        try:
            server = ManagerServer(
                address,
                keyring,
                store,
                journal,
                config=config,
                services=services,
                fence_agent=_fence_agent(config),
                log=log,
                access_log=bool(cfg.get("access_log", False)),
                observer=metrics,
                limits=limits,
                tls=tls,
            )
            server.api.max_body = cfg.get("max_body", server.api.max_body)
            # The state just loaded lives as long as the daemon: keep it out of the cyclic
            # collector's full passes (30 ms each at 30,000 VMs, a pause for every request).
            gc.freeze()
            if metrics is not None:
                metrics.watch_server(lambda: server.http_stats)
                metrics_server = MetricsServer(cfg["metrics_addr"], metrics.registry)
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
        if metrics_server is not None:
            log(f"metrics on {metrics_server.url}")
        notify.ready(f"serving on {server.url}")

    watcher = KeyringWatcher(cfg["key_file"], server.set_keyring, log)
    try:
        reason = server.serve_until_signal(on_ready=ready)
    finally:
        notify.stopping()
        watcher.close()
        server.stop()
        if metrics_server is not None:
            metrics_server.close()
        journal.close()
        store.close()
    log(f"stopped: {reason}")
    return 0


def _default_config(daemon: str) -> str | None:
    """``/etc/netsvc/<daemon>.toml`` (or under ``$NETSVC_CONFIG_DIR``) if it exists."""
    from netsvc.ops.config import default_path

    path = default_path(daemon)
    return path if os.path.exists(path) else None


# -- agent ------------------------------------------------------------------------------------


def add_connection_args(q: argparse.ArgumentParser) -> None:
    """How to reach the manager: its URL, the credential, and TLS (every client command and
    the agent take these)."""
    q.add_argument("--manager", metavar="URL",
                   help=f"manager URL, http:// or https:// (default ${ENV_MANAGER})")
    q.add_argument("--key-file", metavar="F",
                   help=f"credential file: a token from `netsvc key issue` or the shared key "
                   f"(default ${ENV_KEY_FILE})")
    q.add_argument("--ca-file", metavar="PEM",
                   help=f"verify an https:// manager against this CA (default ${ENV_CA_FILE}; "
                   "else the system's CAs)")
    q.add_argument("--client-cert", metavar="PEM",
                   help="present this client certificate (when the manager asks for one)")
    q.add_argument("--client-key", metavar="PEM", help="the private key of --client-cert")


def add_manager_args(q: argparse.ArgumentParser, timeout: float = 5.0) -> None:
    """The options every service's operator command takes to reach the manager."""
    add_connection_args(q)
    q.add_argument("--json", action="store_true")
    q.add_argument("--timeout", type=float, default=timeout, help=argparse.SUPPRESS)


def tls_options(args: argparse.Namespace) -> dict[str, Any]:
    """``ManagerClient`` keyword arguments for ``add_connection_args``' TLS options."""
    ca = getattr(args, "ca_file", None) or os.environ.get(ENV_CA_FILE) or None
    url = getattr(args, "manager", None) or os.environ.get(ENV_MANAGER) or ""
    if not url.startswith("https://"):
        if getattr(args, "ca_file", None) or getattr(args, "client_cert", None):
            raise UsageError("--ca-file and --client-cert need an https:// manager URL")
        return {}
    return {"ca_file": ca, "client_cert": getattr(args, "client_cert", None),
            "client_key": getattr(args, "client_key", None)}


def client_from_args(args: argparse.Namespace, timeout: float | None = None) -> Any:
    """A ``ManagerClient`` for ``add_connection_args``' options; ``UsageError`` (exit 2) for a
    missing URL or key, an unreadable key file or a bad URL or TLS file."""
    from netsvc.cluster.auth import KeyFileError, load_key
    from netsvc.cluster.failover_client import manager_client as client_for

    url, key_file = _manager_and_key(args)
    try:
        key = load_key(key_file)
    except KeyFileError as exc:
        raise UsageError(str(exc)) from None
    try:  # several URLs (``--manager URL1,URL2``): it follows the leader
        return client_for(url, key, timeout=timeout if timeout is not None else
                          getattr(args, "timeout", 5.0), **tls_options(args))
    except ValueError as exc:
        raise UsageError(f"bad --manager: {exc}") from None


def print_usage(p: argparse.ArgumentParser) -> int:
    """A command group run without a subcommand: its help on stderr, exit 2."""
    p.print_help(sys.stderr)
    return 2


def fetch_json(args: argparse.Namespace, path: str, what: str) -> dict[str, Any] | None:
    """``GET path`` on the manager ``add_manager_args``' options name: the document, or None
    once the reason (a usage, connection or HTTP error) is on stderr as ``what: ...`` (the
    caller exits 2). The status commands of the services share it."""
    from netsvc.cluster.client import ApiError
    from netsvc.cluster.errors import ClusterError

    try:
        status, st = manager_client(args).request("GET", path)
        if status != 200:
            raise ApiError(status, str(st.get("error", st)), st)
    except (UsageError, ClusterError, ApiError, ValueError, OSError) as exc:
        print(f"{what}: {exc}", file=sys.stderr)
        return None
    return dict(st)


def post_operator(args: argparse.Namespace, path: str, body: dict[str, Any],
                  what: str) -> tuple[int, dict[str, Any]]:
    """An operator's ``POST path``: (0, the answer) when it was accepted (200), else (the
    exit code, {}) once it was said: 1 for a refusal (409, its rule on stderr: nothing
    changed), 2 for anything else. With ``--json`` the answer is printed as it came, with
    its ``http_status``. The services' operator commands share it."""
    from netsvc.cluster.client import ApiError
    from netsvc.cluster.errors import ClusterError

    try:
        status, out = manager_client(args).request("POST", path, body)
    except (UsageError, ClusterError, ApiError, ValueError, OSError) as exc:
        print(f"{what}: {exc}", file=sys.stderr)
        return 2, {}
    if args.json:
        print(json.dumps({"http_status": status, **out}, indent=2, sort_keys=True))
    if status == 409:
        if not args.json:
            print(f"{what}: refused (rule {out.get('rule')}): {out.get('error')}; nothing "
                  "changed", file=sys.stderr)
        return 1, {}
    if status != 200:
        if not args.json:
            print(f"{what}: {out.get('error', out)}", file=sys.stderr)
        return 2, {}
    return 0, dict(out)


def show_json(args: argparse.Namespace, doc: Any, render: Callable[[Any], str]) -> int:
    """Print ``doc`` as JSON with ``--json``, else ``render(doc)``; exit 0."""
    print(json.dumps(doc, indent=2, sort_keys=True) if args.json else render(doc))
    return 0


def manager_client(args: argparse.Namespace) -> Any:
    """A client (``ManagerClient``) for ``add_manager_args``' options (a usage error if they
    are missing)."""
    return client_from_args(args)


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
    from netsvc.cluster.failover_client import manager_client as client_for
    from netsvc.cluster.model import check_ip, check_name
    from netsvc.ops import logs, notify

    logger = logs.setup(f"netsvc agent {args.host}", args.log_level).getChild("agent")

    def log(message: str) -> None:
        level = logs.level_of(message)
        logger.log(level, message)

    try:
        url, key_file = _manager_and_key(args)
        check_name(args.host, "host name")
        if not MIN_INTERVAL <= args.interval <= MAX_INTERVAL:
            raise UsageError(
                f"bad --interval {args.interval}: must be {MIN_INTERVAL}..{MAX_INTERVAL} s"
            )
        mgmt = check_ip(args.mgmt_addr, "--mgmt-addr") if args.mgmt_addr else None
        vm = check_ip(args.vm_addr, "--vm-addr") if args.vm_addr else None
        if args.metrics_addr:
            from netsvc.ops.metrics import parse_addr

            try:
                parse_addr(args.metrics_addr)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
        key = load_key(key_file)
        tls = tls_options(args)
        try:
            client_for(url, key, **tls)
        except ValueError as exc:
            raise UsageError(f"bad --manager: {exc}") from None
    except (UsageError, ClusterError) as exc:
        return _fail("agent", str(exc))
    import threading

    from netsvc.cluster.executor import VM_EXECUTORS, run_executor
    from netsvc.cluster.service import AgentContext

    plugins: Sequence[ServicePlugin] = args.plugins
    driver = None
    if args.driver:
        from netsvc.hypervisor import open_driver
        from netsvc.hypervisor.driver import DriverError

        try:
            driver = open_driver(args.driver, args.host)
        except DriverError as exc:
            return _fail("agent", f"bad --driver {args.driver!r}: {exc}")

    def make_client(timeout: float = 2.0) -> ManagerClient:
        # kept-alive: a service's long-lived client (the partition poster, the executor's
        # claims) pays one TLS handshake, not one per request; it follows the leader
        return client_for(url, key, timeout=timeout, persistent=True, **tls)

    ctx = AgentContext(host=args.host, url=url, key=key, make_client=make_client,
                       driver=driver, log=log, mgmt_addr=mgmt, vm_addr=vm)
    log(f"heartbeating to {url} every {args.interval:g} s (pid {os.getpid()}"
        f"{', driver ' + args.driver if driver else ''})")
    executors = dict(VM_EXECUTORS)
    for plugin in plugins:
        if plugin.agent is None:
            continue
        try:
            plugin.agent.start(args, ctx)
        except (ValueError, ClusterError) as exc:
            return _fail("agent", f"{plugin.name}: {exc}")
        executors.update(plugin.agent.executors)
        if plugin.agent.vm_hooks is not None:
            ctx.vm_hooks.append(plugin.agent.vm_hooks)
    metrics = metrics_server = None
    if args.metrics_addr:
        from netsvc.ops.metrics import AgentMetrics, RetryingMetricsServer

        metrics = AgentMetrics(ctx.stats)
        metrics_server = RetryingMetricsServer(args.metrics_addr, metrics.registry, log)
    stop = threading.Event()
    if driver is not None:
        threading.Thread(target=run_executor, args=(ctx, executors, stop), daemon=True,
                         name="executor").start()

    def inventory() -> dict[str, str]:
        assert driver is not None
        return {d.name: d.state for d in driver.list()}

    code = run_agent(
        args.host,
        url,
        key,
        interval=args.interval,
        mgmt_addr=mgmt,
        vm_addr=vm,
        net_dir=args.sysfs,
        log=log,
        inventory=inventory if driver is not None else None,
        on_beat=metrics.beat if metrics is not None else None,
        on_start=lambda: notify.ready(f"heartbeating to {url}"),
        tls=tls,
    )
    notify.stopping()
    stop.set()
    if metrics_server is not None:
        metrics_server.close()
    if driver is not None:
        driver.close()
    log("stopped")
    return code


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
                    h["state"] + (" (maintenance)" if h.get("maintenance") else ""),
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


def _fetch_status(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """The manager's status document and its URL; UsageError (exit 2) naming the problem."""
    from netsvc.cluster.client import ApiError, ConnectionFailed

    url, key_file = _manager_and_key(args)
    client = client_from_args(args)
    try:
        return dict(client.status()), url
    except ConnectionFailed as exc:
        raise UsageError(exc.message) from None
    except ApiError as exc:
        if exc.status == 401:
            raise UsageError(f"the manager at {url} rejected the key in {key_file}") from None
        raise UsageError(f"the manager at {url} answered {exc}") from None


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from netsvc.cluster.errors import ClusterError

    if args.watch is not None:
        return _watch_status(args)
    try:
        st, url = _fetch_status(args)
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


def _watch_status(args: argparse.Namespace) -> int:
    """``status --watch``: a bad key or URL is exit 2 at once; a manager that stops answering
    while watched is shown as a problem line, and the watch goes on (as crm_mon does)."""
    from netsvc.cluster.errors import ClusterError
    from netsvc.cluster.tools import watch_status

    if not 0.1 <= args.watch <= 3600:
        return _fail("status", f"bad --watch {args.watch}: must be 0.1..3600 s")
    try:
        _manager_and_key(args)
        from netsvc.cluster.auth import load_key

        load_key(_manager_and_key(args)[1])
    except (UsageError, ClusterError) as exc:
        return _fail("status", str(exc))

    def render() -> tuple[list[str], int]:
        try:
            st, url = _fetch_status(args)
            lines, problems = format_status(st, url)
        except (UsageError, ClusterError) as exc:
            return [f"problem: {exc}"], 2
        except (KeyError, TypeError, AttributeError) as exc:
            return [f"problem: a status this version cannot read: {exc!r}"], 2
        return lines, 1 if problems else 0

    return watch_status(render, args.watch)
