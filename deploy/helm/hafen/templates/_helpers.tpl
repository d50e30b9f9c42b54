{{/* The release's name for its resources, at most 63 characters. */}}
{{- define "hafen.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "hafen.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Selects every Pod of the release. */}}
{{- define "hafen.releaseSelector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Selects the Pods of one service: dict "root" $ "service" "auth". */}}
{{- define "hafen.selector" -}}
{{ include "hafen.releaseSelector" .root }}
app.kubernetes.io/component: {{ .service }}
{{- end -}}

{{- define "hafen.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end -}}

{{- define "hafen.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{ .Values.serviceAccount.name | default (include "hafen.fullname" .) }}
{{- else -}}
{{ .Values.serviceAccount.name | default "default" }}
{{- end -}}
{{- end -}}

{{/* The Secret the chart writes values into. */}}
{{- define "hafen.secretName" -}}
{{ include "hafen.fullname" . }}-secrets
{{- end -}}

{{/* Name of the Secret holding one secret value: dict "root" $ "secret" .Values.secrets.x. */}}
{{- define "hafen.secretRef" -}}
{{- if .secret.existingSecret -}}
{{ .secret.existingSecret }}
{{- else -}}
{{ include "hafen.secretName" .root }}
{{- end -}}
{{- end -}}

{{/* Key of one secret value in the chart's Secret: dict "root" $ "secret" … "name" "x". */}}
{{- define "hafen.secretKey" -}}
{{- if .secret.existingSecret -}}
{{ .secret.key }}
{{- else -}}
{{ .name }}
{{- end -}}
{{- end -}}

{{- define "hafen.tlsSecret" -}}
{{- $names := .root.Values.tls.secretNames | default dict -}}
{{- index $names .service | default (printf "%s-%s-tls" (include "hafen.fullname" .root) .service) -}}
{{- end -}}

{{/* Fails rendering when a secret is given neither as a value nor as an existing Secret. */}}
{{- define "hafen.requireSecret" -}}
{{- if not (or .secret.value .secret.existingSecret) -}}
{{- fail (printf "%s: give value or existingSecret" .name) -}}
{{- end -}}
{{- end -}}

{{/* Host of a service for the others: loopback in mode single, its Service otherwise. */}}
{{- define "hafen.endpoint" -}}
{{- $svc := index .root.Values.services .service -}}
{{- if eq .root.Values.mode "single" -}}
https://127.0.0.1:{{ $svc.port }}
{{- else -}}
https://{{ include "hafen.fullname" .root }}-{{ .service }}.{{ .root.Release.Namespace }}.svc:{{ $svc.port }}
{{- end -}}
{{- end -}}

{{/* Pod-level security context: non-root, seccomp RuntimeDefault. */}}
{{- define "hafen.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Container-level security context: read-only root, nothing escalates, no capability. */}}
{{- define "hafen.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The environment every Hafen process gets. */}}
{{- define "hafen.commonEnv" -}}
{{- $root := . -}}
- name: HAFEN_LOG_FORMAT
  value: {{ .Values.config.logFormat | quote }}
- name: HAFEN_LOG
  value: {{ .Values.config.logFilter | quote }}
- name: HAFEN_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "hafen.secretRef" (dict "root" $root "secret" .Values.secrets.databaseUrl) }}
      key: {{ include "hafen.secretKey" (dict "root" $root "secret" .Values.secrets.databaseUrl "name" "database-url") }}
{{- if or .Values.secrets.keystoreUrl.value .Values.secrets.keystoreUrl.existingSecret }}
- name: HAFEN_KEYSTORE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "hafen.secretRef" (dict "root" $root "secret" .Values.secrets.keystoreUrl) }}
      key: {{ include "hafen.secretKey" (dict "root" $root "secret" .Values.secrets.keystoreUrl "name" "keystore-url") }}
{{- end }}
{{- range $i, $p := .Values.placements }}
- name: HAFEN_PLACEMENT_{{ $i }}
  valueFrom:
    secretKeyRef:
      name: {{ include "hafen.secretRef" (dict "root" $root "secret" $p.url) }}
      key: {{ include "hafen.secretKey" (dict "root" $root "secret" $p.url "name" (printf "placement-%s" $p.name)) }}
{{- end }}
{{- if .Values.placements }}
- name: HAFEN_DATABASES
  value: {{ $list := list }}{{ range $i, $p := .Values.placements }}{{ $list = append $list (printf "%s=$(HAFEN_PLACEMENT_%d)" $p.name $i) }}{{ end }}{{ join "," $list | quote }}
{{- end }}
- name: HAFEN_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "hafen.secretRef" (dict "root" $root "secret" .Values.secrets.redisUrl) }}
      key: {{ include "hafen.secretKey" (dict "root" $root "secret" .Values.secrets.redisUrl "name" "redis-url") }}
{{- if or .Values.caCerts.redis.value .Values.caCerts.redis.existingSecret }}
- name: HAFEN_REDIS_CA
  value: /etc/hafen/ca/redis-ca.pem
{{- end }}
{{- if .Values.config.redisCluster }}
- name: HAFEN_REDIS_CLUSTER
  value: "true"
{{- end }}
- name: HAFEN_MIGRATION_WAIT
  value: {{ .Values.config.migrationWait | quote }}
{{- if .Values.config.otlpEndpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ .Values.config.otlpEndpoint | quote }}
{{- end }}
{{- end -}}

{{/* Volumes every Hafen Pod mounts: /tmp, the CA certificates of PostgreSQL and Redis. */}}
{{- define "hafen.commonVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
{{- if or .Values.caCerts.postgres.value .Values.caCerts.postgres.existingSecret .Values.caCerts.redis.value .Values.caCerts.redis.existingSecret }}
- name: ca-certs
  projected:
    sources:
{{- with .Values.caCerts.postgres }}
{{- if or .value .existingSecret }}
      - secret:
          name: {{ include "hafen.secretRef" (dict "root" $ "secret" .) }}
          items:
            - key: {{ include "hafen.secretKey" (dict "root" $ "secret" . "name" "postgres-ca.pem") }}
              path: postgres-ca.pem
{{- end }}
{{- end }}
{{- with .Values.caCerts.redis }}
{{- if or .value .existingSecret }}
      - secret:
          name: {{ include "hafen.secretRef" (dict "root" $ "secret" .) }}
          items:
            - key: {{ include "hafen.secretKey" (dict "root" $ "secret" . "name" "redis-ca.pem") }}
              path: redis-ca.pem
{{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "hafen.commonMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if or .Values.caCerts.postgres.value .Values.caCerts.postgres.existingSecret .Values.caCerts.redis.value .Values.caCerts.redis.existingSecret }}
- name: ca-certs
  mountPath: /etc/hafen/ca
  readOnly: true
{{- end }}
{{- end -}}

{{/* A secret file as a projected volume source: dict "root" $ "secret" … "name" "…" "path" "…". */}}
{{- define "hafen.secretSource" -}}
- secret:
    name: {{ include "hafen.secretRef" (dict "root" .root "secret" .secret) }}
    items:
      - key: {{ include "hafen.secretKey" (dict "root" .root "secret" .secret "name" .name) }}
        path: {{ .path }}
{{- end -}}
