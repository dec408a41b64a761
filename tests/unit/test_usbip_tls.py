"""TLS: pre-shared key (TLS + certificate-bound HMAC challenge) and mutual TLS with a CA."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from netsvc.usbip import client as cl
from netsvc.usbip import devices as dv
from netsvc.usbip import tls as t
from netsvc.usbip.proxy import DropProxy
from netsvc.usbip.server import ServerOptions, ServerThread

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl missing")
PSK = bytes(range(32))


def test_auth_exchange_is_bound_to_the_certificate() -> None:
    fp, mitm_fp = b"a" * 32, b"b" * 32
    hello = t.server_hello(b"s" * 32)
    nonce_s, resp = t.client_response(PSK, hello, b"c" * 32, fp)
    proof = t.server_check(PSK, nonce_s, resp, fp)
    t.client_check(PSK, nonce_s, b"c" * 32, fp, proof)
    with pytest.raises(t.AuthError, match="wrong key, or a TLS interceptor"):
        t.server_check(PSK, nonce_s, t.client_response(PSK, hello, b"c" * 32, mitm_fp)[1], fp)
    with pytest.raises(t.AuthError, match="client PSK proof"):
        t.server_check(b"x" * 32, nonce_s, resp, fp)
    with pytest.raises(t.AuthError, match="not a netsvc PSK hello"):
        t.client_response(PSK, b"\x01\x11\x00\x05" + bytes(33), b"c" * 32, fp)
    with pytest.raises(ValueError, match="at least 16"):
        t.TlsConfig(psk=b"short")


def test_psk_channel_works_and_wrong_keys_are_refused() -> None:
    opts = ServerOptions(tls=t.TlsConfig(psk=PSK), handshake_timeout=2.0)
    with ServerThread([dv.CdcAcm(), dv.BulkSourceSink()], options=opts) as st:
        good = t.TlsConfig(psk=PSK)
        assert [x.busid for x in cl.list_devices("127.0.0.1", st.port, good)] == ["1-1", "1-2"]
        with cl.Channel("127.0.0.1", "1-1", st.port, tls=good) as ch:
            assert ch.bulk_out(2, b"secret") == 6
            assert ch.bulk_in(0x81, 64, timeout=2) == b"secret"
        with pytest.raises(cl.UsbipError):
            cl.list_devices("127.0.0.1", st.port, t.TlsConfig(psk=b"y" * 32), timeout=2)
        _wait(lambda: any("client PSK proof" in e for e in st.server.errors))
        with pytest.raises(cl.UsbipError):  # a plain client does not get in either
            cl.list_devices("127.0.0.1", st.port, None, timeout=2)


def test_psk_channel_reconnects_through_a_drop() -> None:
    opts = ServerOptions(tls=t.TlsConfig(psk=PSK))
    with (
        ServerThread([dv.BulkSourceSink()], options=opts) as st,
        DropProxy(("127.0.0.1", st.port)) as px,
        cl.Channel("127.0.0.1", "1-1", px.port, tls=t.TlsConfig(psk=PSK)) as ch,
    ):
        assert ch.bulk_in(0x81, 100) == dv.pattern(100)
        px.drop()
        time.sleep(0.1)
        px.restore()
        assert ch.bulk_in(0x81, 1 << 20, timeout=5) == dv.pattern(1 << 20)
        assert ch.reconnects == 1


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)


def _pki(tmp: Path) -> dict[str, str]:
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", f"{tmp}/ca.key", "-out", f"{tmp}/ca.pem",
             "-days", "2", "-subj", "/CN=test-ca")  # fmt: skip
    for name in ("server", "client", "rogue"):
        _openssl("req", *ec, "-keyout", f"{tmp}/{name}.key", "-out", f"{tmp}/{name}.csr",
                 "-subj", f"/CN={name}")  # fmt: skip
        signer = ["-CA", f"{tmp}/ca.pem", "-CAkey", f"{tmp}/ca.key", "-CAcreateserial"]
        if name == "rogue":  # self-signed, not by the CA
            signer = ["-signkey", f"{tmp}/rogue.key"]
        _openssl("x509", "-req", "-in", f"{tmp}/{name}.csr", *signer, "-out",
                 f"{tmp}/{name}.pem", "-days", "2")  # fmt: skip
    return {n: f"{tmp}/{n}" for n in ("ca", "server", "client", "rogue")}


def test_mutual_tls_with_a_ca(tmp_path: Path) -> None:
    k = _pki(tmp_path)
    srv = t.TlsConfig(cert=k["server"] + ".pem", key=k["server"] + ".key", ca=k["ca"] + ".pem")
    opts = ServerOptions(tls=srv, handshake_timeout=2.0)
    with ServerThread([dv.HidKeyboard()], options=opts) as st:
        ok = t.TlsConfig(cert=k["client"] + ".pem", key=k["client"] + ".key", ca=k["ca"] + ".pem")
        with cl.Channel("127.0.0.1", "1-1", st.port, tls=ok) as ch:
            assert ch.need_bps() == 6400
        rogue = t.TlsConfig(cert=k["rogue"] + ".pem", key=k["rogue"] + ".key", ca=k["ca"] + ".pem")
        with pytest.raises((cl.UsbipError, OSError)):
            cl.list_devices("127.0.0.1", st.port, rogue, timeout=2)
        with pytest.raises((cl.UsbipError, OSError)):
            cl.list_devices("127.0.0.1", st.port, t.TlsConfig(ca=k["ca"] + ".pem"), timeout=2)
        s = socket.create_connection(("127.0.0.1", st.port))  # plain bytes into a TLS port
        s.sendall(bytes.fromhex("0111800500000000"))
        s.settimeout(3)
        assert s.recv(100) == b""
        s.close()


def _wait(cond: object, timeout: float = 3.0) -> None:
    assert callable(cond)
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.01)
