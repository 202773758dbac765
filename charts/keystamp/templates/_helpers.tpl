{{/*
Named templates for platform teams to include in their own workloads:

  spec:
    initContainers:                     # sidecar.native=true (Kubernetes >= 1.29)
      {{- include "keystamp.sidecar" . | nindent 6 }}
    containers:
      - name: agent
        env:
          {{- include "keystamp.agentEnv" . | nindent 10 }}
        volumeMounts:
          {{- include "keystamp.agentVolumeMounts" . | nindent 10 }}
    volumes:
      {{- include "keystamp.volumes" . | nindent 6 }}

With sidecar.native=false, put "keystamp.sidecar" under containers instead.
*/}}

{{- define "keystamp.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "keystamp.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "keystamp.labels" -}}
app.kubernetes.io/name: {{ include "keystamp.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: keystamp
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{- define "keystamp.selectorLabels" -}}
app.kubernetes.io/name: {{ include "keystamp.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "keystamp.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* Where keystamp writes the pod CA (alone) and the combined bundle (system roots + pod CA). */}}
{{- define "keystamp.caDir" -}}/var/run/keystamp{{- end }}

{{/* The keystamp config file, rendered from values. Paths point at the mounts below. */}}
{{- define "keystamp.config" -}}
listen: 127.0.0.1:{{ .Values.sidecar.proxyPort }}
admin: 0.0.0.0:{{ .Values.sidecar.adminPort }}
ca:
  generate: true
  cert_out: {{ include "keystamp.caDir" . }}/ca.crt
  bundle_out: {{ include "keystamp.caDir" . }}/ca-bundle.crt
unmatched: {{ .Values.config.unmatched }}
{{- if or .Values.config.credentials .Values.vault.credentials }}
credentials:
  {{- range $name, $credential := .Values.config.credentials }}
  {{ $name }}:
    source:
      file: /var/run/secrets/keystamp/credentials/{{ $name }}/{{ $credential.key | default "token" }}
      {{- with $credential.format }}
      format: {{ . }}
      {{- end }}
  {{- end }}
  {{- $vault := .Values.vault }}
  {{- range $name, $secret := $vault.credentials }}
  {{- if hasKey $.Values.config.credentials $name }}
  {{- fail (printf "credential %q is in both config.credentials and vault.credentials: give each a name of its own" $name) }}
  {{- end }}
  {{ $name }}:
    source:
      vault:
        address: {{ required "vault.address is required with vault.credentials" $vault.address | quote }}
        auth:
          {{ $vault.authMethod }}:
            role: {{ $vault.role | quote }}
            token: { file: /var/run/secrets/tokens/vault/token }
            {{- with $vault.authMount }}
            mount: {{ . | quote }}
            {{- end }}
        {{- if $secret.dynamic }}
        dynamic: { path: {{ $secret.dynamic | quote }}, field: {{ $secret.field | quote }} }
        {{- else }}
        kv: { mount: {{ $secret.mount | default "secret" | quote }}, path: {{ $secret.path | quote }}, field: {{ $secret.field | quote }} }
        {{- end }}
        poll: {{ $secret.poll | default "30s" }}
  {{- end }}
{{- end }}
{{- if ne .Values.interception.mode "env" }}
transparent:
  listen: 127.0.0.1:15001
  uid: 65532
  lockdown: {{ .Values.interception.lockdown }}
  {{- with .Values.interception.ports }}
  ports: {{ toJson . }}
  {{- end }}
{{- end }}
{{- if and .Values.vault.caSecretName (not (hasKey .Values.config.extra "upstream_tls")) }}
upstream_tls:
  extra_roots: [/var/run/secrets/keystamp/vault-ca/ca.crt]
{{- end }}
{{- with .Values.config.identities }}
identities:
  {{- range $name, $identity := . }}
  {{ $name }}:
    source:
      file: /var/run/secrets/keystamp/identities/{{ $name }}/{{ $identity.key | default "token" }}
  {{- end }}
{{- end }}
{{- if .Values.config.requireIdentity }}
require_identity: true
{{- end }}
{{- with .Values.config.routes }}
routes:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if .Values.fleet.enabled }}
fleet:
  name: {{ .Values.fleet.name | default .Release.Name | quote }}
  store: { url: { env: KEYSTAMP_FLEET_REDIS_URL } }
  {{- if .Values.fleet.sealKey.secretName }}
  key: { env: KEYSTAMP_FLEET_KEY }
  {{- end }}
  {{- with .Values.fleet.replicasHint }}
  replicas_hint: {{ . }}
  {{- end }}
{{- end }}
{{- with .Values.config.extra }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The keystamp container. Restricted Pod Security profile; nothing but the CA emptyDir is writable. */}}
{{- define "keystamp.sidecar" -}}
- name: keystamp
  image: {{ include "keystamp.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  {{- if .Values.sidecar.native }}
  restartPolicy: Always
  {{- end }}
  args: ["--log-format", "{{ .Values.sidecar.logFormat }}", "run", "--config", "/etc/keystamp/keystamp.yaml"]
  env:
    - name: RUST_LOG
      value: {{ .Values.sidecar.logLevel | quote }}
    {{- if .Values.fleet.enabled }}
    # The pod's name identifies it in the fleet (heartbeats, who opened a breaker).
    - name: POD_NAME
      valueFrom:
        fieldRef: { fieldPath: metadata.name }
    - name: KEYSTAMP_FLEET_REDIS_URL
      valueFrom:
        secretKeyRef:
          name: {{ required "fleet.store.secretName is required when fleet.enabled" .Values.fleet.store.secretName }}
          key: {{ .Values.fleet.store.key }}
    {{- if .Values.fleet.sealKey.secretName }}
    - name: KEYSTAMP_FLEET_KEY
      valueFrom:
        secretKeyRef:
          name: {{ .Values.fleet.sealKey.secretName }}
          key: {{ .Values.fleet.sealKey.key }}
    {{- end }}
    {{- end }}
  ports:
    - name: ks-admin
      containerPort: {{ .Values.sidecar.adminPort }}
      protocol: TCP
  startupProbe:
    httpGet: { path: /readyz, port: ks-admin }
    periodSeconds: 1
    failureThreshold: 60
  readinessProbe:
    httpGet: { path: /readyz, port: ks-admin }
    periodSeconds: 10
  livenessProbe:
    httpGet: { path: /livez, port: ks-admin }
    periodSeconds: 20
  resources:
    {{- toYaml .Values.sidecar.resources | nindent 4 }}
  securityContext:
    runAsNonRoot: true
    runAsUser: 65532
    runAsGroup: 65532
    readOnlyRootFilesystem: true
    allowPrivilegeEscalation: false
    capabilities:
      drop: ["ALL"]
    seccompProfile:
      type: RuntimeDefault
  volumeMounts:
    - name: keystamp-config
      mountPath: /etc/keystamp
      readOnly: true
    - name: keystamp-ca
      mountPath: {{ include "keystamp.caDir" . }}
    {{- range $name, $_ := .Values.config.credentials }}
    - name: ks-cred-{{ $name | lower | replace "_" "-" | replace "." "-" }}
      mountPath: /var/run/secrets/keystamp/credentials/{{ $name }}
      readOnly: true
    {{- end }}
    {{- if .Values.vault.credentials }}
    # The projected service-account token keystamp logs in to Vault with (kubelet rotates it).
    - name: ks-vault-token
      mountPath: /var/run/secrets/tokens/vault
      readOnly: true
    {{- end }}
    {{- if .Values.vault.caSecretName }}
    - name: ks-vault-ca
      mountPath: /var/run/secrets/keystamp/vault-ca
      readOnly: true
    {{- end }}
    {{- range $name, $_ := .Values.config.identities }}
    - name: ks-ident-{{ $name | lower | replace "_" "-" | replace "." "-" }}
      mountPath: /var/run/secrets/keystamp/identities/{{ $name }}
      readOnly: true
    {{- end }}
{{- end }}

{{/* Environment for the agent container: every common runtime uses the proxy and trusts the pod CA. */}}
{{- define "keystamp.agentEnv" -}}
{{- $ca := include "keystamp.caDir" . -}}
{{- $noProxy := concat (list "localhost" "127.0.0.1" "::1" ".svc" ".cluster.local") .Values.agent.noProxy | join "," -}}
{{- if .Values.agent.identity.enabled }}
- name: KEYSTAMP_AGENT_NAME
  value: {{ .Values.agent.identity.name | quote }}
- name: KEYSTAMP_AGENT_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.agent.identity.secretName }}
      key: {{ .Values.agent.identity.secretKey }}
{{- end }}
{{- if ne .Values.interception.mode "transparent" }}
{{- $proxy := printf "http://127.0.0.1:%v" .Values.sidecar.proxyPort }}
{{- if .Values.agent.identity.enabled }}
{{- $proxy = printf "http://$(KEYSTAMP_AGENT_NAME):$(KEYSTAMP_AGENT_TOKEN)@127.0.0.1:%v" .Values.sidecar.proxyPort }}
{{- end }}
{{- range $name := list "HTTPS_PROXY" "https_proxy" "HTTP_PROXY" "http_proxy" }}
- name: {{ $name }}
  value: {{ $proxy | quote }}
{{- end }}
- name: NO_PROXY
  value: {{ $noProxy | quote }}
- name: no_proxy
  value: {{ $noProxy | quote }}
- name: NODE_USE_ENV_PROXY
  value: "1"
{{- end }}
- name: NODE_EXTRA_CA_CERTS
  value: {{ printf "%s/ca.crt" $ca | quote }}
{{- range $name := list "SSL_CERT_FILE" "REQUESTS_CA_BUNDLE" "CURL_CA_BUNDLE" }}
- name: {{ $name }}
  value: {{ printf "%s/ca-bundle.crt" $ca | quote }}
{{- end }}
{{- end }}

{{- define "keystamp.agentVolumeMounts" -}}
- name: keystamp-ca
  mountPath: {{ include "keystamp.caDir" . }}
  readOnly: true
{{- end }}

{{/* Volumes: the config as a directory (reloaded when the ConfigMap changes), the CA emptyDir,
     and each Secret as a directory. Never subPath: kubelet does not update subPath mounts. */}}
{{- define "keystamp.volumes" -}}
- name: keystamp-config
  configMap:
    name: {{ include "keystamp.fullname" . }}-config
- name: keystamp-ca
  emptyDir:
    medium: Memory
    sizeLimit: 1Mi
{{- range $name, $credential := .Values.config.credentials }}
- name: ks-cred-{{ $name | lower | replace "_" "-" | replace "." "-" }}
  secret:
    secretName: {{ $credential.secretName }}
{{- end }}
{{- range $name, $identity := .Values.config.identities }}
- name: ks-ident-{{ $name | lower | replace "_" "-" | replace "." "-" }}
  secret:
    secretName: {{ $identity.secretName }}
{{- end }}
{{- if .Values.vault.credentials }}
- name: ks-vault-token
  projected:
    sources:
      - serviceAccountToken:
          audience: {{ .Values.vault.audience | quote }}
          expirationSeconds: {{ .Values.vault.expirationSeconds }}
          path: token
{{- end }}
{{- if .Values.vault.caSecretName }}
- name: ks-vault-ca
  secret:
    secretName: {{ .Values.vault.caSecretName }}
{{- end }}
{{- end }}

{{/* The init container that installs the pod's netfilter rules (interception transparent or
both): same image, root with NET_ADMIN only, runs `keystamp netfilter apply` and exits. Put it
first in initContainers. */}}
{{- define "keystamp.netfilterInit" -}}
{{- if ne .Values.interception.mode "env" }}
- name: keystamp-netfilter
  image: {{ include "keystamp.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args: ["netfilter", "apply", "--config", "/etc/keystamp/keystamp.yaml"]
  securityContext:
    runAsUser: 0
    runAsNonRoot: false
    readOnlyRootFilesystem: true
    allowPrivilegeEscalation: false
    capabilities:
      drop: ["ALL"]
      add: ["NET_ADMIN"]
    seccompProfile:
      type: RuntimeDefault
  resources:
    requests: { cpu: 10m, memory: 16Mi }
    limits: { memory: 32Mi }
  volumeMounts:
    - name: keystamp-config
      mountPath: /etc/keystamp
      readOnly: true
{{- end }}
{{- end }}
