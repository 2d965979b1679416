#!/usr/bin/env python3
"""The Grafana dashboard is one Grafana loads and every panel shows something for the pods
picked: it parses, has a uid and the namespace and pod variables, and every panel has at
least one query, each over the pods the variables pick, through the datasource variable.

    dashboard_check.py DASHBOARD.json
"""
import json
import sys

with open(sys.argv[1]) as f:
    dashboard = json.load(f)
failures = []
if not dashboard.get("uid") or not dashboard.get("title"):
    failures.append("the dashboard needs a uid and a title")
variables = {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}
for name in ("datasource", "namespace", "pod"):
    if name not in variables:
        failures.append(f"no template variable {name}")
panels = dashboard.get("panels", [])
if not panels:
    failures.append("no panels")
ids = [panel.get("id") for panel in panels]
if len(set(ids)) != len(ids):
    failures.append(f"panel ids repeat: {ids}")
for panel in panels:
    title = panel.get("title") or f"panel {panel.get('id')}"
    if panel.get("type") == "row":
        continue
    targets = [t for t in panel.get("targets", []) if t.get("expr", "").strip()]
    if not targets:
        failures.append(f"{title}: no query")
    for target in targets:
        expr = target["expr"]
        for variable in ("namespace", "pod"):
            if f'{variable}=~"${variable}"' not in expr:
                failures.append(f"{title} {target.get('refId')}: does not select {variable}=~\"${variable}\": {expr}")
    for source in [panel.get("datasource")] + [t.get("datasource") for t in targets]:
        if (source or {}).get("uid") != "${datasource}":
            failures.append(f"{title}: a datasource other than ${{datasource}}: {source}")
    if "gridPos" not in panel:
        failures.append(f"{title}: no gridPos")
for failure in failures:
    print(failure)
if not failures:
    print(f"{len(panels)} panels, each with a query over $namespace and $pod")
sys.exit(1 if failures else 0)
