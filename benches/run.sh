#!/usr/bin/env bash
# benches/run.sh — data-path benchmark of imagecachefs against native, bindfs and mergerfs.
#
# Usage:  sudo benches/run.sh [options]          (root: it mounts, and drops the page cache)
#
#   --quick            smoke run: 1 round, 2 s runs, 256 MiB file; prints the table but writes
#                      docs/PERFORMANCE.md only when --out is given
#   --rounds N         rounds per workload and configuration (default 3)
#   --runtime SECS     length of each timed fio run (default 5)
#   --size SIZE        test file size, fio/numfmt style: 256M, 1G, 1GiB (default 1G)
#   --dir DIR          a scratch directory is made under DIR and removed at the end
#                      (default /var/tmp; must be a real disk filesystem, never tmpfs)
#   --configs LIST     comma list among native,icfs,bindfs,mergerfs (default: all four)
#   --groups LIST      comma list of benchmark groups (default: fio_data)
#   --workloads LIST   comma list of fio workload ids to run (default: all; ids in the table
#                      FIO_WORKLOADS below, e.g. randread-4k-direct-qd32,seqread-1m-cold)
#   --out FILE         Markdown report (default docs/PERFORMANCE.md; "-" = print only)
#   --icfs-opts STR    extra options for `imagecachefs mount` (default: none)
#   --bindfs-opts STR  options for bindfs (default: none, i.e. `bindfs SRC MNT`)
#   --mergerfs-opts STR  options for mergerfs (default: -o cache.files=off)
#   --no-install       do not apt-get install missing tools
#   --no-build         do not run `cargo build --release`
#   --keep             keep the scratch directory (fio JSON, daemon logs)
#   --check            exit 3 when an imagecachefs target is missed
#   -h, --help         this text
#
# What it does: installs fio/bindfs/mergerfs if missing (apt-get update once, then install),
# builds target/release/imagecachefs, writes a test file of random data (and a second file that
# the write workload overwrites) into SCRATCH/_base, and runs every fio workload on the same
# file in each configuration:
#   native    SCRATCH/_base itself
#   icfs      imagecachefs mounted over SCRATCH/_base (source = mount point), foreground daemon
#   bindfs    bindfs SCRATCH/_base SCRATCH/mnt-bindfs      (bindfs defaults)
#   mergerfs  mergerfs -o cache.files=off SCRATCH/_base SCRATCH/mnt-mergerfs
# Configurations are interleaved (for each workload: round 1 native, icfs, bindfs, mergerfs;
# round 2 icfs, bindfs, mergerfs, native; ...), and every run gets a fresh mount that is taken
# down right after it, so a slow minute on this shared 2-core VM hits all configurations alike.
# Medians per workload and configuration, their ratio to native, and whether the imagecachefs
# targets hold (every read pattern >= 0.97x native, sequential write >= 0.90x native) are
# printed and written as Markdown.
#
# Every mount and daemon it starts is taken down on exit, error, Ctrl-C or SIGTERM; it checks
# /proc/mounts at the end and fails loudly if a FUSE mount of its scratch area is left.
#
# Adding a benchmark group (metadata, daemon CPU/RSS, ...): write `group_NAME`, which calls
# `run_interleaved ID LABEL UNIT TARGET MEASURE_FN` once per workload; MEASURE_FN is called with
# (ID CONFIG DIR ROUND) once the configuration is mounted, DIR being the directory that holds
# the test files in that configuration and $CUR_DAEMON_PID the FUSE daemon's pid (empty for
# native); it runs in the script's own shell, prints one number on stdout (or fails), and sets
# FIO_PID while a child runs so that Ctrl-C stops it. Add NAME to DEFAULT_GROUPS or --groups.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/.." && pwd)
BIN="$REPO_DIR/target/release/imagecachefs"

ALL_CONFIGS=(native icfs bindfs mergerfs)
DEFAULT_GROUPS=fio_data

# Options (empty = not given; defaults filled in after parsing, so --quick and explicit flags mix).
OPT_ROUNDS='' OPT_RUNTIME='' OPT_SIZE='' OPT_OUT='' QUICK=0
BASE_DIR=/var/tmp
CONFIGS_CSV=$(IFS=,; echo "${ALL_CONFIGS[*]}")
GROUPS_CSV=$DEFAULT_GROUPS
WORKLOADS_CSV=''
ICFS_OPTS='' BINDFS_OPTS='' MERGERFS_OPTS='-o cache.files=off'
DO_INSTALL=1 DO_BUILD=1 KEEP=0 CHECK=0

# Run state, read by cleanup().
SCRATCH=''            # the scratch directory this run made
SRC=''                # SCRATCH/_base: the cache directory, also imagecachefs's mount point
RESULTS=''            # TSV of every measurement
CUR_CONFIG=''         # configuration currently mounted ('' = none)
CUR_MNT=''            # its mount point
CUR_DAEMON_PID=''     # its FUSE daemon (started by us)
FIO_PID=''            # the fio currently running (started by us)

log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { printf 'benches/run.sh: error: %s\n' "$*" >&2; exit 1; }

usage() { sed -n '2,/^set -euo pipefail$/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

parse_args() {
    while (($#)); do
        case $1 in
            --quick) QUICK=1 ;;
            --rounds) OPT_ROUNDS=${2:?--rounds needs a value}; shift ;;
            --runtime) OPT_RUNTIME=${2:?--runtime needs a value}; shift ;;
            --size) OPT_SIZE=${2:?--size needs a value}; shift ;;
            --dir) BASE_DIR=${2:?--dir needs a value}; shift ;;
            --configs) CONFIGS_CSV=${2:?--configs needs a value}; shift ;;
            --groups) GROUPS_CSV=${2:?--groups needs a value}; shift ;;
            --workloads) WORKLOADS_CSV=${2:?--workloads needs a value}; shift ;;
            --out) OPT_OUT=${2:?--out needs a value}; shift ;;
            --icfs-opts) ICFS_OPTS=${2?}; shift ;;
            --bindfs-opts) BINDFS_OPTS=${2?}; shift ;;
            --mergerfs-opts) MERGERFS_OPTS=${2?}; shift ;;
            --no-install) DO_INSTALL=0 ;;
            --no-build) DO_BUILD=0 ;;
            --keep) KEEP=1 ;;
            --check) CHECK=1 ;;
            -h|--help) usage; exit 0 ;;
            *) die "unknown argument '$1' (see --help)" ;;
        esac
        shift
    done
    if ((QUICK)); then
        ROUNDS=${OPT_ROUNDS:-1} RUNTIME=${OPT_RUNTIME:-2} SIZE=${OPT_SIZE:-256M} OUT=${OPT_OUT:--}
    else
        ROUNDS=${OPT_ROUNDS:-3} RUNTIME=${OPT_RUNTIME:-5} SIZE=${OPT_SIZE:-1G}
        OUT=${OPT_OUT:-$REPO_DIR/docs/PERFORMANCE.md}
    fi
    [[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "--rounds must be a positive integer, not '$ROUNDS'"
    [[ $RUNTIME =~ ^[1-9][0-9]*$ ]] || die "--runtime must be a positive integer, not '$RUNTIME'"
    SIZE_BYTES=$(numfmt --from=iec "${SIZE%iB}" 2>/dev/null) || die "bad --size '$SIZE'"
    ((SIZE_BYTES >= 16 * 1048576 && SIZE_BYTES % 1048576 == 0)) \
        || die "--size must be a whole number of MiB, at least 16M"
    IFS=, read -r -a CONFIGS <<<"$CONFIGS_CSV"
    local c
    for c in "${CONFIGS[@]}"; do
        [[ " ${ALL_CONFIGS[*]} " == *" $c "* ]] || die "unknown configuration '$c'"
    done
    [[ " ${CONFIGS[*]} " == *" native "* ]] || die "--configs must include native (ratios are to native)"
    IFS=, read -r -a BENCH_GROUPS <<<"$GROUPS_CSV"
    for c in "${BENCH_GROUPS[@]}"; do
        declare -F "group_$c" >/dev/null || die "unknown benchmark group '$c'"
    done
    local ws
    IFS=, read -r -a ws <<<"$WORKLOADS_CSV"
    for c in "${ws[@]}"; do
        fio_args "$c" >/dev/null || die "unknown fio workload '$c'"
    done
}

# ---------------------------------------------------------------------------------------------
# Setup: tools, binary, scratch area, test files
# ---------------------------------------------------------------------------------------------

install_tools() {
    local missing=() t
    for t in fio bindfs mergerfs; do command -v "$t" >/dev/null || missing+=("$t"); done
    command -v python3 >/dev/null || missing+=(python3)
    ((${#missing[@]})) || return 0
    ((DO_INSTALL)) || die "missing tools: ${missing[*]} (run without --no-install)"
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

build_binary() {
    if ((DO_BUILD)); then
        log "cargo build --release"
        (cd "$REPO_DIR" && cargo build --release --quiet) || die "cargo build --release failed"
    fi
    if [[ " ${CONFIGS[*]} " == *" icfs "* ]]; then
        [[ -x $BIN ]] || die "$BIN is missing (build it, or drop --no-build)"
    fi
}

make_scratch() {
    [[ -d $BASE_DIR ]] || die "--dir $BASE_DIR is not a directory"
    local fstype
    fstype=$(stat -f -c %T "$BASE_DIR")
    case $fstype in
        tmpfs|ramfs|fuse*|overlayfs) die "--dir $BASE_DIR is on $fstype; use a directory on the real disk" ;;
    esac
    SCRATCH=$(mktemp -d "$BASE_DIR/icfs-bench.XXXXXX")
    [[ $SCRATCH != *[[:space:]]* ]] || die "scratch path must not contain whitespace: $SCRATCH"
    SRC=$SCRATCH/_base
    RESULTS=$SCRATCH/results.tsv
    mkdir -p "$SRC" "$SCRATCH/mnt-bindfs" "$SCRATCH/mnt-mergerfs" "$SCRATCH/fio" "$SCRATCH/logs"
    : >"$RESULTS"
    log "scratch area $SCRATCH ($fstype)"
}

# Test files are named like Nova base images (40 hex digits: kind "original", 24 h idle age).
READ_FILE=5e7c0ba5e3a7c1d0f5f61b7c2d2f8e4c9a1b0d31
WRITE_FILE=8d1f4c2b6a0e9f7d3c5b1a2e4f6d8c0b9a7e5f13

make_test_files() {
    local mib=$((SIZE_BYTES / 1048576))
    log "writing test files: 2 x $SIZE (random data to read, zeros to overwrite)"
    dd if=/dev/urandom of="$SRC/$READ_FILE" bs=1M count="$mib" conv=fsync status=none
    dd if=/dev/zero of="$SRC/$WRITE_FILE" bs=1M count="$mib" conv=fsync status=none
}

# ---------------------------------------------------------------------------------------------
# Mounts: one configuration at a time, each mount owned by a daemon pid we started
# ---------------------------------------------------------------------------------------------

# Counts the FUSE mounts whose mount point is exactly $1.
fuse_mounts_at() {
    awk -v p="$1" '{ for (i = 7; $i != "-"; i++); if ($5 == p && $(i + 1) ~ /^fuse/) n++ }
                   END { print n + 0 }' /proc/self/mountinfo
}

# Waits until a FUSE mount sits on $1 or the daemon $2 dies; $3 = its log.
wait_mounted() {
    local mnt=$1 pid=$2 logf=$3 i
    for ((i = 0; i < 300; i++)); do
        (($(fuse_mounts_at "$mnt") > 0)) && return 0
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 20 "$logf" >&2 || true
            die "$CUR_CONFIG daemon exited before mounting $mnt (log above: $logf)"
        fi
        sleep 0.1
    done
    tail -n 20 "$logf" >&2 || true
    die "$CUR_CONFIG did not mount $mnt within 30 s (log: $logf)"
}

# Mounts configuration $1 (a fresh mount) and sets CUR_*; prints the directory holding the files.
mount_config() {
    local config=$1 logf opts=()
    CUR_CONFIG=$config
    logf=$SCRATCH/logs/$config.log
    case $config in
        native) CUR_MNT='' CUR_DAEMON_PID='' ; return 0 ;;
        icfs)
            read -r -a opts <<<"$ICFS_OPTS"
            CUR_MNT=$SRC
            "$BIN" mount "$SRC" "${opts[@]}" >>"$logf" 2>&1 &
            ;;
        bindfs)
            read -r -a opts <<<"$BINDFS_OPTS"
            CUR_MNT=$SCRATCH/mnt-bindfs
            bindfs -f "${opts[@]}" "$SRC" "$CUR_MNT" >>"$logf" 2>&1 &
            ;;
        mergerfs)
            read -r -a opts <<<"$MERGERFS_OPTS"
            CUR_MNT=$SCRATCH/mnt-mergerfs
            mergerfs -f "${opts[@]}" "$SRC" "$CUR_MNT" >>"$logf" 2>&1 &
            ;;
    esac
    CUR_DAEMON_PID=$!
    wait_mounted "$CUR_MNT" "$CUR_DAEMON_PID" "$logf"
}

# The directory where configuration $1 shows the test files.
config_dir() {
    case $1 in
        native|icfs) echo "$SRC" ;;
        bindfs) echo "$SCRATCH/mnt-bindfs" ;;
        mergerfs) echo "$SCRATCH/mnt-mergerfs" ;;
    esac
}

# Waits up to $2 tenths of a second for pid $1 to exit; returns 1 if it is still alive.
wait_pid_gone() {
    local pid=$1 tenths=$2 i
    for ((i = 0; i < tenths; i++)); do
        kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
        sleep 0.1
    done
    return 1
}

# Takes down the current configuration's mount and waits for its daemon to exit.
# Never fails: it is also the cleanup path.
unmount_config() {
    local mnt=$CUR_MNT pid=$CUR_DAEMON_PID t0=${EPOCHREALTIME/./} ms
    if [[ -n $mnt ]] && (($(fuse_mounts_at "$mnt") > 0)); then
        if [[ $CUR_CONFIG == icfs ]]; then
            "$BIN" unmount "$mnt" >>"$SCRATCH/logs/icfs.log" 2>&1 \
                || { log "imagecachefs unmount failed; detaching with umount -l"; umount -l "$mnt" || true; }
        else
            umount "$mnt" 2>/dev/null || umount -l "$mnt" || true
        fi
    fi
    if [[ -n $pid ]] && ! wait_pid_gone "$pid" 300; then
        log "$CUR_CONFIG daemon $pid still running 30 s after unmount: SIGTERM"
        kill -TERM "$pid" 2>/dev/null || true
        if ! wait_pid_gone "$pid" 50; then
            log "$CUR_CONFIG daemon $pid ignores SIGTERM: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            wait_pid_gone "$pid" 50 || true
        fi
    fi
    ms=$(((${EPOCHREALTIME/./} - t0) / 1000))
    ((ms < 2000)) || log "$CUR_CONFIG: unmount and daemon exit took $ms ms"
    # A killed daemon leaves its mount behind (ENOTCONN): detach it.
    if [[ -n $mnt ]]; then
        while (($(fuse_mounts_at "$mnt") > 0)); do umount -l "$mnt" || break; done
    fi
    CUR_CONFIG='' CUR_MNT='' CUR_DAEMON_PID=''
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    if [[ -n $FIO_PID ]]; then
        kill -TERM "$FIO_PID" 2>/dev/null
        wait_pid_gone "$FIO_PID" 100 || kill -KILL "$FIO_PID" 2>/dev/null
        FIO_PID=''
    fi
    [[ -n $CUR_CONFIG ]] && unmount_config
    if [[ -n $SCRATCH ]]; then
        local left
        left=$(grep fuse /proc/mounts | grep -F " $SCRATCH/") || true
        if [[ -n $left ]]; then
            printf 'benches/run.sh: error: FUSE mounts left behind:\n%s\n' "$left" >&2
            rc=1
        elif ((KEEP)); then
            log "kept $SCRATCH"
        else
            rm -rf --one-file-system "$SCRATCH"
        fi
    fi
    exit "$rc"
}

# ---------------------------------------------------------------------------------------------
# The interleaving runner, shared by every benchmark group
# ---------------------------------------------------------------------------------------------

# run_interleaved ID LABEL UNIT TARGET MEASURE_FN
#   UNIT: IOPS | MiB/s | anything (higher is better); TARGET: minimum icfs/native ratio or '-'.
# For each round, for each configuration: mount, MEASURE_FN ID CONFIG DIR ROUND, unmount.
# Round r starts at configuration r (native, icfs, bindfs, mergerfs; then icfs, bindfs, mergerfs,
# native; ...) so that no configuration always runs right after another (host cache, writeback).
# A failed measurement is recorded as "error" and the run goes on.
run_interleaved() {
    local id=$1 label=$2 unit=$3 target=$4 fn=$5 round config dir value i n=${#CONFIGS[@]}
    for ((round = 1; round <= ROUNDS; round++)); do
        for ((i = 0; i < n; i++)); do
            config=${CONFIGS[(round - 1 + i) % n]}
            mount_config "$config"
            dir=$(config_dir "$config")
            # Not in $(...): the measurement must run in this shell so that cleanup() sees FIO_PID.
            if "$fn" "$id" "$config" "$dir" "$round" >"$SCRATCH/value"; then
                value=$(<"$SCRATCH/value")
                log "$(printf '%-22s round %d  %-8s %12s %s' "$id" "$round" "$config" "$value" "$unit")"
            else
                value=error
                log "$id round $round $config: FAILED"
            fi
            unmount_config
            printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
                "$id" "$label" "$unit" "$target" "$config" "$round" "$value" >>"$RESULTS"
        done
    done
}

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

# Reads $1 once through the configuration's path so that the page cache is hot.
warm_up() { dd if="$1" of=/dev/null bs=1M status=none; }

# ---------------------------------------------------------------------------------------------
# Group fio_data: the data path (fio, one job, same file in every configuration)
# ---------------------------------------------------------------------------------------------

# Workload table: ID|LABEL|UNIT|TARGET
FIO_WORKLOADS=(
    "randread-4k-direct-qd1|4 KiB random read, O_DIRECT, libaio QD1|IOPS|0.97"
    "randread-4k-direct-qd32|4 KiB random read, O_DIRECT, libaio QD32|IOPS|0.97"
    "seqread-1m-cold|1 MiB sequential read, buffered, cold cache|MiB/s|0.97"
    "seqread-1m-warm|1 MiB sequential read, buffered, warm cache|MiB/s|0.97"
    "randread-4k-warm|4 KiB random read, buffered, warm cache|IOPS|0.97"
    "seqwrite-1m-fsync|1 MiB sequential write, buffered, fsync at end|MiB/s|0.90"
)

# fio arguments for workload $1 (the common ones are added by measure_fio).
fio_args() {
    local direct=(--direct=1 --ioengine=libaio --rw=randread --bs=4k --norandommap --randrepeat=0)
    case $1 in
        randread-4k-direct-qd1) echo "${direct[@]}" --iodepth=1 --time_based ;;
        randread-4k-direct-qd32) echo "${direct[@]}" --iodepth=32 --time_based ;;
        # Passes over the file, caches dropped before each (see measure_fio): looping would hit the cache.
        seqread-1m-cold) echo --rw=read --bs=1M --ioengine=psync ;;
        seqread-1m-warm) echo --rw=read --bs=1M --ioengine=psync --time_based ;;
        randread-4k-warm) echo --rw=randread --bs=4k --ioengine=psync --norandommap --randrepeat=0 --time_based ;;
        seqwrite-1m-fsync) echo --rw=write --bs=1M --ioengine=psync --end_fsync=1 --time_based ;;
        *) return 1 ;;
    esac
}

# Prints IOPS or MiB/s for direction $1 (read|write) and unit $2 from the fio JSON files that
# follow: the I/O of all of them over the sum of their runtimes.
fio_value() {
    python3 - "$@" <<'PY'
import json, sys
rw, unit, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
ios = nbytes = ms = 0
for path in paths:
    text = open(path).read()
    job = json.loads(text[text.index("{"):])["jobs"][0]
    if job.get("error"):
        sys.exit(f"{path}: fio job error {job['error']}")
    d = job[rw]
    ios, nbytes, ms = ios + d["total_ios"], nbytes + d["io_bytes"], ms + d["runtime"]
if nbytes == 0 or ms == 0:
    sys.exit("fio moved no data")
print(f"{ios * 1000 / ms:.0f}" if unit == "IOPS" else f"{nbytes * 1000 / ms / 1048576:.1f}")
PY
}

# Runs one fio job on file $1 with extra arguments $3..., JSON output to $2.
run_fio() {
    local file=$1 json=$2 rc=0
    shift 2
    # invalidate=0: fio must not drop the cache we warmed (cold runs drop it explicitly).
    fio --name="$(basename "$json" .json)" --filename="$file" --size="$SIZE_BYTES" \
        --runtime="$RUNTIME" --invalidate=0 --numjobs=1 --output-format=json --output="$json" \
        "$@" >"$json.log" 2>&1 &
    FIO_PID=$!
    wait "$FIO_PID" || rc=$?
    FIO_PID=''
    if ((rc != 0)); then
        printf '  fio failed (%d): %s\n' "$rc" "$(tr '\n' ' ' <"$json.log" | cut -c1-300)" >&2
        return 1
    fi
}

# MEASURE_FN for fio workloads.
measure_fio() {
    local id=$1 config=$2 dir=$3 round=$4 args file rw=read unit json jsons=() t0 pass
    read -r -a args <<<"$(fio_args "$id")"
    unit=$(awk -F'|' -v id="$id" '$1 == id { print $3 }' <<<"$(printf '%s\n' "${FIO_WORKLOADS[@]}")")
    file=$dir/$READ_FILE
    json=$SCRATCH/fio/$id.$config.$round
    case $id in
        *-cold)
            # One pass is under a second here and swings 2x with the host's disk: repeat
            # (drop caches, one pass) until --runtime has elapsed, at least twice.
            t0=${EPOCHREALTIME/./}
            for ((pass = 1; pass <= 2 || (${EPOCHREALTIME/./} - t0) < RUNTIME * 1000000; pass++)); do
                drop_caches
                run_fio "$file" "$json.$pass.json" "${args[@]}" || return 1
                jsons+=("$json.$pass.json")
            done
            ;;
        *)
            case $id in
                seqwrite-*) file=$dir/$WRITE_FILE rw=write; sync ;;
                *-warm) warm_up "$file" ;;
                *) sync ;;
            esac
            run_fio "$file" "$json.json" "${args[@]}" || return 1
            jsons+=("$json.json")
            ;;
    esac
    fio_value "$rw" "$unit" "${jsons[@]}"
}

group_fio_data() {
    local w id label unit target
    for w in "${FIO_WORKLOADS[@]}"; do
        IFS='|' read -r id label unit target <<<"$w"
        [[ -z $WORKLOADS_CSV || ,$WORKLOADS_CSV, == *,$id,* ]] || continue
        run_interleaved "$id" "$label" "$unit" "$target" measure_fio
    done
}

# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

describe_configs() {
    local c
    for c in "${CONFIGS[@]}"; do
        case $c in
            native) echo "- native: fio on the plain directory (\`$(findmnt -n -o FSTYPE -T "$SRC" | head -n1)\` on \`$(findmnt -n -o SOURCE -T "$SRC" | head -n1)\`)" ;;
            icfs) echo "- icfs: \`imagecachefs mount DIR${ICFS_OPTS:+ $ICFS_OPTS}\` over the directory itself (foreground daemon, release build)" ;;
            bindfs) echo "- bindfs: \`bindfs${BINDFS_OPTS:+ $BINDFS_OPTS} SRC MNT\` (defaults: single-threaded, kernel page cache; O_DIRECT is not forwarded, so its O_DIRECT rows are served from the page cache)" ;;
            mergerfs) echo "- mergerfs: \`mergerfs${MERGERFS_OPTS:+ $MERGERFS_OPTS} SRC MNT\` (single branch; cache.files=off = direct_io, no FUSE page cache, as mergerfs documents for files changed outside it)" ;;
        esac
    done
}

# One line about the imagecachefs daemon logs: did passthrough engage, anything logged loudly.
icfs_log_summary() {
    local logf=$SCRATCH/logs/icfs.log pt n
    [[ -s $logf ]] || return 0
    pt=$(grep -m1 -i 'passthrough' "$logf" | sed 's/^\[[^]]*\] *//') || pt='no line mentions passthrough'
    n=$(grep -c -E 'WARN|ERROR' "$logf") || true
    echo "- imagecachefs log (all mounts): \"$pt\"; $n warning/error line(s)"
}

write_report() {
    local header
    header=$(cat <<EOF
# imagecachefs data-path performance

Generated by \`benches/run.sh${CMDLINE:+ $CMDLINE}\` on $(date -u +%Y-%m-%dT%H:%M:%SZ).
Do not edit by hand: rerun the script.

- machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')), $(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo) memory; load average at start $LOAD_START, at end $(cut -d' ' -f1-3 /proc/loadavg)
- kernel: $(uname -r)
- tools: $(fio --version), bindfs $(bindfs --version 2>&1 | awk '{ print $2; exit }'), mergerfs $(mergerfs --version 2>&1 | awk '{ print $3; exit }'); imagecachefs $(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null || echo '(no commit)')$(git -C "$REPO_DIR" diff --quiet HEAD -- src 2>/dev/null || echo ' + uncommitted changes')
- test file: $SIZE random data ($SIZE_BYTES bytes) in a scratch directory on the real disk; the write workload overwrites a second preallocated file of the same size
- runs: $ROUNDS round(s) per workload x configuration, interleaved (each round runs every configuration once, each on a fresh mount, starting one configuration later than the round before), ${RUNTIME} s per run; the cold read repeats (\`echo 3 > /proc/sys/vm/drop_caches\`, one pass over the file) for ${RUNTIME} s, at least twice, and counts all passes, warm runs read the file once first; fio \`--invalidate=0 --numjobs=1\`, \`--end_fsync=1\` for the write (fsync time counted)
$(describe_configs)
$(icfs_log_summary)

Cells: median over the rounds (ratio to native's median). Only ratios are meaningful: this is a
shared, noisy 2-core VM (see the spread table below).
EOF
)
    printf '%s\n' "$header" >"$SCRATCH/report-header.md"
    python3 - "$RESULTS" "$OUT" "$CONFIGS_CSV" "$SCRATCH/report-header.md" <<'PY'
import statistics, sys
from collections import OrderedDict
results, out, configs = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
header = open(sys.argv[4]).read().rstrip("\n")
names = {"native": "native", "icfs": "imagecachefs", "bindfs": "bindfs", "mergerfs": "mergerfs"}
rows = OrderedDict()
for line in open(results):
    wid, label, unit, target, config, rnd, value = line.rstrip("\n").split("\t")
    r = rows.setdefault(wid, {"label": label, "unit": unit, "target": target, "vals": {}})
    r["vals"].setdefault(config, []).append(None if value == "error" else float(value))

def fmt(v, unit):
    if v is None:
        return "error"
    return f"{v:,.0f}" if unit == "IOPS" or v >= 100 else f"{v:.1f}"

def median(vs):
    ok = [v for v in vs if v is not None]
    return statistics.median(ok) if ok and len(ok) == len(vs) else None

lines = [header, "", "| workload | unit | " + " | ".join(names[c] for c in configs) + " |",
         "|---|---|" + "---:|" * len(configs)]
spread = ["| workload | " + " | ".join(names[c] for c in configs) + " |", "|---|" + "---|" * len(configs)]
verdicts, missed = [], 0
for wid, r in rows.items():
    unit, med = r["unit"], {c: median(r["vals"].get(c, [])) for c in configs}
    base = med.get("native")
    cells = []
    for c in configs:
        m = med[c]
        if m is None:
            cells.append("error")
        elif c == "native" or not base:
            cells.append(fmt(m, unit))
        else:
            cells.append(f"{fmt(m, unit)} ({m / base:.2f}x)")
    lines.append(f"| {r['label']} | {unit} | " + " | ".join(cells) + " |")
    spread.append(f"| {wid} | " + " | ".join(
        " / ".join(fmt(v, unit) for v in r["vals"].get(c, [])) or "-" for c in configs) + " |")
    if r["target"] != "-" and "icfs" in configs:
        t, m = float(r["target"]), med["icfs"]
        ratio = m / base if m is not None and base else None
        ok = ratio is not None and ratio >= t
        missed += not ok
        verdicts.append(f"- {'holds' if ok else '**MISSED**'}: {r['label']}: imagecachefs "
                        f"{'error' if ratio is None else f'{ratio:.3f}x'} native (target >= {t:.2f}x)")
lines += ["", "## Targets (imagecachefs vs native)", ""] + (verdicts or ["- (imagecachefs not run)"])
lines += ["", "## Spread: every round's value (round 1 / round 2 / ...)", ""] + spread
text = "\n".join(lines) + "\n"
print(text)
if out != "-":
    open(out, "w").write(text)
sys.exit(3 if missed else 0)
PY
}

# ---------------------------------------------------------------------------------------------

main() {
    CMDLINE="$*"
    parse_args "$@"
    ((EUID == 0)) || die "run as root (it mounts, and drops the page cache)"
    [[ -e /dev/fuse ]] || die "/dev/fuse is missing (modprobe fuse)"
    trap cleanup EXIT
    trap 'log "interrupted: cleaning up"; exit 130' INT
    trap 'log "terminated: cleaning up"; exit 143' TERM
    install_tools
    build_binary
    make_scratch
    make_test_files
    LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
    log "configs: ${CONFIGS[*]}; groups: ${BENCH_GROUPS[*]}; $ROUNDS round(s) x ${RUNTIME} s, file $SIZE"
    local g rc=0
    for g in "${BENCH_GROUPS[@]}"; do "group_$g"; done
    if [[ $OUT != - ]]; then mkdir -p "$(dirname "$OUT")"; fi
    write_report || rc=$?
    if [[ $OUT != - ]]; then log "report written to $OUT"; fi
    if ((rc == 3)); then
        log "an imagecachefs target was missed (see Targets above)"
        ((CHECK)) && exit 3
    elif ((rc != 0)); then
        die "report generation failed"
    fi
    return 0
}

main "$@"
