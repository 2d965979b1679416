#!/usr/bin/env bash
# The Helm chart: lint, render with default and custom values, validate every rendered
# manifest against Kubernetes' schemas offline, check that the schema rejects malformed
# values, and that the node configuration the chart renders is one Bulwark accepts.
set -euo pipefail
cd "$(dirname "$0")/../.."
HELM=build/tools/helm
CHART=charts/bulwark
BULWARK=target/x86_64-unknown-linux-gnu/release/bulwark
work=$(mktemp -d)
serve_pid=""
cleanup() {
    if [ -n "$serve_pid" ]; then kill "$serve_pid" 2>/dev/null || true; wait "$serve_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
passed=0
failed=0
check() { # name, command...
    local name=$1; shift
    if "$@" >"$work/out" 2>&1; then
        passed=$((passed + 1)); echo "ok: $name"
    else
        failed=$((failed + 1)); echo "FAILED: $name"; sed 's/^/  /' "$work/out"
    fi
}
refuses() { # name, message, command...
    local name=$1 message=$2; shift 2
    if "$@" >"$work/out" 2>&1; then
        failed=$((failed + 1)); echo "FAILED: $name (accepted)"
    elif grep -q -- "$message" "$work/out"; then
        passed=$((passed + 1)); echo "ok: $name"
    else
        failed=$((failed + 1)); echo "FAILED: $name (wrong message)"; sed 's/^/  /' "$work/out"
    fi
}
render() { "$HELM" template bulwark "$CHART" --namespace bulwark-system "$@"; }
valid() { render "$@" > "$work/rendered.yaml" && kubernetes-validate -k 1.32.0 --strict "$work/rendered.yaml"; }
node_config_accepted() {
    render "$@" --show-only templates/configmap.yaml > "$work/cm.yaml"
    python3 -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["data"]["config.toml"], end="")' \
        "$work/cm.yaml" > "$work/config.toml"
    "$BULWARK" run --no-cache --config "$work/config.toml" build/guests/hello.wasm
}

check "helm lint" "$HELM" lint --strict "$CHART"
check "default values render valid Kubernetes objects" valid
check "custom values render valid Kubernetes objects" valid \
    --set defaults.fuel=5000000 --set defaults.timeout=10m --set ceilings.memory=2Gi \
    --set capabilities.allowNetwork=true --set containerd.restart=false \
    --set-json 'tolerations=[{"operator":"Exists"}]' --set-json 'nodeSelector={"pool":"wasm"}'
check "no limits at all render valid objects" valid \
    --set defaults.memory=null --set ceilings.fuel=null --set ceilings.timeout=null --set ceilings.memory=null
check "the rendered node configuration is one Bulwark accepts" node_config_accepted
check "custom node configuration is one Bulwark accepts" node_config_accepted \
    --set defaults.fuel=5000000 --set defaults.timeout=10m --set capabilities.allowNative=true \
    --set defaults.concurrency=10 --set ceilings.concurrency=50 \
    --set compile.memory=4Gi --set compile.concurrency=1 --set compile.moduleSize=64Mi \
    --set-json 'ceilings.network=["10.0.0.0/8:443","[fd00::]/8:8000-8099"]' \
    --set serving.headTimeout=5s --set serving.connections=200 --set serving.maxBodySize=1Mi
installer_args() { # wanted-grep-status, values...
    local wanted=$1; shift
    render "$@" --show-only templates/daemonset.yaml > "$work/ds.yaml"
    grep -q -- "--containerd-config=" "$work/ds.yaml"
    [ $? -eq "$wanted" ]
}
check "by default the installer finds containerd's config itself" installer_args 1
check "a configPath value reaches the installer" installer_args 0 \
    --set containerd.configPath=/etc/containerd/custom.toml
# Structural checks on rendered objects: `objects VALUES... -- PYTHON`, where PYTHON is an
# expression over `docs` (every rendered object), `kind(K)` (the one object of kind K that
# is not a hook), `hooks()` and `hook(K)` that must hold.
objects() {
    local args=()
    while [ "$1" != "--" ]; do args+=("$1"); shift; done
    render "${args[@]}" > "$work/all.yaml"
    python3 - "$work/all.yaml" "$2" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
def is_hook(d): return "helm.sh/hook" in d["metadata"].get("annotations", {})
def kind(k):
    found = [d for d in docs if d["kind"] == k and not is_hook(d)]
    assert len(found) == 1, f"{len(found)} objects of kind {k}"
    return found[0]
def init(): return kind("DaemonSet")["spec"]["template"]["spec"]["initContainers"][0]
def hooks(): return [d for d in docs if is_hook(d)]
def hook(k):
    found = [d for d in hooks() if d["kind"] == k]
    assert len(found) == 1, f"{len(found)} hooks of kind {k}"
    return found[0]
if not eval("(" + sys.argv[2] + ")"):
    sys.exit(f"does not hold: {sys.argv[2]}")
PY
}
label=$("$BULWARK" install --help | grep -o 'bulwark\.dev/[a-z]*=true' | head -n1)
check "the RuntimeClass schedules onto the nodes the installer labelled ($label)" objects -- \
    "kind('RuntimeClass')['scheduling']['nodeSelector'] == dict([('$label'.split('=')[0], 'true')])"
check "the installer runs its pod template's action and labels its own node" objects -- \
    "init()['command'][1] == '\$(BULWARK_ACTION)' and '--label-node=\$(NODE_NAME)' in init()['command']
     and kind('DaemonSet')['spec']['template']['metadata']['annotations']['bulwark.dev/action'] == 'install'
     and kind('DaemonSet')['spec']['template']['spec']['serviceAccountName'] == kind('ServiceAccount')['metadata']['name']"
check "Wasm pods' tolerations are the RuntimeClass's own, not the installer's" objects \
    --set-json 'tolerations=[{"operator":"Exists"}]' \
    --set-json 'runtimeClass.tolerations=[{"key":"wasm","operator":"Exists","effect":"NoSchedule"}]' -- \
    "kind('RuntimeClass')['scheduling']['tolerations'] == [{'key': 'wasm', 'operator': 'Exists', 'effect': 'NoSchedule'}]
     and kind('DaemonSet')['spec']['template']['spec']['tolerations'] == [{'operator': 'Exists'}]"
check "the installer may get and patch nodes, nothing else" objects -- \
    "kind('ClusterRole')['rules'] == [{'apiGroups': [''], 'resources': ['nodes'], 'verbs': ['get', 'patch']}]"
# The installer may patch only its own node, and only its label there: RBAC cannot say so
# (every node, no resourceNames), a ValidatingAdmissionPolicy does.
check "the installer's node patches are bound by a policy on its own service account" objects -- \
    "kind('ValidatingAdmissionPolicy')['spec']['matchConditions'][0]['expression']
        == \"request.userInfo.username == 'system:serviceaccount:%s:%s'\" % (
           kind('ServiceAccount')['metadata']['namespace'], kind('ServiceAccount')['metadata']['name'])
     and kind('ServiceAccount')['metadata']['namespace'] == 'bulwark-system'
     and kind('ServiceAccount')['metadata']['name'] == kind('DaemonSet')['spec']['template']['spec']['serviceAccountName']
     and kind('ValidatingAdmissionPolicy')['spec']['matchConstraints']['resourceRules']
        == [{'apiGroups': [''], 'apiVersions': ['*'], 'operations': ['UPDATE'], 'resources': ['nodes']}]
     and kind('ValidatingAdmissionPolicy')['spec']['failurePolicy'] == 'Fail'
     and kind('ValidatingAdmissionPolicyBinding')['spec']['policyName'] == kind('ValidatingAdmissionPolicy')['metadata']['name']
     and kind('ValidatingAdmissionPolicyBinding')['spec']['validationActions'] == ['Deny']
     and \"'%s'\" % '$label'.split('=')[0] in [v['expression'] for v in kind('ValidatingAdmissionPolicy')['spec']['variables']]"
check "rbac.restrictNodePatches=false renders no node policy, the same RBAC" objects --set rbac.restrictNodePatches=false -- \
    "not [d for d in docs if d['kind'].startswith('ValidatingAdmissionPolicy')]
     and kind('ClusterRole')['rules'] == [{'apiGroups': [''], 'resources': ['nodes'], 'verbs': ['get', 'patch']}]"
refuses "the node policy is refused before Kubernetes 1.30" "rbac.restrictNodePatches" render --kube-version 1.29.0
check "with rbac.restrictNodePatches=false the chart still renders for Kubernetes 1.29" valid \
    --kube-version 1.29.0 --set rbac.restrictNodePatches=false
refuses "a non-boolean rbac.restrictNodePatches is rejected" "rbac.restrictNodePatches" render --set rbac.restrictNodePatches=maybe
node_policy() { # parse|evaluate
    render > "$work/all.yaml" && python3 tests/chart/node_policy.py "$work/all.yaml" "$1"
}
check "the node policy's CEL expressions compile" node_policy parse
check "the node policy lets the installer set its label on its own node, and nothing else" node_policy evaluate
check "helm uninstall first switches the installer DaemonSet to uninstall" objects -- \
    "all(h['metadata']['annotations']['helm.sh/hook'] == 'pre-delete' for h in hooks())
     and sorted(h['kind'] for h in hooks()) == ['Job', 'Role', 'RoleBinding', 'ServiceAccount']
     and '--daemonset=' + kind('DaemonSet')['metadata']['name'] in hook('Job')['spec']['template']['spec']['containers'][0]['command']
     and hook('Role')['rules'][0]['resourceNames'] == [kind('DaemonSet')['metadata']['name']]
     and hook('Job')['spec']['template']['spec']['serviceAccountName'] == hook('ServiceAccount')['metadata']['name']"
check "uninstall.hook=false renders no hook" objects --set uninstall.hook=false -- "hooks() == []"
refuses "a malformed uninstall timeout is rejected" "uninstall.timeout" render --set uninstall.timeout=soon
refuses "a malformed rollout.maxUnavailable is rejected" "rollout.maxUnavailable" render --set rollout.maxUnavailable=0
refuses "a malformed memory quantity is rejected" "defaults.memory" render --set defaults.memory=lots
refuses "a malformed duration is rejected" "ceilings.timeout" render --set ceilings.timeout=forever
refuses "a negative fuel is rejected" "defaults.fuel" render --set defaults.fuel=-3
refuses "a zero concurrency is rejected" "ceilings.concurrency" render --set ceilings.concurrency=0
refuses "a malformed compile memory is rejected" "compile.memory" render --set compile.memory=plenty
refuses "a zero compile concurrency is rejected" "compile.concurrency" render --set compile.concurrency=0
refuses "an unknown value is rejected" "typo" render --set typo=1
refuses "a malformed network ceiling is rejected" "ceilings.network" render --set-json 'ceilings.network=["db.local:5432"]'
refuses "a zero connection cap is rejected" "serving.connections" render --set serving.connections=0
refuses "a relative containerd path is rejected" "containerd.configPath" render --set containerd.configPath=etc/config.toml
# Watch and scale (monitoring.*): the Prometheus Operator's PodMonitor and PrometheusRule, the
# Grafana dashboard, and the KEDA example in k8s/. kubernetes-validate knows no custom
# resources (it only warns), so those are held against their CRDs' schemas, vendored in
# tests/chart/crds/, by crd_validate.py, strictly: an unknown field is an error.
MONITORING=(--set monitoring.assumeCRDs=true --set monitoring.podMonitor.enabled=true
    --set monitoring.prometheusRule.enabled=true --set monitoring.dashboard.enabled=true)
check "helm lint with the monitoring objects" "$HELM" lint --strict "$CHART" "${MONITORING[@]}"
check "the monitoring objects render valid Kubernetes objects" valid "${MONITORING[@]}"
crds_valid() { # values...
    render "$@" > "$work/monitoring.yaml" &&
        python3 tests/chart/crd_validate.py --require PodMonitor,PrometheusRule "$work/monitoring.yaml"
}
check "the PodMonitor and PrometheusRule match their CRDs' schemas" crds_valid "${MONITORING[@]}"
check "with custom monitoring values too" crds_valid "${MONITORING[@]}" \
    --set monitoring.podMonitor.interval=30s --set-json 'monitoring.podMonitor.podTargetLabels=[]' \
    --set-json 'monitoring.podMonitor.namespaceSelector={"matchNames":["web","api"]}' \
    --set-json 'monitoring.podMonitor.selector={"matchExpressions":[{"key":"app","operator":"In","values":["a","b"]}]}' \
    --set-json 'monitoring.podMonitor.labels={"release":"kps"}' --set-json 'monitoring.prometheusRule.labels={"release":"kps"}' \
    --set monitoring.prometheusRule.rateWindow=2m --set monitoring.prometheusRule.limitKills.threshold=2 \
    --set monitoring.prometheusRule.egressDenied.for=1m --set monitoring.prometheusRule.shimErrors.severity=page
check "k8s/http-scaledobject.yaml matches KEDA's ScaledObject schema" \
    python3 tests/chart/crd_validate.py --require ScaledObject k8s/http-scaledobject.yaml
crd_typo() {
    render "${MONITORING[@]}" --show-only templates/podmonitor.yaml | sed 's/- port: /- portt: /' > "$work/typo.yaml"
    python3 tests/chart/crd_validate.py "$work/typo.yaml"
}
refuses "the CRD check refuses a field its schema does not have" "'portt' was unexpected" crd_typo
hpa_valid() { # the HPA alternative, kept in k8s/http-scaledobject.yaml's "#|" comment lines
    sed -n 's/^#| \{0,1\}//p' k8s/http-scaledobject.yaml > "$work/hpa.yaml"
    grep -q HorizontalPodAutoscaler "$work/hpa.yaml" && kubernetes-validate -k 1.32.0 --strict "$work/hpa.yaml"
}
check "the HPA alternative in k8s/http-scaledobject.yaml is a valid Kubernetes object" hpa_valid
check "by default no monitoring object is rendered, even where the CRDs are" objects \
    --api-versions monitoring.coreos.com/v1/PodMonitor --api-versions monitoring.coreos.com/v1/PrometheusRule -- \
    "not [d for d in docs if d['apiVersion'].startswith('monitoring.coreos.com/')]
     and [d['metadata']['name'] for d in docs if d['kind'] == 'ConfigMap'] == ['bulwark-node-config']"
check "enabled, the Prometheus Operator objects are left out where the cluster lacks their CRDs" objects \
    --set monitoring.podMonitor.enabled=true --set monitoring.prometheusRule.enabled=true -- \
    "not [d for d in docs if d['apiVersion'].startswith('monitoring.coreos.com/')]"
check "and rendered where it has them" objects \
    --api-versions monitoring.coreos.com/v1/PodMonitor --api-versions monitoring.coreos.com/v1/PrometheusRule \
    --set monitoring.podMonitor.enabled=true --set monitoring.prometheusRule.enabled=true -- \
    "kind('PodMonitor')['metadata']['namespace'] == kind('PrometheusRule')['metadata']['namespace'] == 'bulwark-system'"
check "the PodMonitor scrapes /metrics on the named port of labelled pods, in every namespace" objects "${MONITORING[@]}" -- \
    "kind('PodMonitor')['spec']['selector'] == {'matchLabels': {'bulwark.dev/metrics': 'true'}}
     and kind('PodMonitor')['spec']['podMetricsEndpoints'] == [{'port': 'metrics', 'path': '/metrics'}]
     and kind('PodMonitor')['spec']['namespaceSelector'] == {'any': True}"
rule() { echo "[r for g in kind('PrometheusRule')['spec']['groups'] for r in g['rules'] if r['alert'] == '$1'][0]"; }
check "the alerts take their thresholds, durations and severities from the values" objects "${MONITORING[@]}" \
    --set monitoring.prometheusRule.limitKills.threshold=2.5 --set monitoring.prometheusRule.queued.for=1h \
    --set monitoring.prometheusRule.acceptErrors.severity=page --set monitoring.prometheusRule.rateWindow=2m -- \
    "$(rule BulwarkLimitKills)['expr'].endswith('[2m])) > 2.5')
     and $(rule BulwarkRequestsQueued)['for'] == '1h'
     and $(rule BulwarkAcceptErrors)['labels'] == {'severity': 'page'}
     and sorted(r['alert'] for g in kind('PrometheusRule')['spec']['groups'] for r in g['rules']) == sorted(
        ['BulwarkLimitKills', 'BulwarkRequestsRefused', 'BulwarkEgressDenied', 'BulwarkRequestsQueued',
         'BulwarkAcceptErrors', 'BulwarkShimContainerErrors'])
     and all(set(r['annotations']) == {'summary', 'description'} for g in kind('PrometheusRule')['spec']['groups'] for r in g['rules'])"
check "the shim alert keeps to pods of the chart's RuntimeClass" objects "${MONITORING[@]}" --set runtimeClass.name=wasm -- \
    "'kube_pod_runtimeclass_name_info{runtimeclass_name=\"wasm\"}' in $(rule BulwarkShimContainerErrors)['expr']
     and 'reason=~\"CreateContainerError|RunContainerError\"' in $(rule BulwarkShimContainerErrors)['expr']"
check "the dashboard ConfigMap carries the sidecar's label and the chart's dashboard" objects "${MONITORING[@]}" \
    --set-json 'monitoring.dashboard.annotations={"grafana_folder":"Bulwark"}' --set monitoring.dashboard.namespace=grafana -- \
    "[(d['metadata']['namespace'], d['metadata']['labels']['grafana_dashboard'], d['metadata']['annotations'],
       __import__('json').loads(d['data']['bulwark.json'])) for d in docs if d['metadata']['name'] == 'bulwark-dashboard']
     == [('grafana', '1', {'grafana_folder': 'Bulwark'}, __import__('json').load(open('charts/bulwark/dashboards/bulwark.json')))]"
check "the dashboard parses and every panel has a query over the namespace and pod picked" \
    python3 tests/chart/dashboard_check.py charts/bulwark/dashboards/bulwark.json
promql_parses() {
    render "${MONITORING[@]}" > "$work/monitoring.yaml" &&
        python3 tests/chart/metric_names.py "$work/monitoring.yaml" k8s/http-scaledobject.yaml
}
check "the alerts', the dashboard's and the KEDA example's PromQL parses" promql_parses
example_scraped() { # k8s/http-service.yaml's pods are ones the PodMonitor scrapes, and KEDA scales them
    render "${MONITORING[@]}" --show-only templates/podmonitor.yaml > "$work/podmonitor.yaml"
    python3 - "$work/podmonitor.yaml" <<'PY'
import sys, yaml
monitor = yaml.safe_load(open(sys.argv[1]))["spec"]
deployment = [d for d in yaml.safe_load_all(open("k8s/http-service.yaml")) if d and d["kind"] == "Deployment"][0]
pod = deployment["spec"]["template"]
scaled = yaml.safe_load(open("k8s/http-scaledobject.yaml"))["spec"]
labels = pod["metadata"]["labels"]
assert all(labels.get(k) == v for k, v in monitor["selector"]["matchLabels"].items()), f"pod labels {labels}"
port_name = monitor["podMetricsEndpoints"][0]["port"]
ports = {p.get("name"): p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
assert port_name in ports, f"no container port named {port_name}: {ports}"
metrics = pod["metadata"]["annotations"]["bulwark.dev/metrics"]
assert metrics.rsplit(":", 1)[-1] == str(ports[port_name]), f"bulwark.dev/metrics {metrics} is not port {ports[port_name]}"
assert scaled["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
query = scaled["triggers"][0]["metadata"]["query"]
assert 'app="%s"' % labels["app"] in query and "app" in monitor["podTargetLabels"], query
PY
}
check "k8s/http-service.yaml's pods are scraped by the PodMonitor and scaled by the KEDA example" example_scraped
refuses "a malformed alert duration is rejected" "monitoring.prometheusRule.limitKills.for" \
    render --set monitoring.prometheusRule.limitKills.for=soon
refuses "a 503 share over 1 is rejected" "monitoring.prometheusRule.refused" \
    render --set monitoring.prometheusRule.refused.threshold=5
refuses "a malformed metrics port name is rejected" "monitoring.podMonitor.port" \
    render --set monitoring.podMonitor.port=Metrics_Port
refuses "an unknown monitoring value is rejected" "typo" render --set monitoring.podMonitor.typo=1
# Every metric those queries use must be one a serving pod exports: a real scrape of
# `bulwark serve` (the release binary, not built here: make build, make components), after a
# few requests and two that a limit ends (labelled families appear only once they have a
# series). Missing binary or component: a failure, not a skip.
scrape_serving_pod() {
    [ -x "$BULWARK" ] || { echo "$BULWARK is missing (make build)"; return 1; }
    [ -f build/components/httpd.wasm ] || { echo "build/components/httpd.wasm is missing (make components)"; return 1; }
    local ports http metrics
    ports=$(python3 -c 'import socket
socks = [socket.socket() for _ in range(2)]
for s in socks: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))')
    read -r http metrics <<<"$ports"
    "$BULWARK" serve --no-cache --listen "127.0.0.1:$http" --metrics "127.0.0.1:$metrics" \
        --fuel 100000000 --timeout 5s build/components/httpd.wasm >"$work/serve.log" 2>&1 &
    serve_pid=$!
    local tries=0
    until curl -sf -o /dev/null "http://127.0.0.1:$http/"; do
        tries=$((tries + 1))
        if [ "$tries" -gt 300 ] || ! kill -0 "$serve_pid" 2>/dev/null; then
            echo "bulwark serve did not answer:"; cat "$work/serve.log"; return 1
        fi
        sleep 0.1
    done
    for path in / / / /loop /trap; do
        curl -s -o /dev/null --max-time 10 "http://127.0.0.1:$http$path"
    done
    curl -sf --max-time 10 "http://127.0.0.1:$metrics/metrics" > "$work/metrics.txt"
    kill "$serve_pid"; wait "$serve_pid" || true; serve_pid=""
    grep -c '^# TYPE bulwark_' "$work/metrics.txt"
}
check "a serving pod's /metrics is scraped (bulwark serve, httpd.wasm)" scrape_serving_pod
metrics_exported() {
    render "${MONITORING[@]}" > "$work/monitoring.yaml" &&
        python3 tests/chart/metric_names.py --scrape "$work/metrics.txt" --source runtime/src/serve.rs \
            "$work/monitoring.yaml" k8s/http-scaledobject.yaml charts/bulwark/dashboards/bulwark.json
}
check "every metric the alerts, the dashboard and the KEDA example use is one Bulwark exports" metrics_exported
metric_typo() { # EXPR: a rule of that expression, held against the same scrape
    printf 'kind: PrometheusRule\nmetadata: {name: typo}\nspec:\n  groups:\n    - name: g\n      rules:\n        - {alert: A, expr: %s}\n' \
        "$1" > "$work/typo-rule.yaml"
    python3 tests/chart/metric_names.py --scrape "$work/metrics.txt" --source runtime/src/serve.rs "$work/typo-rule.yaml"
}
refuses "the metric check refuses a name Bulwark does not export" "bulwark_request_total: not in the scrape" \
    metric_typo "'rate(bulwark_request_total[5m]) > 0'"
refuses "the metric check refuses a gauge read as a counter" "bulwark_queued is a gauge" \
    metric_typo "'rate(bulwark_queued_total[5m]) > 0'"
refuses "the metric check refuses another exporter's metric it was not told of" "kube_pod_info: not Bulwark's" \
    metric_typo "'kube_pod_info > 0'"
for manifest in k8s/*.yaml; do
    case "$manifest" in
        k8s/kind-cluster.yaml) continue ;;  # kind's own format, not a Kubernetes object
        k8s/http-scaledobject.yaml) continue ;;  # KEDA's: checked against its CRD above
    esac
    check "$manifest is a valid Kubernetes object" kubernetes-validate -k 1.32.0 --strict "$manifest"
done
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
