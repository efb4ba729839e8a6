"""The admission webhook configurations gtvp needs, rendered statically.

kopf can manage webhook configurations itself, but it rewrites them on every change and
removes them on shutdown, which would open the security gate during each rollout. gtvp
renders them once (here for a URL, as `gtvp local` and the tests use; the Helm chart
renders the same rules against its Service) with `failurePolicy: Fail`: when the operator
is down, gated objects are refused, never admitted unchecked.
"""

from __future__ import annotations

import base64
from typing import Any

KUBEVIRT = {"apiGroups": ["kubevirt.io"], "apiVersions": ["v1"]}

# (handler id, resource, operations) - the id is the URL path kopf serves the handler on
MUTATING = (
    ("gtvp-mutate-vm", "virtualmachines", ["CREATE", "UPDATE"]),
    ("gtvp-mutate-vmi", "virtualmachineinstances", ["CREATE"]),
    ("gtvp-mutate-migration", "virtualmachineinstancemigrations", ["CREATE"]),
)
VALIDATING = (
    ("gtvp-validate-vm", "virtualmachines", ["CREATE", "UPDATE"]),
    ("gtvp-validate-vmi", "virtualmachineinstances", ["CREATE"]),
    ("gtvp-validate-migration", "virtualmachineinstancemigrations", ["CREATE"]),
)


def _hooks(
    entries: tuple[tuple[str, str, list[str]], ...], url: str, ca_pem: bytes
) -> list[dict[str, Any]]:
    return [
        {
            "name": f"{hid}.gtvp.io",
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": "Fail",
            "timeoutSeconds": 10,
            "matchPolicy": "Equivalent",
            "clientConfig": {
                "url": f"{url.rstrip('/')}/{hid}",
                "caBundle": base64.b64encode(ca_pem).decode(),
            },
            "rules": [
                {**KUBEVIRT, "resources": [resource], "operations": ops, "scope": "Namespaced"}
            ],
        }
        for hid, resource, ops in entries
    ]


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
    ]
