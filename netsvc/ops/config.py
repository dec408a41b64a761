"""Config files for the daemons: ``/etc/netsvc/<daemon>.toml`` by default, ``--config`` to
name another.

A daemon's file holds its command-line options as TOML keys (``key-file`` or ``key_file``
for ``--key-file``); the command line wins over the file, the file over the built-in defaults.

Invariants:

- With no ``--config``, the default file is read only if it exists: a host with no file in
  ``/etc/netsvc`` runs on its flags alone (the lab does). A ``--config`` that cannot be read,
  is not TOML, or has a key that is no option of the daemon is a usage error (exit 2), never
  ignored.
- Values keep their TOML types; a string for an option with a ``type`` is converted by that
  type, as argparse would. A list is only accepted for a repeatable (``append``) option.
- ``NETSVC_CONFIG_DIR`` replaces ``/etc/netsvc`` (tests, a non-root operator).
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Sequence
from typing import Any

DEFAULT_DIR = "/etc/netsvc"
ENV_DIR = "NETSVC_CONFIG_DIR"
#: A config dir that can never exist (``/dev/null`` is no directory): the lab and the tests set
#: ``NETSVC_CONFIG_DIR`` to it, so their daemons run on their flags alone.
NO_CONFIG_DIR = "/dev/null/netsvc"


class ConfigError(Exception):
    """A config file that cannot be used: exit 2 with this one-line message."""


def default_path(daemon: str) -> str:
    return os.path.join(os.environ.get(ENV_DIR) or DEFAULT_DIR, f"{daemon}.toml")


#: Subcommand parsers of ``netsvc`` whose options a file may set, with the daemon's name;
#: ``netsvc.cli.main`` applies the file before parsing (``register``).
FILES: dict[argparse.ArgumentParser, str] = {}


def add_argument(p: argparse.ArgumentParser, daemon: str) -> None:
    p.add_argument("--config", metavar="FILE", default=None,
                   help=f"TOML file of these options (default {default_path(daemon)}, "
                   "if it exists)")


def register(p: argparse.ArgumentParser, daemon: str) -> None:
    """``--config`` on a ``netsvc`` subcommand, whose file ``netsvc.cli.main`` applies."""
    add_argument(p, daemon)
    FILES[p] = daemon


def _given_config(words: Sequence[str]) -> str | None:
    for i, w in enumerate(words):
        if w == "--config" and i + 1 < len(words):
            return words[i + 1]
        if w.startswith("--config="):
            return w.split("=", 1)[1]
    return None


def read(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path} is not valid TOML: {exc}") from None


def apply(p: argparse.ArgumentParser, words: Sequence[str], daemon: str) -> str | None:
    """Make the options in the daemon's config file ``p``'s defaults (and no longer
    required); return the file read, or None. Call before ``p.parse_args(words)``."""
    path = _given_config(words)
    if path is None:
        path = default_path(daemon)
        if not os.path.exists(path):
            return None
    data = read(path)
    actions = {a.dest: a for a in p._actions if a.dest not in ("help", "config")}
    base = os.path.dirname(os.path.abspath(path))
    for key, value in data.items():
        dest = key.replace("-", "_")
        action = actions.get(dest)
        if action is None:
            raise ConfigError(f"config {path}: unknown key {key!r} (not an option of "
                              f"{p.prog})")
        action.default = _convert(path, key, action, value, base)
        action.required = False
    return path


def _convert(path: str, key: str, action: argparse.Action, value: Any, base: str) -> Any:
    def one(v: Any) -> Any:
        if isinstance(v, (dict, list)):
            raise ConfigError(f"config {path}: {key} must be a single value")
        if isinstance(v, str) and action.type is not None and callable(action.type):
            try:
                v = action.type(v)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"config {path}: {key}: {exc}") from None
        if action.choices is not None and v not in action.choices:
            raise ConfigError(f"config {path}: {key} must be one of {list(action.choices)}")
        if isinstance(v, str) and key.replace("_", "-").endswith(("-file", "-dir")):
            v = os.path.join(base, os.path.expanduser(v))  # relative to the file
        return v

    if isinstance(action, argparse._AppendAction):
        if not isinstance(value, list):
            raise ConfigError(f"config {path}: {key} must be a list")
        return [one(v) for v in value]
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ConfigError(f"config {path}: {key} must be true or false")
        return value
    return one(value)
