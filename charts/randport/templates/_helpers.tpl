{{/* The name of every object: "randport" unless nameOverride says otherwise. */}}
{{- define "randport.name" -}}
{{- .Values.nameOverride | default "randport" | trunc 53 | trimSuffix "-" -}}
{{- end -}}

{{- define "randport.labels" -}}
app.kubernetes.io/name: {{ include "randport.name" . }}
{{- if not .Values.plainManifest }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}
{{- end -}}

{{/* repository:tag, with @digest when one is given. */}}
{{- define "randport.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion -}}
{{- if eq $tag "latest" -}}
{{- fail "image.tag: latest is not allowed: a node pulls whatever it names; give a version (or leave it empty for the chart's appVersion)" -}}
{{- end -}}
{{- $image := printf "%s:%s" .Values.image.repository $tag -}}
{{- with .Values.image.digest -}}
{{- if not (hasPrefix "sha256:" .) -}}
{{- fail (printf "image.digest %q: expected sha256:<64 hex digits>" .) -}}
{{- end -}}
{{- $image = printf "%s@%s" $image . -}}
{{- end -}}
{{- $image -}}
{{- end -}}

{{/* The node's CNI directories: the distribution's preset, or cni.binDir / cni.confDir. */}}
{{- define "randport.cniPreset" -}}
{{- $presets := dict
  "kubeadm" (dict "bin" "/opt/cni/bin" "conf" "/etc/cni/net.d")
  "kind" (dict "bin" "/opt/cni/bin" "conf" "/etc/cni/net.d")
  "k3s" (dict "bin" "/var/lib/rancher/k3s/data/current/bin" "conf" "/var/lib/rancher/k3s/agent/etc/cni/net.d")
  "rke2" (dict "bin" "/opt/cni/bin" "conf" "/etc/cni/net.d")
  "openshift" (dict "bin" "/var/lib/cni/bin" "conf" "/run/multus/cni/net.d")
-}}
{{- $preset := get $presets .Values.distribution -}}
{{- if not $preset -}}
{{- fail (printf "distribution %q: expected one of kubeadm, kind, k3s, rke2, openshift (or set cni.binDir and cni.confDir)" .Values.distribution) -}}
{{- end -}}
{{- dict "bin" (.Values.cni.binDir | default $preset.bin) "conf" (.Values.cni.confDir | default $preset.conf) | toJson -}}
{{- end -}}
