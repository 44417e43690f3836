#!/usr/bin/env bash
# Build (or reuse) the pinned binaries of a real local node from the Go module proxy:
#   kubelet, kube-proxy, kube-scheduler (the control plane's Kubernetes release),
#   kube-router (its NetworkPolicy controller only) and CoreDNS.
# containerd, runc and the CNI plugins come from Debian packages (hack/node.sh installs them).
#
# usage: hack/build-node.sh [--force]
#
# Binaries land in ${NHIGATE_CACHE:-$HOME/.cache/nhigate}/node-bin/<cache-key>/. Progress goes to
# stderr; the only line on stdout is the bin dir.
set -euo pipefail

# shellcheck disable=SC1091
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib/node.sh"
# shellcheck disable=SC1091
source "${HACK_DIR}/lib/build.sh"

FORCE=0
case "${1:-}" in
  --force) FORCE=1 ;;
  "") ;;
  *)
    echo "usage: $0 [--force]" >&2
    exit 2
    ;;
esac

BIN_DIR="$(node_bin_dir)"
KEY="$(basename "${BIN_DIR}")"

is_complete() {
  [[ -f "${BIN_DIR}/.complete" ]] || return 1
  local b
  for b in "${NODE_BINARIES[@]}"; do
    [[ -x "${BIN_DIR}/${b}" ]] || return 1
  done
}

if [[ ${FORCE} -eq 0 ]] && is_complete; then
  log "node binaries cached: ${BIN_DIR}"
  echo "${BIN_DIR}"
  exit 0
fi

go_build_env
mkdir -p "${NHIGATE_CACHE}/node-bin" "${NHIGATE_CACHE}/src"
exec 9>"${NHIGATE_CACHE}/build.lock"
log "waiting for build lock ${NHIGATE_CACHE}/build.lock"
flock 9
if [[ ${FORCE} -eq 0 ]] && is_complete; then
  log "another build finished meanwhile: ${BIN_DIR}"
  echo "${BIN_DIR}"
  exit 0
fi

SRC_DIR="${NHIGATE_CACHE}/src/${KEY}"
STAGE_DIR="${NHIGATE_CACHE}/node-bin/.${KEY}.partial"
rm -rf "${SRC_DIR}" "${STAGE_DIR}"
mkdir -p "${SRC_DIR}" "${STAGE_DIR}"
START=${SECONDS}
log "building node binaries (cache key ${KEY}) with $(go env GOVERSION); cold: about 10-15 min"

# --- kubelet, kube-proxy, kube-scheduler ---------------------------------------------------------
log "[1/3] kubernetes ${KUBERNETES_VERSION}: kubelet, kube-proxy, kube-scheduler"
K8S_DIR="${SRC_DIR}/kubernetes"
write_kubernetes_module "${K8S_DIR}" "${KUBERNETES_VERSION}" \
  k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy k8s.io/kubernetes/cmd/kube-scheduler
(cd "${K8S_DIR}" && run_logged "${SRC_DIR}/kubernetes-tidy.log" go mod tidy)
(cd "${K8S_DIR}" && run_logged "${SRC_DIR}/kubernetes-build.log" \
  go build -v -trimpath -ldflags="-s -w$(kubernetes_version_ldflags "${KUBERNETES_VERSION}")" \
  -o "${STAGE_DIR}/" \
  k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy k8s.io/kubernetes/cmd/kube-scheduler)
log "  kubernetes done after $((SECONDS - START)) s"

# --- kube-router ---------------------------------------------------------------------------------
log "[2/3] kube-router ${KUBE_ROUTER_VERSION} (NetworkPolicy controller)"
KR_DIR="${SRC_DIR}/kube-router"
mkdir -p "${KR_DIR}"
cat >"${KR_DIR}/go.mod" <<EOF
module nhigate.local/build/kube-router

go 1.22

require github.com/cloudnativelabs/kube-router/v2 ${KUBE_ROUTER_VERSION}

tool github.com/cloudnativelabs/kube-router/v2/cmd/kube-router
EOF
(cd "${KR_DIR}" && run_logged "${SRC_DIR}/kube-router-tidy.log" go mod tidy)
(cd "${KR_DIR}" && run_logged "${SRC_DIR}/kube-router-build.log" \
  go build -v -trimpath \
  -ldflags="-s -w -X github.com/cloudnativelabs/kube-router/v2/pkg/version.Version=${KUBE_ROUTER_VERSION}" \
  -o "${STAGE_DIR}/kube-router" github.com/cloudnativelabs/kube-router/v2/cmd/kube-router)
log "  kube-router done after $((SECONDS - START)) s"

# --- CoreDNS -------------------------------------------------------------------------------------
# Only the plugins hack/node.sh's Corefile uses: upstream's main imports every plugin, and their
# cloud SDKs (route53, azure, clouddns, ...) made this step ~10 min of a cold build; this one takes
# ~4 min on a busy 2-core machine. A custom main (coremain.Run with dnsserver.Directives set) is
# how CoreDNS is built with a chosen plugin set outside its source tree.
log "[3/3] CoreDNS ${COREDNS_VERSION} (plugins: ${COREDNS_PLUGINS[*]})"
DNS_DIR="${SRC_DIR}/coredns"
mkdir -p "${DNS_DIR}"
cat >"${DNS_DIR}/go.mod" <<EOF
module nhigate.local/build/coredns

go 1.24

require github.com/coredns/coredns ${COREDNS_VERSION}
EOF
{
  printf 'package main\n\nimport (\n'
  printf '\t"github.com/coredns/coredns/core/dnsserver"\n\t"github.com/coredns/coredns/coremain"\n\n'
  printf '\t_ "github.com/coredns/coredns/plugin/%s"\n' "${COREDNS_PLUGINS[@]}"
  printf ')\n\n// The upstream order (core/dnsserver/zdirectives.go) restricted to the plugins above.\n'
  printf 'func init() {\n\tdnsserver.Directives = []string{'
  printf '"%s", ' "${COREDNS_PLUGINS[@]}"
  printf '}\n}\n\nfunc main() { coremain.Run() }\n'
} >"${DNS_DIR}/main.go"
(cd "${DNS_DIR}" && run_logged "${SRC_DIR}/coredns-tidy.log" go mod tidy)
(cd "${DNS_DIR}" && run_logged "${SRC_DIR}/coredns-build.log" \
  go build -v -trimpath -ldflags="-s -w" -o "${STAGE_DIR}/coredns" .)
log "  CoreDNS done after $((SECONDS - START)) s"

# --- publish -------------------------------------------------------------------------------------
for b in "${NODE_BINARIES[@]}"; do
  [[ -x "${STAGE_DIR}/${b}" ]] || {
    log "missing ${b} after build"
    exit 1
  }
done
check_version() {
  local expected=$1 out
  shift
  out="$("$@" 2>&1)" || {
    log "$* failed: ${out}"
    exit 1
  }
  log "  $(basename "$1"): ${out%%$'\n'*}"
  [[ "${out}" == *"${expected}"* ]] || {
    log "$* does not report ${expected}: ${out}"
    exit 1
  }
}
check_version "${KUBERNETES_VERSION}" "${STAGE_DIR}/kubelet" --version
check_version "${KUBERNETES_VERSION}" "${STAGE_DIR}/kube-proxy" --version
check_version "${KUBERNETES_VERSION}" "${STAGE_DIR}/kube-scheduler" --version
check_version "${COREDNS_VERSION#v}" "${STAGE_DIR}/coredns" -version
DNS_PLUGINS="$("${STAGE_DIR}/coredns" -plugins)"
for plugin in "${COREDNS_PLUGINS[@]}"; do
  grep -qx "${plugin}" <<<"${DNS_PLUGINS}" || {
    log "coredns lacks the ${plugin} plugin: ${DNS_PLUGINS}"
    exit 1
  }
done
"${STAGE_DIR}/kube-router" --version >/dev/null 2>&1 || {
  log "kube-router does not run"
  exit 1
}
printf 'built %s in %s s with %s\n' "${KEY}" "$((SECONDS - START))" "$(go env GOVERSION)" >"${STAGE_DIR}/.complete"
rm -rf "${BIN_DIR}"
mv "${STAGE_DIR}" "${BIN_DIR}"
rm -rf "${NHIGATE_CACHE}"/node-bin/.*.partial
find "${NHIGATE_CACHE}/node-bin" -mindepth 1 -maxdepth 1 -type d -printf '%T@ %p\n' | sort -rn |
  tail -n +3 | cut -d' ' -f2- | while read -r old; do
  log "pruning old node build ${old}"
  rm -rf "${old}" "${NHIGATE_CACHE}/src/$(basename "${old}")"
done
log "node binaries built in $((SECONDS - START)) s: ${BIN_DIR}"
echo "${BIN_DIR}"
