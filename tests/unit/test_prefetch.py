"""Pre-fetch before migration: boxes move where their components are, and the target
fetches what it lacks before the migration exists.

The pure planners (evacuation, drains, balancing) send a Lazy Box to the eligible member
caching most of its bytes, never to one that may not receive it however much it caches;
`core.prefetch.decide` asks the target for the missing images (only the pinned images of
signed, verified components), waits, and migrates once they are there or, past the bound,
anyway with a reason.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json

import pytest

from gtvp.core.balance import PlacedBox, plan_balance
from gtvp.core.components import parse_component
from gtvp.core.evacuation import (
    HOSTNAME_LABEL,
    RETARGET_MEMORY,
    Attempt,
    DrainTarget,
    Evacuee,
    Migration,
    Vmi,
    least_failed,
    plan_drains,
    plan_evacuation,
    retargeted_from,
)
from gtvp.core.placement import Host
from gtvp.core.policy import Balancing, MigrationLimits
from gtvp.core.prefetch import (
    ANNOTATION,
    DEFAULT_TIMEOUT,
    STALE_AFTER,
    Accepted,
    Request,
    accepted_images,
    asked_elsewhere,
    believed,
    decide,
    parse_requests,
    render_requests,
    requests_on,
    updated,
)
from tests.catalogue import Publisher

NOW = dt.datetime(2026, 12, 2, 1, 0, tzinfo=dt.UTC)
LIMITS = MigrationLimits(max_parallel=5, max_outbound_per_node=2, max_inbound_per_node=1)
PUB = Publisher()
COMPONENTS = tuple(parse_component(o) for o in PUB.web_catalogue())
PARTS = tuple((c.digest, c.size) for c in COMPONENTS[:4])
EVERYTHING = frozenset(d for d, _ in PARTS)
BIGGEST = max(PARTS, key=lambda p: p[1])
SMALL = frozenset(d for d, _ in PARTS if d != BIGGEST[0])  # all but the biggest
ONLY_BIGGEST = frozenset({BIGGEST[0]})


def _target(migration: dict[str, object]) -> str:
    spec = migration["spec"]
    assert isinstance(spec, dict)
    return str(spec["addedNodeSelector"][HOSTNAME_LABEL])


# ----- evacuation ------------------------------------------------------------------------


def _evacuate(
    vmis: list[Vmi],
    targets: list[tuple[str, int]],
    images: dict[str, frozenset[str]],
    migrations: list[Migration] | None = None,
    avoid: dict[tuple[str, str], frozenset[str]] | None = None,
) -> list[dict[str, object]]:
    return plan_evacuation(
        member="bad",
        incident="x",
        vmis=vmis,
        migrations=migrations or [],
        limits=LIMITS,
        targets=targets,
        images=images,
        avoid=avoid,
    )


def test_an_evacuated_box_goes_to_the_member_caching_most_of_its_bytes() -> None:
    box = Vmi("apps", "web", "bad", 2, PARTS)
    targets = [("a", 3), ("b", 3), ("c", 3)]
    # a holds three of its four components, b only the largest one, which outweighs them
    images = {"a": SMALL, "b": ONLY_BIGGEST, "c": frozenset()}
    assert sum(s for d, s in PARTS if d in SMALL) < BIGGEST[1]
    [planned] = _evacuate([box], targets, images)
    assert _target(planned) == "b"  # bytes, not the number of images
    [planned] = _evacuate([box], targets, {**images, "c": EVERYTHING})
    assert _target(planned) == "c"


def test_an_evacuated_box_never_goes_to_a_member_below_its_level_however_warm() -> None:
    box = Vmi("apps", "web", "bad", 2, PARTS)
    # "low" holds everything but is level 1; untrusted members are not targets at all
    [planned] = _evacuate([box], [("low", 1), ("cold", 2)], {"low": EVERYTHING})
    assert _target(planned) == "cold"
    assert _evacuate([box], [("low", 1)], {"low": EVERYTHING}) == []


def test_a_full_warm_member_gives_way_to_the_next_warmest() -> None:
    boxes = [Vmi("apps", "one", "bad", 2, PARTS), Vmi("apps", "two", "bad", 2, PARTS)]
    images = {"warm": EVERYTHING, "luke": SMALL, "cold": frozenset()}
    got = _evacuate(boxes, [("cold", 3), ("luke", 3), ("warm", 3)], images)
    # one inbound per member: the first box takes the warm member, the second the next warmest
    assert sorted(_target(m) for m in got) == ["luke", "warm"]


def test_a_target_a_pinned_move_was_cancelled_from_is_tried_after_the_others() -> None:
    """Root on a Trusted member T claims every image and room, is pinned, then fills itself
    so that the move is cancelled (a cancel is no failure), and claims room again: T was
    pinned again each pass until the VM was stopped. A target cancelled from lately is
    tried after the others, and again once none other can take the VMI. Found by a
    review."""
    box = Vmi("apps", "web", "bad", 2, PARTS)
    targets = [("t", 3), ("h", 3)]
    images = {"t": EVERYTHING, "h": frozenset()}
    [first] = _evacuate([box], targets, images)
    assert _target(first) == "t"
    cancelled = {("apps", "web"): {"t": 1000.0}}
    avoid = retargeted_from(cancelled, now=1000.0 + 60)
    again = _evacuate([box], targets, images, avoid=avoid)
    assert [_target(m) for m in again] == ["h"]
    alone = _evacuate([box], [("t", 3)], images, avoid=avoid)
    assert [_target(m) for m in alone] == ["t"]  # the only one left: tried again
    assert retargeted_from(cancelled, now=1000.0 + RETARGET_MEMORY) == {}
    # a target with fewer failed attempts still comes first: avoided ranks after failures
    failed = [Attempt(0, "Failed", "e0", "h"), Attempt(1, "Failed", "e1", "h")]
    assert least_failed(["t", "h"], failed, avoid={"t"}) == ["t"]
    assert least_failed(["t", "h", "k"], [], avoid={"t"}) == ["h", "k"]


def test_other_vmis_still_go_to_the_least_busy_target() -> None:
    plain = Vmi("apps", "db", "bad", 2)  # not a box: no components
    [planned] = _evacuate([plain], [("b", 3), ("a", 3)], {"b": EVERYTHING})
    assert _target(planned) == "a"  # fewest arrivals, then by name: the cache plays no part


# ----- drains ----------------------------------------------------------------------------


def _drain(evacuees: list[Evacuee], targets: list[DrainTarget]) -> list[str]:
    plan = plan_drains(
        evacuees=evacuees,
        migrations=[],
        history={},
        node_of={(e.namespace, e.name): e.node for e in evacuees},
        limits=LIMITS,
        targets=targets,
    )
    return [_target(m) for m in plan.migrations]


def test_a_drained_box_goes_to_the_warmest_eligible_member() -> None:
    box = Evacuee("apps", "web", "n1", 2, box=True, parts=PARTS)
    targets = [
        DrainTarget("a", 3, True),
        DrainTarget("b", 3, True, images=SMALL),
        DrainTarget("n1", 3, True, images=EVERYTHING),  # the drained node itself
    ]
    assert _drain([box], targets) == ["b"]


def test_a_drained_box_never_goes_to_an_untrusted_low_or_cordoned_member() -> None:
    box = Evacuee("apps", "web", "n1", 2, box=True, parts=PARTS)
    targets = [
        DrainTarget("untrusted", 3, False, images=EVERYTHING),
        DrainTarget("low", 1, True, images=EVERYTHING),
        DrainTarget("cordoned", 3, True, cordoned=True, images=EVERYTHING),
        DrainTarget("cold", 3, True),
    ]
    assert _drain([box], targets) == ["cold"]
    assert _drain([box], targets[:3]) == []


# ----- balancing -------------------------------------------------------------------------

CPU, MEM = 10_000, 100 * 2**30
ON = Balancing(
    enabled=True,
    high_watermark=85,
    low_watermark=60,
    sustain_for=dt.timedelta(minutes=2),
    cooldown=dt.timedelta(minutes=5),
)


def _host(
    name: str, level: int = 3, usable: bool = True, images: frozenset[str] = frozenset()
) -> Host:
    return Host(name, usable, "Trusted" if usable else "Untrusted", level, CPU, MEM, 0, 0, images)


def _balance(hosts: list[Host]) -> list[str]:
    box = PlacedBox("apps", "web", "hot", 2, 3000, 3000 * 2**20, PARTS)
    hot = dataclasses.replace(_host("hot"), cpu_used=9500, memory_used=9500 * 2**20)
    plan = plan_balance(
        hosts=[hot, *hosts],
        boxes=[box],
        migrations=[],
        last_moved={},
        over_since={"hot": NOW - dt.timedelta(minutes=3)},
        settings=ON,
        limits=LIMITS,
        now=NOW,
    )
    return [m.target for m in plan.moves]


def test_a_balanced_box_goes_to_the_warmest_member_never_an_ineligible_one() -> None:
    assert _balance([_host("a"), _host("b", images=SMALL)]) == ["b"]
    ineligible = [
        _host("untrusted", usable=False, images=EVERYTHING),
        _host("low", level=1, images=EVERYTHING),
    ]
    assert _balance([*ineligible, _host("cold")]) == ["cold"]
    assert _balance(ineligible) == []


# ----- the pre-fetch decision --------------------------------------------------------------

ACCEPTED = accepted_images(COMPONENTS, {c.object_name: True for c in COMPONENTS})


def test_a_target_lacking_components_is_asked_for_exactly_those_images() -> None:
    d = decide(parts=PARTS, node_images=SMALL, accepted=ACCEPTED, pending=None, now=NOW,
               reason="drain")  # fmt: skip
    assert d.action == "request"
    assert d.request is not None
    assert d.request.images == (ACCEPTED[BIGGEST[0]].image,)
    assert d.request.bytes == BIGGEST[1]
    assert d.request.requested_at == NOW
    assert d.request.reason == "drain"


def test_a_target_holding_everything_migrates_at_once() -> None:
    d = decide(parts=PARTS, node_images=EVERYTHING, accepted=ACCEPTED, pending=None, now=NOW,
               reason="balancing")  # fmt: skip
    assert (d.action, d.request, d.timed_out, d.fetched_bytes) == ("migrate", None, False, 0)


def test_the_migration_waits_for_the_fetch_then_goes_with_the_wait_and_bytes() -> None:
    asked = Request((ACCEPTED[BIGGEST[0]].image,), BIGGEST[1], NOW, "evacuation")
    soon = NOW + dt.timedelta(seconds=30)
    waiting = decide(parts=PARTS, node_images=SMALL, accepted=ACCEPTED, pending=asked, now=soon,
                     reason="evacuation")  # fmt: skip
    assert waiting.action == "wait"
    done = decide(parts=PARTS, node_images=EVERYTHING, accepted=ACCEPTED, pending=asked,
                  now=soon, reason="evacuation")  # fmt: skip
    assert done.action == "migrate"
    assert not done.timed_out
    assert done.waited == dt.timedelta(seconds=30)
    assert done.fetched_bytes == BIGGEST[1]


def test_past_the_bound_the_migration_goes_anyway_and_says_why() -> None:
    asked = Request((ACCEPTED[BIGGEST[0]].image,), BIGGEST[1], NOW, "evacuation")
    late = NOW + DEFAULT_TIMEOUT
    d = decide(parts=PARTS, node_images=SMALL, accepted=ACCEPTED, pending=asked, now=late,
               reason="evacuation")  # fmt: skip
    assert d.action == "migrate"
    assert d.timed_out
    assert "still lacks 1 of the box's components after 120 s" in d.message
    assert "migrating anyway" in d.message
    short = decide(parts=PARTS, node_images=SMALL, accepted=ACCEPTED, pending=asked,
                   now=NOW + dt.timedelta(seconds=11), reason="evacuation",
                   timeout=dt.timedelta(seconds=10))  # fmt: skip
    assert short.timed_out


def test_a_host_cannot_move_the_waits_start_nor_start_it_again() -> None:
    """Attacker: root on the box's untrusted member (or on the target) rewrites the target
    Node's request (a time in 2099, no images) or removes it, so that gtvp waits for ever
    and the box never leaves. The wait counts from gtvp's own ask; after a restart of the
    operator (nothing remembered) a time ahead of its clock counts as now."""
    asked = decide(parts=PARTS, node_images=SMALL, accepted=ACCEPTED, pending=None, now=NOW,
                   reason="evacuation").request  # fmt: skip
    assert asked is not None
    future = dataclasses.replace(asked, requested_at=NOW + dt.timedelta(days=300))
    late = NOW + DEFAULT_TIMEOUT
    for on_node in (future, None, dataclasses.replace(asked, images=())):
        pending = believed(asked, on_node, late)
        d = decide(parts=PARTS, node_images=SMALL, accepted=ACCEPTED, pending=pending,
                   now=late, reason="evacuation")  # fmt: skip
        assert (d.action, d.timed_out) == ("migrate", True), on_node
    restarted = believed(None, future, late)
    assert restarted is not None
    assert restarted.requested_at == late
    d = decide(parts=PARTS, node_images=SMALL, accepted=ACCEPTED, pending=restarted,
               now=late + DEFAULT_TIMEOUT, reason="evacuation")  # fmt: skip
    assert d.timed_out
    assert believed(None, asked, late) == asked  # gtvp's own request, read back after a restart
    assert believed(None, None, late) is None


def test_only_images_of_verified_components_pinned_by_their_digest_are_requested() -> None:
    """Attacker: a box status (anyone who can write it) or a component nobody signed must
    not make a member fetch an image gtvp does not accept."""
    unsigned = COMPONENTS[0]
    moved = dataclasses.replace(COMPONENTS[1], image="evil.example.com/miner:latest")
    accepted = accepted_images(
        [unsigned, moved, *COMPONENTS[2:4]],
        {c.object_name: c is not unsigned for c in COMPONENTS},
    )
    assert unsigned.digest not in accepted  # its signature did not verify
    assert moved.digest not in accepted  # its image does not pin its digest
    foreign = ("sha256:" + "e" * 64, 10_000_000)  # a digest no component carries
    parts = (*PARTS, foreign)
    d = decide(parts=parts, node_images=frozenset(), accepted=accepted, pending=None, now=NOW,
               reason="evacuation")  # fmt: skip
    assert d.request is not None
    assert set(d.request.images) == {c.image for c in COMPONENTS[2:4]}
    assert all("evil" not in i for i in d.request.images)
    assert d.request.bytes == sum(c.size for c in COMPONENTS[2:4])
    nothing = decide(parts=(foreign,), node_images=frozenset(), accepted=accepted,
                     pending=None, now=NOW, reason="evacuation")  # fmt: skip
    assert nothing.action == "migrate"  # nothing gtvp may ask for: no request at all
    assert nothing.request is None


def test_a_digest_another_publisher_signed_is_fetched_from_the_boxs_own_component() -> None:
    """A scoped publisher signs `00-app` whose digest is the box's kernel's, its image in
    the publisher's own registry (it verifies: a digest is no one's alone). The target is
    sent to the image of the component the box resolved, not the one whose name sorts
    first. Found by a review."""
    kernel = COMPONENTS[0]
    squat = dataclasses.replace(
        kernel, object_name="00-app", name="00-app", type="application",
        image=f"evil.example/app@{kernel.digest}",
    )  # fmt: skip
    verified = {kernel.object_name: True, squat.object_name: True}
    got = accepted_images([squat, kernel], verified, resolved={kernel.object_name})
    assert got[kernel.digest].image == kernel.image


def test_an_unknown_reason_is_refused() -> None:
    with pytest.raises(ValueError, match="pre-fetch reason 'tamper'"):
        decide(parts=PARTS, node_images=frozenset(), accepted=ACCEPTED, pending=None, now=NOW,
               reason="tamper")  # fmt: skip


# ----- the annotation: survives a restart --------------------------------------------------


def test_the_request_survives_a_restart_in_the_node_annotation() -> None:
    first = decide(parts=PARTS, node_images=SMALL, accepted=ACCEPTED, pending=None, now=NOW,
                   reason="evacuation")  # fmt: skip
    assert first.request is not None
    value = render_requests(updated({}, now=NOW, add={"apps/web": first.request}))
    node = {"metadata": {"annotations": {ANNOTATION: value}}}
    # a restarted operator reads the request back and goes on waiting, then migrates
    found = requests_on(node)["apps/web"]
    assert found == first.request
    later = NOW + dt.timedelta(seconds=5)
    again = decide(parts=PARTS, node_images=SMALL, accepted=ACCEPTED, pending=found, now=later,
                   reason="evacuation")  # fmt: skip
    assert again.action == "wait"  # not a second request
    assert json.loads(str(value))["apps/web"]["requestedAt"] == "2026-12-02T01:00:00Z"


def test_unreadable_annotations_read_as_no_request_and_stale_ones_go() -> None:
    assert parse_requests("{not json") == {}
    assert parse_requests("[1, 2]") == {}
    assert parse_requests(json.dumps({"a/b": {"images": "x"}, "c/d": 5})) == {}
    old = Request(("i@sha256:" + "a" * 64,), 1, NOW - DEFAULT_TIMEOUT - STALE_AFTER, "drain")
    new = Request(("i@sha256:" + "b" * 64,), 1, NOW, "drain")
    kept = updated({"x/old": old, "x/new": new}, now=NOW, drop=())
    assert kept == {"x/new": new}
    assert updated(kept, now=NOW, drop=("x/new",)) == {}
    assert render_requests({}) is None


def test_a_hosts_own_annotation_cannot_break_the_pass_that_rewrites_it() -> None:
    """Root on a member writes entries into its Node's annotation that gtvp rewrites when
    it withdraws a request (after every box migration) or counts what was fetched: a time
    at the calendar's end (which overflowed when turned to UTC) and negative byte counts
    (a metrics counter refuses to go down) read as no entry, not an exception that ends
    the evacuation pass. Found by a review."""
    image = "i@sha256:" + "a" * 64
    poisoned = {
        "a/far": {"images": [image], "bytes": 0, "requestedAt": "9999-12-31T23:59:59-14:00"},
        "a/early": {"images": [image], "bytes": 0, "requestedAt": "0001-01-01T00:00:00+14:00"},
        "a/neg": {"images": [image], "bytes": -1, "requestedAt": "2026-12-02T01:00:00Z"},
        "a/huge": {"images": [image], "bytes": 10**400, "requestedAt": "2026-12-02T01:00:00Z"},
        "a/sizes": {"images": [image], "bytes": 5, "sizes": [-5],
                    "requestedAt": "2026-12-02T01:00:00Z"},
    }  # fmt: skip
    got = parse_requests(json.dumps(poisoned))
    assert sorted(got) == ["a/sizes"]
    assert got["a/sizes"].sizes == ()
    render_requests(updated(got, now=NOW, drop=("a/x",)))


def test_a_request_left_on_a_target_no_longer_chosen_is_found() -> None:
    asked = Request(("i@sha256:" + "a" * 64,), 1, NOW, "evacuation")

    def node(*keys: str) -> dict[str, object]:
        value = render_requests(updated({}, now=NOW, add=dict.fromkeys(keys, asked)))
        return {"metadata": {"annotations": {ANNOTATION: value} if value else {}}}

    nodes = {"old": node("apps/web", "apps/db"), "new": node("apps/web"), "other": node()}
    assert asked_elsewhere(nodes, "apps/web", "new") == ["old"]
    assert asked_elsewhere(nodes, "apps/web", "") == ["new", "old"]  # migrated unpinned
    assert asked_elsewhere(nodes, "apps/db", "old") == []


def test_accepted_image_records_size() -> None:
    c = COMPONENTS[2]
    assert ACCEPTED[c.digest] == Accepted(c.image, c.size)


def test_a_box_leaving_an_untrusted_member_waits_less_for_its_prefetch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its VM runs on an untrusted host while it waits: the evacuation bound caps the wait,
    and turning pre-fetch off turns it off for evacuations too."""
    from gtvp.handlers import prefetch as shell

    monkeypatch.delenv(shell.TIMEOUT_ENV, raising=False)
    monkeypatch.delenv(shell.EVACUATION_TIMEOUT_ENV, raising=False)
    assert shell.timeout("balancing") == dt.timedelta(seconds=120)
    assert shell.timeout("evacuation") == dt.timedelta(seconds=30)
    monkeypatch.setenv(shell.EVACUATION_TIMEOUT_ENV, "5")
    assert shell.timeout("evacuation") == dt.timedelta(seconds=5)
    monkeypatch.setenv(shell.TIMEOUT_ENV, "0")
    assert shell.timeout("evacuation") == dt.timedelta(0)
    assert shell.timeout("drain") == dt.timedelta(0)
