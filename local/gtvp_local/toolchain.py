"""Build the local control plane's programs from Go modules, once, into a cache outside the repo.

Pinned components (etcd, kube-apiserver + kubectl, kwok, helm) are built with the machine's
`go` from the Go module proxy. Each has a committed go.mod/go.sum under `gobuild/<name>/`;
the build happens in a scratch copy under the cache so the repository is never written.
Binaries land in `<cache>/bin/<component>-<version>-<hash>/`, where the hash covers the
go.mod, go.sum and flags, so a changed pin rebuilds and an unchanged one starts at once.

This module prints progress (component, elapsed time) during long builds; it never
downloads prebuilt binaries.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from gtvp.local_state import cache_dir

KUBERNETES_VERSION = "v1.36.3"
ETCD_VERSION = "v3.6.16"
KWOK_VERSION = "v0.8.0"
HELM_VERSION = "v3.22.0"
DESCHEDULER_VERSION = "v0.36.0"


class ToolchainError(RuntimeError):
    """A component could not be built; the message says what to do."""


def _k8s_ldflags() -> list[str]:
    major, minor = KUBERNETES_VERSION.lstrip("v").split(".")[:2]
    flags = []
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [
            f"-X {pkg}.gitVersion={KUBERNETES_VERSION}",
            f"-X {pkg}.gitMajor={major}",
            f"-X {pkg}.gitMinor={minor}",
            f"-X {pkg}.gitTreeState=clean",
            f"-X {pkg}.gitCommit=go-module-{KUBERNETES_VERSION}",
            f"-X {pkg}.buildDate=1970-01-01T00:00:00Z",
        ]
    return flags


def _helm_ldflags() -> tuple[str, ...]:
    """helm's version, and the Kubernetes version `helm template` and `helm lint` assume
    without --kube-version: as helm's Makefile sets it, from the client-go it is built with
    (v0.N -> 1.N), else helm assumes 1.20 and refuses charts that need newer."""
    gomod = (resources.files("gtvp_local") / "gobuild" / "helm" / "go.mod").read_text()
    found = re.search(r"k8s\.io/client-go v0\.(\d+)\.", gomod)
    if found is None:
        raise ToolchainError("gobuild/helm/go.mod names no k8s.io/client-go v0.N version")
    flags = [f"-X helm.sh/helm/v3/internal/version.version={HELM_VERSION}"]
    for pkg in ("helm.sh/helm/v3/pkg/lint/rules", "helm.sh/helm/v3/pkg/chartutil"):
        flags += [f"-X {pkg}.k8sVersionMajor=1", f"-X {pkg}.k8sVersionMinor={found.group(1)}"]
    return tuple(flags)


@dataclass(frozen=True)
class Component:
    """One Go build: a gobuild/ directory, the packages it builds, the binaries it yields."""

    name: str
    version: str
    packages: tuple[str, ...]
    binaries: tuple[str, ...]
    ldflags: tuple[str, ...] = field(default=())
    built_as: tuple[tuple[str, str], ...] = field(default=())
    """(go's output name, our name) where they differ: etcd's main package builds `server`."""

    def _sources(self) -> tuple[bytes, bytes]:
        base = resources.files("gtvp_local") / "gobuild" / self.name
        return (base / "go.mod").read_bytes(), (base / "go.sum").read_bytes()

    def fingerprint(self) -> str:
        mod, summ = self._sources()
        h = hashlib.sha256(mod + b"\0" + summ + b"\0" + " ".join(self.ldflags).encode())
        return h.hexdigest()[:10]

    def bin_dir(self) -> Path:
        return cache_dir() / "bin" / f"{self.name}-{self.version}-{self.fingerprint()}"

    def is_built(self) -> bool:
        return all((self.bin_dir() / b).is_file() for b in self.binaries)


COMPONENTS: tuple[Component, ...] = (
    Component(
        "etcd",
        ETCD_VERSION,
        ("go.etcd.io/etcd/server/v3",),
        ("etcd",),
        built_as=(("server", "etcd"),),
    ),
    Component(
        "kubernetes",
        KUBERNETES_VERSION,
        ("k8s.io/kubernetes/cmd/kube-apiserver", "k8s.io/kubernetes/cmd/kubectl"),
        ("kube-apiserver", "kubectl"),
        tuple(_k8s_ldflags()),
    ),
    # the real node's programs (`gtvp_local.realnode`): a separate build so that the control
    # plane's stays cached; the same k8s.io/kubernetes pin, its go.sum grown by the kubelet's
    # extra modules (cadvisor, cri-api, ...)
    Component(
        "kubernetes-node",
        KUBERNETES_VERSION,
        (
            "k8s.io/kubernetes/cmd/kubelet",
            "k8s.io/kubernetes/cmd/kube-proxy",
            "k8s.io/kubernetes/cmd/kube-scheduler",
            "k8s.io/kubernetes/cmd/kube-controller-manager",
        ),
        ("kubelet", "kube-proxy", "kube-scheduler", "kube-controller-manager"),
        tuple(_k8s_ldflags()),
    ),
    Component("kwok", KWOK_VERSION, ("sigs.k8s.io/kwok/cmd/kwok",), ("kwok",)),
    Component("helm", HELM_VERSION, ("helm.sh/helm/v3/cmd/helm",), ("helm",), _helm_ldflags()),
)


BENCH_COMPONENTS: tuple[Component, ...] = (
    # the Kubernetes descheduler, only for the balancing benchmark (tests/bench): not part of
    # `ensure_all`, built on first use by `descheduler()`. Its go.mod carries the module's own
    # `replace k8s.io/kube-openapi` (a replace in a dependency does not apply to its users,
    # and the version it requires is not served by the proxy)
    Component(
        "descheduler",
        DESCHEDULER_VERSION,
        ("sigs.k8s.io/descheduler/cmd/descheduler",),
        ("descheduler",),
        (
            f"-X sigs.k8s.io/descheduler/pkg/version.version={DESCHEDULER_VERSION}",
            "-X sigs.k8s.io/descheduler/pkg/version.buildDate=1970-01-01T00:00:00Z",
            f"-X sigs.k8s.io/descheduler/pkg/version.gitsha1=go-module-{DESCHEDULER_VERSION}",
        ),
    ),
)


def component(name: str) -> Component:
    for c in COMPONENTS + BENCH_COMPONENTS:
        if c.name == name:
            return c
    raise KeyError(name)


@dataclass(frozen=True)
class Binaries:
    """Paths of every program the local control plane uses."""

    etcd: Path
    kube_apiserver: Path
    kubectl: Path
    kwok: Path
    helm: Path


def binaries() -> Binaries:
    """Paths of the cached binaries (they may not be built yet)."""
    return Binaries(
        etcd=component("etcd").bin_dir() / "etcd",
        kube_apiserver=component("kubernetes").bin_dir() / "kube-apiserver",
        kubectl=component("kubernetes").bin_dir() / "kubectl",
        kwok=component("kwok").bin_dir() / "kwok",
        helm=component("helm").bin_dir() / "helm",
    )


def _find_go() -> str:
    go = shutil.which("go") or (
        "/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None
    )
    if not go:
        raise ToolchainError(
            "`go` was not found on PATH. gtvp builds etcd, kube-apiserver, kubectl, kwok and helm "
            "from Go modules; install Go >= 1.26 (https://go.dev/doc/install) and run the "
            "command again."
        )
    return go


def _progress(label: str, stop: threading.Event, out: Sequence[str] = ()) -> None:
    start = time.monotonic()
    while not stop.wait(15.0):
        mins, secs = divmod(int(time.monotonic() - start), 60)
        print(f"  ... still building {label} ({mins}m{secs:02d}s)", file=sys.stderr, flush=True)


def work_dir(comp: Component) -> Path:
    """Where `comp` is built (its go.mod, go.sum and the per-process output directories)."""
    return cache_dir() / "build" / f"{comp.name}-{comp.version}-{comp.fingerprint()}"


@contextlib.contextmanager
def build_lock(comp: Component, *, verbose: bool = False) -> Iterator[None]:
    """Hold `comp`'s build lock (an flock on `<work dir>.lock`): a second `gtvp local build`
    (or test run) waits for the first instead of rewriting the go.mod it is building from;
    the lock goes with the process that holds it, however it ends."""
    lock = work_dir(comp).with_suffix(".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if verbose:
                print(
                    f"waiting for another build of {comp.name} {comp.version} to finish",
                    file=sys.stderr,
                    flush=True,
                )
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build(comp: Component, *, verbose: bool = True) -> Path:
    """Build one component unless its binaries are cached; return its bin directory. One
    build of a component at a time (`build_lock`); whoever waited finds it built."""
    if comp.is_built():
        return comp.bin_dir()
    with build_lock(comp, verbose=verbose):
        if comp.is_built():  # built by the run we waited for
            return comp.bin_dir()
        return _build_locked(comp, verbose=verbose)


def _build_locked(comp: Component, *, verbose: bool) -> Path:
    go = _find_go()
    mod, summ = comp._sources()
    work = work_dir(comp)
    work.mkdir(parents=True, exist_ok=True)
    (work / "go.mod").write_bytes(mod)
    (work / "go.sum").write_bytes(summ)
    staging = work / f"out-{os.getpid()}"  # two builds at once (two test runs) never share it
    staging.mkdir(exist_ok=True)
    label = f"{comp.name} {comp.version}"
    if verbose:
        print(
            f"building {label} from Go modules (first time only; cached in {comp.bin_dir()})",
            file=sys.stderr,
            flush=True,
        )
    cmd = [
        go,
        "build",
        "-mod=readonly",
        "-trimpath",
        "-ldflags",
        " ".join(("-s", "-w", *comp.ldflags)),
        "-o",
        str(staging) + "/",
        *comp.packages,
    ]
    env = dict(os.environ, CGO_ENABLED="0", GOFLAGS="-buildvcs=false")
    stop = threading.Event()
    ticker = threading.Thread(target=_progress, args=(label, stop), daemon=True)
    started = time.monotonic()
    if verbose:
        ticker.start()
    try:
        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, check=False)
    finally:
        stop.set()
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-25:])
        raise ToolchainError(
            f"building {label} failed (exit {proc.returncode}) in {work}:\n{tail}\n"
            "Check that this machine reaches the Go module proxy (GOPROXY) and has disk space; "
            "the build resumes from Go's cache when run again."
        )
    dest = comp.bin_dir()
    dest.mkdir(parents=True, exist_ok=True)
    built_names = {ours: go_name for go_name, ours in comp.built_as}
    for b in comp.binaries:
        os.replace(staging / built_names.get(b, b), dest / b)  # atomic: a reader sees a whole file
    shutil.rmtree(staging, ignore_errors=True)
    if verbose:
        print(f"built {label} in {time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)
    return dest


def descheduler(*, verbose: bool = True) -> Path:
    """The Kubernetes descheduler's binary, built from its Go module on first use (a
    ToolchainError says why when the build fails)."""
    return build(component("descheduler"), verbose=verbose) / "descheduler"


def ensure_all(*, verbose: bool = True) -> Binaries:
    """Build every missing component (progress on stderr) and return their paths."""
    missing = [c for c in COMPONENTS if not c.is_built()]
    for i, comp in enumerate(missing, 1):
        if verbose:
            print(f"[{i}/{len(missing)}]", end=" ", file=sys.stderr, flush=True)
        build(comp, verbose=verbose)
    return binaries()


def kubernetes_gomod(
    kubernetes_gomod_text: str, *, version: str = KUBERNETES_VERSION, name: str = "kubernetes"
) -> str:
    """A go.mod that builds k8s.io/kubernetes at `version` with every staging module replaced.

    k/k's own go.mod points its staging modules at `./staging/...`, which `go install`
    refuses; replacing each with the published `k8s.io/<name> v0.<minor>.<patch>` builds it.
    The list is generated from k/k's go.mod, never typed by hand.
    """
    staging_version = "v0." + version.lstrip("v").split(".", 1)[1]
    mods = []
    for line in kubernetes_gomod_text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] == "=>" and parts[2].startswith("./staging/"):
            mods.append(parts[0])
    if not mods:
        raise ToolchainError("no `=> ./staging/` replace lines found in k8s.io/kubernetes go.mod")
    lines = [
        f"module gtvp.local/build/{name}",
        "",
        "go 1.26.0",
        "",
        f"require k8s.io/kubernetes {version}",
        "",
        "replace (",
        *(f"\t{m} => {m} {staging_version}" for m in sorted(mods)),
        ")",
        "",
    ]
    return "\n".join(lines)


def _module_replaces(go: str, comp: Component, cwd: Path) -> str:
    """The single-line `replace` directives of the built module's own go.mod (the
    descheduler pins k8s.io/kube-openapi that way): they do not apply to a module that
    requires it, so the build's go.mod repeats them."""
    if comp.name != "descheduler":
        return ""
    module = comp.packages[0].split("/cmd/")[0]
    dl = subprocess.run(
        [go, "mod", "download", "-json", f"{module}@{comp.version}"],
        capture_output=True,
        text=True,
        check=True,
        cwd=cwd,
    )
    own = (Path(json.loads(dl.stdout)["Dir"]) / "go.mod").read_text()
    lines = [ln for ln in own.splitlines() if ln.startswith("replace ") and "=>" in ln]
    return "".join(f"\n{ln}\n" for ln in lines)


def regenerate(comp: Component, destination: Path) -> None:
    """Re-pin one component: write a fresh go.mod (generated, for kubernetes) and go.sum.

    A maintainer's tool (`gtvp local regen-gomod`): the result is committed under
    `local/gtvp_local/gobuild/<name>/`.
    """
    go = _find_go()
    destination.mkdir(parents=True, exist_ok=True)
    for f in ("go.mod", "go.sum"):
        (destination / f).unlink(missing_ok=True)
    module = f"gtvp.local/build/{comp.name}"
    if comp.name in ("kubernetes", "kubernetes-node"):
        dl = subprocess.run(
            [go, "mod", "download", "-json", f"k8s.io/kubernetes@{comp.version}"],
            capture_output=True,
            text=True,
            check=True,
            cwd=destination,
        )
        kk = Path(json.loads(dl.stdout)["Dir"]) / "go.mod"
        text = kubernetes_gomod(kk.read_text(), version=comp.version, name=comp.name)
    else:
        text = f"module {module}\n\ngo 1.26.0\n" + _module_replaces(go, comp, destination)
    (destination / "go.mod").write_text(text)
    pkgs = [f"{p}@{comp.version}" for p in comp.packages]
    subprocess.run([go, "get", *pkgs], check=True, cwd=destination)
