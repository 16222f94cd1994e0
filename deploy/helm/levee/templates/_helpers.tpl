{{/* The release's full name, cut to the 63 characters of a DNS label. */}}
{{- define "levee.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "levee.gatewayName" -}}{{ include "levee.fullname" . | trunc 55 | trimSuffix "-" }}-gateway{{- end -}}
{{- define "levee.workerName" -}}{{ include "levee.fullname" . | trunc 56 | trimSuffix "-" }}-worker{{- end -}}

{{- define "levee.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "levee.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "levee.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "levee.labels" -}}
{{ include "levee.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "levee.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* Levee's configuration: the values' config with the chart's listen address. */}}
{{- define "levee.config" -}}
{{- $cfg := deepCopy .Values.config -}}
{{- $_ := set $cfg "listen" (printf "0.0.0.0:%d" (int .Values.gateway.port)) -}}
{{ toYaml $cfg }}
{{- end -}}

{{/* The environment every Levee container gets: credentials from Secrets. */}}
{{- define "levee.env" -}}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ required "secrets.database.name is required" .Values.secrets.database.name }}
      key: {{ .Values.secrets.database.key }}
{{- with .Values.secrets.nats.name }}
- name: NATS_URL
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.secrets.nats.key }}
{{- end }}
{{- with .Values.secrets.adminKey.name }}
- name: LEVEE_ADMIN_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.secrets.adminKey.key }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "levee.envFrom" -}}
{{- range .Values.secrets.upstream }}
- secretRef:
    name: {{ . }}
{{- end }}
{{- end -}}

{{/* The config file and a writable /tmp (the root file system is read-only). */}}
{{- define "levee.volumes" -}}
- name: config
  configMap:
    name: {{ include "levee.fullname" . }}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
{{- end -}}

{{- define "levee.volumeMounts" -}}
- name: config
  mountPath: /etc/levee
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- end -}}
