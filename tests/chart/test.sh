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
    --set defaults.fuel=5000000 --set defaults.timeout=10m --set capabilities.allowNative=true
installer_args() { # wanted-grep-status, values...
    local wanted=$1; shift
    render "$@" --show-only templates/daemonset.yaml > "$work/ds.yaml"
    grep -q -- "--containerd-config=" "$work/ds.yaml"
    [ $? -eq "$wanted" ]
}
check "by default the installer finds containerd's config itself" installer_args 1
check "a configPath value reaches the installer" installer_args 0 \
    --set containerd.configPath=/etc/containerd/custom.toml
refuses "a malformed memory quantity is rejected" "defaults.memory" render --set defaults.memory=lots
refuses "a malformed duration is rejected" "ceilings.timeout" render --set ceilings.timeout=forever
refuses "a negative fuel is rejected" "defaults.fuel" render --set defaults.fuel=-3
refuses "an unknown value is rejected" "typo" render --set typo=1
refuses "a relative containerd path is rejected" "containerd.configPath" render --set containerd.configPath=etc/config.toml
for manifest in k8s/*.yaml; do
    case "$manifest" in
        k8s/kind-cluster.yaml) continue ;;  # kind's own format, not a Kubernetes object
    esac
    check "$manifest is a valid Kubernetes object" kubernetes-validate -k 1.32.0 --strict "$manifest"
done
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
