# shellcheck shell=bash
# Shared by the hack/ build scripts that compile Go modules: a reproducible Go environment and a
# progress heartbeat. Sourced, never executed. Needs log() (hack/lib/control-plane.sh).

# The installed toolchain only, module mode, no workspace, no cgo (static binaries), and no
# inherited GOFLAGS such as -mod=vendor.
go_build_env() {
  export GOTOOLCHAIN=local GOWORK=off CGO_ENABLED=0 GO111MODULE=on
  export GOFLAGS="-buildvcs=false -mod=mod"
  export GOPROXY="${GOPROXY:-https://proxy.golang.org,direct}"
}

# run_logged LOGFILE CMD...: run CMD with its output in LOGFILE, print a line every 30 s so a
# long compile does not look hung, and show the log tail if it fails.
run_logged() {
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

# write_kubernetes_module DIR VERSION PACKAGE...: a wrapper Go module in DIR that builds PACKAGEs
# of k8s.io/kubernetes@VERSION. The release's go.mod points every staging module (k8s.io/api,
# k8s.io/client-go, ...) at ./staging/src/... and those replaces do not apply to a dependency, so
# the wrapper replaces each with the published k8s.io/X v0.MINOR.PATCH, read from that go.mod.
write_kubernetes_module() {
  local dir=$1 version=$2
  shift 2
  local gomod staging_version go_directive m p
  mkdir -p "${dir}"
  gomod="$(cd "${dir}" && go mod download -json "k8s.io/kubernetes@${version}" |
    sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')"
  [[ -f "${gomod}" ]] || {
    log "could not locate go.mod of k8s.io/kubernetes@${version}"
    return 1
  }
  staging_version="v0.${version#v1.}"
  local -a staging
  mapfile -t staging < <(awk '$2 == "=>" && $3 ~ /^\.\/staging\/src\// {print $1}' "${gomod}" | sort -u)
  [[ ${#staging[@]} -gt 10 ]] || {
    log "found only ${#staging[@]} staging replaces in ${gomod}; refusing to guess"
    return 1
  }
  go_directive="$(awk '$1 == "go" {print $2; exit}' "${gomod}")"
  {
    echo "module nhigate.local/build/kubernetes"
    echo
    echo "go ${go_directive}"
    echo
    echo "require k8s.io/kubernetes ${version}"
    echo
    echo "tool ("
    for p in "$@"; do echo "	${p}"; done
    echo ")"
    echo
    echo "replace ("
    for m in "${staging[@]}"; do echo "	${m} => ${m} ${staging_version}"; done
    echo ")"
  } >"${dir}/go.mod"
}

# kubernetes_version_ldflags VERSION: the -X stamps kubernetes' hack/lib/version.sh sets, so the
# binaries report the real release.
kubernetes_version_ldflags() {
  local version=$1 minor pkg out=""
  minor="${version#v1.}"
  minor="${minor%%.*}"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    out+=" -X ${pkg}.gitVersion=${version} -X ${pkg}.gitMajor=1 -X ${pkg}.gitMinor=${minor}"
    out+=" -X ${pkg}.gitTreeState=clean -X ${pkg}.buildDate=1970-01-01T00:00:00Z"
  done
  printf '%s' "${out}"
}
