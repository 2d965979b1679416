{{- define "bulwark.labels" -}}
app.kubernetes.io/name: bulwark
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "bulwark.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* One TOML limits table: only the keys that are set. */}}
{{- define "bulwark.limits" -}}
{{- if not (kindIs "invalid" .fuel) }}
fuel = {{ .fuel | int64 }}
{{- end }}
{{- if .timeout }}
timeout = {{ .timeout | quote }}
{{- end }}
{{- if not (kindIs "invalid" .memory) }}
memory = {{ .memory | toString | quote }}
{{- end }}
{{- end -}}
