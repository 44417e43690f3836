{{/*
RBAC rules of the controller: exactly what it touches. docs/install.md explains each rule.
"nhigate.namespacedRules" holds the rules on namespaced objects (one ClusterRole when watching
every namespace, one Role per watched namespace otherwise); "nhigate.clusterRules" holds the
cluster-scoped reads, always in a ClusterRole.
*/}}
{{- define "nhigate.namespacedRules" -}}
# The nhigate.io resources: watched, annotated by kopf (progress), never created or deleted.
- apiGroups: ["nhigate.io"]
  resources: ["identityissuers", "protectedservices", "routegrants", "revocations"]
  verbs: ["get", "list", "watch", "patch", "update"]
- apiGroups: ["nhigate.io"]
  resources: ["identityissuers/status", "protectedservices/status", "routegrants/status", "revocations/status"]
  verbs: ["get", "patch", "update"]
# ownerReferences with blockOwnerDeletion need this where OwnerReferencesPermissionEnforcement is on.
- apiGroups: ["nhigate.io"]
  resources: ["protectedservices/finalizers"]
  verbs: ["update"]
# What a ProtectedService is reconciled into (server-side apply; stale objects deleted).
- apiGroups: [""]
  resources: ["serviceaccounts", "configmaps", "services"]
  verbs: ["get", "list", "watch", "create", "update", "patch", "delete"]
# The proxy's identity-assertion signing key: written, never listed or watched.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "create", "update", "patch", "delete"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "update", "patch", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "update", "patch", "delete"]
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["get", "list", "watch", "create", "update", "patch", "delete"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "list", "watch", "create", "update", "patch", "delete"]
# The proxy's Role and RoleBinding. RBAC forbids granting what one does not hold, so the
# controller also holds what the proxy Role grants (configmaps read, leases write; below).
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["get", "list", "watch", "create", "update", "patch", "delete"]
# Proxy replicas report the policy version they serve in Leases; the controller reads them.
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["get", "list", "watch", "create", "update", "patch"]
# Bypass detection reads what could reach a backend without the proxy.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["networking.k8s.io"]
  resources: ["ingresses"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["gateway.networking.k8s.io"]
  resources: ["httproutes"]
  verbs: ["get", "list", "watch"]
# Events about reconciliation and bypass paths (kopf posts core events).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- if and (include "nhigate.leaderElection" .) .Values.watchNamespaces }}
# Leader election among controller replicas (kopf peering, one object per namespace).
- apiGroups: ["kopf.dev"]
  resources: ["kopfpeerings"]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}
{{- end }}

{{- define "nhigate.clusterRules" -}}
# NetworkPolicy namespaceSelectors are resolved against namespace labels; kopf observes namespaces.
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["get", "list", "watch"]
# kopf notices CRDs appearing and disappearing.
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["get", "list", "watch"]
# IdentityIssuer `kubernetes: {}`: the cluster's own service-account signing keys.
- nonResourceURLs: ["/openid/v1/jwks"]
  verbs: ["get"]
{{- if and (include "nhigate.leaderElection" .) (not .Values.watchNamespaces) }}
# Leader election among controller replicas (kopf peering, cluster-wide object).
- apiGroups: ["kopf.dev"]
  resources: ["clusterkopfpeerings"]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}
{{- end }}
