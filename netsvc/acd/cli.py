"""``netsvc acd``: probe an address, watch a segment, defend an address.

netsvc acd probe  --iface IF ADDR [--fast] [--json]     exit 0 free, 1 in use, 2 error
netsvc acd watch  --iface IF [--duration S] [--json]    print monitor events
netsvc acd defend --iface IF ADDR [--policy retreat|once|always] [--fast] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import random
import signal
import sys
import threading
from collections.abc import Callable
from enum import Enum
from typing import Any

POLICIES = {"retreat": "RETREAT", "once": "DEFEND_ONCE", "always": "DEFEND_ALWAYS"}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "acd",
        help="IPv4 address conflict detection (RFC 5227)",
        description="IPv4 address conflict detection (RFC 5227).",
    )
    acd = p.add_subparsers(dest="acd_cmd", metavar="ACTION")

    probe = acd.add_parser("probe", help="is an address free on a link? (exit 0 free, 1 in use)")
    probe.add_argument("--iface", required=True, help="interface to probe on")
    probe.add_argument("addr", help="IPv4 address")
    probe.add_argument("--fast", action="store_true", help="scaled-down probe timers")
    probe.add_argument(
        "--strict",
        action="store_true",
        help="also count another host's probe for the address (RFC 5227 §2.1.1)",
    )
    probe.add_argument("--json", action="store_true")
    probe.set_defaults(func=cmd_probe)

    watch = acd.add_parser("watch", help="passive monitor of a segment; prints events")
    watch.add_argument("--iface", required=True)
    watch.add_argument("--duration", type=float, help="stop after S seconds")
    watch.add_argument("--json", action="store_true", help="one JSON object per line")
    watch.add_argument(
        "--only",
        metavar="EVENTS",
        help="print only these events, e.g. Conflict,FlipFlop (default: all)",
    )
    watch.add_argument(
        "--promisc",
        action="store_true",
        help="also see frames the interface forwards (watch a bridge's segment)",
    )
    from netsvc.cluster.cli import add_connection_args

    add_connection_args(watch)  # with --manager: report conflicts to it (POST /v1/conflicts)
    watch.add_argument("--reporter", metavar="NAME", default="", help="who reports (a host name)")
    watch.add_argument(
        "--dry-run",
        action="store_true",
        help="with --manager: ask for the plan only; nothing is changed",
    )
    watch.add_argument(
        "--proxy-arp",
        metavar="MAC",
        action="append",
        default=[],
        help="a proxy-ARP responder that answers for others (repeatable)",
    )
    watch.add_argument(
        "--ignore",
        metavar="IP",
        action="append",
        default=[],
        help="an address not to watch (repeatable)",
    )
    watch.add_argument(
        "--no-vrrp",
        action="store_true",
        help="report VRRP/CARP virtual MACs (00:00:5e:00:01/02:xx) as conflicts",
    )

    watch.set_defaults(func=cmd_watch)

    defend = acd.add_parser("defend", help="probe, announce and defend an address (foreground)")
    defend.add_argument("--iface", required=True)
    defend.add_argument("addr")
    defend.add_argument("--policy", choices=sorted(POLICIES), default="once")
    defend.add_argument("--fast", action="store_true")
    defend.add_argument("--duration", type=float, help="stop after S seconds")
    defend.add_argument("--json", action="store_true")
    defend.set_defaults(func=cmd_defend)
    p.set_defaults(func=lambda a: _usage(p))


def _usage(p: argparse.ArgumentParser) -> int:
    p.print_help(sys.stderr)
    return 2


def _err(msg: str) -> int:
    print(f"netsvc acd: {msg}", file=sys.stderr)
    return 2


def _addr(text: str) -> str:
    try:
        ip = ipaddress.IPv4Address(text)
    except ValueError:
        raise ValueError(f"invalid IPv4 address {text!r}") from None
    if ip.is_multicast or ip.is_unspecified or ip == ipaddress.IPv4Address("255.255.255.255"):
        raise ValueError(f"{text} cannot be claimed by a host")
    return str(ip)


def _jsonable(ev: object) -> dict[str, Any]:
    out: dict[str, Any] = {"event": type(ev).__name__}
    if dataclasses.is_dataclass(ev):
        for f in dataclasses.fields(ev):
            v = getattr(ev, f.name)
            if isinstance(v, bytes):
                continue
            out[f.name] = v.name if isinstance(v, Enum) else v
    return out


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def run_engine(
    engine: Any,
    sock: Any,
    on_event: Callable[[Any], bool],
    stop: threading.Event,
    deadline: float | None = None,
) -> None:
    """Drive a protocol.Engine on a socket until ``on_event`` returns True or ``stop`` is set."""
    from netsvc.acd.arp import ArpPacket
    from netsvc.acd.io import RxStats, monotonic, receive_all, wait_readable
    from netsvc.acd.protocol import Transmit

    stats = RxStats()

    def drain() -> bool:
        while (ev := engine.next_event()) is not None:
            if isinstance(ev, Transmit):
                sock.send(ev.frame)
            elif on_event(ev):
                return True
        return False

    engine.start(monotonic())
    if drain():
        return
    while not stop.is_set():
        now = monotonic()
        if deadline is not None and now >= deadline:
            return
        timer = engine.next_timer()
        timeout = 0.5 if timer is None else max(0.0, min(0.5, timer - now))
        if wait_readable(sock, timeout):
            for pkt in receive_all(sock, stats):
                assert isinstance(pkt, ArpPacket)
                engine.receive(pkt, monotonic())
        now = monotonic()
        timer = engine.next_timer()
        if timer is not None and timer <= now:
            engine.handle_timer(now)
        if drain():
            return


def _engine(args: argparse.Namespace, probe_only: bool) -> tuple[Any, Any, str]:
    """The engine and its socket. Raises ValueError or OSError (a bad address, an interface
    that cannot be opened) or EngineError (an interface the engine cannot use, such as ``lo``
    whose MAC is all zeroes); the socket is closed on any failure."""
    from netsvc.acd.io import interface_mac, local_macs, open_arp_socket
    from netsvc.acd.protocol import Engine, EngineError, Policy, Timing

    ip = _addr(args.addr)
    sock = open_arp_socket(args.iface)
    try:
        mac = interface_mac(sock, args.iface)
        policy = Policy[POLICIES[getattr(args, "policy", "once")]]
        timing = Timing.fast() if args.fast else Timing.rfc()
        try:
            engine = Engine(
                ip,
                mac,
                own_macs=local_macs(sock) - {mac},
                policy=policy,
                timing=timing,
                rng=random.Random(),
                probe_only=probe_only,
                # probe: like `arping -D`, only a holder's answer counts, unless --strict;
                # defend: answer probes, so `arping -D` sees the address in use.
                soft_conflicts=getattr(args, "strict", False),
                answer_probes=not probe_only,
            )
        except EngineError as exc:
            if mac == "00:00:00:00:00:00":
                hint = "ARP needs an interface with an Ethernet address"
                raise EngineError(f"{exc} ({hint})") from exc
            raise
    except BaseException:
        sock.close()
        raise
    return engine, sock, mac


def cmd_probe(args: argparse.Namespace) -> int:
    from netsvc.acd.protocol import EngineError, ProbeResult

    try:
        engine, sock, mac = _engine(args, probe_only=True)
    except (ValueError, OSError) as exc:
        return _err(str(exc))
    except EngineError as exc:
        return _err(f"cannot probe {args.addr} on {args.iface}: {exc}")
    result: list[Any] = []

    def on_event(ev: Any) -> bool:
        if isinstance(ev, ProbeResult):
            result.append(ev)
            return True
        return False

    with sock:
        run_engine(engine, sock, on_event, _stop_on_signals())
    if not result:
        return _err("interrupted")
    r = result[0]
    out = {
        "address": args.addr,
        "iface": args.iface,
        "free": r.free,
        "other_mac": r.other_mac,
        "our_mac": mac,
    }
    if args.json:
        print(json.dumps(out))
    elif r.free:
        print(f"{args.addr} is free on {args.iface}")
    else:
        print(f"{args.addr} is in use on {args.iface} by {r.other_mac}")
    return 0 if r.free else 1


def cmd_defend(args: argparse.Namespace) -> int:
    from netsvc.acd.io import monotonic
    from netsvc.acd.protocol import EngineError, Retreated

    try:
        engine, sock, _ = _engine(args, probe_only=False)
    except (ValueError, OSError) as exc:
        return _err(str(exc))
    except EngineError as exc:
        return _err(f"cannot defend {args.addr} on {args.iface}: {exc}")
    lost: list[Any] = []

    def on_event(ev: Any) -> bool:
        print(json.dumps(_jsonable(ev)) if args.json else _human(ev), flush=True)
        if isinstance(ev, Retreated):
            lost.append(ev)
        return False

    deadline = None if args.duration is None else monotonic() + args.duration
    with sock:
        run_engine(engine, sock, on_event, _stop_on_signals(), deadline)
    return 1 if lost else 0


def cmd_watch(args: argparse.Namespace) -> int:
    from netsvc.acd.io import monotonic
    from netsvc.acd.monitor import Benign
    from netsvc.acd.watcher import manager_reporter, watch

    only = None if not args.only else set(args.only.split(","))

    def show(d: dict[str, Any]) -> None:
        if only is None or d["event"] in only:
            print(json.dumps(d) if args.json else _human_dict(d), flush=True)

    try:
        benign = Benign(
            vrrp=not args.no_vrrp,
            proxy_arp_macs=frozenset(args.proxy_arp),
            ignore_ips=frozenset(args.ignore),
        )
        report = None
        if args.manager:
            from netsvc.cluster.cli import UsageError, client_from_args

            if not args.key_file:
                raise ValueError("--manager needs --key-file")
            try:
                client = client_from_args(args, timeout=2.0)
            except UsageError as exc:
                raise ValueError(str(exc)) from None
            report = manager_reporter(client, args.reporter or args.iface, args.dry_run, show)
        deadline = None if args.duration is None else monotonic() + args.duration
        stats = watch(
            args.iface,
            emit=lambda ev: show(_jsonable(ev)),
            stop=_stop_on_signals(),
            promisc=args.promisc,
            benign=benign,
            report=report,
            deadline=deadline,
            on_ready=lambda: show(
                {"event": "Listening", "iface": args.iface, "promisc": args.promisc}
            ),
        )
    except (ValueError, OSError) as exc:
        return _err(str(exc))
    summary = {"frames": stats.frames, "dropped": dict(stats.dropped)}
    print(
        json.dumps({"event": "Summary", **summary}) if args.json else f"# {summary}",
        file=sys.stderr,
    )
    return 0


def _human(ev: object) -> str:
    return _human_dict(_jsonable(ev))


def _human_dict(d: dict[str, Any]) -> str:
    d = dict(d)
    name = d.pop("event")
    return f"{name:14} " + " ".join(f"{k}={v}" for k, v in d.items())
