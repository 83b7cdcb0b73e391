{{/* Names ---------------------------------------------------------------------- */}}

{{- define "rise.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "rise.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* "<fullname>-<suffix>", cut to 52 characters so that StatefulSet and Deployment pod names
     and their controller hash labels stay within 63. */}}
{{- define "rise.componentName" -}}
{{- printf "%s-%s" (include "rise.fullname" .ctx) .suffix | trunc 52 | trimSuffix "-" }}
{{- end }}

{{- define "rise.gatewayName" -}}{{ include "rise.componentName" (dict "ctx" . "suffix" "gateway") }}{{- end }}
{{- define "rise.scorerName" -}}{{ include "rise.componentName" (dict "ctx" . "suffix" "scorer") }}{{- end }}
{{- define "rise.scorerHeadlessName" -}}{{ include "rise.componentName" (dict "ctx" . "suffix" "scorer-headless") }}{{- end }}
{{- define "rise.controllerName" -}}{{ include "rise.componentName" (dict "ctx" . "suffix" "controller") }}{{- end }}
{{- define "rise.redisName" -}}{{ include "rise.componentName" (dict "ctx" . "suffix" "redis") }}{{- end }}
{{- define "rise.workerMetricsName" -}}{{ include "rise.componentName" (dict "ctx" . "suffix" "worker-metrics") }}{{- end }}
{{- define "rise.s3SecretName" -}}
{{- .Values.s3.existingSecret | default (include "rise.componentName" (dict "ctx" . "suffix" "s3")) }}
{{- end }}
{{- define "rise.authSecretName" -}}
{{- .Values.auth.existingSecret | default (include "rise.componentName" (dict "ctx" . "suffix" "auth")) }}
{{- end }}
{{- define "rise.redisSecretName" -}}
{{- .Values.redis.auth.existingSecret | default (include "rise.componentName" (dict "ctx" . "suffix" "redis-auth")) }}
{{- end }}
{{- define "rise.internalSecretName" -}}
{{- .Values.internalAuth.existingSecret | default (include "rise.componentName" (dict "ctx" . "suffix" "internal")) }}
{{- end }}

{{/* A value of a Secret the chart creates: (dict "ctx" $ "name" secretName "key" key
     "given" value). The given value; else the one the release's Secret holds already (so
     an upgrade keeps it); else a new random one. */}}
{{- define "rise.secretValue" -}}
{{- if .given }}
{{- .given }}
{{- else }}
{{- $old := lookup "v1" "Secret" .ctx.Release.Namespace .name }}
{{- $data := ($old | default dict).data | default dict }}
{{- if hasKey $data .key }}
{{- index $data .key | b64dec }}
{{- else }}
{{- randAlphaNum 48 }}
{{- end }}
{{- end }}
{{- end }}

{{- define "rise.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "rise.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Labels --------------------------------------------------------------------- */}}

{{- define "rise.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "rise.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rise.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "rise.labels" -}}
helm.sh/chart: {{ include "rise.chart" . }}
{{ include "rise.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: rise
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component: (dict "ctx" $ "component" "gateway") */}}
{{- define "rise.componentSelectorLabels" -}}
{{ include "rise.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "rise.componentLabels" -}}
{{ include "rise.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Images --------------------------------------------------------------------- */}}

{{/* (dict "ctx" $ "override" map-with-optional-repository-tag-and-digest). A digest pins
     the image (`repo@sha256:...`, the tag is then ignored). An override that names an
     image of its own (a repository or a tag) without a digest of its own drops the global
     `image.digest`: that digest is the global image's, and would otherwise pin the
     override back to it (a worker `tag: 1.2.0-cuda` would run the CPU image). */}}
{{- define "rise.image" -}}
{{- $o := .override | default dict }}
{{- $repo := $o.repository | default .ctx.Values.image.repository }}
{{- $own := or (not (empty $o.repository)) (not (empty $o.tag)) }}
{{- $digest := $o.digest | default (ternary "" (.ctx.Values.image.digest | default "") $own) }}
{{- if $digest }}
{{- include "rise.checkDigest" $digest }}
{{- printf "%s@%s" $repo $digest }}
{{- else }}
{{- $tag := $o.tag | default .ctx.Values.image.tag | default .ctx.Chart.AppVersion }}
{{- printf "%s:%s" $repo (toString $tag) }}
{{- end }}
{{- end }}

{{/* An image of (dict "repository" .. "tag" .. "digest" ..): by digest when given. */}}
{{- define "rise.plainImage" -}}
{{- if .digest }}
{{- include "rise.checkDigest" .digest }}
{{- printf "%s@%s" .repository .digest }}
{{- else }}
{{- printf "%s:%s" .repository (toString .tag) }}
{{- end }}
{{- end }}

{{- define "rise.checkDigest" -}}
{{- if not (regexMatch "^sha256:[0-9a-f]{64}$" .) }}
{{- fail (printf "image digest %q is not sha256:<64 hex digits>" .) }}
{{- end }}
{{- end }}

{{/* Environment ------------------------------------------------------------------ */}}

{{/* RISE_REDIS_URL; with the bundled Redis's password, REDIS_PASSWORD first, which
     Kubernetes expands into the URL ($(REDIS_PASSWORD)). */}}
{{- define "rise.redisUrlEnv" -}}
{{- if and .Values.redis.enabled .Values.redis.auth.enabled -}}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "rise.redisSecretName" . }}
      key: {{ .Values.redis.auth.existingSecretKey }}
{{ end -}}
- name: RISE_REDIS_URL
{{- if .Values.redis.enabled }}
{{- if or .Values.redis.externalUrl .Values.redis.externalUrlSecret.name }}
{{- fail "redis.enabled is true: unset redis.externalUrl and redis.externalUrlSecret.name, or set redis.enabled=false" }}
{{- end }}
  value: {{ printf "redis://%s%s:%d/%d" (ternary ":$(REDIS_PASSWORD)@" "" .Values.redis.auth.enabled) (include "rise.redisName" .) (int .Values.redis.port) (int .Values.redis.database) | quote }}
{{- else if .Values.redis.externalUrlSecret.name }}
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.externalUrlSecret.name }}
      key: {{ .Values.redis.externalUrlSecret.key }}
{{- else }}
  value: {{ required "redis.externalUrl (or redis.externalUrlSecret.name) is required when redis.enabled is false" .Values.redis.externalUrl | quote }}
{{- end }}
{{- end }}

{{/* TLS files of a `rediss://` Redis, from Secrets: the CA that signs the server's
     certificate (RISE_REDIS_CA_FILE) and a client certificate (RISE_REDIS_CERT_FILE,
     RISE_REDIS_KEY_FILE) for a Redis that asks for one. */}}
{{- define "rise.redisTlsEnv" -}}
{{- $t := .Values.redis.tls -}}
{{- if $t.caSecret.name }}
- name: RISE_REDIS_CA_FILE
  value: {{ printf "/etc/rise/redis-ca/%s" $t.caSecret.key | quote }}
{{- end }}
{{- if $t.clientCertSecret }}
- name: RISE_REDIS_CERT_FILE
  value: /etc/rise/redis-client/tls.crt
- name: RISE_REDIS_KEY_FILE
  value: /etc/rise/redis-client/tls.key
{{- end }}
{{- end }}

{{- define "rise.redisTlsMounts" -}}
{{- $t := .Values.redis.tls -}}
{{- if $t.caSecret.name }}
- name: redis-ca
  mountPath: /etc/rise/redis-ca
  readOnly: true
{{- end }}
{{- if $t.clientCertSecret }}
- name: redis-client
  mountPath: /etc/rise/redis-client
  readOnly: true
{{- end }}
{{- end }}

{{- define "rise.redisTlsVolumes" -}}
{{- $t := .Values.redis.tls -}}
{{- if $t.caSecret.name }}
- name: redis-ca
  secret:
    secretName: {{ $t.caSecret.name }}
    items:
      - key: {{ $t.caSecret.key }}
        path: {{ $t.caSecret.key }}
{{- end }}
{{- if $t.clientCertSecret }}
- name: redis-client
  secret:
    secretName: {{ $t.clientCertSecret }}
    items:
      - key: tls.crt
        path: tls.crt
      - key: tls.key
        path: tls.key
{{- end }}
{{- end }}

{{- define "rise.s3HasCredentials" -}}
{{- if or .Values.s3.existingSecret .Values.s3.accessKey .Values.s3.secretKey }}true{{ end }}
{{- end }}

{{/* Broker, object store and process settings every RISE container shares. */}}
{{- define "rise.commonEnv" -}}
{{ include "rise.redisUrlEnv" . }}
- name: RISE_S3_ENDPOINT
  value: {{ required "s3.endpoint is required (the object store, e.g. minio.minio:9000)" .Values.s3.endpoint | quote }}
- name: RISE_S3_BUCKET
  value: {{ required "s3.bucket is required (the bucket for indexes and sketch shards)" .Values.s3.bucket | quote }}
- name: RISE_S3_SECURE
  value: {{ .Values.s3.secure | toString | quote }}
{{- with .Values.s3.region }}
- name: RISE_S3_REGION
  value: {{ . | quote }}
{{- end }}
{{- if include "rise.s3HasCredentials" . }}
- name: RISE_S3_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "rise.s3SecretName" . }}
      key: {{ .Values.s3.accessKeyKey }}
- name: RISE_S3_SECRET_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "rise.s3SecretName" . }}
      key: {{ .Values.s3.secretKeyKey }}
{{- end }}
{{- include "rise.redisTlsEnv" . }}
- name: RISE_QUERY_QUEUE
  value: {{ .Values.workers.queryQueue | quote }}
- name: RISE_CONTROL_QUEUE
  value: {{ .Values.workers.controlQueue | quote }}
- name: HOME
  value: /tmp
- name: PYTHONUNBUFFERED
  value: "1"
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: RISE_METRICS_HOST
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The gateway's and the scorers' signed calls (rise.internalauth): the secret's file, or
     internal auth off. */}}
{{- define "rise.internalAuthEnv" -}}
{{- if .Values.internalAuth.enabled -}}
- name: RISE_INTERNAL_SECRET_FILE
  value: {{ printf "/etc/rise/internal/%s" .Values.internalAuth.existingSecretKey | quote }}
{{- else -}}
- name: RISE_INTERNAL_AUTH
  value: "off"
{{- end }}
{{- end }}

{{/* The internal secret's mount and volume (include them only with internalAuth.enabled). */}}
{{- define "rise.internalAuthMount" -}}
- name: internal
  mountPath: /etc/rise/internal
  readOnly: true
{{- end }}

{{- define "rise.internalAuthVolume" -}}
- name: internal
  secret:
    secretName: {{ include "rise.internalSecretName" . }}
    items:
      - key: {{ .Values.internalAuth.existingSecretKey }}
        path: {{ .Values.internalAuth.existingSecretKey }}
{{- end }}

{{/* The ingress rule of a RISE pod's metrics port (NetworkPolicy): from
     networkPolicy.metricsFrom; nothing when that is empty. */}}
{{- define "rise.metricsIngress" -}}
{{- with .Values.networkPolicy.metricsFrom -}}
- ports:
    - port: metrics
      protocol: TCP
  from:
    {{- toYaml . | nindent 4 }}
{{- end }}
{{- end }}

{{/* The port the gateway's probes and `helm test` check: its health-only port with TLS. */}}
{{- define "rise.gatewayHealthPort" -}}
{{- if .Values.gateway.tls.enabled }}{{ int .Values.gateway.tls.healthPort }}{{ else }}{{ int .Values.gateway.port }}{{ end }}
{{- end }}

{{/* Probe timings with the gRPC health check: (dict "port" 50051 "timings" map) */}}
{{- define "rise.grpcProbe" -}}
grpc:
  port: {{ int .port }}
{{- with .timings }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Probe timings with an HTTP GET of /metrics: (dict "port" 9467 "timings" map) */}}
{{- define "rise.metricsProbe" -}}
httpGet:
  path: /metrics
  port: {{ int .port }}
{{- with .timings }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Address list of every scorer replica, for the gateway. */}}
{{- define "rise.scorerAddresses" -}}
{{- $name := include "rise.scorerName" . }}
{{- $svc := include "rise.scorerHeadlessName" . }}
{{- $addrs := list }}
{{- range $i := until (int .Values.scorer.replicas) }}
{{- $addrs = append $addrs (printf "%s-%d.%s.%s.svc.%s:%d" $name $i $svc $.Release.Namespace $.Values.clusterDomain (int $.Values.scorer.port)) }}
{{- end }}
{{- join "," $addrs }}
{{- end }}

{{/* Pools that are enabled, as a dict name -> spec. */}}
{{- define "rise.enabledPools" -}}
{{- $out := dict }}
{{- range $name, $pool := .Values.workers.pools }}
{{- if and $pool (or (not (hasKey $pool "enabled")) $pool.enabled) }}
{{- $_ := set $out $name $pool }}
{{- end }}
{{- end }}
{{- toJson $out }}
{{- end }}

{{/* Celery queue of a pool's shard tasks: (dict "name" $poolName "pool" $pool). Empty `queue`
     means `rise.pool.<name>`, as rise.settings.Settings.queue_of reads it. */}}
{{- define "rise.poolQueue" -}}
{{- .pool.queue | default (printf "rise.pool.%s" .name) }}
{{- end }}

{{/* Hub model sources (a pool's `model` that is a hub id, rise.modelsource): offline mode
     (HF_HUB_OFFLINE=1: only what the cache holds) and the token from a Secret (HF_TOKEN). */}}
{{- define "rise.modelHubEnv" -}}
{{- $hub := .Values.models.hub }}
{{- if $hub.offline }}
- name: HF_HUB_OFFLINE
  value: "1"
{{- end }}
{{- if $hub.tokenSecret.name }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ $hub.tokenSecret.name }}
      key: {{ $hub.tokenSecret.key }}
{{- end }}
{{- end }}

{{/* The volume of a pool's model cache at /cache (dict "ctx" $ "name" $poolName "pool" $pool):
     the pool's `modelCache` when it sets a claim or a host path, else the workers' defaults;
     an existing PersistentVolumeClaim, a node folder (hostPath: the pods of a node share one
     download, rise.modelsource locks it), or an emptyDir per pod. */}}
{{- define "rise.modelCacheVolume" -}}
{{- $w := .ctx.Values.workers }}
{{- $own := .pool.modelCache | default dict }}
{{- $claim := $w.modelCacheClaim }}
{{- $hostPath := $w.modelCacheHostPath }}
{{- if or $own.claimName $own.hostPath }}
{{- $claim = $own.claimName | default "" }}
{{- $hostPath = $own.hostPath | default "" }}
{{- end }}
{{- if and $claim $hostPath }}
{{- fail (printf "workers: the model cache of pool %s is both a claim (%s) and a host path (%s); choose one" .name $claim $hostPath) }}
{{- end }}
{{- if $claim }}
persistentVolumeClaim:
  claimName: {{ $claim }}
{{- else if $hostPath }}
hostPath:
  path: {{ $hostPath }}
  type: DirectoryOrCreate
{{- else }}
emptyDir:
  sizeLimit: {{ $own.sizeLimit | default $w.modelCacheSizeLimit }}
{{- end }}
{{- end }}

{{/* The worker pools as rise.settings.Settings reads them from RISE_POOLS: a JSON object of
     pool name -> the fields of rise.settings.Pool (model, adapter, queue, gpus,
     gpu_memory, dtype, batch_size; nothing else, the Pool model forbids extra keys). */}}
{{- define "rise.poolsSetting" -}}
{{- $out := dict }}
{{- range $name, $pool := (include "rise.enabledPools" . | fromJson) }}
{{- $p := dict "model" (required (printf "workers.pools.%s.model is required" $name) $pool.model) }}
{{- with $pool.adapter }}{{ $_ := set $p "adapter" . }}{{ end }}
{{- with $pool.queue }}{{ $_ := set $p "queue" . }}{{ end }}
{{- $_ := set $p "gpus" (ternary (int $pool.gpus) 1 (hasKey $pool "gpus")) }}
{{- with $pool.gpuMemory }}{{ $_ := set $p "gpu_memory" (toString .) }}{{ end }}
{{- $_ := set $p "dtype" ($pool.dtype | default "bfloat16") }}
{{- $_ := set $p "batch_size" (ternary (int $pool.batchSize) 8 (hasKey $pool "batchSize")) }}
{{- $_ := set $out $name $p }}
{{- end }}
{{- toJson $out }}
{{- end }}

{{/* Fails unless every queue is consumed for one purpose only: each pool's shard queue, each
     pool's query queue `<workers.queryQueue>.<pool>` and the control queue all differ. */}}
{{- define "rise.checkQueues" -}}
{{- $seen := dict (.Values.workers.controlQueue | toString) "workers.controlQueue" }}
{{- range $name, $pool := (include "rise.enabledPools" . | fromJson) }}
{{- $shard := list (include "rise.poolQueue" (dict "name" $name "pool" $pool)) (printf "the shard queue of pool %s" $name) }}
{{- $query := list (printf "%s.%s" $.Values.workers.queryQueue $name) (printf "the query queue of pool %s" $name) }}
{{- range $pair := list $shard $query }}
{{- $q := index $pair 0 }}
{{- $what := index $pair 1 }}
{{- if hasKey $seen $q }}
{{- fail (printf "workers: queue %q is both %s and %s; give every pool its own queue" $q (get $seen $q) $what) }}
{{- end }}
{{- $_ := set $seen $q $what }}
{{- end }}
{{- end }}
{{- end }}

{{/* PodDisruptionBudget spec fields from (dict "maxUnavailable" .. "minAvailable" ..) */}}
{{- define "rise.pdbSpec" -}}
{{- if not (kindIs "invalid" .minAvailable) }}
minAvailable: {{ .minAvailable }}
{{- else }}
maxUnavailable: {{ if kindIs "invalid" .maxUnavailable }}1{{ else }}{{ .maxUnavailable }}{{ end }}
{{- end }}
{{- end }}

{{/* A pool's autoscaling settings: its own `autoscaling` over `workers.autoscaling`, as
     JSON: (dict "ctx" $ "pool" $pool). */}}
{{- define "rise.poolAutoscaling" -}}
{{- /* key by key, not sprig's merge, which takes a pool's 0 or false for "unset" */}}
{{- $out := deepCopy .ctx.Values.workers.autoscaling }}
{{- range $k, $v := (.pool.autoscaling | default dict) }}
{{- if and (eq $k "redis") (kindIs "map" $v) }}
{{- $r := deepCopy $out.redis }}
{{- range $rk, $rv := $v }}{{ $_ := set $r $rk $rv }}{{ end }}
{{- $_ := set $out "redis" $r }}
{{- else }}
{{- $_ := set $out $k $v }}
{{- end }}
{{- end }}
{{- toJson $out }}
{{- end }}

{{/* "true" when some enabled pool is autoscaled by KEDA. */}}
{{- define "rise.anyAutoscaled" -}}
{{- range $name, $pool := (include "rise.enabledPools" . | fromJson) }}
{{- if (include "rise.poolAutoscaling" (dict "ctx" $ "pool" $pool) | fromJson).enabled }}true{{ end }}
{{- end }}
{{- end }}

{{/* Fails when a pool may scale to zero while no other pool always consumes the control
     queue (job commits and compaction): someone must be awake to commit a job. */}}
{{- define "rise.checkScaleToZero" -}}
{{- $pools := include "rise.enabledPools" . | fromJson }}
{{- $awake := list }}
{{- $zero := list }}
{{- range $name, $pool := $pools }}
{{- $a := include "rise.poolAutoscaling" (dict "ctx" $ "pool" $pool) | fromJson }}
{{- if $a.enabled }}
{{- if gt (int $a.minReplicas) 0 }}{{ $awake = append $awake $name }}{{ else }}{{ $zero = append $zero $name }}{{ end }}
{{- else if or (not (hasKey $pool "replicas")) (gt (int $pool.replicas) 0) }}
{{- $awake = append $awake $name }}
{{- end }}
{{- end }}
{{- if and $zero (not $awake) }}
{{- fail (printf "workers: pool(s) %s may scale to zero (autoscaling.minReplicas: 0) but no other pool always runs (fixed replicas >= 1 or autoscaling.minReplicas >= 1) to consume the control queue %q: job commits would wait for a pool to wake. Keep one pool awake, e.g. a small CPU pool (gpus: 0)" (join ", " $zero) .Values.workers.controlQueue) }}
{{- end }}
{{- end }}
