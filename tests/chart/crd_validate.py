#!/usr/bin/env python3
"""Validates custom resources (PodMonitor, PrometheusRule, KEDA ScaledObject) against their
CRDs' openAPIV3Schema, vendored in tests/chart/crds/ (see its README), the way an API server
with strict field validation takes them: a field the schema does not name is an error
wherever the CRD does not keep unknown fields (x-kubernetes-preserve-unknown-fields) or give
an additionalProperties schema of its own.

    crd_validate.py [--require KIND,...] FILE...

Every document of a group the vendored schemas cover must have a schema and match it; other
documents (core kinds, which kubernetes-validate checks) are left alone. --require: each of
these kinds must be among the documents, so a test cannot pass by validating nothing.
"""
import argparse
import copy
import glob
import json
import os
import sys

import jsonschema
import yaml

CRDS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "crds")


def strict(node):
    """The schema as the API server applies it: unknown fields refused, nullable honoured."""
    node = dict(node)
    if "properties" in node:
        node["properties"] = {name: strict(field) for name, field in node["properties"].items()}
        if "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(node.get(key), dict):
            node[key] = strict(node[key])
    for key in ("anyOf", "oneOf", "allOf"):
        if key in node:
            node[key] = [strict(branch) for branch in node[key]]
    if node.pop("nullable", False):
        node = {"anyOf": [node, {"type": "null"}]}
    return node


def schemas():
    found = {}
    for path in sorted(glob.glob(os.path.join(CRDS, "*.json"))):
        with open(path) as f:
            schema = json.load(f)
        for api_version in schema["properties"]["apiVersion"]["enum"]:
            for kind in schema["properties"]["kind"]["enum"]:
                found[(api_version, kind)] = (os.path.basename(path), strict(copy.deepcopy(schema)))
    return found


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--require", default="", help="kinds that must be present, comma-separated")
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()
    known = schemas()
    groups = {api_version.split("/")[0] for api_version, _ in known}
    failures, seen = [], []
    for path in args.files:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        for doc in docs:
            api_version, kind = doc.get("apiVersion", ""), doc.get("kind", "")
            name = f"{path}: {kind} {doc.get('metadata', {}).get('name', '?')}"
            if (api_version, kind) not in known:
                if "/" in api_version and api_version.split("/")[0] in groups:
                    failures.append(f"{name}: no vendored schema for {api_version} {kind}")
                continue
            source, schema = known[(api_version, kind)]
            validator = jsonschema.Draft7Validator(schema)
            errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
            for error in errors:
                where = "/".join(str(p) for p in error.absolute_path) or "(the object)"
                failures.append(f"{name}: {where}: {error.message} (schema {source})")
            seen.append(kind)
            if not errors:
                print(f"ok: {name} matches {source}")
    for kind in filter(None, args.require.split(",")):
        if kind not in seen:
            failures.append(f"no {kind} among the documents")
    for failure in failures:
        print(failure)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
