#!/usr/bin/env bash
# gtvp's installed-mode e2e on kind with a real KubeVirt, for hosts with Docker (and network
# access to kind's node image, KubeVirt's release manifests and images, Debian's mirror and
# the Python package index). Not run on machines without Docker (kind/README.md).
#
#   sudo -E env "PATH=$PATH" kind/e2e.sh      # root: `make images` runs debootstrap/chroot/runc
#   KEEP=1 ...                                # leave the cluster and the swtpms running
#
# Flow: make images (the OCI archive, built without Docker) -> kind cluster (kind/cluster.yaml)
# -> kind load image-archive -> KubeVirt (pinned, software emulation: kind/kubevirt-cr.yaml)
# -> `python -m gtvp_local.kindrig up` (an swtpm per kind node on the host's address on the
# kind network, the pool's SecurityPolicy, helm install, every member Trusted: the same
# installation.install the real-node rig runs) -> pytest -m installed tests/e2e/test_installed.py
# -> teardown (unless KEEP=1; logs in $ARTIFACTS on failure).
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER="${CLUSTER:-gtvp}"
KUBEVIRT_VERSION="${KUBEVIRT_VERSION:-v1.6.0}"
KIND_NODE_IMAGE="${KIND_NODE_IMAGE:-}"   # empty: the node image of the kind release in use
export GTVP_CACHE="${GTVP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/gtvp}"
VENV="${GTVP_VENV:-$GTVP_CACHE/venv}"
PY="$VENV/bin/python"
WORK="${KIND_E2E_DIR:-$GTVP_CACHE/kind-$CLUSTER}"
ARTIFACTS="${ARTIFACTS:-$WORK/artifacts}"
KUBECONFIG_FILE="$WORK/kubeconfig"
INSTALLATION="$WORK/installation.json"
KEEP="${KEEP:-0}"

say() { printf '[kind-e2e] %s\n' "$*"; }
die() { printf '[kind-e2e] error: %s\n' "$*" >&2; exit 2; }

prerequisites() {
  [ "$(id -u)" = 0 ] || die "run as root (make images runs debootstrap, chroot and runc): sudo -E env \"PATH=\$PATH\" $0"
  command -v docker >/dev/null || die "docker not found: kind/e2e.sh needs a Docker engine (on a machine without one: make test)"
  docker info >/dev/null 2>&1 || die "docker is installed but its engine does not answer (docker info failed)"
  command -v kind >/dev/null || die "kind not found: go install sigs.k8s.io/kind@v0.29.0 (or see kind's releases)"
  command -v make >/dev/null || die "make not found: apt-get install make"
}

after_setup() {
  local tool
  for tool in swtpm swtpm_setup swtpm_localca debootstrap umoci; do
    command -v "$tool" >/dev/null || die "$tool not found after make setup: apt-get install swtpm swtpm-tools debootstrap umoci"
  done
  [ -x "$PY" ] || die "no Python environment at $VENV (make setup creates it)"
  local tools
  tools="$("$PY" -m gtvp_local.kindrig tools)" || die "kubectl/helm are not built (make setup: gtvp local build)"
  read -r KUBECTL HELM <<<"$tools"
  PATH="$(dirname "$KUBECTL"):$(dirname "$HELM"):$PATH"
  export PATH
}

collect_logs() {
  mkdir -p "$ARTIFACTS"
  say "collecting logs in $ARTIFACTS"
  cp -r "$WORK/rig/logs" "$ARTIFACTS/swtpm-logs" 2>/dev/null || true
  cp "$WORK/rig/rig.json" "$INSTALLATION" "$ARTIFACTS/" 2>/dev/null || true
  if [ -s "$KUBECONFIG_FILE" ] && [ -n "${KUBECTL:-}" ]; then
    local k=("$KUBECTL" --kubeconfig "$KUBECONFIG_FILE")
    "${k[@]}" get nodes -o wide >"$ARTIFACTS/nodes.txt" 2>&1 || true
    "${k[@]}" get pods -A -o wide >"$ARTIFACTS/pods.txt" 2>&1 || true
    "${k[@]}" get members,securitypolicies -o yaml >"$ARTIFACTS/gtvp-objects.yaml" 2>&1 || true
    "${k[@]}" -n gtvp-system describe pods >"$ARTIFACTS/gtvp-pods.txt" 2>&1 || true
    "${k[@]}" -n gtvp-system logs -l app.kubernetes.io/instance=gtvp --all-containers --prefix --tail=-1 \
      >"$ARTIFACTS/gtvp-logs.txt" 2>&1 || true
    "${k[@]}" -n kubevirt get kubevirt,pods -o wide >"$ARTIFACTS/kubevirt.txt" 2>&1 || true
    "${k[@]}" get events -A --sort-by=.lastTimestamp >"$ARTIFACTS/events.txt" 2>&1 || true
  fi
  kind export logs "$ARTIFACTS/kind" --name "$CLUSTER" >/dev/null 2>&1 || true
}

finish() {
  local rc=$?
  trap - EXIT
  [ "$rc" = 0 ] || collect_logs
  if [ "$KEEP" = 1 ]; then
    say "KEEP=1: cluster $CLUSTER and its swtpms left running (KUBECONFIG=$KUBECONFIG_FILE," \
        "GTVP_E2E_INSTALLATION=$INSTALLATION); tear down with: $PY -m gtvp_local.kindrig down" \
        "--state $WORK/rig && kind delete cluster --name $CLUSTER"
  else
    say "teardown: swtpms, kind cluster $CLUSTER"
    if [ -x "$PY" ]; then "$PY" -m gtvp_local.kindrig down --state "$WORK/rig" || true; fi
    kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
  fi
  if [ "$rc" = 0 ]; then say "passed"; else say "FAILED (exit $rc)"; fi
  exit "$rc"
}

prerequisites
mkdir -p "$WORK"
trap finish EXIT

say "make images (make setup first: Debian packages, the virtualenv, kubectl and helm)"
make images
after_setup
read -r IMAGE ARCHIVE <<<"$("$PY" -m gtvp_local.kindrig image)"
say "image $IMAGE ($ARCHIVE)"

if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  say "kind cluster $CLUSTER exists: reused"
  kind get kubeconfig --name "$CLUSTER" >"$KUBECONFIG_FILE"
else
  say "kind create cluster $CLUSTER (kind/cluster.yaml: 1 control plane, 2 workers)"
  kind create cluster --name "$CLUSTER" --config kind/cluster.yaml --kubeconfig "$KUBECONFIG_FILE" \
    --wait 5m ${KIND_NODE_IMAGE:+--image "$KIND_NODE_IMAGE"}
fi
export KUBECONFIG="$KUBECONFIG_FILE"

say "kind load image-archive (the OCI archive; containerd imports it as $IMAGE)"
kind load image-archive "$ARCHIVE" --name "$CLUSTER"

say "KubeVirt $KUBEVIRT_VERSION from its GitHub release manifests, software emulation"
"$KUBECTL" apply -f "https://github.com/kubevirt/kubevirt/releases/download/${KUBEVIRT_VERSION}/kubevirt-operator.yaml"
"$KUBECTL" apply -f kind/kubevirt-cr.yaml
"$KUBECTL" -n kubevirt wait kv kubevirt --for condition=Available --timeout=15m

say "gtvp: an swtpm per node, helm install, every member Trusted (gtvp_local.kindrig up)"
# attestation timing: what tests/e2e/test_installed.py's own real-node installation uses
"$PY" -m gtvp_local.kindrig up --cluster "$CLUSTER" --kubeconfig "$KUBECONFIG_FILE" \
  --state "$WORK/rig" --image "$IMAGE" --out "$INSTALLATION" --interval 2s --valid-for 8s \
  ${E2E_HOST:+--host "$E2E_HOST"}

say "e2e: pytest -m installed tests/e2e/test_installed.py against kind"
GTVP_E2E_INSTALLATION="$INSTALLATION" "$VENV/bin/pytest" -m installed tests/e2e/test_installed.py
