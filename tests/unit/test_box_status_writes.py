"""The box loop's status writes and `status.attestation`: a status planned on an older view
never undoes what box attestation wrote meanwhile (a quote judged a mismatch, the move it
owes, an answered nonce); a credential armed anew replaces it; a box whose name another
object holds loses it. Found by a review."""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any, cast

from gtvp import kube
from gtvp.core import boxattest as ba
from gtvp.handlers import box_writes
from gtvp.runtime import OperatorSettings, Runtime

KEY = ("shop", "db")
NONCE = {"value": "ab" * 32, "issuedAt": "2026-12-02T04:00:00Z", "member": "m1", "vmiUID": "u1"}
PLANNED_ON = {"state": ba.PENDING, "credentialHash": "h", "bound": True, "nonce": NONCE}
JUDGED = {
    **{k: v for k, v in PLANNED_ON.items() if k != "nonce"},
    "state": ba.MISMATCH,
    "reason": ba.COMPONENT_MISMATCH,
    "member": "m1",
    "vmiUID": "u1",
    "answered": [NONCE["value"]],
    "actedOn": "u1",
    "actedOnMember": "m1",
    "actedAt": "2026-12-02T04:00:05Z",
}


class _Boxes:
    """The custom objects API, as far as a box status write goes: records each patch and
    answers the box with it merged (top-level status keys; None removes)."""

    def __init__(self) -> None:
        self.patches: list[dict[str, Any]] = []
        self.status: dict[str, Any] = {
            "phase": "Running",
            "message": "running",
            "attestation": JUDGED,  # the watch delivered the endpoint's judgement meanwhile
        }

    def patch_namespaced_custom_object_status(self, *args: Any, **_kw: Any) -> Any:
        self.patches.append(copy.deepcopy(args[-1]))
        merged = {**self.status, **args[-1]["status"]}
        self.status = {k: v for k, v in merged.items() if v is not None}
        return {"metadata": {"name": KEY[1], "namespace": KEY[0]}, "status": self.status}


def _runtime() -> tuple[Runtime, _Boxes]:
    boxes = _Boxes()
    clients = cast(kube.Clients, SimpleNamespace(custom=boxes, field_manager="gtvp"))
    rt = Runtime(settings=OperatorSettings(), clients=clients)
    rt.view.boxes[KEY] = {
        "metadata": {"name": KEY[1], "namespace": KEY[0], "resourceVersion": "2"},
        "status": copy.deepcopy(boxes.status),
    }
    return rt, boxes


def test_a_status_planned_on_an_older_view_keeps_the_judgement_made_meanwhile() -> None:
    rt, boxes = _runtime()
    box_writes.write_status(
        rt, KEY, {"phase": "Running", "message": "moved", "attestation": PLANNED_ON}
    )
    assert [p["status"] for p in boxes.patches] == [{"message": "moved"}]
    assert rt.view.boxes[KEY]["status"]["attestation"]["actedOn"] == "u1"  # the move it owes


def test_a_credential_armed_anew_replaces_the_attestation_and_a_taken_name_drops_it() -> None:
    rt, boxes = _runtime()
    fresh = ba.fresh_attestation("a-new-credential")
    box_writes.write_status(rt, KEY, {"phase": "Running", "message": "running"}, attestation=fresh)
    written = boxes.patches[-1]["status"]["attestation"]
    assert written["credentialHash"] == ba.credential_hash("a-new-credential")
    assert written["actedOn"] is None  # the old credential's judgement went with it
    box_writes.write_status(rt, KEY, {"phase": "Failed", "message": "taken"}, attestation=None)
    assert boxes.patches[-1]["status"]["attestation"] is None
