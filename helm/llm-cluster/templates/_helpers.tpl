{{/*
Names, labels, and the two things rendered from values that several objects share:
  (1) "llm-cluster.clusterYaml": the cluster YAML `llm-cluster up` reads (ConfigMap), its snake_case
      blocks verbatim from values, the Kubernetes-only keys left out; detached instances, so that the
      API container restarting after a crash adopts the instances instead of relaunching them;
  (2) "llm-cluster.sloRules": dashboards/rules/llm-cluster-slo.rules.in.yaml with its ${slots} filled
      from `slo:` the way dashboards/slo.py's SloText.of fills them (tests/helm compares the two).
*/}}
{{- define "llm-cluster.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}{{ .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}{{ printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" }}{{ end }}
{{- end }}

{{- define "llm-cluster.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{- define "llm-cluster.apiSelector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: head
{{- end }}

{{/* The Ray custom resource a pool's worker pods offer and its instances ask for. */}}
{{- define "llm-cluster.poolResource" -}}llm_cluster_{{ . }}{{- end }}

{{- define "llm-cluster.redisUrl" -}}
{{- if .Values.redis.url }}{{ .Values.redis.url }}
{{- else if .Values.redis.deploy }}redis://{{ include "llm-cluster.fullname" . }}-redis:6379/0{{ end }}
{{- end }}

{{/* A number as prometheus_client writes a bucket's le label: 2 -> "2.0", 0.025 -> "0.025". */}}
{{- define "llm-cluster.le" -}}
{{- $s := toString . }}{{ if or (contains "." $s) (contains "e" $s) }}{{ $s }}{{ else }}{{ $s }}.0{{ end }}
{{- end }}

{{- define "llm-cluster.sloRules" -}}
{{- $slo := .Values.slo }}
{{- $objective := round (divf $slo.objective_percent 100) 6 }}
{{- $slots := dict "ttft_le" (include "llm-cluster.le" $slo.ttft_s) "itl_le" (include "llm-cluster.le" $slo.itl_s)
      "percentile" (toString (round (divf $slo.percentile 100) 6)) "objective" (toString $objective)
      "error_budget" (toString (round (subf 1 $objective) 6)) }}
{{- $text := .Files.Get "dashboards/rules/llm-cluster-slo.rules.in.yaml" }}
{{- range $name, $value := $slots }}{{ $text = replace (printf "${%s}" $name) $value $text }}{{ end }}
{{- $text }}
{{- end }}

{{- define "llm-cluster.clusterYaml" -}}
{{- $v := .Values }}
{{- $model := dict "path" $v.model.path "dtype" $v.model.dtype }}
{{- if $v.model.served_name }}{{ $_ := set $model "served_name" $v.model.served_name }}{{ end }}
engine: {{- mergeOverwrite (deepCopy $v.engine) (dict "model" $model) | toYaml | nindent 2 }}
{{- range $pool := list "prefill" "decode" }}
{{ $pool }}: {{- omit (index $v $pool) "minReplicas" "maxReplicas" "resources" "nodeSelector" "tolerations" "affinity"
  | merge (dict "ray_resources" (dict (include "llm-cluster.poolResource" $pool) 1)) | toYaml | nindent 2 }}
{{- end }}
disagg: {{- mergeOverwrite (deepCopy $v.disagg) (dict "link_host" "auto") | toYaml | nindent 2 }}
api: {{- omit $v.api "serviceType" "apiKeysSecret" "resources" "preStopSleepSeconds" "terminationGracePeriodSeconds"
  | merge (dict "host" "0.0.0.0") | toYaml | nindent 2 }}
{{- with include "llm-cluster.redisUrl" . }}
store: {redis_url: {{ . | quote }}}
{{- end }}
slo: {{- toYaml $v.slo | nindent 2 }}
autoscale: {{- toYaml $v.autoscale | nindent 2 }}
ray_address: auto
ray_join_timeout_s: 300
detached_instances: true
{{- end }}

{{/* Rules the schema cannot state: each names the value to change. */}}
{{- define "llm-cluster.validate" -}}
{{- range $pool := list "prefill" "decode" }}
{{- $p := index $.Values $pool }}
{{- if or (lt (int $p.instances) (int $p.minReplicas)) (gt (int $p.instances) (int $p.maxReplicas)) }}
{{- fail (printf "%s.instances=%v must be within %s.minReplicas=%v and %s.maxReplicas=%v (one instance a worker pod)" $pool $p.instances $pool $p.minReplicas $pool $p.maxReplicas) }}
{{- end }}
{{- end }}
{{- if and .Values.redis.url .Values.redis.deploy }}
{{- fail "redis.url and redis.deploy are both set: pick an external Redis or the in-chart one" }}
{{- end }}
{{- $m := .Values.model }}
{{- if and (eq $m.source "pvc") (not $m.pvc.claimName) }}{{ fail "model.pvc.claimName is empty (model.source=pvc)" }}{{ end }}
{{- if and (eq $m.source "hostPath") (not $m.hostPath.path) }}{{ fail "model.hostPath.path is empty (model.source=hostPath)" }}{{ end }}
{{- if and (eq $m.source "init") (or (not $m.init.image) (not $m.init.command)) }}{{ fail "model.init.image and model.init.command must be set (model.source=init)" }}{{ end }}
{{- end }}

{{/* The model volume every pod mounts, and the init container that fills it (source: init). */}}
{{- define "llm-cluster.modelVolume" -}}
- name: model
{{- if eq .Values.model.source "pvc" }}
  persistentVolumeClaim: {claimName: {{ .Values.model.pvc.claimName | quote }}, readOnly: true}
{{- else if eq .Values.model.source "hostPath" }}
  hostPath: {path: {{ .Values.model.hostPath.path | quote }}, type: Directory}
{{- else }}
  emptyDir: {sizeLimit: {{ .Values.model.init.sizeLimit }}}
{{- end }}
{{- end }}

{{- define "llm-cluster.modelInit" -}}
{{- if eq .Values.model.source "init" }}
initContainers:
  - name: fetch-model
    image: {{ .Values.model.init.image }}
    command: {{- toYaml .Values.model.init.command | nindent 6 }}
    {{- with .Values.model.init.env }}
    env: {{- toYaml . | nindent 6 }}
    {{- end }}
    volumeMounts: [{name: model, mountPath: {{ dir .Values.model.path | quote }}}]
{{- end }}
{{- end }}

{{- define "llm-cluster.modelMount" -}}
- name: model
  mountPath: {{ if eq .Values.model.source "init" }}{{ dir .Values.model.path | quote }}{{ else }}{{ .Values.model.path | quote }}{{ end }}
  readOnly: true
{{- end }}

{{/* A Ray node's environment for instance workers (cluster/runtime/launcher.py RAYLET_ENV): one OpenMP
thread a worker; the instance's module (torch with it) imported as each worker starts, so a worker
Ray started ahead takes a new instance without its imports (scale-out); every GPU of the host visible
to each actor (NCCL and CUDA IPC between instances). */}}
{{- define "llm-cluster.rayNodeEnv" -}}
- {name: OMP_NUM_THREADS, value: "1"}
- {name: RAY_preload_python_modules, value: cluster.runtime.instance}
- {name: RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES, value: "1"}
{{- end }}
