"""Conflict evidence: the raw frames an address conflict was detected from, as a pcap file.

``write_pcap`` writes frames (unix time, raw Ethernet bytes) to ``<ip>-<unix time>.pcap`` in a
directory, for Wireshark or ``tcpdump -r``. ``FrameRing`` is the memory a watcher keeps to have
those frames at hand when the monitor reports a Conflict (the monitor itself keeps only times).

Invariants:
- ``write_pcap`` only creates new files, directly in ``directory`` (the name is built from a
  parsed IP address and an integer, never from raw input), and never overwrites one: when
  ``<ip>-<t>.pcap`` exists it writes ``<ip>-<t>-2.pcap``, and so on. The file is classic pcap,
  link type Ethernet (DLT_EN10MB), microsecond timestamps, one record per frame, in the order
  given, each frame's bytes unchanged.
- Scapy is imported by ``write_pcap`` and ``prepare``, never when this module is imported.
- ``FrameRing`` is bounded whatever arrives: at most ``addresses`` addresses (adding one more
  forgets the least recently claimed) times ``per_address`` frames (the newest).
"""

from __future__ import annotations

import ipaddress
import math
import os
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

#: pcap link type of Ethernet frames.
DLT_EN10MB = 1
_MAX_SAME_NAME = 1000


@dataclass(frozen=True)
class EvidenceWritten:
    """The frames of a Conflict about ``ip`` were written to ``path``."""

    ip: str
    path: str
    frames: int
    at: float


@dataclass(frozen=True)
class EvidenceFailed:
    """The frames of a Conflict about ``ip`` could not be written."""

    ip: str
    error: str
    at: float


def pcap_name(ip: str, unix_time: float) -> str:
    """``198.18.1.20-1764578400.pcap``. Raises ValueError for a bad address or time."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        raise ValueError(f"invalid IP address {ip!r}") from None
    if not math.isfinite(unix_time) or unix_time < 0:
        raise ValueError(f"invalid unix time {unix_time!r}")
    return f"{addr}-{int(unix_time)}.pcap"


def prepare(directory: str | os.PathLike[str]) -> Path:
    """Create ``directory`` if needed, check it is writable, and import Scapy's writer now, so
    the first conflict does not wait for it. Raises OSError."""
    import scapy.utils  # noqa: F401

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(13, f"evidence directory {str(path)!r} is not writable")
    return path


def write_pcap(
    directory: str | os.PathLike[str],
    ip: str,
    frames: Iterable[tuple[float, bytes]],
    *,
    unix_time: float | None = None,
) -> Path:
    """Write ``frames`` (unix time, raw Ethernet frame), oldest first, to a new pcap file
    ``<ip>-<unix time>.pcap`` in ``directory`` (created if missing); return its path.

    ``unix_time`` names the file; by default the time of the last frame (the one that
    revealed the conflict). Raises ValueError for no frames or a bad address or time, and
    OSError if the file cannot be written."""
    from scapy.utils import PcapWriter

    records = []
    last = 0.0
    for t, frame in frames:
        if not isinstance(frame, (bytes, bytearray)) or not frame:
            raise ValueError(f"a frame must be non-empty bytes, not {frame!r}")
        if not math.isfinite(t) or t < 0:
            raise ValueError(f"invalid frame time {t!r}")
        sec = int(t)
        records.append((sec, min(round((t - sec) * 1e6), 999_999), bytes(frame)))
        last = t
    if not records:
        raise ValueError("no frames to write")
    path, f = _create_new(Path(directory), pcap_name(ip, last if unix_time is None else unix_time))
    with f:
        try:
            writer = PcapWriter(f, linktype=DLT_EN10MB)
            writer.write_header(None)
            for sec, usec, frame in records:
                writer.write_packet(frame, sec=sec, usec=usec)
            f.flush()
        except BaseException:
            path.unlink(missing_ok=True)
            raise
    return path


def _create_new(folder: Path, name: str) -> tuple[Path, BinaryIO]:
    """Create ``folder/name``, or ``name`` with ``-2``, ``-3`` ... if taken; never overwrite."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = name.removesuffix(".pcap")
    for n in range(1, _MAX_SAME_NAME + 1):
        path = folder / (name if n == 1 else f"{stem}-{n}.pcap")
        try:
            return path, open(path, "xb")  # the caller closes it
        except FileExistsError:
            continue
    raise FileExistsError(17, f"{_MAX_SAME_NAME} evidence files named {stem}* already")


class FrameRing:
    """The newest ``per_address`` frames that claimed each of the ``addresses`` most recently
    claimed addresses, with the time each was seen (any clock; the caller converts)."""

    def __init__(self, addresses: int = 4096, per_address: int = 8) -> None:
        for name, value in (("addresses", addresses), ("per_address", per_address)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, not {value!r}")
        self.addresses = addresses
        self.per_address = per_address
        self._rings: OrderedDict[str, deque[tuple[float, bytes]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._rings)

    def add(self, ip: str, at: float, frame: bytes) -> None:
        ring = self._rings.get(ip)
        if ring is None:
            if len(self._rings) >= self.addresses:
                self._rings.popitem(last=False)
            ring = self._rings[ip] = deque(maxlen=self.per_address)
        else:
            self._rings.move_to_end(ip)
        ring.append((at, frame))

    def frames(self, ip: str) -> list[tuple[float, bytes]]:
        """The frames kept for ``ip``, oldest first (empty if none)."""
        return list(self._rings.get(ip, ()))
