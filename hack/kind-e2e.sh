#!/usr/bin/env bash
# End-to-end on a kind cluster, for machines with Docker (it cannot run where there is no Docker
# engine). Builds the image, installs the chart, deploys a sample backend in namespace payments,
# applies examples/, and checks with real pods: allowed, denied, revoked, and bypass (a pod
# calling the backend Service directly must time out: the NetworkPolicy blocks it).
#
# Needs: docker, kind >= v0.24.0 (its default CNI, kindnetd, enforces NetworkPolicy; the host
# kernel needs nft_queue, which some WSL2 kernels lack), kubectl, helm.
# usage: hack/kind-e2e.sh            KEEP_CLUSTER=1 hack/kind-e2e.sh  (leave the cluster running)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CLUSTER="${KIND_CLUSTER_NAME:-nhigate-e2e}"
IMAGE="nhigate:e2e"
CLIENT_NS=e2e-client
KUBE=(kubectl --context "kind-${CLUSTER}")
RESULTS=()
FAILED=0

log() { printf '\n[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
check() { # check NAME EXPECTED ACTUAL
  if [[ $2 == "$3" ]]; then RESULTS+=("PASS  $1 (got $3)"); else
    RESULTS+=("FAIL  $1 (want $2, got $3)")
    FAILED=1
  fi
}
# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() {
  if [[ ${KEEP_CLUSTER:-0} == 1 ]]; then log "keeping cluster ${CLUSTER}"; else kind delete cluster --name "${CLUSTER}"; fi
}

for tool in docker kind kubectl helm; do
  command -v "${tool}" >/dev/null || {
    echo "missing ${tool}" >&2
    exit 1
  }
done
kind_version="$(kind version | sed -n 's/^kind v\([0-9]*\.[0-9]*\).*/\1/p')"
[[ ${kind_version%%.*} -gt 0 || ${kind_version#*.} -ge 24 ]] || {
  echo "kind >= v0.24.0 needed (kindnetd enforcing NetworkPolicy); found ${kind_version}" >&2
  exit 1
}

log "1/6 kind cluster ${CLUSTER} and image ${IMAGE}"
kind create cluster --name "${CLUSTER}" --wait 120s
trap cleanup EXIT
docker build -f "${ROOT}/images/Dockerfile" -t "${IMAGE}" "${ROOT}"
kind load docker-image "${IMAGE}" --name "${CLUSTER}"

log "2/6 helm install"
helm --kube-context "kind-${CLUSTER}" install nhigate "${ROOT}/charts/nhigate" \
  --namespace nhigate-system --create-namespace --wait --timeout 3m \
  --set image.repository=nhigate,image.tag=e2e,image.pullPolicy=Never
helm --kube-context "kind-${CLUSTER}" test nhigate --namespace nhigate-system

# Names come from examples/ (first ProtectedService, its issuer, the first grant's first rule).
example() { # example JSONPATH -> first value in examples/ (client-side dry run, nothing applied)
  "${KUBE[@]}" apply --dry-run=client -f "${ROOT}/examples/" -o jsonpath="$1" | awk '{print $1}'
}
NS="$(example '{.items[?(@.kind=="ProtectedService")].metadata.namespace}')"
PS="$(example '{.items[?(@.kind=="ProtectedService")].metadata.name}')"
SVC="$(example '{.items[?(@.kind=="ProtectedService")].spec.backend.service}')"
PORT="$(example '{.items[?(@.kind=="ProtectedService")].spec.backend.port}')"
SUBJECT="$(example '{.items[?(@.kind=="RouteGrant")].spec.subjects[0].token.subject}')"
CLAIMS="$(example '{.items[?(@.kind=="RouteGrant")].spec.subjects[0].token.claims}')"
GRANTED="$(example '{.items[?(@.kind=="RouteGrant")].spec.rules[0].paths[0]}' | sed 's#/\*\*$#/e2e#; s#\*#x#g')"
ISSUER="$(example '{.items[?(@.kind=="IdentityIssuer")].spec.issuer}')"
AUDIENCE="$(example '{.items[?(@.kind=="IdentityIssuer")].spec.audiences[0]}')"
KID="$(example '{.items[?(@.kind=="IdentityIssuer")].spec.jwks.keys[0].kid}')"
KEY_FILE="$(grep -l 'PRIVATE KEY' "${ROOT}"/examples/demo-keys/* | head -n1)"

log "3/6 backend ${NS}/${SVC}:${PORT} (python http.server from the same image) and a client pod"
"${KUBE[@]}" create namespace "${NS}" --dry-run=client -o yaml | "${KUBE[@]}" apply -f -
"${KUBE[@]}" -n "${NS}" create deployment "${SVC}" --image "${IMAGE}" --port "${PORT}" \
  -- python -m http.server "${PORT}" --directory /tmp
"${KUBE[@]}" -n "${NS}" patch deployment "${SVC}" --type json -p \
  '[{"op":"add","path":"/spec/template/spec/containers/0/imagePullPolicy","value":"Never"}]'
"${KUBE[@]}" -n "${NS}" expose deployment "${SVC}" --port "${PORT}"
"${KUBE[@]}" create namespace "${CLIENT_NS}"
"${KUBE[@]}" -n "${CLIENT_NS}" run client --image "${IMAGE}" --image-pull-policy Never \
  --command -- sleep 3600
"${KUBE[@]}" -n "${NS}" rollout status "deployment/${SVC}" --timeout 2m
"${KUBE[@]}" -n "${CLIENT_NS}" wait --for=condition=Ready pod/client --timeout 2m

log "4/6 apply examples/ and wait for enforcement"
"${KUBE[@]}" apply -f "${ROOT}/examples/"
"${KUBE[@]}" -n "${NS}" wait --for=condition=Ready "protectedservice/${PS}" --timeout 3m
"${KUBE[@]}" -n "${NS}" wait --for=condition=Enforced routegrants --all --timeout 2m
"${KUBE[@]}" get nhigate -A

# Both run in the client pod, whose image has Python, PyJWT and cryptography.
mint() { # mint SUBJECT JTI -> a 10-minute token with the grant's claims, signed with the demo key
  "${KUBE[@]}" -n "${CLIENT_NS}" exec -i client -- python -c '
import json, sys, time, jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key
key = load_pem_private_key(sys.stdin.buffer.read(), None)
alg = "ES256" if isinstance(key, ec.EllipticCurvePrivateKey) else "RS256" if isinstance(key, rsa.RSAPrivateKey) else "EdDSA"
now = int(time.time())
claims = {**json.loads(sys.argv[6] or "{}"), "iss": sys.argv[1], "aud": sys.argv[2], "sub": sys.argv[3], "iat": now, "nbf": now, "exp": now + 600, "jti": sys.argv[5]}
print(jwt.encode(claims, key, algorithm=alg, headers={"kid": sys.argv[4]} if sys.argv[4] else None))' \
    "${ISSUER}" "${AUDIENCE}" "$1" "${KID}" "$2" "${CLAIMS}" <"${KEY_FILE}"
}
status_of() { # status_of URL [TOKEN] -> HTTP status, or "timeout"
  "${KUBE[@]}" -n "${CLIENT_NS}" exec client -- python -c '
import sys, urllib.error, urllib.request
req = urllib.request.Request(sys.argv[1])
if len(sys.argv) > 2: req.add_header("Authorization", "Bearer " + sys.argv[2])
try: print(urllib.request.urlopen(req, timeout=5).status)
except urllib.error.HTTPError as e: print(e.code)
except OSError: print("timeout")' "$@"
}
ENDPOINT="$("${KUBE[@]}" -n "${NS}" get protectedservice "${PS}" -o jsonpath='{.status.endpoint}')"
TOKEN="$(mint "${SUBJECT}" e2e-token-1)"
TOKEN2="$(mint "${SUBJECT}" e2e-token-2)"

log "5/6 scenarios: ${SUBJECT} -> ${ENDPOINT}${GRANTED}"
check "allowed: granted path with token" 200 "$(status_of "${ENDPOINT}${GRANTED}" "${TOKEN}")"
check "denied: no token" 401 "$(status_of "${ENDPOINT}${GRANTED}")"
check "denied: path not granted" 403 "$(status_of "${ENDPOINT}/nhigate-e2e-not-granted" "${TOKEN}")"
check "bypass: backend Service called directly" timeout "$(status_of "http://${SVC}.${NS}.svc:${PORT}/")"
check "DirectPathBlocked condition" True "$("${KUBE[@]}" -n "${NS}" get protectedservice "${PS}" \
  -o jsonpath='{.status.conditions[?(@.type=="DirectPathBlocked")].status}')"
# until_denied URL TOKEN -> "denied" at the first 401/403 within 10 s, else the last status
until_denied() {
  local got=none
  for _ in $(seq 20); do
    got="$(status_of "$1" "$2")"
    if [[ ${got} == 401 || ${got} == 403 ]]; then
      echo denied
      return
    fi
    sleep 0.5
  done
  echo "${got}"
}
"${KUBE[@]}" apply -f - <<EOF
apiVersion: nhigate.io/v1alpha1
kind: Revocation
metadata: {name: e2e-revoke-token-1, namespace: ${NS}}
spec: {tokenId: e2e-token-1, reason: kind end-to-end test}
EOF
check "revoked: Revocation of token 1 (jti)" denied "$(until_denied "${ENDPOINT}${GRANTED}" "${TOKEN}")"
check "not revoked: token 2 still allowed" 200 "$(status_of "${ENDPOINT}${GRANTED}" "${TOKEN2}")"
"${KUBE[@]}" -n "${NS}" delete routegrants --all
check "grant deleted: token 2 denied" denied "$(until_denied "${ENDPOINT}${GRANTED}" "${TOKEN2}")"

log "6/6 summary"
printf '%s\n' "${RESULTS[@]}"
"${KUBE[@]}" get nhigate -A
exit "${FAILED}"
