#!/usr/bin/env bash
# End-to-end on a kind cluster, for machines with Docker: the same scenario code as the real-node
# tests CI runs here (tests/e2e/test_node_e2e.py, tests/scenario.py), pointed at kind instead of
# hack/node.sh. It cannot run where there is no Docker engine (this project's CI machines).
#
# Needs: docker, kind >= v0.24.0 (its kindnetd enforces NetworkPolicy; the host kernel needs
# nft_queue, which some WSL2 kernels lack), kubectl, helm, python3 (the project's .venv is made
# by hack/lib/common.sh).
# usage: hack/kind-e2e.sh [pytest args]      KEEP_CLUSTER=1 hack/kind-e2e.sh (leave it running)
set -euo pipefail
# shellcheck source=hack/lib/common.sh
source "$(dirname "$0")/lib/common.sh"
cd "$ROOT"

CLUSTER="${KIND_CLUSTER_NAME:-nhigate-e2e}"
IMAGE="nhigate.local/nhigate:kind-e2e"
WORK="$(mktemp -d)"

for tool in docker kind kubectl helm; do
  command -v "${tool}" >/dev/null || {
    echo "missing ${tool}" >&2
    exit 1
  }
done
kind_version="$(kind version | sed -n 's/^kind v\([0-9]*\.[0-9]*\).*/\1/p')"
[[ ${kind_version%%.*} -gt 0 || ${kind_version#*.} -ge 24 ]] || {
  echo "kind >= v0.24.0 needed (kindnetd enforcing NetworkPolicy); found ${kind_version}" >&2
  exit 1
}

# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() {
  if [[ ${KEEP_CLUSTER:-0} == 1 ]]; then step "keeping cluster ${CLUSTER}"; else kind delete cluster --name "${CLUSTER}"; fi
  rm -rf "${WORK}"
}

ensure_python_env
step "kind cluster ${CLUSTER} and image ${IMAGE}"
kind create cluster --name "${CLUSTER}" --wait 120s --kubeconfig "${WORK}/kubeconfig"
trap cleanup EXIT
docker build -f images/Dockerfile -t "${IMAGE}" .
kind load docker-image "${IMAGE}" --name "${CLUSTER}"

# The scenario drives kubectl and helm from one directory (as it does with hack/'s builds).
mkdir -p "${WORK}/bin"
ln -s "$(command -v kubectl)" "${WORK}/bin/kubectl"
ln -s "$(command -v helm)" "${WORK}/bin/helm"
issuer="$(KUBECONFIG="${WORK}/kubeconfig" kubectl get --raw /.well-known/openid-configuration |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["issuer"])')"

step "the real-cluster scenario on kind (issuer ${issuer})"
NHIGATE_E2E_KUBECONFIG="${WORK}/kubeconfig" NHIGATE_E2E_IMAGE="${IMAGE}" \
  NHIGATE_E2E_SA_ISSUER="${issuer}" NHIGATE_E2E_STATE_DIR="${WORK}" NHIGATE_CP_BIN_DIR="${WORK}/bin" \
  "$VENV/bin/pytest" -q tests/e2e/test_node_e2e.py "$@"
