"""A real knotd on loopback, shared by the unit-tier DNS tests (import it by name: pytest puts
this folder on sys.path).

Outside CI the knotd tests skip when knotd is missing; in CI (CI=true) that is a failure.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from peer_binary import require_binary


@dataclass(frozen=True)
class LoopbackKnot:
    port: int
    secret: str
    zonefile: Path


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (racy, but only tests use loopback)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = int(u.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port on 127.0.0.1")


def _knotd() -> str:
    return require_binary("knotd", "/usr/sbin/knotd", "knot")


@contextmanager
def run_loopback_knot(
    directory: Path, zone: str, records: dict[str, str], key_name: str,
    reverse_zone: str | None = None, ptrs: dict[str, str] | None = None,
) -> Iterator[LoopbackKnot]:
    """A knotd serving ``zone`` (and ``reverse_zone`` with ``ptrs``) on 127.0.0.1 (a free port)
    that takes updates signed with a fresh TSIG key; ended (by id) when the block exits."""
    from netsvc.lab import dns as labdns

    knotd = _knotd()
    user = f"{pwd.getpwuid(os.getuid()).pw_name}:{grp.getgrgid(os.getgid()).gr_name}"
    port = free_port()
    secret = labdns.new_secret()
    files = labdns.write_server_files(
        directory / "dns", zone, records, listen="127.0.0.1", port=port, key_name=key_name,
        key_secret=secret, ns_address="198.18.0.2", user=user, reverse_zone=reverse_zone,
        ptrs=ptrs,
    )
    log = directory / "knotd.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([knotd, "-c", str(files.conf)], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        labdns.wait_ready(
            proc, lambda: labdns.soa_answered("127.0.0.1", port, zone, 0.2), log, timeout=5.0
        )
        yield LoopbackKnot(port, secret, files.zonefile)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
