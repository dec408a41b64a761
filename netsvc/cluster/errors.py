"""Errors shared by the cluster modules.

Invariants:

- Every error raised on purpose by ``netsvc.cluster`` derives from ``ClusterError``.
- *Local* errors (``ModelError`` and its subclasses) mean that a caller misused the model: a bad
  name, an illegal state transition, a reference to an entity that does not exist. The API maps
  them to 4xx answers because there the caller is the remote client.
- *Remote* errors (``ValidationError``) name the field of the request that was wrong.
- ``Refused`` carries the name of the safety rule that refused a decision.
"""

from __future__ import annotations


class ClusterError(Exception):
    """Base class of every error raised on purpose by netsvc.cluster."""


class ModelError(ClusterError, ValueError):
    """The cluster model was asked to do something that would break one of its invariants."""


class InvalidName(ModelError):
    """A host, VM or network name does not match the name rule."""


class InvalidValue(ModelError):
    """A field of a model object has a bad value (an address, a MAC, a CIDR, a timestamp)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class IllegalTransition(ModelError):
    """A state change that the transition table does not allow."""

    def __init__(self, kind: str, name: str, old: str, new: str) -> None:
        super().__init__(f"{kind} {name!r}: illegal transition {old} -> {new}")
        self.kind = kind
        self.name = name
        self.old = old
        self.new = new


class UnknownEntity(ModelError, LookupError):
    """A host, VM, network or action that does not exist."""

    def __init__(self, kind: str, name: str) -> None:
        super().__init__(f"unknown {kind} {name!r}")
        self.kind = kind
        self.name = name


class InvariantViolation(ModelError):
    """A change that would break a model invariant (duplicate MAC, running VM with no host...)."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(message)
        self.rule = rule


class ValidationError(ClusterError, ValueError):
    """A request (or config) field is missing or has a bad value. ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


class Refused(ClusterError):
    """A decision refused by a safety rule. ``rule`` names the first rule that failed."""

    def __init__(self, rule: str, message: str, violations: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.rule = rule
        self.message = message
        self.violations = violations or (rule,)


class Fenced(ClusterError):
    """The state store changed under this manager (another writer); it takes no more decisions."""
