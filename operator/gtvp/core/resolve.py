"""Resolution of a Lazy Box against the OSComponent catalogue, with resolvelib.

Semantics (documented in docs/lazyboxes.md):
- a requirement names a componentName or a capability in some component's `provides`;
  its version range is checked against the version of the component that answers it;
- a box gets exactly one kernel and one root filesystem (each kernel / rootfs component
  implicitly provides the slot `@kernel` / `@rootfs`, which the box always needs), and
  in a box every name (component or capability) is answered by one component;
- `conflicts` forbid a name (in a range) from being in the same box;
- only components whose `level` is at least the box's level are candidates;
- preference: newest version of a component first; where several components could
  answer a name (the choice is free), those already cached in the pool come first, then
  by name. The result is deterministic for the same catalogue and cache.

Unsatisfiable boxes raise `Unresolvable` with a message a person can act on: the chain
from the box to each requirement that clashes and what the catalogue offers.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from resolvelib import AbstractProvider, BaseReporter
from resolvelib.resolvers import Resolution, ResolutionImpossible, ResolutionTooDeep
from resolvelib.structs import RequirementInformation

from gtvp.core.components import TYPES, Component, Dependency
from gtvp.core.versions import VersionError, VersionRange

SLOTS = {"kernel": "@kernel", "rootfs": "@rootfs"}
MAX_ROUNDS = 5000


class Unresolvable(Exception):
    """A box that no choice of components satisfies; `message` says why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Need:
    ident: str
    versions: VersionRange
    origin: str  # "the box's dependency", "the box's application", ...


@dataclass(frozen=True)
class Forbid:
    ident: str
    versions: VersionRange


@dataclass(frozen=True)
class Exact:
    ident: str
    component: Component


Requirement = Need | Forbid | Exact


@dataclass(frozen=True)
class Pick:
    ident: str
    component: Component


@dataclass(frozen=True)
class Absent:
    ident: str


Candidate = Pick | Absent


def identities(c: Component) -> tuple[str, ...]:
    """Every name `c` answers: its own, its provides and its slot."""
    slot = SLOTS.get(c.type)
    return (c.name, *c.provides, *((slot,) if slot else ()))


def _satisfies(req: Requirement, cand: Candidate) -> bool:
    if isinstance(req, Forbid):
        return isinstance(cand, Absent) or not req.versions.contains(cand.component.version)
    if isinstance(cand, Absent):
        return False
    if isinstance(req, Exact):
        return cand.component == req.component
    return req.versions.contains(cand.component.version)


class _Provider(AbstractProvider[Requirement, Candidate, str]):
    def __init__(
        self,
        by_ident: Mapping[str, Sequence[Component]],
        cached: frozenset[str],
        running: frozenset[str] = frozenset(),
    ):
        self.by_ident = by_ident
        self.cached = cached
        every = list(dict.fromkeys(c for cs in by_ident.values() for c in cs))
        cached_names = {c.name for c in every if c.digest in cached}
        # releases before pre-releases (a range such as <6.7 admits 6.7-rc1, which nobody
        # asked for: it is taken only when no release will do), then newest first, by
        # Version's own order (one rank per component); of one version, the object the box
        # runs first (a signed copy applied under another object name, or an older build
        # reusing the version, must not restart it), then catalogue order
        newest = {
            c: i
            for i, c in enumerate(
                sorted(
                    every,
                    key=lambda c: (c.version.rank > 0, c.version, c.object_name in running),
                    reverse=True,
                )
            )
        }
        self.order_key = {c: (c.name not in cached_names, c.name, newest[c]) for c in every}

    def identify(self, requirement_or_candidate: Requirement | Candidate) -> str:
        return requirement_or_candidate.ident

    def get_preference(
        self,
        identifier: str,
        resolutions: Mapping[str, Candidate],
        candidates: Mapping[str, Iterator[Candidate]],
        information: Mapping[str, Iterator[RequirementInformation[Requirement, Candidate]]],
        backtrack_causes: Sequence[RequirementInformation[Requirement, Candidate]],
    ) -> Any:
        infos = list(information[identifier])
        from_box = any(i.parent is None for i in infos)
        only_forbidden = all(isinstance(i.requirement, Forbid) for i in infos)
        return (not from_box, only_forbidden, len(self.by_ident.get(identifier, ())), identifier)

    def find_matches(
        self,
        identifier: str,
        requirements: Mapping[str, Iterator[Requirement]],
        incompatibilities: Mapping[str, Iterator[Candidate]],
    ) -> list[Candidate]:
        reqs = list(requirements[identifier])
        bad = set(incompatibilities[identifier])
        out: list[Candidate] = []
        if all(isinstance(r, Forbid) for r in reqs):
            out.append(Absent(identifier))
        comps = sorted(self.by_ident.get(identifier, ()), key=self.order_key.__getitem__)
        out.extend(Pick(identifier, c) for c in comps)
        return [c for c in out if c not in bad and all(_satisfies(r, c) for r in reqs)]

    def is_satisfied_by(self, requirement: Requirement, candidate: Candidate) -> bool:
        return _satisfies(requirement, candidate)

    def get_dependencies(self, candidate: Candidate) -> Iterable[Requirement]:
        if isinstance(candidate, Absent):
            return []
        c = candidate.component
        deps: list[Requirement] = [Need(d.name, d.versions, c.label) for d in c.requires]
        deps += [Forbid(d.name, d.versions) for d in c.conflicts]
        deps += [Exact(i, c) for i in identities(c) if i != candidate.ident]
        return deps


@dataclass(frozen=True)
class BoxRequest:
    """What a box asks for, read from its spec."""

    needs: tuple[Need, ...]
    level: int

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> BoxRequest:
        needs: list[Need] = []
        app = spec.get("application") or {}
        fields = [("application", [app])]
        fields += [(f, list(spec.get(f) or [])) for f in ("dependencies", "requestedComponents")]
        for field, items in fields:
            for item in items:
                try:
                    rng = VersionRange.parse(item.get("versions"))
                except VersionError as exc:
                    raise Unresolvable(
                        "InvalidVersionRange", f"spec.{field}[{item.get('name')}]: {exc}"
                    ) from exc
                needs.append(Need(str(item.get("name", "")), rng, f"spec.{field}"))
        for slot in SLOTS.values():
            needs.append(Need(slot, VersionRange.parse(""), "every box"))
        return cls(tuple(needs), int(spec.get("level", 1)))


def index(catalogue: Iterable[Component], level: int) -> dict[str, list[Component]]:
    """Components usable at `level`, by every name they answer."""
    out: dict[str, list[Component]] = {}
    for c in catalogue:
        if c.level >= level:
            for i in identities(c):
                out.setdefault(i, []).append(c)
    return out


def resolve(
    request: BoxRequest,
    catalogue: Sequence[Component],
    cached: frozenset[str] = frozenset(),
    running: frozenset[str] = frozenset(),
) -> list[Component]:
    """The components of one box, kernel first, application last; or raise Unresolvable.
    `cached`: digests whose component names are preferred where the choice is free;
    `running`: object names the box's VM boots, preferred over another object of the same
    name and version."""
    by_ident = index(catalogue, request.level)
    # resolvelib's Resolver.resolve, after resolving, builds a dependency graph with a
    # recursive walk that never ends on a dependency cycle no longer connected to the root
    # (RecursionError; found by the property test in tests/unit/test_resolve.py). gtvp needs
    # only the chosen candidates, so it runs the resolution itself and skips the graph.
    resolution: Resolution[Requirement, Candidate, str] = Resolution(
        _Provider(by_ident, cached, running), BaseReporter()
    )
    try:
        result = resolution.resolve(request.needs, max_rounds=MAX_ROUNDS)
    except ResolutionImpossible as exc:
        raise Unresolvable(
            "Unsatisfiable", explain(request, catalogue, by_ident, list(exc.causes))
        ) from exc
    except ResolutionTooDeep as exc:
        raise Unresolvable(
            "TooComplex",
            f"gave up after {MAX_ROUNDS} resolution rounds; pin versions in the box's "
            "dependencies to narrow the search",
        ) from exc
    chosen = {
        c.component.object_name: c.component for c in result.mapping.values() if isinstance(c, Pick)
    }
    return sorted(chosen.values(), key=lambda c: (TYPES.index(c.type), c.name))


# -- explanations -------------------------------------------------------------------------


def _req_text(req: Requirement) -> str:
    if isinstance(req, Need):
        name = _slot_text(req.ident)
        return f"{name} {req.versions.text}".strip()
    if isinstance(req, Forbid):
        return f"no {req.ident} {req.versions.text}".strip()
    return f"{_slot_text(req.ident)} = {req.component.label}"


def _slot_text(ident: str) -> str:
    for kind, slot in SLOTS.items():
        if ident == slot:
            return f"a {kind}"
    return ident


def _chain(
    request: BoxRequest, by_ident: Mapping[str, Sequence[Component]], target: Component
) -> list[str]:
    """Shortest chain of requirements from the box to `target` (for the explanation)."""
    start = [
        (n, c)
        for n in request.needs
        for c in by_ident.get(n.ident, ())
        if n.versions.contains(c.version)
    ]
    seen: set[Component] = set()
    queue: deque[tuple[Component, list[str]]] = deque()
    for need, comp in start:
        if comp not in seen:
            seen.add(comp)
            queue.append((comp, [f"the box needs {_req_text(need)} ({need.origin})"]))
    while queue:
        comp, path = queue.popleft()
        if comp == target:
            return path
        for dep in comp.requires:
            for nxt in by_ident.get(dep.name, ()):
                if nxt not in seen and dep.versions.contains(nxt.version):
                    seen.add(nxt)
                    queue.append((nxt, [*path, f"{comp.label} requires {dep}"]))
    return []


def explain(
    request: BoxRequest,
    catalogue: Sequence[Component],
    by_ident: Mapping[str, Sequence[Component]],
    causes: Sequence[RequirementInformation[Requirement, Candidate]],
) -> str:
    """A person-readable account of why no composition exists."""
    lines: list[str] = []
    idents = sorted({c.requirement.ident for c in causes})
    for ident in idents:
        mine = [c for c in causes if c.requirement.ident == ident]
        lines.append(f"cannot choose {_slot_text(ident)}:")
        for info in mine:
            req = info.requirement
            if info.parent is None:
                origin = req.origin if isinstance(req, Need) else "the box"
                lines.append(f"  - {origin} asks for {_req_text(req)}")
                continue
            parent = info.parent.component if isinstance(info.parent, Pick) else None
            if parent is None:
                continue
            chain = _chain(request, by_ident, parent)
            via = " → ".join(chain) + " → " if chain else ""
            if isinstance(req, Forbid):
                lines.append(
                    f"  - {via}{parent.label} conflicts with {ident} {req.versions.text}".rstrip()
                )
            elif isinstance(req, Exact):
                lines.append(f"  - {via}answered by {parent.label}")
            else:
                lines.append(f"  - {via}{parent.label} requires {_req_text(req)}")
        lines.append("  " + _offer(ident, catalogue, request.level))
    return "\n".join(dict.fromkeys(lines))


def _offer(ident: str, catalogue: Sequence[Component], level: int) -> str:
    offered = [c for c in catalogue if ident in identities(c)]
    if not offered:
        return f"no component in the catalogue is named or provides {_slot_text(ident)}"
    usable = sorted((c for c in offered if c.level >= level), key=lambda c: c.version)
    low = sorted((c for c in offered if c.level < level), key=lambda c: c.version)
    parts = []
    if usable:
        parts.append("the catalogue offers " + ", ".join(c.label for c in usable))
    if low:
        parts.append(
            f"not usable at level {level} (rated lower): "
            + ", ".join(f"{c.label} (level {c.level})" for c in low)
        )
    return "; ".join(parts)


def describe(components: Sequence[Component]) -> str:
    return ", ".join(c.label for c in components)


__all__ = ["BoxRequest", "Dependency", "Unresolvable", "describe", "explain", "resolve"]
