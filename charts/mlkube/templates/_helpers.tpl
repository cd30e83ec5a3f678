{{/* The chart's name, overridable. */}}
{{- define "mlkube.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of the release's objects: <release>-mlkube unless the release says mlkube. */}}
{{- define "mlkube.fullname" -}}
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

{{- define "mlkube.operatorName" -}}
{{- printf "%s-operator" (include "mlkube.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mlkube.mlflowName" -}}
{{- printf "%s-mlflow" (include "mlkube.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mlkube.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Kubernetes recommended labels; `component` is added per object. */}}
{{- define "mlkube.labels" -}}
helm.sh/chart: {{ include "mlkube.chart" . }}
app.kubernetes.io/name: {{ include "mlkube.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: mlkube
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "mlkube.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mlkube.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "mlkube.operatorSelectorLabels" -}}
{{ include "mlkube.selectorLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "mlkube.mlflowSelectorLabels" -}}
{{ include "mlkube.selectorLabels" . }}
app.kubernetes.io/component: mlflow
{{- end }}

{{- define "mlkube.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mlkube.operatorName" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "mlkube.operatorImage" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "mlkube.predictorImage" -}}
{{- default (printf "mlkube/runtime:%s" .Chart.AppVersion) .Values.operator.predictorImage }}
{{- end }}

{{/* The in-cluster URL of the chart's MLflow server. */}}
{{- define "mlkube.mlflowServiceUrl" -}}
{{- printf "http://%s.%s.svc:%d" (include "mlkube.mlflowName" .) .Release.Namespace (int .Values.mlflow.service.port) }}
{{- end }}

{{/* The tracking URI the operator defaults to: explicit, else the chart's server, else none. */}}
{{- define "mlkube.trackingUri" -}}
{{- if .Values.operator.mlflowTrackingUri }}
{{- .Values.operator.mlflowTrackingUri }}
{{- else if .Values.mlflow.enabled }}
{{- include "mlkube.mlflowServiceUrl" . }}
{{- end }}
{{- end }}

{{/*
The operator's API rules, for a ClusterRole (all namespaces) or a Role per namespace.
Exactly what mlkube/operator (handlers.py, kube.py) and kopf do:
- kopf watches the served resources (list, watch) and patches them for its annotations (and
  to remove a finalizer an older operator left); the operator's poller reads each one
  fresh (get); their status goes through the status subresource (patch);
- the operator creates RayJobs, reads them (get), adopts them (patch) and indexes them
  (list, watch); it creates, reads and patches InferenceServices;
- kopf and the operator post Events (create, core/v1);
- update on the owners' finalizers: children carry ownerReferences with
  blockOwnerDeletion, which clusters running the OwnerReferencesPermissionEnforcement
  admission plugin (e.g. OpenShift) allow only to who may update the owner's finalizers.
*/}}
{{- define "mlkube.operatorRules" -}}
- apiGroups: ["mlkube.io"]
  resources: ["trainingruns", "modeldeployments"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["mlkube.io"]
  resources: ["trainingruns/status", "modeldeployments/status"]
  verbs: ["patch"]
- apiGroups: ["mlkube.io"]
  resources: ["trainingruns/finalizers", "modeldeployments/finalizers"]
  verbs: ["update"]
- apiGroups: ["ray.io"]
  resources: ["rayjobs"]
  verbs: ["get", "list", "watch", "create", "patch"]
# RayClusters: a TrainingRun may run on one of its namespace (spec.ray.cluster); the
# operator keeps warm ones and deletes them when idle.
- apiGroups: ["ray.io"]
  resources: ["rayclusters"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["serving.kserve.io"]
  resources: ["inferenceservices"]
  verbs: ["get", "create", "patch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
# Predictor pods, read only: a version whose pod exited because it does not load fails its
# rollout at once (see docs/serving.md).
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
{{- end }}

{{/* The MLflow server's database URI: from the admin's Secret, or SQLite on its volume. */}}
{{- define "mlkube.mlflowBackendStoreEnv" -}}
- name: MLFLOW_BACKEND_STORE_URI
  {{- if .Values.mlflow.backendStore.existingSecret }}
  valueFrom:
    secretKeyRef:
      name: {{ .Values.mlflow.backendStore.existingSecret }}
      key: {{ .Values.mlflow.backendStore.key }}
  {{- else }}
  value: sqlite:////mlflow/mlflow.db
  {{- end }}
{{- end }}
