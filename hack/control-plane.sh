#!/usr/bin/env bash
# A real local Kubernetes control plane: etcd + kube-apiserver + kube-controller-manager on
# 127.0.0.1, with generated certificates, RBAC on, and a kubeconfig for an admin client cert.
#
# usage: hack/control-plane.sh start|stop|env|status
#   start   build the binaries if needed, start etcd, kube-apiserver and kube-controller-manager,
#           wait until /readyz and the controller manager's /healthz answer ok, print env lines.
#   stop    stop every process this state dir started, by PID, dependents before etcd: SIGTERM,
#           NHIGATE_CP_STOP_GRACE seconds, then SIGKILL; verify each is gone, then delete the
#           data (logs are kept). Exits 1, naming it and keeping the PID files, if one survives.
#   env     print shell `export` lines (KUBECONFIG, PATH, ...) for the running control plane.
#   status  exit 0 if all three processes are alive and /readyz answers ok.
#
# environment:
#   NHIGATE_CP_STATE_DIR  state dir (default: <repo>/hack/.work/control-plane, git-ignored)
#   NHIGATE_CP_BIN_DIR    use these binaries instead of building (default: hack/build-control-plane.sh)
#   NHIGATE_CP_WATCH_PID  stop the control plane automatically when this process exits
#   NHIGATE_CP_TIMEOUT    seconds to wait for readiness (default 120)
#   NHIGATE_CP_STOP_GRACE seconds each process gets to exit on SIGTERM before SIGKILL (default 10)
#   NHIGATE_CP_ADDRESS    address the API server binds, advertises and is reached at (default
#                         127.0.0.1; hack/node.sh passes its bridge gateway: kubelet and pods
#                         need a non-loopback endpoint for the `kubernetes` Service)
#   NHIGATE_CP_SERVICE_CIDR  the Service IP range (default 10.0.0.0/24)
#
# Example:  hack/control-plane.sh start && eval "$(hack/control-plane.sh env)" && kubectl get --raw /readyz
set -euo pipefail

# shellcheck disable=SC1091 # shellcheck runs without -x in hack/test.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib/control-plane.sh"
# shellcheck source=hack/lib/process.sh
source "${HACK_DIR}/lib/process.sh"

STATE_DIR="${NHIGATE_CP_STATE_DIR:-${HACK_DIR}/.work/control-plane}"
TIMEOUT="${NHIGATE_CP_TIMEOUT:-120}"
STOP_GRACE="${NHIGATE_CP_STOP_GRACE:-10}"
[[ "${STOP_GRACE}" =~ ^[0-9]+$ ]] || {
  log "NHIGATE_CP_STOP_GRACE must be a whole number of seconds, not '${STOP_GRACE}'"
  exit 2
}
PKI="${STATE_DIR}/pki"
LOGS="${STATE_DIR}/logs"
RUN="${STATE_DIR}/run"
ENV_FILE="${STATE_DIR}/control-plane.env"
COMPONENTS=(etcd kube-apiserver kube-controller-manager)
ADDRESS="${NHIGATE_CP_ADDRESS:-127.0.0.1}"
SERVICE_CIDR="${NHIGATE_CP_SERVICE_CIDR:-10.0.0.0/24}"
# The first address of the range is the `kubernetes` Service's ClusterIP.
KUBERNETES_SERVICE_IP="$(python3 -c 'import ipaddress, sys; print(ipaddress.ip_network(sys.argv[1])[1])' "${SERVICE_CIDR}")"

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

pid_of() {
  read_pid_file "${RUN}/$1.pid"
}

alive() {
  local pid
  pid="$(pid_of "$1")" || return 1
  [[ -n "${pid}" ]] && running "${pid}"
}

# --- certificates ---------------------------------------------------------------------------------
# sign NAME SUBJECT EXTENSIONS: an EC P-256 key and a certificate signed by the local CA.
sign() {
  local name=$1 subject=$2 ext=$3
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "${PKI}/${name}.key" -out "${PKI}/${name}.csr" -subj "${subject}" 2>/dev/null
  printf '%b\n' "${ext}" >"${PKI}/${name}.ext"
  openssl x509 -req -in "${PKI}/${name}.csr" -CA "${PKI}/ca.crt" -CAkey "${PKI}/ca.key" \
    -CAcreateserial -days 365 -sha256 -extfile "${PKI}/${name}.ext" -out "${PKI}/${name}.crt" 2>/dev/null
  rm -f "${PKI}/${name}.csr" "${PKI}/${name}.ext"
  chmod 600 "${PKI}/${name}.key"
}

generate_pki() {
  mkdir -p "${PKI}"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 -sha256 \
    -keyout "${PKI}/ca.key" -out "${PKI}/ca.crt" -subj "/CN=nhigate-local-ca" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  chmod 600 "${PKI}/ca.key"
  # The API server's serving cert: loopback plus the in-cluster names of the kubernetes Service.
  sign apiserver "/CN=kube-apiserver" \
    "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,IP:::1,IP:${ADDRESS},IP:${KUBERNETES_SERVICE_IP},DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  # Client certs: the API server maps CN to the user name and O to groups.
  sign admin "/O=system:masters/CN=nhigate-admin" \
    "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth"
  sign kube-controller-manager "/CN=system:kube-controller-manager" \
    "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth"
  # The API server's client cert towards kubelets (logs, exec, port-forward on a real node).
  sign apiserver-kubelet-client "/O=nhigate:kubelet-api/CN=kube-apiserver-kubelet-client" \
    "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth"
  # Service-account token signing key (the API server signs, the controller manager signs legacy
  # token Secrets, both verify with the public half).
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "${PKI}/sa.key" 2>/dev/null
  openssl pkey -in "${PKI}/sa.key" -pubout -out "${PKI}/sa.pub" 2>/dev/null
  chmod 600 "${PKI}/sa.key"
}

# write_kubeconfig FILE SERVER USER CERT KEY
write_kubeconfig() {
  local file=$1 server=$2 user=$3 cert=$4 key=$5
  cat >"${file}" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: nhigate-local
  cluster:
    server: ${server}
    certificate-authority-data: $(base64 -w0 <"${PKI}/ca.crt")
users:
- name: ${user}
  user:
    client-certificate-data: $(base64 -w0 <"${cert}")
    client-key-data: $(base64 -w0 <"${key}")
contexts:
- name: nhigate-local
  context:
    cluster: nhigate-local
    user: ${user}
    namespace: default
current-context: nhigate-local
EOF
  chmod 600 "${file}"
}

# --- processes ------------------------------------------------------------------------------------
# launch NAME BINARY ARGS...: start in its own session (so a Ctrl-C in the caller's terminal does
# not reach it), log to logs/NAME.log, remember the pid.
launch() {
  local name=$1 bin=$2
  shift 2
  setsid "${bin}" "$@" >"${LOGS}/${name}.log" 2>&1 </dev/null &
  echo $! >"${RUN}/${name}.pid"
}

# wait_for NAME URL CURL_ARGS...: poll URL until it answers "ok", failing early if NAME died.
wait_for() {
  local name=$1 url=$2 deadline=$((SECONDS + TIMEOUT)) body
  shift 2
  while ((SECONDS < deadline)); do
    alive "${name}" || {
      log "${name} exited during startup; last log lines:"
      tail -n 30 "${LOGS}/${name}.log" >&2
      return 1
    }
    body="$(curl -sS --max-time 3 "$@" "${url}" 2>/dev/null || true)"
    [[ "${body}" == "ok" ]] && return 0
    sleep 0.5
  done
  log "${name} not ready after ${TIMEOUT} s (${url}); last log lines:"
  tail -n 30 "${LOGS}/${name}.log" >&2
  return 1
}

# stop_all: every recorded process, one at a time, dependents first (kube-apiserver ignores
# SIGTERM once etcd is gone); each is verified gone (lib/process.sh stop_pid). The watchdog is
# skipped when it is the process running this stop. Fails, naming them, if any survives.
stop_all() {
  local name survivors=()
  for name in watchdog kube-controller-manager kube-apiserver etcd; do
    stop_pid "${name}" "$(pid_of "${name}" || true)" "${STOP_GRACE}" || survivors+=("${name}")
  done
  ((${#survivors[@]} == 0)) || {
    log "could not stop ${survivors[*]} (PID files kept in ${RUN})"
    return 1
  }
}

cmd_stop() {
  [[ -d "${STATE_DIR}" ]] || return 0
  stop_all || return 1
  # Keep logs for post-mortems; everything else (etcd data, keys, kubeconfigs) goes.
  rm -rf "${RUN}" "${PKI}" "${STATE_DIR}/etcd" "${STATE_DIR}/kubeconfig" \
    "${STATE_DIR}/kube-controller-manager.kubeconfig" "${ENV_FILE}" "${STATE_DIR}/kcm-certs" \
    "${STATE_DIR}/apiserver-certs"
  log "control plane stopped (${STATE_DIR})"
}

cmd_env() {
  [[ -f "${ENV_FILE}" ]] || {
    log "no control plane running in ${STATE_DIR}"
    return 1
  }
  # shellcheck disable=SC1090
  source "${ENV_FILE}"
  sed -n 's/^\([A-Z_]*\)=\(.*\)$/export \1=\2/p' "${ENV_FILE}"
  # shellcheck disable=SC2016 # ${PATH} is expanded by the shell that evals this
  printf 'export PATH=%q:"${PATH}"\n' "${NHIGATE_CP_BIN_DIR}"
}

cmd_status() {
  local name
  [[ -f "${ENV_FILE}" ]] || return 1
  for name in "${COMPONENTS[@]}"; do
    alive "${name}" || {
      log "${name} is not running"
      return 1
    }
  done
  # shellcheck disable=SC1090
  source "${ENV_FILE}"
  [[ "$(curl -sS --max-time 3 --cacert "${PKI}/ca.crt" --cert "${PKI}/admin.crt" --key "${PKI}/admin.key" \
    "${NHIGATE_CP_SERVER}/readyz" 2>/dev/null)" == "ok" ]]
}

cmd_start() {
  local name bin_dir
  for name in "${COMPONENTS[@]}"; do
    if alive "${name}"; then
      log "${name} already running from ${STATE_DIR}; run '$0 stop' first"
      return 1
    fi
  done
  if [[ -n "${NHIGATE_CP_BIN_DIR:-}" ]]; then
    bin_dir="${NHIGATE_CP_BIN_DIR}"
  else
    bin_dir="$("${HACK_DIR}/build-control-plane.sh")"
  fi
  for name in "${COMPONENTS[@]}" kubectl; do
    [[ -x "${bin_dir}/${name}" ]] || {
      log "missing ${bin_dir}/${name}"
      return 1
    }
  done
  local started=${SECONDS}
  rm -rf "${RUN}" "${PKI}" "${STATE_DIR}/etcd" "${LOGS}"
  mkdir -p "${RUN}" "${LOGS}" "${STATE_DIR}/etcd"
  chmod 700 "${STATE_DIR}/etcd"
  # If startup fails half-way, leave nothing running.
  trap 'if [[ $? -ne 0 ]]; then stop_all; fi' EXIT

  generate_pki
  local etcd_port peer_port api_port kcm_port
  etcd_port="$(free_port)"
  peer_port="$(free_port)"
  api_port="$(free_port)"
  kcm_port="$(free_port)"
  local server="https://${ADDRESS}:${api_port}"
  local etcd_url="http://127.0.0.1:${etcd_port}"
  local issuer="${server}"

  # etcd on loopback only, plain HTTP (nothing but the API server reaches it). fsync is off: this
  # is disposable test data, and fsync dominates latency on a shared CI disk.
  launch etcd "${bin_dir}/etcd" \
    --name=default --data-dir="${STATE_DIR}/etcd" \
    --listen-client-urls="${etcd_url}" --advertise-client-urls="${etcd_url}" \
    --listen-peer-urls="http://127.0.0.1:${peer_port}" \
    --initial-advertise-peer-urls="http://127.0.0.1:${peer_port}" \
    --initial-cluster="default=http://127.0.0.1:${peer_port}" \
    --unsafe-no-fsync=true --log-level=warn
  wait_for etcd "${etcd_url}/readyz"

  launch kube-apiserver "${bin_dir}/kube-apiserver" \
    --bind-address="${ADDRESS}" --advertise-address="${ADDRESS}" --secure-port="${api_port}" \
    --etcd-servers="${etcd_url}" \
    --cert-dir="${STATE_DIR}/apiserver-certs" \
    --tls-cert-file="${PKI}/apiserver.crt" --tls-private-key-file="${PKI}/apiserver.key" \
    --client-ca-file="${PKI}/ca.crt" \
    --kubelet-client-certificate="${PKI}/apiserver-kubelet-client.crt" \
    --kubelet-client-key="${PKI}/apiserver-kubelet-client.key" \
    --kubelet-preferred-address-types=InternalIP \
    --authorization-mode=RBAC \
    --service-account-issuer="${issuer}" \
    --service-account-key-file="${PKI}/sa.pub" \
    --service-account-signing-key-file="${PKI}/sa.key" \
    --service-cluster-ip-range="${SERVICE_CIDR}" \
    --allow-privileged=true --profiling=false --v=1
  wait_for kube-apiserver "${server}/readyz" \
    --cacert "${PKI}/ca.crt" --cert "${PKI}/admin.crt" --key "${PKI}/admin.key"

  write_kubeconfig "${STATE_DIR}/kubeconfig" "${server}" nhigate-admin "${PKI}/admin.crt" "${PKI}/admin.key"
  write_kubeconfig "${STATE_DIR}/kube-controller-manager.kubeconfig" "${server}" \
    system:kube-controller-manager "${PKI}/kube-controller-manager.crt" "${PKI}/kube-controller-manager.key"

  # All default controllers (garbage collector, namespace, serviceaccount, serviceaccount-token,
  # deployment, replicaset, ...); each runs under its own service account, as in a real cluster.
  launch kube-controller-manager "${bin_dir}/kube-controller-manager" \
    --kubeconfig="${STATE_DIR}/kube-controller-manager.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port="${kcm_port}" \
    --cert-dir="${STATE_DIR}/kcm-certs" \
    --leader-elect=false --use-service-account-credentials=true \
    --service-account-private-key-file="${PKI}/sa.key" \
    --root-ca-file="${PKI}/ca.crt" \
    --cluster-signing-cert-file="${PKI}/ca.crt" --cluster-signing-key-file="${PKI}/ca.key" \
    --profiling=false --v=1
  wait_for kube-controller-manager "https://127.0.0.1:${kcm_port}/healthz" --insecure

  # KEY=VALUE lines, values shell-quoted (printf %q): sourced by `env`, read by tests/cluster.py.
  {
    printf 'KUBECONFIG=%q\n' "${STATE_DIR}/kubeconfig"
    printf 'NHIGATE_CP_SERVER=%q\n' "${server}"
    printf 'NHIGATE_CP_BIN_DIR=%q\n' "${bin_dir}"
    printf 'NHIGATE_CP_STATE_DIR=%q\n' "${STATE_DIR}"
    printf 'NHIGATE_CP_CA_FILE=%q\n' "${PKI}/ca.crt"
    printf 'NHIGATE_CP_PKI_DIR=%q\n' "${PKI}"
    printf 'NHIGATE_CP_SERVICE_CIDR=%q\n' "${SERVICE_CIDR}"
    printf 'NHIGATE_CP_SA_ISSUER=%q\n' "${issuer}"
    printf 'NHIGATE_CP_ETCD_URL=%q\n' "${etcd_url}"
    printf 'NHIGATE_CP_KCM_URL=%q\n' "https://127.0.0.1:${kcm_port}"
    printf 'NHIGATE_CP_PIDS=%q\n' "$(pid_of etcd),$(pid_of kube-apiserver),$(pid_of kube-controller-manager)"
  } >"${ENV_FILE}"
  trap - EXIT

  if [[ -n "${NHIGATE_CP_WATCH_PID:-}" ]]; then
    # Tear down when the owner (e.g. a pytest session) dies without calling stop.
    # shellcheck disable=SC2016 # $1/$2 are expanded by the inner shell
    setsid bash -c 'while kill -0 "$1" 2>/dev/null; do sleep 2; done; exec "$2" stop' \
      watchdog "${NHIGATE_CP_WATCH_PID}" "${HACK_DIR}/control-plane.sh" \
      >"${LOGS}/watchdog.log" 2>&1 </dev/null &
    echo $! >"${RUN}/watchdog.pid"
  fi
  log "control plane ready in $((SECONDS - started)) s: ${server} (state ${STATE_DIR})"
  cmd_env
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  env) cmd_env ;;
  status) cmd_status ;;
  *)
    echo "usage: $0 start|stop|env|status" >&2
    exit 2
    ;;
esac
