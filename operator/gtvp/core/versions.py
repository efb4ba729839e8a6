"""Component versions and version ranges, as OSComponents and Lazy Boxes write them.

A version is up to four dot-separated numbers with an optional suffix: `6.1.112`,
`1.2.0-rc1`, `2.36.0+deb12u1`. Ordering is numeric part by part (missing parts count as
0); a `-suffix` is a pre-release and sorts before the plain version, a `+suffix` or
`.suffix` is a build of it and sorts after; suffixes compare run by run, runs of digits
as numbers (`+deb12u9` < `+deb12u10`). A range is a comma-separated conjunction of
`OP VERSION` clauses with OP one of `==`, `!=`, `>=`, `<=`, `>`, `<`; an empty range
matches every version. `==6.1` matches `6.1`, `6.1.0` and `6.1.0.0` only.

Pure; malformed input raises `VersionError` with a message naming the offending text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import total_ordering

_VERSION = re.compile(r"^(\d+(?:\.\d+){0,3})(?:([-+.])([0-9A-Za-z.]+))?$")
_CLAUSE = re.compile(r"^(==|!=|>=|<=|>|<)\s*(\S+)$")
_RUNS = re.compile(r"\d+|\D+")


class VersionError(ValueError):
    """A version or a version range that cannot be read."""


@total_ordering
@dataclass(frozen=True)
class Version:
    """A parsed component version; compares as described in the module docstring."""

    text: str
    numbers: tuple[int, int, int, int]
    rank: int  # 0 pre-release, 1 release, 2 build
    suffix: str

    @classmethod
    def parse(cls, text: str) -> Version:
        m = _VERSION.match(text.strip())
        if m is None:
            raise VersionError(
                f"{text!r} is not a version (expected numbers such as 6.1.112, "
                "optionally followed by -rc1 or +build1)"
            )
        nums = [int(p) for p in m.group(1).split(".")]
        padded = ([*nums, 0, 0, 0, 0])[:4]
        sep, suffix = m.group(2), m.group(3) or ""
        rank = 1 if not sep else (0 if sep == "-" else 2)
        return cls(text.strip(), (padded[0], padded[1], padded[2], padded[3]), rank, suffix)

    def _key(self) -> tuple[tuple[int, int, int, int], int, tuple[tuple[int, int, str], ...]]:
        return (self.numbers, self.rank, _suffix_key(self.suffix))

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key() < other._key()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __str__(self) -> str:
        return self.text


def _suffix_key(suffix: str) -> tuple[tuple[int, int, str], ...]:
    """A suffix compared run by run, digits as numbers: `deb12u9` < `deb12u10`, `rc9` <
    `rc10` (as strings, a security rebuild `u10` would sort before the `u9` it replaces);
    a run of digits sorts after a run of letters, a suffix after its own prefix."""
    return tuple(
        (1, int(run), "") if run.isdigit() else (0, 0, run) for run in _RUNS.findall(suffix)
    )


@dataclass(frozen=True)
class VersionRange:
    """A conjunction of clauses; `VersionRange.parse("")` matches everything."""

    text: str
    clauses: tuple[tuple[str, Version], ...]

    @classmethod
    def parse(cls, text: str | None) -> VersionRange:
        raw = (text or "").strip()
        if not raw:
            return cls("", ())
        clauses: list[tuple[str, Version]] = []
        for part in raw.split(","):
            m = _CLAUSE.match(part.strip())
            if m is None:
                raise VersionError(
                    f"version range {raw!r}: {part.strip()!r} is not a clause "
                    "(expected an operator ==, !=, >=, <=, > or < followed by a version)"
                )
            try:
                clauses.append((m.group(1), Version.parse(m.group(2))))
            except VersionError as exc:
                raise VersionError(f"version range {raw!r}: {exc}") from exc
        return cls(raw, tuple(clauses))

    def contains(self, version: Version) -> bool:
        for op, bound in self.clauses:
            ok = {
                "==": version == bound,
                "!=": version != bound,
                ">=": version >= bound,
                "<=": version <= bound,
                ">": version > bound,
                "<": version < bound,
            }[op]
            if not ok:
                return False
        return True

    def __str__(self) -> str:
        return self.text or "any version"
