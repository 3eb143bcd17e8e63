{{/* The release's name for the chart's objects, at most 63 characters. */}}
{{- define "outbox-relay.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels every object carries. */}}
{{- define "outbox-relay.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The selector of one component (argument: dict "root" . "component" NAME). */}}
{{- define "outbox-relay.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "outbox-relay.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* The config and secret volumes (and /tmp, the root file system being read-only). */}}
{{- define "outbox-relay.volumes" -}}
- name: config
  configMap:
    name: {{ include "outbox-relay.fullname" . }}
- name: tmp
  emptyDir: {}
{{- with .Values.secrets.existingSecret }}
- name: secrets
  secret:
    secretName: {{ . }}
    defaultMode: 0400
{{- end }}
{{- end -}}

{{- define "outbox-relay.volumeMounts" -}}
- name: config
  mountPath: /etc/outbox-relay
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- if .Values.secrets.existingSecret }}
- name: secrets
  mountPath: /run/secrets/outbox-relay
  readOnly: true
{{- end }}
{{- end -}}
