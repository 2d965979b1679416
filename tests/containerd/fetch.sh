#!/bin/sh
# Fetch one of the newer containerd releases Debian ships and unpack it into DEST.
#
#   tests/containerd/fetch.sh VERSION DEST
#
# VERSION is 1.7.24 (Debian trixie) or 2.1.9 (Debian sid); DEST gets the package's files, so
# the daemon ends up at DEST/usr/bin/containerd next to its containerd-shim-runc-v2.
#
# The system's apt sources are never touched: the package index, apt's state and its download
# cache live in a private directory (DEST.apt, removed afterwards), read through a sources list
# of our own. Running it again once DEST/usr/bin/containerd exists does nothing. Concurrent
# runs for one DEST (cargo runs tests in parallel) take turns on DEST.lock: the second finds the
# first one's result.
set -eu

if [ $# -ne 2 ]; then
	echo "usage: $0 VERSION DEST" >&2
	exit 2
fi
version=$1
dest=$2

case "$version" in
1.7.24) suite=trixie ;;
2.1.9) suite=sid ;;
*)
	echo "$0: unknown containerd version $version (known: 1.7.24, 2.1.9)" >&2
	exit 2
	;;
esac

if [ -x "$dest/usr/bin/containerd" ]; then
	exit 0
fi

dest=${dest%/}
mkdir -p "$(dirname "$dest")"
exec 9>"$dest.lock"
flock 9
if [ -x "$dest/usr/bin/containerd" ]; then
	exit 0
fi
# apt reads relative Dir:: options as relative to its own directories: use absolute paths.
work=$(realpath "$(mktemp -d "$dest.apt.XXXXXX")")
trap 'rm -rf "$work"' EXIT
trap 'exit 1' INT TERM
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/pkg"
echo "deb http://deb.debian.org/debian $suite main" >"$work/sources.list"

# apt_private TOOL ARGS...: run apt-get or apt-cache against the private state only.
apt_private() {
	tool=$1
	shift
	"$tool" -q \
		-o Dir::Etc::SourceList="$work/sources.list" \
		-o Dir::Etc::SourceParts=/dev/null \
		-o Dir::State::Lists="$work/lists" \
		-o Dir::Cache="$work/cache" \
		-o APT::Get::List-Cleanup=false \
		"$@"
}

apt_private apt-get update >"$work/update.log" 2>&1 || {
	cat "$work/update.log" >&2
	exit 1
}

# Debian versions carry a revision and sometimes an epoch (2.1.9~ds1-1): pick the one whose
# upstream part is VERSION.
full=$(apt_private apt-cache madison containerd 2>/dev/null |
	awk -F'|' -v v="$version" '{ gsub(/ /, "", $2); split($2, a, ":"); u = a[length(a)]; sub(/[~+-].*/, "", u); if (u == v) { print $2; exit } }')
if [ -z "$full" ]; then
	echo "$0: containerd $version is not in Debian $suite; available:" >&2
	apt_private apt-cache madison containerd >&2 || true
	exit 1
fi

(cd "$work/pkg" && apt_private apt-get download "containerd=$full") >"$work/download.log" 2>&1 || {
	cat "$work/download.log" >&2
	exit 1
}

rm -rf "$dest.partial"
mkdir -p "$dest.partial"
dpkg -x "$work"/pkg/containerd_*.deb "$dest.partial"
if [ ! -x "$dest.partial/usr/bin/containerd" ]; then
	echo "$0: the package has no usr/bin/containerd" >&2
	exit 1
fi
# Move into place only once complete, so an interrupted run never looks finished.
rm -rf "$dest"
mv "$dest.partial" "$dest"
echo "containerd $full unpacked into $dest"
