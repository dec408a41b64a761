"""The link share: a token bucket that keeps shipping under ``share`` of the site link (pure).

    bucket = Throttle(link_bps=100e6, share=0.5, burst_s=0.05)
    wait = bucket.reserve(nbytes, now)      # sleep ``wait`` seconds, then send

Invariants:

- Over any interval T the bytes let through are at most ``rate * T + burst`` (rate =
  ``link_bps * share / 8`` bytes/s): a reservation that would exceed it is granted later, never
  refused, so nothing is dropped, only delayed.
- ``share`` is in (0, 1]; ``used_share(now)`` is what the last ``window`` seconds used of the
  whole link (for ``replication status``).
"""

from __future__ import annotations

from collections import deque


class Throttle:
    def __init__(self, link_bps: float, share: float, *, burst_s: float = 0.05,
                 window: float = 2.0) -> None:
        if link_bps <= 0:
            raise ValueError(f"link rate must be positive, not {link_bps}")
        if not 0 < share <= 1:
            raise ValueError(f"link share must be in (0, 1], not {share}")
        self.link_bps = float(link_bps)
        self.share = float(share)
        self.rate = self.link_bps * self.share / 8.0  # bytes per second
        self.burst = max(1.0, self.rate * burst_s)
        self._free_at: float | None = None  # when the bucket is full-equivalent again
        self.window = window
        self._sent: deque[tuple[float, int]] = deque()
        self.total = 0

    def reserve(self, nbytes: int, now: float) -> float:
        """Account ``nbytes`` to go; returns how long to wait before sending them."""
        if nbytes < 0:
            raise ValueError("negative byte count")
        cost = nbytes / self.rate
        start = now if self._free_at is None else max(self._free_at, now)  # GCRA
        self._free_at = start + cost
        wait = max(0.0, self._free_at - now - self.burst / self.rate)
        self._sent.append((now + wait, nbytes))
        self.total += nbytes
        return wait

    def used_share(self, now: float) -> float:
        while self._sent and self._sent[0][0] < now - self.window:
            self._sent.popleft()
        sent = sum(n for t, n in self._sent if t <= now)
        return sent * 8.0 / (self.link_bps * self.window)
