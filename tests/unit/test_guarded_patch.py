"""The operator's Member status writes are conditional on what the verdict rests on, not on
the Member's resourceVersion: root on a host rewriting `status.agent` without pause moves
the resourceVersion at will, and must not keep a verdict (a revocation, a shortened
expiry) off the server."""

from __future__ import annotations

import json

from kubernetes.client.exceptions import ApiException

from gtvp.kube import guarded_json_patch, is_failed_test

TESTED = (("phase",), ("trust", "usesLeft"), ("trust", "message"), ("trust", "reason"))


def test_the_judged_values_are_tested_and_the_fields_replaced() -> None:
    old = {"phase": "Trusted", "trust": {"usesLeft": 5, "reason": "Quoted"}, "belowSince": {}}
    new = {"phase": "Trusted", "trust": {"usesLeft": 0}, "conditions": [{"type": "Ready"}]}
    ops = guarded_json_patch(old, new, "/status", TESTED)
    assert ops == [
        {"op": "test", "path": "/status/phase", "value": "Trusted"},
        {"op": "test", "path": "/status/trust/usesLeft", "value": 5},
        {"op": "test", "path": "/status/trust/reason", "value": "Quoted"},
        {"op": "remove", "path": "/status/belowSince"},
        {"op": "add", "path": "/status/conditions", "value": [{"type": "Ready"}]},
        {"op": "replace", "path": "/status/trust", "value": {"usesLeft": 0}},
    ]
    assert not any(op["path"].startswith("/status/agent") for op in ops)


def test_free_text_is_never_tested() -> None:
    """kube-apiserver compares a test's strings byte for byte as JSON: Go writes `>` as
    \\u003e and `…` as itself, this client the other way round, so a message such as
    "TPM resetCount 2 -> 3" would fail every write for ever."""
    for text in ("resetCount 2 -> 3", "AK 000b…", "a & b", 'say "x"', "line\nbreak"):
        old = {"phase": "Untrusted", "trust": {"message": text, "usesLeft": 0}}
        ops = guarded_json_patch(old, {**old, "phase": "Trusted"}, "/status", TESTED)
        assert {"op": "test", "path": "/status/trust/message", "value": text} not in ops
        assert {"op": "test", "path": "/status/phase", "value": "Untrusted"} in ops


def test_only_a_bare_422_is_a_failed_test() -> None:
    """A failed test: the generic 422 with no details; a schema refusal names the object
    and its causes, and is a write that failed, not a Member that changed."""

    def refused(details: dict[str, object]) -> ApiException:
        exc = ApiException(status=422, reason="Unprocessable Entity")
        exc.body = json.dumps({"kind": "Status", "reason": "Invalid", "details": details})
        return exc

    assert is_failed_test(refused({}))
    assert not is_failed_test(refused({"name": "m0", "kind": "Member", "causes": [{}]}))
    assert not is_failed_test(ApiException(status=409))
