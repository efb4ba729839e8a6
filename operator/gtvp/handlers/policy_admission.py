"""Admission webhook for SecurityPolicies: refuse, at the API server, a policy the operator
could not enforce (what the CRD's CEL rules cannot check: PEM and DER, digest lengths per
bank, labels a kubelet may set on itself, a box-attestation CA bundle that is no
certificate), with `gtvp.core.policy.parse_policy`'s (or `gtvp.core.boxattest`'s) message.

The webhook is an early, clear answer, not the safety net: its configuration is
`failurePolicy: Ignore` (an operator that is down never keeps an administrator from editing
the policy), and a policy that gets in unusable anyway never replaces the last accepted one
(`gtvp.handlers.policies`). Registered by `gtvp.handlers.register` for
`gtvp.webhook_config.POLICY`.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from gtvp.core import boxattest
from gtvp.core.policy import PolicyError, parse_policy, policy_weaknesses
from gtvp.metrics import METRICS

log = logging.getLogger("gtvp.webhooks")


def validate_policy(body: kopf.Body, warnings: list[str] | None = None, **_: Any) -> None:
    name = body.metadata.name or ""
    spec = dict(body.get("spec") or {})
    try:
        policy = parse_policy(name, spec)
        boxattest.parse_settings(spec)
    except (PolicyError, boxattest.SettingsError) as exc:
        METRICS.admission("SecurityPolicy", "denied")
        log.info("denied SecurityPolicy %s", " ".join(f"{name}: {exc}".split())[:500])
        raise kopf.AdmissionError(
            f"SecurityPolicy {name} would be unusable, {exc.field}: {exc.message}", code=422
        ) from exc
    if warnings is not None:  # accepted, but said to whoever applies it (kubectl prints it)
        warnings.extend(policy_weaknesses(policy))
    METRICS.admission("SecurityPolicy", "allowed")
