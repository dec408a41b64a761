"""The link share: a token bucket that keeps shipping under ``share`` of the site link (pure).

    bucket = Throttle(link_bps=100e6, share=0.5, burst_s=0.05)
    wait = bucket.reserve(nbytes, now)      # an epoch: sleep ``wait`` seconds, then send
    hold = bucket.admit_bulk(nbytes, now)   # an initial copy: first wait until this is 0,
    wait = bucket.reserve(nbytes, now, bulk=True)  # then reserve like an epoch

Two classes share the bucket. The protected VMs' **epochs** go first: while any epoch is on the
link (its reserved bytes not yet through, plus ``urgent_gap``), the **bulk** traffic (initial
copies of VMs not yet protected) is admitted at no more than ``bulk_floor`` of the rate, so an
epoch waits behind at most one bulk chunk and the RPO of the VMs already protected does not pay
for the others' initial copies; when no epoch is shipping, bulk takes the whole share. Measured
without it: the copies and the epochs split the share about evenly, and a protected VM's RPO
went over its 1 s target while the others' copies ran.

Invariants:

- Over any interval T the bytes let through are at most ``rate * T + burst`` (rate =
  ``link_bps * share / 8`` bytes/s), both classes together: a reservation that would exceed it
  is granted later, never refused, so nothing is dropped, only delayed.
- Bulk is never starved: while epochs ship, it is admitted at ``bulk_floor * rate`` (in
  (0, 1]); an epoch's reservation is never held by the bulk gate.
- ``share`` is in (0, 1]; ``used_share(now)`` is what the last ``window`` seconds used of the
  whole link (for ``replication status``).
"""

from __future__ import annotations

from collections import deque


class Throttle:
    def __init__(self, link_bps: float, share: float, *, burst_s: float = 0.05,
                 window: float = 2.0, bulk_floor: float = 0.25,
                 urgent_gap: float = 0.05) -> None:
        if link_bps <= 0:
            raise ValueError(f"link rate must be positive, not {link_bps}")
        if not 0 < share <= 1:
            raise ValueError(f"link share must be in (0, 1], not {share}")
        if not 0 < bulk_floor <= 1:
            raise ValueError(f"bulk floor must be in (0, 1], not {bulk_floor}")
        self.bulk_floor = float(bulk_floor)
        self.urgent_gap = float(urgent_gap)
        self._urgent_until: float | None = None  # when the epochs' reserved bytes are through
        self._bulk_next = 0.0  # the earliest the next bulk chunk is admitted while epochs ship
        self.link_bps = float(link_bps)
        self.share = float(share)
        self.rate = self.link_bps * self.share / 8.0  # bytes per second
        self.burst = max(1.0, self.rate * burst_s)
        self._free_at: float | None = None  # when the bucket is full-equivalent again
        self.window = window
        self._sent: deque[tuple[float, int]] = deque()
        self.total = 0

    def epochs_shipping(self, now: float) -> bool:
        return self._urgent_until is not None and now < self._urgent_until + self.urgent_gap

    def admit_bulk(self, nbytes: int, now: float) -> float:
        """How long a bulk chunk of ``nbytes`` must hold off before it may :meth:`reserve`
        (0: reserve it now; then the next chunk's slot is counted from here)."""
        if not self.epochs_shipping(now):
            self._bulk_next = now
            return 0.0
        if self._bulk_next > now:
            return self._bulk_next - now
        self._bulk_next = now + nbytes / (self.rate * self.bulk_floor)
        return 0.0

    def reserve(self, nbytes: int, now: float, *, bulk: bool = False) -> float:
        """Account ``nbytes`` to go; returns how long to wait before sending them."""
        if nbytes < 0:
            raise ValueError("negative byte count")
        cost = nbytes / self.rate
        start = now if self._free_at is None else max(self._free_at, now)  # GCRA
        self._free_at = start + cost
        if not bulk:
            self._urgent_until = self._free_at
        wait = max(0.0, self._free_at - now - self.burst / self.rate)
        self._sent.append((now + wait, nbytes))
        self.total += nbytes
        return wait

    def used_share(self, now: float) -> float:
        while self._sent and self._sent[0][0] < now - self.window:
            self._sent.popleft()
        sent = sum(n for t, n in self._sent if t <= now)
        return sent * 8.0 / (self.link_bps * self.window)
