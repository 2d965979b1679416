#!/usr/bin/env bash
# `make test-cgroup2`: the CRI integration suite in a throwaway VM (tests/vm/run.sh), on
# cgroup v2 with kubelet's systemd driver (systemd as PID 1, pods in
# kubepods-burstable-pod<uid>.slice, containers in transient scopes), with its cgroupfs
# driver (busybox init, pods in cgroupfs directories), and with the systemd driver on
# systemd's hybrid cgroup v1 hierarchy, as older nodes run. (The host's own `make test`
# covers cgroup v1 with the cgroupfs driver.)
#
#   bash tests/vm/cgroup2.sh [full|ci]
#
# full (the default): the whole suite in each of the three. ci: a chosen few on each (see
# V2_SYSTEMD_TESTS and OTHER_TESTS below). The VM emulates its CPU (QEMU TCG), so one run of
# the whole suite takes 7 to 17 minutes here; CI cannot afford even one.
#
# The suite is built once, here on the host (the VM runs this machine's build output
# over a read-only share); the kernel and initramfs are cached in build/vm.
set -euo pipefail
cd "$(dirname "$0")/../.."

scope=${1:-full}
case $scope in
full | ci) ;;
*)
    echo "usage: bash tests/vm/cgroup2.sh [full|ci]" >&2
    exit 2
    ;;
esac

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

# CI's choice, per setup. On cgroup v2 with the systemd driver, what most production nodes
# run: the tests whose outcome depends on the hierarchy and driver (a pod's placement,
# kubelet's limits and the stats read back, an OOM score, the cleanup of a killed shim), a
# restricted pod's user, an OOM kill reported as OOMKilled (systemd removes the scope
# before the shim reads it), and the kernel's egress filter on the container's cgroup. On
# the other two: a pod's placement and cleanup, the limits and stats read back, and the
# egress filter (on the hybrid node, on the scope's twin in its cgroup2 hierarchy).
V2_SYSTEMD_TESTS=(
    a_wasm_pod_runs_and_its_output_reaches_the_log
    limits_fire_with_their_exit_code_and_reason
    running_containers_stop_report_stats_and_refuse_exec
    faults::a_killed_shim_leaves_no_workload_behind
    isolation::kubelets_oom_score_and_rlimits_reach_the_workload_as_runcs_process
    isolation::restricted_and_non_root_pods_run_as_their_user_with_nothing_else
    big_modules::a_workload_that_outgrows_its_container_ends_oomkilled_as_in_runc
    serving::outbound_requests_reach_granted_addresses_only
)
OTHER_TESTS=(
    a_wasm_pod_runs_and_its_output_reaches_the_log
    running_containers_stop_report_stats_and_refuse_exec
    serving::outbound_requests_reach_granted_addresses_only
)

# A run that hangs is killed long before CI's limit.
export BULWARK_VM_TIMEOUT=${BULWARK_VM_TIMEOUT:-1800}
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT

failed=()
for setup in "v2 systemd" "v2 cgroupfs" "v1 systemd"; do
    read -r version driver <<<"$setup"
    vm_args=(--env BULWARK_TEST_CGROUP_DRIVER --env RUST_LOG)
    [ "$driver" = systemd ] && vm_args=(--systemd "${vm_args[@]}")
    [ "$version" = v1 ] && vm_args=(--cgroup-v1 "${vm_args[@]}")
    # The node's own state (module cache, node config, registry) is the host's business:
    # `make test` covers it, the driver changes nothing there.
    tests=(--skip resilience::)
    what="the CRI suite"
    if [ "$scope" = ci ] && [ "$setup" = "v2 systemd" ]; then
        tests+=("${V2_SYSTEMD_TESTS[@]}")
        what="its cgroup, user and OOM tests"
    elif [ "$scope" = ci ]; then
        tests+=("${OTHER_TESTS[@]}")
        what="its placement and stats tests"
    elif [ "$version" = v1 ]; then
        # Serving pods are placed in their cgroup as every Wasm workload is: the two cgroup
        # v2 runs cover them.
        tests+=(--skip serving::)
    fi
    echo "== $what, cgroup $version, $driver driver" >&2
    log=$logs/${#failed[@]}-$version-$driver.log
    if ! BULWARK_TEST_CGROUP_DRIVER=$driver bash tests/vm/run.sh "${vm_args[@]}" -- \
        "$suite" --test-threads=1 "${tests[@]}" 2>&1 | tee "$log"; then
        failed+=("cgroup $version with the $driver driver")
        # Repeated at the end, where CI's summary shows it: with one test thread, a test
        # that hung is the last one named.
        {
            echo "== what failed on cgroup $version with the $driver driver:"
            grep -E -- '^test .*(FAILED|\.\.\. *$)|panicked at|^vm: |^Error' "$log" | tail -n 20
            sed -n '/^failures:$/,/^test result:/p' "$log" | tail -n 60
        } >"$logs/failure-${#failed[@]}"
    fi
done
if ((${#failed[@]})); then
    cat "$logs"/failure-* >&2
    echo "test-cgroup2: the CRI suite failed in the VM: ${failed[*]}" >&2
    exit 1
fi
echo "test-cgroup2 ($scope): passed on cgroup v2 with the systemd and cgroupfs drivers and on v1 with the systemd driver" >&2
