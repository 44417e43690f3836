#!/usr/bin/env bash
# A real single-node Kubernetes cluster on this machine: the control plane of
# hack/control-plane.sh plus containerd + runc + CNI bridge, kubelet, kube-proxy (iptables),
# kube-scheduler, CoreDNS and kube-router's NetworkPolicy controller, with the nhigate image and a
# pause image imported into containerd. Pods live on a bridge of ours; a guard (an nft table of
# ours) drops any pod traffic that would leave through another interface.
#
# usage: hack/node.sh start|stop|status|env
#   start   install/build what is missing, bring everything up, wait for the node to be Ready,
#           print env lines (KUBECONFIG, PATH, NHIGATE_NODE_*, NHIGATE_IMAGE_REF).
#   stop    delete the pods, stop every process by PID, remove what start created (iptables and
#           ipset entries, nft guard, netns, bridge, mounts, cgroups) and restore the sysctls
#           kubelet, kube-proxy and the CNI plugin change; then stop the control plane. Each
#           process gets SIGTERM, then SIGKILL, and is verified gone; stop exits 1, naming them,
#           if a process of the node or the control plane survives (it still undoes the rest).
#   env     print shell `export` lines for the running node.
#   status  exit 0 when every process is alive and the node is Ready.
#
# environment:
#   NHIGATE_NODE_STATE_DIR  state dir (default: <repo>/hack/.work/node, git-ignored)
#   NHIGATE_NODE_SLOT       0-99: picks the bridge (nhg<slot>), the pod range 10.213.<slot>.0/24,
#                           the Service range 10.214.<slot>.0/24 (default: the first free slot)
#   NHIGATE_NODE_WATCH_PID  stop the node automatically when this process exits
#   NHIGATE_NODE_TIMEOUT    seconds to wait for each part (default 180)
#
# One node per machine at a time: kube-proxy and kube-router own host-wide iptables chains
# (KUBE-SERVICES, KUBE-ROUTER-*) that two of them would fight over, so start refuses while another
# node's marker (/run/nhigate-node.owner) names a live kubelet. Ports, bridge and ranges are
# parameterised all the same, so leftovers of one run never collide with the next.
set -euo pipefail

# shellcheck disable=SC1091
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib/node.sh"
# shellcheck source=hack/lib/process.sh
source "${HACK_DIR}/lib/process.sh"

STATE_DIR="${NHIGATE_NODE_STATE_DIR:-${HACK_DIR}/.work/node}"
TIMEOUT="${NHIGATE_NODE_TIMEOUT:-180}"
RUN="${STATE_DIR}/run"
LOGS="${STATE_DIR}/logs"
PKI="${STATE_DIR}/pki"
ENV_FILE="${STATE_DIR}/node.env"
SAVED="${STATE_DIR}/saved"
OWNER_MARKER=/run/nhigate-node.owner
CP_STATE_DIR="${STATE_DIR}/control-plane"
# Started in this order, stopped in the reverse one.
COMPONENTS=(containerd kubelet kube-proxy kube-scheduler coredns kube-router)
# What kubelet (kernel.*, vm.*), kube-proxy and the bridge plugin (net.*) may rewrite.
SYSCTLS=(kernel.panic kernel.panic_on_oops vm.overcommit_memory vm.panic_on_oom
  kernel.keys.root_maxkeys kernel.keys.root_maxbytes net.ipv4.ip_forward
  net.ipv4.conf.all.route_localnet net.bridge.bridge-nf-call-iptables
  net.bridge.bridge-nf-call-ip6tables net.netfilter.nf_conntrack_max
  net.netfilter.nf_conntrack_tcp_timeout_established net.netfilter.nf_conntrack_tcp_timeout_close_wait)

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

launch() {
  local name=$1 bin=$2
  shift 2
  setsid "${bin}" "$@" >"${LOGS}/${name}.log" 2>&1 </dev/null &
  echo $! >"${RUN}/${name}.pid"
}

# wait_until NAME DESCRIPTION CMD...: poll CMD until it succeeds, failing early if NAME died.
wait_until() {
  local name=$1 what=$2 deadline=$((SECONDS + TIMEOUT))
  shift 2
  while ((SECONDS < deadline)); do
    if [[ -n "${name}" ]] && ! alive "${name}"; then
      log "${name} exited while waiting for ${what}; last log lines:"
      tail -n 30 "${LOGS}/${name}.log" >&2
      return 1
    fi
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  log "timed out after ${TIMEOUT} s waiting for ${what}"
  [[ -z "${name}" ]] || tail -n 30 "${LOGS}/${name}.log" >&2
  return 1
}

# The settings of one slot. Sets BRIDGE, POD_CIDR, NODE_IP, SERVICE_CIDR, NODE_NAME.
slot_settings() {
  local slot=$1
  BRIDGE="nhg${slot}"
  POD_CIDR="10.213.${slot}.0/24"
  NODE_IP="10.213.${slot}.1"
  SERVICE_CIDR="10.214.${slot}.0/24"
  NODE_NAME="nhigate-node-${slot}"
}

# A slot whose bridge does not exist and whose ranges no route on this machine uses.
pick_slot() {
  local slot
  for slot in $(seq 0 99); do
    ip link show "nhg${slot}" >/dev/null 2>&1 && continue
    ip route show | grep -qE "^10\.21[34]\.${slot}\." && continue
    echo "${slot}"
    return 0
  done
  log "no free node slot (bridges nhg0..nhg99 all exist)"
  return 1
}

ensure_packages() {
  local missing=() p
  local -A provides=([containerd]=containerd [runc]=runc [/usr/lib/cni/bridge]=containernetworking-plugins
    [iptables]=iptables [nft]=nftables [ipset]=ipset [conntrack]=conntrack [gcc]=gcc [openssl]=openssl)
  for p in "${!provides[@]}"; do
    if [[ "${p}" == /* ]]; then [[ -x "${p}" ]] || missing+=("${provides[${p}]}"); else
      command -v "${p}" >/dev/null 2>&1 || missing+=("${provides[${p}]}")
    fi
  done
  if ((${#missing[@]})); then
    log "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  # kube-proxy and kube-router program iptables through the nft backend only: touching
  # iptables-legacy creates kernel tables that stay until reboot.
  [[ "$(iptables --version)" == *nf_tables* ]] || {
    log "iptables is not the nf_tables variant: $(iptables --version)"
    return 1
  }
}

# --- certificates (signed by the control plane's CA) ---------------------------------------------
sign() {
  local name=$1 subject=$2 ext=$3 ca=$4
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "${PKI}/${name}.key" -out "${PKI}/${name}.csr" -subj "${subject}" 2>/dev/null
  printf '%b\n' "${ext}" >"${PKI}/${name}.ext"
  openssl x509 -req -in "${PKI}/${name}.csr" -CA "${ca}/ca.crt" -CAkey "${ca}/ca.key" \
    -CAcreateserial -CAserial "${PKI}/ca.srl" -days 30 -sha256 -extfile "${PKI}/${name}.ext" \
    -out "${PKI}/${name}.crt" 2>/dev/null
  rm -f "${PKI}/${name}.csr" "${PKI}/${name}.ext"
  chmod 600 "${PKI}/${name}.key"
}

client_cert() {
  sign "$1" "$2" "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth" "$3"
}

# kubeconfig NAME SERVER: a kubeconfig for the client cert NAME.
kubeconfig() {
  local name=$1 server=$2
  cat >"${STATE_DIR}/${name}.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: ${server}
    certificate-authority: ${PKI}/ca.crt
users:
- name: ${name}
  user:
    client-certificate: ${PKI}/${name}.crt
    client-key: ${PKI}/${name}.key
contexts:
- name: local
  context: {cluster: local, user: ${name}}
current-context: local
EOF
  chmod 600 "${STATE_DIR}/${name}.kubeconfig"
}

# --- host changes, each recorded so stop can undo it --------------------------------------------
save_sysctls() {
  local k v
  : >"${SAVED}/sysctl"
  for k in "${SYSCTLS[@]}"; do
    v="$(sysctl -n "${k}" 2>/dev/null)" || continue
    printf '%s=%s\n' "${k}" "${v}" >>"${SAVED}/sysctl"
  done
}

restore_sysctls() {
  [[ -f "${SAVED}/sysctl" ]] || return 0
  local line k v now changed=()
  while IFS= read -r line; do
    k="${line%%=*}"
    v="${line#*=}"
    now="$(sysctl -n "${k}" 2>/dev/null)" || continue
    if [[ "${now}" != "${v}" ]]; then
      sysctl -q -w "${k}=${v}" >/dev/null
      changed+=("${k}: ${now} -> ${v}")
    fi
  done <"${SAVED}/sysctl"
  ((${#changed[@]} == 0)) || log "restored sysctls: ${changed[*]}"
}

# The guard: pod addresses and Service addresses never leave through any interface but our bridge.
guard_table() { printf 'nhigate_node_guard_%s' "${BRIDGE}"; }

install_guard() {
  nft -f - <<EOF
table inet $(guard_table) {
  chain forward {
    type filter hook forward priority -200; policy accept;
    iifname "${BRIDGE}" oifname != "${BRIDGE}" counter drop
  }
  chain postrouting {
    type filter hook postrouting priority -200; policy accept;
    ip saddr ${POD_CIDR} oifname != { "${BRIDGE}", "lo" } counter drop
    ip daddr { ${POD_CIDR}, ${SERVICE_CIDR} } oifname != { "${BRIDGE}", "lo" } counter drop
  }
}
EOF
}

setup_bridge() {
  ip link add "${BRIDGE}" type bridge
  echo "${BRIDGE}" >"${SAVED}/bridge"
  ip addr add "${NODE_IP}/24" dev "${BRIDGE}"
  ip link set "${BRIDGE}" up
  # Service addresses are routed onto the bridge (kube-proxy DNATs them to pods or to the API).
  ip route add "${SERVICE_CIDR}" dev "${BRIDGE}"
}

# kube-* chains, rules that jump to them and KUBE-* ipsets: created by kubelet, kube-proxy and
# kube-router; nothing else on this machine uses those names.
remove_kube_iptables() {
  local ipt table chain rule
  for ipt in iptables ip6tables; do
    command -v "${ipt}" >/dev/null 2>&1 || continue
    for table in filter nat mangle raw; do
      "${ipt}" -t "${table}" -S >/dev/null 2>&1 || continue
      while IFS= read -r rule; do
        # iptables -S quotes comments the way a shell does: eval splits the rule as it was made.
        eval "${ipt} -t ${table} ${rule/-A /-D }" 2>/dev/null || log "could not delete ${ipt} -t ${table} ${rule}"
      done < <("${ipt}" -t "${table}" -S | grep -E '^-A (INPUT|OUTPUT|FORWARD|PREROUTING|POSTROUTING) .*-j KUBE-' || true)
      for chain in $("${ipt}" -t "${table}" -S | awk '$1 == "-N" && $2 ~ /^KUBE-/ {print $2}'); do
        "${ipt}" -t "${table}" -F "${chain}" 2>/dev/null || true
      done
      for chain in $("${ipt}" -t "${table}" -S | awk '$1 == "-N" && $2 ~ /^KUBE-/ {print $2}'); do
        "${ipt}" -t "${table}" -X "${chain}" 2>/dev/null || true
      done
    done
  done
  local set
  for set in $(ipset list -n 2>/dev/null | grep -E '^(KUBE-|kube-router)' || true); do
    ipset destroy "${set}" 2>/dev/null || true
  done
}

# --- configuration files ------------------------------------------------------------------------
write_containerd_config() {
  local pause_ref=$1
  mkdir -p "${STATE_DIR}/containerd/root" "${STATE_DIR}/containerd/state" "${STATE_DIR}/cni/net.d"
  cat >"${STATE_DIR}/containerd/config.toml" <<EOF
version = 2
root = "${STATE_DIR}/containerd/root"
state = "${STATE_DIR}/containerd/state"
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "${STATE_DIR}/containerd/containerd.sock"
[ttrpc]
  address = "${STATE_DIR}/containerd/containerd.sock.ttrpc"
[debug]
  level = "warn"
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "${pause_ref}"
  disable_apparmor = true
  restrict_oom_score_adj = true
  tolerate_missing_hugetlb_controller = true
  disable_hugetlb_controller = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "${STATE_DIR}/cni/net.d"
EOF
  # No masquerade: pods only ever talk to each other, to Services and to this host.
  cat >"${STATE_DIR}/cni/net.d/10-nhigate.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "nhigate-${BRIDGE}",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "${BRIDGE}",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "${STATE_DIR}/cni/ipam",
        "ranges": [[{"subnet": "${POD_CIDR}", "gateway": "${NODE_IP}"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "loopback"}
  ]
}
EOF
}

write_kubelet_config() {
  local port=$1 healthz_port=$2
  mkdir -p "${STATE_DIR}/kubelet" "${STATE_DIR}/pod-logs"
  # Pods resolve through CoreDNS on the node address; nothing falls back to this machine's resolver.
  printf 'nameserver %s\noptions ndots:5\n' "${NODE_IP}" >"${STATE_DIR}/resolv.conf"
  cat >"${STATE_DIR}/kubelet-config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: ${NODE_IP}
port: ${port}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: ${healthz_port}
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: ${PKI}/ca.crt}
authorization: {mode: AlwaysAllow}
tlsCertFile: ${PKI}/kubelet-serving.crt
tlsPrivateKeyFile: ${PKI}/kubelet-serving.key
cgroupDriver: cgroupfs
cgroupRoot: /${NODE_NAME}
cgroupsPerQOS: true
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: unix://${STATE_DIR}/containerd/containerd.sock
clusterDNS: [${NODE_IP}]
clusterDomain: cluster.local
resolvConf: ${STATE_DIR}/resolv.conf
podLogsDir: ${STATE_DIR}/pod-logs
maxPods: 40
serializeImagePulls: false
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
enforceNodeAllocatable: [pods]
localStorageCapacityIsolation: false
kernelMemcgNotification: false
protectKernelDefaults: false
rotateCertificates: false
serverTLSBootstrap: false
nodeStatusUpdateFrequency: 5s
shutdownGracePeriod: 0s
EOF
}

write_kube_proxy_config() {
  local metrics_port=$1 healthz_port=$2
  cat >"${STATE_DIR}/kube-proxy-config.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clientConnection: {kubeconfig: ${STATE_DIR}/kube-proxy.kubeconfig}
hostnameOverride: ${NODE_NAME}
clusterCIDR: ${POD_CIDR}
bindAddress: ${NODE_IP}
metricsBindAddress: 127.0.0.1:${metrics_port}
healthzBindAddress: 127.0.0.1:${healthz_port}
nodePortAddresses: ["${NODE_IP}/32"]
conntrack: {maxPerCore: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
iptables: {localhostNodePorts: false, masqueradeAll: false, syncPeriod: 5s, minSyncPeriod: 0s}
EOF
}

write_corefile() {
  local health_port=$1
  cat >"${STATE_DIR}/Corefile" <<EOF
cluster.local:53 in-addr.arpa:53 ip6.arpa:53 {
  bind ${NODE_IP}
  errors
  health 127.0.0.1:${health_port}
  kubernetes cluster.local in-addr.arpa ip6.arpa {
    kubeconfig ${STATE_DIR}/coredns.kubeconfig local
    pods insecure
    fallthrough in-addr.arpa ip6.arpa
  }
  cache 5
}
.:53 {
  bind ${NODE_IP}
  errors
  # Never forward: pods have no business resolving names outside the cluster here.
  template ANY ANY {
    rcode NXDOMAIN
  }
}
EOF
}

# RBAC the node's parts need that the API server's bootstrap policy does not bind by itself.
apply_node_rbac() {
  kubectl apply -f - >/dev/null <<EOF
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "nhigate-local:nodes"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:node"}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: Group, name: "system:nodes"}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "nhigate-local:network-policy-enforcer"}
rules:
- apiGroups: [""]
  resources: [namespaces, pods, services, endpoints, nodes]
  verbs: [get, list, watch]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [get, list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "nhigate-local:kube-router"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "nhigate-local:network-policy-enforcer"}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: User, name: "nhigate-local:kube-router"}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "nhigate-local:coredns"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "nhigate-local:network-policy-enforcer"}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: User, name: "nhigate-local:coredns"}]
EOF
}

node_ready() {
  [[ "$(kubectl get node "${NODE_NAME}" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" == "True" ]]
}

# --- start ---------------------------------------------------------------------------------------
cmd_start() {
  [[ "$(id -u)" -eq 0 ]] || {
    log "the node needs root (containerd, bridge, iptables)"
    return 1
  }
  if [[ -f "${OWNER_MARKER}" ]]; then
    local other
    other="$(cat "${OWNER_MARKER}")"
    if [[ -f "${other}/run/kubelet.pid" ]] && running "$(cat "${other}/run/kubelet.pid")"; then
      log "another node is running from ${other}; stop it first (hack/node.sh stop with NHIGATE_NODE_STATE_DIR=${other})"
      return 1
    fi
    log "a stale node marker names ${other}; cleaning that node up first"
    NHIGATE_NODE_STATE_DIR="${other}" "${HACK_DIR}/node.sh" stop || true
  fi
  if [[ -d "${RUN}" ]]; then
    log "cleaning up a previous node in ${STATE_DIR}"
    cmd_stop
  fi
  local started=${SECONDS}
  ensure_packages
  local node_bin cp_bin images
  cp_bin="$("${HACK_DIR}/build-control-plane.sh")"
  node_bin="$("${HACK_DIR}/build-node.sh")"
  log "building (or reusing) the nhigate and pause images"
  images="$("${HACK_DIR}/build-image.sh")"
  local NHIGATE_IMAGE_REF="" NHIGATE_IMAGE_ARCHIVE="" NHIGATE_PAUSE_REF="" NHIGATE_PAUSE_ARCHIVE=""
  eval "$(grep -E '^NHIGATE_(IMAGE|PAUSE)_(REF|ARCHIVE)=' <<<"${images}")"
  [[ -n "${NHIGATE_IMAGE_REF}" && -f "${NHIGATE_IMAGE_ARCHIVE}" && -n "${NHIGATE_PAUSE_REF}" && -f "${NHIGATE_PAUSE_ARCHIVE}" ]] || {
    log "hack/build-image.sh did not name both images: ${images}"
    return 1
  }

  local slot="${NHIGATE_NODE_SLOT:-}"
  [[ -n "${slot}" ]] || slot="$(pick_slot)"
  slot_settings "${slot}"
  ip link show "${BRIDGE}" >/dev/null 2>&1 && {
    log "bridge ${BRIDGE} already exists; choose another NHIGATE_NODE_SLOT"
    return 1
  }

  rm -rf "${RUN}" "${PKI}" "${SAVED}" "${LOGS}"
  mkdir -p "${RUN}" "${PKI}" "${SAVED}" "${LOGS}"
  echo "${slot}" >"${SAVED}/slot"
  echo "${STATE_DIR}" >"${OWNER_MARKER}"
  # If start fails half-way, undo everything it did.
  # shellcheck disable=SC2154 # rc is assigned inside the trap
  trap 'rc=$?; if [[ ${rc} -ne 0 ]]; then log "start failed; tearing down"; cmd_stop; fi' EXIT

  save_sysctls
  iptables-save 2>/dev/null | grep -vE '^#' >"${SAVED}/iptables.before" || true
  list_netns >"${SAVED}/netns.before"
  log "bridge ${BRIDGE} ${NODE_IP}/24, pods ${POD_CIDR}, Services ${SERVICE_CIDR}, node ${NODE_NAME}"
  setup_bridge
  install_guard
  echo 1 >"${SAVED}/guard"
  # Bridged pod traffic must pass iptables (NetworkPolicy and Service DNAT); routed Service
  # traffic needs forwarding. Both are restored on stop.
  sysctl -q -w net.bridge.bridge-nf-call-iptables=1 net.ipv4.ip_forward=1

  # The control plane, reachable on the bridge address (pods and kubelet need a non-loopback one).
  log "starting the control plane on ${NODE_IP}"
  NHIGATE_CP_STATE_DIR="${CP_STATE_DIR}" NHIGATE_CP_BIN_DIR="${cp_bin}" \
    NHIGATE_CP_ADDRESS="${NODE_IP}" NHIGATE_CP_SERVICE_CIDR="${SERVICE_CIDR}" \
    "${HACK_DIR}/control-plane.sh" start >"${SAVED}/control-plane.env"
  # shellcheck disable=SC1090,SC1091
  source "${CP_STATE_DIR}/control-plane.env"
  export KUBECONFIG PATH="${node_bin}:${cp_bin}:${PATH}"
  local server="${NHIGATE_CP_SERVER}" ca_dir="${NHIGATE_CP_PKI_DIR}"
  cp "${ca_dir}/ca.crt" "${PKI}/ca.crt"
  client_cert kubelet "/O=system:nodes/CN=system:node:${NODE_NAME}" "${ca_dir}"
  client_cert kube-proxy "/CN=system:kube-proxy" "${ca_dir}"
  client_cert kube-scheduler "/CN=system:kube-scheduler" "${ca_dir}"
  client_cert kube-router "/CN=nhigate-local:kube-router" "${ca_dir}"
  client_cert coredns "/CN=nhigate-local:coredns" "${ca_dir}"
  sign kubelet-serving "/CN=${NODE_NAME}" \
    "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:${NODE_IP},DNS:${NODE_NAME}" "${ca_dir}"
  local name
  for name in kubelet kube-proxy kube-scheduler kube-router coredns; do
    kubeconfig "${name}" "${server}"
  done
  apply_node_rbac

  log "starting containerd"
  write_containerd_config "${NHIGATE_PAUSE_REF}"
  local sock="${STATE_DIR}/containerd/containerd.sock"
  launch containerd containerd --config "${STATE_DIR}/containerd/config.toml"
  wait_until containerd "containerd's socket" ctr --address "${sock}" version
  log "importing ${NHIGATE_IMAGE_REF} and ${NHIGATE_PAUSE_REF}"
  ctr --address "${sock}" -n k8s.io images import "${NHIGATE_PAUSE_ARCHIVE}" >/dev/null
  ctr --address "${sock}" -n k8s.io images import "${NHIGATE_IMAGE_ARCHIVE}" >/dev/null

  local kubelet_port kubelet_healthz proxy_metrics proxy_healthz sched_port dns_health router_health
  kubelet_port="$(free_port)"
  kubelet_healthz="$(free_port)"
  proxy_metrics="$(free_port)"
  proxy_healthz="$(free_port)"
  sched_port="$(free_port)"
  dns_health="$(free_port)"
  router_health="$(free_port)"

  log "starting kubelet (port ${kubelet_port})"
  write_kubelet_config "${kubelet_port}" "${kubelet_healthz}"
  create_cgroups "${NODE_NAME}"
  launch kubelet kubelet --config="${STATE_DIR}/kubelet-config.yaml" \
    --kubeconfig="${STATE_DIR}/kubelet.kubeconfig" --hostname-override="${NODE_NAME}" \
    --node-ip="${NODE_IP}" --root-dir="${STATE_DIR}/kubelet" --cert-dir="${PKI}/kubelet-certs" --v=1
  wait_until kubelet "node ${NODE_NAME} to register" kubectl get node "${NODE_NAME}"
  # The node's pod range (kube-router reads it; nothing allocates it without a cloud or CIDR
  # allocator, and it can be set exactly once).
  kubectl patch node "${NODE_NAME}" --type merge \
    -p "{\"spec\":{\"podCIDR\":\"${POD_CIDR}\",\"podCIDRs\":[\"${POD_CIDR}\"]}}" >/dev/null

  log "starting kube-proxy, kube-scheduler, CoreDNS, kube-router"
  write_kube_proxy_config "${proxy_metrics}" "${proxy_healthz}"
  launch kube-proxy kube-proxy --config="${STATE_DIR}/kube-proxy-config.yaml" --v=1
  launch kube-scheduler kube-scheduler --kubeconfig="${STATE_DIR}/kube-scheduler.kubeconfig" \
    --authentication-kubeconfig="${STATE_DIR}/kube-scheduler.kubeconfig" \
    --authorization-kubeconfig="${STATE_DIR}/kube-scheduler.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port="${sched_port}" --leader-elect=false --v=1
  write_corefile "${dns_health}"
  launch coredns coredns -conf "${STATE_DIR}/Corefile"
  launch kube-router kube-router --kubeconfig="${STATE_DIR}/kube-router.kubeconfig" \
    --hostname-override="${NODE_NAME}" --run-firewall=true --run-router=false \
    --run-service-proxy=false --enable-cni=false --enable-ipv4=true --enable-ipv6=false \
    --service-cluster-ip-range="${SERVICE_CIDR}" --health-port="${router_health}" \
    --metrics-port=0 --iptables-sync-period=5m --v=1

  wait_until kube-proxy "kube-proxy's healthz" curl -fsS --max-time 2 "http://127.0.0.1:${proxy_healthz}/healthz"
  wait_until kube-scheduler "kube-scheduler's healthz" curl -fsS -k --max-time 2 "https://127.0.0.1:${sched_port}/healthz"
  wait_until coredns "CoreDNS's health" curl -fsS --max-time 2 "http://127.0.0.1:${dns_health}/health"
  wait_until kube-router "kube-router's health" curl -fsS --max-time 2 "http://127.0.0.1:${router_health}/healthz"
  wait_until kubelet "node ${NODE_NAME} to be Ready" node_ready

  {
    printf 'KUBECONFIG=%q\n' "${KUBECONFIG}"
    printf 'NHIGATE_NODE_BIN_DIR=%q\n' "${node_bin}"
    printf 'NHIGATE_CP_BIN_DIR=%q\n' "${cp_bin}"
    printf 'NHIGATE_CP_SERVER=%q\n' "${server}"
    printf 'NHIGATE_CP_SA_ISSUER=%q\n' "${NHIGATE_CP_SA_ISSUER}"
    printf 'NHIGATE_NODE_STATE_DIR=%q\n' "${STATE_DIR}"
    printf 'NHIGATE_NODE_NAME=%q\n' "${NODE_NAME}"
    printf 'NHIGATE_NODE_IP=%q\n' "${NODE_IP}"
    printf 'NHIGATE_NODE_BRIDGE=%q\n' "${BRIDGE}"
    printf 'NHIGATE_NODE_POD_CIDR=%q\n' "${POD_CIDR}"
    printf 'NHIGATE_NODE_SERVICE_CIDR=%q\n' "${SERVICE_CIDR}"
    printf 'NHIGATE_NODE_CONTAINERD=%q\n' "${sock}"
    printf 'NHIGATE_IMAGE_REF=%q\n' "${NHIGATE_IMAGE_REF}"
    printf 'NHIGATE_PAUSE_REF=%q\n' "${NHIGATE_PAUSE_REF}"
    local pids=() c
    for c in "${COMPONENTS[@]}"; do pids+=("$(pid_of "${c}")"); done
    printf 'NHIGATE_NODE_PIDS=%q\n' "$(IFS=,; echo "${pids[*]}")"
  } >"${ENV_FILE}"
  trap - EXIT

  if [[ -n "${NHIGATE_NODE_WATCH_PID:-}" ]]; then
    # shellcheck disable=SC2016 # $1/$2 are expanded by the inner shell
    setsid bash -c 'while kill -0 "$1" 2>/dev/null; do sleep 2; done; exec "$2" stop' \
      watchdog "${NHIGATE_NODE_WATCH_PID}" "${HACK_DIR}/node.sh" \
      >"${LOGS}/watchdog.log" 2>&1 </dev/null &
    echo $! >"${RUN}/watchdog.pid"
  fi
  log "node ${NODE_NAME} Ready in $((SECONDS - started)) s (state ${STATE_DIR})"
  cmd_env
}

# --- stop ----------------------------------------------------------------------------------------
# stop_pid (lib/process.sh) verifies each process is gone; what survives is named in SURVIVORS and
# fails stop once everything else is undone.
SURVIVORS=()

# Pods first, through the API while kubelet still runs, so CNI DEL releases their addresses,
# veths and netns the normal way.
delete_pods() {
  [[ -f "${CP_STATE_DIR}/kubeconfig" ]] && alive kubelet || return 0
  local kc=(kubectl --kubeconfig "${CP_STATE_DIR}/kubeconfig" --request-timeout=10s)
  "${kc[@]}" delete deployments,replicasets,daemonsets,statefulsets,jobs --all -A --wait=false >/dev/null 2>&1 || true
  "${kc[@]}" delete pods --all -A --grace-period=1 --wait=false >/dev/null 2>&1 || true
  local deadline=$((SECONDS + 30)) sock="${STATE_DIR}/containerd/containerd.sock"
  while ((SECONDS < deadline)); do
    [[ -z "$(ctr --address "${sock}" -n k8s.io tasks ls -q 2>/dev/null)" ]] && return 0
    sleep 1
  done
  log "pods still running after 30 s; killing their tasks"
}

# Whatever containerd still runs (a pod kubelet did not finish) and the shims it left behind.
kill_containers() {
  local sock="${STATE_DIR}/containerd/containerd.sock" id
  if alive containerd; then
    for id in $(ctr --address "${sock}" -n k8s.io tasks ls -q 2>/dev/null); do
      ctr --address "${sock}" -n k8s.io tasks kill -s KILL "${id}" >/dev/null 2>&1 || true
    done
    sleep 1
    for id in $(ctr --address "${sock}" -n k8s.io tasks ls -q 2>/dev/null); do
      ctr --address "${sock}" -n k8s.io tasks delete -f "${id}" >/dev/null 2>&1 || true
    done
  fi
}

# Shims are reparented to PID 1; ours are the ones that name our containerd's socket.
kill_shims() {
  local pid
  for pid in $(pgrep -f "containerd-shim-runc-v2 .*-address ${STATE_DIR}/containerd/containerd.sock" || true); do
    stop_pid containerd-shim "${pid}" 5 || SURVIVORS+=("containerd-shim:${pid}")
  done
}

unmount_under() {
  local dir=$1 m
  # Deepest first.
  awk -v d="${dir}" '$5 == d || index($5, d "/") == 1 {print $5}' /proc/self/mountinfo | sort -r |
    while IFS= read -r m; do
      umount "${m}" 2>/dev/null || umount -l "${m}" 2>/dev/null || log "could not unmount ${m}"
    done
}

# kubelet wants its cgroup root to exist in every v1 hierarchy; cpuset needs its cpus/mems
# copied from the parent before anything can join it.
create_cgroups() {
  local root=$1 hierarchy
  for hierarchy in /sys/fs/cgroup/*; do
    [[ -d "${hierarchy}" && "${hierarchy}" != */unified ]] || continue
    mkdir -p "${hierarchy}/${root}"
  done
  if [[ -f /sys/fs/cgroup/cpuset/cpuset.cpus ]]; then
    cat /sys/fs/cgroup/cpuset/cpuset.cpus >"/sys/fs/cgroup/cpuset/${root}/cpuset.cpus"
    cat /sys/fs/cgroup/cpuset/cpuset.mems >"/sys/fs/cgroup/cpuset/${root}/cpuset.mems"
  fi
}

remove_cgroups() {
  local root=$1 hierarchy dir
  [[ -n "${root}" ]] || return 0
  for hierarchy in /sys/fs/cgroup/*; do
    dir="${hierarchy}/${root}"
    [[ -d "${dir}" ]] || continue
    # Deepest first; a cgroup can only go once it has no processes and no children.
    find "${dir}" -depth -type d -exec rmdir {} \; 2>/dev/null || true
    [[ ! -d "${dir}" ]] || log "could not remove cgroup ${dir} (processes left?)"
  done
}

list_netns() {
  find /var/run/netns -mindepth 1 -maxdepth 1 -printf '%f\n' 2>/dev/null | sort || true
}

remove_netns() {
  [[ -f "${SAVED}/netns.before" ]] || return 0
  local ns
  for ns in $(list_netns | comm -13 "${SAVED}/netns.before" - | grep -E '^cni-' || true); do
    ip netns delete "${ns}" 2>/dev/null || true
  done
}

cmd_stop() {
  [[ -d "${STATE_DIR}" ]] || return 0
  local slot=""
  [[ -f "${SAVED}/slot" ]] && slot="$(cat "${SAVED}/slot")"
  [[ -z "${slot}" ]] || slot_settings "${slot}"
  stop_pid watchdog "$(pid_of watchdog || true)" 2 || SURVIVORS+=(watchdog)
  delete_pods
  local i
  # kube-router, CoreDNS, scheduler, kube-proxy, kubelet: reverse start order; containerd last.
  for ((i = ${#COMPONENTS[@]} - 1; i >= 1; i--)); do
    stop_pid "${COMPONENTS[i]}" "$(pid_of "${COMPONENTS[i]}" || true)" || SURVIVORS+=("${COMPONENTS[i]}")
  done
  kill_containers
  stop_pid containerd "$(pid_of containerd || true)" || SURVIVORS+=(containerd)
  kill_shims
  remove_kube_iptables
  if [[ -n "${slot}" ]]; then
    nft delete table inet "$(guard_table)" 2>/dev/null || true
    if ip link show "${BRIDGE}" >/dev/null 2>&1; then ip link delete "${BRIDGE}" || true; fi
    # Veths CNI left (their pod netns died with the pods) go with the bridge; routes too.
    remove_cgroups "${NODE_NAME}"
  fi
  remove_netns
  unmount_under "${STATE_DIR}"
  restore_sysctls
  NHIGATE_CP_STATE_DIR="${CP_STATE_DIR}" "${HACK_DIR}/control-plane.sh" stop || SURVIVORS+=(control-plane)
  [[ -f "${OWNER_MARKER}" && "$(cat "${OWNER_MARKER}")" == "${STATE_DIR}" ]] && rm -f "${OWNER_MARKER}"
  # Keep logs for post-mortems; the rest (images, pod data, keys) goes.
  # The PID files stay while a process survives, so a second stop can find it.
  ((${#SURVIVORS[@]} > 0)) || rm -rf "${RUN}"
  rm -rf "${PKI}" "${SAVED}" "${ENV_FILE}" "${STATE_DIR}/containerd" "${STATE_DIR}/kubelet" \
    "${STATE_DIR}/cni" "${STATE_DIR}"/*.kubeconfig "${STATE_DIR}"/*.yaml "${STATE_DIR}/Corefile" \
    "${STATE_DIR}/resolv.conf" 2>/dev/null || log "could not remove everything under ${STATE_DIR}"
  if ((${#SURVIVORS[@]} > 0)); then
    log "node stop FAILED: still running after SIGKILL: ${SURVIVORS[*]} (see the lines above)"
    return 1
  fi
  log "node stopped (${STATE_DIR})"
}

cmd_env() {
  [[ -f "${ENV_FILE}" ]] || {
    log "no node running in ${STATE_DIR}"
    return 1
  }
  # shellcheck disable=SC1090
  source "${ENV_FILE}"
  sed -n 's/^\([A-Z_]*\)=\(.*\)$/export \1=\2/p' "${ENV_FILE}"
  # shellcheck disable=SC2016 # ${PATH} is expanded by the shell that evals this
  printf 'export PATH=%q:%q:"${PATH}"\n' "${NHIGATE_NODE_BIN_DIR}" "${NHIGATE_CP_BIN_DIR}"
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
  NHIGATE_CP_STATE_DIR="${CP_STATE_DIR}" "${HACK_DIR}/control-plane.sh" status || return 1
  # shellcheck disable=SC1090
  source "${ENV_FILE}"
  export KUBECONFIG PATH="${NHIGATE_CP_BIN_DIR}:${PATH}"
  NODE_NAME="${NHIGATE_NODE_NAME}"
  node_ready
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  env) cmd_env ;;
  status) cmd_status ;;
  *)
    echo "usage: $0 start|stop|status|env" >&2
    exit 2
    ;;
esac
