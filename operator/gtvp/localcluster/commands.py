"""`gtvp local up | down | status`: the local trusted pool on this machine.

Thin shell around `toolchain` (build once), `controlplane` (start, CRDs) and kubectl.
Everything it starts listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from gtvp.localcluster import layout, toolchain
from gtvp.localcluster.controlplane import ControlPlane, ControlPlaneError, Ports
from gtvp.localcluster.polling import wait_for
from gtvp.localcluster.pool import Pool, PoolError
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


DEMO_NAMESPACE = "gtvp-demo"
BOX_NAMESPACE, BOX_NAME = "gtvp-samples", "web"  # crds/samples/lazybox.yaml
WARM_COMPONENTS = ("linux 6.6.52", "debian-minimal 12.7.0", "nginx 1.26.2")


def _pool(cp: ControlPlane) -> Pool:
    return Pool(cp, state_dir() / "pool")


def _demo_vm(level: int) -> dict[str, object]:
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {
            "name": "demo-web",
            "namespace": DEMO_NAMESPACE,
            "labels": {"gtvp.io/level": str(level)},
        },
        "spec": {
            "running": True,
            "template": {
                "metadata": {"labels": {"gtvp.io/level": str(level)}},
                "spec": {
                    "domain": {"devices": {}, "memory": {"guest": "256Mi"}},
                    "evictionStrategy": "External",
                },
            },
        },
    }


def _vmi_node(
    cp: ControlPlane, name: str = "demo-web", namespace: str = DEMO_NAMESPACE
) -> str | None:
    out = cp.kubectl(
        "get", "vmi", name, "-n", namespace, "-o", "jsonpath={.status.nodeName}", check=False
    )
    return out.stdout.strip() or None if out.returncode == 0 else None


def _box(cp: ControlPlane) -> dict[str, Any]:
    out = cp.kubectl("get", "lazybox", BOX_NAME, "-n", BOX_NAMESPACE, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else {}


def _box_running_on(cp: ControlPlane) -> str | None:
    st = _box(cp).get("status") or {}
    node = st.get("node") if st.get("phase") == "Running" else None
    return str(node) if node and _vmi_node(cp, BOX_NAME, BOX_NAMESPACE) == node else None


def _sample_images(labels: Sequence[str]) -> list[str]:
    path = layout.repo_root() / "crds" / "samples" / "oscomponents.yaml"
    out = []
    for doc in yaml.safe_load_all(path.read_text()):
        spec = (doc or {}).get("spec") or {}
        if f"{spec.get('componentName')} {spec.get('version')}" in labels:
            out.append(str(spec["image"]))
    return out


def start_pool(cp: ControlPlane, members: int) -> Pool:
    """Members with their own swtpm and agent, kwok, the virt-controller stand-in, the
    operator with its webhooks; waits until every member is Trusted."""
    pool = _pool(cp)
    pool.install_access()
    pool.install_webhooks()
    names = [f"node-{i}" for i in range(1, members + 1)]
    for i, name in enumerate(names):
        identity = 3 if i < 2 else 2
        _say(
            f"  member {name}: swtpm with an EK certificate from the pool's swtpm CA, "
            f"identity {identity}"
        )
        pool.add_member(name, identity=identity, start_agent=False, node=True)
    if len(names) >= 2:
        _say(
            f"  SIMULATION: {names[1]}'s image cache already holds {', '.join(WARM_COMPONENTS)} "
            "(written into Node status.images as its kubelet would report it)"
        )
        pool.set_node_images(names[1], _sample_images(WARM_COMPONENTS))
    pool.apply_policy()
    _say("  SIMULATION: kwok keeps the Nodes Ready (no kubelet here)")
    pool.start_kwok()
    _say("  SIMULATION: a stand-in for KubeVirt's virt-controller runs VMIs and migrations")
    pool.start_virtsim()
    pool.start_operator()
    _say(
        f"  gtvp-operator (webhooks on 127.0.0.1:{pool.webhook_port}, metrics on "
        f"127.0.0.1:{pool.metrics_port}/metrics)"
    )
    for name in names:
        pool.start_agent(name)
    started = time.monotonic()
    for name in names:
        pool.wait_phase(name, "Trusted", timeout=90)
        _say(
            f"  {name}: Trusted after {time.monotonic() - started:.1f}s "
            "(EK certificate checked, AK bound by credential activation, quote verified)"
        )
    return pool


def _show_box(cp: ControlPlane) -> None:
    _say(
        f"  Lazy Box {BOX_NAMESPACE}/{BOX_NAME} (crds/samples/lazybox.yaml): nginx and its "
        "dependencies, level 2"
    )
    wait_for(f"Lazy Box {BOX_NAME} to run", lambda: _box_running_on(cp), 60)
    st = _box(cp)["status"]
    comps = ", ".join(f"{r['name']} {r['version']}" for r in st.get("resolved") or [])
    _say(f"    resolved and verified (signed by the sample publisher): {comps}")
    _say(
        f"    composed into VirtualMachine {BOX_NAMESPACE}/{st['vm']['name']} (kernel boot, "
        "container disks, cloud-init)"
    )
    _say(f"    placed on {st['placement']['reason']}")


def cmd_up(args: argparse.Namespace) -> int:
    started = time.monotonic()
    steps = 5 if args.members else 4
    _say("gtvp local: a trusted pool on this machine (loopback only)")
    _say(
        f"step 1/{steps}: programs (etcd, kube-apiserver, kubectl, kwok, helm), built from "
        "Go modules"
    )
    toolchain.ensure_all()
    saved = _saved_ports()
    ports = Ports(
        etcd_client=args.etcd_port or saved.etcd_client,
        etcd_peer=(args.etcd_port + 1) if args.etcd_port else saved.etcd_peer,
        apiserver=args.apiserver_port or saved.apiserver,
    )
    cp = _control_plane(ports)
    _say(
        f"step 2/{steps}: control plane: etcd {toolchain.ETCD_VERSION} + kube-apiserver "
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
        f"step 3/{steps}: CRDs: gtvp.io (Member, SecurityPolicy, OSComponent, LazyBox) and "
        "KubeVirt's own schemas (kubevirt.io; no KubeVirt runs here)"
    )
    cp.apply_crds(layout.gtvp_crds() + layout.kubevirt_crds())
    if not args.no_samples:
        _say(f"step 4/{steps}: samples from crds/samples/")
        for sample in layout.samples():
            if args.members and sample.name == "members.yaml":
                continue  # the pool's own members stand in for the sample ones
            if args.members and sample.name == "lazybox.yaml":
                continue  # applied once the pool is trusted, so that placement has a choice
            cp.kubectl("apply", "--server-side", "--field-manager=gtvp-samples", "-f", str(sample))
    if args.members:
        _say(f"step {steps}/{steps}: the trusted pool: {args.members} members")
        start_pool(cp, args.members)
        cp.kubectl("create", "namespace", DEMO_NAMESPACE, check=False)
        _say(
            "  a VM that needs level 3 (label gtvp.io/level=3): the webhook adds the trust selector"
        )
        cp.kubectl("apply", "-f", "-", input_text=json.dumps(_demo_vm(3)))
        node = wait_for("demo-web to run", lambda: _vmi_node(cp), 30)
        _say(f"  {DEMO_NAMESPACE}/demo-web runs on {node}")
        if not args.no_samples:
            cp.kubectl(
                "apply",
                "--server-side",
                "--field-manager=gtvp-samples",
                "-f",
                str(layout.repo_root() / "crds" / "samples" / "lazybox.yaml"),
            )
            _show_box(cp)
    _say("")
    version = cp.kubectl("version", "-o", "yaml").stdout
    server_line = next((ln.strip() for ln in version.splitlines() if "gitVersion" in ln), "")
    _say(
        f"server {server_line.split(':', 1)[-1].strip() or '?'} is up "
        f"({time.monotonic() - started:.0f}s)"
    )
    if args.members:
        from gtvp import status_cli

        objs = status_cli.collect(str(cp.admin_kubeconfig))
        _say("")
        _say(status_cli.render(now=dt.datetime.now(dt.UTC), **objs))
    else:
        for kind in ("securitypolicies", "members", "oscomponents", "lazyboxes -A"):
            out = cp.kubectl("get", *kind.split())
            _say(f"\n$ kubectl get {kind}\n{out.stdout.rstrip() or out.stderr.strip()}")
    _say("\nUse it:")
    _say(f"  export KUBECONFIG={cp.admin_kubeconfig}")
    _say(f"  {toolchain.binaries().kubectl} get members   # the same kubectl gtvp built")
    if args.members:
        node = _box_running_on(cp) or _vmi_node(cp) or "node-1"
        _say(f"  gtvp local tamper {node}     # extend a PCR on its swtpm: quarantine + evacuation")
        _say("  gtvp status                  # the pool at a glance")
    _say("Stop it: gtvp local down")
    return 0


def cmd_tamper(args: argparse.Namespace) -> int:
    cp = _control_plane()
    if not cp.ready():
        raise ControlPlaneError("the local pool is not running: gtvp local up")
    pool = _pool(cp)
    if args.member not in pool.members():
        raise ControlPlaneError(
            f"{args.member} is not a member of the local pool ({', '.join(pool.members())})"
        )
    before = _vmi_node(cp)
    box_before = _box_running_on(cp)
    _say(
        f"tampering with {args.member}: extending PCR {args.pcr} on its swtpm "
        "(as a rogue boot component would, with tpm2-tools' tpm2_pcrextend)"
    )
    t0 = time.monotonic()
    pool.extend_pcr(args.member, args.pcr, b"gtvp local tamper")

    def elapsed() -> str:
        return f"t+{time.monotonic() - t0:4.1f}s"

    m = pool.wait_phase(args.member, "Untrusted", timeout=60)
    trust = m["status"]["trust"]
    _say(f"{elapsed()}  {args.member} Untrusted: {trust.get('reason')}: {trust.get('message')}")
    wait_for(
        "the taint",
        lambda: (
            "gtvp.io/untrusted"
            in cp.kubectl("get", "node", args.member, "-o", "jsonpath={.spec.taints[*].key}").stdout
        ),
        30,
    )
    _say(
        f"{elapsed()}  node {args.member}: trust labels removed, tainted "
        "gtvp.io/untrusted:NoSchedule (never NoExecute: VMs are migrated, not killed)"
    )
    if before == args.member:

        def evacuations() -> list[str]:
            return cp.kubectl(
                "get",
                "vmim",
                "-n",
                DEMO_NAMESPACE,
                "-l",
                f"gtvp.io/evacuation={args.member}",
                "-o",
                "name",
            ).stdout.split()

        wait_for("an evacuation migration", evacuations, 30)
        _say(f"{elapsed()}  evacuation started: {', '.join(evacuations())}")
        node = wait_for("demo-web to move", lambda: (n := _vmi_node(cp)) != args.member and n, 60)
        _say(f"{elapsed()}  {DEMO_NAMESPACE}/demo-web now runs on {node} (trusted, level 3)")
    else:
        _say(f"  ({DEMO_NAMESPACE}/demo-web runs on {before}, so nothing had to move)")
    if box_before == args.member:
        node = wait_for(
            "the Lazy Box to move",
            lambda: (n := _box_running_on(cp)) != args.member and n,
            60,
        )
        _say(
            f"{elapsed()}  Lazy Box {BOX_NAMESPACE}/{BOX_NAME} live-migrated to {node} "
            "(trusted, level >= 2)"
        )
    elif box_before:
        _say(f"  (Lazy Box {BOX_NAMESPACE}/{BOX_NAME} runs on {box_before}, so it stays)")
    from gtvp import status_cli

    _say("")
    _say(
        status_cli.render(
            now=dt.datetime.now(dt.UTC), **status_cli.collect(str(cp.admin_kubeconfig))
        )
    )
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
    pool_procs = ProcessTable(state_dir() / "pool")
    stopped = [t.name for t in pool_procs.all() if pool_procs.stop(t.name)]
    stopped += cp.stop()
    if stopped:
        _say(f"stopped: {', '.join(stopped)}")
    else:
        _say("nothing was running")
    return 0


def cmd_status(_args: argparse.Namespace) -> int:
    cp = _control_plane()
    table = ProcessTable(state_dir())
    tracked = table.all() + ProcessTable(state_dir() / "pool").all()
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
    up.add_argument(
        "--members",
        type=int,
        default=3,
        help="members, each with its own swtpm and agent (default 3; 0: only the control plane)",
    )
    up.add_argument("--apiserver-port", type=int, help="kube-apiserver port (default 26443)")
    up.add_argument(
        "--etcd-port",
        type=int,
        help="etcd client port; the peer port is the next one (default 22379)",
    )
    up.set_defaults(func=cmd_up)
    lsub.add_parser("build", help="build the programs only (cached)").set_defaults(func=cmd_build)
    tamper = lsub.add_parser(
        "tamper", help="extend a PCR on a member's swtpm and watch it be quarantined and evacuated"
    )
    tamper.add_argument("member")
    tamper.add_argument("--pcr", type=int, default=7, help="PCR to extend (default 7)")
    tamper.set_defaults(func=cmd_tamper)
    lsub.add_parser("down", help="stop everything gtvp local started").set_defaults(func=cmd_down)
    lsub.add_parser("status", help="what runs").set_defaults(func=cmd_status)
    regen = lsub.add_parser("regen-gomod", help="maintainers: re-pin the Go builds")
    regen.add_argument("--out", required=True, help="directory to write <component>/go.mod into")
    regen.add_argument("--component", help="only this component")
    regen.set_defaults(func=cmd_regen_gomod)


ERRORS: tuple[type[Exception], ...] = (
    toolchain.ToolchainError,
    ControlPlaneError,
    PoolError,
    layout.LayoutError,
    TimeoutError,
    FileNotFoundError,
)


def fail(exc: Exception) -> int:
    print(f"gtvp local: {exc}", file=sys.stderr)
    return 2
