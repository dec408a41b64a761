"""The lab's authoritative DNS server: Knot DNS on the services node, taking signed updates.

``start_dns(lab)`` writes a Knot configuration, a zone file and a fresh TSIG key into
``lab.run_dir / "dns"``, starts ``knotd`` in the foreground inside the services node's network
namespace, and returns once the server answers a SOA query for the zone. The rendering helpers
(``render_conf``, ``render_zone``, ``write_server_files``) are pure or only write files, so the
unit tests start the same configuration on loopback.

Invariants:
- Nothing is written outside ``lab.run_dir / "dns"`` (configuration, zone file, journal,
  timer and KASP databases, PID file, control socket), except knotd's output, which goes to
  the lab's log dir as ``logs/dns.log``. Teardown removes the whole run dir.
- knotd is started with ``lab.popen`` (role ``dns``): it runs in the foreground (not
  daemonized), carries the run's marker and is tracked by the lab, so ``lab.teardown()`` (or
  ``netsvc lab clean`` after a SIGKILL) ends it by its id. No system service is used.
- knotd listens only on the services node's management address (198.18.0.2, port 53, UDP
  and TCP) inside that node's namespace; it never binds anything in the root namespace.
- The zone accepts RFC 2136 updates only when signed with the run's TSIG key (a random
  256-bit secret, new for every start); anything else is refused. Queries are open.
- An accepted update is served at once (from memory) and written back to the zone file at
  once (``zonefile-sync: 0``).
"""

from __future__ import annotations

import base64
import ipaddress
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype

from netsvc.acd.dns import check_ipv4, owner_name, zone_name

if TYPE_CHECKING:
    from netsvc.lab.lab import Lab

DEFAULT_ZONE = "vm.netsvc.test."
#: The VM network's reverse zone (198.18.1.0/24): a PTR per VM, moved by a readdress.
REVERSE_ZONE = "1.18.198.in-addr.arpa."
DNS_NODE = "svc"
DNS_SERVER = "198.18.0.2"  # the services node on the management network (plan.SERVICES_MGMT)
DNS_PORT = 53
KEY_NAME = "netsvc-update."
ALGORITHM = "hmac-sha256"
DEFAULT_TTL = 60
START_TIMEOUT = 10.0


class DnsStartError(RuntimeError):
    """knotd could not be configured or did not come up; the message names its log file."""


@dataclass(frozen=True)
class DnsInfo:
    """Where the lab's DNS server is and the key that signs updates to its zone."""

    server: str
    port: int
    zone: str
    key_name: str
    key_secret: str  # base64
    algorithm: str
    node: str
    reverse_zone: str | None = None


@dataclass(frozen=True)
class KnotFiles:
    """The files ``write_server_files`` wrote, all below ``directory``."""

    directory: Path
    conf: Path
    zonefile: Path


# --- pure rendering ------------------------------------------------------------------------
def render_zone(
    zone: str,
    records: Mapping[str, str],
    ns_address: str,
    serial: int = 1,
    ttl: int = DEFAULT_TTL,
) -> str:
    """A zone file: SOA, NS ``ns.<zone>``, ``ns`` A ``ns_address`` and one A record per entry.

    Record names are relative to the zone or absolute inside it; every name is written
    absolute and escaped, so nothing in ``records`` can inject zone-file syntax.
    """
    origin = zone_name(zone)
    ns = dns.name.from_text("ns", origin=origin)
    hostmaster = dns.name.from_text("hostmaster", origin=origin)
    lines = [
        f"$TTL {ttl}",
        f"{origin} SOA {ns} {hostmaster} {serial} 3600 600 86400 {ttl}",
        f"{origin} NS {ns}",
        f"{ns} A {check_ipv4(ns_address, 'ns')}",
    ]
    for name, address in records.items():
        owner = owner_name(name, origin)
        if owner == ns:
            raise ValueError(f"record name {name!r} clashes with the zone's name server")
        lines.append(f"{owner} {ttl} A {check_ipv4(address, name)}")
    return "\n".join(lines) + "\n"


def render_reverse_zone(
    reverse_zone: str,
    ptrs: Mapping[str, str],
    ns: str,
    serial: int = 1,
    ttl: int = DEFAULT_TTL,
) -> str:
    """A reverse zone file: SOA and NS naming ``ns`` (absolute), and one PTR per address of
    ``ptrs`` (address -> absolute name), each address inside the zone."""
    from netsvc.acd.dns import reverse_name

    origin = zone_name(reverse_zone)
    server = dns.name.from_text(ns)
    hostmaster = dns.name.from_text("hostmaster", origin=server.parent())
    lines = [
        f"$TTL {ttl}",
        f"{origin} SOA {server} {hostmaster} {serial} 3600 600 86400 {ttl}",
        f"{origin} NS {server}",
    ]
    for address, name in ptrs.items():
        owner = reverse_name(address)
        if not owner.is_subdomain(origin):
            raise ValueError(f"{address} is outside the reverse zone {origin}")
        target = dns.name.from_text(name)
        lines.append(f"{owner} {ttl} PTR {target}")
    return "\n".join(lines) + "\n"


def _q(value: object) -> str:
    text = str(value)
    if any(c in text for c in '"\\\n'):
        raise ValueError(f"value {text!r} cannot be quoted in knot.conf")
    return f'"{text}"'


def render_conf(
    directory: Path,
    zone: str,
    listen: str,
    port: int,
    key_name: str,
    key_secret: str,
    algorithm: str = ALGORITHM,
    user: str = "root:root",
    reverse_zone: str | None = None,
) -> str:
    """A knot.conf (Knot DNS 3.2) whose every path lies below ``directory``.

    It listens on ``listen@port`` only, serves ``zone`` (and ``reverse_zone``) from
    ``directory/zones``, and lets only updates signed with the key change them.
    """
    origin = zone_name(zone)
    ip = ipaddress.ip_address(listen)
    if not 0 < port < 65536:
        raise ValueError(f"invalid port {port}")
    key = dns.name.from_text(key_name)
    d = directory.resolve()
    zonefile = d / "zones" / f"{origin.to_text(omit_final_dot=True)}.zone"
    return f"""\
# Written by netsvc.lab.dns for one lab run; everything below {d}.
server:
    rundir: {_q(d / "run")}
    pidfile: {_q(d / "run" / "knotd.pid")}
    user: {user}
    listen: {ip}@{port}
    udp-workers: 1
    tcp-workers: 1
    background-workers: 1

control:
    listen: {_q(d / "run" / "knot.sock")}

log:
  - target: stdout
    any: info

database:
    storage: {_q(d / "db")}
    journal-db-max-size: 64M
    kasp-db-max-size: 16M
    timer-db-max-size: 16M
    catalog-db-max-size: 16M

key:
  - id: {key}
    algorithm: {algorithm}
    secret: {_q(key_secret)}

acl:
  - id: update-signed
    key: {key}
    action: update

template:
  - id: default
    storage: {_q(d / "zones")}
    zonefile-sync: 0
    journal-content: changes
    semantic-checks: on

zone:
  - domain: {origin}
    file: {_q(zonefile)}
    acl: update-signed
{_reverse_conf(d, reverse_zone)}"""


def _reverse_conf(d: Path, reverse_zone: str | None) -> str:
    if reverse_zone is None:
        return ""
    origin = zone_name(reverse_zone)
    zonefile = d / "zones" / f"{origin.to_text(omit_final_dot=True)}.zone"
    return f"""  - domain: {origin}
    file: {_q(zonefile)}
    acl: update-signed
"""


def new_secret() -> str:
    """A random 256-bit TSIG secret, base64."""
    return base64.b64encode(secrets.token_bytes(32)).decode()


# --- files and process -------------------------------------------------------------------
def write_server_files(
    directory: Path,
    zone: str,
    records: Mapping[str, str],
    listen: str,
    port: int,
    key_name: str,
    key_secret: str,
    ns_address: str,
    algorithm: str = ALGORITHM,
    user: str = "root:root",
    reverse_zone: str | None = None,
    ptrs: Mapping[str, str] | None = None,
) -> KnotFiles:
    """Write knot.conf and the zone file below ``directory`` (mode 0700; files 0600).

    Whatever an earlier server left in ``directory`` (journal, zone file, run files) is
    removed first, so the new server starts from exactly ``records``.
    """
    origin = zone_name(zone)
    zone_text = render_zone(zone, records, ns_address)  # validate before writing anything
    ns = dns.name.from_text("ns", origin=origin).to_text()
    rev_text = (render_reverse_zone(reverse_zone, ptrs or {}, ns)
                if reverse_zone is not None else None)
    conf_text = render_conf(directory, zone, listen, port, key_name, key_secret, algorithm, user,
                            reverse_zone)
    for sub in ("db", "zones", "run"):  # a journal left by an earlier start would replay
        if (directory / sub).exists():
            shutil.rmtree(directory / sub)
    for sub in ("", "run", "db", "zones"):
        (directory / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
    conf = directory / "knot.conf"
    zonefile = directory / "zones" / f"{origin.to_text(omit_final_dot=True)}.zone"
    files = [(conf, conf_text), (zonefile, zone_text)]
    if reverse_zone is not None and rev_text is not None:
        rev = zone_name(reverse_zone).to_text(omit_final_dot=True)
        files.append((directory / "zones" / f"{rev}.zone", rev_text))
    for path, text in files:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
    return KnotFiles(directory, conf, zonefile)


def soa_answered(
    server: str, port: int, zone: str, timeout: float, sock: socket.socket | None = None
) -> bool:
    """True if the server answers an authoritative SOA for ``zone``; False on silence.

    A ``sock`` given is switched to non-blocking mode, as dnspython requires (on a blocking
    socket its timeout would not apply and a lost answer would block forever).
    """
    q = dns.message.make_query(zone_name(zone), dns.rdatatype.SOA)
    if sock is not None:
        sock.setblocking(False)
    try:
        r = dns.query.udp(q, server, port=port, timeout=timeout, sock=sock)
    except (OSError, dns.exception.DNSException):
        return False
    return (
        r.rcode() == dns.rcode.NOERROR
        and bool(r.flags & dns.flags.AA)
        and any(rr.rdtype == dns.rdatatype.SOA for rr in r.answer)
    )


def _tail(log: Path, lines: int = 8) -> str:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def wait_ready(
    proc: subprocess.Popen[bytes],
    check: Callable[[], bool],
    log: Path,
    timeout: float = START_TIMEOUT,
) -> float:
    """Poll ``check`` until it is true; returns the seconds waited.

    Raises DnsStartError naming ``log`` if the process exits or ``timeout`` passes first.
    """
    t0 = time.monotonic()
    while True:
        if check():
            return time.monotonic() - t0
        code = proc.poll()
        if code is not None:
            raise DnsStartError(
                f"knotd exited with status {code} before answering; see {log}\n{_tail(log)}"
            )
        if time.monotonic() - t0 > timeout:
            raise DnsStartError(
                f"knotd did not answer a SOA query within {timeout:.0f} s; see {log}\n{_tail(log)}"
            )
        time.sleep(0.02)


def start_dns(
    lab: Lab,
    zone: str = DEFAULT_ZONE,
    records: dict[str, str] | None = None,
    timeout: float = START_TIMEOUT,
) -> DnsInfo:
    """Start Knot DNS on the services node, authoritative for ``zone``.

    ``records`` maps names (relative to the zone, or absolute inside it) to IPv4 addresses;
    by default there is one per VM of the lab (``vm1`` -> its address). ``ns`` always points
    at the services node. Raises DnsStartError (naming the log) if knotd does not come up;
    then knotd has been ended.
    """
    from netsvc.lab.netns import socket_in_netns

    running = lab.procs.by_role.get("dns")
    if running is not None and running.poll() is None:
        raise DnsStartError("DNS is already running in this lab")
    knotd = shutil.which("knotd") or shutil.which("knotd", path="/usr/sbin:/sbin")
    if knotd is None:
        raise DnsStartError("knotd is not installed (Debian package knot)")
    if records is None:
        records = {name: vm.ip for name, vm in lab.vms.items()}
    origin = zone_name(zone)
    ptrs = {vm.ip: f"{name}.{origin}" for name, vm in lab.vms.items()}
    secret = new_secret()
    files = write_server_files(
        lab.run_dir / "dns",
        zone,
        records,
        listen=DNS_SERVER,
        port=DNS_PORT,
        key_name=KEY_NAME,
        key_secret=secret,
        ns_address=DNS_SERVER,
        reverse_zone=REVERSE_ZONE,
        ptrs=ptrs,
    )
    log = lab.run_dir / "logs" / "dns.log"
    lab.record("action", DNS_NODE, "dns-start", zone=origin.to_text())
    proc = lab.popen(DNS_NODE, [knotd, "-c", str(files.conf)], role="dns")
    sock = socket_in_netns(lab.pid(DNS_NODE), socket.AF_INET, socket.SOCK_DGRAM)
    try:
        waited = wait_ready(
            proc,
            lambda: soa_answered(DNS_SERVER, DNS_PORT, zone, timeout=0.05, sock=sock),
            log,
            timeout,
        )
    except DnsStartError:
        lab.procs.end("dns")
        raise
    finally:
        sock.close()
    lab.record("event", DNS_NODE, "dns-ready", seconds=round(waited, 3))
    return DnsInfo(
        server=DNS_SERVER,
        port=DNS_PORT,
        zone=origin.to_text(),
        key_name=KEY_NAME,
        key_secret=secret,
        algorithm=ALGORITHM,
        node=DNS_NODE,
        reverse_zone=REVERSE_ZONE,
    )
