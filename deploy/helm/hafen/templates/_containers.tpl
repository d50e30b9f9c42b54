{{/*
The container of one service: dict "root" $ "service" "auth". Its files: the TLS Secret under
/etc/hafen/tls, the secret files it needs under /etc/hafen/secrets (volume secrets-<service>).
*/}}
{{- define "hafen.container" -}}
{{- $root := .root -}}
{{- $name := .service -}}
{{- $svc := index $root.Values.services $name -}}
{{- $c := $root.Values.config -}}
- name: {{ $name }}
  image: {{ include "hafen.image" $root }}
  imagePullPolicy: {{ $root.Values.image.pullPolicy }}
  command: ["/usr/local/bin/hafen-{{ $name }}"]
  # Port names: at most 15 characters (grpc-, probe- and prom- with the longest service name).
  ports:
    - name: grpc-{{ $name }}
      containerPort: {{ $svc.port }}
      protocol: TCP
    - name: probe-{{ $name }}
      containerPort: {{ $svc.healthPort }}
      protocol: TCP
    - name: prom-{{ $name }}
      containerPort: {{ $svc.metricsPort }}
      protocol: TCP
  env:
    {{- include "hafen.commonEnv" $root | nindent 4 }}
    - name: HAFEN_LISTEN
      value: "0.0.0.0:{{ $svc.port }}"
    - name: HAFEN_HEALTH_LISTEN
      value: "0.0.0.0:{{ $svc.healthPort }}"
    - name: HAFEN_METRICS_LISTEN
      value: "0.0.0.0:{{ $svc.metricsPort }}"
    - name: HAFEN_TLS_CERT
      value: /etc/hafen/tls/tls.crt
    - name: HAFEN_TLS_KEY
      value: /etc/hafen/tls/tls.key
    - name: HAFEN_TLS_CA
      value: /etc/hafen/tls/ca.crt
    - name: HAFEN_MTLS
      value: {{ $c.mtls | quote }}
    - name: HAFEN_DRAIN_TIMEOUT
      value: {{ $c.drainTimeout | quote }}
    {{- if ne $name "auth" }}
    - name: HAFEN_AUTH_ENDPOINT
      value: {{ include "hafen.endpoint" (dict "root" $root "service" "auth") | quote }}
    - name: HAFEN_AUTH_SERVER_NAME
      value: hafen-auth
    {{- end }}
    {{- if ne $name "audit" }}
    - name: HAFEN_AUDIT_ENDPOINT
      value: {{ include "hafen.endpoint" (dict "root" $root "service" "audit") | quote }}
    - name: HAFEN_AUDIT_SERVER_NAME
      value: hafen-audit
    {{- end }}
    {{- if has $name (list "messaging" "tenant" "webchat") }}
    - name: HAFEN_MASTER_KEY_FILE
      value: /etc/hafen/secrets/master.key
    {{- end }}
    {{- if has $name (list "auth" "audit" "retention") }}
    - name: HAFEN_KEYS_FILE
      value: /etc/hafen/secrets/{{ $name }}.keys
    {{- end }}
    {{- if has $name (list "tenant" "audit" "retention") }}
    - name: HAFEN_PLATFORM_TOKEN_FILE
      value: /etc/hafen/secrets/platform-token
    {{- end }}
    {{- if and (has $name (list "auth" "messaging")) $c.browserOrigins }}
    - name: HAFEN_BROWSER_ORIGINS
      value: {{ join "," $c.browserOrigins | quote }}
    {{- end }}
    {{- if and (has $name (list "auth" "webchat")) $c.trustedProxies }}
    - name: HAFEN_TRUSTED_PROXIES
      value: {{ join "," $c.trustedProxies | quote }}
    {{- end }}
    {{- if eq $name "tenant" }}
    - name: HAFEN_DPA_VERSIONS
      value: {{ join "," $c.dpaVersions | quote }}
    - name: HAFEN_REGIONS
      value: {{ join "," $c.regions | quote }}
    {{- end }}
    {{- if and (eq $name "audit") $c.processorName }}
    - name: HAFEN_PROCESSOR_NAME
      value: {{ $c.processorName | quote }}
    {{- end }}
    {{- if and (eq $name "audit") $c.processorContact }}
    - name: HAFEN_PROCESSOR_CONTACT
      value: {{ $c.processorContact | quote }}
    {{- end }}
    {{- with $svc.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  # The kubelet's gRPC probe speaks no TLS: it asks the plaintext health port, which
  # serves grpc.health.v1 and nothing else.
  startupProbe:
    grpc:
      port: {{ $svc.healthPort }}
    periodSeconds: 5
    # Long enough for the wait for the migration Job (config.migrationWait).
    failureThreshold: 130
  readinessProbe:
    grpc:
      port: {{ $svc.healthPort }}
    periodSeconds: 5
    failureThreshold: 2
  livenessProbe:
    grpc:
      port: {{ $svc.healthPort }}
    periodSeconds: 10
    failureThreshold: 3
  resources:
    {{- toYaml $svc.resources | nindent 4 }}
  securityContext:
    {{- include "hafen.containerSecurityContext" $root | nindent 4 }}
  volumeMounts:
    {{- include "hafen.commonMounts" $root | nindent 4 }}
    - name: tls-{{ $name }}
      mountPath: /etc/hafen/tls
      readOnly: true
    - name: secrets-{{ $name }}
      mountPath: /etc/hafen/secrets
      readOnly: true
{{- end -}}

{{/* The volumes of one service's container: dict "root" $ "service" "auth". */}}
{{- define "hafen.serviceVolumes" -}}
{{- $root := .root -}}
{{- $name := .service -}}
{{- $s := $root.Values.secrets -}}
- name: tls-{{ $name }}
  secret:
    secretName: {{ include "hafen.tlsSecret" (dict "root" $root "service" $name) }}
    defaultMode: 0440
- name: secrets-{{ $name }}
  projected:
    defaultMode: 0440
    sources:
      {{- if has $name (list "messaging" "tenant" "webchat") }}
      {{- include "hafen.secretSource" (dict "root" $root "secret" $s.masterKey "name" "master.key" "path" "master.key") | nindent 6 }}
      {{- end }}
      {{- if eq $name "auth" }}
      {{- include "hafen.secretSource" (dict "root" $root "secret" $s.authKeys "name" "auth.keys" "path" "auth.keys") | nindent 6 }}
      {{- end }}
      {{- if eq $name "audit" }}
      {{- include "hafen.secretSource" (dict "root" $root "secret" $s.auditKeys "name" "audit.keys" "path" "audit.keys") | nindent 6 }}
      {{- end }}
      {{- if eq $name "retention" }}
      {{- include "hafen.secretSource" (dict "root" $root "secret" $s.retentionKeys "name" "retention.keys" "path" "retention.keys") | nindent 6 }}
      {{- end }}
      {{- if has $name (list "tenant" "audit" "retention") }}
      {{- include "hafen.secretSource" (dict "root" $root "secret" $s.platformToken "name" "platform-token" "path" "platform-token") | nindent 6 }}
      {{- end }}
{{- end -}}

{{/* The Pod spec's common part. */}}
{{- define "hafen.podCommon" -}}
serviceAccountName: {{ include "hafen.serviceAccountName" . }}
automountServiceAccountToken: false
enableServiceLinks: false
terminationGracePeriodSeconds: {{ .Values.config.terminationGracePeriodSeconds }}
securityContext:
  {{- include "hafen.podSecurityContext" . | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
