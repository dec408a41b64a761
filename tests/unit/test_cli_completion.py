"""``netsvc completion SHELL``: the script is generated from the parser, and bash really
completes with it (subcommands, options)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest


def _script(shell: str) -> str:
    r = subprocess.run([sys.executable, "-m", "netsvc", "completion", shell],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _complete(script: str, words: list[str]) -> list[str]:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    line = " ".join(words)
    prog = (f"{script}\nCOMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; "
            f"COMP_LINE='{line}'; COMP_POINT=${{#COMP_LINE}}; _shtab_netsvc; "
            'printf "%s\\n" "${COMPREPLY[@]}"')
    r = subprocess.run([bash, "-c", prog], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_bash_completes_subcommands_and_options() -> None:
    script = _script("bash")
    assert "storage" in _complete(script, ["netsvc", "sto"])
    assert _complete(script, ["netsvc", "lab", "--sc"]) == ["--scenario"]
    assert "maintenance" in _complete(script, ["netsvc", "storage", "mai"])


def test_zsh_and_tcsh_scripts_are_made_and_a_bad_shell_is_refused() -> None:
    assert "#compdef netsvc" in _script("zsh")
    assert "complete netsvc" in _script("tcsh")
    r = subprocess.run([sys.executable, "-m", "netsvc", "completion", "fish"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "invalid choice" in r.stderr
