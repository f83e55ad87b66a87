{{/*
The chart name, for labels.
*/}}
{{- define "mfr-trainer.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The job name: the release name unless overridden.  The operator names every
pod and Service <job>-<master|worker>-<index> (a DNS-1035 label of at most 63
characters), hence the 50-character cap.
*/}}
{{- define "mfr-trainer.fullname" -}}
{{- default .Release.Name .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "mfr-trainer.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels: every object of a run carries them, so the run's objects can
be found and deleted together (app.kubernetes.io/instance=<job>).
*/}}
{{- define "mfr-trainer.labels" -}}
helm.sh/chart: {{ include "mfr-trainer.chart" . }}
{{ include "mfr-trainer.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Selector labels.
*/}}
{{- define "mfr-trainer.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mfr-trainer.name" . }}
app.kubernetes.io/instance: {{ include "mfr-trainer.fullname" . }}
{{- end }}

{{/*
The ServiceAccount the pods run as.
*/}}
{{- define "mfr-trainer.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mfr-trainer.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The image reference: a digest pins it, else the tag (default: appVersion).
*/}}
{{- define "mfr-trainer.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
Training processes per pod: nprocPerNode, or one per GPU (one on CPU) when 0.
*/}}
{{- define "mfr-trainer.nprocPerNode" -}}
{{- $gpus := int .Values.gpusPerNode }}
{{- int .Values.nprocPerNode | default (ternary $gpus 1 (gt $gpus 0)) }}
{{- end }}

{{/*
Where the TrainConfig is mounted, and the file the trainer reads.
*/}}
{{- define "mfr-trainer.configFile" -}}
{{- printf "%s/config.yaml" (trimSuffix "/" .Values.configMountPath) }}
{{- end }}

{{/*
The trainer's metrics port (train.metrics.port, default as in trainer/config.py):
the process of local rank i serves /metrics on port + i.
*/}}
{{- define "mfr-trainer.metricsPort" -}}
{{- $m := .Values.train.metrics | default dict }}
{{- int (hasKey $m "port" | ternary $m.port 9410) }}
{{- end }}

{{/*
Labels of the monitoring objects: the run's, the release label kube-prometheus-stack
selects on, and monitoring.labels.
*/}}
{{- define "mfr-trainer.monitoringLabels" -}}
{{ include "mfr-trainer.labels" . }}
{{- with .Values.monitoring.release }}
release: {{ . | quote }}
{{- end }}
{{- with .Values.monitoring.labels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The PromQL selector of this run's series: prometheus-operator gives the targets
of a PodMonitor the job label <namespace>/<PodMonitor name>.
*/}}
{{- define "mfr-trainer.promSelector" -}}
{{- printf "job=%q" (printf "%s/%s" .Release.Namespace (include "mfr-trainer.fullname" .)) }}
{{- end }}
