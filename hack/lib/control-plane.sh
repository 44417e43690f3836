# shellcheck shell=bash
# Shared by hack/build-control-plane.sh, hack/control-plane.sh and hack/control-plane-bin-dir:
# pinned versions, the binary cache key and its directory. Sourced, never executed; prints nothing.

HACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# shellcheck disable=SC1091 # plain KEY=VALUE lines
source "${HACK_DIR}/versions.env"

NHIGATE_CACHE="${NHIGATE_CACHE:-${HOME}/.cache/nhigate}"

# The cache key names the pinned versions and hashes everything that decides the binaries'
# content (the versions file, the build script and this file), so editing any of them rebuilds.
cache_key() {
  local digest
  digest="$(cat "${HACK_DIR}/versions.env" "${HACK_DIR}/build-control-plane.sh" \
    "${HACK_DIR}/lib/control-plane.sh" |
    sha256sum | cut -c1-12)"
  printf 'k8s-%s_etcd-%s_helm-%s_%s-%s_%s\n' \
    "${KUBERNETES_VERSION}" "${ETCD_VERSION}" "${HELM_VERSION}" \
    "$(go env GOOS)" "$(go env GOARCH)" "${digest}"
}

# Directory holding kube-apiserver, kube-controller-manager, kubectl, etcd and helm.
control_plane_bin_dir() {
  printf '%s/bin/%s\n' "${NHIGATE_CACHE}" "$(cache_key)"
}

log() {
  printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2
}
