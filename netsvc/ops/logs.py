"""Logging for the daemons: ``logging`` with journald priorities and ``--log-level``.

Invariants:

- One record is one line on stderr, ``<prefix>: <message>``, exactly as the daemons printed
  before (the lab and operators grep these lines).
- When stderr is the journal (systemd sets ``JOURNAL_STREAM`` to its ``DEV:INODE`` and
  stderr's ``fstat`` matches), each line starts with ``<N>``, the syslog priority of the
  record's level (``sd-daemon(3)``), which journald strips and stores as the priority. On a
  terminal or a file (the lab) there is no prefix.
- ``setup`` is idempotent: a second call replaces the handler it installed, never stacks one.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TextIO

LEVELS = ("debug", "info", "warning", "error", "critical")

#: logging level -> syslog priority (sd-daemon(3)).
PRIORITIES = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


def priority(levelno: int) -> int:
    for level in sorted(PRIORITIES, reverse=True):
        if levelno >= level:
            return PRIORITIES[level]
    return 7


def stream_is_journal(stream: TextIO, env: dict[str, str] | None = None) -> bool:
    """True if ``stream`` is the journal's socket, as ``JOURNAL_STREAM`` says."""
    value = (os.environ if env is None else env).get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


class DaemonFormatter(logging.Formatter):
    """``[<N>]<prefix>: <message>``; the logger's name is not shown (the prefix names the
    daemon), a traceback follows on its own lines."""

    def __init__(self, prefix: str, journal: bool) -> None:
        super().__init__()
        self.prefix = prefix
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = f"{self.prefix}: {record.getMessage()}" if self.prefix else record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if self.journal:
            pri = priority(record.levelno)
            text = "\n".join(f"<{pri}>{line}" for line in text.splitlines())
        return text


_INSTALLED: list[logging.Handler] = []


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at each record (a test's capture, a redirect made
    after set-up), never to a stream that was replaced and closed since."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def setup(prefix: str, level: str = "info", stream: TextIO | None = None,
          journal: bool | None = None) -> logging.Logger:
    """Send the ``netsvc`` loggers to ``stream`` (default: ``sys.stderr`` as it is at each
    record) at ``level``; return the logger ``netsvc``. ``journal`` None: detect it
    (``stream_is_journal``)."""
    if journal is None:
        journal = stream_is_journal(sys.stderr if stream is None else stream)
    root = logging.getLogger("netsvc")
    for h in _INSTALLED:
        root.removeHandler(h)
    _INSTALLED.clear()
    handler = _StderrHandler() if stream is None else logging.StreamHandler(stream)
    handler.setFormatter(DaemonFormatter(prefix, journal))
    root.addHandler(handler)
    _INSTALLED.append(handler)
    root.setLevel(level.upper())
    root.propagate = False
    return root


def add_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", choices=LEVELS, default="info",
                   help="least severe level logged (default info)")


def level_of(message: str) -> int:
    """The level of a daemon's free-text event line, for callers that still pass text
    (``AgentContext.log``): ``fatal:``/``error`` first -> ERROR, a failure or a loss ->
    WARNING, anything else INFO."""
    head = message.lower()
    if head.startswith(("fatal", "error")):
        return logging.ERROR
    if any(w in head for w in ("failed", "unreachable", "warning", "refused", "stopped:")):
        return logging.WARNING
    return logging.INFO
