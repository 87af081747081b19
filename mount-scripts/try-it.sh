#!/usr/bin/env bash
# A one-command tour of imagecachefs for a machine without Nova; run it with --help first.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: try-it.sh [--keep]

A tour of imagecachefs in a scratch directory, no OpenStack needed (about 20 s).
It mounts imagecachefs over a scratch instances/_base with 5-second eviction
thresholds, then plays what Nova, libvirt and QEMU do with real qemu-img and
qemu-nbd, showing the status files at each step:

  1. Nova downloads an image to <sha1>.part (the file is "writing"),
     converts it with `qemu-img convert -t none` to .converted, renames it;
  2. Nova spawns an instance: a qcow2 overlay instances/<uuid>/disk whose
     backing file is the base ("referenced": it stays even with no VM running);
  3. a VM (qemu-nbd serving the overlay) runs: the base is "in-use";
  4. the VM stops: its idle age passes the threshold, but eviction is refused
     because the instance disk still names the base;
  5. Nova deletes the instance: the base is evicted in front of you.

Everything is removed at the end, on failure and on Ctrl-C too: the VM
process, the mount (imagecachefs unmount) and the scratch directory.

Needs: root, /dev/fuse, qemu-img and qemu-nbd (Debian: qemu-utils).
The binary: $IMAGECACHEFS_BIN if set, else this repository's
target/release/imagecachefs (built with `cargo build --release` when cargo is
available), else `imagecachefs` on PATH.

Options:
  --keep      keep the scratch directory (unmounted) for a look afterwards
  -h, --help  this text
EOF
}

keep=0
while [ $# -gt 0 ]; do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --keep) keep=1; shift ;;
        *) echo "try-it: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

die() {
    echo "try-it: $*" >&2
    exit 1
}

[ "$(id -u)" -eq 0 ] || die "needs root (it mounts a FUSE filesystem): sudo $0"
[ -c /dev/fuse ] || die "/dev/fuse is missing: modprobe fuse"
for tool in qemu-img qemu-nbd sha1sum; do
    command -v "$tool" >/dev/null || die "needs $tool on PATH (Debian: apt-get install qemu-utils coreutils)"
done

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -n "${IMAGECACHEFS_BIN:-}" ]; then
    bin=$IMAGECACHEFS_BIN
elif [ -f "$repo/Cargo.toml" ] && command -v cargo >/dev/null; then
    echo "try-it: cargo build --release (in $repo)"
    (cd "$repo" && cargo build --release --quiet)
    bin=$repo/target/release/imagecachefs
elif command -v imagecachefs >/dev/null; then
    bin=$(command -v imagecachefs)
else
    die "no imagecachefs binary: install cargo, or set IMAGECACHEFS_BIN"
fi
[ -x "$bin" ] || die "$bin is not an executable"

if [ -t 1 ]; then bold=$'\e[1m' dim=$'\e[2m' plain=$'\e[0m'; else bold='' dim='' plain=''; fi

scratch=$(mktemp -d /tmp/imagecachefs-try.XXXXXX)
instances=$scratch/instances
base=$instances/_base
mkdir -p "$base"
vm_pid=

mounted() {
    awk -v want="$base" '
        { split($0, halves, " - "); split(halves[1], f, " "); split(halves[2], g, " ") }
        f[5] == want { top = g[1] }
        END { exit !(top == "fuse.imagecachefs") }
    ' /proc/self/mountinfo
}

# The pid of the imagecachefs daemon serving $base (started with --background).
daemon_pid() {
    local f cmd
    for f in /proc/[0-9]*/cmdline; do
        cmd=$(tr '\0' ' ' 2>/dev/null <"$f") || continue
        case $cmd in
            "$bin mount $base "*) f=${f#/proc/}; echo "${f%/cmdline}"; return 0 ;;
        esac
    done
    return 1
}

stop_vm() {
    [ -n "$vm_pid" ] || return 0
    kill "$vm_pid" 2>/dev/null || true
    wait "$vm_pid" 2>/dev/null || true
    vm_pid=
}

cleanup() {
    local rc=$? pid i
    set +e
    trap - EXIT INT TERM
    cd /
    stop_vm
    pid=$(daemon_pid)
    mounted && "$bin" unmount "$base"
    # After the detach the daemon exits once nothing is open any more.
    for ((i = 0; i < 100; i++)); do
        if [ -z "$pid" ] || [ ! -e "/proc/$pid" ]; then break; fi
        sleep 0.1
    done
    if [ -n "$pid" ] && [ -e "/proc/$pid" ]; then
        echo "try-it: the daemon (pid $pid) did not exit after the unmount; stopping it" >&2
        kill "$pid" 2>/dev/null
    fi
    if [ "$rc" -ne 0 ] && [ -s "$scratch/imagecachefs.log" ]; then
        echo "try-it: failed; the end of the daemon's log:" >&2
        tail -n 20 "$scratch/imagecachefs.log" >&2
    fi
    if grep -qF " $scratch" /proc/self/mounts; then
        echo "try-it: something is still mounted under $scratch; not removing it" >&2
        rc=1
    elif [ "$keep" -eq 1 ]; then
        echo "try-it: kept $scratch"
    else
        rm -rf "$scratch"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

step() { printf '\n%s==> %s%s\n' "$bold" "$*" "$plain"; }
say() { printf '    %s\n' "$@"; }
# Runs a command, showing it first (paths relative to the scratch instances directory).
run() {
    printf '%s$ %s%s\n' "$dim" "$*" "$plain"
    "$@"
}
show() {
    printf '%s$ cat %s%s\n' "$dim" "$1" "$plain"
    sed 's/^/    /' "$1"
}
field() { sed -n "s/^$2: //p" "_base/.imagecache/images/$1" 2>/dev/null; }
# wait_for SECONDS WHAT COMMAND...: polls COMMAND every 0.1 s.
wait_for() {
    local limit=$1 what=$2 start=$SECONDS
    shift 2
    until "$@"; do
        [ $((SECONDS - start)) -lt "$limit" ] || die "timed out after $limit s waiting for $what"
        sleep 0.1
    done
}
state_is() { [ "$(field "$1" state)" = "$2" ]; }
sha1_done() { [[ $(field "$1" sha1) =~ ^[0-9a-f]{40}$ ]]; }
has_event() { grep -q "$1.*$2" _base/.imagecache/events; }
gone() { ! stat "_base/$1" >/dev/null 2>&1; }

cd "$instances"
printf '%sScratch instances directory: %s%s\n' "$bold" "$instances" "$plain"
printf 'Binary: %s\n' "$bin"

step "Mount imagecachefs over _base (eviction thresholds of 5 s instead of a day)"
run "$bin" mount "$base" --background \
    --original-min-age 5 --resized-min-age 5 --partial-min-age 5 \
    --log-file "$scratch/imagecachefs.log"
say "Nova, libvirt and QEMU keep using the same path; the status tree is _base/.imagecache/."
show _base/.imagecache/status
say "The cache is empty: the table is only its header."

# The "Glance image": 16 MiB with 4 MiB of data, as qcow2, outside the cache.
image_id=$(cat /proc/sys/kernel/random/uuid)
name=$(printf '%s' "$image_id" | sha1sum | cut -c1-40)
head -c 4M /dev/urandom >"$scratch/glance.raw"
truncate -s 16M "$scratch/glance.raw"
qemu-img convert -q -f raw -O qcow2 "$scratch/glance.raw" "$scratch/glance.qcow2"

step "1. Nova downloads image $image_id to _base/<sha1 of the id>.part"
exec {part}>"_base/$name.part"
cat "$scratch/glance.qcow2" >&"$part"
show "_base/.imagecache/images/$name.part"
say "Still open for writing (by this script's shell): \"writing\", never evicted."
exec {part}>&-
run qemu-img convert -t none -f qcow2 -O raw "_base/$name.part" "_base/$name.converted"
run rm "_base/$name.part"
run mv "_base/$name.converted" "_base/$name"
show "_base/.imagecache/images/$name"
say "Downloaded, converted to raw (O_DIRECT writes), renamed: \"idle\", nobody has it open;" \
    "it would be evicted at evicts_at, 5 s after its last use."

uuid=$(cat /proc/sys/kernel/random/uuid)
step "2. Nova spawns instance $uuid: a qcow2 overlay backed by the base"
run touch "_base/$name"
run mkdir "$uuid"
run qemu-img create -q -f qcow2 -F raw -b "$base/$name" "$uuid/disk"
wait_for 10 "the SHA-1 of $name" sha1_done "$name"
show "_base/.imagecache/images/$name"
say "\"referenced\": $uuid/disk names it as its backing file, so it stays even while no VM runs." \
    "The SHA-1 was computed in the background once the last writer closed the file."

step "3. The VM runs: qemu-nbd serves the instance disk (our stand-in for qemu-system)"
sock=$scratch/vm.sock
printf '%s$ qemu-nbd --persistent --read-only -f qcow2 -k %s %s &%s\n' "$dim" "$sock" "$uuid/disk" "$plain"
qemu-nbd --persistent --read-only -f qcow2 -k "$sock" "$uuid/disk" &
vm_pid=$!
wait_for 10 "qemu-nbd to open the base" state_is "$name" in-use
run qemu-img compare -f qcow2 "$scratch/glance.qcow2" "nbd+unix:///?socket=$sock"
show "_base/.imagecache/images/$name"
show _base/.imagecache/status
say "\"in-use\": refs counts the open handles, holders names the process that has it open."

step "4. The VM stops"
run kill "$vm_pid"
wait "$vm_pid" 2>/dev/null || true
vm_pid=
wait_for 10 "the base to be released" state_is "$name" referenced
show "_base/.imagecache/images/$name"
say "Nothing has it open, but the instance disk still needs it (a stopped VM restarts from it)." \
    "Waiting for its idle age to pass 5 s: the eviction is refused..."
wait_for 20 "the refused eviction" has_event eviction-refused "$name"
show _base/.imagecache/events
[ -e "_base/$name" ] || die "the base was evicted although $uuid/disk names it"

step "5. Nova deletes the instance"
run rm -r "$uuid"
say "Nothing needs the base any more: imagecachefs looks again shortly and evicts it."
started=$SECONDS
wait_for 30 "the eviction of $name" gone "$name"
say "stat _base/$name: No such file or directory (after $((SECONDS - started)) s)"
show _base/.imagecache/events
show _base/.imagecache/status
say "Gone from the cache directory itself, with an \"evicted\" event: nothing scanned the" \
    "directory, the eviction ran when the file's deadline came."

step "Unmount"
run "$bin" unmount "$base"
say "A lazy detach: files still open would be served until closed; nothing is open, so the daemon exits."
echo
echo "try-it: done; everything is cleaned up."
