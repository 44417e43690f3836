#!/usr/bin/env bash
# Build (or reuse) the pinned control-plane binaries from the Go module proxy:
#   etcd, kube-apiserver, kube-controller-manager, kubectl, helm.
#
# usage: hack/build-control-plane.sh [--force]
#
# Binaries land in ${NHIGATE_CACHE:-$HOME/.cache/nhigate}/bin/<cache-key>/, outside the repo,
# so fresh clones (CI) reuse them. When that directory is complete the script does nothing but
# print it. Progress goes to stderr; the only line on stdout is the bin dir, so callers can do
#   BIN_DIR="$(hack/build-control-plane.sh)"
set -euo pipefail

# shellcheck disable=SC1091 # shellcheck runs without -x in hack/test.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib/control-plane.sh"

FORCE=0
case "${1:-}" in
  --force) FORCE=1 ;;
  "") ;;
  *)
    echo "usage: $0 [--force]" >&2
    exit 2
    ;;
esac

BINARIES=(etcd kube-apiserver kube-controller-manager kubectl helm)
BIN_DIR="$(control_plane_bin_dir)"
KEY="$(basename "${BIN_DIR}")"

is_complete() {
  [[ -f "${BIN_DIR}/.complete" ]] || return 1
  local b
  for b in "${BINARIES[@]}"; do
    [[ -x "${BIN_DIR}/${b}" ]] || return 1
  done
}

if [[ ${FORCE} -eq 0 ]] && is_complete; then
  log "control-plane binaries cached: ${BIN_DIR}"
  echo "${BIN_DIR}"
  exit 0
fi

# A predictable, reproducible Go environment: the installed toolchain only, module mode, no
# workspace, no cgo (static binaries), and no inherited GOFLAGS such as -mod=vendor.
export GOTOOLCHAIN=local GOWORK=off CGO_ENABLED=0 GO111MODULE=on
export GOFLAGS="-buildvcs=false -mod=mod"
export GOPROXY="${GOPROXY:-https://proxy.golang.org,direct}"

mkdir -p "${NHIGATE_CACHE}/bin" "${NHIGATE_CACHE}/src"
# One build at a time per cache (two CI runs, or CI and a developer, may race).
exec 9>"${NHIGATE_CACHE}/build.lock"
log "waiting for build lock ${NHIGATE_CACHE}/build.lock"
flock 9
if [[ ${FORCE} -eq 0 ]] && is_complete; then
  log "another build finished meanwhile: ${BIN_DIR}"
  echo "${BIN_DIR}"
  exit 0
fi

SRC_DIR="${NHIGATE_CACHE}/src/${KEY}"
STAGE_DIR="${NHIGATE_CACHE}/bin/.${KEY}.partial"
rm -rf "${SRC_DIR}" "${STAGE_DIR}"
mkdir -p "${SRC_DIR}" "${STAGE_DIR}"
START=${SECONDS}
log "building control plane (cache key ${KEY}) with $(go env GOVERSION); this takes a while on a cold cache"

# run_with_heartbeat LOGFILE CMD...: run CMD with its output in LOGFILE, print a line every 30 s
# so a long compile does not look hung, and show the log tail if it fails.
run_with_heartbeat() {
  local logfile=$1
  shift
  "$@" >"${logfile}" 2>&1 &
  local pid=$! rc=0 started=${SECONDS} beat=${SECONDS}
  while kill -0 "${pid}" 2>/dev/null; do
    sleep 2
    if ((SECONDS - beat >= 30)) && kill -0 "${pid}" 2>/dev/null; then
      beat=${SECONDS}
      log "  ... still running ($((SECONDS - started)) s, $(wc -l <"${logfile}") log lines, last: $(tail -n1 "${logfile}" | cut -c1-100))"
    fi
  done
  wait "${pid}" || rc=$?
  if [[ ${rc} -ne 0 ]]; then
    log "FAILED (exit ${rc}): $*"
    tail -n 40 "${logfile}" >&2
    return "${rc}"
  fi
}

# --- kubernetes: kube-apiserver, kube-controller-manager, kubectl ------------------------------
# k8s.io/kubernetes points every staging module (k8s.io/api, k8s.io/client-go, ...) at
# ./staging/src/... via replace directives, and those do not apply to a dependency. So the wrapper
# module replaces each of them with the published k8s.io/X v0.MINOR.PATCH. The list is read from
# the release's own go.mod, never hand-copied.
K8S_DIR="${SRC_DIR}/kubernetes"
mkdir -p "${K8S_DIR}"
log "[1/3] kubernetes ${KUBERNETES_VERSION}: reading the release's go.mod"
K8S_GOMOD="$(cd "${K8S_DIR}" && go mod download -json "k8s.io/kubernetes@${KUBERNETES_VERSION}" |
  sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')"
[[ -f "${K8S_GOMOD}" ]] || {
  log "could not locate go.mod of k8s.io/kubernetes@${KUBERNETES_VERSION}"
  exit 1
}
STAGING_VERSION="v0.${KUBERNETES_VERSION#v1.}"
mapfile -t STAGING < <(awk '$2 == "=>" && $3 ~ /^\.\/staging\/src\// {print $1}' "${K8S_GOMOD}" | sort -u)
[[ ${#STAGING[@]} -gt 10 ]] || {
  log "found only ${#STAGING[@]} staging replaces in ${K8S_GOMOD}; refusing to guess"
  exit 1
}
K8S_GO_DIRECTIVE="$(awk '$1 == "go" {print $2; exit}' "${K8S_GOMOD}")"
log "  ${#STAGING[@]} staging modules -> ${STAGING_VERSION}; release go directive ${K8S_GO_DIRECTIVE}"
{
  echo "module nhigate.local/controlplane/kubernetes"
  echo
  echo "go ${K8S_GO_DIRECTIVE}"
  echo
  echo "require k8s.io/kubernetes ${KUBERNETES_VERSION}"
  echo
  echo "tool ("
  echo "	k8s.io/kubernetes/cmd/kube-apiserver"
  echo "	k8s.io/kubernetes/cmd/kube-controller-manager"
  echo "	k8s.io/kubernetes/cmd/kubectl"
  echo ")"
  echo
  echo "replace ("
  for m in "${STAGING[@]}"; do
    echo "	${m} => ${m} ${STAGING_VERSION}"
  done
  echo ")"
} >"${K8S_DIR}/go.mod"
log "  resolving modules (go mod tidy)"
(cd "${K8S_DIR}" && run_with_heartbeat "${SRC_DIR}/kubernetes-tidy.log" go mod tidy)

# Version stamps, as kubernetes' hack/lib/version.sh sets them, so `kubectl version` and the
# API server's /version report the real release (helm and charts check kubeVersion).
K8S_MINOR="${KUBERNETES_VERSION#v1.}"
K8S_MINOR="${K8S_MINOR%%.*}"
K8S_X=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  K8S_X+=" -X ${pkg}.gitVersion=${KUBERNETES_VERSION}"
  K8S_X+=" -X ${pkg}.gitMajor=1 -X ${pkg}.gitMinor=${K8S_MINOR}"
  K8S_X+=" -X ${pkg}.gitTreeState=clean -X ${pkg}.buildDate=1970-01-01T00:00:00Z"
done
log "  compiling kube-apiserver, kube-controller-manager, kubectl (log: ${SRC_DIR}/kubernetes-build.log)"
(cd "${K8S_DIR}" && run_with_heartbeat "${SRC_DIR}/kubernetes-build.log" \
  go build -v -trimpath -ldflags="-s -w${K8S_X}" -o "${STAGE_DIR}/" \
  k8s.io/kubernetes/cmd/kube-apiserver \
  k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kubectl)
log "  kubernetes done after $((SECONDS - START)) s"

# --- etcd ----------------------------------------------------------------------------------------
# go.etcd.io/etcd/server/v3 is the etcd main package; its go.mod replaces sibling modules with
# relative paths (ignored for a dependency), so it too is built through a wrapper module.
ETCD_DIR="${SRC_DIR}/etcd"
mkdir -p "${ETCD_DIR}"
log "[2/3] etcd ${ETCD_VERSION}"
cat >"${ETCD_DIR}/go.mod" <<EOF
module nhigate.local/controlplane/etcd

go 1.24

require go.etcd.io/etcd/server/v3 ${ETCD_VERSION}

tool go.etcd.io/etcd/server/v3
EOF
(cd "${ETCD_DIR}" && run_with_heartbeat "${SRC_DIR}/etcd-tidy.log" go mod tidy)
(cd "${ETCD_DIR}" && run_with_heartbeat "${SRC_DIR}/etcd-build.log" \
  go build -v -trimpath -ldflags="-s -w" -o "${STAGE_DIR}/etcd" go.etcd.io/etcd/server/v3)
log "  etcd done after $((SECONDS - START)) s"

# --- helm ----------------------------------------------------------------------------------------
HELM_DIR="${SRC_DIR}/helm"
mkdir -p "${HELM_DIR}"
log "[3/3] helm ${HELM_VERSION}"
cat >"${HELM_DIR}/go.mod" <<EOF
module nhigate.local/controlplane/helm

go 1.24

require helm.sh/helm/v3 ${HELM_VERSION}

tool helm.sh/helm/v3/cmd/helm
EOF
(cd "${HELM_DIR}" && run_with_heartbeat "${SRC_DIR}/helm-tidy.log" go mod tidy)
(cd "${HELM_DIR}" && run_with_heartbeat "${SRC_DIR}/helm-build.log" \
  go build -v -trimpath \
  -ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=${HELM_VERSION} -X helm.sh/helm/v3/internal/version.gitTreeState=clean" \
  -o "${STAGE_DIR}/helm" helm.sh/helm/v3/cmd/helm)
log "  helm done after $((SECONDS - START)) s"

# --- publish -------------------------------------------------------------------------------------
for b in "${BINARIES[@]}"; do
  [[ -x "${STAGE_DIR}/${b}" ]] || {
    log "missing ${b} after build"
    exit 1
  }
done
# Each binary must run and report the pinned version.
# check_version EXPECTED CMD...
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
check_version "${KUBERNETES_VERSION}" "${STAGE_DIR}/kube-apiserver" --version
check_version "${KUBERNETES_VERSION}" "${STAGE_DIR}/kube-controller-manager" --version
check_version "${KUBERNETES_VERSION}" "${STAGE_DIR}/kubectl" version --client
check_version "${ETCD_VERSION#v}" "${STAGE_DIR}/etcd" --version
check_version "${HELM_VERSION}" "${STAGE_DIR}/helm" version --short
printf 'built %s in %s s with %s\n' "${KEY}" "$((SECONDS - START))" "$(go env GOVERSION)" >"${STAGE_DIR}/.complete"
rm -rf "${BIN_DIR}"
mv "${STAGE_DIR}" "${BIN_DIR}"
# Keep the cache bounded (~350 MB per key): drop abandoned partial builds and all but the three
# most recently built keys. Safe under the build lock; a running control plane keeps its open
# binaries even if their directory goes.
rm -rf "${NHIGATE_CACHE}"/bin/.*.partial
find "${NHIGATE_CACHE}/bin" -mindepth 1 -maxdepth 1 -type d -printf '%T@ %p\n' | sort -rn |
  tail -n +4 | cut -d' ' -f2- | while read -r old; do
  log "pruning old build ${old}"
  rm -rf "${old}" "${NHIGATE_CACHE}/src/$(basename "${old}")"
done
log "control plane built in $((SECONDS - START)) s: ${BIN_DIR}"
echo "${BIN_DIR}"
