"""Nodes and their Members: the Node carries its Member's verdict (labels and taint), every
Node gets a Member, and the Member the operator made for a Node leaves with it."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Mapping
from typing import Any

from kubernetes.client.exceptions import ApiException

from gtvp import kube
from gtvp.core.api_resources import GTVP_API_VERSION, MEMBERS
from gtvp.core.phases import MemberPhase
from gtvp.core.trust import TAINT_KEY, label_level, node_boot_id, node_patch
from gtvp.runtime import Runtime

log = logging.getLogger("gtvp.members")

NODE_MEMBER_LABEL = "gtvp.io/node-member"
"""On the Members the operator created for a Node: they leave with their Node."""


NODE_WRITE_ATTEMPTS = 3


async def sync_node(
    rt: Runtime, name: str, status_override: Mapping[str, Any] | None = None
) -> bool:
    """Bring the Node's gtvp labels and taint in line with its Member's verdict (or with
    `status_override`: a verdict the operator reached but could not write). Only the
    replica holding the member's shard writes its Node, and only over the Node it read (the
    patch carries that resourceVersion): a patch that waited while another replica took
    the shard and tainted the Node does not put trust labels back, and one built from a
    view without an administrator's new taint does not erase it (the taint list is
    replaced whole). On a conflict the Node is read again and the patch made again, while
    this replica still holds the shard; a patch that takes trust away is written without
    the precondition at its last attempt (whoever rewrites the Node without pause, such as
    root on the host with a token that may patch Nodes, cannot keep it trusted). False
    when the patch failed (the Node is not in line; the caller looks again)."""
    for attempt in range(NODE_WRITE_ATTEMPTS):
        node = rt.view.nodes.get(name)
        body = rt.view.member_body(name)  # a verdict reached but not stored included
        if node is None or not rt.coordination.holds(name):
            return True
        if status_override is not None:
            body = {**(body or {}), "status": status_override}
        status = (body or {}).get("status") or {}
        meta = node.get("metadata") or {}
        patch = _trust_patch(node, status)
        if patch is None:
            return True
        last = attempt == NODE_WRITE_ATTEMPTS - 1
        if meta.get("resourceVersion") and not (last and _takes_trust_away(patch)):
            patch = {**patch, "metadata": {**patch.get("metadata", {}),
                                           "resourceVersion": meta["resourceVersion"]}}  # fmt: skip
        try:
            result = await asyncio.to_thread(
                rt.clients.core.patch_node, name, patch, field_manager=rt.clients.field_manager
            )
        except ApiException as exc:
            if exc.status != 409:
                log.warning("could not update node %s: %s %s", name, exc.status, exc.reason)
                return False
            log.info("node %s changed since it was read: read again", name)
            await asyncio.to_thread(_read_again, rt, name)
            continue
        rt.view.observe_node(rt.clients.api.sanitize_for_serialization(result), "MODIFIED")
        log.info("node %s: %s", name, _what_changed(status, node_boot_id(node)))
        return True
    return False


def says_more(rt: Runtime, name: str, status: Mapping[str, Any]) -> bool:
    """Whether the Node (as this replica sees it) carries trust `status` does not give: a
    trust label it must lose, or not the untrusted taint it must have."""
    node = rt.view.nodes.get(name)
    if node is None:
        return False
    patch = _trust_patch(node, status)
    return patch is not None and _takes_trust_away(patch)


def _trust_patch(node: Mapping[str, Any], status: Mapping[str, Any]) -> dict[str, Any] | None:
    """The patch bringing `node`'s gtvp labels and taint in line with a Member `status`
    (none: no verdict, untrusted); None when they are."""
    return node_patch(
        (node.get("metadata") or {}).get("labels") or {},
        (node.get("spec") or {}).get("taints") or [],
        str(status.get("phase", "")),
        label_level(status, node_boot_id(node), now=dt.datetime.now(dt.UTC)),
    )


def _takes_trust_away(patch: Mapping[str, Any]) -> bool:
    """Whether a Node patch removes a trust label or adds gtvp's untrusted taint."""
    labels = (patch.get("metadata") or {}).get("labels") or {}
    taints = (patch.get("spec") or {}).get("taints") or []
    return any(v is None for v in labels.values()) or any(t.get("key") == TAINT_KEY for t in taints)


def _read_again(rt: Runtime, name: str) -> None:
    """The Node as the server holds it now, into the view (gone: out of it)."""
    try:
        got = rt.clients.core.read_node(name)
    except ApiException as exc:
        if exc.status == 404:
            rt.view.observe_node({"metadata": {"name": name}}, "DELETED")
        else:
            log.warning("could not read node %s: %s %s", name, exc.status, exc.reason)
        return
    rt.view.observe_node(rt.clients.api.sanitize_for_serialization(got), "MODIFIED")


def _what_changed(status: Mapping[str, Any], boot_id: str | None) -> str:
    if status.get("phase") != MemberPhase.TRUSTED:
        return "trust labels removed, tainted gtvp.io/untrusted:NoSchedule"
    if label_level(status, boot_id, now=dt.datetime.now(dt.UTC)) == 0:
        return "trust labels removed until a fresh quote verifies (verdict spent or expired)"
    return "trusted labels set"


async def ensure_member(rt: Runtime, name: str) -> None:
    """Every Node is a member: create its Member (identity from --default-identity); by the
    replica holding the name's shard (the others would only meet AlreadyExists)."""
    if not rt.coordination.holds(name):
        return
    identity = rt.settings.default_identity
    body = {
        "apiVersion": GTVP_API_VERSION,
        "kind": MEMBERS.kind,
        "metadata": {"name": name, "labels": {NODE_MEMBER_LABEL: "true"}},
        "spec": {"identity": identity},
    }
    try:
        if await asyncio.to_thread(kube.create_unless_present, rt.clients, MEMBERS, body):
            log.info("node %s joined: Member created (identity %d)", name, identity)
    except ApiException as exc:
        log.warning("could not create Member %s: %s %s", name, exc.status, exc.reason)


async def forget_node(rt: Runtime, name: str) -> None:
    """A Node was deleted: the Member the operator made for it goes too (no orphan left
    counted, listed or offered as a target) unless it pins an EK or carries an
    administrator's approval: deleting it would let a host that comes back under this name
    enrol another TPM. Such a Member (and one an administrator created) stays, with a
    Warning saying why and what to do when the host is decommissioned."""
    body = rt.view.members.get(name)
    if body is None or not rt.coordination.holds(name):
        return
    reason = _why_kept(body)
    if reason is None:
        await asyncio.to_thread(kube.delete_member, rt.clients, name)
        log.info("node %s left: its Member was deleted", name)
        return
    message = (
        f"Node {name} was deleted; this Member is kept: {reason}. A host that joins as "
        f"{name} must present the same TPM; delete the Member when the host is decommissioned"
    )
    log.warning("%s", message)
    await asyncio.to_thread(
        kube.post_object_event,
        rt.clients,
        MEMBERS,
        body,
        type_="Warning",
        reason="NodeGone",
        message=message,
    )


def _why_kept(body: Mapping[str, Any]) -> str | None:
    """Why a Member must outlive its Node (None: it may go with it)."""
    meta = body.get("metadata") or {}
    if (meta.get("labels") or {}).get(NODE_MEMBER_LABEL) != "true":
        return "an administrator created it"
    if (body.get("spec") or {}).get("approval"):
        return "it carries an administrator's EK approval"
    ek = (((body.get("status") or {}).get("trust") or {}).get("ekSHA256")) or ""
    if ek:
        return f"it pins EK {str(ek)[:16]}…"
    return None
