"""``netsvc usbip``: export virtual USB devices over USB/IP, list them, and attach to them.

    netsvc usbip serve [--bind ADDR] [--port P] [--device SPEC ...] [TLS] [--json]
    netsvc usbip list HOST [--port P] [TLS] [--json]
    netsvc usbip attach HOST BUSID [--port P] [TLS] [--describe | --need | --measure S]
                        [--unix PATH] [--no-reconnect] [--json]
    netsvc usbip place VM DEVICE_HOST BUSID (--allocation-bps N | --from-tc [PID,]IFACE)
                       [--classid 1:10] [--device-addr ADDR] [--port P] [--need-bps N]
                       [--threshold 0.5] [--manager URL --key-file F] [--dry-run] [--json]
                       [--no-open | --channel PATH --channel-netns PID --open-timeout S]

TLS is ``--tls-psk-file F`` (pre-shared key), or ``--tls-ca CA`` with ``--tls-cert C
--tls-key K`` (mutual TLS); without them the wire is plain Linux USB/IP.

``attach`` imports the device, enumerates it and then relays its data to a local process:
with ``--unix PATH`` to one client at a time on a Unix stream socket, otherwise to
stdin/stdout. Bytes from the process go to the first bulk OUT endpoint; bytes from the first
bulk IN endpoint go to the process. A keyboard's interrupt reports are relayed as the text
they type. The channel reconnects by itself (``--no-reconnect`` to fail instead).

``place`` decides whether VM should move to DEVICE_HOST (the device's need is more than
``--threshold`` of the VM's allocated bandwidth) or reach the device over a tunnel. The need is
the larger of what the device declares (its periodic endpoints' reservation, or its answer to
netsvc's need request when its descriptors announce one) and what its server measured (the
peak URB throughput over the server's window, ``netsvc.usbip.need``), asked at
``--device-addr`` (default DEVICE_HOST), unless ``--need-bps`` gives it;
the allocation is ``--allocation-bps`` or the htb class on IFACE in the namespace of PID
(``netsvc.usbip.placement``). With ``--manager`` the decision is journaled and a migrate
decision is asked of the manager (its safety rules apply); ``--dry-run`` prints the numbers and
moves nothing (the manager, if given, is asked for a plan only). Without ``--manager`` a
migrate decision is only printed with ``--dry-run``. A tunnel decision opens the channel
(``netsvc.usbip.opener``: a detached ``attach --unix PATH`` in this network namespace or
``--channel-netns PID``'s), waits until it is ready and prints its pid, socket and log
(journaled as ``usbip-channel-opened`` with ``--manager``); ``--no-open`` prints the attach
command instead, and a channel that does not open makes ``place`` exit 1.

Exit codes: 0 fine, 1 the device or server refused (busy, no such device, transfer error; for
``place``, the manager refused the migration), 2 usage or environment error (bad option,
server unreachable).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import threading
import time
from typing import Any, BinaryIO


def _tls_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("TLS (optional; plain mode is wire-compatible with Linux usbip)")
    g.add_argument("--tls-psk-file", metavar="F", help="pre-shared key file (hex or raw, >=16 B)")
    g.add_argument("--tls-cert", metavar="F", help="our certificate (PEM)")
    g.add_argument("--tls-key", metavar="F", help="our private key (PEM)")
    g.add_argument("--tls-ca", metavar="F", help="CA that signs the peer's certificate")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "usbip",
        help="USB/IP server and client with virtual devices",
        description="USB/IP (v1.1.1) with virtual devices, TLS and reconnection.",
    )
    u = p.add_subparsers(dest="usbip_cmd", metavar="ACTION")
    serve = u.add_parser("serve", help="export virtual devices")
    serve.add_argument("--bind", default="0.0.0.0", help="address to listen on")
    serve.add_argument("--port", type=int, default=3240, help="TCP port (0: any free port)")
    serve.add_argument(
        "--device",
        action="append",
        metavar="SPEC",
        help="keyboard[:type=TEXT,every=S] | cdc-acm[:buffer=256k] | "
        "bulk[:need=400M,max=1M,announce=yes|no] (repeatable; default: one of each)",
    )
    serve.add_argument("--max-connections", type=int, default=64)
    serve.add_argument("--need-window", type=float, default=30.0, metavar="S",
                       help="a device's measured need covers its last S seconds of URBs")
    serve.add_argument("--need-span", type=float, default=1.0, metavar="S",
                       help="... as the peak rate over any S seconds in that window")
    serve.add_argument("--json", action="store_true", help="print the ready line as JSON")
    serve.add_argument("--metrics-addr", metavar="ADDR:PORT", default=None,
                       help="serve Prometheus metrics (URBs, bytes) on http://ADDR:PORT/metrics")
    _tls_args(serve)
    from netsvc.ops import config, logs

    config.register(serve, "usbip-serve")  # /etc/netsvc/usbip-serve.toml
    logs.add_argument(serve)
    serve.set_defaults(func=cmd_serve)

    lst = u.add_parser("list", help="list the devices a server exports")
    lst.add_argument("host")
    lst.add_argument("--port", type=int, default=3240)
    lst.add_argument("--timeout", type=float, default=5.0)
    lst.add_argument("--json", action="store_true")
    _tls_args(lst)
    lst.set_defaults(func=cmd_list)

    att = u.add_parser("attach", help="import a device and relay it to a local process")
    att.add_argument("host")
    att.add_argument("busid")
    att.add_argument("--port", type=int, default=3240)
    mode = att.add_mutually_exclusive_group()
    mode.add_argument("--describe", action="store_true", help="enumerate, print, exit")
    mode.add_argument("--need", action="store_true", help="print the declared need (bits/s)")
    mode.add_argument("--measure", type=float, metavar="S", help="measure bulk throughput")
    att.add_argument("--direction", choices=("in", "out"), default="in", help="with --measure")
    att.add_argument("--urb-size", type=int, default=1 << 20, help="with --measure")
    att.add_argument("--depth", type=int, default=4, help="URBs in flight, with --measure")
    att.add_argument("--unix", metavar="PATH", help="relay on this Unix socket, not stdio")
    att.add_argument("--no-reconnect", action="store_true")
    att.add_argument("--user-timeout", type=float, default=3.0, metavar="S",
                     help="data unacknowledged this long means the connection is lost "
                     "(TCP_USER_TIMEOUT); then the channel reconnects")
    att.add_argument("--json", action="store_true")
    _tls_args(att)
    att.set_defaults(func=cmd_attach)

    pl = u.add_parser("place", help="tunnel to a device, or migrate the VM to its host")
    pl.add_argument("vm", help="the VM that needs the device")
    pl.add_argument("device_host", help="the host the device is plugged into")
    pl.add_argument("busid")
    alloc = pl.add_mutually_exclusive_group(required=True)
    alloc.add_argument("--allocation-bps", type=_bps, metavar="N", help="the VM's allocation")
    alloc.add_argument(
        "--from-tc", metavar="[PID,]IFACE", help="read it from the htb class on IFACE (in PID's"
        " network namespace)"
    )
    pl.add_argument("--classid", metavar="M:N", help="the VM's htb class (default: the default)")
    pl.add_argument("--device-addr", metavar="ADDR", help="where the device is served")
    pl.add_argument("--port", type=int, default=3240)
    pl.add_argument("--need-bps", type=_bps, metavar="N", help="do not ask the device")
    pl.add_argument("--threshold", type=float, default=0.5, help="share of the allocation")
    from netsvc.cluster.cli import add_connection_args

    add_connection_args(pl)
    pl.add_argument("--dry-run", action="store_true", help="print the numbers, move nothing")
    pl.add_argument("--no-open", action="store_true",
                    help="on a tunnel decision, print the attach command instead of opening "
                    "the channel")
    pl.add_argument("--channel", metavar="PATH",
                    help="the Unix socket the opened channel relays the device on (default "
                    "/run/netsvc/usbip/VM-HOST-BUSID.sock)")
    pl.add_argument("--channel-netns", metavar="PID", type=int,
                    help="open the channel in the network namespace of PID (the VM's or the "
                    "container's), so the tunnel crosses its port")
    pl.add_argument("--open-timeout", type=float, default=15.0, metavar="S",
                    help="how long the channel has to be ready")
    pl.add_argument("--channel-user-timeout", type=float, default=3.0, metavar="S",
                    help="the channel's TCP_USER_TIMEOUT: how soon it notices a lost "
                    "connection and reconnects (attach --user-timeout)")
    pl.add_argument("--json", action="store_true")
    _tls_args(pl)
    pl.set_defaults(func=cmd_place)
    p.set_defaults(func=lambda a: _usage(p))


def _usage(p: argparse.ArgumentParser) -> int:
    p.print_help(sys.stderr)
    return 2


def _tls(args: argparse.Namespace) -> Any:
    from netsvc.usbip.tls import TlsConfig, load_psk

    if not (args.tls_psk_file or args.tls_cert or args.tls_key or args.tls_ca):
        return None
    psk = load_psk(args.tls_psk_file) if args.tls_psk_file else None
    return TlsConfig(psk=psk, cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca)


def _bps(text: str) -> int:
    """``400M``, ``1.5G``, ``100000`` (bits/s; k, M, G are powers of 1000)."""
    scale = {"k": 10**3, "m": 10**6, "g": 10**9}.get(text[-1:].lower(), 1)
    num = text[:-1] if scale != 1 else text
    try:
        value = round(float(num) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad rate {text!r}: expected N, Nk, NM or NG") from None
    if not 0 <= value < 1 << 63:
        raise argparse.ArgumentTypeError(f"bad rate {text!r}")
    return value


def _port(port: int, allow_zero: bool = False) -> None:
    if not (0 if allow_zero else 1) <= port < 65536:
        raise ValueError(f"bad --port {port}")


def _server_stats(stats: dict[str, int]) -> dict[str, float]:
    """The server's counters as metrics: ``netsvc_usbip_server_<name>_total``."""
    return {f"{k}_total": float(v) for k, v in dict(stats).items()}


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from netsvc.usbip.devices import from_spec
    from netsvc.usbip.server import ServerOptions, UsbipServer

    try:
        _port(args.port, allow_zero=True)
        if not 1 <= args.max_connections <= 4096:
            raise ValueError("--max-connections must be 1..4096")
        devices = [from_spec(s) for s in (args.device or ["keyboard", "cdc-acm", "bulk"])]
        if not 0 < args.need_span <= args.need_window <= 86400:
            raise ValueError("need 0 < --need-span <= --need-window <= 86400")
        opts = ServerOptions(max_connections=args.max_connections, tls=_tls(args),
                             need_window=args.need_window, need_span=args.need_span)
    except (ValueError, OSError) as exc:
        print(f"netsvc usbip serve: {exc}", file=sys.stderr)
        return 2
    from netsvc.ops import logs, notify

    logs.setup("netsvc usbip serve", getattr(args, "log_level", None) or "info")
    server = UsbipServer(devices, opts)

    async def main() -> int:
        try:
            await server.start(args.bind, args.port)
        except (OSError, RuntimeError) as exc:
            print(f"netsvc usbip serve: {exc}", file=sys.stderr)
            return 2
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        info = {
            "bind": args.bind,
            "port": server.port,
            "tls": "psk" if opts.tls and opts.tls.psk else ("cert" if opts.tls else "none"),
            "devices": [
                {"busid": e.busid, "kind": e.device.kind, "need_bps": e.device.need_bps}
                for e in server.exports
            ],
        }
        metrics = None
        if args.metrics_addr:
            from netsvc.ops.metrics import MetricsServer, StatsCollector, new_registry

            registry = new_registry()
            registry.register(StatsCollector("netsvc_usbip",
                                             {"server": lambda: _server_stats(server.stats)}))
            try:
                metrics = MetricsServer(args.metrics_addr, registry)
            except (OSError, ValueError) as exc:
                print(f"netsvc usbip serve: bad --metrics-addr: {exc}", file=sys.stderr)
                await server.close()
                return 2
        if args.json:
            print(json.dumps(info), flush=True)
        else:
            devs = ", ".join(f"{e.busid}={e.device.kind}" for e in server.exports)
            print(f"usbip: serving {devs} on {args.bind}:{server.port}", flush=True)
        notify.ready(f"serving {len(server.exports)} devices on {args.bind}:{server.port}")
        await stop.wait()
        notify.stopping()
        await server.close()
        if metrics is not None:
            metrics.close()
        return 0

    return asyncio.run(main())


def cmd_list(args: argparse.Namespace) -> int:
    from netsvc.usbip.client import UsbipError, list_devices

    try:
        _port(args.port)
        devices = list_devices(args.host, args.port, _tls(args), args.timeout)
    except (ValueError, OSError, UsbipError) as exc:
        print(f"netsvc usbip list: {exc}", file=sys.stderr)
        return 2
    if args.json:
        out = [
            {
                "busid": dv.busid,
                "vendor": f"{dv.vendor:04x}",
                "product": f"{dv.product:04x}",
                "class": f"{dv.dev_class:02x}/{dv.dev_subclass:02x}/{dv.dev_protocol:02x}",
                "speed": dv.speed,
                "interfaces": [
                    f"{i.cls:02x}/{i.subclass:02x}/{i.protocol:02x}" for i in dv.interfaces
                ],
                "path": dv.path,
            }
            for dv in devices
        ]
        print(json.dumps({"host": args.host, "port": args.port, "devices": out}))
    else:
        for dv in devices:
            intfs = " ".join(
                f"{i.cls:02x}/{i.subclass:02x}/{i.protocol:02x}" for i in dv.interfaces
            )
            print(
                f"{dv.busid:8} {dv.vendor:04x}:{dv.product:04x}  class {dv.dev_class:02x}  {intfs}"
            )
        if not devices:
            print("(no exported devices)")
    return 0


def cmd_attach(args: argparse.Namespace) -> int:
    from netsvc.usbip.client import (
        Channel,
        ImportRefused,
        UrbError,
        UsbipError,
        measure_throughput,
    )

    if args.unix is not None:
        import signal

        # Ended by its pid (``place`` starts it detached): let the finally blocks close the
        # channel and remove the socket.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        _port(args.port)
        tls = _tls(args)
        relay_events = args.json and args.unix is not None and not (
            args.describe or args.need or args.measure is not None)
        if not 0.1 <= args.user_timeout <= 600:
            raise ValueError("--user-timeout must be 0.1..600 s")
        ch = Channel(args.host, args.busid, args.port, tls=tls, reconnect=not args.no_reconnect,
                     user_timeout=args.user_timeout,
                     connect_timeout=min(3.0, max(0.5, args.user_timeout)),
                     on_event=_print_event if relay_events else None)
        ch.open()
    except ImportRefused as exc:
        print(f"netsvc usbip attach: {exc}", file=sys.stderr)
        return 1
    except (ValueError, OSError, UsbipError) as exc:
        print(f"netsvc usbip attach: {exc}", file=sys.stderr)
        return 2
    try:
        if args.describe:
            desc = ch.describe()
            desc["need_bps"] = ch.need_bps()
            if args.json:
                print(json.dumps(desc))
            else:
                s = desc["strings"]
                print(f"{args.busid}: {desc['vendor']}:{desc['product']} {s}")
                print(f"  need {desc['need_bps']} bit/s; interfaces {desc['interfaces']}")
            return 0
        if args.need:
            need = ch.need_bps()
            print(json.dumps({"busid": args.busid, "need_bps": need}) if args.json else need)
            return 0
        if args.measure is not None:
            if not 0 < args.measure <= 600 or not 1 <= args.depth <= 64:
                raise ValueError("--measure must be 0..600 s and --depth 1..64")
            r = measure_throughput(ch, args.measure, args.direction, args.urb_size, args.depth)
            out = {
                "direction": r.direction,
                "bytes": r.bytes,
                "seconds": round(r.seconds, 4),
                "mbytes_per_s": round(r.mbytes_per_s, 2),
                "bps": round(r.bps),
                "urb_size": r.urb_size,
                "depth": r.depth,
                "reconnects": ch.reconnects,
            }
            print(json.dumps(out) if args.json else f"{r.mbytes_per_s:.1f} MB/s ({r.direction})")
            return 0
        return _relay(ch, args.unix, args.json)
    except (UrbError, UsbipError) as exc:
        print(f"netsvc usbip attach: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"netsvc usbip attach: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    finally:
        ch.close()


def _from_tc(spec: str) -> tuple[int | None, str]:
    pid_text, sep, iface = spec.rpartition(",")
    if not iface or (sep and not pid_text.isdigit()):
        raise ValueError(f"bad --from-tc {spec!r}: expected PID,IFACE or IFACE")
    return (int(pid_text) if sep else None), iface


def cmd_place(args: argparse.Namespace) -> int:
    from netsvc.cluster.client import ApiError
    from netsvc.cluster.errors import ClusterError
    from netsvc.usbip.client import ImportRefused, UsbipError
    from netsvc.usbip.placement import (
        PlacementError,
        decide,
        device_need,
        fmt_bps,
        parse_classid,
        place,
        read_allocation,
    )

    def fail(message: str, code: int = 2) -> int:
        print(f"netsvc usbip place: {message}", file=sys.stderr)
        return code

    try:
        _port(args.port)
        tls = _tls(args)
        manager = _manager(args) if (args.manager or os.environ.get("NETSVC_MANAGER")) else None
        classid = parse_classid(args.classid) if args.classid else None
        if args.allocation_bps is not None:
            if classid is not None:
                raise ValueError("--classid goes with --from-tc")
            allocation = args.allocation_bps
            source: dict[str, Any] = {"given": True}
        else:
            pid, iface = _from_tc(args.from_tc)
            htb = read_allocation(pid, iface, classid)
            allocation = htb.rate_bps
            source = {"tc": {"pid": pid, "iface": iface, "classid": htb.classid_text,
                             "chosen_by": htb.chosen_by, "ceil_bps": htb.ceil_bps}}
        addr = args.device_addr or args.device_host
        product = ""
        need_info: dict[str, Any] = {"need_source": "given"}
        if args.need_bps is not None:
            need = args.need_bps
        else:
            info = device_need(addr, args.busid, args.port, tls)
            need, product = info.need_bps, info.product
            need_info = {"need_source": info.need_source,
                         "need_declared_bps": info.declared_bps,
                         "need_measured_bps": info.measured_bps,
                         "need_measured_window_s": info.measured_window_s}
        decision = decide(f"{args.device_host}:{args.busid}", need, allocation, args.threshold)
    except ImportRefused as exc:
        return fail(str(exc), 1)
    except (ValueError, OSError, UsbipError, PlacementError, ClusterError) as exc:
        return fail(str(exc))
    if manager is None and decision.action == "migrate" and not args.dry_run:
        return fail(f"{decision.reason}; asking for the migration needs --manager (or --dry-run)")
    if not 0 < args.open_timeout <= 600:
        return fail("--open-timeout must be in (0, 600] seconds")
    result: dict[str, Any] = {"vm": args.vm, "device_host": args.device_host,
                              "busid": args.busid, "product": product,
                              **decision.as_dict(), **need_info, "allocation_source": source,
                              "dry_run": args.dry_run, "journal_seq": None, "manager": None}
    refused = False
    if manager is not None:
        try:
            out = place(manager, args.vm, args.device_host, args.busid, decision, source,
                        args.dry_run)
        except (ApiError, ValueError) as exc:
            return fail(str(exc))
        refused = out.refused
        result.update(journal_seq=out.journal_seq, manager_status=out.manager_status,
                      manager=out.manager_answer, refused=refused)
    result["channel"] = None
    attach_cmd = f"netsvc usbip attach {addr} {args.busid} --port {args.port}"
    if decision.action == "tunnel" and not args.dry_run and not args.no_open:
        opened, error = _open_channel(args, addr, manager)
        result["channel"] = opened
        if error is not None:
            result["channel_error"] = error
            if args.json:
                print(json.dumps(result))
            return fail(f"the tunnel was decided but its channel did not open: {error}", 1)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.vm}: {decision.reason}")
        if need_info["need_source"] != "given":
            measured = need_info["need_measured_bps"]
            print(f"  need: declared {fmt_bps(need_info['need_declared_bps'])}, measured "
                  + ("n/a (the server does not measure)" if measured is None else
                     f"{fmt_bps(measured)} (peak over "
                     f"{need_info['need_measured_window_s']:g} s)")
                  + f"; using the {need_info['need_source']} one")
        print(f"  need {fmt_bps(need)} vs allocation {fmt_bps(allocation)} x threshold "
              f"{decision.threshold:g} = {fmt_bps(allocation * decision.threshold)} -> "
              f"{decision.action}{' (dry run)' if args.dry_run else ''}")
        answer = result.get("manager")
        if refused and isinstance(answer, dict):
            print(f"  refused by the manager: {answer.get('error')} (rule {answer.get('rule')})")
        elif isinstance(answer, dict) and "action" in answer:
            print(f"  migration queued: {answer['action'].get('id')}")
        elif decision.action == "tunnel" and result["channel"] is not None:
            ch = result["channel"]
            print(f"  tunnel: channel open (pid {ch['pid']}), the device is relayed on "
                  f"{ch['unix']} (log {ch['log']})")
        elif decision.action == "tunnel":
            print(f"  tunnel: {attach_cmd}")
    return 1 if refused else 0


def _open_channel(args: argparse.Namespace, addr: str, manager: Any
                  ) -> tuple[dict[str, Any] | None, str | None]:
    """Open the tunnel's channel (``netsvc.usbip.opener``); journal it when a manager is
    given. Returns (the channel, None) or (None, why it did not open)."""
    from netsvc.usbip.opener import ChannelOpenError, attach_argv, default_path, open_channel

    unix = args.channel or default_path(args.vm, args.device_host, args.busid)
    tls_argv: list[str] = []
    for flag in ("tls_psk_file", "tls_cert", "tls_key", "tls_ca"):
        if getattr(args, flag):
            tls_argv += [f"--{flag.replace('_', '-')}", os.path.abspath(getattr(args, flag))]
    try:
        if not 0.1 <= args.channel_user_timeout <= 600:
            raise ValueError("--channel-user-timeout must be 0.1..600 s")
        tls_argv += ["--user-timeout", f"{args.channel_user_timeout:g}"]
        argv = attach_argv(addr, args.busid, args.port, unix, tls_argv, args.channel_netns)
        ch = open_channel(argv, unix, args.channel_netns, args.open_timeout)
    except (ChannelOpenError, OSError, ValueError) as exc:
        return None, str(exc)
    opened = ch.as_dict()
    if manager is not None:
        from netsvc.cluster.client import ApiError

        try:
            opened["journal_seq"] = manager.post_event(
                "usbip", "usbip-channel-opened", f"vm:{args.vm}",
                f"{args.vm}: tunnel to {args.device_host}:{args.busid} open (pid {ch.pid}), "
                f"relayed on {unix}",
                {"vm": args.vm, "device_host": args.device_host, "busid": args.busid,
                 "pid": ch.pid, "unix": unix, "netns_pid": args.channel_netns}, False)
        except (ApiError, ValueError) as exc:  # the channel is open: say so, and why not journaled
            opened["journal_error"] = str(exc)
    return opened, None


def _manager(args: argparse.Namespace) -> Any:
    from netsvc.cluster.cli import UsageError, client_from_args

    try:
        return client_from_args(args, timeout=5.0)
    except UsageError as exc:
        raise ValueError(str(exc)) from None


# ---------------------------------------------------------------------------------------------
# The relay between a channel and a local process


class _Sink:
    def __init__(self, write: Any, close: Any) -> None:
        self.write, self.close = write, close


def _print_event(ev: Any) -> None:
    """A channel's state change as one JSON line (``attach --unix PATH --json``)."""
    print(json.dumps({"t": round(ev.at, 6), "event": "state", "state": ev.state.value,
                      "detail": ev.detail,
                      "outage_ms": None if ev.outage_s is None
                      else round(ev.outage_s * 1000, 1)}), flush=True)


def _relay(ch: Any, unix: str | None, as_json: bool = False) -> int:
    from netsvc.usbip import descriptors as d
    from netsvc.usbip.client import UrbError
    from netsvc.usbip.devices import keyboard_report_text

    ep_in = ch.find_endpoint(d.EP_BULK, True)
    ep_out = ch.find_endpoint(d.EP_BULK, False)
    keyboard = False
    if ep_in is None:
        ep_in = ch.find_endpoint(d.EP_INTERRUPT, True)
        keyboard = ep_in is not None and any(i.cls == 3 for i in ch.configuration.interfaces)
    if ep_in is None and ep_out is None:
        raise ValueError("the device has no bulk or interrupt endpoint to relay")
    stop = threading.Event()
    lock = threading.Lock()
    current: list[_Sink] = []

    def pump_in() -> None:
        assert ep_in is not None
        size = 8 if keyboard else max(ep_in.max_packet, 16384)
        # An interrupt URB is renewed often, so a lost connection shows soon as unacked data
        # (the channel's user timeout), not only at the next keystroke.
        poll = 0.3 if keyboard else 1.0
        while not stop.is_set():
            try:
                data = ch.transfer_in(ep_in.address, size, timeout=poll)
            except TimeoutError:
                continue
            except UrbError:
                if ch.state.value == "closed":
                    return
                time.sleep(0.05)
                continue
            if keyboard:
                data = keyboard_report_text(data).encode()
            if data:
                with lock:
                    for s in current:
                        try:
                            s.write(data)
                        except OSError:
                            current.remove(s)

    def pump_out(read: Any) -> None:
        while True:
            data = read(16384)
            if not data:
                return
            if ep_out is not None:
                ch.bulk_out(ep_out.address, data, timeout=30)

    if ep_in is not None:
        threading.Thread(target=pump_in, name="usbip-relay-in", daemon=True).start()
    if unix is None:
        out: BinaryIO = sys.stdout.buffer

        def wr(b: bytes) -> None:
            out.write(b)
            out.flush()

        with lock:
            current.append(_Sink(wr, lambda: None))
        pump_out(getattr(sys.stdin.buffer, "read1", sys.stdin.buffer.read))
        time.sleep(0.5)  # let the last echoes arrive
        stop.set()
        return 0
    if os.path.exists(unix):
        os.unlink(unix)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(unix)
    srv.listen(1)
    if as_json:  # the line ``place`` waits for: the channel is open and the socket listens
        print(json.dumps({"t": round(time.monotonic(), 6), "event": "ready", "busid": ch.busid,
                          "host": ch.host, "port": ch.port, "unix": unix, "pid": os.getpid()}),
              flush=True)
    else:
        print(f"usbip: {ch.busid} relayed on {unix}", file=sys.stderr, flush=True)
    try:
        while True:
            conn, _ = srv.accept()
            with lock:
                current.append(_Sink(conn.sendall, conn.close))
            with contextlib.suppress(OSError):
                pump_out(conn.recv)
            with lock:
                current.clear()
            conn.close()
    finally:
        stop.set()
        srv.close()
        os.unlink(unix)
