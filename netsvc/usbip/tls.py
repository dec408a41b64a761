"""Optional TLS for USB/IP channels: mutual TLS with a CA, or a pre-shared key.

Python 3.11's ``ssl`` has no TLS-PSK cipher suites (they arrive in 3.13), so PSK mode is TLS
with an ephemeral self-signed server certificate followed by a mutual HMAC-SHA256
challenge-response bound to that certificate:

    server -> client  MAGIC(4) VERSION(1) nonce_s(32)
    client -> server  nonce_c(32) HMAC(psk, "netsvc-usbip/1 client" nonce_s nonce_c fp)
    server -> client  HMAC(psk, "netsvc-usbip/1 server" nonce_s nonce_c fp)

where ``fp`` is the SHA-256 of the server certificate's DER bytes as each side sees it. A
man in the middle must present its own certificate, so the two sides disagree on ``fp`` and
neither MAC verifies: the client learns nothing it can replay and the server admits no one
who does not hold the key. Only then do the USB/IP bytes start, inside TLS. Plain mode (no
``TlsConfig``) is the unmodified Linux wire protocol.

Invariants:

- The auth functions are pure (bytes in, bytes out); a wrong magic, version, length or MAC
  raises ``AuthError`` (a remote error) and the adapter closes the connection.
- MACs are compared with ``hmac.compare_digest``; a PSK shorter than 16 bytes is refused
  (``ValueError``, a local error).
- Certificate mode verifies the peer's chain against ``ca`` on both ends (CERT_REQUIRED); the
  host name is not checked, because lab peers are addressed by IP, unless ``server_name``
  is given.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import shutil
import ssl
import subprocess
import tempfile
from dataclasses import dataclass

MAGIC = b"NSUA"
VERSION = 1
NONCE = 32
MAC = 32
HELLO_SIZE = len(MAGIC) + 1 + NONCE
RESPONSE_SIZE = NONCE + MAC


class AuthError(Exception):
    """A remote error: the peer failed the PSK challenge or sent a malformed auth message."""


@dataclass(frozen=True)
class TlsConfig:
    psk: bytes | None = None
    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if self.psk is not None:
            if len(self.psk) < 16:
                raise ValueError("the pre-shared key must be at least 16 bytes")
            if self.ca:
                raise ValueError("choose a pre-shared key or certificates, not both")
        elif not self.ca:
            raise ValueError("TLS needs a pre-shared key, or --tls-ca with --tls-cert/--tls-key")
        if (self.cert is None) != (self.key is None):
            raise ValueError("--tls-cert and --tls-key go together")


def load_psk(path: str) -> bytes:
    """A key file: hex (64+ hex digits) or raw bytes; surrounding whitespace is ignored."""
    with open(path, "rb") as f:
        raw = f.read(4096).strip()
    try:
        key = bytes.fromhex(raw.decode())
    except (UnicodeDecodeError, ValueError):
        key = raw
    if len(key) < 16:
        raise ValueError(f"{path}: the pre-shared key must be at least 16 bytes")
    return key


# ---------------------------------------------------------------------------------------------
# PSK challenge-response (pure)


def _mac(psk: bytes, role: bytes, nonce_s: bytes, nonce_c: bytes, fp: bytes) -> bytes:
    return hmac.new(psk, b"netsvc-usbip/1 " + role + nonce_s + nonce_c + fp, "sha256").digest()


def server_hello(nonce_s: bytes) -> bytes:
    if len(nonce_s) != NONCE:
        raise ValueError("nonce must be 32 bytes")
    return MAGIC + bytes([VERSION]) + nonce_s


def client_response(psk: bytes, hello: bytes, nonce_c: bytes, fp: bytes) -> tuple[bytes, bytes]:
    """(nonce_s, the client's response) for a server hello."""
    if len(hello) != HELLO_SIZE or not hello.startswith(MAGIC):
        raise AuthError(f"not a netsvc PSK hello: {hello[:8].hex()} (is the server in PSK mode?)")
    if hello[4] != VERSION:
        raise AuthError(f"unsupported PSK auth version {hello[4]}")
    nonce_s = hello[5:]
    return nonce_s, nonce_c + _mac(psk, b"client", nonce_s, nonce_c, fp)


def server_check(psk: bytes, nonce_s: bytes, response: bytes, fp: bytes) -> bytes:
    """Verify the client's response; the server's proof to send back."""
    if len(response) != RESPONSE_SIZE:
        raise AuthError(f"PSK response is {len(response)} bytes, want {RESPONSE_SIZE}")
    nonce_c, mac = response[:NONCE], response[NONCE:]
    if not hmac.compare_digest(mac, _mac(psk, b"client", nonce_s, nonce_c, fp)):
        raise AuthError("client PSK proof does not verify (wrong key, or a TLS interceptor)")
    return _mac(psk, b"server", nonce_s, nonce_c, fp)


def client_check(psk: bytes, nonce_s: bytes, nonce_c: bytes, fp: bytes, proof: bytes) -> None:
    if len(proof) != MAC or not hmac.compare_digest(
        proof, _mac(psk, b"server", nonce_s, nonce_c, fp)
    ):
        raise AuthError("server PSK proof does not verify (wrong key, or a TLS interceptor)")


def fingerprint(der: bytes) -> bytes:
    return hashlib.sha256(der).digest()


# ---------------------------------------------------------------------------------------------
# Contexts


def ephemeral_cert(directory: str) -> tuple[str, str]:
    """A fresh self-signed P-256 certificate and key (PSK mode), made with ``openssl``."""
    if shutil.which("openssl") is None:
        raise RuntimeError("PSK mode needs the openssl command to make its certificate")
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", key, "-out", cert, "-days", "30", "-subj", "/CN=netsvc-usbip"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return cert, key


def _first_der(path: str) -> bytes:
    with open(path) as f:
        text = f.read()
    end = "-----END CERTIFICATE-----"
    start = text.find("-----BEGIN CERTIFICATE-----")
    stop = text.find(end, start)
    if start < 0 or stop < 0:
        raise ValueError(f"{path}: no PEM certificate")
    return ssl.PEM_cert_to_DER_cert(text[start : stop + len(end)] + "\n")


@dataclass
class ServerTls:
    context: ssl.SSLContext
    psk: bytes | None
    fp: bytes  # SHA-256 of our certificate (for the PSK binding)


def server_context(cfg: TlsConfig) -> ServerTls:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cfg.psk is not None and cfg.cert is None:
        with tempfile.TemporaryDirectory(prefix="netsvc-usbip-") as tmp:
            cert, key = ephemeral_cert(tmp)
            ctx.load_cert_chain(cert, key)
            der = _first_der(cert)
    else:
        assert cfg.cert is not None and cfg.key is not None
        ctx.load_cert_chain(cfg.cert, cfg.key)
        der = _first_der(cfg.cert)
    if cfg.ca:
        ctx.load_verify_locations(cfg.ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ServerTls(ctx, cfg.psk, fingerprint(der))


def client_context(cfg: TlsConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cfg.ca:
        ctx.load_verify_locations(cfg.ca)
        ctx.check_hostname = cfg.server_name is not None
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:  # PSK mode: the certificate is pinned by the MAC exchange instead
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cfg.cert and cfg.key:
        ctx.load_cert_chain(cfg.cert, cfg.key)
    return ctx
