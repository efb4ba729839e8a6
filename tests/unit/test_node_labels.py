"""What a member's verdict puts on its Node: labels steer new placements, the taint marks
an untrusted host; a spent verdict stops new placements without tainting."""

from __future__ import annotations

import datetime as dt
from typing import Any

from gtvp.core.timestamps import format_ts
from gtvp.core.trust import (
    LEVEL_LABEL,
    TAINT_KEY,
    TRUSTED_LABEL,
    label_level,
    member_view,
    node_boot_id,
    node_patch,
    rule_labels,
)

HOUR = dt.timedelta(hours=1)
NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
LATER = format_ts(NOW + HOUR)


def _trusted(level: int, uses: int) -> dict[str, object]:
    return {"phase": "Trusted", "level": level, "trust": {"usesLeft": uses, "expiresAt": LATER}}


def test_a_trusted_member_with_uses_left_advertises_its_level() -> None:
    status = _trusted(3, 5)
    patch = node_patch({}, [], "Trusted", label_level(status, now=NOW))
    assert patch is not None
    labels = patch["metadata"]["labels"]
    assert labels[TRUSTED_LABEL] == "true"
    assert labels[f"{LEVEL_LABEL}3"] == "true"
    assert "spec" not in patch  # no taint


def test_a_spent_verdict_takes_the_labels_off_but_taints_nothing() -> None:
    """maxUses decisions made: nothing new lands until the fresh quote verifies, while the
    VMs already there stay (no NoSchedule taint, no evacuation)."""
    on = {TRUSTED_LABEL: "true", f"{LEVEL_LABEL}1": "true", f"{LEVEL_LABEL}2": "true"}
    status = _trusted(2, 0)
    assert label_level(status, now=NOW) == 0
    patch = node_patch(on, [], "Trusted", label_level(status, now=NOW))
    assert patch is not None
    assert all(v is None for v in patch["metadata"]["labels"].values())
    assert "spec" not in patch
    assert not any(t.get("key") == TAINT_KEY for t in patch.get("spec", {}).get("taints", []))


def test_a_stored_verdict_past_its_expiry_advertises_no_level() -> None:
    """The operator could not replace it yet (its write refused: an object an agent grew
    past what the API server stores, a 5xx): a Node event must not put the labels back on
    the strength of a verdict that has run out."""
    status = _trusted(2, 5)
    assert label_level(status, now=NOW) == 2
    assert label_level(status, now=NOW + 2 * HOUR) == 0
    assert label_level({**status, "trust": {"usesLeft": 5}}, now=NOW) == 0  # no expiry: none


def test_an_untrusted_member_loses_its_labels_and_is_tainted() -> None:
    patch = node_patch({TRUSTED_LABEL: "true"}, [], "Untrusted", 0)
    assert patch is not None
    assert patch["metadata"]["labels"][TRUSTED_LABEL] is None
    assert patch["spec"]["taints"][0]["key"] == TAINT_KEY


def test_transition_rules_see_every_label_but_gtvps_own() -> None:
    """gtvp's own label writes follow each verdict; they are no reason to judge again."""
    node = {
        TRUSTED_LABEL: "true",
        f"{LEVEL_LABEL}2": "true",
        "node-restriction.kubernetes.io/hardware": "tdx",
    }
    assert rule_labels(node) == {"node-restriction.kubernetes.io/hardware": "tdx"}
    assert rule_labels(None) == {}


def test_a_node_made_again_under_a_trusted_members_name_advertises_no_level() -> None:
    """A Member that pins an EK outlives its Node. Root on another host, holding a kubelet
    credential for the name, registers a Node under it (reporting no bootID, or the old
    one, which the Member's status shows): the verdict was judged beside another Node
    object, so the labels stay off until a quote of that host verifies. Found by a
    review: the labels came back at once."""
    seen = node_boot_id({"metadata": {"uid": "uid-1"}, "status": {"nodeInfo": {"bootID": "b1"}}})
    status: dict[str, Any] = {
        "phase": "Trusted",
        "level": 3,
        "trust": {"usesLeft": 5, "nodeBootID": seen, "expiresAt": LATER},
    }
    same = {"metadata": {"uid": "uid-1"}, "status": {"nodeInfo": {"bootID": "b1"}}}
    assert label_level(status, node_boot_id(same), now=NOW) == 3
    for impostor in (
        {"metadata": {"uid": "uid-2"}, "status": {"nodeInfo": {"bootID": "b1"}}},
        {"metadata": {"uid": "uid-2"}, "status": {}},
    ):
        assert label_level(status, node_boot_id(impostor), now=NOW) == 0
    legacy = {**status, "trust": {**status["trust"], "nodeBootID": "b1"}}  # an older gtvp's
    assert label_level(legacy, node_boot_id(same), now=NOW) == 3
    no_boot = {"metadata": {"uid": "uid-2"}, "status": {}}  # cannot be told the same Node
    assert label_level(legacy, node_boot_id(no_boot), now=NOW) == 0


def test_a_node_reporting_another_boot_than_its_verdict_saw_advertises_no_level() -> None:
    """Between a reboot and the operator's next look at the member (a Node deleted and made
    anew, an operator that starts), the Node's labels never say more than the boot its
    member's verdict saw."""
    status: dict[str, Any] = {
        "phase": "Trusted",
        "level": 3,
        "trust": {"usesLeft": 5, "nodeBootID": "b1", "expiresAt": LATER},
    }
    assert label_level(status, "b1", now=NOW) == 3
    assert label_level(status, None, now=NOW) == 3  # a Node reporting no boot: its level
    assert label_level(status, "b2", now=NOW) == 0
    unseen = {**status, "trust": {"usesLeft": 5, "expiresAt": LATER}}
    assert label_level(unseen, "b2", now=NOW) == 3  # none seen yet
    # nor does admission rest a new decision on it (a VMI start, a migration's arrival, a
    # box's placement), while a decision already taken still stands
    now = dt.datetime.now(dt.UTC)
    trusted = {**status, "trust": {**status["trust"], "expiresAt": format_ts(now + HOUR)}}
    assert member_view("m", trusted, "b1").usable(now, 3)
    assert not member_view("m", trusted, "b2").usable(now, 3)
    assert member_view("m", trusted, "b2").trusted_at(now, 3)
