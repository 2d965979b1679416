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
trap 'rm -rf "$work"' EXIT
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
for manifest in k8s/*.yaml; do
    case "$manifest" in
        k8s/kind-cluster.yaml) continue ;;  # kind's own format, not a Kubernetes object
    esac
    check "$manifest is a valid Kubernetes object" kubernetes-validate -k 1.32.0 --strict "$manifest"
done
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
