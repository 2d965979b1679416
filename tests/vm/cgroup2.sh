#!/usr/bin/env bash
# `make test-cgroup2`: the CRI integration suite in a throwaway VM (tests/vm/run.sh), three
# times: on cgroup v2 with kubelet's cgroupfs driver (busybox init, pods in cgroupfs
# directories) and with its systemd driver (systemd as PID 1, pods in
# kubepods-burstable-pod<uid>.slice, containers in transient scopes), and with the systemd
# driver on systemd's hybrid cgroup v1 hierarchy, as older nodes run. (The host's own
# `make test` covers cgroup v1 with the cgroupfs driver.)
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
for setup in "v2 cgroupfs" "v2 systemd" "v1 systemd"; do
    read -r version driver <<<"$setup"
    echo "== CRI suite, cgroup $version, $driver driver" >&2
    vm_args=(--env BULWARK_TEST_CGROUP_DRIVER --env RUST_LOG)
    [ "$driver" = systemd ] && vm_args=(--systemd "${vm_args[@]}")
    skip=()
    # Serving pods are placed in their cgroup as every Wasm workload is: the two cgroup v2
    # runs cover them, and CI's time is better spent elsewhere than on a third.
    [ "$version" = v1 ] && vm_args=(--cgroup-v1 "${vm_args[@]}") && skip=(--skip serving::)
    if ! BULWARK_TEST_CGROUP_DRIVER=$driver bash tests/vm/run.sh "${vm_args[@]}" -- \
        "$suite" --test-threads=1 "${skip[@]}"; then
        failed+=("cgroup $version with the $driver driver")
    fi
done
if ((${#failed[@]})); then
    echo "test-cgroup2: the CRI suite failed in the VM: ${failed[*]}" >&2
    exit 1
fi
echo "test-cgroup2: the CRI suite passed on cgroup v2 with the cgroupfs and systemd drivers, and on v1 with the systemd driver" >&2
