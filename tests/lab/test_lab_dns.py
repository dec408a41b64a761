"""The lab's Knot DNS on the services node: real dig from a host, signed updates from a host.

Each test builds its own lab (2 hosts, 1 VM each) and tears it down, leaving nothing behind.
"""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import time

import pytest

from netsvc.acd.dns import build_update, lookup_a, send_update
from netsvc.lab.dns import DnsInfo, DnsStartError, start_dns
from netsvc.lab.lab import Lab
from netsvc.lab.netns import socket_in_netns

pytestmark = pytest.mark.lab

ZONE = "vm.netsvc.test."
DIG = ("+time=1", "+tries=2")


def dig(lab: Lab, node: str, name: str, *opts: str) -> list[str]:
    """The A records of ``name`` as the real ``dig`` sees them from ``node``'s namespace."""
    out = subprocess.run(
        [
            "mnexec",
            "-a",
            str(lab.pid(node)),
            "dig",
            "@198.18.0.2",
            name,
            "A",
            "+short",
            "+time=1",
            "+tries=2",
            *opts,
        ],
        capture_output=True,
        text=True,
        timeout=15,
    )
    assert out.returncode == 0, f"dig failed: {out.stdout}{out.stderr}"
    return sorted(out.stdout.split())


def netns_of(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


def test_knot_serves_the_vms_and_takes_only_signed_updates() -> None:
    lab = Lab(hosts=2, vms_per_host=1)
    knotd_pid = None
    try:
        lab.build()
        t0 = time.monotonic()
        info = start_dns(lab)
        started_s = time.monotonic() - t0
        assert info == DnsInfo(
            server="198.18.0.2",
            port=53,
            zone=ZONE,
            key_name="netsvc-update.",
            key_secret=info.key_secret,
            algorithm="hmac-sha256",
            node="svc",
            reverse_zone="1.18.198.in-addr.arpa.",
        )
        assert len(base64.b64decode(info.key_secret, validate=True)) == 32
        assert started_s < 10
        proc = lab.process("dns")
        knotd_pid = proc.pid
        # knotd lives in the services node's namespace, not in ours.
        assert netns_of(knotd_pid) == netns_of(lab.pid("svc")) != netns_of(os.getpid())
        assert lab.vms["vm1"].ip == "198.18.1.101"
        assert dig(lab, "h1", "vm1.vm.netsvc.test") == ["198.18.1.101"]
        assert dig(lab, "h2", "vm2.vm.netsvc.test", "+tcp") == ["198.18.1.102"]
        assert dig(lab, "h1", "ns.vm.netsvc.test") == ["198.18.0.2"]

        with socket_in_netns(lab.pid("h1"), socket.AF_INET, socket.SOCK_DGRAM) as sock:
            move = build_update(
                info.zone, "vm2", "198.18.1.222", info.key_name, info.key_secret, info.algorithm
            )
            r = send_update(
                move, info.server, info.port, sock=sock, tcp_connect=lab.connect_from("h1")
            )
            assert (r.ok, r.rcode) == (True, "NOERROR"), r
            # Visible at once, to the real dig, from the other host.
            assert dig(lab, "h2", "vm2.vm.netsvc.test") == ["198.18.1.222"]

            wrong = base64.b64encode(os.urandom(32)).decode()
            forged = build_update(info.zone, "vm2", "198.18.1.66", info.key_name, wrong)
            r = send_update(forged, info.server, info.port, sock=sock)
            assert not r.ok and r.rcode in ("NOTAUTH", "REFUSED"), r
            assert dig(lab, "h1", "vm2.vm.netsvc.test") == ["198.18.1.222"]
            assert lookup_a("vm2", info.zone, info.server, sock=sock) == ["198.18.1.222"]
        # Everything it wrote is in the run dir.
        conf = (lab.run_dir / "dns" / "knot.conf").read_text()
        assert f'storage: "{lab.run_dir.resolve()}/dns/db"' in conf
        assert "listen: 198.18.0.2@53" in conf
    finally:
        assert lab.teardown() == []
    assert knotd_pid is not None and not os.path.exists(f"/proc/{knotd_pid}")


def test_start_failure_names_the_log_and_ends_knotd() -> None:
    lab = Lab(hosts=1, vms_per_host=1)
    try:
        lab.build()
        with pytest.raises(DnsStartError, match=r"within 0 s; see .*/logs/dns\.log"):
            start_dns(lab, timeout=0.0)
        assert lab.process("dns") is None
        with pytest.raises(ValueError, match="outside the zone"):
            start_dns(lab, records={"vm9.elsewhere.test.": "198.18.1.9"})
        info = start_dns(lab, records={"web": "198.18.1.50"})
        assert dig(lab, "h1", "web.vm.netsvc.test") == ["198.18.1.50"]
        assert dig(lab, "h1", "vm1.vm.netsvc.test") == []
        with pytest.raises(DnsStartError, match="already running"):
            start_dns(lab)
        assert info.server == "198.18.0.2"
    finally:
        assert lab.teardown() == []
