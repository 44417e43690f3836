# shellcheck shell=bash
# Shared by hack/build-node.sh and hack/node.sh: pinned versions, the node binaries' cache key and
# directory. Sourced, never executed; prints nothing.

# shellcheck disable=SC1091
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/control-plane.sh"
# shellcheck disable=SC1091 # plain KEY=VALUE lines
source "${HACK_DIR}/node-versions.env"

# shellcheck disable=SC2034 # used by the scripts that source this file
NODE_BINARIES=(kubelet kube-proxy kube-scheduler kube-router coredns)
# The CoreDNS plugins hack/node.sh's Corefile uses, in upstream's directive order (a Corefile
# naming any other plugin fails to start, loudly).
# shellcheck disable=SC2034
COREDNS_PLUGINS=(bind health errors cache template kubernetes)

node_cache_key() {
  local digest
  digest="$(cat "${HACK_DIR}/versions.env" "${HACK_DIR}/node-versions.env" \
    "${HACK_DIR}/build-node.sh" "${HACK_DIR}/lib/build.sh" | sha256sum | cut -c1-12)"
  printf 'node-k8s-%s_kube-router-%s_coredns-%s_%s-%s_%s\n' \
    "${KUBERNETES_VERSION}" "${KUBE_ROUTER_VERSION}" "${COREDNS_VERSION}" \
    "$(go env GOOS)" "$(go env GOARCH)" "${digest}"
}

node_bin_dir() {
  printf '%s/node-bin/%s\n' "${NHIGATE_CACHE}" "$(node_cache_key)"
}
