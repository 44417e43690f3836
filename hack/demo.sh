#!/usr/bin/env bash
# The demo from a fresh clone: installs what it needs, builds (or reuses) a real control plane
# and a real node from Go modules and Debian packages, then runs hack/node_demo.py: nhigate's
# controller and proxies as pods from the image built here, a backend, a client pod, an allowed
# and a denied request, and a direct connection to the backend refused by the NetworkPolicy.
# Warm: about 2 minutes. Cold: the builds take ~30 min and print progress.
#
# usage: hack/demo.sh            the real-node demo (needs root: containerd, bridge, iptables)
#        hack/demo.sh --local    the process demo: controller + proxy + backend on 127.0.0.1
set -euo pipefail
# shellcheck source=hack/lib/common.sh
source "$(dirname "$0")/lib/common.sh"
cd "$ROOT"

ensure_debian_packages
ensure_python_env

step "building (or reusing) the control plane: etcd, kube-apiserver, kube-controller-manager, kubectl, helm"
"$ROOT/hack/build-control-plane.sh"

case "${1:-}" in
  --local) "$PY" "$ROOT/hack/demo.py" ;;
  "") "$PY" "$ROOT/hack/node_demo.py" ;;
  *)
    echo "usage: $0 [--local]" >&2
    exit 2
    ;;
esac
