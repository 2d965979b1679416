#!/usr/bin/env bash
# make kind-test: Bulwark on a real Kubernetes cluster in kind, the way a user installs it:
# build, load the installer and guest images into the nodes, helm install, apply the k8s/
# examples, check that they run and that their limits fire with their reasons, tear down.
#
# Needs Docker, kind and kubectl. This project's own machines have no Docker engine, so there
# it stops with exit 2 and says so; `make test` covers the same steps through CRI there.
set -euo pipefail
cd "$(dirname "$0")/../.."
CLUSTER=bulwark-kind-test
HELM=build/tools/helm

missing=""
docker info >/dev/null 2>&1 || missing="$missing docker(engine)"
command -v kind >/dev/null || missing="$missing kind"
command -v kubectl >/dev/null || missing="$missing kubectl"
command -v skopeo >/dev/null || missing="$missing skopeo"
if [ -n "$missing" ]; then
    echo "kind-test: cannot run here, missing:$missing."
    echo "kind-test: the same steps (installer image in a pod, containerd from the installed config,"
    echo "kind-test: limited Wasm pods through CRI) run in 'make test' against a private containerd."
    exit 2
fi

work=$(mktemp -d)
cleanup() { kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT

make build guests installer-image
[ -x "$HELM" ] || bash tests/chart/get-helm.sh

kind create cluster --name "$CLUSTER" --config k8s/kind-cluster.yaml --wait 120s
skopeo copy oci:build/installer-image:latest "oci-archive:$work/installer.tar:bulwark-installer:test"
kind load image-archive "$work/installer.tar" --name "$CLUSTER"
for guest in sleep loop fileio; do
    target/x86_64-unknown-linux-gnu/release/bulwark image build --name "localhost:5001/bulwark-$guest:v1" \
        --archive "$work/$guest.tar" "build/guests/$guest.wasm"
    kind load image-archive "$work/$guest.tar" --name "$CLUSTER"
done

"$HELM" install bulwark charts/bulwark --namespace bulwark-system --create-namespace \
    --set image.repository=bulwark-installer --set image.tag=test --set image.pullPolicy=Never \
    --wait --timeout 5m
kubectl -n bulwark-system rollout status daemonset/bulwark-installer --timeout 5m
worker="$CLUSTER-worker"
installed=$(kubectl get node "$worker" -o jsonpath='{.metadata.labels.bulwark\.dev/installed}')
[ "$installed" = true ] || { echo "the installer did not label $worker (label: '$installed')"; exit 1; }

kubectl apply -f k8s/fuel-job.yaml -f k8s/readonly-volume-pod.yaml -f k8s/hello-deployment.yaml
kubectl wait --for=condition=Failed job/wasm-out-of-fuel --timeout 120s
pod=$(kubectl get pods -l job-name=wasm-out-of-fuel -o jsonpath='{.items[0].metadata.name}')
code=$(kubectl get pod "$pod" -o jsonpath='{.status.containerStatuses[0].state.terminated.exitCode}')
message=$(kubectl get pod "$pod" -o jsonpath='{.status.containerStatuses[0].state.terminated.message}')
[ "$code" = 152 ] || { echo "fuel job exited $code, expected 152"; exit 1; }
case "$message" in
    *"fuel exhausted after 5000000 units (bulwark.dev/fuel)"*) ;;
    *) echo "fuel job's termination message: $message"; exit 1 ;;
esac
kubectl wait --for=jsonpath='{.status.phase}'=Succeeded pod/wasm-reader --timeout 120s
kubectl logs wasm-reader | grep -q "hello from a volume" || { echo "reader did not read its volume"; exit 1; }
kubectl rollout status deployment/wasm-sleeper --timeout 120s

# Uninstall: the pre-delete hook takes Bulwark off the node before the chart's objects go.
kubectl delete -f k8s/fuel-job.yaml -f k8s/readonly-volume-pod.yaml -f k8s/hello-deployment.yaml --wait
"$HELM" uninstall bulwark --namespace bulwark-system --wait --timeout 5m
installed=$(kubectl get node "$worker" -o jsonpath='{.metadata.labels.bulwark\.dev/installed}')
[ -z "$installed" ] || { echo "$worker still labelled bulwark.dev/installed=$installed"; exit 1; }
if docker exec "$worker" grep -q io.containerd.bulwark.v1 /etc/containerd/config.toml; then
    echo "$worker's containerd config still has the bulwark runtime"; exit 1
fi
if docker exec "$worker" test -e /usr/local/bin/containerd-shim-bulwark-v1; then
    echo "$worker still has the shim"; exit 1
fi
echo "kind-test: 5 passed, 0 failed"
