"""The systemd units in packaging/systemd: ``systemd-analyze verify`` accepts them (skipped
where the tool is missing, failed in CI), they say what the issue asks (Type=notify,
Restart=, RestartPreventExitStatus=2, StateDirectory, LoadCredential, the capability bounding
set), and each unit's own command line, with its credentials and state directory made up
here, boots to READY=1 on a fake NOTIFY_SOCKET and stops with status 0 on SIGTERM."""

from __future__ import annotations

import configparser
import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from peer_binary import require_binary

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "packaging" / "systemd"
NETSVC = Path(sys.executable).with_name("netsvc")
INSTALLED = "/usr/local/bin/netsvc"

#: Each unit and the capabilities it may keep.
CAPS = {
    "netsvc-manager.service": set(),
    "netsvc-agent.service": {"CAP_NET_RAW", "CAP_NET_ADMIN"},
    "netsvc-pool-agent.service": set(),
    "netsvc-memory-master.service": set(),
    "netsvc-bmc.service": {"CAP_NET_BIND_SERVICE", "CAP_KILL"},
    "netsvc-usbip.service": set(),
    "netsvc-memory-fabric.service": set(),
}


def _service(name: str) -> dict[str, str]:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read(UNITS / name)
    return dict(cp["Service"])


def test_every_unit_is_listed() -> None:
    assert sorted(p.name for p in UNITS.glob("*.service")) == sorted(CAPS)


@pytest.mark.parametrize("name", sorted(CAPS))
def test_unit_says_what_the_issue_asks(name: str) -> None:
    s = _service(name)
    assert s["Type"] == "notify"
    assert s["Restart"] == "on-failure"
    assert s["RestartPreventExitStatus"] == "2"
    assert s["StateDirectory"].startswith("netsvc/")
    assert s["LoadCredential"].split(":")[1].startswith("/etc/netsvc/credentials/")
    # every credential the command line reads (%d/NAME) is loaded (LoadCredential=NAME:...)
    text = (UNITS / name).read_text()
    loaded = {line.split("=", 1)[1].split(":")[0] for line in text.splitlines()
              if line.startswith("LoadCredential=")}
    used = {w.split("%d/", 1)[1] for w in s["ExecStart"].split() if "%d/" in w}
    assert used == loaded, (used, loaded)
    assert set(s["CapabilityBoundingSet"].split()) == CAPS[name]
    assert set(s.get("AmbientCapabilities", "").split()) <= CAPS[name]
    assert s["ExecStart"].startswith(INSTALLED + " ")
    assert "--config /etc/netsvc/" in s["ExecStart"]
    assert "%d/" in s["ExecStart"]  # the secret comes from the credential


def _verify(tool: str, unit: Path) -> tuple[int, str]:
    out = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "SYSTEMD_LOG_COLOR": "0"})
    return out.returncode, out.stderr + out.stdout


def _installed_copy(name: str, tmp: Path, text: str | None = None) -> Path:
    """The unit with ExecStart's netsvc pointing at this venv's (verify checks it exists)."""
    unit = tmp / name
    unit.write_text((text or (UNITS / name).read_text()).replace(INSTALLED, str(NETSVC)))
    return unit


@pytest.mark.parametrize("name", sorted(CAPS))
def test_systemd_analyze_verify(name: str, tmp_path: Path) -> None:
    tool = require_binary("systemd-analyze", "/usr/bin/systemd-analyze", "systemd")
    code, text = _verify(tool, _installed_copy(name, tmp_path))
    # verify exits 0 on some problems it only warns about: any line naming the unit is one
    problems = [line for line in text.splitlines() if name in line]
    assert code == 0 and not problems, text


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    tool = require_binary("systemd-analyze", "/usr/bin/systemd-analyze", "systemd")
    name = "netsvc-manager.service"
    broken = (UNITS / name).read_text().replace("Type=notify", "Type=notfy")
    code, text = _verify(tool, _installed_copy(name, tmp_path, broken))
    assert code != 0 or any(name in line for line in text.splitlines())


# -- each unit's command line boots to READY=1 --------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _configs(tmp: Path) -> dict[str, str]:
    """A test config per daemon (the shipped ones name real addresses)."""
    pool = tmp / "pool"
    subprocess.run([str(NETSVC), "memory", "init", "--pool", str(pool), "--size", "4M"],
                   check=True, capture_output=True, timeout=60)
    manager = f"https://127.0.0.1:{_free_port()}"
    return {
        "manager": f'listen = "127.0.0.1:0"\nmetrics_addr = "127.0.0.1:{_free_port()}"\n',
        "agent": f'host = "hv1"\nmanager = "{manager}"\ninterval = 5.0\n',
        "pool-agent": f'host = "hv1"\npool = "{pool}"\n',
        "memory-master": f'pool = "{pool}"\nmanager = "{manager}"\nno-partition = true\n',
        "bmc": f'user = "admin"\nbind = "127.0.0.1"\nport = 0\n'
               f'power-file = "{tmp / "power"}"\n',
        "usbip-serve": 'bind = "127.0.0.1"\nport = 0\ndevice = ["keyboard"]\n',
        "memory-fabric": f'pool = "{pool}"\nbind = "127.0.0.1"\nport = 0\n',
    }


def _command(name: str, tmp: Path) -> list[str]:
    """ExecStart with %d (credentials), %S (state) and /etc/netsvc made up under ``tmp``."""
    words = shlex.split(_service(name)["ExecStart"])
    out = []
    for w in words:
        w = w.replace(INSTALLED, str(NETSVC)).replace("%d", str(tmp / "creds"))
        w = w.replace("%S", str(tmp / "state")).replace("/etc/netsvc", str(tmp / "etc"))
        out.append(w)
    return out


@pytest.mark.parametrize("name", sorted(CAPS))
def test_unit_command_line_boots_ready(name: str, tmp_path: Path) -> None:
    daemon = {"netsvc-manager.service": "manager", "netsvc-agent.service": "agent",
              "netsvc-pool-agent.service": "pool-agent",
              "netsvc-memory-master.service": "memory-master",
              "netsvc-bmc.service": "bmc", "netsvc-usbip.service": "usbip-serve",
              "netsvc-memory-fabric.service": "memory-fabric"}[name]
    (tmp_path / "etc").mkdir()
    (tmp_path / "creds").mkdir()
    for cred, secret in (("api.key", "k" * 43), ("bmc.password", "secret"),
                         ("agent.token", "nsv1.k00000000.agent.0.hv1.x"),
                         ("usbip.psk", "p" * 32)):
        f = tmp_path / "creds" / cred
        f.write_text(secret + "\n")
        f.chmod(0o400)
    # the TLS credentials: a CA and the manager's certificate (openssl)
    from netsvc.ops.tls import make_ca, make_cert

    pki = tmp_path / "pki"
    make_ca(pki)
    make_cert(pki, "manager", ips=["127.0.0.1"])
    for cred, src in (("ca.pem", "ca.pem"), ("tls.pem", "manager.pem"),
                      ("tls.key", "manager.key")):
        (tmp_path / "creds" / cred).write_bytes((pki / src).read_bytes())
    (tmp_path / "power").write_text("on\n")
    (tmp_path / "etc" / f"{daemon}.toml").write_text(_configs(tmp_path)[daemon])
    sock_path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(0.5)
        proc = subprocess.Popen(_command(name, tmp_path), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "NOTIFY_SOCKET": str(sock_path)})
        try:
            msg = ""
            for _ in range(120):  # a generous bound on a loaded machine; exits early
                try:
                    msg = sock.recv(4096).decode()
                    break
                except TimeoutError:
                    if proc.poll() is not None:
                        break
            if not msg:
                proc.kill()
                pytest.fail(f"no READY=1 from {name}: {proc.communicate(timeout=10)}")
            sock.settimeout(30)
            assert "READY=1" in msg.split("\n")
            assert f"MAINPID={proc.pid}" in msg.split("\n")
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, (out, err)
            assert sock.recv(4096).decode().startswith("STOPPING=1")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
