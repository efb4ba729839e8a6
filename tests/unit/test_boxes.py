"""Composition, placement and the Lazy Box lifecycle decisions (pure core)."""

from __future__ import annotations

import copy
import datetime as dt
from dataclasses import replace
from typing import Any, cast

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from gtvp.core.boxes import BoxInput, Observed, plan_box, someone_elses, unschedulable
from gtvp.core.component_checks import Check, check_component, spend_use
from gtvp.core.components import Component, parse_component
from gtvp.core.compose import (
    BoxRef,
    CompositionError,
    compose_vm,
    composed_boot,
    preferred_node,
    runs_composition,
    template_boots,
    vm_parts,
    with_cloud_init_secret,
)
from gtvp.core.compose import (
    vouches as compose_vouches,
)
from gtvp.core.placement import Host, place
from gtvp.core.resolve import BoxRequest, resolve
from gtvp.core.trust import trust_selector
from gtvp.handlers.lazyboxes import recorded
from tests.catalogue import Publisher

PUB = Publisher()
OBJS = PUB.web_catalogue()
CAT = [parse_component(o) for o in OBJS]
SPEC: dict[str, Any] = {
    "application": {"name": "nginx"},
    "dependencies": [{"name": "debian-minimal"}],
    "level": 2,
    "resources": {"cpu": "1", "memory": "512Mi"},
    "upgradePolicy": "Restart",
    "onMissingDependency": "Recompose",
}
REF = BoxRef("web", "apps", "uid-1")
NOW = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC)
COMPS = resolve(BoxRequest.from_spec(SPEC), CAT)
OK = {c.object_name: Check("Verified", "SignatureValid", "") for c in CAT}


def host(
    name: str,
    *,
    level: int = 3,
    usable: bool = True,
    images: frozenset[str] = frozenset(),
    used: int = 0,
) -> Host:
    return Host(
        name, usable, "Trusted" if usable else "Untrusted", level, 8000, 32 * 2**30, used, 0, images
    )


def digests(*names: str) -> frozenset[str]:
    return frozenset(c.digest for c in COMPS if c.name in names)


# -- composition ----------------------------------------------------------------------------


def test_vm_boots_the_kernel_and_carries_trust_selector_and_owner() -> None:
    vm = compose_vm(REF, SPEC, COMPS, "node-2")
    tmpl = vm["spec"]["template"]["spec"]
    kernel = next(c for c in COMPS if c.type == "kernel")
    assert tmpl["domain"]["firmware"]["kernelBoot"]["container"]["image"] == kernel.image
    assert tmpl["nodeSelector"] == trust_selector(2)
    assert tmpl["evictionStrategy"] == "External"
    assert vm["metadata"]["ownerReferences"][0]["kind"] == "LazyBox"
    assert vm["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert preferred_node(tmpl) == "node-2"
    images = [v["containerDisk"]["image"] for v in tmpl["volumes"] if "containerDisk" in v]
    assert {c.image for c in COMPS if c.type != "kernel"} == set(images)
    user_data = next(v for v in tmpl["volumes"] if "cloudInitNoCloud" in v)["cloudInitNoCloud"][
        "userData"
    ]
    assert "/opt/gtvp/nginx/start" in user_data
    assert "/opt/gtvp/openssl" in user_data
    assert tmpl["domain"]["resources"]["requests"] == {"cpu": "1", "memory": "512Mi"}


def test_what_a_composition_boots_ignores_what_kubevirt_defaults_and_nothing_else() -> None:
    """`composed_boot` is compared with the VMI KubeVirt made from the VM: its defaults (a
    pull policy, a grace period within gtvp's cap) change nothing; a changed kernel
    argument, an added volume or disk serial, or an SSH key change what it boots."""
    vm = compose_vm(REF, SPEC, COMPS, "node-2")
    tmpl = vm["spec"]["template"]["spec"]
    labels = vm["spec"]["template"]["metadata"]["labels"]
    ours = composed_boot(tmpl, None, labels)
    defaulted = copy.deepcopy(tmpl)
    for v in defaulted["volumes"]:
        if "containerDisk" in v:
            v["containerDisk"]["imagePullPolicy"] = "Always"
    defaulted["domain"]["firmware"]["kernelBoot"]["container"]["imagePullPolicy"] = "Always"
    defaulted["domain"]["machine"] = {"type": "q35"}
    defaulted["terminationGracePeriodSeconds"] = 30
    assert composed_boot(defaulted, None, labels) == ours
    changes = []
    for edit in (
        lambda t: t["domain"]["firmware"]["kernelBoot"].update(kernelArgs="init=/bin/sh"),
        lambda t: t["volumes"].append(
            {"name": "x", "secret": {"secretName": "web-gtvp-cloudinit"}}
        ),
        lambda t: t["domain"]["devices"]["disks"][0].update(serial="other"),
        lambda t: t.update(accessCredentials=[{"sshPublicKey": {}}]),
    ):
        changed = copy.deepcopy(tmpl)
        edit(changed)
        changes.append(composed_boot(changed, None, labels))
    assert ours not in changes
    assert len(set(changes)) == len(changes)
    # a hook sidecar (KubeVirt's Sidecar feature gate) rewrites the domain it boots
    hooked = copy.deepcopy(vm)
    hooked["spec"]["template"]["metadata"]["annotations"]["hooks.kubevirt.io/hookSidecars"] = "[]"
    assert template_boots(hooked) != template_boots(vm)
    assert composed_boot(tmpl, vm["spec"]["template"]["metadata"]["annotations"], labels) == (
        template_boots(vm)
    )


def test_a_vmi_of_the_composition_started_ungated_is_restarted() -> None:
    """Anyone who may create VMIs in the namespace starts the box's VMI (its VM as controller,
    the exact composition) without what keeps it gated: no trust selector (it may land on
    any host), another level's, no level label (admission then leaves a grace period of
    days, and evacuation and drains look past it), a grace period beyond gtvp's cap, or no
    External eviction. It does not boot what gtvp composed (no Secrets, no box
    attestation: `runs_composition`), and the box restarts it onto its VM."""
    vm = compose_vm(REF, SPEC, COMPS, "node-2")
    tmpl = vm["spec"]["template"]
    ann, labels = tmpl["metadata"]["annotations"], tmpl["metadata"]["labels"]
    status = {"composedBoots": [template_boots(vm)], "composedAt": "2026-11-29T11:00:00Z"}
    assert composed_boot(tmpl["spec"], ann, labels) == status["composedBoots"][0]
    anywhere = copy.deepcopy(tmpl["spec"])
    del anywhere["nodeSelector"]
    unlabelled = {k: v for k, v in labels.items() if k != "gtvp.io/level"}
    variants = [
        (anywhere, labels),
        ({**copy.deepcopy(tmpl["spec"]), "nodeSelector": trust_selector(1)}, labels),
        (tmpl["spec"], unlabelled),
        ({**tmpl["spec"], "terminationGracePeriodSeconds": 10**9}, labels),
        ({k: v for k, v in tmpl["spec"].items() if k != "evictionStrategy"}, labels),
    ]
    for spec, meta_labels in variants:
        ungated = composed_boot(spec, ann, meta_labels)
        assert not runs_composition(status, ungated, "2026-11-29T12:30:00Z")
        seen = replace(_running(COMPS), vmi_boots=ungated, vmi_node="untrusted-9")
        d = plan_box(inp(observed=seen, status=status), NOW)
        assert d.restart
        assert d.vm is None  # the VM is gtvp's: only its VMI is started again


def test_the_applications_ports_are_forwarded_by_the_pod_network_interface() -> None:
    vm = compose_vm(REF, {**SPEC, "ports": [{"name": "http", "port": 8080}]}, COMPS, None)
    tmpl = vm["spec"]["template"]["spec"]
    assert tmpl["networks"] == [{"name": "default", "pod": {}}]
    assert tmpl["domain"]["devices"]["interfaces"] == [
        {
            "name": "default",
            "masquerade": {},
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        }
    ]
    plain = compose_vm(REF, SPEC, COMPS, None)["spec"]["template"]["spec"]
    assert "networks" not in plain  # no ports: the VM's spec stays as before
    assert "interfaces" not in plain["domain"]["devices"]


def test_vm_is_valid_yaml_for_kubectl() -> None:
    text = yaml.safe_dump(compose_vm(REF, SPEC, COMPS, None))
    assert "affinity" not in text  # no placement yet: no preference


# -- placement ------------------------------------------------------------------------------


def test_prefers_the_member_that_caches_most_bytes() -> None:
    hosts = [
        host("a"),
        host("b", images=digests("debian-minimal")),
        host("c", images=digests("nginx")),
    ]
    got = place(COMPS, 2, 1000, 2**29, hosts)
    assert got.node == "b"
    assert got.cached_bytes == 95_000_000
    assert "caches 90.6 MiB" in got.reason


def test_never_an_untrusted_or_lower_level_member() -> None:
    hosts = [
        host("warm-untrusted", usable=False, images=digests("debian-minimal", "nginx")),
        host("warm-low", level=1, images=digests("debian-minimal")),
        host("cold"),
    ]
    assert place(COMPS, 2, 1000, 2**29, hosts).node == "cold"


def test_pending_reason_names_each_obstacle() -> None:
    hosts = [
        host("u", usable=False),
        host("low", level=1),
        host("full", used=7900),
        replace(host("drained", images=digests("debian-minimal")), cordoned=True),
    ]
    got = place(COMPS, 2, 1000, 2**29, hosts)
    assert got.node is None
    assert "1 not Trusted (u: Untrusted)" in got.reason
    assert "1 below level 2 (low: level 1)" in got.reason
    assert "1 without room" in got.reason
    assert "full: 100m CPU" in got.reason
    assert "1 cordoned (drained)" in got.reason  # the scheduler would never start it there


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.booleans(),
            st.integers(1, 3),
            st.integers(0, 8000),
            st.sets(st.sampled_from(range(5))),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_placement_properties(specs: list[tuple[bool, int, int, set[int]]]) -> None:
    hosts = [
        host(
            f"m{i}", usable=u, level=lv, used=used, images=frozenset(COMPS[j].digest for j in imgs)
        )
        for i, (u, lv, used, imgs) in enumerate(specs)
    ]
    got = place(COMPS, 2, 1000, 2**29, hosts)
    assert place(COMPS, 2, 1000, 2**29, list(reversed(hosts))).node == got.node  # order-free
    ok = [h for h in hosts if h.usable and h.level >= 2 and h.fits(1000, 2**29)]
    if not ok:
        assert got.node is None
        return
    chosen = next(h for h in hosts if h.name == got.node)
    assert chosen in ok
    best = max(sum(c.size for c in COMPS if c.digest in h.images) for h in ok)
    assert got.cached_bytes == best


# -- lifecycle ------------------------------------------------------------------------------


def inp(**kw: Any) -> BoxInput:
    base: dict[str, Any] = {
        "ref": REF,
        "spec": SPEC,
        "generation": 1,
        "status": {},
        "components": COMPS,
        "checks": OK,
        "hosts": [host("node-1"), host("node-2", images=digests("debian-minimal"))],
    }
    base.update(kw)
    return BoxInput(**base)


def test_first_placement_writes_vm_and_status() -> None:
    d = plan_box(inp(), NOW)
    assert d.vm is not None
    assert d.status["phase"] == "Placing"
    assert d.status["node"] == "node-2"
    assert [r["name"] for r in d.status["resolved"]] == [c.name for c in COMPS]
    assert set(d.uses) == {(c.object_name, c.uid) for c in COMPS}


def test_a_placed_box_is_not_written_again_when_its_vm_appears() -> None:
    """The VM's own watch event plans the box again: nothing left to write (one status
    write per placement, not two)."""
    first = plan_box(inp(), NOW)
    assert first.vm is not None
    status = recorded(first, NOW)  # as the box loop writes it with the VM
    written = Observed(
        vm_exists=True,
        booted=tuple(c.object_name for c in COMPS),
        vm_node="node-2",
        vm_boots=template_boots(first.vm),
    )
    again = plan_box(inp(status=status, observed=written), NOW + dt.timedelta(seconds=1))
    assert again.vm is None
    assert again.event is None
    assert again.status == status


def test_a_box_vm_changed_outside_gtvp_is_written_again_and_its_vmi_restarted() -> None:
    """Whoever may edit VMs in the namespace pins a disk of their own on the box VM's kernel
    command line and restarts its VMI: gtvp writes the composition back and restarts the
    VMI onto it. A VMI still booting what gtvp composed is left alone (the VM alone is
    written back); one booting an older composition gtvp made (LiveUpdate) too, if it was
    created before the newest was written."""
    placed = plan_box(inp(), NOW)
    assert placed.vm is not None
    status = recorded(placed, NOW)
    ours = status["composedBoots"]
    assert ours == [boots(COMPS)]
    assert status["composedAt"] == "2026-11-29T12:00:00Z"
    running = replace(_running(COMPS), vm_boots="theirs", vmi_boots="theirs")
    d = plan_box(inp(status=status, observed=running), NOW)
    assert d.vm is not None
    assert d.restart
    assert template_boots(d.vm) == ours[0]
    assert d.event is not None
    assert d.event[:2] == ("Warning", "CompositionRestored")
    assert recorded(d, NOW)["composedBoots"] == ours  # the same composition, written again
    # a VMI that boots no kernel at all under the box's name: the same
    d = plan_box(inp(status=status, observed=replace(running, vmi_boots="")), NOW)
    assert d.vm is not None
    assert d.restart
    # the VM edited, its VMI not restarted yet: the VM written back, the VMI kept
    d = plan_box(inp(status=status, observed=replace(running, vmi_boots=ours[0])), NOW)
    assert d.vm is not None
    assert not d.restart
    # the VM is gtvp's, its VMI not: only the VMI restarts (no VM write, no new credential),
    # said once while it goes
    only_vmi = replace(running, vm_boots=ours[0])
    d = plan_box(inp(status=status, observed=only_vmi), NOW)
    assert (d.vm, d.restart) == (None, True)
    assert d.event is not None
    again = plan_box(inp(status=d.status, observed=only_vmi), NOW)
    assert (again.vm, again.restart, again.event) == (None, True, None)
    # nothing changed; or the VMI boots an older composition gtvp made
    same = replace(running, vm_boots=ours[0], vmi_boots="older", vmi_created="2026-11-29T11:00:00Z")
    assert plan_box(inp(status=status, observed=replace(same, vmi_boots=ours[0])), NOW).vm is None
    with_older = {**status, "composedBoots": [*ours, "older"]}
    d = plan_box(inp(status=with_older, observed=same), NOW)
    assert d.vm is None
    assert not d.restart
    # a VMI created since the newest composition was written (a restart, or one made by
    # someone else) booting an older one: a rollback, restarted onto the newest
    rollback = replace(same, vmi_created="2026-11-29T12:00:01Z")
    d = plan_box(inp(status=with_older, observed=rollback), NOW)
    assert d.restart


def test_a_box_placed_by_an_older_gtvp_records_its_composition_without_a_restart() -> None:
    """A status from before gtvp recorded its compositions: what the VM boots is recorded
    when it is the composition resolved now, as gtvp writes it (its cloud-init inline, or
    in the box's Secret once armed for key release or attestation); nothing is written to
    the VM or restarted."""
    d = plan_box(inp(status={"phase": "Running"}, observed=_running(COMPS)), NOW)
    assert (d.vm, d.restart, d.status["composedBoots"]) == (None, False, [boots(COMPS)])
    vm = compose_vm(REF, SPEC, COMPS, "node-2")
    armed_vm = with_cloud_init_secret(vm, "web-gtvp-cloudinit")[0]
    armed = template_boots(armed_vm)
    obs = replace(_running(COMPS), vm_boots=armed, vmi_boots=armed)
    d = plan_box(inp(status={"phase": "Running"}, observed=obs, armed=True), NOW)
    assert (d.vm, d.restart, d.status["composedBoots"]) == (None, False, [armed])
    # a box gtvp never arms (no Secrets, no attestation) moved onto cloud-init from a Secret
    # someone else wrote is not gtvp's composition: written back, its VMI restarted
    d = plan_box(inp(status={"phase": "Running"}, observed=obs), NOW)
    assert d.vm is not None
    assert d.restart
    assert template_boots(d.vm) == boots(COMPS)


def test_a_vm_gtvp_wrote_whose_record_was_lost_is_recorded_not_restored() -> None:
    """The box loop wrote the VM of an upgrade but its status write failed: the next pass
    finds the VM booting what gtvp composes now under an older record. It is recorded
    (older compositions forgotten: the lost write may have been one that replaced a revoked
    one), without writing the VM (and its credential) again; only a VMI that does not boot
    it is restarted."""
    ours = boots(COMPS)
    stale = {
        "phase": "Running",
        "node": "node-2",
        "composedBoots": ["before-the-upgrade"],
        "composedAt": "2026-11-29T10:00:00Z",
    }
    fresh = replace(_running(COMPS), vm_boots=ours, vmi_boots=ours)
    d = plan_box(inp(status=stale, observed=fresh), NOW)
    assert (d.vm, d.restart, d.event) == (None, False, None)
    assert (d.status["composedBoots"], d.status["composedAt"]) == ([ours], "2026-11-29T12:00:00Z")
    old_vmi = replace(fresh, vmi_boots="before-the-upgrade", vmi_created="2026-11-29T11:00:00Z")
    d = plan_box(inp(status=stale, observed=old_vmi), NOW)
    assert (d.vm, d.restart) == (None, True)


def test_a_restored_vm_takes_no_hot_plug_layout_from_its_own_annotations() -> None:
    """Someone edits an armed box's VM, and its `gtvp.io/hotplugged` annotation to claim
    the application hot-plugged (never on the pinned kernel command line): gtvp writes back
    the layout it would write itself, every component pinned."""
    app = next(c for c in COMPS if c.type == "application")
    claimed = replace(
        _running(COMPS),
        booted=tuple(c.object_name for c in COMPS if c is not app),
        hotplugged=(app.object_name,),
        vm_boots="theirs",
    )
    d = plan_box(inp(status={"composedBoots": ["x"]}, observed=claimed, armed=True), NOW)
    assert d.vm is not None
    assert "dataVolumeTemplates" not in d.vm["spec"]
    args = d.vm["spec"]["template"]["spec"]["domain"]["firmware"]["kernelBoot"]["kernelArgs"]
    assert app.pin.removeprefix("sha256:") in args


def test_waits_pending_without_a_qualified_member() -> None:
    d = plan_box(inp(hosts=[host("node-1", usable=False)]), NOW)
    assert d.vm is None
    assert d.status["phase"] == "Pending"
    assert "no member qualifies" in d.status["message"]


def test_failed_component_blocks_the_box_with_its_reason() -> None:
    nginx = next(c for c in COMPS if c.name == "nginx")
    checks = {**OK, nginx.object_name: Check("Failed", "BadSignature", "does not match")}
    d = plan_box(inp(checks=checks), NOW)
    assert d.vm is None
    assert d.status["phase"] == "Failed"
    assert "nginx 1.26.2" in d.status["message"]
    assert "BadSignature" in d.status["message"]


def boots(comps: list[Component]) -> str | None:
    """What the VM gtvp composes of `comps` boots (`status.composedBoots`)."""
    return template_boots(compose_vm(REF, SPEC, comps, "node-2"))


def _running(comps: list[Component]) -> Observed:
    parts = vm_parts(compose_vm(REF, SPEC, comps, "node-2"))
    return Observed(
        vm_exists=True,
        booted=tuple(c.object_name for c in comps),
        vm_node="node-2",
        vmi_phase="Running",
        vmi_node="node-2",
        vm_boot="x",
        vmi_boot="x",
        vm_boots=boots(comps),
        vmi_boots=boots(comps),
        vm_parts=parts,
        vmi_parts=parts,
        vm_level=2,
    )


def _part(c: Component) -> tuple[str, str]:
    """What a composed VM boots of component `c` (`compose.boot_parts`)."""
    if c.type == "kernel":
        return ("kernel", c.digest)
    if c.type == "rootfs":
        return (f"rootfs:{c.name[:20]}", c.digest)
    return ("c-" + c.name.replace(".", "-"), c.digest)


OLD_NGINX = next(c for c in CAT if c.label == "nginx 1.22.1")
ON_OLD_NGINX = [c for c in COMPS if c.name != "nginx"] + [OLD_NGINX]


def _live_update_waiting() -> tuple[Observed, dict[str, Any]]:
    """A LiveUpdate box whose VM was rewritten for nginx 1.26.2 while its VMI, created
    before, still boots 1.22.1 (`RestartRequired`): both compositions vouched for."""
    old_vmi = _running(ON_OLD_NGINX)
    seen = replace(
        _running(COMPS),
        vmi_boots=old_vmi.vmi_boots,
        vmi_parts=old_vmi.vmi_parts,
        vmi_created="2026-11-29T10:00:00Z",
    )
    status = {
        "composedBoots": [boots(COMPS), boots(ON_OLD_NGINX)],
        "composedAt": "2026-11-29T11:00:00Z",
    }
    assert runs_composition(status, seen.vmi_boots, seen.vmi_created)
    return seen, status


def test_a_revoked_component_the_vmi_still_boots_restarts_a_live_update_box() -> None:
    """nginx 1.22.1, which the VMI of a LiveUpdate box still boots (the VM already names
    1.26.2), is revoked: that composition is no longer vouched for (no Secrets, no box
    attestation) and the VMI is restarted onto the VM, not left running it."""
    seen, status = _live_update_waiting()
    spec = {**SPEC, "upgradePolicy": "LiveUpdate"}
    why = "nginx 1.22.1 failed verification: Revoked: the policy revokes it"
    d = plan_box(
        inp(spec=spec, observed=seen, status=status, unvouched={_part(OLD_NGINX): why}), NOW
    )
    assert d.restart
    assert d.vm is None  # the VM boots 1.26.2 already
    assert d.status["composedBoots"] == [boots(COMPS)]
    assert not runs_composition(d.status, seen.vmi_boots, seen.vmi_created)
    assert d.event is not None
    assert d.event[1] == "ComponentRevoked"
    assert "Revoked" in d.event[2]
    # nothing revoked: the VMI waits for its restart, as LiveUpdate says
    d = plan_box(inp(spec=spec, observed=seen, status=status), NOW)
    assert not d.restart
    assert d.status["composedBoots"] == status["composedBoots"]


def test_a_component_whose_object_is_deleted_is_no_longer_vouched_for() -> None:
    """The OSComponent of nginx 1.26.2, which a LiveUpdate box runs, is deleted (by its
    publisher tidying up, or an administrator's first reaction to a bad release): what it
    vouched for cannot be checked any more, so the box is restarted onto what still
    verifies (1.22.1) and older compositions are forgotten; with nothing in its place it is
    Failed and nothing it runs is vouched for. Removing the publisher's key afterwards
    would reach nothing, so the deletion itself counts."""
    new = next(c for c in COMPS if c.name == "nginx")
    gone = {_part(new): "no OSComponent of it is left (deleted)"}
    checks = {k: v for k, v in OK.items() if k != new.object_name}
    spec = {**SPEC, "upgradePolicy": "LiveUpdate"}
    status = {"composedBoots": [boots(COMPS)], "composedAt": "2026-11-29T11:00:00Z"}
    running = _running(COMPS)
    d = plan_box(
        inp(spec=spec, components=ON_OLD_NGINX, checks=checks, observed=running,
            status=status, unvouched=gone),
        NOW,
    )  # fmt: skip
    assert d.vm is not None
    assert d.restart
    assert d.forget_boots
    assert recorded(d, NOW)["composedBoots"] == [boots(ON_OLD_NGINX)]
    d = plan_box(
        inp(spec=spec, components=None, checks=checks, observed=running, status=status,
            unvouched=gone),
        NOW,
    )  # fmt: skip
    assert (d.status["phase"], d.status["composedBoots"]) == ("Failed", [])
    assert not d.restart  # a restart would boot the same
    assert d.event is not None
    assert d.event[1] == "ComponentRevoked"
    # the object made again under its name with other bytes: the names match, the image
    # the VM boots is nobody's any more: the VM is written anew from what resolves now
    other = "sha256:" + "e" * 64
    again = replace(new, image=f"registry.example.com/other/nginx@{other}", digest=other)
    now_comps = [again if c is new else c for c in COMPS]
    d = plan_box(inp(components=now_comps, observed=running, status=status, unvouched=gone), NOW)
    assert d.vm is not None
    assert _part(again) in vm_parts(d.vm)
    assert d.restart


def test_component_bump_restarts_onto_the_new_composition() -> None:
    old = resolve(
        BoxRequest.from_spec({**SPEC, "application": {"name": "nginx", "versions": "<1.25"}}), CAT
    )
    status = {"resolved": [{"name": c.name, "version": str(c.version)} for c in old]}
    d = plan_box(inp(observed=_running(old), status=status), NOW)
    assert d.vm is not None
    assert d.restart
    assert d.status["upgrade"]["from"].endswith("nginx 1.22.1")
    assert d.status["upgrade"]["to"].endswith("nginx 1.26.2")


def test_live_update_keeps_the_vmi_and_says_restart_required() -> None:
    old = [c for c in COMPS if c.name != "nginx"] + [
        next(c for c in CAT if c.label == "nginx 1.22.1")
    ]
    d = plan_box(inp(spec={**SPEC, "upgradePolicy": "LiveUpdate"}, observed=_running(old)), NOW)
    assert d.vm is not None
    assert not d.restart
    assert any(
        c["type"] == "RestartRequired" and c["status"] == "True" for c in d.status["conditions"]
    )


def test_a_running_component_that_no_longer_verifies_is_replaced_whatever_the_policy() -> None:
    """The publisher of nginx 1.26.2 is removed from the policy while boxes run it: the box
    (LiveUpdate, which would wait for a restart) is restarted onto the version that still
    verifies, and its older compositions are no longer vouched for (only the new one gets
    Secrets and attestation)."""
    new = next(c for c in COMPS if c.name == "nginx")
    old = [c for c in COMPS if c.name != "nginx"] + [
        next(c for c in CAT if c.label == "nginx 1.22.1")
    ]
    revoked = {**OK, new.object_name: Check("Failed", "UnknownPublisher", "key removed")}
    spec = {**SPEC, "upgradePolicy": "LiveUpdate"}
    status = {"composedBoots": [boots(COMPS), "an-older-one"]}
    d = plan_box(
        inp(spec=spec, components=old, checks=revoked, observed=_running(COMPS), status=status),
        NOW,
    )
    assert d.vm is not None
    assert d.restart
    assert d.forget_boots
    assert recorded(d, NOW)["composedBoots"] == [boots(old)]
    # the same box with nothing left to fall back on: still running, nothing vouched for
    d = plan_box(
        inp(spec=spec, components=None, checks=revoked, observed=_running(COMPS), status=status),
        NOW,
    )
    assert (d.vm, d.status["phase"], d.status["composedBoots"]) == (None, "Failed", [])
    assert d.event is not None
    assert d.event[:2] == ("Warning", "ComponentRevoked")
    assert new.object_name in d.event[2]
    # a check made before the policy was loaded is no revocation
    unknown = {**OK, new.object_name: Check("Failed", "NoPolicy", "no policy yet")}
    d = plan_box(inp(components=None, checks=unknown, observed=_running(COMPS), status=status), NOW)
    assert d.status["composedBoots"] == status["composedBoots"]


def test_a_new_kernel_without_the_box_init_is_not_booted_and_the_box_keeps_what_runs() -> None:
    """The newest kernel a box resolves to does not provide initrd (no box init): it is not
    composed (NotBootable), and the composition that runs, which booted through the box
    init, stays the one vouched for (Secrets, box attestation)."""
    kernel = next(c for c in COMPS if c.type == "kernel")
    bare = parse_component(PUB.component(kernel.name, "9.9.9", "kernel", provides=["kernel"]))
    comps = [bare if c is kernel else c for c in COMPS]
    status = {"composedBoots": [boots(COMPS)]}
    spec = {**SPEC, "upgradePolicy": "Restart"}
    checks = {**OK, bare.object_name: Check("Verified", "SignatureValid", "")}
    d = plan_box(
        inp(spec=spec, components=comps, checks=checks, observed=_running(COMPS), status=status),
        NOW,
    )
    assert (d.vm, d.restart, d.status["phase"]) == (None, False, "Failed")
    assert "does not provide initrd" in d.status["message"]
    assert d.status["composedBoots"] == [boots(COMPS)]


def test_missing_dependency_hot_plugged_as_datavolume() -> None:
    curl = parse_component(PUB.component("curl", "8.0.0", requires=["libc"]))
    spec = {**SPEC, "onMissingDependency": "HotPlug", "requestedComponents": [{"name": "curl"}]}
    waiting = plan_box(inp(spec=spec, components=[*COMPS, curl], observed=_running(COMPS)), NOW)
    assert waiting.vm is None
    assert waiting.status["phase"] == "Verifying"
    checks = {**OK, curl.object_name: Check("Verified", "SignatureValid", "")}
    d = plan_box(
        inp(spec=spec, components=[*COMPS, curl], checks=checks, observed=_running(COMPS)), NOW
    )
    assert d.vm is not None
    assert not d.restart
    vols = d.vm["spec"]["template"]["spec"]["volumes"]
    assert any(v.get("dataVolume", {}).get("hotpluggable") for v in vols)
    assert d.vm["spec"]["dataVolumeTemplates"][0]["spec"]["source"]["registry"]["url"].endswith(
        curl.digest
    )
    assert d.uses == ((curl.object_name, curl.uid),)
    # under a policy that attests boxes the box init would never measure that disk: the box
    # is recomposed and restarted instead, every disk pinned and measured
    d = plan_box(
        inp(
            spec=spec,
            components=[*COMPS, curl],
            checks=checks,
            observed=_running(COMPS),
            armed=True,
        ),
        NOW,
    )
    assert d.vm is not None
    assert d.restart
    assert "dataVolumeTemplates" not in d.vm["spec"]
    args = d.vm["spec"]["template"]["spec"]["domain"]["firmware"]["kernelBoot"]["kernelArgs"]
    assert curl.pin.removeprefix("sha256:") in args


def test_unchanged_box_reports_running_without_writing_vm() -> None:
    d = plan_box(inp(observed=_running(COMPS), status={"phase": "Placing"}), NOW)
    assert d.vm is None
    assert d.status["phase"] == "Running"


def test_a_box_whose_vm_the_scheduler_cannot_place_says_why_once() -> None:
    """gtvp places by what it counts; the scheduler also counts KubeVirt's per-VM overhead
    and pods that are not VMs. A box whose VM's pod fits nowhere said "the VM is starting"
    forever; it says the scheduler's words, with one Warning, and is Running once placed."""
    status = plan_box(inp(), NOW).status
    vmi_status = {
        "phase": "Scheduling",
        "conditions": [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
             "message": "0/3 nodes are available: 3 Insufficient memory."}
        ],
    }  # fmt: skip
    stuck = replace(_running(COMPS), vmi_phase="Scheduling", vmi_node=None,
                    vmi_unschedulable=unschedulable(vmi_status))  # fmt: skip
    d = plan_box(inp(observed=stuck, status=status), NOW)
    assert d.status["phase"] == "Placing"
    assert d.status["message"] == (
        "the scheduler cannot place the VM on node-2: "
        "0/3 nodes are available: 3 Insufficient memory."
    )
    ready = next(c for c in d.status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "Unschedulable")
    assert d.event == ("Warning", "Unschedulable", d.status["message"])
    # the scheduler's count changes: the message follows, no second Warning
    vmi_status["conditions"][0]["message"] = "0/4 nodes are available: 4 Insufficient memory."
    again = replace(stuck, vmi_unschedulable=unschedulable(vmi_status))
    later = plan_box(inp(observed=again, status=d.status), NOW)
    assert later.status["message"].endswith("4 Insufficient memory.")
    assert later.event is None
    # scheduled at last: the condition is gone (or the VMI has a node), and the box runs
    assert unschedulable({**vmi_status, "nodeName": "node-2"}) is None
    assert unschedulable({"phase": "Scheduling"}) is None
    running = plan_box(inp(observed=_running(COMPS), status=later.status), NOW)
    assert running.status["phase"] == "Running"


# -- component checks -----------------------------------------------------------------------


def test_a_failed_vm_fails_the_box_with_the_vms_own_reason() -> None:
    """A VM whose box init refused a disk (its bytes differ from the pin) ends: the box says
    Failed with that reason, not "the VM is starting" forever."""
    comps = resolve(BoxRequest.from_spec(SPEC), CAT)
    refused = "gtvp-init: refused nginx: sha256 00ff != pinned 4a1b"
    observed = replace(_running(comps), vmi_phase="Failed", vmi_reason=refused)
    d = plan_box(inp(observed=observed, status={"phase": "Running"}), NOW)
    assert d.status["phase"] == "Failed"
    assert d.status["message"] == f"the VM failed on node-2: {refused}"
    ready = next(c for c in d.status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "VMFailed")
    assert d.event == ("Warning", "VMFailed", d.status["message"])
    assert d.vm is None  # nothing rewritten: the failure is the VM's, for a person to see


def test_tampered_component_fails_and_max_uses_forces_recheck() -> None:
    obj = PUB.component("nginx", "9.9.9", "application", max_uses=2)
    assert check_component(obj, PUB.keys).ok
    tampered = {
        **obj,
        "spec": {**obj["spec"], "image": obj["spec"]["image"].replace("nginx@", "evil@")},
    }
    bad = check_component(tampered, PUB.keys)
    assert bad.state == "Failed"
    assert bad.reason == "BadSignature"
    assert check_component(obj, {}).reason == "UnknownPublisher"
    first = spend_use({"state": "Verified", "usesLeft": 2}, 2)
    assert first.status == {"state": "Verified", "usesLeft": 1}
    assert not first.recheck
    assert spend_use({"state": "Verified", "usesLeft": 0}, 2).recheck
    assert spend_use({"state": "Verified"}, None).status is None


def test_missing_dependency_recomposed_restarts_even_with_live_update() -> None:
    curl = parse_component(PUB.component("curl", "8.0.0", requires=["libc"]))
    spec = {
        **SPEC,
        "upgradePolicy": "LiveUpdate",
        "onMissingDependency": "Recompose",
        "requestedComponents": [{"name": "curl"}],
    }
    checks = {**OK, curl.object_name: Check("Verified", "SignatureValid", "")}
    d = plan_box(
        inp(spec=spec, components=[*COMPS, curl], checks=checks, observed=_running(COMPS)), NOW
    )
    assert d.vm is not None
    assert d.restart  # the application needs it now: recompose and restart
    assert not d.vm["spec"].get("dataVolumeTemplates")
    assert (
        d.status["upgrade"]["to"].endswith("curl 8.0.0")
        or "curl 8.0.0" in d.status["upgrade"]["to"]
    )


def _owned(kind: str, name: str, uid: str, *, controller: bool = True) -> dict[str, Any]:
    ref = {"kind": kind, "name": name, "uid": uid, "controller": controller}
    return {"metadata": {"name": "web", "ownerReferences": [ref]}}


def test_a_vm_or_vmi_of_the_boxs_name_that_is_not_its_own_is_left_alone() -> None:
    """A namespace user names a box after a colleague's VM: gtvp writes no VM over it,
    restarts nothing and fails the box with why (the VM is written for a box whose VM is
    its own, as before)."""
    box_vm = _owned("LazyBox", "web", REF.uid)
    box_vm["metadata"]["uid"] = "vm-uid"
    box_vmi = _owned("VirtualMachine", "web", "vm-uid")
    assert someone_elses(REF.uid, box_vm, box_vmi) is None
    leaving = _owned("VirtualMachine", "web", "the-vm-before")  # the VM was made anew
    leaving["metadata"]["deletionTimestamp"] = "2026-12-04T10:00:00Z"
    assert someone_elses(REF.uid, box_vm, leaving) is None
    assert someone_elses(REF.uid, None, None) is None
    assert someone_elses(REF.uid, None, box_vmi) is None  # the box's old VM being deleted
    for vm, vmi in [
        ({"metadata": {"name": "web"}}, None),  # a plain VM
        (_owned("LazyBox", "web", "another-box-uid"), None),  # a box deleted and made anew
        (_owned("LazyBox", "web", REF.uid, controller=False), None),  # a plain reference
        (None, {"metadata": {"name": "web"}}),  # a standalone VMI
        (box_vm, _owned("ReplicaSet", "web", "vm-uid")),
        # a VMI of their own naming the box's VM in an owner reference, but not its uid
        (box_vm, _owned("VirtualMachine", "web", "forged-uid")),
    ]:
        why = someone_elses(REF.uid, vm, vmi)
        assert why is not None
        decision = plan_box(inp(observed=Observed(someone_elses=why)), NOW)
        assert decision.vm is None
        assert not decision.restart
        assert decision.placement is None
        assert not decision.uses
        assert decision.status["phase"] == "Failed"
        assert decision.event is not None
        assert decision.event[1] == "VMNameTaken"
        assert decision.status["composedBoots"] == []  # nothing gtvp composed runs there
    assert plan_box(inp(), NOW).vm is not None


def test_a_box_armed_after_a_hot_plug_is_recomposed_onto_pinned_disks() -> None:
    """A box got a hot-plugged component (no Secrets named, boxes not attested); then it
    names Secrets, or the policy starts attesting boxes: the disk its init neither checks
    nor measures is recomposed into its boot disks, the VMI restarted onto them, and the
    hot-plugged composition no longer vouched for."""
    curl = parse_component(PUB.component("curl", "8.0.0", requires=["libc"]))
    spec = {**SPEC, "onMissingDependency": "HotPlug", "requestedComponents": [{"name": "curl"}]}
    checks = {**OK, curl.object_name: Check("Verified", "SignatureValid", "")}
    comps = [*COMPS, curl]
    d = plan_box(inp(spec=spec, components=comps, checks=checks, observed=_running(COMPS)), NOW)
    assert d.vm is not None
    assert not d.restart  # hot-plugged
    status = recorded(d, NOW)
    hot = template_boots(d.vm)
    seen = replace(_running(COMPS), hotplugged=(curl.object_name,), vm_boots=hot, vmi_boots=hot)
    same = plan_box(inp(spec=spec, components=comps, checks=checks, observed=seen,
                        status=status), NOW)  # fmt: skip
    assert (same.vm, same.restart) == (None, False)  # not armed: it stays as it is
    armed = plan_box(inp(spec=spec, components=comps, checks=checks, observed=seen,
                         status=status, armed=True), NOW)  # fmt: skip
    assert armed.vm is not None
    assert armed.restart
    assert armed.forget_boots
    assert "c-curl" in {
        d["name"] for d in armed.vm["spec"]["template"]["spec"]["domain"]["devices"]["disks"]
    }
    assert not armed.vm["spec"].get("dataVolumeTemplates")
    assert not runs_composition(recorded(armed, NOW), hot, None)


def _view_of(objs: list[dict[str, Any]], checks: dict[str, Check]) -> Any:
    """A runtime whose loaded view holds these OSComponents with these checks."""
    from gtvp.runtime import OperatorSettings, Runtime

    rt = Runtime(settings=OperatorSettings(), clients=cast(Any, None))
    for o in objs:
        rt.view.observe_component(copy.deepcopy(o), "ADDED")
    rt.boxes.checks.update(checks)
    rt.view.loaded = True
    return rt


def test_only_a_component_in_the_role_it_is_booted_in_vouches_for_an_image() -> None:
    """An application publisher (scoped to `myapp`) publishes an application whose image is
    the kernel's; the kernel's own component is then revoked, or deleted: the kernel the
    box boots is no longer vouched for, whatever else carries its digest. Another registry's
    reference to the same digest, in the same role, still is."""
    from gtvp.handlers import lazyboxes

    kernel = next(c for c in COMPS if c.type == "kernel")
    kobj = next(o for o in OBJS if o["metadata"]["name"] == kernel.object_name)
    squat = copy.deepcopy(kobj)
    squat["metadata"]["name"] = "myapp-1-0"
    squat["spec"].update(componentName="myapp", type="application", provides=[])
    ok = Check("Verified", "SignatureValid", "")
    part = ("kernel", kernel.digest)
    assert compose_vouches(kernel, part)
    assert not compose_vouches(parse_component(squat), part)
    revoked = Check("Failed", "UnknownPublisher", "key removed")
    rt = _view_of([kobj, squat], {kernel.object_name: revoked, "myapp-1-0": ok})
    assert "UnknownPublisher" in lazyboxes.unvouched(rt, [part])[part]
    rt = _view_of([squat], {"myapp-1-0": ok})  # the kernel's object deleted
    assert "deleted" in lazyboxes.unvouched(rt, [part])[part]
    # nor does an application of the rootfs's digest and a name of the same 20 characters
    root = next(c for c in COMPS if c.type == "rootfs")
    rootobj = next(o for o in OBJS if o["metadata"]["name"] == root.object_name)
    tools = copy.deepcopy(rootobj)
    tools["metadata"]["name"] = "tools-1-0"
    tools["spec"].update(componentName=root.name + "-tools", type="application", provides=[])
    assert not compose_vouches(parse_component(tools), _part(root))
    assert compose_vouches(root, _part(root))
    assert _part(root) in vm_parts(compose_vm(REF, SPEC, COMPS, "node-2"))
    mirrored = copy.deepcopy(kobj)
    mirrored["spec"]["image"] = "mirror.corp.example/linux@" + kernel.digest
    rt = _view_of([mirrored], {kernel.object_name: ok})
    assert lazyboxes.unvouched(rt, [part]) == {}
    unchecked = _view_of([kobj], {})
    assert lazyboxes.unvouched(unchecked, [part]) == {}  # not checked yet: it waits
    unchecked.view.loaded = False
    assert lazyboxes.unvouched(_view_of([], {}), [part]) != {}
    assert lazyboxes.unvouched(unchecked, [part]) == {}


def test_a_record_of_an_older_gtvp_is_translated_not_restarted() -> None:
    """A box recorded before 2026-12-05 (its `composedBoots` without the gate): the record is
    translated for its VM and for a LiveUpdate VMI still on an older composition, both gated
    at the box's level, so neither is restarted nor refused its Secrets; an ungated VMI's
    old record is not made the new one's."""
    from gtvp.core.compose import legacy_boot, translate_legacy

    vm = compose_vm(REF, SPEC, COMPS, "node-2")
    old_vm = compose_vm(REF, SPEC, ON_OLD_NGINX, "node-2")
    tmpl, old_tmpl = vm["spec"]["template"], old_vm["spec"]["template"]
    legacy = {
        "composedBoots": [legacy_boot(tmpl["spec"], tmpl["metadata"]["annotations"]),
                          legacy_boot(old_tmpl["spec"], old_tmpl["metadata"]["annotations"])],
        "composedAt": "2026-11-29T11:00:00Z",
    }  # fmt: skip
    vmi = {"metadata": old_tmpl["metadata"], "spec": old_tmpl["spec"]}
    got = translate_legacy(legacy, 2, tmpl, vmi)
    assert got["composedBoots"] == [template_boots(vm), template_boots(old_vm)]
    seen, _ = _live_update_waiting()
    d = plan_box(inp(spec={**SPEC, "upgradePolicy": "LiveUpdate"}, observed=seen, status=got), NOW)
    assert (d.vm, d.restart) == (None, False)
    ungated = {"metadata": {**old_tmpl["metadata"], "labels": {}}, "spec": old_tmpl["spec"]}
    assert (
        translate_legacy(legacy, 2, tmpl, ungated)["composedBoots"][1]
        == (legacy["composedBoots"][1])
    )


def test_a_raised_level_recomposes_the_box_under_its_new_selector() -> None:
    """`spec.level` raised from 2 to 3 while the resolution stays: the VM is written anew
    with the level-3 trust selector and the VMI restarted onto a member of that level (else
    it ran on at level 2 and key release refused it for good)."""
    seen = _running(COMPS)  # composed at level 2
    status = {"composedBoots": [boots(COMPS)], "composedAt": "2026-11-29T11:00:00Z"}
    d = plan_box(inp(spec={**SPEC, "level": 3}, observed=seen, status=status), NOW)
    assert d.vm is not None
    assert d.vm["spec"]["template"]["spec"]["nodeSelector"] == trust_selector(3)
    assert d.restart
    assert d.forget_boots


def test_a_box_composed_anew_from_the_same_components_says_why_not_x_to_x() -> None:
    seen = _running(COMPS)
    status = {"composedBoots": [boots(COMPS)], "resolved": [
        {"name": c.name, "version": str(c.version)} for c in COMPS]}  # fmt: skip
    d = plan_box(inp(spec={**SPEC, "level": 3}, observed=seen, status=status), NOW)
    assert d.event is not None
    assert " -> " not in d.event[2]
    assert "composed anew" in d.event[2]


def test_a_check_that_concluded_nothing_does_not_restart_running_boxes() -> None:
    """A component that kept changing while it was checked (`Changing`, as a contended
    maxUses spend leaves it) is used for nothing new, but takes nothing back from boxes
    running it: neither the booted one nor the image is treated as revoked."""
    from gtvp.handlers import lazyboxes

    app = next(c for c in COMPS if c.type == "application")
    undecided = {**OK, app.object_name: Check("Failed", "Changing", "kept changing")}
    status = {"composedBoots": [boots(COMPS)], "composedAt": "2026-11-29T11:00:00Z"}
    d = plan_box(inp(checks=undecided, observed=_running(COMPS), status=status), NOW)
    assert (d.vm, d.restart) == (None, False)
    assert d.status["composedBoots"] == status["composedBoots"]
    aobj = next(o for o in OBJS if o["metadata"]["name"] == app.object_name)
    rt = _view_of([aobj], {app.object_name: undecided[app.object_name]})
    assert lazyboxes.unvouched(rt, [_part(app)]) == {}


def test_a_box_with_a_separate_initrd_component_is_not_composed() -> None:
    """An `initrd`-type component would be attached as a disk the box init never checks
    (only layers are pinned on `gtvp.disks=`), read by the guest, unseen by key release's
    consent and the box's vTPM: the box is refused (NotBootable), saying why, and keeps
    the composition that runs. Any publisher may sign one (scope names no initrd slot).
    Found by a review."""
    extra = parse_component(PUB.component("extra-initrd", "1.0.0", "initrd"))
    with pytest.raises(CompositionError, match="extra-initrd of type initrd"):
        compose_vm(REF, SPEC, [*COMPS, extra], "node-2")
    checks = {**OK, extra.object_name: Check("Verified", "SignatureValid", "")}
    status = {"composedBoots": [boots(COMPS)]}
    spec = {**SPEC, "upgradePolicy": "Restart"}
    d = plan_box(
        inp(spec=spec, components=[*COMPS, extra], checks=checks, observed=_running(COMPS),
            status=status),
        NOW,
    )  # fmt: skip
    assert (d.vm, d.restart, d.status["phase"]) == (None, False, "Failed")
    assert "never attached" in d.status["message"]
    assert d.status["composedBoots"] == [boots(COMPS)]


def test_a_box_already_running_a_separate_initrd_component_is_no_longer_vouched_for() -> None:
    """A box composed before such compositions were refused boots an initrd-type disk that
    nothing checks: that composition is no longer vouched for (key release and box
    attestation refuse it: NotComposed), and the box cannot be composed again with it.
    Found by a review of the fix."""
    from gtvp.handlers import lazyboxes

    extra = PUB.component("extra-initrd", "1.0.0", "initrd")
    comp = parse_component(extra)
    rt = _view_of([*OBJS, extra], {**OK, comp.object_name: Check("Verified", "SignatureValid", "")})
    parts = [_part(c) for c in COMPS] + [_part(comp)]
    got = lazyboxes.unvouched(rt, parts)
    assert list(got) == [_part(comp)]
    assert "type initrd" in got[_part(comp)]
