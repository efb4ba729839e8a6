"""Whether a VMI's own node constraints let it run on a node: its `spec.nodeSelector` and
its required node affinity (`requiredDuringSchedulingIgnoredDuringExecution`), read as the
scheduler reads a pod's (KubeVirt copies both to the launcher pod, and to a migration's
target pod next to the migration's `addedNodeSelector`).

gtvp pins a migration it starts to one member: a pin the VMI's own constraints exclude can
never be scheduled, and until KubeVirt fails it (minutes later, three times) it holds the
slots every evacuation shares. gtvp's own trust labels are left to gtvp's own judgement of
the member (its labels follow its verdict a moment later)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from gtvp.core.trust import LEVEL_LABEL, TRUSTED_LABEL


def constrained(spec: Mapping[str, Any]) -> bool:
    """Whether the VMI names nodes at all (beyond gtvp's trust selector)."""
    return bool(_own_selector(spec)) or _required_terms(spec) is not None


def allowed_among(
    spec: Mapping[str, Any], nodes: Mapping[str, Mapping[str, str]]
) -> frozenset[str] | None:
    """Of `nodes` (name -> labels), those the VMI's own constraints allow; None when it
    sets none (every one)."""
    if not constrained(spec):
        return None
    return frozenset(name for name, labels in nodes.items() if allows(spec, name, labels))


def allows(spec: Mapping[str, Any], node: str, labels: Mapping[str, str]) -> bool:
    """Whether a VMI with `spec` may be scheduled on Node `node` carrying `labels`."""
    if any(labels.get(k) != v for k, v in _own_selector(spec).items()):
        return False
    terms = _required_terms(spec)
    return terms is None or any(_term_matches(t, node, labels) for t in terms)


def _own_selector(spec: Mapping[str, Any]) -> dict[str, str]:
    selector = spec.get("nodeSelector") or {}
    return {
        str(k): str(v)
        for k, v in selector.items()
        if k != TRUSTED_LABEL and not str(k).startswith(LEVEL_LABEL)
    }


def _required_terms(spec: Mapping[str, Any]) -> Sequence[Mapping[str, Any]] | None:
    """The required node selector terms (ORed); None when the VMI sets none (an empty list
    matches no node, as for the scheduler)."""
    affinity = (spec.get("affinity") or {}).get("nodeAffinity") or {}
    required = affinity.get("requiredDuringSchedulingIgnoredDuringExecution")
    if required is None:
        return None
    terms = required.get("nodeSelectorTerms")
    return list(terms) if isinstance(terms, list) else []


def _term_matches(term: Mapping[str, Any], node: str, labels: Mapping[str, str]) -> bool:
    """A term's expressions all hold (on labels, and `metadata.name` for fields); an empty
    term matches nothing."""
    exprs = list(term.get("matchExpressions") or [])
    fields = list(term.get("matchFields") or [])
    if not exprs and not fields:
        return False
    on_labels = all(_holds(e, labels) for e in exprs)
    on_fields = all(
        e.get("key") == "metadata.name" and _holds(e, {"metadata.name": node}) for e in fields
    )
    return on_labels and on_fields


def _holds(expr: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    key, op = str(expr.get("key", "")), expr.get("operator")
    values = [str(v) for v in expr.get("values") or []]
    have = labels.get(key)
    checks = {
        "In": lambda: have is not None and have in values,
        "NotIn": lambda: have is None or have not in values,
        "Exists": lambda: have is not None,
        "DoesNotExist": lambda: have is None,
        "Gt": lambda: _compare(have, values, lambda a, b: a > b),
        "Lt": lambda: _compare(have, values, lambda a, b: a < b),
    }
    check = checks.get(str(op))
    return check is not None and check()  # an operator the scheduler does not know: none


def _compare(have: str | None, values: Sequence[str], op: Callable[[int, int], bool]) -> bool:
    """Gt/Lt: the label and the one value read as integers."""
    if have is None or len(values) != 1:
        return False
    try:
        return op(int(have), int(values[0]))
    except ValueError:
        return False
