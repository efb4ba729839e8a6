"""The e2e pool every end-to-end module starts: members with their own swtpm and agent,
kwok, the virt-controller stand-in, the operator with its webhooks, all Trusted.

One place for the set-up and the clean-up, so that modules differ only in what they say:
member identities, policy settings, and anything to publish before the operator starts.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from gtvp import webhook_config
from gtvp.localcluster.controlplane import ControlPlane
from gtvp.localcluster.polling import wait_for
from gtvp.localcluster.pool import Pool

__all__ = ["trusted_pool", "wait_for"]


@contextlib.contextmanager
def trusted_pool(
    cp: ControlPlane,
    directory: Path,
    *,
    tag: str,
    identities: Mapping[str, int],
    policy: Mapping[str, Any],
    before_start: Callable[[Pool], None] | None = None,
) -> Iterator[Pool]:
    """A running pool whose members (suffix -> identity) are Trusted; removed afterwards."""
    p = Pool(cp, directory, policy=f"{tag}-{uuid.uuid4().hex[:6]}")
    p.install_access()
    p.install_webhooks()
    prefix = f"{tag[0]}{uuid.uuid4().hex[:4]}"
    names = [f"{prefix}-{suffix}" for suffix in identities]
    for name, identity in zip(names, identities.values(), strict=True):
        p.add_member(name, identity=identity, start_agent=False, node=True)
    p.apply_policy(**policy)
    if before_start is not None:
        before_start(p)
    p.start_kwok()
    p.start_virtsim()
    p.start_operator()
    for name in names:
        p.start_agent(name)
    try:
        for name in names:
            p.wait_phase(name, "Trusted", timeout=60)
        yield p
    finally:
        p.stop()
        p.delete_members()
        for kind in ("mutatingwebhookconfiguration", "validatingwebhookconfiguration"):
            cp.kubectl("delete", kind, "gtvp", "--ignore-not-found")
        cp.kubectl(
            "delete",
            "validatingwebhookconfiguration",
            webhook_config.POLICY_CONFIGURATION,
            "--ignore-not-found",
        )
        cp.kubectl("delete", "securitypolicy", p.policy_name, "--ignore-not-found")
