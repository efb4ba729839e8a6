"""The e2e pool every end-to-end module starts: members with their own swtpm and agent,
kwok, the virt-controller stand-in, the operator with its webhooks, all Trusted.

The recipe is `gtvp_local.pool.trusted_pool` (the one `gtvp local up` and the
benchmarks run too); here, only what the session's shared control plane asks for: names
unique to the module (members and policy), so that modules never see each other's pools.
Modules differ only in what they say: member identities, policy settings, and anything to
publish before the operator starts.

The operator runs as `E2E_REPLICAS` replica(s) unless a module asks for more (`replicas=`):
one by default, with its Leases (the path a replicated operator runs, at the cost of one
process); tests/e2e/test_ha.py runs two and breaks them. Each pool's replicas have
identities of their own (its member prefix), so no pool inherits another's Leases.
"""

from __future__ import annotations

import datetime as dt
import os
import uuid
from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from gtvp_local import pool as local_pool
from gtvp_local.controlplane import ControlPlane
from gtvp_local.polling import wait_for
from gtvp_local.pool import Pool

__all__ = ["E2E_REPLICAS", "trusted_pool", "wait_for"]

E2E_REPLICAS = int(os.environ.get("GTVP_E2E_REPLICAS", "1"))
"""Operator replicas of an e2e pool that does not say (GTVP_E2E_REPLICAS overrides)."""


def trusted_pool(
    cp: ControlPlane, directory: Path, *, tag: str, identities: Mapping[str, int], **start: Any
) -> AbstractContextManager[Pool]:
    """A running pool whose members (suffix -> identity) are Trusted; removed afterwards.

    `start`: the recipe's settings (`policy`, `before_start`, `replicas`, `timings`), as
    for `gtvp_local.pool.trusted_pool`.
    """
    prefix = f"{tag[0]}{uuid.uuid4().hex[:4]}"
    members = {f"{prefix}-{suffix}": identity for suffix, identity in identities.items()}
    start.setdefault("replicas", E2E_REPLICAS)
    start.setdefault("identity_prefix", f"op-{prefix}")
    return local_pool.trusted_pool(
        cp, directory, members, policy_name=f"{tag}-{uuid.uuid4().hex[:6]}", **start
    )


def no_quote_for(status: Mapping[str, Any], seconds: float) -> bool:
    """Whether a Member's next quote is not due for `seconds` from now (its challenge's
    `answerAfter`, when the operator publishes its nonce, and no nonce out): a test
    counting the uses of a verdict must not have a fresh quote reset them mid-count. A
    verdict written after a policy edit proves nothing on its own: a quote asked under the
    old, short interval may still be answered (and reset the uses) a moment after the edit."""
    challenge = status.get("challenge") or {}
    at = str(challenge.get("answerAfter") or "")
    if not at or challenge.get("nonce"):
        return False
    due = dt.datetime.fromisoformat(at.replace("Z", "+00:00"))
    return due >= dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)
