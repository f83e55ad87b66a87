{{/*
The pod template of every replica.  The PyTorchJob's operator adds the
environment of its contract (MASTER_ADDR/PORT, WORLD_SIZE, RANK or PET_RDZV_*,
PET_NNODES, ...) to the container "pytorch" and turns restartPolicy ExitCode into
the pod's Never; Trainer v2's torch plugin adds PET_NNODES, PET_NPROC_PER_NODE,
PET_NODE_RANK and PET_MASTER_ADDR/PORT to the container "node".  Called with the
chart's context, plus "container" (its name) and "rendezvousPort" for a TrainJob.
*/}}
{{- define "mfr-trainer.podTemplate" -}}
metadata:
  labels:
    {{- include "mfr-trainer.trainerLabels" . | nindent 4 }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    checksum/config: {{ include (print $.Template.BasePath "/configmap.yaml") . | sha256sum }}
    {{- with .Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  serviceAccountName: {{ include "mfr-trainer.serviceAccountName" . }}
  automountServiceAccountToken: {{ .Values.serviceAccount.automount }}
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
  terminationGracePeriodSeconds: {{ int .Values.terminationGracePeriodSeconds }}
  {{- with .podRestartPolicy }}
  restartPolicy: {{ . }}
  {{- end }}
  {{- with .Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with .Values.schedulerName }}
  schedulerName: {{ . }}
  {{- end }}
  {{- with .Values.runtimeClassName }}
  runtimeClassName: {{ . }}
  {{- end }}
  {{- if .Values.nccl.hostNetwork }}
  hostNetwork: true
  dnsPolicy: ClusterFirstWithHostNet
  {{- end }}
  {{- with .Values.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ .container | default "pytorch" }}
      image: {{ include "mfr-trainer.image" . }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      # torchrun of the trainer (every torchrun flag comes from the operator's
      # PET_* environment), exiting 128+signal when preempted so it is retried.
      command: ["python", "-m", "mfr.trainer.launch"]
      {{- with .Values.score }}
      {{- if .embeddings }}
      # The distributed scorer of embedded verification sets (mfr.trainer.score), not training.
      args: {{ concat (list "--module" "mfr.trainer.score" .embeddings "--report" .report) .args | toJson }}
      {{- else }}
      args: ["--config", {{ include "mfr-trainer.configFile" $ | quote }}]
      {{- end }}
      {{- end }}
      workingDir: /workspace
      ports:
        {{- if .rendezvousPort }}
        - name: rendezvous
          containerPort: {{ int .rendezvousPort }}
          protocol: TCP
        {{- else }}
        - name: pytorchjob-port
          containerPort: {{ int .Values.port }}
          protocol: TCP
        {{- end }}
        {{- if .Values.monitoring.podMonitor.enabled }}
        {{- $metricsPort := int (include "mfr-trainer.metricsPort" .) }}
        {{- range $i := until (int (include "mfr-trainer.nprocPerNode" .)) }}
        - name: metrics-{{ $i }}
          containerPort: {{ add $metricsPort $i }}
          protocol: TCP
        {{- end }}
        {{- end }}
      {{- $secret := .Values.s3.existingSecret }}
      {{- $trial := include "mfr-trainer.trialStore" . }}
      env:
        # The root filesystem is read-only: caches and config go to the /tmp volume.
        - name: HOME
          value: /tmp
        {{- if $trial }}
        {{- $store := include "mfr-trainer.trialStoreName" . }}
        # The chart's trial S3 store (trialStore): its endpoint and generated credentials.
        - name: AWS_ENDPOINT_URL
          value: http://{{ include "mfr-trainer.trialStoreAddress" . }}
        - name: AWS_DEFAULT_REGION
          value: us-east-1
        {{- range $name := list "AWS_ACCESS_KEY_ID" "AWS_SECRET_ACCESS_KEY" }}
        - name: {{ $name }}
          valueFrom:
            secretKeyRef:
              name: {{ $store }}
              key: {{ $name }}
        {{- end }}
        # mfr.trainer.launch waits for the store before the rendezvous.
        - name: MFR_WAIT_FOR
          value: {{ include "mfr-trainer.trialStoreAddress" . }}
        {{- end }}
        {{- if $secret }}
        {{- range $name, $key := .Values.s3.secretKeys }}
        - name: {{ $name }}
          valueFrom:
            secretKeyRef:
              name: {{ $secret }}
              key: {{ $key }}
        {{- end }}
        {{- end }}
        {{- range $name, $value := .Values.nccl.env }}
        - name: {{ $name }}
          value: {{ $value | toString | quote }}
        {{- end }}
        {{- with .Values.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- if and $secret (not .Values.s3.secretKeys) }}
      envFrom:
        - secretRef:
            name: {{ $secret }}
      {{- end }}
      {{- $resources := deepCopy .Values.resources }}
      {{- if gt (int .Values.gpusPerNode) 0 }}
      {{- $limits := get $resources "limits" | default dict }}
      {{- $_ := set $limits "nvidia.com/gpu" (int .Values.gpusPerNode) }}
      {{- $_ := set $resources "limits" $limits }}
      {{- end }}
      {{- with $resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- $securityContext := deepCopy .Values.securityContext }}
      {{- if .Values.nccl.ipcLock }}
      {{- $caps := get $securityContext "capabilities" | default dict }}
      {{- $_ := set $caps "add" (append (get $caps "add" | default list) "IPC_LOCK" | uniq) }}
      {{- $_ := set $securityContext "capabilities" $caps }}
      {{- end }}
      securityContext:
        {{- toYaml $securityContext | nindent 8 }}
      volumeMounts:
        - name: config
          mountPath: {{ .Values.configMountPath }}
          readOnly: true
        - name: dshm
          mountPath: /dev/shm
        - name: workspace
          mountPath: /workspace
        - name: tmp
          mountPath: /tmp
        {{- with .Values.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: config
      configMap:
        name: {{ include "mfr-trainer.fullname" . }}-config
    - name: dshm
      emptyDir:
        medium: Memory
        {{- with .Values.shm.sizeLimit }}
        sizeLimit: {{ . }}
        {{- end }}
    - name: tmp
      emptyDir: {}
    - name: workspace
      {{- if .Values.workspace.existingClaim }}
      persistentVolumeClaim:
        claimName: {{ .Values.workspace.existingClaim }}
      {{- else }}
      emptyDir:
        {{- with .Values.workspace.sizeLimit }}
        sizeLimit: {{ . }}
        {{- else }} {}
        {{- end }}
      {{- end }}
{{- with .Values.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}
