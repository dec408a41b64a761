"""Lab configuration files and scenario parameters, checked before anything is built."""

from __future__ import annotations

from pathlib import Path

import pytest

from netsvc.lab.config import ConfigError, check_link
from netsvc.lab.plan import LabPlan
from netsvc.lab.runner import UsageError, validate


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "lab.toml"
    p.write_text(text)
    return p


def test_defaults_without_a_file() -> None:
    cfg = validate("smoke", None)
    assert cfg.hosts == 3
    assert cfg.scenario == {"vm": "vm1", "to": "h2", "crash": "h3", "loss_link": None,
                            "loss_rate": 0.0, "src": "h1"}


def test_a_full_file(tmp_path: Path) -> None:
    cfg = validate("smoke", None, write(tmp_path, """
[lab]
hosts = 4
heartbeat_interval = 0.25
[smoke]
vm = "vm3"
to = "h1"
crash = "h4"
loss_link = "gw:eth0"
loss_rate = 0.05
"""))
    assert cfg.hosts == 4 and cfg.heartbeat_interval == 0.25
    assert cfg.scenario["vm"] == "vm3" and cfg.scenario["loss_rate"] == 0.05


def test_command_line_hosts_override_the_file(tmp_path: Path) -> None:
    assert validate("smoke", 2, write(tmp_path, "[lab]\nhosts = 5\n")).hosts == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[lab]\nhosts = 'three'\n", "lab.hosts must be int"),
        ("[lab]\nhots = 3\n", "unknown key lab.hots"),
        ("[other]\n", "unknown section [other]"),
        ("[lab\n", "invalid config"),
        ("[lab]\nheartbeat_interval = 0\n", "heartbeat_interval 0.0 must be"),
        ("[lab]\nhosts = 0\n", "bad host count 0"),
        ("[smoke]\nvm = 'vm9'\n", "no VM vm9 in a lab of 6 VMs"),
        ("[smoke]\nvm = 'web1'\n", "invalid VM name 'web1'"),
        ("[smoke]\nto = 'h1'\n", "vm1 already starts on h1"),
        ("[smoke]\nto = 'h7'\n", "host out of range"),
        ("[smoke]\ncrash = 'h2'\n", "cannot crash h2"),
        ("[smoke]\nloss_link = 'h1:eth9'\nloss_rate = 0.1\n", "invalid link 'h1:eth9'"),
        ("[smoke]\nloss_link = 'gw:eth5'\n", "gw has eth0..eth1"),
        ("[smoke]\nloss_rate = 0.1\n", "loss_rate needs a loss_link"),
        ("[smoke]\nloss_link = 'vm1'\nloss_rate = 1.5\n", "loss_rate 1.5"),
        ("[smoke]\nvm = true\n", "smoke.vm must be str"),
    ],
)
def test_bad_files_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("(", r"\(")) as e:
        validate("smoke", None, write(tmp_path, text))
    assert "\n" not in str(e.value)


def test_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot read config"):
        validate("smoke", None, tmp_path / "nope.toml")


@pytest.mark.parametrize("spec", ["h1:vmnet", "h3:eth4", "h1:eth5", "h2:memfab", "svc:eth3",
                                  "vm6", "vm2:eth0", "gw:eth1", "svc:eth2", "bmc2", "site:eth0"])
def test_good_links(spec: str) -> None:
    assert check_link(spec, LabPlan("nvab", hosts=3)) == spec


@pytest.mark.parametrize("spec", ["h4:eth0", "h1:eth8", "h1", "vm7", "vm1:eth1", "gw:eth2",
                                  "router:eth0", "h1:wan", ""])
def test_bad_links(spec: str) -> None:
    with pytest.raises(ConfigError):
        check_link(spec, LabPlan("nvab", hosts=3))
