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

{{- define "ninelives.etcdSelector" -}}
app.kubernetes.io/name: ninelives-etcd
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* etcd client URLs: the external endpoints, else the in-chart etcd's client Service. */}}
{{- define "ninelives.etcdEndpoints" -}}
{{- if .Values.etcd.endpoints -}}
{{- join "," .Values.etcd.endpoints -}}
{{- else if .Values.etcd.deploy -}}
{{- printf "%s://%s-etcd-client.%s.svc:2379" (ternary "https" "http" .Values.etcd.tls.enabled) (include "ninelives.fullname" .) .Release.Namespace -}}
{{- else -}}
{{- fail "etcd.endpoints is required when etcd.deploy is false" -}}
{{- end -}}
{{- end -}}

{{- define "ninelives.etcdFlags" -}}
{{- if .Values.etcd.tls.enabled -}}
{{- $_ := required "etcd.tls.secretName is required when etcd.tls.enabled" .Values.etcd.tls.secretName -}}
{{- end -}}
{{- $endpoints := include "ninelives.etcdEndpoints" . -}}
{{- if and (contains "https://" $endpoints) (not .Values.etcd.tls.enabled) -}}
{{- fail "etcd.endpoints are https:// but etcd.tls.enabled is false: enable TLS (etcd.tls.secretName) or use http://" -}}
{{- end -}}
{{- if and .Values.etcd.tls.enabled (contains "http://" $endpoints) -}}
{{- fail "etcd.tls.enabled is true but etcd.endpoints are http://" -}}
{{- end -}}
- --etcd={{ $endpoints }}
- --etcd-prefix={{ .Values.etcd.prefix }}
{{- if .Values.etcd.tls.enabled }}
- --etcd-ca-file=/etc/ninelives/etcd/{{ .Values.etcd.tls.caKey }}
- --etcd-cert-file=/etc/ninelives/etcd/{{ .Values.etcd.tls.certKey }}
- --etcd-key-file=/etc/ninelives/etcd/{{ .Values.etcd.tls.keyKey }}
{{- end }}
{{- end -}}
