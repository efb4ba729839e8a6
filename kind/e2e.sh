#!/usr/bin/env bash
# gtvp e2e on kind with a real KubeVirt, for hosts with Docker (and network access to the
# kind node image and KubeVirt's release manifests). Not run on machines without Docker.
# Each kind node gets an swtpm (run inside the node container) so the agent has a TPM.
set -euo pipefail
cd "$(dirname "$0")/.."
KUBEVIRT_VERSION="${KUBEVIRT_VERSION:-v1.6.0}"
command -v docker >/dev/null && docker info >/dev/null 2>&1 || {
  echo "kind/e2e.sh needs a running Docker engine; on this machine use: make test" >&2; exit 2; }
command -v kind >/dev/null || { echo "install kind (go install sigs.k8s.io/kind@latest)" >&2; exit 2; }
kind create cluster --config kind/cluster.yaml
kubectl apply -f "https://github.com/kubevirt/kubevirt/releases/download/${KUBEVIRT_VERSION}/kubevirt-operator.yaml"
kubectl apply -f "https://github.com/kubevirt/kubevirt/releases/download/${KUBEVIRT_VERSION}/kubevirt-cr.yaml"
kubectl -n kubevirt patch kubevirt kubevirt --type=merge \
  -p '{"spec":{"configuration":{"developerConfiguration":{"useEmulation":true}}}}'
kubectl -n kubevirt wait kv kubevirt --for condition=Available --timeout=15m
docker build -t gtvp:e2e -f kind/Dockerfile .
kind load docker-image gtvp:e2e --name gtvp
helm install gtvp charts/gtvp -n gtvp-system --create-namespace \
  --set image.repository=gtvp --set image.tag=e2e --set agent.sendEventLog=false
echo "gtvp installed on kind with KubeVirt ${KUBEVIRT_VERSION}; run: GTVP_E2E_KUBECONFIG=\$HOME/.kube/config pytest tests/e2e"
