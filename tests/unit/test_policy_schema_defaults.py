"""The policy parser's own defaults are the SecurityPolicy CRD's schema defaults.

The API server fills a schema default into an object when it reads it, by the CRD it serves
at that moment; the parser fills its own default when a field is missing. They must agree:
the chart's upgrade check (`gtvp policy check`, a hook that runs before the new CRDs are
applied) reads the live policy as the *old* CRD defaults it, and the new operator reads it
as the new CRD does. A field given a default only in a new CRD would otherwise be judged
one way by the check and another by the operator (a spurious stop, or worse, a pass).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gtvp.core.policy import PolicyError, parse_policy
from tests.samples import sample_policy_spec

ROOT = Path(__file__).parents[2]
CRD = ROOT / "crds" / "securitypolicy.yaml"

Path_ = tuple[str, ...]  # keys; "[]" for every item of an array


def _defaults(schema: dict[str, Any], path: Path_ = ()) -> Iterator[tuple[Path_, Any]]:
    """Every (path, default) the schema declares, under `path`."""
    if "default" in schema and path:
        yield path, schema["default"]
    for key, sub in (schema.get("properties") or {}).items():
        yield from _defaults(sub, (*path, key))
    if "items" in schema:
        yield from _defaults(schema["items"], (*path, "[]"))


def _parents(doc: Any, path: Path_) -> Iterator[dict[str, Any]]:
    """The objects in `doc` that hold the field at `path` (its last key)."""
    if len(path) == 1:
        if isinstance(doc, dict):
            yield doc
        return
    head, rest = path[0], path[1:]
    if head == "[]":
        for item in doc if isinstance(doc, list) else []:
            yield from _parents(item, rest)
    elif isinstance(doc, dict) and head in doc:
        yield from _parents(doc[head], rest)


def _spec_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD.read_text())
    spec: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"][
        "spec"
    ]
    return spec


def _outcome(spec: dict[str, Any]) -> object:
    try:
        return parse_policy("p", spec)
    except PolicyError as exc:
        return ("refused", exc.field, str(exc))


DEFAULTS = list(_defaults(_spec_schema()))


def test_the_schema_declares_defaults() -> None:
    assert len(DEFAULTS) >= 10  # the walk finds them (a schema moved would leave it empty)


@pytest.mark.parametrize(("path", "default"), DEFAULTS, ids=[".".join(p) for p, _ in DEFAULTS])
def test_a_missing_field_parses_as_its_schema_default(path: Path_, default: Any) -> None:
    sample = sample_policy_spec()
    key = path[-1]
    holders = list(_parents(sample, path))
    if not holders:  # the sample has no object to hold it: give it one, empty otherwise
        sample = _with_empty_parent(sample, path)
        holders = list(_parents(sample, path))
    assert holders, f"no place in the sample policy for {'.'.join(path)}"
    for i in range(len(holders)):
        missing, given = copy.deepcopy(sample), copy.deepcopy(sample)
        list(_parents(missing, path))[i].pop(key, None)
        list(_parents(given, path))[i][key] = copy.deepcopy(default)
        assert _outcome(missing) == _outcome(given), ".".join(path)


def _with_empty_parent(spec: dict[str, Any], path: Path_) -> dict[str, Any]:
    out = copy.deepcopy(spec)
    node: Any = out
    for key in path[:-1]:
        if key == "[]":
            if not node:
                node.append({})
            node = node[0]
            continue
        node = node.setdefault(key, [] if _is_array(path, key) else {})
    return out


def _is_array(path: Path_, key: str) -> bool:
    at = path.index(key)
    return at + 1 < len(path) and path[at + 1] == "[]"
