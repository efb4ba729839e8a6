"""Thin access to the API server for the operator: clients, status patches, events.

Everything here is I/O with no decisions in it. The kubernetes client is synchronous; the
async handlers call it through `asyncio.to_thread`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes import client, config

from gtvp.event_recorder import EventRecorder, ObjectRef

log = logging.getLogger("gtvp.kube")

GROUP, VERSION = "gtvp.io", "v1alpha1"


@dataclass
class Clients:
    api: client.ApiClient
    custom: client.CustomObjectsApi
    core: client.CoreV1Api


# Concurrent API calls: the handlers call the (blocking) client through asyncio.to_thread,
# so the event loop's default executor and the client's connection pool are sized together
# (Python's default executor has cpu+4 threads: at 10,000 members the status writes queued
# behind six of them while the API server had room for more).
API_THREADS = 32


def make_clients(kubeconfig: str | None = None) -> Clients:
    path = kubeconfig or os.environ.get("KUBECONFIG")
    cfg = client.Configuration()
    if path:
        config.load_kube_config(config_file=path, client_configuration=cfg)
    else:
        config.load_incluster_config(client_configuration=cfg)
    cfg.connection_pool_maxsize = API_THREADS
    api = client.ApiClient(cfg)
    return Clients(api, client.CustomObjectsApi(api), client.CoreV1Api(api))


def merge_patch_for(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON merge patch turning `old` into `new` (keys gone from `new` become null)."""
    patch: dict[str, Any] = {}
    for k, v in new.items():
        o = old.get(k)
        if isinstance(v, Mapping) and isinstance(o, Mapping):
            sub = merge_patch_for(o, v)
            if sub:
                patch[k] = sub
        elif v != o:
            patch[k] = v
    for k in old:
        if k not in new:
            patch[k] = None
    return patch


def list_all(c: Clients, group: str, version: str, plural: str) -> list[dict[str, Any]]:
    """Every object of a cluster-wide or namespaced custom resource; [] if the API lacks it."""
    try:
        got = c.custom.list_cluster_custom_object(group, version, plural)
    except client.exceptions.ApiException as exc:
        if exc.status == 404:  # the CRD is not installed (e.g. KubeVirt not yet there)
            return []
        raise
    items: list[dict[str, Any]] = got.get("items") or []
    kind = str(got.get("kind", "")).removesuffix("List")
    for item in items:  # a list's items carry no apiVersion/kind; the handlers expect them
        item.setdefault("apiVersion", f"{group}/{version}")
        item.setdefault("kind", kind)
    return items


def patch_member_status(c: Clients, name: str, status_patch: Mapping[str, Any]) -> Any:
    return c.custom.patch_cluster_custom_object_status(
        GROUP, VERSION, "members", name, {"status": dict(status_patch)}
    )


def delete_member(c: Clients, name: str) -> None:
    """Delete a Member; one already gone is fine."""
    try:
        c.custom.delete_cluster_custom_object("gtvp.io", "v1alpha1", "members", name)
    except client.exceptions.ApiException as exc:
        if exc.status != 404:
            raise


def patch_policy_status(c: Clients, name: str, status_patch: Mapping[str, Any]) -> Any:
    return c.custom.patch_cluster_custom_object_status(
        GROUP, VERSION, "securitypolicies", name, {"status": dict(status_patch)}
    )


EVENTS = EventRecorder(component="gtvp-operator")
"""The operator's Events: a repeat of a recent Event counts on it instead of adding one."""


def post_event(
    c: Clients,
    *,
    kind: str,
    name: str,
    uid: str,
    namespace: str | None,
    type_: str,
    reason: str,
    message: str,
    api_version: str = f"{GROUP}/{VERSION}",
) -> None:
    """Record a core/v1 Event about an object (cluster-scoped ones go to `default`);
    `api_version` is the object's: gtvp's own kinds unless told (e.g. `kubevirt.io/v1`).

    A repeat (same object, type, reason and message within 10 minutes) increments the
    existing Event's count and lastTimestamp, as client-go's recorder does.
    """
    obj = ObjectRef(api_version, kind, name, uid, namespace)
    try:
        EVENTS.record(c.core, obj, type_=type_, reason=reason, message=message)
    except client.exceptions.ApiException as exc:  # events are best effort
        log.warning("could not record event %s on %s/%s: %s", reason, kind, name, exc.reason)
