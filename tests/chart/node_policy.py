"""The chart's ValidatingAdmissionPolicy on nodes, evaluated offline with cel-python.

Usage: node_policy.py RENDERED.yaml parse|evaluate

parse: every CEL expression of the policy compiles. evaluate: sample node updates go
through the policy as the API server would take them (match conditions, then variables,
then validations), and each is let through or refused as expected, a refusal by a
validation that is false (an error would refuse too, failurePolicy Fail, but proves
nothing). cel-python is not the API server's cel-go: this checks the
expressions' logic, not every corner of Kubernetes' CEL environment.
"""

import copy
import sys

import celpy
import yaml
from celpy import celtypes

docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
mode = sys.argv[2]
policies = [d for d in docs if d["kind"] == "ValidatingAdmissionPolicy"]
assert len(policies) == 1, f"{len(policies)} ValidatingAdmissionPolicy objects"
spec = policies[0]["spec"]
env = celpy.Environment()


def compile_all(entries):
    return [(e.get("name"), env.program(env.compile(e["expression"])), e) for e in entries]


conditions = compile_all(spec.get("matchConditions", []))
variables = compile_all(spec.get("variables", []))
validations = compile_all(spec["validations"])
if mode == "parse":
    print(f"{len(conditions) + len(variables) + len(validations)} expressions compile")
    sys.exit(0)


def admit(request, obj, old):
    """True: let through; otherwise the reason it is refused."""
    rules = spec["matchConstraints"]["resourceRules"]
    if not any(request["operation"] in r["operations"] and "nodes" in r["resources"] for r in rules):
        return True
    activation = {
        "request": celpy.json_to_cel(request),
        "object": celpy.json_to_cel(obj),
        "oldObject": celpy.json_to_cel(old),
    }
    try:
        for name, program, _ in conditions:
            matched = program.evaluate(activation)
            if isinstance(matched, celpy.CELEvalError):
                return f"error: match condition {name}: {matched}"
            if not matched:
                return True  # not the installer: the policy does not apply
        bound = celtypes.MapType({})
        activation["variables"] = bound
        for name, program, _ in variables:
            value = program.evaluate(activation)
            if isinstance(value, celpy.CELEvalError):
                return f"error: variable {name}: {value}"
            bound[celtypes.StringType(name)] = value
        for _, program, entry in validations:
            result = program.evaluate(activation)
            if isinstance(result, celpy.CELEvalError):
                return f"error: {result}"
            if not isinstance(result, celtypes.BoolType):
                return f"error: not a bool: {result!r}"
            if not result:
                return entry.get("message", entry["expression"])
    except celpy.CELEvalError as error:
        return f"error: {error}"
    return True


sa = [d for d in docs if d["kind"] == "ServiceAccount" and "helm.sh/hook" not in d["metadata"].get("annotations", {})]
assert len(sa) == 1
installer = f"system:serviceaccount:{sa[0]['metadata']['namespace']}:{sa[0]['metadata']['name']}"
LABEL = "bulwark.dev/installed"

NODE = {
    "apiVersion": "v1",
    "kind": "Node",
    "metadata": {
        "name": "node-a",
        "uid": "6f0c1d2e-0000-4000-8000-000000000001",
        "resourceVersion": "1000",
        "creationTimestamp": "2025-01-01T00:00:00Z",
        "labels": {"kubernetes.io/hostname": "node-a", "bulwark.dev/enabled": "true"},
        "annotations": {"node.alpha.kubernetes.io/ttl": "0"},
        "managedFields": [{"manager": "kubelet", "operation": "Update", "apiVersion": "v1"}],
    },
    "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]},
    "status": {"nodeInfo": {"containerRuntimeVersion": "containerd://1.7.24"}},
}


def token(node="node-a", **extra):
    info = {
        "authentication.kubernetes.io/pod-name": ["bulwark-installer-x7k2p"],
        "authentication.kubernetes.io/pod-uid": ["0d6c1a35-0000-4000-8000-000000000002"],
    }
    if node is not None:
        info["authentication.kubernetes.io/node-name"] = [node]
        info["authentication.kubernetes.io/node-uid"] = ["6f0c1d2e-0000-4000-8000-000000000001"]
    info.update(extra)
    return {
        "username": installer,
        "uid": "7e3b9c10-0000-4000-8000-000000000003",
        "groups": ["system:serviceaccounts", "system:authenticated"],
        "extra": info,
    }


def case(name, allowed, change, user=None, old=None):
    old = copy.deepcopy(old or NODE)
    new = copy.deepcopy(old)
    change(new)
    # What the API server changes on every write.
    new["metadata"]["resourceVersion"] = str(int(old["metadata"]["resourceVersion"]) + 1)
    new["metadata"]["managedFields"] = old["metadata"]["managedFields"] + [
        {"manager": "bulwark", "operation": "Update", "apiVersion": "v1"}
    ]
    request = {"operation": "UPDATE", "userInfo": user or token(),
               "resource": {"group": "", "version": "v1", "resource": "nodes"}}
    return name, allowed, request, new, old


def set_label(key, value):
    def change(node):
        labels = node["metadata"].setdefault("labels", {})
        if value is None:
            labels.pop(key, None)
        else:
            labels[key] = value
    return change


def nothing(node):
    pass


installed = copy.deepcopy(NODE)
installed["metadata"]["labels"][LABEL] = "true"
bare = copy.deepcopy(NODE)
del bare["metadata"]["labels"]
admin = {"username": "kubernetes-admin", "groups": ["kubeadm:cluster-admins", "system:authenticated"]}
cases = [
    case("own node, sets bulwark.dev/installed=true", True, set_label(LABEL, "true")),
    case("own node, takes bulwark.dev/installed off", True, set_label(LABEL, None), old=installed),
    case("own node, the label already there (no change)", True, nothing, old=installed),
    case("own node without any label, sets the label", True, set_label(LABEL, "true"), old=bare),
    case("another node's label", False, set_label(LABEL, "true"), user=token(node="node-b")),
    case("a token that names no node (before 1.30)", False, set_label(LABEL, "true"), user=token(node=None)),
    case("another label", False, set_label("node-role.kubernetes.io/control-plane", "")),
    case("another label changed alongside", False,
         lambda n: (set_label(LABEL, "true")(n), set_label("kubernetes.io/hostname", "evil")(n))),
    case("another bulwark.dev label (the nodeSelector's)", False, set_label("bulwark.dev/enabled", None)),
    case("bulwark.dev/installed=false", False, set_label(LABEL, "false")),
    case("every label taken off", False, lambda n: n["metadata"].pop("labels")),
    case("a taint", False,
         lambda n: n["spec"].setdefault("taints", []).append({"key": "x", "effect": "NoSchedule"})),
    case("unschedulable", False, lambda n: n["spec"].__setitem__("unschedulable", True)),
    case("an annotation", False, lambda n: n["metadata"]["annotations"].__setitem__("x", "y")),
    case("an owner reference", False, lambda n: n["metadata"].__setitem__("ownerReferences", [
        {"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": "u"}])),
    case("a finalizer", False, lambda n: n["metadata"].__setitem__("finalizers", ["example.com/x"])),
    case("someone else's taint (the policy is the installer's only)", True,
         lambda n: n["spec"].setdefault("taints", []).append({"key": "x", "effect": "NoSchedule"}), user=admin),
]
failed = 0
for name, allowed, request, new, old in cases:
    verdict = admit(request, new, old)
    # A refusal must come from a validation that is false, not from an error (which the API
    # server would also refuse, failurePolicy Fail, but for no reason this test checks).
    ok = (verdict is True) == allowed and not str(verdict).startswith("error:")
    failed += not ok
    shown = "allowed" if verdict is True else f"denied: {verdict}"
    print(f"{'ok' if ok else 'WRONG'}: {name}: {shown}")
print(f"{len(cases) - failed} of {len(cases)} node updates decided as expected")
sys.exit(1 if failed else 0)
