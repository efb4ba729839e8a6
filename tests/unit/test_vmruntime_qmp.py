"""QMP framing and reply classification, without qemu."""

from __future__ import annotations

import json

import pytest

from gtvp_local.vmruntime import qmp


def test_encode_is_one_json_line() -> None:
    wire = qmp.encode("migrate", {"uri": "tcp:10.77.0.3:49200"}, 7)
    assert wire.endswith(b"\r\n")
    assert wire.count(b"\n") == 1
    assert json.loads(wire) == {
        "execute": "migrate",
        "arguments": {"uri": "tcp:10.77.0.3:49200"},
        "id": 7,
    }
    assert "arguments" not in json.loads(qmp.encode("query-status"))


def test_decoder_handles_split_and_joined_messages() -> None:
    dec = qmp.Decoder()
    greeting = b'{"QMP": {"version": {"qemu": {"major": 7}}, "capabilities": []}}\r\n'
    assert dec.feed(greeting[:10]) == []
    got = dec.feed(greeting[10:] + b'{"return": {}, "id": 1}\r\n{"event": "STOP", "data"')
    assert [qmp.kind(m) for m in got] == ["greeting", "return"]
    got = dec.feed(b': {}, "timestamp": {"seconds": 1, "microseconds": 2}}\r\n\r\n')
    assert [qmp.kind(m) for m in got] == ["event"]
    assert got[0]["event"] == "STOP"


def test_decoder_refuses_non_objects() -> None:
    with pytest.raises(ValueError, match="not an object"):
        qmp.Decoder().feed(b"[1, 2]\n")


def test_result_returns_value_or_raises_qemu_reason() -> None:
    assert qmp.result("query-migrate", {"return": {"status": "active"}, "id": 2}) == {
        "status": "active"
    }
    err = {"error": {"class": "GenericError", "desc": "Failed to bind socket"}, "id": 3}
    assert qmp.kind(err) == "error"
    with pytest.raises(qmp.QmpError, match="Failed to bind") as info:
        qmp.result("migrate-incoming", err)
    assert info.value.error_class == "GenericError"
    assert qmp.kind({"something": 1}) == "unknown"
