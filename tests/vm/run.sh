#!/usr/bin/env bash
# Run one command inside a throwaway cgroup v2 VM (QEMU TCG) that shares this machine's
# root filesystem read-only, and exit with the command's exit code.
#
#   bash tests/vm/run.sh [--systemd [--cgroup-v1]] [--env NAME]... -- COMMAND [ARG...]
#
# This machine's cgroups are hybrid v1; production nodes are cgroup v2, so the project's
# integration tests also run in here. See tests/vm/README.md. Guest side: tests/vm/init.
#
# Exit status: COMMAND's, or 125 when the VM (or this script) failed before one was
# recorded: bad usage, boot failure, kernel panic, timeout.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: bash tests/vm/run.sh [--systemd [--cgroup-v1]] [--env NAME]... -- COMMAND [ARG...]

Boots a cgroup v2 VM on the host's root filesystem (read-only, with a tmpfs overlay)
and runs COMMAND as root in the project root. Its stdout and stderr stream to this
script's stdout and stderr; the script exits with its exit code (125: the VM failed).

  --systemd    boot systemd as PID 1 and run COMMAND as the oneshot service
               bulwark-vm.service (system bus up, cgroup /system.slice/bulwark-vm.service)
  --cgroup-v1  with --systemd: boot with systemd's hybrid hierarchy (v1 controllers, as
               on older nodes) instead of cgroup v2
  --env NAME   pass the host's NAME into COMMAND's environment (repeatable); it
               otherwise gets only PATH, HOME=/root, USER and LOGNAME

Environment: BULWARK_VM_TIMEOUT  seconds before the VM is killed (default 3600)
EOF
}

fail() {
    echo "vm: $*" >&2
    exit 125
}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
root=$(cd "$here/../.." && pwd -P)
cache=$root/build/vm

# Modules to insmod, in this order (plus whatever they depend on, found in modules.dep):
# virtio PCI transport, 9p over virtio, overlayfs; bridges and veth pairs for pod networks.
MODULES=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci
    9pnet 9pnet_virtio netfs fscache 9p overlay
    llc stp bridge veth)
# Loaded before systemd only: it mounts its automount points with autofs.
SYSTEMD_MODULES=(autofs4)
# Bumped when the initramfs layout changes in this script (the init file is hashed).
INITRAMFS_LAYOUT=2

systemd=0
unified=1
envs=()
while (($#)); do
    case $1 in
    --systemd) systemd=1 ;;
    --cgroup-v1) unified=0 ;;
    --env)
        (($# >= 2)) || fail "--env needs a NAME (see --help)"
        envs+=("$2")
        shift
        ;;
    --env=*) envs+=("${1#--env=}") ;;
    -h | --help)
        usage
        exit 0
        ;;
    --)
        shift
        break
        ;;
    *) fail "unknown argument: $1 (the command goes after --; see --help)" ;;
    esac
    shift
done
(($#)) || fail "no command given (see --help)"
((systemd || unified)) || fail "--cgroup-v1 needs --systemd (busybox init mounts cgroup v2 only)"
for name in "${envs[@]}"; do
    [[ $name =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || fail "--env: not a variable name: $name"
done
# env(1) would take a first word containing '=' for another variable.
[[ $1 != *=* ]] || fail "the command's first word must not contain '=': $1"

timeout_s=${BULWARK_VM_TIMEOUT:-3600}
[[ $timeout_s =~ ^[0-9]+$ && $timeout_s -gt 0 ]] ||
    fail "BULWARK_VM_TIMEOUT must be a positive number of seconds, not '$timeout_s'"

# Microseconds since the epoch, for the timings printed on stderr.
now_us() {
    local t=${EPOCHREALTIME/[.,]/}
    echo "$t"
}
seconds_since() {
    local us=$(($(now_us) - $1))
    printf '%d.%d' $((us / 1000000)) $((us % 1000000 / 100000))
}

apt_install() {
    echo "vm: installing $* (apt-get)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >&2 ||
        { apt-get update -q >&2 &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >&2; }
}

ensure_tools() {
    command -v qemu-system-x86_64 >/dev/null || apt_install qemu-system-x86 ||
        fail "cannot install qemu-system-x86"
    # The initramfs needs the static busybox; Debian's other busybox is dynamic.
    [[ $(dpkg-query -W -f='${Status}' busybox-static 2>/dev/null) == "install ok installed" ]] ||
        apt_install busybox-static || fail "cannot install busybox-static"
}

# Debian's stock kernel (the -cloud- one lacks 9p), fetched once into $cache/kernel:
#   vmlinuz, version, modules/ (the package's lib/modules/VERSION + a busybox depmod),
#   vmlinux (see extract_vmlinux).
# Kept until build/vm is removed, so runs stay reproducible and work offline.
ensure_kernel() {
    local kdir=$cache/kernel pkg tmp kver mods
    if [[ ! -s $kdir/vmlinuz || ! -s $kdir/version ]]; then
        pkg=$(apt-cache depends linux-image-amd64 2>/dev/null |
            awk '/Depends: linux-image-[0-9]/ { print $2; exit }') || true
        if [[ -z $pkg ]]; then
            apt-get update -q >&2 || true
            pkg=$(apt-cache depends linux-image-amd64 |
                awk '/Depends: linux-image-[0-9]/ { print $2; exit }') || true
        fi
        [[ -n $pkg ]] || fail "cannot tell which kernel package linux-image-amd64 names"
        echo "vm: fetching the kernel ($pkg) into $kdir" >&2
        rm -rf "$kdir" "$cache"/kernel.tmp.*
        tmp=$(mktemp -d "$cache/kernel.tmp.XXXXXX")
        chmod 755 "$tmp"
        (cd "$tmp" && apt-get -q -o APT::Sandbox::User=root download "$pkg" >&2) ||
            fail "apt-get download $pkg failed"
        dpkg -x "$tmp"/*.deb "$tmp/x"
        kver=$(find "$tmp/x/boot" -name 'vmlinuz-*' -printf '%f\n' | head -n1)
        kver=${kver#vmlinuz-}
        [[ -n $kver ]] || fail "no vmlinuz in $pkg"
        mods=$tmp/x/lib/modules/$kver
        [[ -d $mods ]] || mods=$tmp/x/usr/lib/modules/$kver
        [[ -d $mods ]] || fail "no modules for $kver in $pkg"
        mv "$tmp/x/boot/vmlinuz-$kver" "$tmp/vmlinuz"
        mv "$mods" "$tmp/modules"
        # The package leaves modules.dep to its postinst; we need it to resolve module
        # dependencies, and it lets `busybox modprobe` work inside the VM.
        mkdir -p "$tmp/depmod/lib/modules"
        ln -s ../../../modules "$tmp/depmod/lib/modules/$kver"
        busybox depmod -b "$tmp/depmod" "$kver" || fail "depmod failed"
        rm -rf "$tmp/x" "$tmp/depmod" "$tmp"/*.deb
        echo "$kver" >"$tmp/version"
        mv "$tmp" "$kdir"
    fi
    KVER=$(<"$kdir/version")
    KDIR=$kdir
    [[ -e $kdir/vmlinux || -e $kdir/no-pvh ]] || extract_vmlinux "$kdir"
    KIMAGE=$kdir/vmlinuz
    [[ -e $kdir/vmlinux ]] && KIMAGE=$kdir/vmlinux
    return 0
}

# Booting the uncompressed kernel through its PVH entry point saves ~3 s per boot: TCG
# is slow at the bzImage's own xz decompression. Same method as the kernel's
# scripts/extract-vmlinux; kept only if the ELF has the PVH note (XEN_ELFNOTE_PHYS32_ENTRY),
# else QEMU could not boot it and we stay with vmlinuz.
extract_vmlinux() {
    local kdir=$1 magic cmd off
    for magic in '\xfd7zXZ\x00:xz -dcq' '\x28\xb5\x2f\xfd:zstd -dcq' '\x1f\x8b\x08:gzip -dcq'; do
        cmd=${magic#*:}
        for off in $(LC_ALL=C grep -obUaP "${magic%%:*}" "$kdir/vmlinuz" | head -n3 | cut -d: -f1); do
            tail -c "+$((off + 1))" "$kdir/vmlinuz" | $cmd >"$kdir/vmlinux.tmp" 2>/dev/null || true
            if [[ $(head -c4 "$kdir/vmlinux.tmp" | od -An -c | tr -d ' ') == 177ELF ]] &&
                LC_ALL=C grep -qUaP '\x04\x00\x00\x00[\x04\x08]\x00\x00\x00\x12\x00\x00\x00Xen\x00' \
                    "$kdir/vmlinux.tmp"; then
                mv "$kdir/vmlinux.tmp" "$kdir/vmlinux"
                return 0
            fi
        done
    done
    rm -f "$kdir/vmlinux.tmp"
    echo "vm: no PVH-bootable vmlinux in $KVER's image; booting the compressed one" >&2
    : >"$kdir/no-pvh"
}

# Print the module file paths (relative to modules/) to load, dependencies first.
module_load_order() {
    local mods=$KDIR/modules
    declare -A seen=()
    visit() {
        local name=$1 rel deps dep
        # modules.dep names files, e.g. "kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko ...".
        rel=$(awk -F: -v n="$name" '{ f = $1; sub(/.*\//, "", f); sub(/\.ko(\.[a-z]+)?$/, "", f)
            gsub(/-/, "_", f) } f == n { print $1; exit }' "$mods/modules.dep")
        if [[ -z $rel ]]; then
            if grep -Eq "/${name//_/[-_]}\.ko$" "$mods/modules.builtin"; then
                echo "vm: module $name is built into $KVER" >&2
            else
                echo "vm: warning: module $name not found for $KVER (skipped)" >&2
            fi
            return 0
        fi
        [[ -z ${seen[$rel]:-} ]] || return 0
        seen[$rel]=1
        deps=$(awk -F': *' -v r="$rel" '$1 == r { print $2; exit }' "$mods/modules.dep")
        for dep in $deps; do
            dep=${dep##*/}
            dep=${dep%%.ko*}
            visit "${dep//-/_}"
        done
        echo "$rel"
    }
    local m
    for m in "$@"; do visit "$m"; done
}

# The initramfs: static busybox, tests/vm/init, the modules (decompressed: busybox
# insmod reads plain .ko). Rebuilt when any input changes.
ensure_initramfs() {
    local out=$cache/initramfs.cpio stamp rels srels rel stage f base order
    mapfile -t rels < <(module_load_order "${MODULES[@]}")
    mapfile -t srels < <(module_load_order "${SYSTEMD_MODULES[@]}")
    stamp=$({
        echo "layout $INITRAMFS_LAYOUT kernel $KVER"
        sha256sum "$here/init" /bin/busybox | cut -d' ' -f1
        printf '%s\n' "${rels[@]}" -- "${srels[@]}"
    } | sha256sum | cut -d' ' -f1)
    if [[ -s $out && $(cat "$out.stamp" 2>/dev/null) == "$stamp" ]]; then
        return 0
    fi
    echo "vm: building the initramfs" >&2
    rm -rf "$cache"/initramfs.tmp.*
    stage=$(mktemp -d "$cache/initramfs.tmp.XXXXXX")
    mkdir -p "$stage"/{bin,dev,proc,sys,lower,rw,newroot,io,modules,vmbin/bin}
    cp /bin/busybox "$stage/bin/busybox"
    ln -s busybox "$stage/bin/sh"
    # What init copies to the guest's /run/bulwark-vm: busybox and its applets as
    # relative links (valid after switch_root), made here: one `ln` per applet at boot
    # costs seconds under TCG.
    cp /bin/busybox "$stage/vmbin/busybox"
    for applet in $(busybox --list); do ln -s ../busybox "$stage/vmbin/bin/$applet"; done
    install -m 0755 "$here/init" "$stage/init"
    # So the kernel has a console for /init before devtmpfs is mounted (root only;
    # init reopens /dev/console anyway).
    mknod -m 600 "$stage/dev/console" c 5 1 2>/dev/null || true
    : >"$stage/modules/order"
    : >"$stage/modules/order.systemd"
    order=$stage/modules/order
    for rel in "${rels[@]}" -- "${srels[@]}"; do
        if [[ $rel == -- ]]; then
            order=$stage/modules/order.systemd
            continue
        fi
        f=$KDIR/modules/$rel
        base=${rel##*/}
        base=${base%%.ko*}
        case $f in
        *.ko.xz) xz -dc "$f" >"$stage/modules/$base.ko" ;;
        *.ko.zst) zstd -qdc "$f" >"$stage/modules/$base.ko" ;;
        *.ko.gz) gzip -dc "$f" >"$stage/modules/$base.ko" ;;
        *) cp "$f" "$stage/modules/$base.ko" ;;
        esac
        echo "$base" >>"$order"
    done
    # Uncompressed: a few MB that the kernel unpacks faster than it would inflate them.
    (cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | busybox cpio -o -H newc 2>/dev/null) \
        >"$out.tmp"
    mv "$out.tmp" "$out"
    echo "$stamp" >"$out.stamp"
    rm -rf "$stage"
}

# Quote for a busybox ash `.` script: single quotes, with embedded ' as '\''.
sh_quote() {
    printf "'%s'" "${1//\'/\'\\\'\'}"
}

# ---------------------------------------------------------------------------------------
mkdir -p "$cache"
# A real path: the guest finds the kernel's modules here, and a symlink pointing at an
# absolute path would not resolve from the initramfs.
cache=$(cd "$cache" && pwd -P)
ensure_tools
# One preparer at a time: parallel runs share the kernel and the initramfs.
exec 9>"$cache/.lock"
flock 9
ensure_kernel
ensure_initramfs
# Per-run directories left by a run that was killed outright (SIGKILL: no trap ran).
for old in "$cache"/run.*; do
    [[ -d $old ]] || continue
    pid=$(cat "$old/pid" 2>/dev/null) || pid=
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || rm -rf "$old"
done
run=$(mktemp -d "$cache/run.XXXXXX")
echo $$ >"$run/pid"
exec 9>&-

io=$run/io # the guest's run share; the console fifo stays outside it
mkdir "$io"
qemu_pid=
reader_pid=
cleanup() {
    trap - EXIT INT TERM HUP
    if [[ -n $qemu_pid ]] && kill -0 "$qemu_pid" 2>/dev/null; then
        kill -TERM "$qemu_pid" 2>/dev/null || true # timeout(1): passes it on to qemu
        wait "$qemu_pid" 2>/dev/null || true
    fi
    if [[ -n $reader_pid ]] && kill -0 "$reader_pid" 2>/dev/null; then
        kill "$reader_pid" 2>/dev/null || true
        wait "$reader_pid" 2>/dev/null || true
    fi
    rm -rf "$run"
}
trap cleanup EXIT
trap 'echo "vm: interrupted" >&2; exit 130' INT
trap 'echo "vm: terminated" >&2; exit 143' TERM HUP

mode=plain
((systemd)) && mode=systemd
{
    echo "MODE=$mode"
    echo "PROJECT_ROOT=$(sh_quote "$root")"
    echo "KMODS=$(sh_quote "$KDIR/modules")"
    echo "HOSTNAME_VM=bulwark-vm"
} >"$io/config"

guest_path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# job.sh runs under the host's bash inside the VM, so bash's own %q quoting round-trips.
{
    echo '#!/bin/bash'
    # The guest's own PATH leads to busybox applets: find env (and through it the
    # command) on the usual PATH instead.
    echo "export PATH=$guest_path"
    printf 'cd -- %q || exit 125\n' "$root"
    printf 'exec env -i'
    printf ' %q' "PATH=$guest_path" HOME=/root USER=root LOGNAME=root
    for name in "${envs[@]}"; do
        [[ -v $name ]] && printf ' %q' "$name=${!name}"
    done
    printf ' %q' "$@"
    echo
} >"$io/job.sh"

append="console=ttyS0 panic=-1"
# BULWARK_VM_DEBUG=1: the kernel's messages and timestamped init steps, to see where
# boot time goes.
if [[ ${BULWARK_VM_DEBUG:-} == 1 ]]; then
    append+=" bulwark_vm.debug=1"
else
    append+=" quiet loglevel=3"
fi
# A test VM needs no Spectre/Meltdown defences, and under TCG they are costly
# (page-table isolation flushes the emulated TLB on every system call).
append+=" mitigations=off"
# The kernel rejects TCG's TSC at boot and falls back to the HPET, whose every read is an
# emulated MMIO access: Go programs (containerd, runc) read the clock constantly and ran
# 1.5-4x slower. TCG's TSC derives from the host's monotonic clock: it is reliable.
append+=" tsc=reliable clocksource=tsc"
if ((systemd)); then
    # fstab=no: the host's /etc/fstab names its own disks, which the VM lacks.
    append+=" systemd.unified_cgroup_hierarchy=$unified systemd.hostname=bulwark-vm fstab=no"
    append+=" systemd.show_status=error"
fi

# Extra kernel parameters, for experiments (e.g. "initcall_debug").
append+=${BULWARK_VM_KERNEL_ARGS:+ $BULWARK_VM_KERNEL_ARGS}

qemu_escape() { echo "${1//,/,,}"; } # qemu option values double their commas

qemu=(qemu-system-x86_64 -accel tcg -cpu max -smp 2 -m 6144
    -nographic -nodefaults -no-reboot
    -kernel "$KIMAGE" -initrd "$cache/initramfs.cpio" -append "$append"
    -virtfs local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap
    -virtfs "local,path=$(qemu_escape "$io"),mount_tag=run,security_model=none,multidevs=remap"
    # ttyS0: console (kernel, init, systemd, the command's stderr) -> fifo -> our stderr.
    -chardev "file,id=console,path=$(qemu_escape "$run/console")" -serial chardev:console
    # ttyS1: the command's stdout -> qemu's stdout, which is ours.
    -chardev stdio,id=out,signal=off -serial chardev:out)
# qboot (from qemu-system-data) goes straight to the kernel: faster than SeaBIOS, and it
# prints no banner or escape sequences on the console.
qboot=/usr/share/qemu/qboot.rom
[[ -r $qboot ]] && qemu+=(-bios "$qboot")

# Copies the console to stderr without the serial line's CRs, and turns the guest's
# ready marker into the boot time.
console_reader() {
    local t0=$1 line
    while IFS= read -r line || [[ -n $line ]]; do
        line=${line%$'\r'}
        if [[ $line == *'@@bulwark-vm@@ ready'* ]]; then
            echo "vm: booted in $(seconds_since "$t0") s" >&2
            continue
        fi
        # The kernel's last word, printed even when quiet; our summary follows.
        [[ $line =~ ^\[\ *[0-9.]+\]\ reboot:\ Power\ down$ ]] && continue
        printf '%s\n' "$line" >&2
    done
}

mkfifo "$run/console"
# Hold the fifo open read-write ourselves until qemu is gone: the reader then neither
# blocks forever if qemu dies before opening it, nor sees EOF before qemu opens it.
exec 3<>"$run/console"
t0=$(now_us)
console_reader "$t0" <"$run/console" 3>&- &
reader_pid=$!
echo "vm: starting ($mode, timeout ${timeout_s} s)" >&2
timeout -k 10 "$timeout_s" "${qemu[@]}" </dev/null 3>&- &
qemu_pid=$!
qemu_rc=0
wait "$qemu_pid" || qemu_rc=$?
qemu_pid=
exec 3>&-
wait "$reader_pid" || true
reader_pid=

total=$(seconds_since "$t0")
if [[ -s $io/exit_code ]]; then
    rc=$(<"$io/exit_code")
    echo "vm: command exited $rc after $(cat "$io/duration" 2>/dev/null || echo '?') s" \
        "(total ${total} s)" >&2
    exit "$rc"
fi
if ((qemu_rc == 124)); then
    echo "vm: timed out after ${timeout_s} s (BULWARK_VM_TIMEOUT); qemu killed, no exit code" >&2
else
    echo "vm: the VM stopped without recording an exit code (qemu status $qemu_rc," \
        "after ${total} s): boot failure, kernel panic or crash; see the console above" >&2
fi
exit 125
