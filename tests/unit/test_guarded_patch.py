"""The operator's Member status writes are conditional on the operator's own fields, not on
the Member's resourceVersion: root on a host rewriting `status.agent` without pause moves
the resourceVersion at will, and must not keep a verdict (a revocation, a shortened
expiry) off the server."""

from __future__ import annotations

from gtvp.kube import guarded_json_patch


def test_each_field_written_is_tested_first_and_the_agents_are_untouched() -> None:
    old = {"phase": "Trusted", "trust": {"usesLeft": 5}, "belowSince": {"2": "t"}}
    new = {"phase": "Trusted", "trust": {"usesLeft": 0}, "conditions": [{"type": "Ready"}]}
    ops = guarded_json_patch(old, new, "/status")
    assert ops == [
        {"op": "test", "path": "/status/belowSince", "value": {"2": "t"}},
        {"op": "remove", "path": "/status/belowSince"},
        {"op": "add", "path": "/status/conditions", "value": [{"type": "Ready"}]},
        {"op": "test", "path": "/status/phase", "value": "Trusted"},
        {"op": "test", "path": "/status/trust", "value": {"usesLeft": 5}},
        {"op": "replace", "path": "/status/trust", "value": {"usesLeft": 0}},
    ]
    assert not any(op["path"].startswith("/status/agent") for op in ops)


def test_a_key_is_escaped_as_a_json_pointer() -> None:
    ops = guarded_json_patch({}, {"a/b~c": 1}, "/status")
    assert ops == [{"op": "add", "path": "/status/a~1b~0c", "value": 1}]
