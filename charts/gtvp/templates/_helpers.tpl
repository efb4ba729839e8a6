{{- define "gtvp.labels" -}}
app.kubernetes.io/name: gtvp
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: gtvp
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- /* gtvp.labels plus app.kubernetes.io/component: include "gtvp.componentLabels" (list . "operator") */}}
{{- define "gtvp.componentLabels" -}}
{{ include "gtvp.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- /* A pod template's labels: the chart's (which win: the selectors rely on them) over
     podLabels. include "gtvp.podLabels" (list . "operator" .Values.operator.podLabels) */}}
{{- define "gtvp.podLabels" -}}
{{- $own := include "gtvp.componentLabels" (list (index . 0) (index . 1)) | fromYaml -}}
{{- toYaml (merge $own (index . 2 | default dict)) -}}
{{- end -}}

{{- /* Sets the chart's labels on an object read from files/ (kept byte-equal to the
     repository's manifests), over whatever labels it has. */}}
{{- define "gtvp.withLabels" -}}
{{- $obj := index . 0 -}}
{{- $own := include "gtvp.componentLabels" (list (index . 1) (index . 2)) | fromYaml -}}
{{- $_ := set $obj.metadata "labels" (merge $own ($obj.metadata.labels | default dict)) -}}
{{- toYaml $obj -}}
{{- end -}}

{{- define "gtvp.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "gtvp.webhookService" -}}
{{ .Release.Name }}-webhooks
{{- end -}}

{{- /* The labels that pick the operator's pods: the Deployment's selector, its Service, its
     PodDisruptionBudget and its anti-affinity all use these, so they always agree. */}}
{{- define "gtvp.operatorSelector" -}}
app.kubernetes.io/component: operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- /* The operator's PriorityClass: an existing one named by the values, else the one the
     chart creates, else none (the cluster's default priority). */}}
{{- define "gtvp.operatorPriorityClassName" -}}
{{- if .Values.operator.priorityClassName -}}
{{ .Values.operator.priorityClassName }}
{{- else if .Values.operator.priorityClass.create -}}
{{ .Release.Name }}-gtvp-operator
{{- end -}}
{{- end -}}

{{- /* What values.schema.json cannot say (it cannot compare two values): refused at render
     time with a message that says what to change. */}}
{{- define "gtvp.checkOperatorValues" -}}
{{- $op := .Values.operator -}}
{{- $l := $op.leases -}}
{{- if ge (int64 $l.renewDeadline) (int64 $l.duration) -}}
{{- fail (printf "operator.leases.renewDeadline (%v) must be less than operator.leases.duration (%v): a replica that cannot renew a shard's Lease must stop writing for it before another replica may take it over" $l.renewDeadline $l.duration) -}}
{{- end -}}
{{- if ge (int64 $l.retryPeriod) (int64 $l.renewDeadline) -}}
{{- fail (printf "operator.leases.retryPeriod (%v) must be less than operator.leases.renewDeadline (%v): a replica must get more than one try to renew its Leases before it has to give them up" $l.retryPeriod $l.renewDeadline) -}}
{{- end -}}
{{- if lt (int64 $op.terminationGracePeriodSeconds) (add (int64 $op.shutdownGraceSeconds) 5) -}}
{{- fail (printf "operator.terminationGracePeriodSeconds (%v) must be at least operator.shutdownGraceSeconds (%v) + 5: after the shutdown grace a replica still hands its Leases back before it exits, and a replica killed before that leaves its shards unwritten until their Leases expire" $op.terminationGracePeriodSeconds $op.shutdownGraceSeconds) -}}
{{- end -}}
{{- if and (gt (int64 $op.replicas) 1) (ge (int64 $op.podDisruptionBudget.minAvailable) (int64 $op.replicas)) -}}
{{- fail (printf "operator.podDisruptionBudget.minAvailable (%v) must be less than operator.replicas (%v): a budget that needs every replica up blocks every drain of a node that runs one; set it to at most %d" $op.podDisruptionBudget.minAvailable $op.replicas (sub (int64 $op.replicas) 1)) -}}
{{- end -}}
{{- end -}}
