#!/usr/bin/env bash
# Lint the Helm chart without a cluster: CRD copies in sync, `helm lint --strict` and
# `helm template` with the default values and with every charts/nhigate/ci/*-values.yaml, and
# values.schema.json rejecting an unknown value. (The server-side dry-run of the rendered
# objects against a real API server is in tests/integration/test_chart.py.)
#
# usage: hack/lint-chart.sh        (uses the helm built by hack/build-control-plane.sh)
set -euo pipefail

HACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${HACK_DIR}/.." && pwd)"
# shellcheck disable=SC1091 # shellcheck runs without -x in hack/test.sh
source "${HACK_DIR}/versions.env"
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

CHART="${REPO_ROOT}/charts/nhigate"
HELM="${HELM:-$("${HACK_DIR}/build-control-plane.sh" | tail -n1)/helm}"
# Keep helm's cache and config out of $HOME.
HELM_HOME_DIR="$(mktemp -d)"
trap 'rm -rf "${HELM_HOME_DIR}"' EXIT
export HELM_CACHE_HOME="${HELM_HOME_DIR}/cache" HELM_CONFIG_HOME="${HELM_HOME_DIR}/config"
export HELM_DATA_HOME="${HELM_HOME_DIR}/data"

"${HACK_DIR}/sync-chart-crds.sh" --check
# helm template assumes an old Kubernetes unless told; render for the pinned control plane's.
KUBE_VERSION="${KUBERNETES_VERSION#v}"

variants=("")
for f in "${CHART}"/ci/*-values.yaml; do variants+=("${f}"); done

for values in "${variants[@]}"; do
  args=()
  [[ -n ${values} ]] && args=(--values "${values}")
  log "helm lint --strict ${values:+(${values#"${REPO_ROOT}/"})}"
  "${HELM}" lint --strict --kube-version "${KUBE_VERSION}" "${CHART}" "${args[@]}"
  log "helm template ${values:+(${values#"${REPO_ROOT}/"})}"
  count="$("${HELM}" template nhigate "${CHART}" --kube-version "${KUBE_VERSION}" --namespace nhigate-system "${args[@]}" | grep -c '^kind:')"
  log "  rendered ${count} objects"
done

log "values.schema.json must reject an unknown value"
if out="$("${HELM}" template nhigate "${CHART}" --kube-version "${KUBE_VERSION}" --set controller.replicas=2 2>&1)"; then
  log "FAILED: an unknown value (controller.replicas) was accepted"
  exit 1
fi
grep -q "additional properties" <<<"${out}" || {
  log "FAILED: unexpected error for an unknown value: ${out}"
  exit 1
}
log "chart lint passed"
