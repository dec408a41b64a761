"""netsvc.ops: sd_notify over a fake NOTIFY_SOCKET, journald priorities and ``--log-level``,
config files in /etc/netsvc (``NETSVC_CONFIG_DIR`` here), and the shipped example configs
against the real parsers."""

from __future__ import annotations

import argparse
import io
import logging
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from netsvc.ops import config, logs, notify

REPO = Path(__file__).resolve().parents[2]


# -- sd_notify -------------------------------------------------------------------------------


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    d = tempfile.mkdtemp(prefix="ops-notify-")
    path = os.path.join(d, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    yield sock
    sock.close()
    os.unlink(path)
    os.rmdir(d)


def test_ready_reaches_the_notify_socket(notify_socket: socket.socket) -> None:
    assert notify.ready("serving")
    msg = notify_socket.recv(4096).decode().split("\n")
    assert "READY=1" in msg
    assert f"MAINPID={os.getpid()}" in msg
    assert "STATUS=serving" in msg
    assert notify.stopping()
    assert notify_socket.recv(4096).decode().startswith("STOPPING=1")


def test_abstract_socket_name() -> None:
    name = f"ops-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        assert notify.notify("READY=1", env={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(100) == b"READY=1"


def test_no_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.ready() is False
    # a socket that went away: swallowed, False
    assert notify.notify("READY=1", env={"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False
    assert notify.notify("READY=1", env={"NOTIFY_SOCKET": "vsock:2:1"}) is False


# -- logging -----------------------------------------------------------------------------------


def _log_lines(journal: bool, level: str = "info") -> list[str]:
    out = io.StringIO()
    root = logs.setup("netsvc test", level, stream=out, journal=journal)
    log = root.getChild("x")
    log.debug("detail")
    log.info("listening on http://127.0.0.1:1")
    log.warning("manager unreachable")
    log.error("fatal: key rejected")
    logs.setup("netsvc test", "info", stream=io.StringIO(), journal=False)  # detach `out`
    return out.getvalue().splitlines()


def test_plain_lines_keep_the_old_format() -> None:
    assert _log_lines(journal=False) == [
        "netsvc test: listening on http://127.0.0.1:1",
        "netsvc test: manager unreachable",
        "netsvc test: fatal: key rejected",
    ]


def test_journal_lines_carry_the_priority() -> None:
    assert _log_lines(journal=True, level="debug") == [
        "<7>netsvc test: detail",
        "<6>netsvc test: listening on http://127.0.0.1:1",
        "<4>netsvc test: manager unreachable",
        "<3>netsvc test: fatal: key rejected",
    ]


def test_log_level_filters() -> None:
    assert _log_lines(journal=False, level="error") == ["netsvc test: fatal: key rejected"]


def test_setup_twice_does_not_stack_handlers() -> None:
    out = io.StringIO()
    logs.setup("a", "info", stream=out, journal=False)
    logs.setup("a", "info", stream=out, journal=False)
    logging.getLogger("netsvc.y").info("once")
    logs.setup("a", "info", stream=io.StringIO(), journal=False)
    assert out.getvalue() == "a: once\n"


def test_journal_stream_detection(tmp_path: Path) -> None:
    with open(tmp_path / "f", "w") as f:
        st = os.fstat(f.fileno())
        assert logs.stream_is_journal(f, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not logs.stream_is_journal(f, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
        assert not logs.stream_is_journal(f, {})
        assert not logs.stream_is_journal(f, {"JOURNAL_STREAM": "junk"})


def test_level_of_free_text() -> None:
    assert logs.level_of("fatal: the manager rejected our key") == logging.ERROR
    assert logs.level_of("manager unreachable after 3 failures") == logging.WARNING
    assert logs.level_of("heartbeating to http://x every 1 s") == logging.INFO


# -- config files ------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="d")
    p.add_argument("--host", required=True)
    p.add_argument("--ttl", type=float, default=0.5)
    p.add_argument("--vm", action="append", default=[])
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--key-file")
    config.add_argument(p, "d")
    return p


def test_config_file_sets_defaults_and_flags_win(tmp_path: Path) -> None:
    f = tmp_path / "d.toml"
    f.write_text('host = "hv1"\nttl = 2.0\nvm = ["a:1", "b:2"]\ndry-run = true\n'
                 'key-file = "k"\n')
    p = _parser()
    words = ["--config", str(f), "--ttl", "3"]
    assert config.apply(p, words, "d") == str(f)
    a = p.parse_args(words)
    assert (a.host, a.ttl, a.vm, a.dry_run) == ("hv1", 3.0, ["a:1", "b:2"], True)
    assert a.key_file == str(tmp_path / "k")  # relative to the file


def test_default_file_in_config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(config.ENV_DIR, str(tmp_path))
    p = _parser()
    assert config.apply(p, [], "d") is None  # no file: flags alone
    with pytest.raises(SystemExit):
        p.parse_args([])  # --host still required
    (tmp_path / "d.toml").write_text('host = "hv2"\n')
    p = _parser()
    assert config.apply(p, [], "d") == str(tmp_path / "d.toml")
    assert p.parse_args([]).host == "hv2"


@pytest.mark.parametrize("text, message", [
    ('hots = "x"\n', "unknown key 'hots'"),
    ("ttl = [1]\n", "ttl must be a single value"),
    ('ttl = "fast"\n', "ttl"),
    ('vm = "a:1"\n', "vm must be a list"),
    ('dry-run = "yes"\n', "dry-run must be true or false"),
    ("host = \n", "not valid TOML"),
])
def test_bad_config_is_refused(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "d.toml"
    f.write_text(text)
    with pytest.raises(config.ConfigError, match=message):
        config.apply(_parser(), ["--config", str(f)], "d")


def test_missing_explicit_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="cannot read config"):
        config.apply(_parser(), [f"--config={tmp_path / 'none.toml'}"], "d")


def _daemon_parser(words: list[str]) -> argparse.ArgumentParser:
    """The real parser a ``netsvc`` command line ends in."""
    from netsvc.cli import build_parser

    p = build_parser()
    for w in words:
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        p = subs[0].choices[w]
    return p


@pytest.mark.parametrize("daemon, words, credential", [
    ("agent", ["agent"], ["--key-file", "k"]),
    ("bmc", ["bmc", "serve"], ["--password-file", "p"]),
    ("usbip-serve", ["usbip", "serve"], ["--tls-psk-file", "p"]),
])
def test_example_configs_fit_the_netsvc_commands(daemon: str, words: list[str],
                                                 credential: list[str]) -> None:
    path = REPO / "packaging" / "etc" / f"{daemon}.toml"
    p = _daemon_parser(words)
    assert config.FILES[p] == daemon
    words = ["--config", str(path), *credential]  # what the unit adds (its credential)
    config.apply(p, words, daemon)
    assert p.parse_args(words).log_level == "info"


def test_example_manager_config_loads() -> None:
    from netsvc.cluster.cli import load_manager_config
    from netsvc.services import PLUGINS

    cfg = load_manager_config(str(REPO / "packaging" / "etc" / "manager.toml"), PLUGINS)
    assert cfg["metrics_addr"] == "10.0.0.10:9700"
    assert cfg["log_level"] == "info"


@pytest.mark.parametrize("daemon, module", [
    ("pool-agent", "netsvc.memory.agent"),
    ("memory-master", "netsvc.memory.master"),
    ("memory-fabric", "netsvc.memory.fabric"),
])
def test_example_configs_fit_the_memory_daemons(daemon: str, module: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    from netsvc.ops import daemon as d

    captured: list[argparse.Namespace] = []

    def stop_after_parse(p: argparse.ArgumentParser, argv: list[str] | None,
                         name: str) -> argparse.Namespace:
        assert name == daemon
        config.apply(p, list(argv or []), name)
        captured.append(p.parse_args(list(argv or [])))
        raise SystemExit(0)

    monkeypatch.setattr(d, "parse", stop_after_parse)
    path = REPO / "packaging" / "etc" / f"{daemon}.toml"
    with pytest.raises(SystemExit):  # --key-file: what the unit adds (its credential)
        importlib.import_module(module).main(["--config", str(path), "--key-file", "k"])
    assert captured[0].pool == "/dev/shm/netsvc-pool"


def test_daemons_refuse_a_malformed_metrics_address(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from netsvc.cli import main

    key = tmp_path / "key"
    key.write_text("k" * 43 + "\n")
    key.chmod(0o600)
    assert main(["agent", "--host", "h1", "--manager", "http://127.0.0.1:9",
                 "--key-file", str(key), "--metrics-addr", "nope"]) == 2
    assert main(["manager", "--listen", "127.0.0.1:0", "--key-file", str(key),
                 "--state-dir", str(tmp_path / "s"), "--metrics-addr", "nope"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["netsvc agent: error: bad metrics address 'nope': expected ADDR:PORT",
                   "netsvc manager: error: bad metrics address 'nope': expected ADDR:PORT"]


def test_agent_config_file_through_netsvc_main(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """``netsvc agent`` with no flags at all: everything from /etc/netsvc/agent.toml."""
    from netsvc.cli import main

    monkeypatch.setenv(config.ENV_DIR, str(tmp_path))
    (tmp_path / "agent.toml").write_text(
        'host = "h1"\nmanager = "ftp://x"\nkey-file = "missing-key"\n')
    assert main(["agent"]) == 2  # got past argparse's required --host: the file gave it
    err = capsys.readouterr().err
    assert err.startswith("netsvc agent: error: ") and "missing-key" in err
    (tmp_path / "agent.toml").write_text('hots = "h1"\n')
    assert main(["agent"]) == 2
    assert "unknown key 'hots'" in capsys.readouterr().err


def test_default_handler_follows_sys_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    logs.setup("d", "info", journal=False)
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr("sys.stderr", first)
    logging.getLogger("netsvc.z").info("one")
    monkeypatch.setattr("sys.stderr", second)
    logging.getLogger("netsvc.z").info("two")
    assert (first.getvalue(), second.getvalue()) == ("d: one\n", "d: two\n")
