"""`gtvp policy check`: can this version of gtvp run the pool under the live SecurityPolicy?

Reads the SecurityPolicy the operator would enforce (`--name`; with `--running`, also the
one the running operator enforces, when an upgrade changes `policyName`) or every one, and
judges it with this version's rules, as the operator of this version would on its start
(`gtvp.core.policy_upgrade`). One line per policy. Exit 0 when the pool loses no policy; 1
when it may run under one now and would run under none with this version (every member
Untrusted); 2 when the cluster cannot be read or the check fails (never taken for a pass).
`--operator NAMESPACE/NAME` reads the running operator's --policy from its Deployment. The
chart runs it as a pre-install/pre-upgrade/pre-rollback hook on the image about to run
(`upgradeCheck.enabled`), so that `helm upgrade` or `helm rollback` stops before such a
change. In a pod it uses the pod's service account; elsewhere `--kubeconfig` or
$KUBECONFIG.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from gtvp.core.api_resources import SECURITY_POLICIES
from gtvp.core.policy_upgrade import StoredPolicy, UpgradeJudgement, judge_upgrade

RETRY_FOR = 30.0
"""Seconds a read is tried again after a 403 (the hook's own access is made just before it
runs), a 429 or 5xx, or no answer; then the check fails (exit 2), never passes."""
RETRIED = frozenset({403, 429, 500, 502, 503, 504})


class Unreadable(Exception):
    """The cluster or the policy cannot be read (exit 2)."""


class NotServed(Exception):
    """The API server serves no SecurityPolicies (gtvp's CRDs are not installed)."""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `check` to `gtvp policy`'s sub-commands."""
    c = sub.add_parser(
        "check",
        help="tell whether this version of gtvp accepts the live SecurityPolicy (pre-upgrade)",
        description=(
            "Judge the cluster's SecurityPolicy (or every one) with this version's rules, as "
            "its operator would on start. Exit 1 when the pool may run under a policy now "
            "and would run under none with this version (every member Untrusted)."
        ),
    )
    c.add_argument(
        "--name", help="the SecurityPolicy this version would enforce (default: every one)"
    )
    c.add_argument(
        "--running",
        help="with --name: the SecurityPolicy the running operator enforces, when another",
    )
    c.add_argument(
        "--operator",
        metavar="NAMESPACE/NAME",
        help="with --name: read --running from this operator Deployment's --policy",
    )
    c.add_argument(
        "--install",
        action="store_true",
        help="a first install: SecurityPolicies not served yet (no CRDs) means none to lose",
    )
    c.add_argument("--kubeconfig", help="the cluster (default $KUBECONFIG, or in-cluster)")
    c.set_defaults(func=run_check)


def _read(call: Callable[[], Any], what: str) -> Any:
    """`call()`, tried again for RETRY_FOR seconds (RETRIED statuses, no answer); a 404
    raises NotServed (the caller tells a missing object from an unserved resource), any
    other failure Unreadable."""
    from kubernetes import client

    deadline = time.monotonic() + RETRY_FOR
    while True:
        try:
            return call()
        except client.exceptions.ApiException as exc:
            if exc.status == 404:
                raise NotServed(what) from exc
            if exc.status not in RETRIED or time.monotonic() >= deadline:
                raise Unreadable(f"cannot read {what}: {exc.status} {exc.reason}") from exc
        except Exception as exc:  # no answer, an unusable kubeconfig
            if time.monotonic() >= deadline:
                raise Unreadable(f"cannot read the cluster: {type(exc).__name__}: {exc}") from exc
        time.sleep(1.0)


def _names(exc: BaseException, name: str) -> bool:
    """Whether a 404 is about the object `name` (not about its resource not being served)."""
    try:
        details = json.loads(getattr(exc, "body", "") or "{}").get("details") or {}
    except (ValueError, AttributeError):
        return False
    return bool(details.get("name") == name)


def _read_object(call: Callable[[], Any], what: str, name: str) -> Any:
    """`_read(call)` of the object `name`: None when it does not exist; NotServed when its
    resource is not served."""
    try:
        return _read(call, what)
    except NotServed as exc:
        if exc.__cause__ is not None and _names(exc.__cause__, name):
            return None
        raise


def _get(custom: Any, name: str) -> StoredPolicy | None:
    """The SecurityPolicy `name` (None: it does not exist)."""
    got = _read_object(
        lambda: custom.get_cluster_custom_object(*SECURITY_POLICIES.coordinates, name),
        f"SecurityPolicy {name}",
        name,
    )
    return None if got is None else StoredPolicy.of(got)


def _running_policy(apps: Any, where: str) -> str | None:
    """The SecurityPolicy the operator Deployment `where` (NAMESPACE/NAME) enforces: its
    operator container's --policy (None: no such Deployment, a first install)."""
    namespace, _, name = where.partition("/")
    try:
        got = _read_object(
            lambda: apps.read_namespaced_deployment(name, namespace), f"Deployment {where}", name
        )
    except NotServed as exc:
        raise Unreadable(f"cannot read Deployment {where}") from exc
    if got is None:
        return None
    containers = list(got.spec.template.spec.containers or [])
    operator = next((c for c in containers if c.name == "operator"), None)
    args = list((operator or containers[0]).args or []) if containers else []
    for i, arg in enumerate(args):
        if arg.startswith("--policy="):
            return str(arg.split("=", 1)[1])
        if arg == "--policy" and i + 1 < len(args):
            return str(args[i + 1])
    return "default"  # gtvp-operator's own default


def _judgements(args: argparse.Namespace) -> list[UpgradeJudgement]:
    from kubernetes import client

    from gtvp import kube

    path = args.kubeconfig or os.environ.get("KUBECONFIG")
    if path is None and not os.environ.get("KUBERNETES_SERVICE_HOST"):
        raise Unreadable("no cluster: give --kubeconfig or set KUBECONFIG")
    try:
        clients = kube.make_clients(path, field_manager="gtvp-policy-check")
    except Exception as exc:
        raise Unreadable(f"cannot use the cluster's configuration: {exc}") from exc
    custom = clients.custom
    if not args.name:
        listed = _read(
            lambda: custom.list_cluster_custom_object(*SECURITY_POLICIES.coordinates),
            "SecurityPolicies",
        )
        found = [StoredPolicy.of(obj) for obj in listed.get("items") or []]
        return [judge_upgrade(p.name, p, p) for p in found]
    running = args.running
    if args.operator:
        running = _running_policy(client.AppsV1Api(clients.api), args.operator) or running
    target = _get(custom, args.name)
    if running and running != args.name:
        return [judge_upgrade(args.name, target, _get(custom, running))]
    return [judge_upgrade(args.name, target, target)]


def run_check(args: argparse.Namespace) -> int:
    try:
        return _check(args)
    except Exception as exc:  # noqa: BLE001 - a bug: never taken for a pass, nor a lost policy
        print(f"gtvp policy check: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


def _check(args: argparse.Namespace) -> int:
    try:
        judged = _judgements(args)
    except NotServed:
        if args.install:
            print(
                "gtvp policy check: no SecurityPolicy is served yet (a first install): none to lose"
            )
            return 0
        print(
            "gtvp policy check: the API server serves no SecurityPolicies "
            f"({'/'.join(SECURITY_POLICIES.coordinates)}): are gtvp's CRDs installed?",
            file=sys.stderr,
        )
        return 2
    except Unreadable as exc:
        print(f"gtvp policy check: {exc}", file=sys.stderr)
        return 2
    if not judged:
        print("gtvp policy check: no SecurityPolicy: none to lose")
        return 0
    for j in judged:
        print(f"gtvp policy check: {j.message}", file=sys.stderr if j.blocks else sys.stdout)
    return 1 if any(j.blocks for j in judged) else 0
