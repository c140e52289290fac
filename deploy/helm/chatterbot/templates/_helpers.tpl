{{/* The tiers, each a Deployment of `chatterbot serve <tier>`; all but the edge serve gRPC. */}}
{{- define "chatterbot.tiers" -}}
edge chat context inference store worker
{{- end }}
{{- define "chatterbot.grpcTiers" -}}
chat context inference store worker
{{- end }}

{{- define "chatterbot.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* <release>, or <release>-chatterbot when the release name does not contain the chart's. */}}
{{- define "chatterbot.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The name of a tier's Deployment, Service and the rest: (dict "root" $ "tier" "chat"). */}}
{{- define "chatterbot.tierName" -}}
{{- printf "%s-%s" (include "chatterbot.fullname" .root) .tier }}
{{- end }}

{{- define "chatterbot.selectorLabels" -}}
app.kubernetes.io/name: {{ include "chatterbot.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- with .tier }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end }}

{{- define "chatterbot.labels" -}}
{{ include "chatterbot.selectorLabels" . }}
app.kubernetes.io/part-of: chatterbot
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{- end }}

{{/* What gRPC clients dial for a tier: its headless Service and port. */}}
{{- define "chatterbot.addr" -}}
{{- printf "%s:%v" (include "chatterbot.tierName" .) (index .root.Values .tier "port") }}
{{- end }}

{{- define "chatterbot.image" -}}
{{- $values := index .root.Values .tier }}
{{- $own := $values.image | default dict }}
{{- $repository := $own.repository | default .root.Values.image.repository }}
{{- $tag := $own.tag | default .root.Values.image.tag | default .root.Chart.AppVersion }}
{{- printf "%s:%s" $repository $tag }}
{{- end }}

{{- define "chatterbot.configName" -}}
{{- printf "%s-config" (include "chatterbot.fullname" .) }}
{{- end }}

{{- define "chatterbot.secretName" -}}
{{- .Values.secrets.existingSecret | default (printf "%s-secrets" (include "chatterbot.fullname" .)) }}
{{- end }}

{{/* The settings every process reads: derived from the values, then .Values.settings on top. */}}
{{- define "chatterbot.config" -}}
{{- $config := dict
  "CHATTERBOT_BIND_HOST" "0.0.0.0"
  "CHATTERBOT_METRICS_PORT" (toString .Values.metricsPort)
  "CHATTERBOT_EDGE_PORT" (toString .Values.edge.port)
  "CHATTERBOT_EDGE_MAX_IN_FLIGHT" (toString .Values.edge.maxInFlight)
  "CHATTERBOT_MAX_BODY_BYTES" (toString (int64 .Values.edge.maxBodyBytes))
  "CHATTERBOT_NATS_URL" (required "nats.url is required" .Values.nats.url)
  "CHATTERBOT_JETSTREAM_REPLICAS" (toString .Values.nats.jetstreamReplicas)
  "CHATTERBOT_POSTGRES_PREVIOUS_SHARD_COUNT" (toString .Values.postgres.previousShardCount)
  "CHATTERBOT_GRPC_MAX_CONNECTION_AGE_SECONDS" (toString .Values.grpc.maxConnectionAgeSeconds)
  "CHATTERBOT_GRPC_KEEPALIVE_SECONDS" (toString .Values.grpc.keepaliveSeconds)
}}
{{- range $tier := splitList " " (include "chatterbot.grpcTiers" .) }}
{{- $_ := set $config (printf "CHATTERBOT_%s_ADDR" (upper $tier)) (include "chatterbot.addr" (dict "root" $ "tier" $tier)) }}
{{- end }}
{{- with .Values.redis.sentinels }}
{{- $_ := set $config "CHATTERBOT_REDIS_SENTINELS" (join "," .) }}
{{- $_ := set $config "CHATTERBOT_REDIS_SENTINEL_MASTER" $.Values.redis.sentinelMaster }}
{{- end }}
{{- range $name, $value := .Values.settings }}
{{- if not (hasPrefix "CHATTERBOT_" $name) }}
{{- fail (printf "settings.%s: only CHATTERBOT_* settings belong here" $name) }}
{{- end }}
{{- $_ := set $config $name (toString $value) }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/* Keys and credentials, when the chart makes the Secret. */}}
{{- define "chatterbot.secretData" -}}
{{- $secret := dict
  "CHATTERBOT_API_KEYS" (join "," .Values.secrets.apiKeys)
  "CHATTERBOT_ADMIN_KEYS" (join "," .Values.secrets.adminKeys)
  "CHATTERBOT_POSTGRES_SHARDS" (join "," (required "postgres.shards needs at least one DSN" .Values.postgres.shards))
  "CHATTERBOT_REDIS_URL" .Values.redis.url
}}
{{- with .Values.postgres.replicas }}
{{- $_ := set $secret "CHATTERBOT_POSTGRES_REPLICAS" (join "," .) }}
{{- end }}
{{- with .Values.redis.sentinelPassword }}
{{- $_ := set $secret "CHATTERBOT_REDIS_SENTINEL_PASSWORD" . }}
{{- end }}
{{- with .Values.secrets.streamTicketSecret }}
{{- $_ := set $secret "CHATTERBOT_STREAM_TICKET_SECRET" . }}
{{- end }}
{{- range $name, $value := .Values.secrets.extra }}
{{- if not (hasPrefix "CHATTERBOT_" $name) }}
{{- fail (printf "secrets.extra.%s: only CHATTERBOT_* settings belong here" $name) }}
{{- end }}
{{- $_ := set $secret $name (toString $value) }}
{{- end }}
{{- toYaml $secret }}
{{- end }}

{{- define "chatterbot.tlsDir" -}}/etc/chatterbot/tls{{- end }}
{{- define "chatterbot.partnerTlsDir" -}}/etc/chatterbot/partner-tls{{- end }}

{{/* Paths of a tier's CA, certificate and key inside its pod (tls.enabled). */}}
{{- define "chatterbot.tlsFiles" -}}
{{- $dir := include "chatterbot.tlsDir" . }}
{{- if hasKey .root.Values.tls.componentSecrets .tier }}
ca: {{ $dir }}/ca.crt
cert: {{ $dir }}/tls.crt
key: {{ $dir }}/tls.key
{{- else }}
ca: {{ $dir }}/ca.pem
cert: {{ printf "%s/%s.pem" $dir .tier }}
key: {{ printf "%s/%s-key.pem" $dir .tier }}
{{- end }}
{{- end }}

{{/* The container env of a tier: its own settings, then what the chart sets for it. */}}
{{- define "chatterbot.env" -}}
{{- $values := index .root.Values .tier }}
{{- $settings := deepCopy ($values.settings | default dict) }}
{{- if and (eq .tier "inference") .root.Values.ray.enabled }}
{{- /* Ray Serve is the inference tier: the openai engine calls the RayService's serve Service. */}}
{{- $settings = merge (include "chatterbot.raySettings" .root | fromYaml) $settings }}
{{- end }}
{{- range $name, $value := $settings }}
{{- if not (hasPrefix "CHATTERBOT_" $name) }}
{{- fail (printf "%s.settings.%s: only CHATTERBOT_* settings belong here" $.tier $name) }}
{{- end }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- if eq .tier "edge" }}
- name: FORWARDED_ALLOW_IPS
  value: {{ $values.forwardedAllowIps | quote }}
{{- end }}
{{- if .root.Values.tls.enabled }}
{{- $files := include "chatterbot.tlsFiles" . | fromYaml }}
- name: CHATTERBOT_GRPC_TLS_CA
  value: {{ $files.ca }}
- name: CHATTERBOT_GRPC_TLS_CERT
  value: {{ $files.cert }}
- name: CHATTERBOT_GRPC_TLS_KEY
  value: {{ $files.key }}
{{- end }}
{{- if and (eq .tier "chat") .root.Values.partner.enabled }}
- name: CHATTERBOT_PARTNER_GRPC_PORT
  value: {{ .root.Values.partner.port | quote }}
{{- if .root.Values.partner.tls.secretName }}
- name: CHATTERBOT_PARTNER_TLS_CERT
  value: {{ include "chatterbot.partnerTlsDir" . }}/tls.crt
- name: CHATTERBOT_PARTNER_TLS_KEY
  value: {{ include "chatterbot.partnerTlsDir" . }}/tls.key
{{- end }}
{{- end }}
{{- end }}

{{/*
A gRPC health check for probes while mesh TLS is on: kubelet's own grpc probes speak plaintext only. It presents
the pod's certificate and checks the server's under its Service name. Arguments: port, health service.
*/}}
{{- define "chatterbot.tlsHealthCheck" -}}
import os, sys, grpc
from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g
read = lambda name: open(os.environ[name], "rb").read()
credentials = grpc.ssl_channel_credentials(read("CHATTERBOT_GRPC_TLS_CA"), read("CHATTERBOT_GRPC_TLS_KEY"), read("CHATTERBOT_GRPC_TLS_CERT"))
channel = grpc.secure_channel("127.0.0.1:" + sys.argv[1], credentials, options=[("grpc.ssl_target_name_override", sys.argv[3])])
status = g.HealthStub(channel).Check(h.HealthCheckRequest(service=sys.argv[2]), timeout=4).status
sys.exit(0 if status == h.HealthCheckResponse.SERVING else 1)
{{- end }}

{{/* A gRPC probe handler: (dict "root" $ "tier" "chat" "service" "liveness"). */}}
{{- define "chatterbot.grpcProbe" -}}
{{- $port := index .root.Values .tier "port" }}
{{- if .root.Values.tls.enabled }}
exec:
  command:
    - python
    - -c
    - {{ include "chatterbot.tlsHealthCheck" . | quote }}
    - {{ $port | quote }}
    - {{ .service | quote }}
    - {{ include "chatterbot.tierName" . }}
timeoutSeconds: 5
{{- else }}
grpc:
  port: {{ $port }}
  {{- with .service }}
  service: {{ . }}
  {{- end }}
{{- end }}
{{- end }}

{{- define "chatterbot.networkPolicyPeers" -}}
{{- range .tiers }}
- podSelector:
    matchLabels:
      {{- include "chatterbot.selectorLabels" (dict "root" $.root "tier" .) | nindent 6 }}
{{- end }}
{{- end }}

{{/* What inference_svc is told when Ray Serve (ray.enabled) is the inference tier. */}}
{{- define "chatterbot.raySettings" -}}
CHATTERBOT_INFERENCE_ENGINE: openai
CHATTERBOT_OPENAI_BASE_URL: {{ printf "http://%s-serve-svc:8000/v1" (include "chatterbot.tierName" (dict "root" . "tier" "ray")) }}
{{- end }}
