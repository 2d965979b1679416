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
{{- if not (kindIs "invalid" .concurrency) }}
concurrency = {{ .concurrency | int64 }}
{{- end }}
{{- end -}}

{{/* The node label the installer sets once a node is installed (kube::INSTALLED_LABEL). */}}
{{- define "bulwark.installedLabel" -}}
bulwark.dev/installed
{{- end -}}

{{/* The installer DaemonSet's name; the uninstall hook switches it to uninstall. */}}
{{- define "bulwark.installer" -}}
{{ .Release.Name }}-installer
{{- end -}}

{{/* A restricted container: no root, no privileges, read-only root. */}}
{{- define "bulwark.restricted" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 65534
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}
