{{/*
RBAC rules of the controller: exactly what it touches. docs/install.md explains each rule.
"nhigate.namespacedRules" holds the rules on namespaced objects (one ClusterRole when watching
every namespace, one Role per watched namespace otherwise); "nhigate.clusterRules" holds the
cluster-scoped reads, always in a ClusterRole.
*/}}
{{- define "nhigate.namespacedRules" -}}
# The nhigate.io resources: watched; kopf patches its progress annotations. Never created or
# deleted: users grant and revoke access, the controller only reports.
- apiGroups: ["nhigate.io"]
  resources: ["identityissuers", "protectedservices", "routegrants", "revocations"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["nhigate.io"]
  resources: ["identityissuers/status", "protectedservices/status", "routegrants/status", "revocations/status"]
  verbs: ["get", "patch", "update"]
# Owner references with blockOwnerDeletion need this where OwnerReferencesPermissionEnforcement is on.
- apiGroups: ["nhigate.io"]
  resources: ["protectedservices/finalizers"]
  verbs: ["update"]
# What a ProtectedService is reconciled into, by server-side apply (create + patch). Owned
# objects go away with their ProtectedService (garbage collection), so no delete, except for
# the HPA and the isolation NetworkPolicy, removed when autoscaling / Enforce is turned off.
- apiGroups: [""]
  resources: ["configmaps", "services"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch"]
# Proxy ServiceAccounts are written; every ServiceAccount is watched so that the tokens of
# a deleted (or recreated) granted account stop working (docs/security.md, retired identities).
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["get", "list", "watch", "create", "patch"]
# Only nhigate-<name>-assertion-key is read or written; never listed or watched.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "create", "patch"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["get", "create", "patch"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "create", "patch"]
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["get", "create", "patch", "delete"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Proxy replicas report the policy version they serve in Leases; the controller reads them.
# RBAC forbids granting what one does not hold, and the proxy Role grants leases
# create/update/patch and configmaps get/list/watch, so the controller holds those too.
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
# Events: accepted/rejected/expired grants, bypass paths (controller), handler failures (kopf).
- apiGroups: ["", "events.k8s.io"]
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
- nonResourceURLs: ["/openid/v1/jwks", "/.well-known/openid-configuration"]
  verbs: ["get"]
{{- if and (include "nhigate.leaderElection" .) (not .Values.watchNamespaces) }}
# Leader election among controller replicas (kopf peering, cluster-wide object).
- apiGroups: ["kopf.dev"]
  resources: ["clusterkopfpeerings"]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}
{{- end }}
