#!/usr/bin/env bash
# `make test-cgroup2`: the CRI integration suite on a cgroup v2 node, twice, in a
# throwaway VM (tests/vm/run.sh): with kubelet's cgroupfs driver (busybox init, pods in
# cgroupfs directories) and with its systemd driver (systemd as PID 1, pods in
# kubepods-burstable-pod<uid>.slice, containers in transient scopes).
#
# The suite is built once, here on the host (the VM runs this machine's build output
# over a read-only share); the kernel and initramfs are cached in build/vm.
set -euo pipefail
cd "$(dirname "$0")/../.."

# The suite's test binary, from the same build `make test` uses (no rebuild).
suite=$(cargo test --release --workspace --test cri --no-run --message-format=json |
    python3 -c '
import json, sys
for line in sys.stdin:
    message = json.loads(line)
    if message.get("reason") == "compiler-artifact" and message["target"]["name"] == "cri" \
            and message.get("executable"):
        print(message["executable"])')
[ -x "$suite" ] || { echo "test-cgroup2: cannot find the CRI suite's test binary" >&2; exit 1; }

failed=()
for driver in cgroupfs systemd; do
    echo "== CRI suite, cgroup v2, $driver driver" >&2
    vm_args=(--env BULWARK_TEST_CGROUP_DRIVER --env RUST_LOG)
    [ "$driver" = systemd ] && vm_args=(--systemd "${vm_args[@]}")
    if ! BULWARK_TEST_CGROUP_DRIVER=$driver bash tests/vm/run.sh "${vm_args[@]}" -- \
        "$suite" --test-threads=1; then
        failed+=("$driver")
    fi
done
if ((${#failed[@]})); then
    echo "test-cgroup2: the CRI suite failed in the VM with the ${failed[*]} driver" >&2
    exit 1
fi
echo "test-cgroup2: the CRI suite passed on cgroup v2 with the cgroupfs and systemd drivers" >&2
