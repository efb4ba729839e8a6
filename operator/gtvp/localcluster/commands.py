"""`gtvp local up | down | status`: the local trusted pool on this machine.

Thin shell around `toolchain` (build once), `controlplane` (start, CRDs) and kubectl.
Everything it starts listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from gtvp.localcluster import layout, toolchain
from gtvp.localcluster.controlplane import ControlPlane, ControlPlaneError, Ports
from gtvp.localcluster.processes import ProcessTable


def state_dir() -> Path:
    """The pool's state (`GTVP_LOCAL_STATE` overrides; default `<cache>/local`)."""
    env = os.environ.get("GTVP_LOCAL_STATE")
    return Path(env).resolve() if env else toolchain.cache_dir() / "local"


def _saved_ports() -> Ports:
    try:
        data = json.loads((state_dir() / "ports.json").read_text())
        return Ports(**{k: int(v) for k, v in data.items()})
    except (OSError, ValueError, TypeError):
        return Ports()


def _control_plane(ports: Ports | None = None) -> ControlPlane:
    return ControlPlane(state_dir(), toolchain.binaries(), ports or _saved_ports())


def _say(msg: str) -> None:
    print(msg, flush=True)


def cmd_up(args: argparse.Namespace) -> int:
    started = time.monotonic()
    _say("gtvp local: a trusted pool on this machine (loopback only)")
    _say("step 1/4: programs (etcd, kube-apiserver, kubectl, kwok, helm), built from Go modules")
    toolchain.ensure_all()
    saved = _saved_ports()
    ports = Ports(
        etcd_client=args.etcd_port or saved.etcd_client,
        etcd_peer=(args.etcd_port + 1) if args.etcd_port else saved.etcd_peer,
        apiserver=args.apiserver_port or saved.apiserver,
    )
    cp = _control_plane(ports)
    _say(
        f"step 2/4: control plane: etcd {toolchain.ETCD_VERSION} + kube-apiserver "
        f"{toolchain.KUBERNETES_VERSION} on {cp.server}"
    )
    if any(cp.running().values()) and ports != saved:
        raise ControlPlaneError(
            "a local control plane from this state directory runs on other ports; "
            "run `gtvp local down` first"
        )
    state_dir().mkdir(parents=True, exist_ok=True)
    (state_dir() / "ports.json").write_text(json.dumps(asdict(ports)))
    cp.start()
    _say(
        "step 3/4: CRDs: gtvp.io (Member, SecurityPolicy, OSComponent, LazyBox) and KubeVirt's "
        "own schemas (kubevirt.io; no KubeVirt runs here)"
    )
    cp.apply_crds(layout.gtvp_crds() + layout.kubevirt_crds())
    if not args.no_samples:
        _say("step 4/4: samples from crds/samples/")
        for sample in layout.samples():
            cp.kubectl("apply", "--server-side", "--field-manager=gtvp-samples", "-f", str(sample))
    _say("")
    version = cp.kubectl("version", "-o", "yaml").stdout
    server_line = next((ln.strip() for ln in version.splitlines() if "gitVersion" in ln), "")
    _say(
        f"server {server_line.split(':', 1)[-1].strip() or '?'} is up "
        f"({time.monotonic() - started:.0f}s)"
    )
    for kind in ("securitypolicies", "members", "oscomponents", "lazyboxes -A"):
        out = cp.kubectl("get", *kind.split())
        _say(f"\n$ kubectl get {kind}\n{out.stdout.rstrip() or out.stderr.strip()}")
    _say("\nUse it:")
    _say(f"  export KUBECONFIG={cp.admin_kubeconfig}")
    _say(f"  {toolchain.binaries().kubectl} get members   # the same kubectl gtvp built")
    _say("Stop it: gtvp local down")
    return 0


def cmd_build(_args: argparse.Namespace) -> int:
    missing = [c.name for c in toolchain.COMPONENTS if not c.is_built()]
    if not missing:
        _say(f"programs cached in {toolchain.cache_dir() / 'bin'}")
        return 0
    _say(f"building from Go modules: {', '.join(missing)} (first time only; a few minutes each)")
    toolchain.ensure_all()
    return 0


def cmd_down(_args: argparse.Namespace) -> int:
    cp = _control_plane()
    stopped = cp.stop()
    if stopped:
        _say(f"stopped: {', '.join(stopped)}")
    else:
        _say("nothing was running")
    return 0


def cmd_status(_args: argparse.Namespace) -> int:
    cp = _control_plane()
    table = ProcessTable(state_dir())
    tracked = table.all()
    if not tracked:
        _say(f"gtvp local: nothing runs (state in {state_dir()})")
        return 1
    for t in tracked:
        _say(f"{t.name:16} pid {t.pid:<8} {'running' if t.alive() else 'NOT RUNNING'}")
    ready = cp.ready()
    _say(f"kube-apiserver {cp.server}: {'ready' if ready else 'not ready'}")
    _say(f"KUBECONFIG={cp.admin_kubeconfig}")
    return 0 if ready else 1


def cmd_regen_gomod(args: argparse.Namespace) -> int:
    for comp in toolchain.COMPONENTS:
        if args.component and comp.name != args.component:
            continue
        dest = Path(args.out) / comp.name
        _say(f"regenerating {comp.name} {comp.version} into {dest}")
        toolchain.regenerate(comp, dest)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    local = sub.add_parser(
        "local", help="run a local trusted pool (real control plane on loopback)"
    )
    lsub = local.add_subparsers(dest="local_cmd", required=True)
    up = lsub.add_parser("up", help="build (first time), start, install CRDs and samples")
    up.add_argument("--no-samples", action="store_true", help="do not apply crds/samples")
    up.add_argument("--apiserver-port", type=int, help="kube-apiserver port (default 26443)")
    up.add_argument(
        "--etcd-port",
        type=int,
        help="etcd client port; the peer port is the next one (default 22379)",
    )
    up.set_defaults(func=cmd_up)
    lsub.add_parser("build", help="build the programs only (cached)").set_defaults(func=cmd_build)
    lsub.add_parser("down", help="stop everything gtvp local started").set_defaults(func=cmd_down)
    lsub.add_parser("status", help="what runs").set_defaults(func=cmd_status)
    regen = lsub.add_parser("regen-gomod", help="maintainers: re-pin the Go builds")
    regen.add_argument("--out", required=True, help="directory to write <component>/go.mod into")
    regen.add_argument("--component", help="only this component")
    regen.set_defaults(func=cmd_regen_gomod)


ERRORS: tuple[type[Exception], ...] = (
    toolchain.ToolchainError,
    ControlPlaneError,
    layout.LayoutError,
)


def fail(exc: Exception) -> int:
    print(f"gtvp local: {exc}", file=sys.stderr)
    return 2
