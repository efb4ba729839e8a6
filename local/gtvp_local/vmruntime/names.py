"""Pure naming and addressing for the VM runtime's member network (no side effects).

Everything the runtime creates on the machine starts with `gtvpvm`, so that it never
touches the real node's bridge (`gtvp0`), its `cni-*` namespaces or `KUBE-*` chains, and so
that a cleanup can find its leftovers by that prefix alone.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Mapping

PREFIX = "gtvpvm"
BRIDGE = "gtvpvm-br0"
SUBNET = "10.77.0"
PREFIX_LEN = 24
BRIDGE_ADDRESS = f"{SUBNET}.1"
FIRST_HOST, LAST_HOST = 2, 254
IFNAMSIZ = 15
"""Linux's interface name limit (IFNAMSIZ 16, including the terminating NUL)."""
NETNS_MAX = 40
"""Namespace names are files under /run/netns: no kernel limit, kept short to read."""

_UNSAFE = re.compile(r"[^a-z0-9-]+")


def sanitize(name: str, limit: int) -> str:
    """A lower-case `[a-z0-9-]` form of `name`, at most `limit` characters; a name that had
    to be changed or cut keeps a short hash of the original, so two names never meet."""
    clean = _UNSAFE.sub("-", name.lower()).strip("-") or "x"
    if clean == name and len(clean) <= limit:
        return clean
    digest = hashlib.sha256(name.encode()).hexdigest()[:6]
    return f"{clean[: max(limit - 7, 1)].rstrip('-')}-{digest}"[:limit]


def netns_name(member: str) -> str:
    """The network namespace that stands for `member`: `gtvpvm-<member>`."""
    return f"{PREFIX}-{sanitize(member, NETNS_MAX - len(PREFIX) - 1)}"


def host_veth(octet: int) -> str:
    """The bridge side of a member's veth pair (`gtvpvm-h<octet>`, ≤ 15 characters)."""
    return _ifname("h", octet)


def member_veth(octet: int) -> str:
    """The member side of its veth pair, inside its namespace (`gtvpvm-m<octet>`)."""
    return _ifname("m", octet)


def _ifname(side: str, octet: int) -> str:
    if not FIRST_HOST <= octet <= LAST_HOST:
        raise ValueError(f"host octet {octet} outside {FIRST_HOST}..{LAST_HOST}")
    return f"{PREFIX}-{side}{octet}"  # at most 6 + 5 characters: fits IFNAMSIZ


def address(octet: int) -> str:
    return f"{SUBNET}.{octet}"


def allocate(assigned: Mapping[str, int], member: str, taken: Collection[int] = ()) -> int:
    """The host octet of `member`: the one it already has, else the lowest one neither
    assigned to another member nor `taken` (in use on the machine by another state)."""
    if member in assigned:
        return assigned[member]
    used = set(assigned.values()) | set(taken)
    for octet in range(FIRST_HOST, LAST_HOST + 1):
        if octet not in used:
            return octet
    raise RuntimeError(f"no free address left in {SUBNET}.0/{PREFIX_LEN}")


_HOST_VETH = re.compile(rf"^{PREFIX}-h(\d+)$")


def octets_in_use(link_names: Collection[str]) -> set[int]:
    """Host octets whose bridge-side veth exists (from `ip -o link` names)."""
    found = set()
    for name in link_names:
        m = _HOST_VETH.match(name.split("@", 1)[0])
        if m:
            found.add(int(m.group(1)))
    return found


def process_name(vm: str, generation: int) -> str:
    """The ProcessTable name of a VM's qemu (a migration starts the next generation)."""
    return f"{PREFIX}-{sanitize(vm, 60)}.{generation}"


def migration_port(vm: str) -> int:
    """The port a VM's incoming migration listens on in the target's namespace (each member
    has its own port space; one VM migrates once at a time)."""
    return 49152 + int(hashlib.sha256(vm.encode()).hexdigest()[:8], 16) % 8192
