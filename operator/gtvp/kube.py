"""Thin access to the API server for the operator: clients, status patches, events.

Everything here is I/O with no decisions in it. The kubernetes client is synchronous; the
async handlers call it through `asyncio.to_thread`.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes import client, config

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
) -> None:
    """Record a core/v1 Event about an object (cluster-scoped ones go to `default`)."""
    now = dt.datetime.now(dt.UTC)
    ns = namespace or "default"
    body = client.CoreV1Event(
        metadata=client.V1ObjectMeta(generate_name=f"{name}.", namespace=ns),
        involved_object=client.V1ObjectReference(
            api_version=f"{GROUP}/{VERSION}",
            kind=kind,
            name=name,
            uid=uid,
            namespace=namespace,
        ),
        type=type_,
        reason=reason,
        message=message[:1024],
        source=client.V1EventSource(component="gtvp-operator"),
        first_timestamp=now,
        last_timestamp=now,
        count=1,
    )
    try:
        c.core.create_namespaced_event(ns, body)
    except client.exceptions.ApiException as exc:  # events are best effort
        log.warning("could not record event %s on %s/%s: %s", reason, kind, name, exc.reason)
