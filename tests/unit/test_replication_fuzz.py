"""Every decoder of netsvc.replication and of the BMC's configuration store, fuzzed: garbage
gets the module's own error (or a completion code), never anything else, and changes nothing
it should not."""

from __future__ import annotations

import contextlib
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from netsvc.bmc.config_store import (
    CMD_CLEAR,
    CMD_INFO,
    BlobError,
    ConfigStore,
    decode_blob,
    encode_blob,
)
from netsvc.replication.vmconfig import ConfigError, parse
from netsvc.replication.wire import WireError, decode_command, decode_status

GOOD = encode_blob({"kind": "netsvc-replication", "site_b_host": "b1", "vms": []})


@given(st.binary(max_size=5000))
def test_control_and_status_decoders_raise_only_wire_errors(data: bytes) -> None:
    for decode in (decode_command, decode_status):
        with contextlib.suppress(WireError):
            decode(data)


@given(st.binary(max_size=3000))
def test_blob_decoder_raises_only_blob_errors(data: bytes) -> None:
    with contextlib.suppress(BlobError):
        decode_blob(data)


@settings(max_examples=300)
@given(st.lists(st.tuples(st.integers(0x60, 0x80), st.binary(max_size=200)), max_size=30))
def test_the_store_answers_any_command_sequence_and_keeps_its_blob(
        cmds: list[tuple[int, bytes]]) -> None:
    store = ConfigStore(None, clock=lambda: 0.0)
    store.blob, store.generation = GOOD, 1
    for command, data in cmds:
        if command == CMD_CLEAR:
            continue
        code, out = store.handle(command, data)
        assert isinstance(code, int) and 0 <= code <= 0xFF and isinstance(out, bytes)
        assert len(out) <= 255
    # whatever came, the committed blob is still valid (a garbage upload never commits)
    decode_blob(store.blob)
    assert store.handle(CMD_INFO, b"")[0] == 0


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                 max_size=4), max_leaves=20)


@given(st.dictionaries(st.sampled_from(["kind", "site_b_host", "vms", "x"]), json_values,
                       max_size=4))
def test_vm_configuration_parser_raises_only_config_errors(data: dict[str, Any]) -> None:
    data = json.loads(json.dumps(data))
    with contextlib.suppress(ConfigError):
        parse(data, "b1")


@given(st.lists(st.dictionaries(st.sampled_from(["name", "cpus", "memory_mib", "epoch", "nics",
                                                 "disks", "primary_host"]), json_values,
                                max_size=7), max_size=5))
def test_vm_entries_parse_or_are_refused(vms: list[dict[str, Any]]) -> None:
    try:
        out = parse({"kind": "netsvc-replication", "site_b_host": "b1", "vms": vms}, "b1")
    except ConfigError as exc:
        assert str(exc).startswith("vms[")  # names the entry at fault
        return
    assert len({v.name for v in out}) == len(out) == len(vms)
    assert all(1 <= v.cpus <= 512 and v.memory_mib >= 16 for v in out)
