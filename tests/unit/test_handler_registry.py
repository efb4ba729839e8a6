"""What gtvp-operator registers with kopf: event handlers only, so kopf keeps no diff base."""

from __future__ import annotations

import kopf

from gtvp import handlers
from gtvp.core.api_resources import MEMBERS


def test_the_operator_registers_event_handlers_only() -> None:
    """`startup.NoDiffBase` drops kopf's per-event copy of every object, which only
    on.create/on.update/on.field handlers and daemons need: none may be registered."""
    registry = kopf.OperatorRegistry()
    handlers.register(registry, admission_webhooks=False)
    assert not registry._changing.get_all_handlers()
    assert not registry._spawning.get_all_handlers()
    resources = {
        (h.selector.group, h.selector.any_name) for h in registry._watching.get_all_handlers()
    }
    assert (MEMBERS.group, MEMBERS.plural) in resources
