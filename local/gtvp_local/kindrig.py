"""kind/e2e.sh's rig: an swtpm per kind node, then gtvp by its chart (hosts with Docker).

`python -m gtvp_local.kindrig image|up|down`. Everything here that installs is the code
path tested on this machine against the real node (`gtvp local up --install helm`,
`gtvp_local.realpool`): the image from `images.build` (the archive `make images` cached),
the pool's swtpm CA and `Swtpm`s manufactured by it, the SecurityPolicy from
`pool.pool_policy`, and `installation.install` (helm upgrade --install --wait with
`chart_values`, each node's Member, the policy, every member Trusted through its agent
pod), which returns the `Installation` file the installed-mode e2e tests read. What is
kind's own is small and pure (below, unit-tested): the node names `kind get nodes` prints,
the Docker network's IPv4 gateway (the host's address on the kind network, where the
swtpms listen: the agent pods reach it through their node, the tests on the host use the
same address), the ports, and the TCTI maps.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gtvp_local import images, installation, layout, toolchain
from gtvp_local.pool import pool_policy
from gtvp_local.processes import ProcessTable, stop_pid, strays
from gtvp_local.swtpm import Swtpm, SwtpmCA, SwtpmError

Say = Callable[[str], None]
CLUSTER = "gtvp"
NETWORK = "kind"
"""The Docker network kind puts its nodes on (`KIND_EXPERIMENTAL_DOCKER_NETWORK` changes it)."""
RIG_FILE = "rig.json"
INTERVAL = "5s"
VALID_FOR = "15s"
"""The policy's attestation timing: `pool_policy`'s defaults, as on the real-node rig."""


class KindRigError(RuntimeError):
    """The rig cannot be brought up; the message says what to do."""


# -- pure parts -------------------------------------------------------------------------


def parse_kind_nodes(text: str) -> list[str]:
    """Node names from `kind get nodes --name C` (one a line; kind's node names are its
    containers' and the Nodes' names). Sorted; kind's "No kind nodes found" is no node."""
    words = (line.strip() for line in text.splitlines())
    return sorted({w for w in words if w and not any(c.isspace() for c in w)})


def parse_node_list(text: str) -> list[str]:
    """`--nodes a,b,c` (order kept, duplicates and blanks dropped)."""
    out: list[str] = []
    for item in text.split(","):
        name = item.strip()
        if name and name not in out:
            out.append(name)
    return out


def ipv4_gateway(text: str) -> str:
    """The IPv4 gateway among `docker network inspect -f '{{range .IPAM.Config}}{{.Gateway}}
    {{end}}'`'s words (kind's network also has an IPv6 subnet)."""
    for word in text.split():
        try:
            addr = ipaddress.ip_address(word)
        except ValueError:
            continue
        if addr.version == 4:
            return str(addr)
    raise KindRigError(
        f"the Docker network has no IPv4 gateway (docker network inspect said {text.strip()!r});"
        " pass --host with the host's address on the kind network"
    )


def port_plan(
    nodes: Sequence[str], base: int | None, known: Mapping[str, int] | None = None
) -> dict[str, int | None]:
    """The swtpm command port of each node (its control port is the next one, as the swtpm
    TCTI expects): the port a previous `up` used, else base + 2i with `base`, else None
    (the Swtpm chooses a free pair)."""
    known = known or {}
    plan: dict[str, int | None] = {}
    for i, node in enumerate(nodes):
        if node in known:
            plan[node] = known[node]
        elif base is not None:
            port = base + 2 * i
            if not 1024 <= port < 65535:
                raise KindRigError(f"port {port} for {node} is out of range (--base-port {base})")
            plan[node] = port
        else:
            plan[node] = None
    return plan


def tcti(host: str, port: int) -> str:
    """The swtpm TCTI the agent and the tests use (what `Swtpm.tcti` gives)."""
    return f"swtpm:host={host},port={port}"


def tpm_maps(
    ports: Mapping[str, int], *, pod_host: str, test_host: str
) -> tuple[dict[str, str], dict[str, str]]:
    """(node -> TCTI as the agent pods reach it, node -> TCTI as the tests reach it)."""
    return (
        {node: tcti(pod_host, port) for node, port in ports.items()},
        {node: tcti(test_host, port) for node, port in ports.items()},
    )


@dataclass
class RigState:
    """What `up` started, for a second `up` (same ports) and for `down`."""

    cluster: str
    host: str
    ports: dict[str, int] = field(default_factory=dict)
    kubeconfig: str = ""

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / RIG_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> RigState | None:
        try:
            data = json.loads((directory / RIG_FILE).read_text())
            return cls(
                cluster=str(data["cluster"]),
                host=str(data["host"]),
                ports={str(k): int(v) for k, v in data.get("ports", {}).items()},
                kubeconfig=str(data.get("kubeconfig", "")),
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None


# -- I/O ----------------------------------------------------------------------------------


def _run(argv: Sequence[str], what: str) -> str:
    if shutil.which(argv[0]) is None:
        raise KindRigError(f"{argv[0]} was not found on PATH ({what})")
    proc = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise KindRigError(f"{' '.join(argv)} failed: {proc.stderr.strip()[-800:]}")
    return proc.stdout


def kind_nodes(cluster: str) -> list[str]:
    nodes = parse_kind_nodes(_run(["kind", "get", "nodes", "--name", cluster], "kind's nodes"))
    if not nodes:
        raise KindRigError(f"kind cluster {cluster!r} has no nodes (kind create cluster first)")
    return nodes


def docker_gateway(network: str = NETWORK) -> str:
    fmt = "{{range .IPAM.Config}}{{.Gateway}} {{end}}"
    return ipv4_gateway(_run(["docker", "network", "inspect", network, "-f", fmt], "gateway"))


def node_tpm(state: Path, node: str, host: str, port: int | None) -> Swtpm:
    return Swtpm(node, state / "tpms" / node, ProcessTable(state), port, host=host)


def image(repo: Path | None = None) -> images.BuiltImage:
    """The image `make images` built (cached: returns at once; builds otherwise, as root)."""
    return images.build(repo or layout.repo_root())


def up(
    *,
    state: Path,
    kubeconfig: Path,
    nodes: Sequence[str],
    host: str,
    image_ref: str,
    cluster: str = CLUSTER,
    base_port: int | None = None,
    replicas: int = 2,
    identity: int = 3,
    interval: str = INTERVAL,
    valid_for: str = VALID_FOR,
    helm: Path | None = None,
    kubectl: Path | None = None,
    say: Say = print,
) -> installation.Installation:
    """An swtpm per node on `host`, then `installation.install` (the chart's default node
    selector: the operator on kind's control-plane node, an agent on every node)."""
    state = state.resolve()
    previous = RigState.load(state)
    known = previous.ports if previous is not None and previous.host == host else {}
    if previous is not None and previous.host != host:
        down(state)  # swtpms on another address: start them again on this one
    ca = SwtpmCA(state / "swtpm-ca").ensure()
    ports: dict[str, int] = {}
    rig = RigState(cluster=cluster, host=host, kubeconfig=str(kubeconfig.resolve()))
    for node, port in port_plan(nodes, base_port, known).items():
        tpm = node_tpm(state, node, host, port)
        tpm.manufacture(ca)
        tpm.start()
        ports[node] = tpm.port
        rig.ports = dict(ports)
        rig.save(state)  # after each start: `down` finds every swtpm even if a later one fails
        say(f"  {node}: swtpm on {tpm.tcti} (EK certificate from the pool's swtpm CA)")
    pod_tpms, test_tpms = tpm_maps(ports, pod_host=host, test_host=host)
    bins = toolchain.binaries()
    return installation.install(
        helm=helm or bins.helm,
        kubectl=kubectl or bins.kubectl,
        kubeconfig=kubeconfig,
        image=image_ref,
        pod_tpms=pod_tpms,
        test_tpms=test_tpms,
        policy=pool_policy(ca, interval=interval, valid_for=valid_for),
        identity=identity,
        replicas=replicas,
        node_selector=None,
        state_host_path=None,
        rig="kind",
        say=say,
    )


def down(state: Path) -> list[str]:
    """Stop every swtpm `up` started under `state` (by its pid file, then strays marked with
    `state`); the state itself (CA, TPMs) stays."""
    state = state.resolve()
    procs = ProcessTable(state)
    stopped = [t.name for t in procs.all() if procs.stop(t.name)]
    for pid in strays(state, set()):
        stop_pid(pid)
        stopped.append(f"pid {pid}")
    return stopped


# -- entry point --------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gtvp_local.kindrig",
        description="kind/e2e.sh's rig: an swtpm per kind node, gtvp installed by its chart.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("image", help="print REFERENCE ARCHIVE of the image `make images` built")
    sub.add_parser("tools", help="print KUBECTL HELM: the binaries `gtvp local build` built")
    u = sub.add_parser("up", help="an swtpm per node, helm install, every member Trusted")
    u.add_argument("--kubeconfig", required=True, type=Path)
    u.add_argument("--state", required=True, type=Path, help="the rig's directory")
    u.add_argument("--out", required=True, type=Path, help="the Installation file to write")
    u.add_argument("--cluster", default=CLUSTER, help="kind cluster (default %(default)s)")
    u.add_argument("--nodes", help="a,b,c (default: `kind get nodes --name CLUSTER`)")
    u.add_argument(
        "--host",
        help="the host's address on the kind network, where the swtpms listen "
        "(default: the IPv4 gateway of Docker network `kind`)",
    )
    u.add_argument("--image", help="image reference on the nodes (default: the built image's)")
    u.add_argument("--base-port", type=int, help="swtpm ports base, base+2, ... (default: free)")
    u.add_argument("--replicas", type=int, default=2)
    u.add_argument("--identity", type=int, default=3)
    u.add_argument("--interval", default=INTERVAL, help="attestation interval (%(default)s)")
    u.add_argument("--valid-for", default=VALID_FOR, help="verdict validity (%(default)s)")
    d = sub.add_parser("down", help="stop the swtpms `up` started")
    d.add_argument("--state", required=True, type=Path)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "image":
            built = image()
            print(f"{built.reference} {built.archive}")
        elif args.command == "tools":
            bins = toolchain.binaries()
            missing = [str(b) for b in (bins.kubectl, bins.helm) if not b.is_file()]
            if missing:
                raise KindRigError(f"not built: {', '.join(missing)} (make setup builds them)")
            print(f"{bins.kubectl} {bins.helm}")
        elif args.command == "up":
            nodes = parse_node_list(args.nodes) if args.nodes else kind_nodes(args.cluster)
            host = args.host or docker_gateway()
            ref = args.image or image().reference
            print(f"kind cluster {args.cluster}: nodes {', '.join(nodes)}; swtpms on {host}")
            found = up(
                state=args.state,
                kubeconfig=args.kubeconfig,
                nodes=nodes,
                host=host,
                image_ref=ref,
                cluster=args.cluster,
                base_port=args.base_port,
                replicas=args.replicas,
                identity=args.identity,
                interval=args.interval,
                valid_for=args.valid_for,
            )
            found.save(args.out)
            print(f"installation written to {args.out} ({installation.ENV}={args.out})")
        else:
            stopped = down(args.state)
            print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
    except (
        KindRigError,
        SwtpmError,
        installation.InstallError,
        images.ImageError,
        TimeoutError,
    ) as exc:
        print(f"kindrig: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
