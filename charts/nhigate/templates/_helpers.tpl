{{/*
Names, labels and small decisions shared by the templates.
*/}}

{{/* Chart name, overridable. */}}
{{- define "nhigate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name prefix: release name, plus the chart name unless the release name contains it. */}}
{{- define "nhigate.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Name of the controller's Deployment, Service, ClusterRole and bindings. */}}
{{- define "nhigate.controllerName" -}}
{{- printf "%s-controller" (include "nhigate.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "nhigate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object the chart creates (the controller's also get selectorLabels). */}}
{{- define "nhigate.labels" -}}
helm.sh/chart: {{ include "nhigate.chart" . }}
app.kubernetes.io/name: {{ include "nhigate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: nhigate
{{- end }}

{{/* Selector labels of the controller pods (immutable once installed). */}}
{{- define "nhigate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "nhigate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end }}

{{/* The controller's ServiceAccount name. */}}
{{- define "nhigate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "nhigate.controllerName" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* "repository[:tag][@digest]" from an image dict; tag defaults to the given default. */}}
{{- define "nhigate.imageRef" -}}
{{- $repo := index . 0 }}{{- $tag := index . 1 }}{{- $digest := index . 2 }}
{{- if $digest }}
{{- printf "%s@%s" $repo $digest }}
{{- else }}
{{- printf "%s:%s" $repo $tag }}
{{- end }}
{{- end }}

{{/* The controller image. */}}
{{- define "nhigate.controllerImage" -}}
{{- include "nhigate.imageRef" (list .Values.image.repository (default .Chart.AppVersion .Values.image.tag) .Values.image.digest) }}
{{- end }}

{{/* The proxy image, defaulting to the controller image (one image, two sub-commands). */}}
{{- define "nhigate.proxyImage" -}}
{{- $repo := default .Values.image.repository .Values.proxy.image.repository }}
{{- $tag := default (default .Chart.AppVersion .Values.image.tag) .Values.proxy.image.tag }}
{{- $digest := .Values.proxy.image.digest }}
{{- if and (not .Values.proxy.image.repository) (not .Values.proxy.image.tag) (not $digest) }}
{{- $digest = .Values.image.digest }}
{{- end }}
{{- include "nhigate.imageRef" (list $repo $tag $digest) }}
{{- end }}

{{/* "true" when the controller runs with leader election (kopf peering). */}}
{{- define "nhigate.leaderElection" -}}
{{- $mode := .Values.leaderElection.mode }}
{{- if or (eq $mode "always") (and (eq $mode "auto") (gt (int .Values.replicas) 1)) }}true{{- end }}
{{- end }}

{{/* Labels of the controller's own objects (Deployment, Service, ServiceAccount, RBAC). */}}
{{- define "nhigate.controllerLabels" -}}
{{ include "nhigate.labels" . }}
app.kubernetes.io/component: controller
{{- end }}
