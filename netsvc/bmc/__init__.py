"""IPMI 2.0 BMCs: the lab's (and tests') out-of-band power control, and netsvc's client for it.

A BMC (baseboard management controller) answers for its host's power even when the host is
down. This package has both sides of IPMI 2.0 over RMCP+ (UDP 623, cipher suite 3):

- :mod:`netsvc.bmc.power`: pure logic: what each chassis command does to the power, which
  commands are refused and with which completion code, with time passed in;
- :mod:`netsvc.bmc.server`: the BMC, on pyghmi's ``Bmc``, acting on a power backend (a power
  file, a process, or the lab's callables); ``ipmitool -I lanplus`` drives it;
- :mod:`netsvc.bmc.client`: netsvc's side, on pyghmi's ``Command``: power status, off, on,
  soft off, and confirming off, each returning an ``Outcome`` instead of raising;
- :mod:`netsvc.bmc.cli`: ``netsvc bmc serve`` and ``netsvc bmc power``.

Invariants:

- A host is "confirmed off" only by an authenticated "power is off" answer from its BMC: a
  timeout, a wrong password, a refusal or a malformed answer never counts as off.
- A BMC reports "off" only when its backend positively says so; doubt is "on".
- A refused chassis command changes nothing; an accepted power down cancels anything pending
  that would turn the host back on.
- Passwords are never logged, printed, or shown in a repr or an error.
- Traffic goes only where the caller points it; tests use loopback only.
"""
