#!/usr/bin/env bash
# The whole test suite from a fresh clone: installs what it needs (Debian packages, the
# virtualenv, a real kube-apiserver + etcd and a real node built from Go modules, the image),
# runs the static checks,
# then every test. Cluster tests fail (never skip) when the control plane cannot start.
set -euo pipefail
# shellcheck source=hack/lib/common.sh
source "$(dirname "$0")/lib/common.sh"
cd "$ROOT"

ensure_debian_packages
ensure_python_env

step "building (or reusing) the control plane: etcd, kube-apiserver, kube-controller-manager, kubectl, helm"
"$ROOT/hack/build-control-plane.sh"
# The real node's parts, built here (with progress) rather than inside the e2e fixture.
step "building (or reusing) the real node: kubelet, kube-proxy, kube-scheduler, kube-router, CoreDNS"
"$ROOT/hack/build-node.sh"
step "building (or reusing) the nhigate and pause images (no Docker daemon)"
"$ROOT/hack/build-image.sh" >/dev/null

step "static checks: ruff, ruff format, mypy --strict, import-linter contracts, shellcheck"
"$VENV/bin/ruff" check src tests bench hack
"$VENV/bin/ruff" format --check src tests bench hack
"$VENV/bin/mypy"
"$VENV/bin/lint-imports" --no-cache
shellcheck -x hack/*.sh hack/lib/*.sh .ci/run

step "tests (pytest)"
export NHIGATE_REQUIRE_CLUSTER=1
"$VENV/bin/pytest" -q "$@"
