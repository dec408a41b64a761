"""The BMC's configuration store (IPMI OEM 0x30): pure checks of bad blobs, then over loopback
against the real pyghmi BMC with Debian's ``ipmitool raw`` (the standard client) and with
netsvc's pyghmi client in one session, while the host's power is off."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from peer_binary import require_binary

from netsvc.bmc.client import BmcClient
from netsvc.bmc.config_client import (
    ConfigRefused,
    info,
    ipmitool_batch,
    ipmitool_raw,
    read_config,
    with_pyghmi,
    write_blob,
    write_config,
)
from netsvc.bmc.config_store import (
    C_INVALID,
    C_RANGE,
    C_STATE,
    CHUNK,
    MAX_BLOB,
    BlobError,
    ConfigStore,
    decode_blob,
    encode_blob,
    install,
)
from netsvc.bmc.server import BmcServer, PowerFileBackend

LOOPBACK = "127.0.0.1"
USER = "admin"
PASSWORD = "cfg-Pw-9"
PAYLOAD = {"vms": [{"name": f"vm{i}", "cpus": 2, "memory_mib": 512, "epoch": 41 + i,
                    "nics": [{"mac": f"52:54:00:00:00:0{i}", "network": "site-b"}],
                    "disks": [{"name": f"vm{i}", "size": 1 << 26}]} for i in range(4)]}


def local(store: ConfigStore) -> object:
    def raw(command: int, data: bytes) -> bytes:
        code, out = store.handle(command, data)
        if code:
            raise ConfigRefused(command, code)
        return out
    return raw


# -- pure ------------------------------------------------------------------------------------


def test_blob_codec_names_every_fault() -> None:
    blob = encode_blob(PAYLOAD)
    assert decode_blob(blob) == PAYLOAD
    with pytest.raises(BlobError, match="truncated"):
        decode_blob(blob[:-3])
    with pytest.raises(BlobError, match="truncated"):
        decode_blob(blob[:5])
    with pytest.raises(BlobError, match="version 2"):
        decode_blob(encode_blob(PAYLOAD, version=2))
    with pytest.raises(BlobError, match="magic"):
        decode_blob(b"XXXX" + blob[4:])
    with pytest.raises(BlobError, match="over"):
        encode_blob({"x": "a" * MAX_BLOB})


def test_store_refuses_bad_uploads_and_keeps_the_committed_blob(tmp_path: Path) -> None:
    now = [0.0]
    store = ConfigStore(tmp_path / "cfg", clock=lambda: now[0])
    raw = local(store)
    assert write_config(raw, PAYLOAD) == 1  # type: ignore[arg-type]
    good = store.blob

    def upload(blob: bytes, sha: bytes | None = None, length: int | None = None,
               upto: int | None = None) -> int:
        code, token = store.begin(len(blob) if length is None else length,
                                  sha or hashlib.sha256(blob).digest(), now[0])
        if code:
            return code
        for off in range(0, len(blob) if upto is None else upto, CHUNK):
            code, _ = store.write(token[0], off, blob[off:off + CHUNK], now[0])
            if code:
                return code
        return store.commit(token[0], now[0])[0]

    other = encode_blob({"vms": [{"name": "x" * 300}]})
    assert len(other) > 2 * CHUNK
    assert upload(other, sha=bytes(32)) == C_INVALID  # checksum
    assert upload(other, upto=CHUNK) == C_INVALID  # truncated: one chunk of three sent
    v2 = encode_blob({"vms": []}, version=2)
    assert upload(v2) == C_INVALID  # wrong version, even with a right checksum
    assert upload(b"\0" * (MAX_BLOB + 1)) == C_RANGE  # too large
    assert store.blob == good and store.generation == 1
    assert len(store.refusals) == 4
    # out of order, a stale token, a retransmission, an upload left idle
    _, token = store.begin(len(other), hashlib.sha256(other).digest(), now[0])
    assert store.write(token[0], CHUNK, other[CHUNK:2 * CHUNK], now[0])[0] == C_STATE
    assert store.write(token[0] ^ 0x55, 0, other[:1], now[0])[0] == C_STATE
    assert store.write(token[0], 0, other[:10], now[0])[0] == 0
    assert store.write(token[0], 0, other[:10], now[0])[0] == 0  # same bytes again
    assert store.write(token[0], 0, b"Z" * 10, now[0])[0] == C_INVALID
    now[0] += 31
    assert store.commit(token[0], now[0])[0] == C_STATE
    # the file survives a BMC restart; a corrupted file is ignored
    again = ConfigStore(tmp_path / "cfg")
    assert again.blob == good
    (tmp_path / "cfg").write_bytes(good[:-1])
    assert ConfigStore(tmp_path / "cfg").blob == b""


# -- over loopback -------------------------------------------------------------------------


@pytest.fixture
def bmc(tmp_path: Path) -> Iterator[tuple[BmcServer, ConfigStore, Path]]:
    power = tmp_path / "b1.power"
    power.write_text("off\n")  # the host sleeps; the BMC serves
    server = BmcServer(PowerFileBackend(power), {USER: PASSWORD}, bind=LOOPBACK, port=0,
                       name="t-cfg")
    store = ConfigStore(tmp_path / "b1.config")
    install(server, store)
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD + "\n")
    pw.chmod(0o600)
    with server:
        yield server, store, pw


def test_ipmitool_raw_writes_and_reads_the_configuration_while_the_host_is_off(
        bmc: tuple[BmcServer, ConfigStore, Path]) -> None:
    tool = require_binary("ipmitool", "/usr/bin/ipmitool", "ipmitool")
    server, store, pw = bmc
    raw = ipmitool_raw(LOOPBACK, USER, pw, port=server.port, tool=tool)
    assert not info(raw).present
    gen = write_config(raw, PAYLOAD)
    payload, i = read_config(raw)
    assert payload == PAYLOAD and i.generation == gen == 1
    assert i.sha256 == hashlib.sha256(store.blob).digest()
    # the standard client by hand: GET INFO is 42 bytes, the first READ is the blob's head
    cmd = [tool, "-I", "lanplus", "-H", LOOPBACK, "-p", str(server.port), "-U", USER,
           "-f", str(pw), "raw"]
    r = subprocess.run([*cmd, "0x30", "0x74", "0", "0", "0", "0", "8"], capture_output=True,
                       text=True, timeout=20, check=True)
    assert bytes(int(x, 16) for x in r.stdout.split()) == store.blob[:8]
    assert store.blob[:4] == b"NSCF"
    # a COMMIT with a wrong checksum through ipmitool: refused with 0xCC, nothing changes
    with pytest.raises(ConfigRefused) as e:
        blob = json.dumps({"x": 1}).encode()
        token = raw(0x71, struct.pack("<I", len(blob)) + bytes(32))
        raw(0x72, token + struct.pack("<I", 0) + blob)
        raw(0x73, token)
    assert e.value.code == C_INVALID
    assert read_config(raw)[0] == PAYLOAD
    # every chunk in one session (ipmitool exec): the same blob, checked by the same SHA-256
    batch = ipmitool_batch(LOOPBACK, USER, pw, port=server.port, tool=tool)
    assert read_config(raw, batch)[0] == PAYLOAD
    # a wrong password never reaches the store
    bad = tmp = pw.with_name("bad")
    tmp.write_text("wrong\n")
    tmp.chmod(0o600)
    with pytest.raises(ConfigRefused):
        info(ipmitool_raw(LOOPBACK, USER, bad, port=server.port, tool=tool))


def test_pyghmi_client_uploads_in_one_session(bmc: tuple[BmcServer, ConfigStore, Path]) -> None:
    server, store, _ = bmc
    client = BmcClient(LOOPBACK, USER, PASSWORD, port=server.port, timeout=5.0)
    big = {"vms": [{"name": f"vm{i}", "pad": "x" * 200} for i in range(40)]}
    gen = with_pyghmi(client, lambda raw: write_config(raw, big))
    assert gen == 1 and len(store.blob) > 40 * CHUNK
    got, i = with_pyghmi(client, read_config)
    assert got == big and i.length == len(store.blob)
    # a truncated blob (a valid header claiming more than is sent) is refused by the store
    blob = encode_blob({"vms": []})
    with pytest.raises(ConfigRefused) as e:
        with_pyghmi(client, lambda raw: write_blob(raw, blob[:-2]))
    assert e.value.code == C_INVALID
    assert with_pyghmi(client, read_config)[0] == big
