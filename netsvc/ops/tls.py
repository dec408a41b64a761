"""A small certificate authority for a cluster's API, through the ``openssl`` command.

``make_ca(dir)`` writes ``ca.pem``/``ca.key``; ``make_cert(dir, name, ips, dns)`` writes
``<name>.pem``/``<name>.key`` signed by it, with the addresses as subjectAltNames (the
client checks the manager's IP or name against them) and ``serverAuth`` and ``clientAuth``
usages, so the same call makes a manager's and an agent's certificate.

Invariants:

- Keys are ECDSA P-256 and written mode 0600 (openssl's umask is set to 077); certificates are
  0644. Nothing is ever overwritten: an existing file is an error (``TlsError``).
- A failed ``openssl`` run raises ``TlsError`` with its stderr; no half-written file is left
  under the final name.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path


class TlsError(Exception):
    """openssl failed, or a file is in the way."""


def _openssl(*args: str, cwd: Path) -> None:
    try:
        proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True,
                              timeout=60, preexec_fn=lambda: os.umask(0o077))
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TlsError(f"cannot run openssl: {exc}") from None
    if proc.returncode != 0:
        raise TlsError(f"openssl {args[0]} failed: {proc.stderr.strip()[-400:]}")


def _free(*paths: Path) -> None:
    for p in paths:
        if p.exists():
            raise TlsError(f"{p} exists; not overwriting it")


def make_ca(directory: str | Path, name: str = "netsvc cluster CA", days: int = 3650) -> Path:
    """Create ``ca.pem`` and ``ca.key`` in ``directory``; return the certificate's path."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cert, key = d / "ca.pem", d / "ca.key"
    _free(cert, key)
    with tempfile.TemporaryDirectory(dir=d) as tmp:
        t = Path(tmp)
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                 "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", str(days),
                 "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=t)
        os.replace(t / "ca.key", key)
        os.replace(t / "ca.pem", cert)
    os.chmod(cert, 0o644)
    return cert


def make_cert(directory: str | Path, name: str, ips: Sequence[str] = (),
              dns: Sequence[str] = (), days: int = 825) -> tuple[Path, Path]:
    """A certificate for ``name`` signed by the CA in ``directory``; (cert, key) paths."""
    d = Path(directory)
    cert, key = d / f"{name}.pem", d / f"{name}.key"
    _free(cert, key)
    sans = [f"IP:{ipaddress.ip_address(ip)}" for ip in ips] + [f"DNS:{n}" for n in dns]
    if not sans:
        raise TlsError("a certificate needs at least one address or name")
    with tempfile.TemporaryDirectory(dir=d) as tmp:
        t = Path(tmp)
        (t / "ext.cnf").write_text(
            f"subjectAltName={','.join(sans)}\n"
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature\n"
            "extendedKeyUsage=serverAuth,clientAuth\n")
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", "c.key", "-out", "c.csr", "-subj", f"/CN={name}", cwd=t)
        _openssl("x509", "-req", "-in", "c.csr", "-CA", str((d / "ca.pem").resolve()),
                 "-CAkey", str((d / "ca.key").resolve()), "-CAcreateserial", "-CAserial",
                 "ca.srl", "-out", "c.pem", "-days", str(days), "-extfile", "ext.cnf", cwd=t)
        os.replace(t / "c.key", key)
        os.replace(t / "c.pem", cert)
    os.chmod(cert, 0o644)
    return cert, key
