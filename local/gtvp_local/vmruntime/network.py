"""Members as hosts: a bridge and one network namespace per member (local pool only).

`gtvpvm-br0` (10.77.0.1/24) in the root namespace; per member a namespace `gtvpvm-<member>`
with lo up and one veth pair, the member side carrying 10.77.0.N/24, the host side
(`gtvpvm-hN`) a port of the bridge. A migration between two members crosses both veths,
and its bytes show in `/sys/class/net/gtvpvm-hN/statistics/{rx,tx}_bytes`.

The assignment member → N is kept in `<state>/vmruntime/network.json`. Creating is
idempotent; `teardown(state)` removes what that state created (and the bridge once no
member of any state uses it).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gtvp_local.vmruntime import names


@dataclass(frozen=True)
class MemberNet:
    member: str
    netns: str
    octet: int
    address: str
    host_veth: str
    member_veth: str

    def link_bytes(self) -> tuple[int, int]:
        """(rx, tx) bytes of the host-side veth: rx is what the member sent."""
        base = Path("/sys/class/net") / self.host_veth / "statistics"
        return int((base / "rx_bytes").read_text()), int((base / "tx_bytes").read_text())


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")
    return done


def _links() -> set[str]:
    out = _ip("-o", "link", "show").stdout
    return {line.split(":")[1].strip().split("@", 1)[0] for line in out.splitlines() if ":" in line}


def _netns() -> set[str]:
    out = _ip("netns", "list").stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _dir(state: Path) -> Path:
    return state / "vmruntime"


@contextlib.contextmanager
def _locked(state: Path) -> Iterator[Path]:
    """The state's network.json under an exclusive lock (two starts at once take turns)."""
    d = _dir(state)
    d.mkdir(parents=True, exist_ok=True)
    with (d / "network.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield d / "network.json"


def _read(path: Path) -> dict[str, int]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): int(v) for k, v in data.items()} if isinstance(data, dict) else {}


def describe(member: str, octet: int) -> MemberNet:
    return MemberNet(
        member,
        names.netns_name(member),
        octet,
        names.address(octet),
        names.host_veth(octet),
        names.member_veth(octet),
    )


def ensure_bridge() -> None:
    if names.BRIDGE not in _links():
        _ip("link", "add", names.BRIDGE, "type", "bridge")
    addrs = _ip("-o", "addr", "show", "dev", names.BRIDGE).stdout
    if f" {names.BRIDGE_ADDRESS}/" not in addrs:
        _ip("addr", "add", f"{names.BRIDGE_ADDRESS}/{names.PREFIX_LEN}", "dev", names.BRIDGE)
    _ip("link", "set", names.BRIDGE, "up")


def ensure_member(state: Path, member: str) -> MemberNet:
    """Create (or find) the member's namespace, veth pair and address."""
    with _locked(state) as path:
        assigned = _read(path)
        links = _links()
        mine = set(assigned.values())
        octet = names.allocate(assigned, member, names.octets_in_use(links) - mine)
        net = describe(member, octet)
        if assigned.get(member) != octet:
            assigned[member] = octet
            path.write_text(json.dumps(assigned, indent=1, sort_keys=True))
        ensure_bridge()
        if net.netns not in _netns():
            _ip("netns", "add", net.netns)
        _ip("-n", net.netns, "link", "set", "lo", "up")
        for stale in _stale_veths(_ip("-n", net.netns, "-o", "link", "show").stdout, net):
            # a namespace left by a run that was not torn down: its old link would carry
            # this member's traffic past the veth whose bytes are counted
            _ip("-n", net.netns, "link", "del", stale, check=False)
        inside = _ip("-n", net.netns, "-o", "link", "show").stdout
        if net.member_veth not in inside:
            if net.host_veth in links:  # a half-made pair whose other end was lost
                _ip("link", "del", net.host_veth, check=False)
            _ip(
                "link", "add", net.host_veth, "type", "veth",
                "peer", "name", net.member_veth, "netns", net.netns,
            )  # fmt: skip
        _ip("link", "set", net.host_veth, "master", names.BRIDGE, "up")
        addrs = _ip("-n", net.netns, "-o", "addr", "show", "dev", net.member_veth).stdout
        if f" {net.address}/" not in addrs:
            _ip(
                "-n", net.netns, "addr", "add",
                f"{net.address}/{names.PREFIX_LEN}", "dev", net.member_veth,
            )  # fmt: skip
        _ip("-n", net.netns, "link", "set", net.member_veth, "up")
        return net


def _stale_veths(ip_link_show: str, net: MemberNet) -> list[str]:
    """Member-side veths in the namespace (`ip -o link show` inside it) other than `net`'s."""
    prefix = f"{names.PREFIX}-m"
    found = []
    for line in ip_link_show.splitlines():
        if ":" not in line:
            continue
        name = line.split(":")[1].strip().split("@", 1)[0]
        if name.startswith(prefix) and name != net.member_veth:
            found.append(name)
    return found


def member_net(state: Path, member: str) -> MemberNet | None:
    """The member's network as recorded (None before `ensure_member`)."""
    octet = _read(_dir(state) / "network.json").get(member)
    return None if octet is None else describe(member, octet)


def teardown(state: Path) -> list[str]:
    """Remove every namespace and veth this state created, and the bridge once no
    `gtvpvm` veth is left on it; returns what was removed."""
    removed: list[str] = []
    path = _dir(state) / "network.json"
    assigned = _read(path)
    spaces = _netns()
    for member, octet in sorted(assigned.items()):
        net = describe(member, octet)
        if net.host_veth in _links():  # takes its peer in the namespace with it
            _ip("link", "del", net.host_veth, check=False)
            removed.append(net.host_veth)
        if net.netns in spaces:
            _ip("netns", "del", net.netns, check=False)
            removed.append(net.netns)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    remaining = _links()
    if names.BRIDGE in remaining and not names.octets_in_use(remaining):
        _ip("link", "del", names.BRIDGE, check=False)
        removed.append(names.BRIDGE)
    return removed
