"""DCMI power readings for a netsvc BMC, with the host's always-on storage module as a power
domain of its own.

``ipmitool -I lanplus ... dcmi power reading`` sends DCMI Get Power Reading (NetFn 0x2C,
command 0x02, group extension 0xDC, mode 0x01 "system power statistics"); the answer is the
whole node: the host's main components (``watts_on`` while its power is on, ``watts_off`` in
standby) plus the storage module (``watts_storage``, always on: it keeps serving the host's
second storage resource while the host is off). The storage module is a separate power
domain, read on its own with netsvc's OEM request ``ipmitool raw 0x30 0x50 DOMAIN`` (NetFn
0x30 OEM, command 0x50; domain 0 = the host's main components, 1 = the storage module): it
answers the domain's power state (1 = on) and its watts (u16, little-endian).

The watts per state are configuration (the lab has no power meter): ``DcmiConfig``;
``netsvc bmc serve --dcmi-watts on=180,off=8,storage=15`` sets them.

Invariants:

- Pure but for the clock it is given: a reading is computed from the backend's power state at
  the time it is asked; min/max/average are over the readings taken since the BMC started
  (the average weighted by the time each reading stood).
- A request with a group extension other than 0xDC, a short request or an unknown mode or
  domain is refused with a completion code (0xCC / 0xC7) and changes nothing.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from netsvc.bmc.power import Code, PowerState

if TYPE_CHECKING:
    from netsvc.bmc.server import BmcServer

DCMI_NETFN = 0x2C
DCMI_GROUP = 0xDC
GET_POWER_READING = (DCMI_NETFN, 0x02)
OEM_NETFN = 0x30
GET_DOMAIN_POWER = (OEM_NETFN, 0x50)
DOMAINS = ("host", "storage-module")


@dataclass(frozen=True)
class DcmiConfig:
    watts_on: int = 180
    watts_off: int = 8
    watts_storage: int = 15

    def __post_init__(self) -> None:
        for name in ("watts_on", "watts_off", "watts_storage"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 65535:
                raise ValueError(f"{name} {v!r} must be whole watts in [0, 65535]")

    @classmethod
    def parse(cls, text: str) -> DcmiConfig:
        """``on=180,off=8,storage=15`` (any subset; the rest keep their defaults)."""
        keys = {"on": "watts_on", "off": "watts_off", "storage": "watts_storage"}
        out: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            k, sep, v = part.partition("=")
            if not sep or k.strip() not in keys or not v.strip().isdigit():
                raise ValueError(f"bad watts {part!r}: expected on=W, off=W or storage=W")
            out[keys[k.strip()]] = int(v)
        return cls(**out)

    def host_watts(self, state: PowerState) -> int:
        return self.watts_on if state is PowerState.ON else self.watts_off


class DcmiPower:
    """The handlers of one BMC (see the module docstring); ``status`` reads the host's power."""

    def __init__(self, config: DcmiConfig, status: Callable[[], PowerState], *,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.config = config
        self.status = status
        self.clock = clock
        self.wall = wall
        self._start = clock()
        self._first = 0.0  # when the first reading was taken
        self._last: tuple[float, int] | None = None  # (when, watts) of the last reading
        self._energy = 0.0  # watt-seconds between the first and the last reading
        self._min = 65535
        self._max = 0

    def _sample(self) -> int:
        now = self.clock()
        watts = self.config.host_watts(self.status()) + self.config.watts_storage
        if self._last is not None:
            self._energy += self._last[1] * max(0.0, now - self._last[0])
        else:
            self._first = now
        self._last = (now, watts)
        self._min = min(self._min, watts)
        self._max = max(self._max, watts)
        return watts

    def power_reading(self, data: bytes) -> tuple[int, bytes]:
        """DCMI Get Power Reading (DCMI 1.5 section 6.6.1)."""
        if len(data) < 4:
            return Code.REQUEST_LENGTH_INVALID, b""
        if data[0] != DCMI_GROUP or data[1] not in (0x01, 0x02):
            return Code.INVALID_DATA_FIELD, b""
        watts = self._sample()
        span = self._last[0] - self._first if self._last is not None else 0.0
        avg = round(self._energy / span) if span > 0 else watts
        period_ms = min(0xFFFFFFFF, int((self.clock() - self._start) * 1000))
        return Code.OK, struct.pack("<BHHHHIIB", DCMI_GROUP, watts, self._min, self._max,
                                    avg, int(self.wall()) & 0xFFFFFFFF, period_ms, 0x40)

    def domain_power(self, data: bytes) -> tuple[int, bytes]:
        """netsvc OEM: one domain's (power on?, watts)."""
        if len(data) < 1:
            return Code.REQUEST_LENGTH_INVALID, b""
        if data[0] == 0:
            state = self.status()
            return Code.OK, struct.pack("<BH", state is PowerState.ON,
                                        self.config.host_watts(state))
        if data[0] == 1:
            return Code.OK, struct.pack("<BH", 1, self.config.watts_storage)
        return Code.INVALID_DATA_FIELD, b""

    def handlers(self) -> Mapping[tuple[int, int], Callable[[bytes], tuple[int, bytes]]]:
        return {GET_POWER_READING: self.power_reading, GET_DOMAIN_POWER: self.domain_power}


def install(server: BmcServer, config: DcmiConfig) -> DcmiPower:
    """Add the DCMI and domain handlers to a ``BmcServer``'s extension table."""
    dcmi = DcmiPower(config, server.backend.status)
    server.extensions.update(dcmi.handlers())
    return dcmi


def parse_reading(text: str) -> int:
    """The watts of ``ipmitool dcmi power reading``'s output ("Instantaneous power reading:
    195 Watts"); ValueError if it has none."""
    for line in text.splitlines():
        if "Instantaneous power reading" in line:
            num = line.split(":", 1)[1].split()[0]
            if num.isdigit():
                return int(num)
    raise ValueError(f"no instantaneous power reading in {text[:200]!r}")


def parse_domain(text: str) -> tuple[bool, int]:
    """``ipmitool raw 0x30 0x50 N``'s output (hex bytes) -> (on, watts)."""
    b = bytes(int(x, 16) for x in text.split())
    if len(b) != 3:
        raise ValueError(f"a domain reading is 3 bytes, got {text.strip()!r}")
    on, watts = struct.unpack("<BH", b)
    return bool(on), int(watts)
