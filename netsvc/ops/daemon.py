"""The common options of a standalone daemon's ``main`` (the pool agent, the memory master,
the memory fabric): ``--config`` (``/etc/netsvc/<daemon>.toml``), ``--log-level``,
``--metrics-addr``; and its start-up (config, logging, metrics endpoint, sd_notify).

Invariants:

- ``parse`` exits 2 with one line on stderr for a bad config file, as argparse does for a bad
  flag; it never returns a half-configured namespace.
- Without ``--metrics-addr`` nothing listens; the counters still count (cheap), so code that
  increments them never checks whether metrics are on.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from prometheus_client import Counter

from netsvc.ops import config, logs, notify
from netsvc.ops.metrics import MetricsServer, new_registry


def add_arguments(p: argparse.ArgumentParser, daemon: str) -> None:
    config.add_argument(p, daemon)
    logs.add_argument(p)
    p.add_argument("--metrics-addr", metavar="ADDR:PORT", default=None,
                   help="serve Prometheus metrics on http://ADDR:PORT/metrics")


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None,
          daemon: str) -> argparse.Namespace:
    words = list(sys.argv[1:] if argv is None else argv)
    try:
        config.apply(p, words, daemon)
    except config.ConfigError as exc:
        print(f"{p.prog}: error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    return p.parse_args(words)


class Daemon:
    """One standalone daemon's logger, counters and endpoint."""

    def __init__(self, prog: str, args: argparse.Namespace) -> None:
        self.prog = prog
        self.log: logging.Logger = logs.setup(prog, args.log_level).getChild(
            prog.replace("-", "_"))
        self.registry = new_registry()
        self.metrics_addr: str | None = args.metrics_addr
        self.server: MetricsServer | None = None

    def counter(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Counter:
        return Counter(name, documentation, list(labels), registry=self.registry)

    def start(self, status: str) -> None:
        """Serve metrics (if asked) and tell systemd we are ready. OSError/ValueError: the
        metrics address is unusable (the caller exits 2)."""
        if self.metrics_addr:
            self.server = MetricsServer(self.metrics_addr, self.registry)
            self.log.info("metrics on %s", self.server.url)
        notify.ready(status)

    def stop(self) -> None:
        notify.stopping()
        if self.server is not None:
            self.server.close()
            self.server = None
