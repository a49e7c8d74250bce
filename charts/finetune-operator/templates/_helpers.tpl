{{/*
Chart name; .Values.nameOverride replaces it when set.
*/}}
{{- define "finetune-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name for the release's objects, at most 63 characters (DNS-1123 label).
.Values.fullnameOverride replaces it when set; a release name that already contains the
chart name is used as it is.
*/}}
{{- define "finetune-operator.fullname" -}}
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

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "finetune-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels that select the release's pods; they must never change between upgrades.
*/}}
{{- define "finetune-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "finetune-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Standard labels of every object of the chart.
*/}}
{{- define "finetune-operator.labels" -}}
helm.sh/chart: {{ include "finetune-operator.chart" . }}
{{ include "finetune-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: finetune-operator
{{- end }}

{{/*
Selector labels of one component (operator, minio): the operator's Service must not select
MinIO's pods, which share the release's name and instance labels.
*/}}
{{- define "finetune-operator.componentSelectorLabels" -}}
{{ include "finetune-operator.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Standard labels plus the component label.
*/}}
{{- define "finetune-operator.componentLabels" -}}
{{ include "finetune-operator.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
The operator's ServiceAccount.
*/}}
{{- define "finetune-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "finetune-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Images; tags default to the chart's appVersion so chart and images move together.
*/}}
{{- define "finetune-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "finetune-operator.trainerImage" -}}
{{- default (printf "ghcr.io/finetune-operator/trainer:%s" .Chart.AppVersion) .Values.trainerImage }}
{{- end }}

{{/*
Name of the dev MinIO's Deployment, Service and credentials Secret.
*/}}
{{- define "finetune-operator.minio" -}}
{{- printf "%s-minio" (include "finetune-operator.fullname" . | trunc 57 | trimSuffix "-") }}
{{- end }}

{{/*
What the operator does in the namespaces it watches; a ClusterRole holds these rules in
cluster-wide mode, a Role per watched namespace otherwise. No Secrets: runs report their
progress themselves, and a missing Secret shows in the pods' status.
*/}}
{{- define "finetune-operator.watchRules" -}}
- apiGroups: ["finetune.dev"]
  resources: ["finetunejobs", "finetunesweeps"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["finetune.dev"]
  resources: ["finetunejobs/status", "finetunesweeps/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: ["ray.io"]
  resources: ["rayjobs"]
  verbs: ["get", "list", "watch", "create", "patch"]
# The Ray pods (watched): why a job's pods do not start (a missing Secret, an image that cannot
# be pulled, a pod too big for any node) becomes its status reason; get: the pod a report's
# token is bound to, which must be one of the job's.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
# Kueue's Workload of a queued job: why it is not admitted yet; deactivated while the user
# suspends the job (Kueue would unsuspend it).
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads"]
  verbs: ["list", "patch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

{{/*
Leader-election Lease: its name, passed to the operator and named in the Role.
*/}}
{{- define "finetune-operator.leaseName" -}}
{{- include "finetune-operator.fullname" . }}
{{- end }}

{{/*
Where the Ray pods send their progress reports: the reports Service.
*/}}
{{- define "finetune-operator.reportURL" -}}
{{- printf "http://%s-reports.%s.svc:%d/v1/progress" (include "finetune-operator.fullname" . | trunc 55 | trimSuffix "-") .Release.Namespace (int .Values.reports.port) }}
{{- end }}
