"""Thin access to the API server for the operator: clients, status patches, events.

Everything here is I/O with no decisions in it. The kubernetes client is synchronous; the
async handlers call it through `asyncio.to_thread`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubernetes import client, config

from gtvp.core import launchers
from gtvp.core.api_resources import GTVP_API_VERSION, MEMBERS, SECURITY_POLICIES, ApiResource
from gtvp.event_recorder import EventRecorder, ObjectRef

log = logging.getLogger("gtvp.kube")


@dataclass
class Clients:
    api: client.ApiClient
    custom: client.CustomObjectsApi
    core: client.CoreV1Api
    coordination: client.CoordinationV1Api
    field_manager: str = "gtvp-operator"
    """Named in managedFields of what this process writes (one per replica)."""


# Concurrent API calls: the handlers call the (blocking) client through asyncio.to_thread,
# so the event loop's default executor and the client's connection pool are sized together
# (Python's default executor has cpu+4 threads: at 10,000 members the status writes queued
# behind six of them while the API server had room for more).
API_THREADS = 32
API_TIMEOUT = (10.0, 60.0)
"""Seconds to connect, and to wait for each read of an answer, on every API call that names
no timeout of its own: a call the API server never answers (a network partition, a
half-open connection after it restarted) fails instead of holding its thread, and with it
a handler or an HTTPS connection of the endpoints, forever."""


def _with_default_timeout(api: client.ApiClient, timeout: tuple[float, float]) -> None:
    """Every request of `api` that names no `_request_timeout` gets `timeout`."""
    rest = api.rest_client
    request = rest.request

    def bounded(*args: Any, _request_timeout: Any = None, **kwargs: Any) -> Any:
        return request(*args, _request_timeout=_request_timeout or timeout, **kwargs)

    rest.request = bounded


def make_clients(kubeconfig: str | None = None, *, field_manager: str = "gtvp-operator") -> Clients:
    path = kubeconfig or os.environ.get("KUBECONFIG")
    cfg = client.Configuration()
    if path:
        config.load_kube_config(config_file=path, client_configuration=cfg)
    else:
        config.load_incluster_config(client_configuration=cfg)
    cfg.connection_pool_maxsize = API_THREADS
    api = client.ApiClient(cfg)
    _with_default_timeout(api, API_TIMEOUT)
    return Clients(
        api,
        client.CustomObjectsApi(api),
        client.CoreV1Api(api),
        client.CoordinationV1Api(api),
        field_manager,
    )


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


def guarded_json_patch(
    old: Mapping[str, Any],
    new: Mapping[str, Any],
    prefix: str,
    tested: Sequence[Sequence[str]],
) -> list[dict[str, Any]]:
    """A JSON Patch (RFC 6902) turning the keys of `old` under `prefix` into `new`, first
    testing the values `old` holds at the `tested` paths (the patch fails, 422, when the
    server holds another value there): a write conditional on the values it was decided on,
    not on the whole object's resourceVersion. Only integers and plain ASCII strings are
    tested: kube-apiserver compares a test's strings byte for byte as JSON, and Go escapes
    `<`, `>` and `&` where this client sends them as they are (and the other way round for
    non-ASCII), so free text (a message) would never match."""
    ops: list[dict[str, Any]] = []
    for path in tested:
        value: Any = old
        for part in path:
            value = value.get(part) if isinstance(value, Mapping) else None
        if _comparable(value):
            ops.append({"op": "test", "path": _pointer(prefix, *path), "value": value})
    for k in sorted(set(old) | set(new)):
        if k not in new:
            ops.append({"op": "remove", "path": _pointer(prefix, k)})
        elif k not in old or old[k] != new[k]:
            op = "add" if k not in old else "replace"
            ops.append({"op": op, "path": _pointer(prefix, k), "value": new[k]})
    return ops


def _comparable(value: Any) -> bool:
    """A value this client and kube-apiserver encode to the same JSON bytes (an integer, or
    printable ASCII without the characters Go escapes and Python does not)."""
    if isinstance(value, bool) or value is None:
        return False
    if isinstance(value, int):
        return True
    if not isinstance(value, str):
        return False
    return value.isascii() and value.isprintable() and not set(value) & set('<>&\\"')


def _pointer(prefix: str, *parts: str) -> str:
    return prefix + "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in parts)


def list_all(c: Clients, res: ApiResource, *, missing_ok: bool = True) -> list[dict[str, Any]]:
    """Every object of a cluster-wide or namespaced custom resource; [] if the API lacks it
    (`missing_ok`; else the 404 is raised: for gtvp's own kinds, whose absence from a list
    would be read as every object deleted, e.g. an API server whose CRDs are not synced)."""
    try:
        got = c.custom.list_cluster_custom_object(*res.coordinates)
    except client.exceptions.ApiException as exc:
        if exc.status == 404 and missing_ok:  # the CRD is not installed (KubeVirt not yet)
            return []
        raise
    items: list[dict[str, Any]] = got.get("items") or []
    kind = str(got.get("kind", "")).removesuffix("List")
    for item in items:  # a list's items carry no apiVersion/kind; the handlers expect them
        item.setdefault("apiVersion", res.api_version)
        item.setdefault("kind", kind)
    return items


def list_nodes(c: Clients) -> list[dict[str, Any]]:
    """Every Node, as the plain dicts a watch delivers (camelCase keys)."""
    return _plain_items(c, c.core.list_node())


def list_launcher_pods(c: Clients) -> list[dict[str, Any]]:
    """Every KubeVirt virt-launcher pod (by its label), as the plain dicts a watch delivers."""
    return _plain_items(c, c.core.list_pod_for_all_namespaces(label_selector=launchers.SELECTOR))


def list_launcher_pods_of(c: Clients, namespace: str, vmi_uid: str) -> list[dict[str, Any]]:
    """The virt-launcher pods KubeVirt made for the VMI of `vmi_uid` (by their labels), as
    a watch delivers them."""
    selector = f"{launchers.SELECTOR},{launchers.CREATED_BY_LABEL}={vmi_uid}"
    return _plain_items(c, c.core.list_namespaced_pod(namespace, label_selector=selector))


def _plain_items(c: Clients, listed: Any) -> list[dict[str, Any]]:
    """The items of a typed list, as the plain dicts a watch delivers (camelCase keys)."""
    got = c.api.sanitize_for_serialization(listed)
    items: list[dict[str, Any]] = got.get("items") or []
    return items


def _where(res: ApiResource, namespace: str | None) -> tuple[str, ...]:
    """The leading positional arguments of the custom-objects API for `res`."""
    if res.namespaced:
        return (res.group, res.version, namespace or "", res.plural)
    return (res.group, res.version, res.plural)


def _call(
    c: Clients, verb: str, res: ApiResource, namespace: str | None, *args: Any, **kwargs: Any
) -> Any:
    """`c.custom.<verb>_{namespaced|cluster}_custom_object[_status](...)` for `res`
    (`verb` "patch_status" patches the status subresource); writes name this process's
    field manager (managedFields tell which replica wrote what)."""
    scope = "namespaced" if res.namespaced else "cluster"
    verb, _, sub = verb.partition("_")
    method = getattr(c.custom, f"{verb}_{scope}_custom_object" + (f"_{sub}" if sub else ""))
    if verb in ("create", "patch", "replace"):
        return method(*_where(res, namespace), *args, field_manager=c.field_manager, **kwargs)
    return method(*_where(res, namespace), *args, **kwargs)


def _namespace_and_name(body: Mapping[str, Any]) -> tuple[str | None, str]:
    meta = body.get("metadata") or {}
    return meta.get("namespace"), str(meta.get("name", ""))


def get_if_present(
    c: Clients, res: ApiResource, name: str, namespace: str | None = None
) -> dict[str, Any] | None:
    """The object, or None when it does not exist (404)."""
    try:
        got: dict[str, Any] = _call(c, "get", res, namespace, name)
    except client.exceptions.ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return got


def create_unless_present(c: Clients, res: ApiResource, body: Mapping[str, Any]) -> bool:
    """Create the object; False when one of that name exists already (409), left as it is."""
    namespace, _ = _namespace_and_name(body)
    try:
        _call(c, "create", res, namespace, dict(body))
    except client.exceptions.ApiException as exc:
        if exc.status == 409:
            return False
        raise
    return True


class NotOurs(Exception):
    """`create_or_replace` found an object of that name that is not the caller's."""

    def __init__(self, found: dict[str, Any]) -> None:
        super().__init__("an object of that name exists that is not ours")
        self.found = found


def create_or_replace(
    c: Clients,
    res: ApiResource,
    body: dict[str, Any],
    *,
    resource_version: str | None = None,
    ours: Callable[[Mapping[str, Any]], bool] | None = None,
) -> dict[str, Any]:
    """Create the object, or replace the one of that name.

    `resource_version` is that of the version the caller knows (None: it knows none, so
    creating comes first). A conflict (409: it exists, or changed since) reads the object
    again and replaces that version, once — only if `ours` says it is the caller's (else
    `NotOurs`, carrying what was found: someone else's object made meanwhile).
    """
    namespace, name = _namespace_and_name(body)

    def read() -> str:
        found: dict[str, Any] = _call(c, "get", res, namespace, name)
        if ours is not None and not ours(found):
            raise NotOurs(found)
        return str(found["metadata"]["resourceVersion"])

    if resource_version is None:
        try:
            created: dict[str, Any] = _call(c, "create", res, namespace, body)
        except client.exceptions.ApiException as exc:
            if exc.status != 409:
                raise
        else:
            return created
        resource_version = read()
    body["metadata"]["resourceVersion"] = resource_version
    try:
        replaced: dict[str, Any] = _call(c, "replace", res, namespace, name, body)
    except client.exceptions.ApiException as exc:
        if exc.status != 409:
            raise
        body["metadata"]["resourceVersion"] = read()
        replaced = _call(c, "replace", res, namespace, name, body)
    return replaced


def delete_if_present(
    c: Clients, res: ApiResource, name: str, namespace: str | None = None
) -> bool:
    """Delete the object; False when it was already gone (404)."""
    try:
        _call(c, "delete", res, namespace, name)
    except client.exceptions.ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


def delete_unchanged(
    c: Clients, res: ApiResource, body: Mapping[str, Any], *, any_version: bool = False
) -> bool:
    """Delete the object only while it is the version `body` is (uid and resourceVersion
    preconditions; `any_version`: the uid alone, for an object whose owner could keep
    changing it to dodge the delete); False when it is gone (404) or has changed since
    (409), or when `body` carries no uid and resourceVersion (not read from the server):
    the caller decided on that version, and judges the new one on its next pass."""
    namespace, name = _namespace_and_name(body)
    meta = body.get("metadata") or {}
    if not meta.get("uid") or not meta.get("resourceVersion"):
        return False  # not a copy the server gave: nothing to make the delete conditional on
    version = None if any_version else meta.get("resourceVersion")
    options = client.V1DeleteOptions(
        preconditions=client.V1Preconditions(uid=meta.get("uid"), resource_version=version)
    )
    try:
        _call(c, "delete", res, namespace, name, body=options)
    except client.exceptions.ApiException as exc:
        if exc.status in (404, 409):
            return False
        raise
    return True


def patch_status(
    c: Clients,
    res: ApiResource,
    name: str,
    status_patch: Mapping[str, Any],
    namespace: str | None = None,
    *,
    resource_version: str | None = None,
) -> Any:
    """Merge-patch the status subresource; returns the object as written. With
    `resource_version`, only if the object is still at that version (else 409 Conflict:
    optimistic concurrency, as a read-modify-write across replicas needs)."""
    body: dict[str, Any] = {"status": dict(status_patch)}
    if resource_version is not None:
        body["metadata"] = {"resourceVersion": resource_version}
    return _call(c, "patch_status", res, namespace, name, body)


def json_patch_status(
    c: Clients, res: ApiResource, name: str, ops: list[dict[str, Any]], namespace: str | None = None
) -> Any:
    """JSON-Patch (RFC 6902) the status subresource; a failed `test` is a 422
    (`is_failed_test`)."""
    return _call(
        c, "patch_status", res, namespace, name, ops, _content_type="application/json-patch+json"
    )


def is_failed_test(exc: BaseException) -> bool:
    """A JSON Patch the API server could not apply (HTTP 422): a `test` operation failed,
    or a path it names is not there. kube-apiserver says no more than "the server rejected
    our request due to an error in our request" for either, with no details, where a 422
    of schema validation names the object and its causes."""
    if not isinstance(exc, client.exceptions.ApiException) or exc.status != 422:
        return False
    try:
        details = json.loads(exc.body or "{}").get("details") or {}
    except (ValueError, AttributeError):
        return False
    return not details.get("causes") and not details.get("name")


def is_conflict(exc: BaseException) -> bool:
    """A write refused because the object changed since it was read (HTTP 409)."""
    return isinstance(exc, client.exceptions.ApiException) and exc.status == 409


def is_not_found(exc: BaseException) -> bool:
    """A request about an object that does not exist (HTTP 404)."""
    return isinstance(exc, client.exceptions.ApiException) and exc.status == 404


def patch_status_if_present(
    c: Clients,
    res: ApiResource,
    name: str,
    status_patch: Mapping[str, Any],
    namespace: str | None = None,
) -> dict[str, Any] | None:
    """`patch_status`; None when the object is gone (404)."""
    try:
        got: dict[str, Any] = patch_status(c, res, name, status_patch, namespace)
    except client.exceptions.ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return got


def patch_object(
    c: Clients, res: ApiResource, name: str, patch: Mapping[str, Any], namespace: str | None = None
) -> Any:
    """Merge-patch the object itself (not its status)."""
    return _call(c, "patch", res, namespace, name, dict(patch))


def patch_member_status(
    c: Clients,
    name: str,
    status_patch: Mapping[str, Any],
    *,
    resource_version: str | None = None,
) -> Any:
    """`patch_status` of a Member (with `resource_version`: 409 if it changed since)."""
    return patch_status(c, MEMBERS, name, status_patch, resource_version=resource_version)


def delete_member(c: Clients, name: str) -> None:
    """Delete a Member; one already gone is fine."""
    delete_if_present(c, MEMBERS, name)


def patch_policy_status(c: Clients, name: str, status_patch: Mapping[str, Any]) -> Any:
    return patch_status(c, SECURITY_POLICIES, name, status_patch)


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
    api_version: str = GTVP_API_VERSION,
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


def post_object_event(
    c: Clients,
    res: ApiResource,
    body: Mapping[str, Any],
    *,
    type_: str,
    reason: str,
    message: str,
    name: str | None = None,
    namespace: str | None = None,
) -> None:
    """`post_event` about an object of `res`: kind and apiVersion from `res`, the uid from
    `body` (the view's latest copy; empty when unknown), name and namespace from the body
    unless given (cluster-scoped objects' Events go to `default`)."""
    meta = body.get("metadata") or {}
    post_event(
        c,
        kind=res.kind,
        name=name or str(meta.get("name", "")),
        uid=str(meta.get("uid", "")),
        namespace=(namespace or meta.get("namespace")) if res.namespaced else None,
        type_=type_,
        reason=reason,
        message=message,
        api_version=res.api_version,
    )


# ----- Leases (coordination.k8s.io/v1): the replicas' presence, shards and leadership -------
LEASE_LABEL = "gtvp.io/lease"
LEASE_TIMEOUT = (5.0, 10.0)
"""Seconds to connect and per read for the Lease calls: well under a lease duration, so a
call stuck on a dead connection is retried within the renew deadline, not after a minute."""


def list_leases(c: Clients, namespace: str) -> list[dict[str, Any]]:
    """gtvp's Leases in `namespace`, as plain dicts (camelCase keys)."""
    got = c.api.sanitize_for_serialization(
        c.coordination.list_namespaced_lease(
            namespace, label_selector=LEASE_LABEL, _request_timeout=LEASE_TIMEOUT
        )
    )
    items: list[dict[str, Any]] = got.get("items") or []
    return items


def create_lease(c: Clients, namespace: str, body: Mapping[str, Any]) -> dict[str, Any] | None:
    """Create a Lease; None when one of that name exists already (409)."""
    try:
        got = c.coordination.create_namespaced_lease(
            namespace, dict(body), field_manager=c.field_manager, _request_timeout=LEASE_TIMEOUT
        )
    except client.exceptions.ApiException as exc:
        if exc.status == 409:
            return None
        raise
    out: dict[str, Any] = c.api.sanitize_for_serialization(got)
    return out


def replace_lease(c: Clients, namespace: str, body: Mapping[str, Any]) -> dict[str, Any] | None:
    """Replace a Lease at the resourceVersion in `body`; None when it changed meanwhile
    (409) or is gone (404): somebody else moved first."""
    name = str(body["metadata"]["name"])
    try:
        got = c.coordination.replace_namespaced_lease(
            name,
            namespace,
            dict(body),
            field_manager=c.field_manager,
            _request_timeout=LEASE_TIMEOUT,
        )
    except client.exceptions.ApiException as exc:
        if exc.status in (404, 409):
            return None
        raise
    out: dict[str, Any] = c.api.sanitize_for_serialization(got)
    return out


def delete_lease(c: Clients, namespace: str, name: str, resource_version: str) -> bool:
    """Delete a Lease if still at `resource_version`; False when gone or changed."""
    try:
        c.coordination.delete_namespaced_lease(
            name,
            namespace,
            body=client.V1DeleteOptions(
                preconditions=client.V1Preconditions(resource_version=resource_version)
            ),
            _request_timeout=LEASE_TIMEOUT,
        )
    except client.exceptions.ApiException as exc:
        if exc.status in (404, 409):
            return False
        raise
    return True
