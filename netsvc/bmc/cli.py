"""``netsvc bmc``: run an IPMI 2.0 BMC, or ask one for its host's power.

    netsvc bmc serve --bind ADDR [--port P] --user U --password-file F
                     (--host-pid PID | --power-file F) [--name NAME] [--json]
    netsvc bmc power HOST_ADDR status|on|off|soft|cycle --user U --password-file F
                     [--port P] [--timeout S] [--wait S] [--json]

``serve`` runs in the foreground until SIGTERM or SIGINT (then exits 0). Its power backend is
a process (``--host-pid``: on while it lives, off = SIGKILL, soft = SIGTERM, on impossible) or
a file holding ``on``/``off`` (``--power-file``). ``--port 0`` takes any free port; the ready
line says which.

``power`` is one request through :class:`netsvc.bmc.client.BmcClient`: ``status`` prints the
state; ``off`` and ``on`` then wait up to ``--wait`` s for the BMC to report that state;
``soft`` waits for "off" the same way; ``cycle`` only checks that the BMC accepted it.

The password file holds one line and must not be readable by group or others (mode 0600).
The password is never printed or logged.

Exit codes: 0 fine; 1 the BMC refused, or the host is not in the asked state; 2 usage or
environment error (bad option or file, BMC unreachable, wrong user or password), one line.

(Also runnable as ``python -m netsvc.bmc.cli bmc ...`` until the command is registered.)
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from pathlib import Path
from typing import NoReturn

from netsvc.bmc.client import Outcome
from netsvc.ops import config


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors are one line on stderr and exit 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: {message}", file=sys.stderr)
        raise SystemExit(2)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "bmc",
        help="IPMI 2.0 BMC (serve) and client (power)",
        description="An IPMI 2.0 (RMCP+) BMC acting on a host's power, and a one-shot client.",
    )
    p.set_defaults(func=_no_action)
    u = p.add_subparsers(dest="bmc_cmd", metavar="ACTION", parser_class=_OneLineParser)

    serve = u.add_parser("serve", help="run a BMC in the foreground")
    serve.add_argument("--bind", default="::", help="address to listen on (default ::)")
    serve.add_argument("--port", type=int, default=623, help="UDP port (default 623; 0: any)")
    serve.add_argument("--user", required=True, help="the IPMI user name")
    serve.add_argument("--password-file", required=True, type=Path, metavar="F")
    serve.add_argument("--host-pid", type=int, metavar="PID", help="the host is this process")
    serve.add_argument("--power-file", type=Path, metavar="F", help="the host's power: on/off")
    serve.add_argument("--name", help="this BMC's name in logs (default bmc)")
    serve.add_argument("--config-store", type=Path, metavar="F",
                       help="serve a configuration store (IPMI OEM 0x30, config_store.py), "
                       "kept in this file")
    serve.add_argument("--dcmi-watts", metavar="on=W,off=W,storage=W",
                       help="answer DCMI power readings with these watts (netsvc.bmc.dcmi)")
    serve.add_argument("--json", action="store_true", help="print the ready line as JSON")
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error", "critical"),
                       default="info", help="least severe level logged (default info)")
    config.register(serve, "bmc")
    serve.set_defaults(func=cmd_serve)

    power = u.add_parser("power", help="ask a BMC for, or change, its host's power")
    power.add_argument("host", metavar="HOST_ADDR", help="the BMC's address")
    power.add_argument("action", choices=["status", "on", "off", "soft", "cycle"])
    power.add_argument("--user", required=True)
    power.add_argument("--password-file", required=True, type=Path, metavar="F")
    power.add_argument("--port", type=int, default=623)
    power.add_argument("--timeout", type=float, default=5.0, help="per request (default 5 s)")
    power.add_argument("--wait", type=float, default=10.0,
                       help="on/off/soft: wait this long for the state (default 10 s; 0: no)")
    power.add_argument("--json", action="store_true", help="print JSON")
    power.set_defaults(func=cmd_power)


def _no_action(args: argparse.Namespace) -> int:
    print("netsvc bmc: choose an action: serve or power", file=sys.stderr)
    return 2


def load_password(path: Path) -> str:
    """The password in ``path``: one line, 1-20 bytes, in a file that group and others
    cannot read. Raises ValueError (whose text never holds the password)."""
    try:
        st = os.stat(path)
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read password file {path}: {exc.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(f"password file {path} is open to group or others (chmod 600 it)")
    lines = raw.decode("utf-8", "replace").splitlines()
    if len(lines) != 1 or not lines[0]:
        raise ValueError(f"password file {path} must hold exactly one non-empty line")
    if len(lines[0].encode()) > 20:
        raise ValueError(f"password in {path} is longer than IPMI's 20 bytes")
    return lines[0]


def _port(value: int, allow_zero: bool = False) -> int:
    if not (0 if allow_zero else 1) <= value <= 65535:
        raise ValueError(f"bad --port {value}")
    return value


def cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from netsvc.bmc.server import BmcServer, PowerBackend, PowerFileBackend, ProcessBackend

    prog = "netsvc bmc serve"
    if (args.host_pid is None) == (args.power_file is None):
        print(f"{prog}: give exactly one of --host-pid and --power-file", file=sys.stderr)
        return 2
    backend: PowerBackend
    try:
        _port(args.port, allow_zero=True)
        password = load_password(args.password_file)
        if args.host_pid is not None:
            backend = ProcessBackend(args.host_pid)
        else:
            if not args.power_file.parent.is_dir():
                raise ValueError(f"no directory for --power-file {args.power_file}")
            backend = PowerFileBackend(args.power_file)
        name = args.name or "bmc"
        server = BmcServer(backend, {args.user: password}, bind=args.bind, port=args.port,
                           name=name)
        if args.config_store is not None:
            from netsvc.bmc import config_store

            config_store.install(server, config_store.ConfigStore(args.config_store))
        if args.dcmi_watts is not None:
            from netsvc.bmc.dcmi import DcmiConfig, install

            install(server, DcmiConfig.parse(args.dcmi_watts))
    except (ValueError, OSError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    from netsvc.ops import logs, notify

    logs.setup(f"bmc {name}", args.log_level)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        info = {"name": name, "bind": server.address, "port": server.port,
                "user": args.user, "backend": backend.describe()}
        if args.json:
            print(json.dumps(info), flush=True)
        else:
            print(f"bmc {name}: IPMI 2.0 on {args.bind}:{server.port} for user {args.user}, "
                  f"power from {backend.describe()}", flush=True)
        notify.ready(f"IPMI 2.0 on {args.bind}:{server.port}")
        server.serve_forever(stop)
    finally:
        notify.stopping()
        server.stop()
        if isinstance(backend, ProcessBackend):
            backend.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def cmd_power(args: argparse.Namespace) -> int:
    from netsvc.bmc.client import BmcClient

    prog = "netsvc bmc power"
    try:
        _port(args.port)
        if args.timeout <= 0 or args.wait < 0:
            raise ValueError("--timeout must be > 0 and --wait >= 0")
        password = load_password(args.password_file)
        client = BmcClient(args.host, args.user, password, port=args.port, timeout=args.timeout)
    except ValueError as exc:
        _fail(prog, str(args.host), args.action, str(exc), args.json)
        return 2
    action = args.action
    wait = args.wait > 0
    if action == "status":
        out = client.power_status()
    elif action == "off":
        out = client.power_off(wait=wait, wait_timeout=args.wait)
    elif action == "on":
        out = client.power_on(wait=wait, wait_timeout=args.wait)
    elif action == "soft":
        out = client.soft_off()
        if out.ok and wait:
            out = client.confirm_off(args.wait)
    else:
        out = client.power_cycle()
    rc = exit_code(out)
    if args.json:
        print(json.dumps({"bmc": args.host, "port": args.port, "action": action,
                          **out.to_json()}))
    elif out.ok:
        print(f"{args.host}: {out.state}" if out.state else f"{args.host}: {action} accepted")
    else:
        print(f"{prog}: {args.host}: {action}: {out.kind}: {out.error}", file=sys.stderr)
    return rc


def exit_code(out: Outcome) -> int:
    """0 ok; 1 the BMC answered but refused or the host is not in the asked state; 2 the BMC
    could not be asked (no answer, wrong credentials, nonsense)."""
    if out.ok:
        return 0
    if out.kind == "refused" or out.state is not None:
        return 1
    return 2


def _fail(prog: str, host: str, action: str, message: str, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"bmc": host, "action": action, "ok": False, "kind": "usage",
                          "error": message}))
    else:
        print(f"{prog}: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """A standalone ``netsvc``-like entry with only the ``bmc`` command (tests, ``-m``)."""
    parser = argparse.ArgumentParser(prog="netsvc")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND")
    register(sub)
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help(sys.stderr)
        return 2
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
