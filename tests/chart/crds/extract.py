#!/usr/bin/env python3
"""Takes one resource's schema out of a @kubernetes-models npm package (the versions that
carry it as a plain JSON schema: `const schema = {...}` in KIND.js), as the CRD's
openAPIV3Schema that package was generated from. The one change: `metadata`, which the
package points at its own ObjectMeta model, becomes `{"type": "object"}`, as in the CRD.

    npm pack @kubernetes-models/prometheus-operator@4.0.0
    python3 extract.py kubernetes-models-prometheus-operator-4.0.0.tgz \
        monitoring.coreos.com/v1/PodMonitor.js monitoring.coreos.com_v1_PodMonitor.json
"""
import json
import sys
import tarfile

tgz, module, out = sys.argv[1:]
with tarfile.open(tgz) as package:
    source = package.extractfile("package/" + module).read().decode()
start = source.index("const schema = ") + len("const schema = ")
schema, _ = json.JSONDecoder().raw_decode(source[start:])
assert "$ref" in json.dumps(schema["properties"]["metadata"]), "unexpected metadata schema"
schema["properties"]["metadata"] = {"type": "object"}
assert "$ref" not in json.dumps(schema), "a reference is left"
with open(out, "w") as f:
    json.dump(schema, f, indent=1, sort_keys=True)
    f.write("\n")
