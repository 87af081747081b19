#!/usr/bin/env bash
# Installs what the tests drive, when it is missing (idempotent: a ready machine changes
# nothing): qemu tools, util-linux (unshare, setpriv), acl (setfacl, getfacl), strace (its
# fault injection slows a syscall of the daemon), python3 with prometheus_client (the
# metrics test parses the exposition with the Prometheus client's own parser), shellcheck (the
# mount scripts must pass it), logrotate and cargo-deb (tests/install.rs runs the package's
# logrotate snippet and builds the .deb), glusterfs server and client with iproute2 (the
# shared-storage tests run a one-brick volume in network namespaces). The README's test
# command runs it first:
#   tests/setup.sh && cargo test --no-fail-fast
set -euo pipefail

case ${1-} in
    -h | --help)
        sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
        exit 0 ;;
    '') ;;
    *) echo "setup: unknown argument $1 (see --help)" >&2; exit 2 ;;
esac

need=()
for tool in qemu-img qemu-io qemu-nbd qemu-storage-daemon; do
    command -v "$tool" >/dev/null || need+=(qemu-utils)
done
command -v unshare >/dev/null && command -v setpriv >/dev/null || need+=(util-linux)
command -v setfacl >/dev/null && command -v getfacl >/dev/null || need+=(acl)
command -v strace >/dev/null || need+=(strace)
# The system's python3 too: tests run scripts as `nobody`, who cannot run a per-user one.
command -v python3 >/dev/null && [ -x /usr/bin/python3 ] || need+=(python3)
command -v shellcheck >/dev/null || need+=(shellcheck)
# The package's logrotate snippet is run for real (tests/install.rs).
command -v logrotate >/dev/null || need+=(logrotate)
command -v ip >/dev/null || need+=(iproute2)
command -v glusterd >/dev/null && command -v gluster >/dev/null || need+=(glusterfs-server)
command -v glusterfs >/dev/null || need+=(glusterfs-client)
if ! command -v python3 >/dev/null || ! python3 -c 'import prometheus_client' 2>/dev/null; then
    need+=(python3-prometheus-client)
fi
if [ "${#need[@]}" -gt 0 ]; then
    mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
        echo "setup: missing ${need[*]}: install them (Debian package names; needs root and apt-get)" >&2
        exit 1
    fi
    echo "setup: installing ${need[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi
# Where Debian's package is too old or absent, the client from PyPI does as well.
python3 -c 'import prometheus_client' 2>/dev/null ||
    python3 -m pip install --quiet prometheus_client ||
    python3 -m pip install --quiet --break-system-packages prometheus_client
python3 -c 'import prometheus_client'
command -v shellcheck >/dev/null
# The Debian package is built with cargo-deb (packaging/build-deb.sh); crates.io has it.
if ! cargo deb --version >/dev/null 2>&1; then
    echo "setup: installing cargo-deb" >&2
    cargo install cargo-deb --locked --quiet
fi
command -v glusterd >/dev/null && command -v glusterfs >/dev/null
