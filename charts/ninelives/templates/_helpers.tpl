{{- define "ninelives.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "ninelives.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/part-of: ninelives
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Common labels plus the instance, for objects that carry no selector labels. */}}
{{- define "ninelives.metaLabels" -}}
{{ include "ninelives.labels" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "ninelives.operatorSelector" -}}
app.kubernetes.io/name: ninelives-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "ninelives.agentSelector" -}}
app.kubernetes.io/name: ninelives-agent
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "ninelives.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "ninelives.etcdFlags" -}}
- --etcd={{ join "," .Values.etcd.endpoints }}
- --etcd-prefix={{ .Values.etcd.prefix }}
{{- if .Values.etcd.tls.enabled }}
- --etcd-ca-file=/etc/ninelives/etcd/{{ .Values.etcd.tls.caKey }}
- --etcd-cert-file=/etc/ninelives/etcd/{{ .Values.etcd.tls.certKey }}
- --etcd-key-file=/etc/ninelives/etcd/{{ .Values.etcd.tls.keyKey }}
{{- end }}
{{- end -}}
