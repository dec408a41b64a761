"""A device's bandwidth need, measured where it is served: the URB throughput over a window.

A device's *declared* need is what it says: the bandwidth its periodic endpoints reserve
(from its descriptors), or, for a device that announces it, its answer to the vendor request
the announcement names (``netsvc.usbip.descriptors.find_need_announcement``). Real bulk
devices (a camera, a disk) declare nothing: their periodic reservation is 0. So the server
also *measures*: ``RateMeter`` counts the bytes of every completed data URB (bulk, interrupt,
isochronous; not control) of an export, and ``peak_bps(now)`` is the highest rate over any
``span_s`` within the last ``window_s``: the rate the device ran at while it was busy, not
its average over a mostly idle window. The placement takes the larger of the declared and
the measured need (``OP_REQ_NEED``, netsvc's extension op, carries it to the client).

Invariants:

- Pure: ``add(now, nbytes)`` and ``peak_bps(now)`` take the time; nothing reads a clock.
- Memory is bounded: at most ``window_s / bucket_s + 1`` buckets are kept; older ones are
  dropped on every call. Times that go backwards are counted in the newest bucket.
- ``peak_bps`` is 0 before anything was counted and once the window has passed; a span is
  measured over whole buckets, so a burst shorter than ``span_s`` is averaged over the span
  (the need is never over-stated by a single large URB).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

DEFAULT_WINDOW_S = 30.0
DEFAULT_SPAN_S = 1.0
DEFAULT_BUCKET_S = 0.25


@dataclass(frozen=True)
class Measured:
    """A measured need as the server reports it."""

    bps: int
    window_s: float
    span_s: float


class RateMeter:
    def __init__(self, window_s: float = DEFAULT_WINDOW_S, span_s: float = DEFAULT_SPAN_S,
                 bucket_s: float = DEFAULT_BUCKET_S) -> None:
        for name, v in (("window_s", window_s), ("span_s", span_s), ("bucket_s", bucket_s)):
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive number of seconds, not {v!r}")
        if not bucket_s <= span_s <= window_s:
            raise ValueError(f"need bucket_s <= span_s <= window_s, not {bucket_s}, {span_s}, "
                             f"{window_s}")
        self.window_s, self.span_s, self.bucket_s = float(window_s), float(span_s), float(bucket_s)
        self._per_span = max(1, round(span_s / bucket_s))
        self._keep = math.ceil(window_s / bucket_s) + 1
        self._buckets: deque[tuple[int, int]] = deque()  # (bucket index, bytes)
        self.total = 0

    def _index(self, now: float) -> int:
        return math.floor(now / self.bucket_s)

    def _expire(self, now: float) -> None:
        oldest = self._index(now) - self._keep + 1
        while self._buckets and self._buckets[0][0] < oldest:
            self._buckets.popleft()

    def add(self, now: float, nbytes: int) -> None:
        if nbytes <= 0:
            return
        self.total += nbytes
        i = self._index(now)
        if self._buckets and self._buckets[-1][0] >= i:
            j, n = self._buckets[-1]
            self._buckets[-1] = (j, n + nbytes)
        else:
            self._buckets.append((i, nbytes))
        self._expire(now)

    def peak_bps(self, now: float) -> int:
        self._expire(now)
        if not self._buckets:
            return 0
        counts = dict(self._buckets)
        first, last = self._buckets[0][0], self._buckets[-1][0]
        best = 0
        for start in range(first, last + 1):
            best = max(best, sum(counts.get(k, 0) for k in range(start, start + self._per_span)))
        return round(best * 8 / (self._per_span * self.bucket_s))

    def measured(self, now: float) -> Measured:
        return Measured(self.peak_bps(now), self.window_s, self._per_span * self.bucket_s)
