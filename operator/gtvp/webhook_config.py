"""The admission webhook configurations gtvp needs, rendered statically.

kopf can manage webhook configurations itself, but it rewrites them on every change and
removes them on shutdown, which would open the security gate during each rollout. gtvp
renders them once (here for a URL, as `gtvp local` and the tests use; the Helm chart
renders the same hooks against its Service, and a test keeps the two equal) with
`failurePolicy: Fail`: when the operator is down, gated objects are refused, never admitted
unchecked.

Scope, so that an operator outage stops only what gtvp gates: the API server itself skips
`kube-system` (namespaceSelector; gtvp's own namespace is gated too: none of its objects
is a VM), and, by `matchConditions`
(CEL, in manifests/webhook-conditions.yaml, which the chart shares), every VM and VMI that
neither carries nor carried (oldObject, on UPDATE) the label `gtvp.io/level` - on the VM or
on its template - nor, for a VMI, a trust selector. A VMI UPDATE reaches gtvp only when it
changes that label, the nodeSelector or the shutdown grace period (KubeVirt writes VMI
status through the main resource, and those writes must not depend on gtvp); a VM UPDATE
only when it changes that label or the template (a start or a stop never waits for gtvp).
Migrations always reach gtvp: the level of the migrated VMI is only known there, so while
the operator is down no VM migrates, gated or not (KubeVirt's drains of ungated VMs wait).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml

from gtvp.core.api_resources import (
    MIGRATIONS,
    SECURITY_POLICIES,
    VIRTUAL_MACHINE_INSTANCES,
    VIRTUAL_MACHINES,
    ApiResource,
)

EXCLUDED_NAMESPACES = ("kube-system",)
"""Namespaces gtvp never gates (besides its own): an outage of gtvp must not stop them."""


@dataclass(frozen=True)
class Hook:
    """One webhook: the kopf handler id (also the URL path it is served on) and what it sees."""

    id: str
    group: str
    version: str
    resource: str
    operations: tuple[str, ...]
    scope: str = "Namespaced"
    match_conditions: tuple[str, ...] = ()  # names in webhook-conditions.yaml; all must hold
    failure_policy: str = "Fail"  # a gate fails closed; only an early-warning hook may not
    timeout_seconds: int = 10


def match_conditions() -> dict[str, str]:
    """The CEL conditions by name (manifests/webhook-conditions.yaml, shared with the chart)."""
    text = (resources.files("gtvp") / "manifests" / "webhook-conditions.yaml").read_text()
    loaded: dict[str, str] = yaml.safe_load(text)
    return loaded


def _kubevirt(
    hook_id: str, res: ApiResource, operations: tuple[str, ...], *conditions: str
) -> Hook:
    return Hook(
        hook_id, res.group, res.version, res.plural, operations, match_conditions=conditions
    )


CREATE, UPDATE = "CREATE", "UPDATE"
VM, VMI, MIGRATION = VIRTUAL_MACHINES, VIRTUAL_MACHINE_INSTANCES, MIGRATIONS
MUTATING: tuple[Hook, ...] = (
    _kubevirt("gtvp-mutate-vm", VM, (CREATE, UPDATE), "gated-vm", "vm-gating-change"),
    _kubevirt("gtvp-mutate-vmi", VMI, (CREATE,), "gated-vmi"),
    _kubevirt("gtvp-mutate-migration", MIGRATION, (CREATE,)),
)
VALIDATING: tuple[Hook, ...] = (
    _kubevirt("gtvp-validate-vm", VM, (CREATE, UPDATE), "gated-vm", "vm-gating-change"),
    _kubevirt("gtvp-validate-vmi", VMI, (CREATE, UPDATE), "gated-vmi", "gating-change"),
    _kubevirt("gtvp-validate-migration", MIGRATION, (CREATE,)),
)


def namespace_selector() -> dict[str, Any]:
    """Every namespace but kube-system (ignored for cluster-scoped objects). gtvp's own
    namespace is gated too: none of gtvp's objects is a VM, and a VM that ran there (a
    release in `default`, a namespace shared with tenants) would otherwise run ungated."""
    return {
        "matchExpressions": [
            {
                "key": "kubernetes.io/metadata.name",
                "operator": "NotIn",
                "values": [*EXCLUDED_NAMESPACES],
            }
        ]
    }


def _hooks(hooks: tuple[Hook, ...], url: str, ca_pem: bytes) -> list[dict[str, Any]]:
    cel = match_conditions()
    out = []
    for h in hooks:
        hook: dict[str, Any] = {
            "name": f"{h.id}.gtvp.io",
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": h.failure_policy,
            "timeoutSeconds": h.timeout_seconds,
            "matchPolicy": "Equivalent",
            "clientConfig": {
                "url": f"{url.rstrip('/')}/{h.id}",
                "caBundle": base64.b64encode(ca_pem).decode(),
            },
            "rules": [
                {
                    "apiGroups": [h.group],
                    "apiVersions": [h.version],
                    "resources": [h.resource],
                    "operations": list(h.operations),
                    "scope": h.scope,
                }
            ],
        }
        if h.scope == "Namespaced":
            hook["namespaceSelector"] = namespace_selector()
        if h.match_conditions:
            hook["matchConditions"] = [
                {"name": name, "expression": cel[name]} for name in h.match_conditions
            ]
        out.append(hook)
    return out


def webhook_configurations(url: str, ca_pem: bytes) -> list[dict[str, Any]]:
    """MutatingWebhookConfiguration and ValidatingWebhookConfiguration for `url`."""
    labels = {"app.kubernetes.io/part-of": "gtvp"}
    return [
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": "gtvp", "labels": labels},
            "webhooks": _hooks(MUTATING, url, ca_pem),
        },
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": "gtvp", "labels": labels},
            "webhooks": _hooks(VALIDATING, url, ca_pem),
        },
        policy_webhook_configuration(url, ca_pem),
    ]


# ----- SecurityPolicy ----------------------------------------------------------------------
# A separate configuration with `failurePolicy: Ignore`: it refuses an unusable policy early
# with a clear message (gtvp.handlers.policy_admission), but it is not the safety net (an
# unusable policy that gets in never replaces the last accepted one, gtvp.handlers.policies),
# so an operator that is down must not keep an administrator from editing the policy.
POLICY_HOOK = "gtvp-validate-securitypolicy"
POLICY_CONFIGURATION = "gtvp-securitypolicy"
POLICY: Hook = Hook(
    POLICY_HOOK,
    SECURITY_POLICIES.group,
    SECURITY_POLICIES.version,
    SECURITY_POLICIES.plural,
    (CREATE, UPDATE),
    scope="Cluster",
    failure_policy="Ignore",
    timeout_seconds=5,
)


def policy_webhook_configuration(url: str, ca_pem: bytes) -> dict[str, Any]:
    """The ValidatingWebhookConfiguration for SecurityPolicies, served at `url`."""
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {
            "name": POLICY_CONFIGURATION,
            "labels": {"app.kubernetes.io/part-of": "gtvp"},
        },
        "webhooks": _hooks((POLICY,), url, ca_pem),
    }


WEBHOOK_IDS: frozenset[str] = frozenset(h.id for h in (*MUTATING, *VALIDATING, POLICY))
"""The paths (after the server's) that the webhook server answers: any other is refused."""
