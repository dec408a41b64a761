"""How the manager's durable state sits in the store: one key per host, VM, network and action.

Layout (format 2), every key under ``netsvc/cluster/``:

- ``meta``: ``{"format": 2, "next_action": N}``;
- ``host/<name>``: the host's durable fields only (name, mgmt_addr, vm_addr, and its
  maintenance reason while it is in maintenance). Its state,
  ``last_seen``, agent info and interface states are volatile: they never reach the store, so a
  heartbeat that changes only them writes nothing;
- ``vm/<name>``: ``VM.to_dict()``; ``network/<name>``: ``Network.to_dict()``;
- ``action/<id>``: ``Action.to_record()`` of an *open* action; the key is deleted when the
  action finishes;
- ``service/<service>/<name>``: a service's durable document (``ClusterModel.service_docs``).

Format 1 (netsvc before this layout) kept the whole model in ``MODEL_KEY`` and
``{"next", "open"}`` in ``ACTIONS_KEY``. ``load`` reads it when there is no ``meta`` key, and
the first ``save`` writes it out as format 2 and deletes the two old keys, in the same commit.

Invariants:

- ``save`` costs O(what changed): it serialises only the dirty hosts, VMs, networks and
  actions it is handed, compares each document with the one last written or read (a dict
  lookup), and writes only those that differ, all in one ``store.commit``;
- every write compares the key's revision with the one this persister last wrote or read
  (0: absent), so another writer on the same keys is a ``Conflict`` and nothing of the batch
  is written (per transaction part on etcd, see ``etcd_store``);
- restored hosts are UNKNOWN with no ``last_seen``: monotonic times of another process mean
  nothing here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from netsvc.cluster.actions import Action
from netsvc.cluster.errors import InvalidValue
from netsvc.cluster.model import MODEL_FORMAT, ClusterModel, Host
from netsvc.cluster.store import StateStore, Write, commit

ROOT = "netsvc/cluster/"
META_KEY = ROOT + "meta"
HOST_PREFIX = ROOT + "host/"
VM_PREFIX = ROOT + "vm/"
NETWORK_PREFIX = ROOT + "network/"
ACTION_PREFIX = ROOT + "action/"
SERVICE_PREFIX = ROOT + "service/"
#: Format 1: the whole model and the open actions, one document each.
MODEL_KEY = ROOT + "model"
ACTIONS_KEY = ROOT + "actions"
FORMAT = 2


def _doc(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def host_doc(host: Host) -> bytes:
    """A host's stored fields (``model.HOST_DURABLE``; maintenance only when set)."""
    doc: dict[str, Any] = {"name": host.name, "mgmt_addr": host.mgmt_addr,
                           "vm_addr": host.vm_addr}
    if host.maintenance is not None:  # the operator's mark is durable (absent: none)
        doc["maintenance"] = host.maintenance
    return _doc(doc)


@dataclass
class Loaded:
    model: ClusterModel
    next_action: int
    actions: list[dict[str, Any]] = field(default_factory=list)
    upgraded_from: int | None = None


class StatePersister:
    """Reads and writes the manager's durable state, key by key. Not thread-safe."""

    def __init__(self, store: StateStore) -> None:
        self._store = store
        self._cache: dict[str, tuple[bytes, int]] = {}  # key -> (document, mod revision)
        self._legacy: dict[str, int] = {}  # format-1 keys still to delete -> revision
        self._next_action = 0
        self._pending_next = 0

    @property
    def keys(self) -> int:
        """How many keys of this layout the persister knows of (written or read)."""
        return len(self._cache)

    def load(self) -> Loaded:
        meta = self._store.get(META_KEY)
        if meta is None:
            legacy = self._load_v1()
            if legacy is not None:
                return legacy
            return Loaded(ClusterModel(), 1)
        doc, rev = meta
        self._cache[META_KEY] = (doc, rev)
        try:
            data = json.loads(doc)
            if data.get("format") != FORMAT:
                raise InvalidValue("format", f"unsupported state format {data.get('format')!r}")
            next_action = int(data["next_action"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidValue("meta", f"stored state meta is unreadable: {exc}") from None
        self._next_action = next_action
        parts: dict[str, list[Any]] = {"hosts": [], "vms": [], "networks": []}
        for prefix, part in ((NETWORK_PREFIX, "networks"), (HOST_PREFIX, "hosts"),
                             (VM_PREFIX, "vms")):
            for kv in self._store.scan(prefix):
                self._cache[kv.key] = (kv.value, kv.revision)
                try:
                    parts[part].append(json.loads(kv.value))
                except ValueError as exc:
                    raise InvalidValue(kv.key, f"stored document is not JSON: {exc}") from None
        model = ClusterModel.from_dict({"format": MODEL_FORMAT, **parts})
        for kv in self._store.scan(SERVICE_PREFIX):
            self._cache[kv.key] = (kv.value, kv.revision)
            try:
                model.set_service_doc(kv.key[len(SERVICE_PREFIX):], json.loads(kv.value))
            except ValueError as exc:
                raise InvalidValue(kv.key, f"stored document is not JSON: {exc}") from None
        model.take_dirty()
        actions = []
        for kv in self._store.scan(ACTION_PREFIX):
            self._cache[kv.key] = (kv.value, kv.revision)
            try:
                actions.append(json.loads(kv.value))
            except ValueError as exc:
                raise InvalidValue(kv.key, f"stored action is not JSON: {exc}") from None
        return Loaded(model, next_action, actions)

    def _load_v1(self) -> Loaded | None:
        got_model = self._store.get(MODEL_KEY)
        got_actions = self._store.get(ACTIONS_KEY)
        if got_model is None and got_actions is None:
            return None
        model = ClusterModel()
        if got_model is not None:
            model = ClusterModel.from_json(got_model[0])
            self._legacy[MODEL_KEY] = got_model[1]
        next_action, actions = 1, []
        if got_actions is not None:
            self._legacy[ACTIONS_KEY] = got_actions[1]
            try:
                data = json.loads(got_actions[0])
                next_action = int(data["next"])
                actions = list(data["open"])
            except (ValueError, KeyError, TypeError) as exc:
                raise InvalidValue("actions", f"stored actions are unreadable: {exc}") from None
        # Everything of a format-1 store is new in format 2: the next save writes it all.
        model.mark_all_dirty()
        return Loaded(model, next_action, actions, upgraded_from=1)

    def save(
        self,
        model: ClusterModel,
        dirty: Iterable[tuple[str, str]],
        actions: Mapping[str, Action],
        dirty_actions: Iterable[str],
        next_action: int,
    ) -> int:
        """Write what changed; return how many keys were written or deleted."""
        writes = self.writes(model, dirty, actions, dirty_actions, next_action)
        if not writes:
            return 0
        self.applied(writes, commit(self._store, writes))
        return len(writes)

    def writes(
        self,
        model: ClusterModel,
        dirty: Iterable[tuple[str, str]],
        actions: Mapping[str, Action],
        dirty_actions: Iterable[str],
        next_action: int,
    ) -> list[Write]:
        """The writes that bring the store to what changed (for a caller that commits them
        with more, e.g. a journal entry: then it must call ``applied``)."""
        writes: list[Write] = []
        self._pending_next = next_action

        def put(key: str, doc: bytes | None) -> None:
            cached = self._cache.get(key)
            if doc is None:
                if cached is not None:
                    writes.append(Write(key, None, cached[1]))
                return
            if cached is None or cached[0] != doc:
                writes.append(Write(key, doc, 0 if cached is None else cached[1]))

        for kind, name in sorted(dirty):
            if kind == "host":
                h = model.hosts.get(name)
                put(HOST_PREFIX + name, None if h is None else host_doc(h))
            elif kind == "vm":
                vm = model.vms.get(name)
                put(VM_PREFIX + name, None if vm is None else _doc(vm.to_dict()))
            elif kind == "network":
                net = model.networks.get(name)
                put(NETWORK_PREFIX + name, None if net is None else _doc(net.to_dict()))
            elif kind == "service":
                doc = model.service_docs.get(name)
                put(SERVICE_PREFIX + name, None if doc is None else _doc(doc))
        for action_id in sorted(dirty_actions):
            action = actions.get(action_id)
            open_ = action is not None and action.is_open
            put(ACTION_PREFIX + action_id,
                _doc(action.to_record()) if open_ and action is not None else None)
        if next_action != self._next_action or META_KEY not in self._cache:
            put(META_KEY, _doc({"format": FORMAT, "next_action": next_action}))
        for key, rev in sorted(self._legacy.items()):
            writes.append(Write(key, None, rev))
        return writes

    def applied(self, writes: list[Write], revs: list[int]) -> None:
        """``writes`` (from ``writes``) were committed at ``revs``: remember them."""
        if not writes:
            return
        self._legacy.clear()
        self._next_action = self._pending_next
        for w, rev in zip(writes, revs, strict=True):
            if w.value is None:
                self._cache.pop(w.key, None)
            else:
                self._cache[w.key] = (w.value, rev)


__all__ = ["ACTIONS_KEY", "MODEL_KEY", "Loaded", "StatePersister"]
