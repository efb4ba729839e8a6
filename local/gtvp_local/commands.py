"""`gtvp local up | down | status | tamper | build`: the local trusted pool on this machine.

Thin shell around `toolchain` (build once), `controlplane` (start, CRDs), `pool` (the trusted
pool), `gtvp.pool_status` (the summary it ends with) and kubectl.
Everything it starts listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from gtvp import local_state, pool_status
from gtvp.core.api_resources import KUBEVIRT_API_VERSION
from gtvp.core.phases import MemberPhase
from gtvp_local import images, installation, layout, realnode, realpool, replicas, toolchain
from gtvp_local.controlplane import ControlPlane, ControlPlaneError, Ports
from gtvp_local.guest.build import BuildError
from gtvp_local.polling import wait_for
from gtvp_local.pool import Pool, PoolError
from gtvp_local.processes import ProcessTable, Tracked, stop_pid, strays
from gtvp_local.swtpm import extend_pcr
from gtvp_local.vmruntime.network import member_net
from gtvp_local.vmruntime.runtime import cleanup as vmruntime_cleanup


def _saved_ports() -> Ports:
    try:
        data = json.loads((local_state.state_dir() / "ports.json").read_text())
        return Ports(**{k: int(v) for k, v in data.items()})
    except (OSError, ValueError, TypeError):
        return Ports()


def _installed_dir() -> Path:
    """Where `up --install helm` keeps the real node, its swtpm and the Installation."""
    return local_state.state_dir() / "installed"


def _helm_mode() -> bool:
    return (_installed_dir() / "mode").is_file()


def _control_plane(ports: Ports | None = None) -> ControlPlane:
    return ControlPlane(
        local_state.state_dir(),
        toolchain.binaries(),
        ports or _saved_ports(),
        node_ip=realnode.NODE_IP if _helm_mode() else None,
    )


def _say(msg: str) -> None:
    print(msg, flush=True)


DEMO_NAMESPACE = "gtvp-demo"
BOX_NAMESPACE, BOX_NAME = "gtvp-samples", "web"  # crds/samples/lazybox.yaml


def _pool(cp: ControlPlane, replicas: int | None = None, vms: str | None = None) -> Pool:
    """The local pool (its replicas and VM runtime as saved, unless told otherwise)."""
    return Pool(cp, local_state.state_dir() / "pool", replicas=replicas, vms=vms)


def _demo_vm(level: int) -> dict[str, object]:
    return {
        "apiVersion": KUBEVIRT_API_VERSION,
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
    cp: ControlPlane,
    name: str = "demo-web",
    namespace: str = DEMO_NAMESPACE,
    *,
    running: bool = False,
) -> str | None:
    """The VMI's node (with `running`: only once its phase is Running)."""
    out = cp.kubectl(
        "get", "vmi", name, "-n", namespace, "-o", "jsonpath={.status.phase} {.status.nodeName}",
        check=False,
    )  # fmt: skip
    phase, _, node = out.stdout.partition(" ")  # no phase yet: " node-1"
    if out.returncode != 0 or (running and phase.strip() != "Running"):
        return None
    return node.strip() or None


def _box(cp: ControlPlane) -> dict[str, Any]:
    out = cp.kubectl("get", "lazybox", BOX_NAME, "-n", BOX_NAMESPACE, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else {}


def _box_running_on(cp: ControlPlane) -> str | None:
    st = _box(cp).get("status") or {}
    node = st.get("node") if st.get("phase") == "Running" else None
    return str(node) if node and _vmi_node(cp, BOX_NAME, BOX_NAMESPACE) == node else None


def _warm_components() -> dict[str, str]:
    """What a warm member caches of the sample catalogue: every component but the
    applications (the kernel and the root filesystem), label -> image."""
    path = layout.repo_root() / "crds" / "samples" / "oscomponents.yaml"
    out = {}
    for doc in yaml.safe_load_all(path.read_text()):
        spec = (doc or {}).get("spec") or {}
        if spec and spec.get("type") != "application":
            out[f"{spec['componentName']} {spec['version']}"] = str(spec["image"])
    return out


def _apply_sample(cp: ControlPlane, path: Path) -> None:
    cp.kubectl("apply", "--server-side", "--field-manager=gtvp-samples", "-f", str(path))


def start_pool(cp: ControlPlane, members: int, replicas: int = 2, vms: str = "qemu") -> Pool:
    """Members with their own swtpm and agent (node-1 and node-2 of identity 3, the others
    2), kwok, the virt-controller stand-in (with `vms="qemu"` real VMs), the operator's
    `replicas` with their webhooks (behind a SIMULATED Service when there are several);
    node-2's component cache already holds most of the sample Lazy Box. Waits until every
    member is Trusted."""
    identities = {f"node-{i}": 3 if i <= 2 else 2 for i in range(1, members + 1)}
    warm = ["node-2"] if members >= 2 else []

    def warm_image_cache(pool: Pool) -> None:
        comps = _warm_components()
        for name in warm:
            if vms == "qemu":
                pool.warm_cache(name, list(comps.values()))
                _say(
                    f"  {name}'s component cache already holds {', '.join(comps)} (fetched "
                    "across its link; Node status.images lists what its cache holds)"
                )
            else:
                _say(
                    f"  SIMULATION: {name}'s image cache already holds {', '.join(comps)} "
                    "(written into Node status.images as its kubelet would report it)"
                )
                pool.set_node_images(name, list(comps.values()))

    pool = _pool(cp, replicas, vms)
    pool.start_trusted(identities, before_start=warm_image_cache, timeout=90, say=_say)
    return pool


BOX_TIMEOUT = 240.0
"""A box's boot under software emulation, with a cold member's component fetch first,
on a loaded two-core machine (it takes about 10 s on a quiet one)."""
GUEST_WORDS = re.compile(r"^(gtvp-init: .*|GTVP-READY .*|gtvp-app(?:-lib)? .*)$", re.MULTILINE)
UPTIME = re.compile(r"gtvp-uptime (\d+)")


def _guest_uptime(pool: Pool) -> int | None:
    """The box guest's own uptime, the last its console said (None before it counts)."""
    found = UPTIME.findall(pool.vm_console(BOX_NAMESPACE, BOX_NAME))
    return int(found[-1]) if found else None


def _box_page(pool: Pool, member: str, timeout: float = 30.0) -> tuple[str, str]:
    """The box's page as its member serves it (the address, the page's text)."""
    net = member_net(pool.dir, member)
    if net is None:
        raise PoolError(f"{member} has no network namespace")
    url = f"http://{net.address}:8080/"

    def fetch() -> str | None:
        try:
            with urllib.request.urlopen(url, timeout=3) as answer:
                html = answer.read().decode(errors="replace")
        except OSError:
            return None
        return " ".join(re.sub(r"<[^>]+>", " ", html).split())

    return url, str(wait_for(f"the box's page at {url}", fetch, timeout))


def _say_attestation(cp: ControlPlane, member: str, prefix: str = "    ") -> None:
    """Wait (bounded) until gtvp verified a quote of the box's vTPM taken on `member`, and
    say so; or say what its status shows instead (the main job goes on either way)."""

    def verified() -> dict[str, Any]:  # {}: not yet (wait_for waits for a true value)
        att = (_box(cp).get("status") or {}).get("attestation") or {}
        return dict(att) if att.get("state") == "Verified" and att.get("member") == member else {}

    try:
        att = wait_for(f"the box's vTPM quote on {member}", verified, 90)
    except TimeoutError:
        att = (_box(cp).get("status") or {}).get("attestation") or {}
        _say(
            f"{prefix}its vTPM was NOT attested on {member} yet: state "
            f"{att.get('state', 'none')} {att.get('reason', '')} {att.get('message', '')}".rstrip()
        )
        return
    _say(
        f"{prefix}gtvp verified a fresh quote of its vTPM on {member} (docs/boxattest.md): "
        f"PCR 13 holds exactly its measured disks ({', '.join(att.get('components') or [])})"
    )


def _show_box(cp: ControlPlane, pool: Pool) -> None:
    real = pool.vms == "qemu"
    _say(
        f"  Lazy Box {BOX_NAMESPACE}/{BOX_NAME} (crds/samples/lazybox.yaml): hello-web and "
        "its dependencies, level 2"
    )
    node = str(
        wait_for(
            f"Lazy Box {BOX_NAME} to run", lambda: _box_running_on(cp), BOX_TIMEOUT if real else 60
        )
    )
    st = _box(cp)["status"]
    comps = ", ".join(f"{r['name']} {r['version']}" for r in st.get("resolved") or [])
    _say(f"    resolved and verified (signed by the sample publisher): {comps}")
    _say(
        f"    composed into VirtualMachine {BOX_NAMESPACE}/{st['vm']['name']} (kernel boot, "
        "container disks, cloud-init)"
    )
    _say(f"    placed on {st['placement']['reason']}")
    if not real:
        return
    _say(f"    booted under qemu on {node}; the guest's own words (serial console):")
    for line in GUEST_WORDS.findall(pool.vm_console(BOX_NAMESPACE, BOX_NAME)):
        _say(f"      | {line.strip()}")
    url, page = _box_page(pool, node)
    _say(f"    its page at {url} (from this host): {page}")
    _say_attestation(cp, node)


# ----- gtvp local up, step by step -----------------------------------------------------------
def _start_control_plane(args: argparse.Namespace, steps: int) -> ControlPlane:
    """etcd and kube-apiserver on the ports asked for, else on those of the last run."""
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
    state = local_state.state_dir()
    state.mkdir(parents=True, exist_ok=True)
    (state / "ports.json").write_text(json.dumps(asdict(ports)))
    cp.start()
    return cp


def _install_crds(cp: ControlPlane, steps: int) -> None:
    _say(
        f"step 3/{steps}: CRDs: gtvp.io (Member, SecurityPolicy, OSComponent, LazyBox) and "
        "KubeVirt's own schemas (kubevirt.io; no KubeVirt runs here)"
    )
    cp.apply_crds(layout.gtvp_crds() + layout.kubevirt_crds())


def _apply_samples(cp: ControlPlane, steps: int, *, with_pool: bool) -> None:
    _say(f"step 4/{steps}: samples from crds/samples/")
    for sample in layout.samples():
        if with_pool and sample.name == "members.yaml":
            continue  # the pool's own members stand in for the sample ones
        if with_pool and sample.name == "lazybox.yaml":
            continue  # applied once the pool is trusted, so that placement has a choice
        _apply_sample(cp, sample)


def _run_trusted_pool(
    cp: ControlPlane, members: int, steps: int, *, box: bool, replicas: int, vms: str
) -> None:
    """The pool, a VM that needs level 3 and (with the samples) the sample Lazy Box."""
    _say(
        f"step {steps}/{steps}: the trusted pool: {members} members, {replicas} operator replica(s)"
    )
    pool = start_pool(cp, members, replicas, vms)
    cp.kubectl("create", "namespace", DEMO_NAMESPACE, check=False)
    _say("  a VM that needs level 3 (label gtvp.io/level=3): the webhook adds the trust selector")
    cp.kubectl("apply", "-f", "-", input_text=json.dumps(_demo_vm(3)))
    node = wait_for(
        "demo-web to run", lambda: _vmi_node(cp, running=True), BOX_TIMEOUT if vms == "qemu" else 30
    )
    _say(
        f"  {DEMO_NAMESPACE}/demo-web runs on {node}"
        + (" (a real VM: qemu booted the runtime's small test guest)" if vms == "qemu" else "")
    )
    if box:
        pool.bind_key_release(BOX_NAMESPACE)  # gtvp writes the box's cloud-init Secret there
        _apply_sample(cp, layout.repo_root() / "crds" / "samples" / "lazybox.yaml")
        _show_box(cp, pool)


def _show_what_runs(cp: ControlPlane, started: float, *, with_pool: bool) -> None:
    """The server's version, then the pool's summary (or, without a pool, the samples)."""
    _say("")
    version = cp.kubectl("version", "-o", "yaml").stdout
    server_line = next((ln.strip() for ln in version.splitlines() if "gitVersion" in ln), "")
    _say(
        f"server {server_line.split(':', 1)[-1].strip() or '?'} is up "
        f"({time.monotonic() - started:.0f}s)"
    )
    if with_pool:
        _say("")
        _say(pool_status.summary(str(cp.admin_kubeconfig)))
        return
    for kind in ("securitypolicies", "members", "oscomponents", "lazyboxes -A"):
        out = cp.kubectl("get", *kind.split())
        _say(f"\n$ kubectl get {kind}\n{out.stdout.rstrip() or out.stderr.strip()}")


def gtvp_command(path: str | None = None, running: str | None = None) -> str:
    """How to run this very `gtvp` from a shell whose PATH is `path` ($PATH by default):
    `gtvp` when that finds this installation, else its full path (`make demo` runs the one
    in gtvp's virtualenv, which is on no PATH unless its bin directory is)."""
    mine = Path(running or Path(sys.executable).parent / "gtvp")
    if not mine.is_file():
        return "gtvp"  # not run from an installed entry point (python -m gtvp.cli)
    found = shutil.which("gtvp", path=os.environ.get("PATH", "") if path is None else path)
    if found and Path(found).resolve() == mine.resolve():
        return "gtvp"
    return str(mine)


def _show_how_to_use(cp: ControlPlane, *, with_pool: bool) -> None:
    gtvp = gtvp_command()
    _say("\nUse it:")
    _say(f"  export KUBECONFIG={cp.admin_kubeconfig}")
    _say(f"  {toolchain.binaries().kubectl} get members   # the same kubectl gtvp built")
    if with_pool:
        node = _box_running_on(cp) or _vmi_node(cp) or "node-1"
        _say(
            f"  {gtvp} local tamper {node}     # extend a PCR on its swtpm: quarantine + evacuation"
        )
        _say(f"  {gtvp} status                  # the pool at a glance")
    _say(f"Stop it: {gtvp} local down")
    if gtvp != "gtvp":
        _say(
            "  (gtvp is not on your PATH; to type just `gtvp`: "
            f'export PATH="{Path(gtvp).parent}:$PATH")'
        )


def _tracked() -> list[Tracked]:
    """Every process `gtvp local` started: control plane, pool, real node and its swtpm."""
    state = local_state.state_dir()
    dirs = (state, state / "pool", _installed_dir(), _installed_dir() / "node")
    return [t for d in dirs for t in ProcessTable(d).all()]


def _refuse_a_running_pool() -> None:
    """`up` on a pool that runs would start a second kwok, stand-in and operator beside
    the first: say so instead. A half-started one (something of it dead) is cleaned."""
    cp = _control_plane()
    tracked = _tracked()
    alive = [t.name for t in tracked if t.alive()]
    if alive and len(alive) == len(tracked) and cp.ready():
        raise PoolError(
            f"the local pool already runs ({', '.join(alive)}; API server {cp.server}). "
            "`gtvp local status` shows it; `gtvp local down` stops it (add --purge to start "
            "from a fresh pool)"
        )
    if alive:
        _say(f"a half-started previous run is left ({', '.join(alive)}): stopping it first")
        _stop_everything()


def _up_installed(args: argparse.Namespace) -> int:
    """`up --install helm`: gtvp installed by its chart, its pods on this machine's real node."""
    started = time.monotonic()
    _say("gtvp local: gtvp installed by its Helm chart on a real node of this machine")
    _say(
        "step 1/4: programs (etcd, kube-apiserver, kubectl, kubelet, kube-proxy, kube-scheduler, "
        "kube-controller-manager, helm), built from Go modules"
    )
    toolchain.ensure_all()
    missing = realnode.missing_programs()
    if missing:
        raise PoolError("the real node needs: " + "; ".join(missing) + " (make setup)")
    _installed_dir().mkdir(parents=True, exist_ok=True)
    (_installed_dir() / "mode").write_text("helm\n")
    cp = _start_control_plane(args, 4)
    _say(
        f"  (it listens on {realnode.NODE_IP} too, the node's address: the pods reach it "
        "through the kubernetes Service)"
    )
    _say("step 3/4: KubeVirt's CRDs (kubevirt.io schemas; gtvp's CRDs come with the chart)")
    cp.apply_crds(layout.kubevirt_crds())
    _say("step 4/4: gtvp by Helm on the real node")
    realpool.install(cp, _installed_dir(), replicas=args.replicas, say=_say)
    _say("")
    _say(f"up in {time.monotonic() - started:.0f}s; nothing here is simulated:")
    pods = cp.kubectl("get", "pods", "-n", installation.NAMESPACE, "-o", "wide")
    _say(f"$ kubectl get pods -n {installation.NAMESPACE} -o wide\n{pods.stdout.rstrip()}")
    _say("")
    _say(pool_status.summary(str(cp.admin_kubeconfig)))
    gtvp = gtvp_command()
    _say("\nUse it:")
    _say(f"  export KUBECONFIG={cp.admin_kubeconfig}")
    _say(f"  {toolchain.binaries().kubectl} -n {installation.NAMESPACE} logs ds/gtvp-agent")
    _say(f"  {gtvp} local tamper {realnode.NODE_NAME}   # extend a PCR on its swtpm: quarantine")
    _say(f"  {gtvp} status")
    _say(f"Stop it: {gtvp} local down")
    return 0


def _build_guest_components() -> None:
    """The sample catalogue's components, built here from the pinned Debian packages
    (cached), and checked against the digests crds/samples/oscomponents.yaml pins."""
    if os.geteuid() != 0:
        raise PoolError(
            "real VMs need root (a network namespace per member); --vms phases runs the pool "
            "without VMs"
        )
    missing = [t for t in ("qemu-system-x86_64", "mksquashfs", "ip") if not shutil.which(t)]
    if missing:
        raise PoolError(
            f"real VMs need {', '.join(missing)} (make setup installs them); "
            "--vms phases runs the pool without VMs"
        )
    from gtvp_local.guest import samples

    try:
        built = samples.built_docs()
    except BuildError as exc:
        raise PoolError(f"cannot build the guest components: {exc}") from None
    diff = samples.differences(built, samples.load(samples.samples_path()))
    if diff:
        raise PoolError(
            "crds/samples/oscomponents.yaml does not pin what this machine builds ("
            + "; ".join(diff)
            + "): `make samples` rewrites it"
        )
    for doc in built:
        spec = doc["spec"]
        _say(
            f"  {spec['componentName']} {spec['version']} ({spec['type']}): {spec['digest'][:19]}… "
            f"{spec['sizeBytes'] / 1e6:.1f} MB, reproducible, as the sample pins it"
        )


def cmd_up(args: argparse.Namespace) -> int:
    if args.replicas < 1:
        raise PoolError("--replicas: the pool runs at least one operator replica")
    _refuse_a_running_pool()
    if args.install == "helm":
        return _up_installed(args)
    shutil.rmtree(_installed_dir(), ignore_errors=True)  # not a helm pool (any more)
    started = time.monotonic()
    with_pool = bool(args.members)
    real_vms = with_pool and args.vms == "qemu"
    steps = 5 if with_pool else 4
    _say("gtvp local: a trusted pool on this machine (loopback only)")
    _say(
        f"step 1/{steps}: programs (etcd, kube-apiserver, kubectl, kwok, helm), built from "
        "Go modules" + ("; the sample's guest components" if real_vms else "")
    )
    toolchain.ensure_all()
    if real_vms:
        _build_guest_components()
    cp = _start_control_plane(args, steps)
    _install_crds(cp, steps)
    if not args.no_samples:
        _apply_samples(cp, steps, with_pool=with_pool)
    if with_pool:
        _run_trusted_pool(
            cp,
            args.members,
            steps,
            box=not args.no_samples,
            replicas=args.replicas,
            vms=args.vms,
        )
    _show_what_runs(cp, started, with_pool=with_pool)
    _show_how_to_use(cp, with_pool=with_pool)
    return 0


# ----- gtvp local tamper, step by step -------------------------------------------------------
def _stopwatch() -> Callable[[], str]:
    """Time since now, as the lines of `gtvp local tamper` begin (`t+ 2.7s`)."""
    t0 = time.monotonic()
    return lambda: f"t+{time.monotonic() - t0:4.1f}s"


def _watch_quarantine(cp: ControlPlane, member: str, elapsed: Callable[[], str]) -> None:
    """Until the member is Untrusted and its Node tainted."""

    def untrusted() -> dict[str, Any] | None:
        now = _member_status(cp, member)
        return now if now.get("phase") == MemberPhase.UNTRUSTED else None

    got = wait_for(f"{member} Untrusted", untrusted, 60)
    trust = (got or {}).get("trust") or {}
    _say(f"{elapsed()}  {member} Untrusted: {trust.get('reason')}: {trust.get('message')}")
    wait_for(
        "the taint",
        lambda: (
            "gtvp.io/untrusted"
            in cp.kubectl("get", "node", member, "-o", "jsonpath={.spec.taints[*].key}").stdout
        ),
        30,
    )
    _say(
        f"{elapsed()}  node {member}: trust labels removed, tainted "
        "gtvp.io/untrusted:NoSchedule (never NoExecute: VMs are migrated, not killed)"
    )


def _watch_vm(
    cp: ControlPlane, member: str, before: str | None, elapsed: Callable[[], str]
) -> None:
    """Until the demo VM left the member, if it ran there."""
    if before != member:
        _say(f"  ({DEMO_NAMESPACE}/demo-web runs on {before}, so nothing had to move)")
        return

    def evacuations() -> list[str]:
        return cp.kubectl(
            "get",
            "vmim",
            "-n",
            DEMO_NAMESPACE,
            "-l",
            f"gtvp.io/evacuation={member}",
            "-o",
            "name",
        ).stdout.split()

    wait_for("an evacuation migration", evacuations, 30)
    _say(f"{elapsed()}  evacuation started: {', '.join(evacuations())}")
    node = wait_for("demo-web to move", lambda: (n := _vmi_node(cp)) != member and n, 60)
    _say(f"{elapsed()}  {DEMO_NAMESPACE}/demo-web now runs on {node} (trusted, level 3)")


def _watch_box(pool: Pool, member: str, before: str | None, elapsed: Callable[[], str]) -> None:
    """Until the sample Lazy Box left the member, if it ran there; with real VMs, until the
    guest counts on at its new member (no reboot) and its page answers there."""
    cp, real = pool.cp, pool.vms == "qemu"
    if before != member:
        if before:
            _say(f"  (Lazy Box {BOX_NAMESPACE}/{BOX_NAME} runs on {before}, so it stays)")
        return
    uptime = _guest_uptime(pool) if real else None
    node = str(
        wait_for(
            "the Lazy Box to move",
            lambda: (n := _box_running_on(cp)) != member and n,
            BOX_TIMEOUT if real else 60,
        )
    )
    _say(
        f"{elapsed()}  Lazy Box {BOX_NAMESPACE}/{BOX_NAME} live-migrated to {node} "
        "(trusted, level >= 2)"
        + (": a real qemu live migration between the members" if real else "")
    )
    if not real:
        return
    moved = _migration_line(pool)
    if moved:
        _say(f"{elapsed()}    {moved}")
    if uptime is not None:
        later = wait_for(
            "the guest to count on", lambda: (u := _guest_uptime(pool)) and u > uptime + 1 and u, 30
        )
        _say(
            f"{elapsed()}    the guest did not reboot: its uptime went on from {uptime} s "
            f"before the tamper to {later} s on {node}"
        )
    url, page = _box_page(pool, node)
    _say(f"{elapsed()}    its page answers at {url}: {page}")
    _say_attestation(cp, node, prefix=f"{elapsed()}    ")


def _migration_line(pool: Pool) -> str | None:
    """What the SIMULATED virt-handler said of the box's last live migration (its log)."""
    lines = [
        ln[ln.index("[SIMULATED") :]
        for ln in pool.procs.log_tail("virtsim", 200).splitlines()
        if f"migration of {BOX_NAMESPACE}/{BOX_NAME} " in ln
        and ": completed" in ln
        and "[SIMULATED" in ln
    ]
    return lines[-1] if lines else None


def _tamper_installed(cp: ControlPlane, args: argparse.Namespace) -> int:
    inst = installation.Installation.load(_installed_dir() / "installation.json")
    member = args.member or realnode.NODE_NAME
    if member not in inst.members:
        raise ControlPlaneError(
            f"{member} is not a member of the installed pool ({', '.join(inst.members)})"
        )
    _say(
        f"tampering with {member}: extending PCR {args.pcr} on its swtpm "
        f"({inst.members[member]}), which the agent pod quotes"
    )
    elapsed = _stopwatch()
    extend_pcr(inst.members[member], args.pcr, b"gtvp local tamper")
    _watch_quarantine(cp, member, elapsed)
    _say("")
    _say(pool_status.summary(str(cp.admin_kubeconfig)))
    return 0


def _member_status(cp: ControlPlane, member: str) -> dict[str, Any]:
    got = cp.kubectl("get", "member", member, "-o", "json", check=False)
    if got.returncode != 0:
        return {}
    status: dict[str, Any] = json.loads(got.stdout).get("status") or {}
    return status


def cmd_tamper(args: argparse.Namespace) -> int:
    cp = _control_plane()
    if not cp.ready():
        raise ControlPlaneError("the local pool is not running: gtvp local up")
    if _helm_mode():
        return _tamper_installed(cp, args)
    pool = _pool(cp)
    vm_before, box_before = _vmi_node(cp), _box_running_on(cp)
    member = args.member or box_before or vm_before
    if member is None or member not in pool.members():
        raise ControlPlaneError(
            f"{member or 'no member runs the sample Lazy Box or the demo VM; name one: it'} "
            f"is not a member of the local pool ({', '.join(pool.members())})"
        )
    _say(
        f"tampering with {member}"
        + ("" if args.member else " (it runs the sample Lazy Box)" if box_before else "")
        + f": extending PCR {args.pcr} on its swtpm "
        "(as a rogue boot component would, with tpm2-tools' tpm2_pcrextend)"
    )
    elapsed = _stopwatch()
    pool.extend_pcr(member, args.pcr, b"gtvp local tamper")
    _watch_quarantine(cp, member, elapsed)
    _watch_vm(cp, member, vm_before, elapsed)
    _watch_box(pool, member, box_before, elapsed)
    _say("")
    _say(pool_status.summary(str(cp.admin_kubeconfig)))
    return 0


def cmd_build(_args: argparse.Namespace) -> int:
    missing = [c.name for c in toolchain.COMPONENTS if not c.is_built()]
    if not missing:
        _say(f"programs cached in {local_state.cache_dir() / 'bin'}")
        return 0
    _say(f"building from Go modules: {', '.join(missing)} (first time only; a few minutes each)")
    toolchain.ensure_all()
    return 0


def cmd_images(args: argparse.Namespace) -> int:
    """Build (or find cached) the image, run its programs in it, import it into containerd."""
    from gtvp_local import imagecheck

    started = time.monotonic()
    image = images.build(layout.repo_root(), refresh=args.refresh)
    how = "cached" if image.cached else f"built in {image.seconds:.0f}s"
    _say(f"image {image.reference} ({how})")
    _say(f"  archive: {image.archive} (OCI image layout, {image.size / 2**20:.1f} MiB)")
    _say(f"  digest:  {image.digest}")
    if not args.no_check:
        _say(f"  run in the image ({imagecheck.runner_name()}):")
        for line in imagecheck.check(image):
            _say(f"    {line}")
    if not args.no_import:
        _say(f"  {imagecheck.import_into_containerd(image, args.containerd_address)}")
    _say(f"done in {time.monotonic() - started:.1f}s")
    return 0


def _stop_everything() -> list[str]:
    """Stop what this state directory started: the pool's processes, the control plane,
    then strays (processes marked with this state directory that no pid file names, as a
    pid file overwritten by a second `up` leaves behind). Returns what was running."""
    cp = _control_plane()
    pool_procs = ProcessTable(local_state.state_dir() / "pool")
    stopped = [t.name for t in pool_procs.all() if pool_procs.stop(t.name)]
    # the pool's VMs, their member namespaces, veths and (once unused) the bridge
    stopped += vmruntime_cleanup(local_state.state_dir() / "pool")
    if _installed_dir().is_dir():
        stopped += realpool.stop(cp, _installed_dir())  # the node before its API server
    stopped += cp.stop()
    for pid in strays(local_state.state_dir(), known=set()):
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            name = "?"
        stop_pid(pid)
        stopped.append(f"{name} (stray, pid {pid})")
    return stopped


def cmd_down(args: argparse.Namespace) -> int:
    stopped = _stop_everything()
    if stopped:
        _say(f"stopped: {', '.join(stopped)}")
    else:
        _say("nothing was running")
    if getattr(args, "purge", False) and local_state.state_dir().exists():
        # the pool's etcd data, TPMs, certificates and kubeconfigs: the next `up` starts anew
        shutil.rmtree(local_state.state_dir())
        _say(f"removed the pool's state ({local_state.state_dir()}); the next up starts fresh")
    return 0


def _replica_lines(cp: ControlPlane) -> list[str]:
    """Which replica holds which shards, leads, and is ready (empty without replicas)."""
    pool = _pool(cp)
    if not pool.replicas:
        return []
    out = cp.kubectl("get", "members", "-o", "jsonpath={.items[*].metadata.name}", check=False)
    running = {}
    for r in pool.replicas:
        tracked = pool.procs.get(r.process)
        running[r.identity] = bool(tracked and tracked.alive())
    lines = replicas.report(
        pool.leases(),
        pool.replicas,
        running=running,
        ready={r.identity: pool.replica_ready(r.index) for r in pool.replicas},
        members=out.stdout.split() if out.returncode == 0 else [],
        shards=pool.timings.shards,
    )
    if pool.replica_count > 1 and pool.webhook_port:
        lines.append(
            f"  webhooks: 127.0.0.1:{pool.webhook_port}, a SIMULATED Service "
            "(gtvp_local.frontend) in front of the ready replicas"
        )
    return lines


def cmd_status(_args: argparse.Namespace) -> int:
    cp = _control_plane()
    tracked = _tracked()
    if not tracked:
        _say(f"gtvp local: nothing runs (state in {local_state.state_dir()})")
        return 1
    down = [t.name for t in tracked if not t.alive()]
    for t in tracked:
        _say(f"{t.name:16} pid {t.pid:<8} {'NOT RUNNING' if t.name in down else 'running'}")
    ready = cp.ready()
    _say(f"kube-apiserver {cp.server}: {'ready' if ready else 'not ready'}")
    if ready:
        for line in _replica_lines(cp):
            _say(line)
    _say(f"KUBECONFIG={cp.admin_kubeconfig}")
    if down:
        _say(f"not running: {', '.join(down)} (gtvp local down, then gtvp local up, restarts all)")
    return 0 if ready and not down else 1


def cmd_regen_gomod(args: argparse.Namespace) -> int:
    for comp in toolchain.COMPONENTS + toolchain.BENCH_COMPONENTS:
        if args.component and comp.name != args.component:
            continue
        dest = Path(args.out) / comp.name
        _say(f"regenerating {comp.name} {comp.version} into {dest}")
        toolchain.regenerate(comp, dest)
    return 0


def _count(text: str) -> int:
    """A number of members: 0 or more."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"{n}: a pool cannot have fewer than 0 members")
    return n


def register(local: argparse.ArgumentParser) -> None:
    """`gtvp local`'s sub-commands and arguments (gtvp.cli names the command)."""
    lsub = local.add_subparsers(dest="local_cmd", required=True)
    up = lsub.add_parser("up", help="build (first time), start, install CRDs and samples")
    up.add_argument("--no-samples", action="store_true", help="do not apply crds/samples")
    up.add_argument(
        "--members",
        type=_count,
        default=3,
        help="members, each with its own swtpm and agent (default 3; 0: only the control plane)",
    )
    up.add_argument(
        "--replicas",
        type=int,
        default=2,
        help="gtvp-operator replicas sharing the members through Leases (default 2)",
    )
    up.add_argument(
        "--install",
        choices=("processes", "helm"),
        default="processes",
        help="processes (default): the operator and agents as processes beside kwok Nodes "
        "(simulated); helm: the chart with images built here, its pods on a real kubelet node "
        "of this machine (root; --members does not apply)",
    )
    up.add_argument(
        "--vms",
        choices=("qemu", "phases"),
        default="qemu",
        help="qemu (default): every VMI a real VM (qemu, software emulation unless KVM works) "
        "in its member's network namespace, migrations real live migrations; phases: the "
        "stand-in only moves VMIs through their phases (no qemu needed)",
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
    tamper.add_argument(
        "member",
        nargs="?",
        help="the member to tamper with (default: the one running the sample Lazy Box)",
    )
    tamper.add_argument("--pcr", type=int, default=7, help="PCR to extend (default 7)")
    tamper.set_defaults(func=cmd_tamper)
    down = lsub.add_parser("down", help="stop everything gtvp local started")
    down.add_argument(
        "--purge",
        action="store_true",
        help="also remove the pool's state (etcd data, TPMs, certificates): start fresh",
    )
    down.set_defaults(func=cmd_down)
    lsub.add_parser("status", help="what runs").set_defaults(func=cmd_status)
    img = lsub.add_parser(
        "images",
        help="build gtvp's container image (debootstrap + umoci, cached), run it, import it",
    )
    img.add_argument("--refresh", action="store_true", help="rebuild from a fresh debootstrap")
    img.add_argument("--no-check", action="store_true", help="do not run the image's programs")
    img.add_argument("--no-import", action="store_true", help="do not import into containerd")
    img.add_argument(
        "--containerd-address",
        default=os.environ.get("CONTAINERD_ADDRESS", "/run/containerd/containerd.sock"),
        help="containerd's socket (the import is skipped when it does not exist)",
    )
    img.set_defaults(func=cmd_images)
    regen = lsub.add_parser("regen-gomod", help="maintainers: re-pin the Go builds")
    regen.add_argument("--out", required=True, help="directory to write <component>/go.mod into")
    regen.add_argument("--component", help="only this component")
    regen.set_defaults(func=cmd_regen_gomod)


ERRORS: tuple[type[Exception], ...] = (
    toolchain.ToolchainError,
    images.ImageError,
    ControlPlaneError,
    PoolError,
    layout.LayoutError,
    TimeoutError,
    FileNotFoundError,
)


def fail(exc: Exception) -> int:
    print(f"gtvp local: {exc}", file=sys.stderr)
    return 2
