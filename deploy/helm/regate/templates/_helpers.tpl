{{/* Names and labels. */}}
{{- define "regate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "regate.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "regate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "regate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: {{ .Values.mode }}
{{- end -}}

{{- define "regate.labels" -}}
{{ include "regate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "regate.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "regate.bundleDir" -}}
{{- if .Values.bundle.files -}}/etc/regate/bundle{{- else -}}/etc/regate{{- end -}}
{{- end -}}

{{- define "regate.keysSecret" -}}
{{- default (printf "%s-keys" (include "regate.fullname" .)) .Values.auth.existingKeysSecret -}}
{{- end -}}

{{- define "regate.usesApiKeys" -}}
{{- if or (eq .Values.auth.mode "api_key") (has "api_key" .Values.auth.sources) -}}true{{- end -}}
{{- end -}}

{{/*
regate.yaml, built as a dict and written with toYaml, so every value is quoted as
YAML needs. Paths: the config and keys at /etc/regate/config, the bundle at
/etc/regate/bundle (or the image's), TLS at /etc/regate/tls, audit at
/var/lib/regate/audit: the image's layout (Dockerfile).
*/}}
{{- define "regate.config" -}}
{{- $v := .Values -}}
{{- $sidecar := eq $v.mode "sidecar" -}}
{{- $cfg := dict "listen" (printf "%s:%d" (ternary "127.0.0.1" "0.0.0.0" $sidecar) (int $v.ports.data)) -}}
{{- $admin := dict "listen" (printf "0.0.0.0:%d" (int $v.ports.admin)) -}}
{{- if $v.adminToken.existingSecret -}}
{{- $_ := set $admin "token" "${REGATE_ADMIN_TOKEN}" -}}
{{- end -}}
{{- if and $v.tls.enabled $v.tls.admin -}}
{{- $_ := set $admin "tls" (dict "cert" "/etc/regate/tls/tls.crt" "key" "/etc/regate/tls/tls.key") -}}
{{- end -}}
{{- $_ := set $cfg "admin" $admin -}}
{{- $auth := dict "mode" $v.auth.mode -}}
{{- if $v.auth.sources -}}{{- $_ := set $auth "sources" $v.auth.sources -}}{{- end -}}
{{- if include "regate.usesApiKeys" . -}}
{{- $_ := set $auth "keys" "keys.yaml" -}}
{{- else -}}
{{- $_ := set $auth "keys" nil -}}
{{- end -}}
{{- $jwt := deepCopy (default (dict) $v.auth.jwt) -}}
{{- if $v.auth.kubernetesIssuer.enabled -}}
{{- $k8s := dict "issuer" $v.auth.kubernetesIssuer.issuer "audiences" (list $v.auth.kubernetesIssuer.audience) "kubernetes" true "jwks" (dict "url" "https://kubernetes.default.svc/openid/v1/jwks" "ca" "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt" "token_file" "/var/run/secrets/kubernetes.io/serviceaccount/token") -}}
{{- $_ := set $jwt "issuers" (append (default (list) $jwt.issuers) $k8s) -}}
{{- end -}}
{{- if $jwt -}}{{- $_ := set $auth "jwt" $jwt -}}{{- end -}}
{{- $_ := set $cfg "auth" $auth -}}
{{- if $v.tls.enabled -}}
{{- $tls := dict "cert" "/etc/regate/tls/tls.crt" "key" "/etc/regate/tls/tls.key" -}}
{{- if $v.tls.clientCA -}}{{- $_ := set $tls "client_ca" "/etc/regate/tls/ca.crt" -}}{{- end -}}
{{- $_ := set $cfg "tls" $tls -}}
{{- end -}}
{{- $_ := set $cfg "http" (dict "shutdown_grace_s" $v.shutdownGraceSeconds) -}}
{{- $_ := set $cfg "tools" $v.tools -}}
{{- $bundle := include "regate.bundleDir" . -}}
{{- $policy := dict "engine" $v.engine -}}
{{- if eq $v.engine "opa" -}}
{{- /* OPA loads the policy itself (its own bundle service, below); Regate asks it. */ -}}
{{- $_ := set $policy "opa" (dict "url" (printf "http://127.0.0.1:%d" (int $v.opa.port))) -}}
{{- else if $v.bundle.service.url -}}
{{- /* The last good bundle is kept on the writable audit volume (the config mount is read-only). */ -}}
{{- $svc := dict "url" $v.bundle.service.url "poll_min_s" $v.bundle.service.pollMinSeconds "poll_max_s" $v.bundle.service.pollMaxSeconds "persist_dir" "/var/lib/regate/bundle" -}}
{{- if $v.bundle.service.headers -}}{{- $_ := set $svc "headers" $v.bundle.service.headers -}}{{- end -}}
{{- $_ := set $policy "bundle" (dict "service" $svc) -}}
{{- else -}}
{{- $_ := set $policy "rego" (printf "%s/%s/" $bundle $v.bundle.rego) -}}
{{- $_ := set $policy "data" (printf "%s/%s/" $bundle $v.bundle.data) -}}
{{- end -}}
{{- $_ := set $cfg "policy" $policy -}}
{{- if or $v.redis.url $v.redis.existingSecret -}}
{{- $_ := set $cfg "limits" (dict "store" "redis" "redis_url" "${REGATE_REDIS_URL}" "on_store_error" $v.redis.onStoreError) -}}
{{- $_ := set $cfg "approvals" (dict "store" "redis") -}}
{{- end -}}
{{- $_ := set $cfg "audit" (dict "dir" "/var/lib/regate/audit") -}}
{{- $_ := set $cfg "metrics" $v.metrics.enabled -}}
{{- $cfg = mustMergeOverwrite $cfg (deepCopy $v.config) -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* The probes' scheme: HTTPS when the admin listener has TLS. */}}
{{- define "regate.probeScheme" -}}
{{- if and .Values.tls.enabled .Values.tls.admin -}}HTTPS{{- else -}}HTTP{{- end -}}
{{- end -}}

{{/* Regate's container: the same in both shapes. */}}
{{- define "regate.container" -}}
name: regate
image: {{ include "regate.image" . }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
args: ["serve", "-c", "/etc/regate/config/regate.yaml"]
{{- if eq .Values.mode "sidecar" }}
# A native sidecar: started before the agent, stopped after it.
restartPolicy: Always
{{- end }}
ports:
  - {name: data, containerPort: {{ .Values.ports.data }}, protocol: TCP}
  - {name: admin, containerPort: {{ .Values.ports.admin }}, protocol: TCP}
env:
  {{- if .Values.adminToken.existingSecret }}
  - name: REGATE_ADMIN_TOKEN
    valueFrom: {secretKeyRef: {name: {{ .Values.adminToken.existingSecret }}, key: {{ .Values.adminToken.key }}}}
  {{- end }}
  {{- if .Values.redis.existingSecret }}
  - name: REGATE_REDIS_URL
    valueFrom: {secretKeyRef: {name: {{ .Values.redis.existingSecret }}, key: url}}
  {{- else if .Values.redis.url }}
  - {name: REGATE_REDIS_URL, value: {{ .Values.redis.url | quote }}}
  {{- end }}
  - {name: REGATE_LOG_LEVEL, value: info}
startupProbe:
  httpGet: {path: /healthz, port: admin, scheme: {{ include "regate.probeScheme" . }}}
  periodSeconds: 1
  failureThreshold: 60
livenessProbe:
  httpGet: {path: /healthz, port: admin, scheme: {{ include "regate.probeScheme" . }}}
  periodSeconds: 10
  timeoutSeconds: 3
  failureThreshold: 3
readinessProbe:
  httpGet: {path: /readyz, port: admin, scheme: {{ include "regate.probeScheme" . }}}
  periodSeconds: 5
  timeoutSeconds: 3
  failureThreshold: 2
resources:
  {{- toYaml .Values.resources | nindent 2 }}
securityContext:
  {{- toYaml .Values.securityContext | nindent 2 }}
volumeMounts:
  - {name: config, mountPath: /etc/regate/config, readOnly: true}
  {{- if .Values.bundle.files }}
  - {name: bundle, mountPath: /etc/regate/bundle, readOnly: true}
  {{- end }}
  {{- if .Values.tls.enabled }}
  - {name: tls, mountPath: /etc/regate/tls, readOnly: true}
  {{- end }}
  - {name: audit, mountPath: /var/lib/regate}
  - {name: tmp, mountPath: /tmp}
{{- end -}}

{{/* OPA beside Regate (engine: opa): the same image, its `opa` binary. */}}
{{- define "regate.opaContainer" -}}
{{- $bundle := include "regate.bundleDir" . -}}
name: opa
image: {{ include "regate.image" . }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
command: ["opa"]
args:
  - run
  - --server
  - --addr=127.0.0.1:{{ .Values.opa.port }}
  - --diagnostic-addr=0.0.0.0:{{ .Values.opa.diagnosticPort }}
  - --disable-telemetry
  - --log-level=error
  {{- with .Values.bundle.service.url }}
  {{- $u := urlParse . }}
  # OPA's own bundle plugin polls the bundle server.
  - --set=services.bundles.url={{ printf "%s://%s" $u.scheme $u.host }}
  - --set=bundles.regate.service=bundles
  - --set=bundles.regate.resource={{ $u.path }}
  - --set=bundles.regate.polling.min_delay_seconds={{ $.Values.bundle.service.pollMinSeconds }}
  - --set=bundles.regate.polling.max_delay_seconds={{ $.Values.bundle.service.pollMaxSeconds }}
  {{- else }}
  - {{ printf "%s/%s" $bundle .Values.bundle.rego }}
  - {{ printf "%s/%s" $bundle .Values.bundle.data }}
  {{- end }}
  {{- range .Values.opa.extraArgs }}
  - {{ . | quote }}
  {{- end }}
{{- if eq .Values.mode "sidecar" }}
restartPolicy: Always
{{- end }}
ports:
  - {name: opa-diag, containerPort: {{ .Values.opa.diagnosticPort }}, protocol: TCP}
startupProbe:
  httpGet: {path: /health, port: opa-diag}
  periodSeconds: 1
  failureThreshold: 60
livenessProbe:
  httpGet: {path: /health, port: opa-diag}
  periodSeconds: 10
readinessProbe:
  # With a bundle server: ready once the bundle is activated.
  httpGet:
    path: {{ ternary "/health?bundles" "/health" (not (empty .Values.bundle.service.url)) | quote }}
    port: opa-diag
  periodSeconds: 5
resources:
  {{- toYaml .Values.opa.resources | nindent 2 }}
securityContext:
  {{- toYaml .Values.securityContext | nindent 2 }}
volumeMounts:
  {{- if .Values.bundle.files }}
  - {name: bundle, mountPath: /etc/regate/bundle, readOnly: true}
  {{- end }}
  - {name: tmp, mountPath: /tmp}
{{- end -}}

{{/* The pod's volumes for Regate. */}}
{{- define "regate.volumes" -}}
- name: config
  projected:
    sources:
      - configMap:
          name: {{ include "regate.fullname" . }}-config
          items: [{key: regate.yaml, path: regate.yaml}]
      {{- if include "regate.usesApiKeys" . }}
      - secret:
          name: {{ include "regate.keysSecret" . }}
          items: [{key: keys.yaml, path: keys.yaml}]
      {{- end }}
{{- if .Values.bundle.files }}
- name: bundle
  configMap:
    name: {{ include "regate.fullname" . }}-bundle
    items:
      {{- range $path, $_ := .Values.bundle.files }}
      - {key: {{ $path | replace "/" "__" | quote }}, path: {{ $path | quote }}}
      {{- end }}
{{- end }}
{{- if .Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ required "tls.secretName: the kubernetes.io/tls Secret holding tls.crt and tls.key" .Values.tls.secretName }}
{{- end }}
- name: audit
  {{- toYaml .Values.audit.volume | nindent 2 }}
- name: tmp
  emptyDir: {medium: Memory, sizeLimit: 64Mi}
{{- end -}}

{{/* Pod annotations: a restart when the config changes, and Prometheus scraping. */}}
{{- define "regate.podAnnotations" -}}
checksum/config: {{ include "regate.config" . | sha256sum }}
{{- if .Values.bundle.files }}
checksum/bundle: {{ toYaml .Values.bundle.files | sha256sum }}
{{- end }}
{{- if .Values.metrics.enabled }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .Values.ports.admin | quote }}
prometheus.io/path: /metrics
{{- if and .Values.tls.enabled .Values.tls.admin }}
prometheus.io/scheme: https
{{- end }}
{{- end }}
{{- with .Values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end -}}
