#!/usr/bin/env bash
# The local demo from a fresh clone: installs what it needs, builds (or reuses) a real
# control plane from Go modules, then runs hack/demo.py: controller + proxy + backend on
# 127.0.0.1, an allowed and a denied request, a revocation, the resources' status.
set -euo pipefail
# shellcheck source=hack/lib/common.sh
source "$(dirname "$0")/lib/common.sh"
cd "$ROOT"

ensure_debian_packages
ensure_python_env

step "building (or reusing) the control plane: etcd, kube-apiserver, kube-controller-manager, kubectl, helm"
"$ROOT/hack/build-control-plane.sh"

"$PY" "$ROOT/hack/demo.py"
