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

{{/*
Labels of the trainer pods: the selector labels and the component, so the
PodMonitor and policies pick them and not the trial store's pod.
*/}}
{{- define "mfr-trainer.trainerLabels" -}}
{{ include "mfr-trainer.selectorLabels" . }}
app.kubernetes.io/component: trainer
{{- end }}

{{/*
Pods the job can have at once: every one of them must reach the checkpoints.
*/}}
{{- define "mfr-trainer.maxPods" -}}
{{- ternary (int .Values.elastic.maxNodes) (int .Values.nodes) .Values.elastic.enabled }}
{{- end }}

{{/*
"true" when the run gets the chart's trial S3 store: trialStore.enabled true,
or auto for a run on synthetic data (the demo) that names no storage of its own.
*/}}
{{- define "mfr-trainer.trialStore" -}}
{{- $enabled := toString .Values.trialStore.enabled }}
{{- $ckpt := .Values.train.checkpoint | default dict }}
{{- $source := (.Values.train.data | default dict).source | default "synthetic" }}
{{- $ownStorage := or $ckpt.uri .Values.workspace.existingClaim .Values.s3.existingSecret .Values.score.embeddings }}
{{- if or (eq $enabled "true") (and (eq $enabled "auto") (not $ownStorage) (eq $source "synthetic")) }}true{{- end }}
{{- end }}

{{/*
The trial store's name: its Deployment, Service and Secret.
*/}}
{{- define "mfr-trainer.trialStoreName" -}}
{{- printf "%s-s3" (include "mfr-trainer.fullname" .) }}
{{- end }}

{{/*
The trial store's S3 endpoint, as the pods reach it (host:port).
*/}}
{{- define "mfr-trainer.trialStoreAddress" -}}
{{- printf "%s:%d" (include "mfr-trainer.trialStoreName" .) (int .Values.trialStore.port) }}
{{- end }}

{{/*
The run's checkpoint URI: train.checkpoint.uri, else one the chart gives each run
on its shared storage (the trial store, or the workspace claim); empty = the
trainer's default, <run.output_dir>/checkpoints in the pod's own emptyDir.
*/}}
{{- define "mfr-trainer.checkpointUri" -}}
{{- $ckpt := .Values.train.checkpoint | default dict }}
{{- if $ckpt.uri }}
{{- $ckpt.uri }}
{{- else if include "mfr-trainer.trialStore" . }}
{{- printf "s3://%s/%s/%s/checkpoints" .Values.trialStore.bucket .Release.Namespace (include "mfr-trainer.fullname" .) }}
{{- else if .Values.workspace.existingClaim }}
{{- printf "/workspace/checkpoints/%s" (include "mfr-trainer.fullname" .) }}
{{- end }}
{{- end }}

{{/*
"true" when every pod reaches the checkpoint URI: a remote URL (s3://, gs://, ...)
or a path on the workspace claim (relative to /workspace, or below it).
*/}}
{{- define "mfr-trainer.sharedCheckpoints" -}}
{{- $uri := include "mfr-trainer.checkpointUri" . }}
{{- $path := trimPrefix "file://" $uri }}
{{- $remote := and (regexMatch "^[a-zA-Z][a-zA-Z0-9+.-]*://" $uri) (not (hasPrefix "file://" $uri)) }}
{{- $onClaim := and .Values.workspace.existingClaim $uri (or (not (hasPrefix "/" $path)) (hasPrefix "/workspace/" $path)) }}
{{- if or $remote $onClaim }}true{{- end }}
{{- end }}

{{/*
Refuse a job its pods could not train: one that spans pods without checkpoint
storage they all reach (each rank writes its own shards; the restarted pods
resume from them), or a trial store beside other storage.  The same sentence
reaches mfrctl render/submit (exit 2) and helm template/install.
*/}}
{{- define "mfr-trainer.checkStorage" -}}
{{- if .Values.score.embeddings }}
{{- if not .Values.score.report }}
{{- fail "score.report: where rank 0 writes the scorer's JSON report, e.g. s3://bucket/eval/report.json" }}
{{- end }}
{{- else }}
{{- $trial := include "mfr-trainer.trialStore" . }}
{{- $ckpt := .Values.train.checkpoint | default dict }}
{{- if and $trial (or $ckpt.uri .Values.workspace.existingClaim) }}
{{- fail "trialStore.enabled=true and train.checkpoint.uri or workspace.existingClaim both name checkpoint storage: keep one (the trial store is for trials)" }}
{{- end }}
{{- if and $trial .Values.s3.existingSecret }}
{{- fail "trialStore.enabled=true brings its own S3 credentials: it cannot be combined with s3.existingSecret (use --checkpoint s3://... with that Secret's store instead)" }}
{{- end }}
{{- $pods := int (include "mfr-trainer.maxPods" .) }}
{{- if and (gt $pods 1) (not (include "mfr-trainer.sharedCheckpoints" .)) }}
{{- $uri := include "mfr-trainer.checkpointUri" . }}
{{- $where := ternary (printf "its checkpoint path %s outside the workspace claim (mounted at /workspace)" $uri) "no checkpoint storage that every pod can reach" (and (not (empty $uri)) (not (empty .Values.workspace.existingClaim))) }}
{{- fail (printf "a job of %d pods has %s: pass --checkpoint s3://BUCKET/PREFIX (chart value train.checkpoint.uri; credentials from s3.existingSecret) or --workspace-claim NAME (chart value workspace.existingClaim, a ReadWriteMany PersistentVolumeClaim)" $pods $where) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The TrainConfig the pods read: train, with the checkpoint URI the chart chose.
*/}}
{{- define "mfr-trainer.trainConfig" -}}
{{- $train := deepCopy .Values.train }}
{{- $uri := include "mfr-trainer.checkpointUri" . }}
{{- if $uri }}
{{- $ckpt := get $train "checkpoint" | default dict }}
{{- $_ := set $ckpt "uri" $uri }}
{{- $_ := set $train "checkpoint" $ckpt }}
{{- end }}
{{- toYaml $train }}
{{- end }}

{{/*
The PyTorchJob's labels: the run's, jobLabels, and Kueue's queue label.  The run's
labels win: mfrctl finds and deletes a run's objects by them.
*/}}
{{- define "mfr-trainer.jobLabels" -}}
{{- $labels := merge (fromYaml (include "mfr-trainer.labels" .)) (deepCopy .Values.jobLabels) }}
{{- with .Values.queue }}
{{- $_ := set $labels "kueue.x-k8s.io/queue-name" . }}
{{- end }}
{{- toYaml $labels }}
{{- end }}

{{/*
Refuse env entries that the operator sets (the job would silently train with the
wrong rank or world) and secrets written as literal values (they would be stored in
the job and printed by kubectl get -o yaml).
*/}}
{{- define "mfr-trainer.checkEnv" -}}
{{- range .Values.env }}
{{- if or (has .name (list "MASTER_ADDR" "MASTER_PORT" "WORLD_SIZE" "RANK" "LOCAL_RANK")) (hasPrefix "PET_" .name) }}
{{- fail (printf "env %s is set by the training operator (MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK, LOCAL_RANK, PET_*): remove it" .name) }}
{{- end }}
{{- if and (hasKey . "value") (regexMatch "(?i)(SECRET|PASSW|TOKEN|CREDENTIAL|_KEY$|_KEY_|APIKEY)" .name) }}
{{- fail (printf "env %s holds a literal value, which would be stored in the job: pass it with valueFrom.secretKeyRef (or s3.existingSecret for S3 keys)" .name) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The shared Grafana dashboard's ConfigMap: one name for every run.
*/}}
{{- define "mfr-trainer.dashboardName" -}}
mfr-training-dashboard
{{- end }}
