#!/usr/bin/env python3
"""Every metric the chart's alerts, its dashboard and the KEDA example query must be one that
Bulwark really exports.

    metric_names.py [--scrape METRICS.txt [--source runtime/src/serve.rs]] FILE...

FILEs are rendered manifests (YAML, any number of documents) or dashboard JSON. The PromQL
is taken from PrometheusRules (rules' expr), KEDA ScaledObjects (prometheus triggers' query),
ConfigMaps holding a Grafana dashboard and dashboard JSON (panels' targets, template
variables' label_values queries). Each expression must parse (promql-parser, the Rust
PromQL parser's Python binding), and without --scrape that is all that is checked.

With --scrape, a Prometheus text scrape of a Bulwark serving pod's /metrics: every metric
name used (a selector's name, and any identifier starting with bulwark_) must be a family
of that scrape (a `# TYPE` line) or one of its samples, a sample suffix (_total, _bucket,
_sum, _count) mapping to its family, with the suffix fitting the family's type (_bucket on a
histogram, _total on a counter). Names that are not Bulwark's must be in EXTERNAL below.
"""
import argparse
import json
import re
import sys

import promql_parser
import yaml

# Metrics of other exporters the rules read, each saying where it comes from.
EXTERNAL = {
    # kube-state-metrics (v2.0 and later): the shim exports no metrics, so its errors are
    # read from the state of the pods it failed (BulwarkShimContainerErrors).
    "kube_pod_container_status_waiting_reason": "kube-state-metrics",
    "kube_pod_runtimeclass_name_info": "kube-state-metrics",
}

# Bulwark families a `bulwark serve` scrape cannot show: they exist only in a pod the shim
# runs. Each must be registered in the runtime's source (--source) instead.
SHIM_ONLY = {
    # Counted by the kernel's egress filter, which only the shim attaches (and the runtime
    # adds the series only where one is attached).
    "bulwark_egress": "egress",
}

SUFFIXES = {"_total": {"counter"}, "_bucket": {"histogram"}, "_sum": {"histogram", "summary"},
            "_count": {"histogram", "summary"}, "_created": {"counter", "histogram", "summary"}}
BULWARK_NAME = re.compile(r"\bbulwark_[A-Za-z0-9_]*")
# What Grafana replaces before a query reaches Prometheus.
GRAFANA_RANGES = re.compile(r"\$__(rate_interval|interval|range)\b|\$\{__(rate_interval|interval|range)\}")


def grafana_queries(dashboard, where):
    def panels(items):
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))
    for panel in panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if "expr" in target:
                yield f"{where}: panel {panel.get('title')!r} {target.get('refId')}", target["expr"]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        query = query.get("query", "") if isinstance(query, dict) else query or ""
        match = re.fullmatch(r"\s*label_values\((.*),\s*[A-Za-z_][A-Za-z0-9_]*\s*\)\s*", query)
        yield f"{where}: variable {variable.get('name')}", match.group(1) if match else query


def queries(path):
    with open(path) as f:
        text = f.read()
    if path.endswith(".json"):
        yield from grafana_queries(json.loads(text), path)
        return
    for doc in yaml.safe_load_all(text):
        if not doc:
            continue
        kind, name = doc.get("kind"), doc.get("metadata", {}).get("name")
        where = f"{path}: {kind} {name}"
        if kind == "PrometheusRule":
            for group in doc["spec"]["groups"]:
                for rule in group["rules"]:
                    yield f"{where}: {rule.get('alert') or rule.get('record')}", str(rule["expr"])
        elif kind == "ScaledObject":
            for trigger in doc["spec"]["triggers"]:
                if trigger["type"] == "prometheus":
                    yield f"{where}: trigger {trigger.get('name', '')}", trigger["metadata"]["query"]
        elif kind == "ConfigMap":
            for key, value in (doc.get("data") or {}).items():
                if key.endswith(".json"):
                    yield from grafana_queries(json.loads(value), f"{where}: {key}")


def names_in(expr):
    parsed = promql_parser.parse(GRAFANA_RANGES.sub("5m", expr))
    names = set()

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            for matcher in node.matchers.matchers:
                if matcher.name == "__name__":
                    names.add(matcher.value)
    promql_parser.walk(parsed, visit)
    return names | set(BULWARK_NAME.findall(expr))


def read_scrape(path):
    families, samples = {}, set()
    with open(path) as f:
        for line in f:
            if line.startswith("# TYPE "):
                _, _, family, kind = line.split(maxsplit=3)
                families[family] = kind.strip()
            elif line.strip() and not line.startswith("#"):
                samples.add(re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", line).group(0))
    return families, samples


def check_name(name, families, samples, source):
    """None if the scrape has it, else why not."""
    if not name.startswith("bulwark_"):
        return None if name in EXTERNAL else "not Bulwark's, and not in metric_names.py's EXTERNAL list"
    if name in families:
        kind = families[name]
        return None if kind not in ("counter", "histogram", "summary") else \
            f"a {kind}: its samples are {name}_total, _bucket, _sum or _count, never {name}"
    for suffix, kinds in SUFFIXES.items():
        family = name[: -len(suffix)]
        if name.endswith(suffix) and family in families:
            kind = families[family]
            return None if kind in kinds else f"{family} is a {kind}, which has no {suffix} samples"
    if name in samples:
        return None
    for family in [name] + [name[: -len(s)] for s in SUFFIXES if name.endswith(s)]:
        if family in SHIM_ONLY:
            if source and re.search(r'register\(\s*"%s"' % SHIM_ONLY[family], source):
                return None
            return f"only a shim-run pod exports {family}, and it is not registered in --source"
    return "not in the scrape"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--scrape", help="a Prometheus text scrape of a serving pod's /metrics")
    parser.add_argument("--source", help="the runtime's source, where shim-only families are registered")
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()
    used, failures = {}, []
    for path in args.files:
        count = 0
        for where, expr in queries(path):
            count += 1
            try:
                for name in names_in(expr):
                    used.setdefault(name, []).append(where)
            except ValueError as error:
                failures.append(f"{where}: does not parse ({error}): {expr}")
        if count == 0:
            failures.append(f"{path}: no PromQL found")
    if args.scrape:
        try:
            families, samples = read_scrape(args.scrape)
        except FileNotFoundError:
            sys.exit(f"no scrape at {args.scrape}: nothing to hold the names against")
        source = open(args.source).read() if args.source else None
        for name in sorted(used):
            why = check_name(name, families, samples, source)
            if why:
                failures.append(f"{name}: {why}; used by\n    " + "\n    ".join(used[name]))
    for failure in failures:
        print(failure)
    if not failures:
        print(f"{len(used)} metric names, every expression parses"
              + (f", all exported (scrape {args.scrape})" if args.scrape else ""))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
