"""The services' VM life-cycle hooks around the kernel's executors: ``attaching`` before a VM
comes to this host (raising fails the action, nothing attached), ``detached`` after it left
(a failure is logged only)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from netsvc.cluster.executor import VM_EXECUTORS
from netsvc.cluster.service import AgentContext, VmHooks


class FakeDriver:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def start(self, vm: str) -> Mapping[str, Any]:
        self.calls.append(("start", vm))
        return {}

    def restart(self, vm: str, src: str | None) -> Mapping[str, Any]:
        self.calls.append(("restart", vm))
        return {}

    def migrate_prepare(self, vm: str, src: str) -> Mapping[str, Any]:
        self.calls.append(("prepare", vm))
        return {"port": 1}

    def migrate_handover(self, vm: str, to: str, token: Mapping[str, Any]) -> Mapping[str, Any]:
        self.calls.append(("handover", vm))
        return {"switch_ms": 1.0}

    def power_off(self, vm: str) -> Mapping[str, Any]:
        self.calls.append(("power-off", vm))
        return {}

    def migrate_abort(self, vm: str, token: Mapping[str, Any]) -> Mapping[str, Any]:
        self.calls.append(("abort", vm))
        assert token == {"port": 1}
        return {"deleted": True}


def _ctx(driver: FakeDriver, hooks: list[VmHooks], logs: list[str]) -> AgentContext:
    return AgentContext(host="h1", url="http://x", key=b"k", make_client=lambda **_: None,  # type: ignore[arg-type, return-value]
                        driver=driver, log=logs.append, vm_hooks=hooks)  # type: ignore[arg-type]


def test_attaching_runs_before_the_driver_and_detached_after() -> None:
    order: list[str] = []
    d = FakeDriver()
    hooks = VmHooks(attaching=lambda vm, a, c: order.append(f"attaching {vm} {a['kind']}"),
                    detached=lambda vm, a, c: order.append(f"detached {vm} {a['kind']}"))
    ctx = _ctx(d, [hooks], [])
    VM_EXECUTORS["start"]({"kind": "start", "vm": "vm1", "phase": "run"}, ctx)
    VM_EXECUTORS["migrate"]({"kind": "migrate", "vm": "vm2", "phase": "prepare", "from": "h2"},
                            ctx)
    VM_EXECUTORS["migrate"]({"kind": "migrate", "vm": "vm3", "phase": "handover", "to": "h2",
                             "results": {"prepare": {"port": 1}}}, ctx)
    VM_EXECUTORS["power-off"]({"kind": "power-off", "vm": "vm4", "phase": "run"}, ctx)
    assert order == ["attaching vm1 start", "attaching vm2 migrate", "detached vm3 migrate",
                     "detached vm4 power-off"]
    assert d.calls == [("start", "vm1"), ("prepare", "vm2"), ("handover", "vm3"),
                       ("power-off", "vm4")]


def test_a_refusing_attaching_hook_fails_the_action_and_attaches_nothing() -> None:
    def refuse(vm: str, a: Mapping[str, Any], c: AgentContext) -> None:
        raise RuntimeError("vs1 has no carrier")

    d = FakeDriver()
    ctx = _ctx(d, [VmHooks(attaching=refuse)], [])
    for kind, phase in (("start", "run"), ("restart", "run"), ("migrate", "prepare")):
        with pytest.raises(RuntimeError, match="no carrier"):
            VM_EXECUTORS[kind]({"kind": kind, "vm": "vm1", "phase": phase, "from": "h2"}, ctx)
    assert d.calls == []


def test_a_failing_detached_hook_is_logged_and_the_action_still_succeeds() -> None:
    def boom(vm: str, a: Mapping[str, Any], c: AgentContext) -> None:
        raise OSError("tc went away")

    logs: list[str] = []
    d = FakeDriver()
    out = VM_EXECUTORS["power-off"]({"kind": "power-off", "vm": "vm1", "phase": "run"},
                                    _ctx(d, [VmHooks(detached=boom)], logs))
    assert out == {} and d.calls == [("power-off", "vm1")]
    assert any("tc went away" in line for line in logs)


def test_attached_runs_once_the_driver_made_the_vms_place() -> None:
    order: list[str] = []
    d = FakeDriver()

    def seen(vm: str, a: Mapping[str, Any], c: AgentContext) -> None:
        order.append(f"attached {vm} after {d.calls[-1][0]}")

    ctx = _ctx(d, [VmHooks(attached=seen)], [])
    VM_EXECUTORS["start"]({"kind": "start", "vm": "vm1", "phase": "run"}, ctx)
    VM_EXECUTORS["restart"]({"kind": "restart", "vm": "vm2", "phase": "run", "from": "h2"}, ctx)
    VM_EXECUTORS["migrate"]({"kind": "migrate", "vm": "vm3", "phase": "prepare", "from": "h2"},
                            ctx)
    assert order == ["attached vm1 after start", "attached vm2 after restart",
                     "attached vm3 after prepare"]


def test_a_refusing_attached_hook_undoes_the_prepare() -> None:
    def refuse(vm: str, a: Mapping[str, Any], c: AgentContext) -> None:
        raise RuntimeError("cannot shape vm1-vif")

    d = FakeDriver()
    ctx = _ctx(d, [VmHooks(attached=refuse)], [])
    with pytest.raises(RuntimeError, match="cannot shape"):
        VM_EXECUTORS["migrate"]({"kind": "migrate", "vm": "vm1", "phase": "prepare",
                                 "from": "h2"}, ctx)
    assert d.calls == [("prepare", "vm1"), ("abort", "vm1")]
