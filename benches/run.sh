#!/usr/bin/env bash
# benches/run.sh — benchmarks of imagecachefs: the data path and metadata against native, bindfs
# and mergerfs, and the daemon's own costs (CPU, memory, status, checksums, eviction, startup).
#
# Usage:  sudo benches/run.sh [options]          (root: it mounts, and drops the page cache)
#
#   --quick            smoke run of every group at small scale: 1 round, 2 s runs, 256 MiB file,
#                      200 metadata files, 1 000 cache files / 100 handles, 20 evictions, 3 s
#                      idle; prints the report but writes docs/PERFORMANCE.md only with --out
#   --rounds N         rounds per measurement and configuration (default 3)
#   --runtime SECS     length of each timed fio run (default 5)
#   --size SIZE        test file size, fio/numfmt style: 256M, 1G, 1GiB (default 1G)
#   --dir DIR          a scratch directory is made under DIR and removed at the end
#                      (default /var/tmp; must be a real disk filesystem, never tmpfs)
#   --configs LIST     comma list among native,icfs,bindfs,mergerfs (default: all four)
#   --groups LIST      comma list of benchmark groups (default: all, in this order):
#                        fio_data    fio workloads, every configuration
#                        metadata    open+close, stat, readdir, create+rename, every configuration
#                        daemon_cpu  imagecachefs daemon CPU per GiB read (cold, passthrough)
#                        scale       imagecachefs with 10 000 cache files: startup, idle CPU,
#                                    RSS with 1 000 open handles, time to render `status`
#                        sha1        SHA-1 rate of `imagecachefs verify`, and `cargo bench --bench sha1`
#                        eviction    lag from deadline to ENOENT over 100 evictions
#                        restart     server kill -9, and `imagecachefs restart`, to the first
#                                    answered request (median and largest of 20)
#   --workloads LIST   comma list of fio workload ids to run (default: all; ids in the table
#                      FIO_WORKLOADS below, e.g. randread-4k-direct-qd32,seqread-1m-cold)
#   --out FILE         Markdown report (default docs/PERFORMANCE.md; "-" = print only)
#   --icfs-opts STR    extra options for every `imagecachefs mount` (default: none; e.g. -vv)
#   --bindfs-opts STR  options for bindfs (default: none, i.e. `bindfs SRC MNT`)
#   --mergerfs-opts STR  options for mergerfs (default: -o cache.files=off)
#   --no-settle        do not let imagecachefs hash new test files before measuring (by default
#                      one mount with --verify-rate 0 computes every birth SHA-1 first, so that
#                      no measurement runs beside the checksum thread's first pass)
#   --no-install       do not apt-get install missing tools
#   --no-build         do not run `cargo build --release`
#   --keep             keep the scratch directory (fio JSON, daemon logs)
#   --check            exit 3 when an imagecachefs target is missed
#   -h, --help         this text
#
# What it does: installs fio/bindfs/mergerfs/cc if missing (apt-get update once, then install),
# builds target/release/imagecachefs, writes a test file of random data (and a second file that
# the write workload overwrites) into SCRATCH/_base, and runs every selected group. The
# configurations compared:
#   native    SCRATCH/_base itself
#   icfs      imagecachefs mounted over SCRATCH/_base (source = mount point), foreground daemon
#   bindfs    bindfs SCRATCH/_base SCRATCH/mnt-bindfs      (bindfs defaults)
#   mergerfs  mergerfs -o cache.files=off SCRATCH/_base SCRATCH/mnt-mergerfs
# Configurations are interleaved (for each workload: round 1 native, icfs, bindfs, mergerfs;
# round 2 icfs, bindfs, mergerfs, native; ...), and every run gets a fresh mount that is taken
# down right after it, so a slow minute on this shared 2-core VM hits all configurations alike.
# The imagecachefs-only groups repeat each measurement once per round, each round on a fresh
# mount. Medians, their ratio to native, and whether each imagecachefs target holds are printed
# and written as Markdown. Targets:
#   fio_data   every read pattern >= 0.97x native, sequential write >= 0.90x native
#   metadata   open+close faster than bindfs and mergerfs; stat within 1.2x native
#   eviction   median lag <= 1 s;  scale: 0 CPU ticks while idle, status render < 50 ms,
#              RSS < 30 MiB with 10 000 files and 1 000 open handles
#
# Every mount, daemon and helper process it starts is taken down on exit, error, Ctrl-C or
# SIGTERM; it checks /proc/mounts at the end and fails loudly if a FUSE mount of its scratch
# area is left.
#
# Adding a benchmark group: write `group_NAME` and add NAME to ALL_GROUPS. A group that compares
# configurations calls `run_interleaved ID LABEL UNIT TARGET MEASURE_FN` once per workload;
# MEASURE_FN is called with (ID CONFIG DIR ROUND) once the configuration is mounted, DIR being
# the directory that holds the test files in that configuration and $CUR_DAEMON_PID the FUSE
# daemon's pid (empty for native); it prints one number on stdout (or fails). An
# imagecachefs-only group calls `run_rounds MEASURE_FN SPEC...` (SPEC = "ID|LABEL|UNIT|TARGET");
# MEASURE_FN ROUND mounts what it needs (mount_icfs, mount_icfs_background) and prints "ID VALUE"
# lines. Either runs in the script's own shell, with `set -e` off (it is called in a
# condition): check every step (`|| return 1`). Children go through run_child (Ctrl-C stops
# them), a long-lived helper through start_holder. TARGET: '-' none; a number: minimum
# icfs/native ratio; within:X icfs within X times native; beats:A,B icfs above configurations
# A and B; abs<V, abs<=V, abs==V the icfs value itself. write_group_notes NAME TITLE TEXT
# heads the group's section of the report.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/.." && pwd)
BIN="$REPO_DIR/target/release/imagecachefs"

ALL_CONFIGS=(native icfs bindfs mergerfs)
ALL_GROUPS=(fio_data metadata daemon_cpu scale sha1 eviction restart)

# Options (empty = not given; defaults filled in after parsing, so --quick and explicit flags mix).
OPT_ROUNDS='' OPT_RUNTIME='' OPT_SIZE='' OPT_OUT='' QUICK=0
BASE_DIR=/var/tmp
CONFIGS_CSV=$(IFS=,; echo "${ALL_CONFIGS[*]}")
GROUPS_CSV=$(IFS=,; echo "${ALL_GROUPS[*]}")
WORKLOADS_CSV=''
ICFS_OPTS='' BINDFS_OPTS='' MERGERFS_OPTS='-o cache.files=off'
DO_INSTALL=1 DO_BUILD=1 KEEP=0 CHECK=0 SETTLE=1

# Run state, read by cleanup().
SCRATCH=''            # the scratch directory this run made
SRC=''                # SCRATCH/_base: the cache directory, also imagecachefs's mount point
RESULTS=''            # TSV of every measurement
CUR_GROUP=''          # the group running (first column of RESULTS)
CUR_CONFIG=''         # configuration currently mounted ('' = none)
CUR_MNT=''            # its mount point
CUR_DAEMON_PID=''     # its FUSE daemon (started by us, or by our `mount --background`)
FIO_PID=''            # the child currently running in the foreground (fio, a micro-program)
HOLDER_PID=''         # a helper holding files open in the background (started by us)

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
            --no-settle) SETTLE=0 ;;
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
        META_FILES=200 OPENCLOSE_N=1000 META_MIN_MS=200
        SCALE_FILES=1000 SCALE_HANDLES=100 STATUS_REPS=5 IDLE_SECS=3 EVICT_FILES=20
    else
        ROUNDS=${OPT_ROUNDS:-3} RUNTIME=${OPT_RUNTIME:-5} SIZE=${OPT_SIZE:-1G}
        OUT=${OPT_OUT:-$REPO_DIR/docs/PERFORMANCE.md}
        META_FILES=2000 OPENCLOSE_N=10000 META_MIN_MS=1000
        SCALE_FILES=10000 SCALE_HANDLES=1000 STATUS_REPS=11 IDLE_SECS=10 EVICT_FILES=100
    fi
    EVICT_MIN_AGE=2
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
        if [[ " ${ALL_GROUPS[*]} " != *" $c "* ]] || ! declare -F "group_$c" >/dev/null; then
            die "unknown benchmark group '$c' (groups: ${ALL_GROUPS[*]})"
        fi
    done
    local ws
    IFS=, read -r -a ws <<<"$WORKLOADS_CSV"
    for c in "${ws[@]}"; do
        fio_args "$c" >/dev/null || die "unknown fio workload '$c'"
    done
}

# True if group $1 was selected.
selected() { [[ " ${BENCH_GROUPS[*]} " == *" $1 "* ]]; }

# True if a selected group mounts imagecachefs.
uses_icfs() {
    local g
    for g in "${BENCH_GROUPS[@]}"; do
        case $g in
            fio_data|metadata) [[ " ${CONFIGS[*]} " == *" icfs "* ]] && return 0 ;;
            *) return 0 ;;
        esac
    done
    return 1
}

# ---------------------------------------------------------------------------------------------
# Setup: tools, binary, scratch area, test files
# ---------------------------------------------------------------------------------------------

install_tools() {
    local missing=() t
    for t in fio bindfs mergerfs; do command -v "$t" >/dev/null || missing+=("$t"); done
    command -v python3 >/dev/null || missing+=(python3)
    if selected metadata && ! command -v cc >/dev/null; then missing+=(gcc); fi
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
        if selected sha1; then
            log "cargo bench --bench sha1 --no-run"
            (cd "$REPO_DIR" && cargo bench --bench sha1 --no-run --quiet 2>/dev/null) \
                || die "cargo bench --bench sha1 --no-run failed"
        fi
    fi
    if uses_icfs; then
        [[ -x $BIN ]] || die "$BIN is missing (build it, or drop --no-build)"
    fi
    ICFS_VERSION="$(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null || echo '(no commit)')$(git -C "$REPO_DIR" diff --quiet HEAD -- src 2>/dev/null || echo ' + uncommitted changes')"
}

# Every mount of this run uses one copy of the binary, whatever rebuilds target/ meanwhile.
copy_binary() {
    [[ -x $BIN ]] || return 0
    cp "$BIN" "$SCRATCH/bin/imagecachefs"
    BIN=$SCRATCH/bin/imagecachefs
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
    mkdir -p "$SRC" "$SCRATCH/mnt-bindfs" "$SCRATCH/mnt-mergerfs" "$SCRATCH/fio" "$SCRATCH/logs" \
        "$SCRATCH/notes" "$SCRATCH/bin"
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

# The log of every imagecachefs daemon of this run.
ICFS_LOG() { echo "$SCRATCH/logs/icfs.log"; }

# Mounts imagecachefs over directory $1 with --icfs-opts and options $2..., foreground daemon
# (our child); sets CUR_*.
mount_icfs() {
    local dir=$1 opts=() logf
    shift
    read -r -a opts <<<"$ICFS_OPTS"
    logf=$(ICFS_LOG)
    CUR_CONFIG=icfs CUR_MNT=$dir
    "$BIN" mount "$dir" "${opts[@]}" "$@" >>"$logf" 2>&1 &
    CUR_DAEMON_PID=$!
    wait_mounted "$dir" "$CUR_DAEMON_PID" "$logf"
}

# The pid of the imagecachefs daemon serving directory $1 (the one `--background` detached).
icfs_daemon_of() {
    local dir=$1 p args
    for p in /proc/[0-9]*; do
        [[ $p/exe -ef $BIN ]] || continue
        args=$(tr '\0' ' ' <"$p/cmdline" 2>/dev/null) || continue
        if [[ " $args " == *" mount $dir "* && " $args " != *" --background "* ]]; then
            echo "${p#/proc/}"
            return 0
        fi
    done
    return 1
}

# Mounts imagecachefs over $1 with `imagecachefs mount DIR --background` and options $2...;
# sets CUR_* and STARTUP_MS (from the command's start to its return).
mount_icfs_background() {
    local dir=$1 opts=() t0 t1 rc=0
    shift
    read -r -a opts <<<"$ICFS_OPTS"
    CUR_CONFIG=icfs CUR_MNT=$dir CUR_DAEMON_PID=''
    t0=${EPOCHREALTIME/./}
    "$BIN" mount "$dir" --background --log-file "$(ICFS_LOG)" "${opts[@]}" "$@" || rc=$?
    t1=${EPOCHREALTIME/./}
    ((rc == 0)) || { log "imagecachefs mount --background failed ($rc)"; return 1; }
    STARTUP_MS=$(awk -v d=$((t1 - t0)) 'BEGIN { printf "%.1f", d / 1e3 }')
    CUR_DAEMON_PID=$(icfs_daemon_of "$dir") || { log "no daemon process serves $dir"; return 1; }
    (($(fuse_mounts_at "$dir") > 0)) || { log "--background returned but $dir is not mounted"; return 1; }
}

# Mounts configuration $1 (a fresh mount) and sets CUR_*.
mount_config() {
    local config=$1 logf opts=()
    CUR_CONFIG=$config
    logf=$SCRATCH/logs/$config.log
    case $config in
        native) CUR_MNT='' CUR_DAEMON_PID='' ; return 0 ;;
        icfs) mount_icfs "$SRC"; return 0 ;;
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
# (A daemon detached by --background is not our child: `wait` just fails for it.)
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
            "$BIN" unmount "$mnt" >>"$(ICFS_LOG)" 2>&1 \
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

# Runs "$@" as the foreground child (stopped by cleanup on Ctrl-C); its output goes to ours.
run_child() {
    local rc=0
    "$@" &
    FIO_PID=$!
    wait "$FIO_PID" || rc=$?
    FIO_PID=''
    return "$rc"
}

# start_holder READY CMD...: starts CMD in the background as the holder; returns once file
# READY is non-empty (the holder writes it when it is set up), fails if the holder exits first.
start_holder() {
    local ready=$1 i
    shift
    rm -f "$ready"
    "$@" &
    HOLDER_PID=$!
    for ((i = 0; i < 1200; i++)); do
        [[ -s $ready ]] && return 0
        kill -0 "$HOLDER_PID" 2>/dev/null || { wait "$HOLDER_PID" 2>/dev/null || true; HOLDER_PID=''; return 1; }
        sleep 0.05
    done
    log "holder $HOLDER_PID not ready after 60 s"
    stop_holder
    return 1
}

# Stops the holder started by start_holder, if any. Never fails.
stop_holder() {
    [[ -n $HOLDER_PID ]] || return 0
    kill -TERM "$HOLDER_PID" 2>/dev/null || true
    wait_pid_gone "$HOLDER_PID" 100 || { kill -KILL "$HOLDER_PID" 2>/dev/null || true; wait_pid_gone "$HOLDER_PID" 50 || true; }
    HOLDER_PID=''
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
    stop_holder
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
# The runners, shared by every benchmark group
# ---------------------------------------------------------------------------------------------

# record ID LABEL UNIT TARGET CONFIG ROUND VALUE: one line of RESULTS.
record() {
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$CUR_GROUP" "$@" >>"$RESULTS"
}

# run_interleaved ID LABEL UNIT TARGET MEASURE_FN
#   UNIT: IOPS | MiB/s | anything (higher is better); TARGET: see the header.
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
            stop_holder
            unmount_config
            record "$id" "$label" "$unit" "$target" "$config" "$round" "$value"
        done
    done
}

# run_rounds MEASURE_FN SPEC...   (SPEC = "ID|LABEL|UNIT|TARGET"; imagecachefs only)
# For each round: MEASURE_FN ROUND (it mounts what it needs and prints "ID VALUE" lines), then
# the mount and any holder are taken down. A SPEC the round did not print is recorded "error".
run_rounds() {
    local fn=$1 round spec id label unit target value ok
    shift
    for ((round = 1; round <= ROUNDS; round++)); do
        ok=1
        "$fn" "$round" >"$SCRATCH/value" || ok=0
        stop_holder
        unmount_config
        ((ok)) || log "$fn round $round: FAILED (values it printed are kept)"
        for spec in "$@"; do
            IFS='|' read -r id label unit target <<<"$spec"
            value=$(awk -v id="$id" '$1 == id { v = $2 } END { print v }' "$SCRATCH/value")
            [[ -n $value ]] || value=error
            log "$(printf '%-22s round %d  %-8s %12s %s' "$id" "$round" icfs "$value" "$unit")"
            record "$id" "$label" "$unit" "$target" icfs "$round" "$value"
        done
    done
}

# write_group_notes GROUP TITLE TEXT: the heading and method notes of GROUP's report section.
write_group_notes() {
    printf '## %s\n\n%s\n' "$2" "$3" >"$SCRATCH/notes/$1.md"
}

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

# Reads $1 once through the configuration's path so that the page cache is hot.
warm_up() { dd if="$1" of=/dev/null bs=1M status=none; }

# Waits until no cache file in the imagecachefs mount $1 has a pending SHA-1 or verification
# (up to $2 seconds); polls every $3 seconds (default 0.5).
wait_checksums() {
    local dir=$1 limit=$2 every=${3:-0.5} t0=$SECONDS n
    while :; do
        n=$(grep -c -w pending "$dir/.imagecache/status") || true
        ((n == 0)) && return 0
        if ((SECONDS - t0 >= limit)); then
            log "$dir: $n file(s) still have a pending checksum after $limit s"
            return 1
        fi
        sleep "$every"
    done
}

# Lets imagecachefs compute the birth SHA-1 of every file in $1 (one mount, --verify-rate 0,
# no eviction) so that later mounts start with nothing to hash; sets SETTLE_SECS.
settle_checksums() {
    local dir=$1 t0
    SETTLE_SECS=0
    ((SETTLE)) || return 0
    t0=${EPOCHREALTIME/./}
    mount_icfs "$dir" --verify-rate 0 --no-evict
    wait_checksums "$dir" 3600 1 || die "imagecachefs did not finish hashing $dir"
    SETTLE_SECS=$(awk -v d=$((${EPOCHREALTIME/./} - t0)) 'BEGIN { printf "%.1f", d / 1e6 }')
    unmount_config
    log "checksums of $dir settled in $SETTLE_SECS s"
}

# The imagecachefs daemon $1's CPU use so far: "TICKS NS SWITCHES" = utime+stime in clock
# ticks (/proc/PID/stat), on-CPU nanoseconds of its live threads (schedstat), and their
# voluntary+involuntary context switches (each wake-up of a sleeping thread ends in one).
daemon_usage() {
    local pid=$1 ticks ns sw
    ticks=$(sed 's/^.*) //' "/proc/$pid/stat" | awk '{ print $12 + $13 }') || return 1
    ns=$(cat /proc/"$pid"/task/*/schedstat 2>/dev/null | awk '{ s += $1 } END { printf "%d", s }')
    sw=$(cat /proc/"$pid"/task/*/status 2>/dev/null | awk '/ctxt_switches/ { s += $2 } END { printf "%d", s }')
    echo "$ticks $ns $sw"
}

# VmRSS of process $1 in MiB.
rss_mib() { awk '/^VmRSS:/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status"; }
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

settle_note() {
    if ((SETTLE)); then
        echo "imagecachefs had hashed both test files before the first run (one mount with \`--verify-rate 0\`), as it would have in steady state: no run competes with the checksum thread's first pass"
    else
        echo "\`--no-settle\`: every imagecachefs mount starts hashing the test files (64 MiB/s) while fio runs"
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
    write_group_notes fio_data "Data path (fio)" "$(cat <<EOF
- test file: $SIZE random data ($SIZE_BYTES bytes) in the cache directory on the real disk; the write workload overwrites a second preallocated file of the same size
- runs: $ROUNDS round(s) per workload x configuration, ${RUNTIME} s per run; the cold read repeats (\`echo 3 > /proc/sys/vm/drop_caches\`, one pass over the file) for ${RUNTIME} s, at least twice, and counts all passes, warm runs read the file once first; fio \`--invalidate=0 --numjobs=1\`, \`--end_fsync=1\` for the write (fsync time counted)
- $(settle_note)

Higher is better.
EOF
)"
    for w in "${FIO_WORKLOADS[@]}"; do
        IFS='|' read -r id label unit target <<<"$w"
        [[ -z $WORKLOADS_CSV || ,$WORKLOADS_CSV, == *,$id,* ]] || continue
        run_interleaved "$id" "$label" "$unit" "$target" measure_fio
    done
}

# ---------------------------------------------------------------------------------------------
# Helper programs, written into SCRATCH/bin at the start of a run
# ---------------------------------------------------------------------------------------------

write_metabench() {
    cat >"$SCRATCH/bin/metabench.c" <<'C'
/* metabench: metadata system calls in one directory, timed with CLOCK_MONOTONIC.
 *   metabench openclose DIR COUNT MIN_MS NAME       open(O_RDONLY) + close of DIR/NAME
 *   metabench stat DIR COUNT MIN_MS PREFIX          stat of DIR/PREFIX00000 .. PREFIX<COUNT-1>
 *   metabench readdir DIR COUNT MIN_MS              opendir, readdir to the end, closedir
 *                                                   (at least COUNT entries; counts entries)
 *   metabench create-rename DIR COUNT MIN_MS PREFIX create DIR/PREFIX<b>-<i>.part, close,
 *                                                   rename to DIR/PREFIX<b>-<i>; unlinked untimed
 * A batch of COUNT operations repeats until MIN_MS have been spent in timed code (one batch if
 * 0). Prints operations (readdir: entries) per second. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static void fail(const char *what, const char *path) {
    fprintf(stderr, "metabench: %s %s: %s\n", what, path, strerror(errno));
    exit(1);
}

static char *join(const char *dir, const char *name, long a, long b, const char *suffix) {
    char *p;
    int n = b >= 0 ? asprintf(&p, "%s/%s%ld-%05ld%s", dir, name, a, b, suffix)
            : a >= 0 ? asprintf(&p, "%s/%s%05ld", dir, name, a)
                     : asprintf(&p, "%s/%s", dir, name);
    if (n < 0) fail("asprintf", name);
    return p;
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: metabench openclose|stat|readdir|create-rename DIR COUNT MIN_MS [NAME|PREFIX]\n");
        return 2;
    }
    const char *op = argv[1], *dir = argv[2], *arg = argc > 5 ? argv[5] : "";
    long count = atol(argv[3]), ops = 0, batch, i;
    double min_s = atof(argv[4]) / 1000.0, spent = 0;
    char **from = calloc(count > 0 ? count : 1, sizeof *from);
    char **to = calloc(count > 0 ? count : 1, sizeof *to);
    struct stat st;
    if (count <= 0 || !from || !to) return 2;
    if (!strcmp(op, "openclose")) from[0] = join(dir, arg, -1, -1, "");
    if (!strcmp(op, "stat"))
        for (i = 0; i < count; i++) from[i] = join(dir, arg, i, -1, "");
    for (batch = 0; batch == 0 || spent < min_s; batch++) {
        if (!strcmp(op, "create-rename"))
            for (i = 0; i < count; i++) {
                free(from[i]);
                free(to[i]);
                from[i] = join(dir, arg, batch, i, ".part");
                to[i] = join(dir, arg, batch, i, "");
            }
        double t0 = now();
        if (!strcmp(op, "openclose")) {
            for (i = 0; i < count; i++) {
                int fd = open(from[0], O_RDONLY | O_CLOEXEC);
                if (fd < 0) fail("open", from[0]);
                close(fd);
            }
            ops += count;
        } else if (!strcmp(op, "stat")) {
            for (i = 0; i < count; i++)
                if (stat(from[i], &st) != 0) fail("stat", from[i]);
            ops += count;
        } else if (!strcmp(op, "readdir")) {
            long n = 0;
            DIR *d = opendir(dir);
            if (!d) fail("opendir", dir);
            errno = 0;
            while (readdir(d)) n++;
            if (errno) fail("readdir", dir);
            closedir(d);
            if (n < count) {
                fprintf(stderr, "metabench: %s has %ld entries, expected at least %ld\n", dir, n, count);
                return 1;
            }
            ops += n;
        } else if (!strcmp(op, "create-rename")) {
            for (i = 0; i < count; i++) {
                int fd = open(from[i], O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
                if (fd < 0) fail("create", from[i]);
                close(fd);
                if (rename(from[i], to[i]) != 0) fail("rename", from[i]);
            }
            ops += count;
        } else {
            fprintf(stderr, "metabench: unknown operation %s\n", op);
            return 2;
        }
        spent += now() - t0;
        if (!strcmp(op, "create-rename"))
            for (i = 0; i < count; i++)
                if (unlink(to[i]) != 0) fail("unlink", to[i]);
    }
    printf("%.0f\n", (double)ops / spent);
    return 0;
}
C
    cc -O2 -Wall -Wextra -o "$SCRATCH/bin/metabench" "$SCRATCH/bin/metabench.c" \
        || die "compiling the metadata micro-program failed"
}

write_python_helpers() {
    # hold.py DIR N READY: opens the first N regular files of DIR (by name) read-only, writes
    # N to READY, and holds them until it is killed.
    cat >"$SCRATCH/bin/hold.py" <<'PY'
import os, resource, sys, time
d, n, ready = sys.argv[1], int(sys.argv[2]), sys.argv[3]
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if soft < n + 64:
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 64), hard))
names = sorted(e.name for e in os.scandir(d) if e.is_file() and not e.name.startswith("."))[:n]
if len(names) < n:
    sys.exit(f"hold.py: {d} has only {len(names)} files, {n} wanted")
fds = [os.open(os.path.join(d, x), os.O_RDONLY) for x in names]
with open(ready, "w") as f:
    f.write(f"{len(fds)}\n")
while True:
    time.sleep(3600)
PY
    # evict.py DIR N MIN_AGE TIMEOUT: creates N files f0001.. through the mount (as Nova
    # downloads: write, close) while holding a read handle on each, waits until the daemon has
    # hashed them all, closes every handle (per-file close time, monotonic clock), then stats
    # each file every 10 ms until ENOENT. Lag = first ENOENT - (close time + MIN_AGE).
    # Prints "evict-lag MEDIAN_MS" and "evict-lag-max MAX_MS"; a summary goes to stderr.
    cat >"$SCRATCH/bin/evict.py" <<'PY'
import os, statistics, sys, time
d, n, min_age, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
names = [f"f{i:04d}" for i in range(1, n + 1)]
paths = [os.path.join(d, x) for x in names]
status = os.path.join(d, ".imagecache", "status")
data = os.urandom(4096)
writers = []
for p in paths:
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(fd, data)
    writers.append(fd)
readers = [os.open(p, os.O_RDONLY) for p in paths]
for fd in writers:
    os.close(fd)
ours, limit = set(names), time.monotonic() + 300
while True:
    with open(status) as f:
        pending = sum(1 for line in f if line.split()[:1] and line.split()[0] in ours
                      and "pending" in line.split())
    if pending == 0:
        break
    if time.monotonic() > limit:
        sys.exit(f"evict.py: {pending} file(s) still unhashed after 300 s")
    time.sleep(0.05)
closed = []
for fd in readers:
    os.close(fd)
    closed.append(time.monotonic())
due = [t + min_age for t in closed]
gone = [None] * n
remaining = set(range(n))
time.sleep(max(0.0, min(due) - 0.5 - time.monotonic()))
end = max(due) + timeout
while remaining and time.monotonic() < end:
    for i in sorted(remaining):
        try:
            os.stat(paths[i])
        except FileNotFoundError:
            gone[i] = time.monotonic()
            remaining.discard(i)
    time.sleep(0.01)
if remaining:
    sys.exit(f"evict.py: {len(remaining)} of {n} files still present {timeout:.0f} s after their deadline")
lags = sorted((g - t) * 1000 for g, t in zip(gone, due))
q = statistics.quantiles(lags, n=10) if n >= 2 else lags
print(f"evict-lag {statistics.median(lags):.1f}")
print(f"evict-lag-max {lags[-1]:.1f}")
print(f"evict.py: {n} evictions, lag ms min {lags[0]:.1f} median {statistics.median(lags):.1f} "
      f"p90 {q[-1]:.1f} max {lags[-1]:.1f}; closes spread over {(closed[-1] - closed[0]) * 1000:.1f} ms",
      file=sys.stderr)
PY
}

# ---------------------------------------------------------------------------------------------
# Group metadata: open+close, stat, readdir, create+rename, every configuration
# ---------------------------------------------------------------------------------------------

META_PREFIX=m-

meta_workloads() {
    local n=$META_FILES
    printf '%s\n' \
        "openclose|open + close of one file, x$(group_digits "$OPENCLOSE_N")|ops/s|beats:bindfs,mergerfs" \
        "stat-first|stat of $(group_digits "$n") files, first pass after the mount|ops/s|within:1.2" \
        "stat|stat of $(group_digits "$n") files, later passes|ops/s|within:1.2" \
        "readdir|readdir of a directory of $(group_digits "$n")+ entries|entries/s|-" \
        "create-rename|create + close + rename .part to final, x$(group_digits "$n")|ops/s|-"
}

# 10000 -> "10 000"
group_digits() { printf '%s' "$1" | sed ':a; s/\([0-9]\)\([0-9]\{3\}\)\($\| \)/\1 \2\3/; ta'; }

# MEASURE_FN for the metadata workloads: the micro-program, run in the configuration's directory.
measure_meta() {
    local id=$1 dir=$3 round=$4 mb=$SCRATCH/bin/metabench
    case $id in
        openclose) run_child "$mb" openclose "$dir" "$OPENCLOSE_N" "$META_MIN_MS" "${META_PREFIX}00000" ;;
        stat-first) run_child "$mb" stat "$dir" "$META_FILES" 0 "$META_PREFIX" ;;
        stat)
            run_child "$mb" stat "$dir" "$META_FILES" 0 "$META_PREFIX" >/dev/null || return 1
            run_child "$mb" stat "$dir" "$META_FILES" "$META_MIN_MS" "$META_PREFIX"
            ;;
        readdir) run_child "$mb" readdir "$dir" "$META_FILES" "$META_MIN_MS" ;;
        create-rename) run_child "$mb" create-rename "$dir" "$META_FILES" "$META_MIN_MS" "c$round-" ;;
        *) return 1 ;;
    esac
}

group_metadata() {
    local w id label unit target i
    write_metabench
    log "metadata: $META_FILES empty files ${META_PREFIX}00000.. in $SRC"
    for ((i = 0; i < META_FILES; i++)); do : >"$SRC/$(printf '%s%05d' "$META_PREFIX" "$i")"; done
    settle_checksums "$SRC"
    write_group_notes metadata "Metadata" "$(cat <<EOF
A small C program (\`benches/run.sh\` writes and compiles it) makes the system calls in the
configuration's directory (the cache directory itself: $(group_digits "$META_FILES") empty files beside the two
test files) and times them with \`CLOCK_MONOTONIC\`; a batch repeats until ${META_MIN_MS} ms have been
spent (\`stat\`, first pass: one batch, the first access to those names after the mount; later
passes: after one untimed pass). create+rename files are unlinked after each batch, untimed.
Every run is a fresh mount, configurations interleaved as above. Higher is better.
EOF
)"
    while IFS='|' read -r id label unit target; do
        run_interleaved "$id" "$label" "$unit" "$target" measure_meta
    done < <(meta_workloads)
    find "$SRC" -maxdepth 1 -name "${META_PREFIX}*" -delete
}

# ---------------------------------------------------------------------------------------------
# Group daemon_cpu: imagecachefs daemon CPU per GiB read
# ---------------------------------------------------------------------------------------------

measure_daemon_cpu() {
    local passes pass before after file=$SRC/$READ_FILE hz bytes
    mount_icfs "$SRC"
    wait_checksums "$SRC" 600 || return 1
    hz=$(getconf CLK_TCK)
    passes=$(((1073741824 + SIZE_BYTES - 1) / SIZE_BYTES))
    sleep 1
    before=$(daemon_usage "$CUR_DAEMON_PID") || return 1
    for ((pass = 1; pass <= passes; pass++)); do
        drop_caches
        run_child dd if="$file" of=/dev/null bs=1M status=none || return 1
    done
    after=$(daemon_usage "$CUR_DAEMON_PID") || return 1
    bytes=$((passes * SIZE_BYTES))
    awk -v b="$before" -v a="$after" -v hz="$hz" -v bytes="$bytes" 'BEGIN {
        split(b, x, " "); split(a, y, " "); gib = bytes / 1073741824
        printf "cpu-s-per-gib %.3f\n", (y[1] - x[1]) / hz / gib
        printf "cpu-ms-per-gib %.2f\n", (y[2] - x[2]) / 1e6 / gib
        printf "cpu-wakeups-per-gib %.0f\n", (y[3] - x[3]) / gib }'
}

group_daemon_cpu() {
    local passes=$(((1073741824 + SIZE_BYTES - 1) / SIZE_BYTES))
    settle_checksums "$SRC"
    write_group_notes daemon_cpu "imagecachefs daemon CPU on the data path" "$(cat <<EOF
imagecachefs mounted over the cache directory; after the mount has settled, the daemon's
\`utime+stime\` (\`/proc/PID/stat\`, clock ticks of $((1000 / $(getconf CLK_TCK))) ms), the on-CPU time of its threads
(\`/proc/PID/task/*/schedstat\`, ns) and their context switches are read before and after
$passes pass(es) of \`dd bs=1M\` over the $SIZE test file through the mount (1 GiB in all), page
cache dropped before each pass. With kernel passthrough the daemon sees the open and the
release only. Lower is better.
EOF
)"
    run_rounds measure_daemon_cpu \
        "cpu-s-per-gib|daemon CPU per GiB read (utime+stime)|s/GiB|-" \
        "cpu-ms-per-gib|daemon on-CPU time per GiB read (schedstat)|ms/GiB|-" \
        "cpu-wakeups-per-gib|daemon thread context switches per GiB read|switches/GiB|-"
}

# ---------------------------------------------------------------------------------------------
# Group scale: imagecachefs with 10 000 cache files (startup, idle CPU, RSS, status render)
# ---------------------------------------------------------------------------------------------

measure_scale() {
    local dir=$SCALE_DIR before after i t0 times=() ready=$SCRATCH/hold.ready
    mount_icfs_background "$dir" || return 1
    echo "startup-ms $STARTUP_MS"
    # Idle: nothing touches the mount; a second for the start to finish, then the window.
    sleep 1
    before=$(daemon_usage "$CUR_DAEMON_PID") || return 1
    sleep "$IDLE_SECS"
    after=$(daemon_usage "$CUR_DAEMON_PID") || return 1
    awk -v b="$before" -v a="$after" 'BEGIN { split(b, x, " "); split(a, y, " ")
        printf "idle-ticks %d\nidle-cpu-ms %.2f\nidle-wakeups %d\n", y[1] - x[1], (y[2] - x[2]) / 1e6, y[3] - x[3] }'
    echo "rss-start $(rss_mib "$CUR_DAEMON_PID")"
    start_holder "$ready" python3 "$SCRATCH/bin/hold.py" "$dir" "$SCALE_HANDLES" "$ready" || return 1
    echo "rss-handles $(rss_mib "$CUR_DAEMON_PID")"
    for ((i = 0; i < STATUS_REPS; i++)); do
        t0=${EPOCHREALTIME/./}
        cat "$dir/.imagecache/status" >/dev/null || return 1
        times+=($((${EPOCHREALTIME/./} - t0)))
    done
    printf '%s\n' "${times[@]}" | sort -n | awk '{ v[NR] = $1 } END { printf "status-ms %.1f\n", v[int((NR + 1) / 2)] / 1000 }'
    echo "rss-after-status $(rss_mib "$CUR_DAEMON_PID")"
    i=$(icfs_metric "$dir" imagecachefs_references)
    [[ $i == "$SCALE_HANDLES" ]] || log "scale: the daemon counts $i references, not $SCALE_HANDLES"
}

group_scale() {
    local n=$SCALE_FILES h=$SCALE_HANDLES
    SCALE_DIR=$SCRATCH/scale/_base
    mkdir -p "$SCALE_DIR"
    log "scale: $n empty cache files named like Nova originals in $SCALE_DIR"
    python3 -c 'import hashlib, os, sys
for i in range(int(sys.argv[2])):
    open(os.path.join(sys.argv[1], hashlib.sha1(b"image-%d" % i).hexdigest()), "w").close()' "$SCALE_DIR" "$n"
    settle_checksums "$SCALE_DIR"
    record first-hash "first mount over $(group_digits "$n") unhashed files: until every birth SHA-1 is known (--verify-rate 0; measured once)" s - icfs 1 "$SETTLE_SECS"
    write_group_notes scale "imagecachefs with $(group_digits "$n") cache files" "$(cat <<EOF
A cache directory of its own (\`SCRATCH/scale/_base\`, the instances directory its parent) holds
$(group_digits "$n") empty files named like Nova originals. Before the rounds, one mount computes every birth
SHA-1 (its duration is the first row). Each round then: \`imagecachefs mount DIR --background\`
timed from start to return (state file of $(group_digits "$n") entries, no pre-mount holders); one second later
the daemon's CPU over ${IDLE_SECS} s with nothing touching the mount; VmRSS; a python3 process opens
$(group_digits "$h") of the files through the mount and holds them; VmRSS; \`cat DIR/.imagecache/status\` timed
$STATUS_REPS times (median, fork and exec of \`cat\` included; with the $(group_digits "$h") holders in the table); VmRSS.
EOF
)"
    run_rounds measure_scale \
        "startup-ms|startup: \`mount --background\` until it returns|ms|-" \
        "idle-ticks|idle daemon CPU over ${IDLE_SECS} s (utime+stime)|ticks|abs==0" \
        "idle-cpu-ms|idle daemon on-CPU time over ${IDLE_SECS} s (schedstat)|ms|-" \
        "idle-wakeups|idle daemon thread context switches over ${IDLE_SECS} s|switches|-" \
        "rss-start|VmRSS after startup|MiB|-" \
        "rss-handles|VmRSS with $(group_digits "$h") open handles|MiB|abs<30" \
        "status-ms|time to \`cat .imagecache/status\` ($(group_digits "$n") rows)|ms|abs<50" \
        "rss-after-status|VmRSS with $(group_digits "$h") open handles, after the status reads|MiB|abs<30"
    rm -rf --one-file-system "$SCRATCH/scale"
}

# ---------------------------------------------------------------------------------------------
# Group sha1: checksum throughput
# ---------------------------------------------------------------------------------------------

# The value of metric $2 in the imagecachefs mount $1.
icfs_metric() { awk -v m="$2" '$1 == m { print $2 }' "$1/.imagecache/metrics"; }

measure_sha1() {
    local n0 n t0 t1 rate out
    mount_icfs "$SRC" --verify-rate 0
    wait_checksums "$SRC" 600 || return 1
    warm_up "$SRC/$READ_FILE" || return 1
    n0=$(icfs_metric "$SRC" imagecachefs_verifications_total)
    t0=${EPOCHREALTIME/./}
    "$BIN" verify "$SRC" "$READ_FILE" || return 1
    while n=$(icfs_metric "$SRC" imagecachefs_verifications_total) && ((n == n0)); do
        ((${EPOCHREALTIME/./} - t0 < 600000000)) || { log "verify did not finish in 600 s"; return 1; }
        sleep 0.01
    done
    t1=${EPOCHREALTIME/./}
    grep -q '^verified: ok ' "$SRC/.imagecache/images/$READ_FILE" || { log "verify did not say ok"; return 1; }
    awk -v b="$SIZE_BYTES" -v d=$((t1 - t0)) 'BEGIN { printf "sha1-verify %.1f\n", b / 1048576 / (d / 1e6) }'
    rate=$(icfs_metric "$SRC" imagecachefs_verifier_bytes_per_second)
    awk -v r="$rate" 'BEGIN { printf "sha1-verify-daemon %.1f\n", r / 1048576 }'
    unmount_config
    out=$SCRATCH/logs/cargo-bench-sha1.log
    run_child cargo bench --quiet --manifest-path "$REPO_DIR/Cargo.toml" --bench sha1 >"$out" 2>&1 \
        || { log "cargo bench --bench sha1 failed: $(tail -n 3 "$out" | tr '\n' ' ')"; return 1; }
    awk '/^sha1_of, / { printf "sha1-bench-mem %s\n", $(NF - 1) }
         /^sha1sum, / { printf "sha1-bench-sha1sum %s\n", $(NF - 1) }
         /^sha1_file, / { printf "sha1-bench-file %s\n", $(NF - 1) }' "$out"
}

group_sha1() {
    settle_checksums "$SRC"
    write_group_notes sha1 "SHA-1" "$(cat <<EOF
\`imagecachefs verify DIR NAME\` on the $SIZE test file (already hashed; page cache warm) in a mount
with \`--verify-rate 0\` (unpaced): time from the command to \`imagecachefs_verifications_total\`
incrementing (polled every 10 ms), and the rate the daemon reports itself
(\`imagecachefs_verifier_bytes_per_second\`). Then \`cargo bench --bench sha1\` (256 MiB, best of 3:
\`verify::sha1_of\` in memory, coreutils \`sha1sum\` and \`verify::sha1_file\` on a file). The
default \`--verify-rate\` is 64 MiB/s; these rows are the ceiling. Higher is better.
EOF
)"
    run_rounds measure_sha1 \
        "sha1-verify|\`imagecachefs verify\`, $SIZE file, command to verified|MiB/s|-" \
        "sha1-verify-daemon|\`imagecachefs verify\`, hashing rate the daemon reports|MiB/s|-" \
        "sha1-bench-mem|cargo bench: \`sha1_of\`, 256 MiB in memory|MiB/s|-" \
        "sha1-bench-file|cargo bench: \`sha1_file\` unpaced, 256 MiB file|MiB/s|-" \
        "sha1-bench-sha1sum|cargo bench: coreutils \`sha1sum\`, same file|MiB/s|-"
}

# ---------------------------------------------------------------------------------------------
# Group eviction: lag from deadline to ENOENT
# ---------------------------------------------------------------------------------------------

measure_eviction() {
    mount_icfs "$EVICT_DIR" --resized-min-age "$EVICT_MIN_AGE"
    run_child python3 "$SCRATCH/bin/evict.py" "$EVICT_DIR" "$EVICT_FILES" "$EVICT_MIN_AGE" 60
}

group_eviction() {
    EVICT_DIR=$SCRATCH/evict/_base
    mkdir -p "$EVICT_DIR"
    write_group_notes eviction "Eviction lag" "$(cat <<EOF
A cache directory of its own (\`SCRATCH/evict/_base\`; instances directory and Nova lock files in
its parent), mounted with \`--resized-min-age $EVICT_MIN_AGE\`. Each round a python3 process creates
$EVICT_FILES files \`f0001\`.. through the mount (4 KiB written each; kind "other", so the resized
threshold applies), holds a read handle on each until the daemon has hashed them all, then
closes all handles at once. A file's deadline is its close time + $EVICT_MIN_AGE s; its lag is the time
from its deadline to the first \`stat\` that says \`ENOENT\` (every remaining file is stat-ed every
10 ms). Cells: median over rounds of each round's median, and the largest lag of any round.
EOF
)"
    run_rounds measure_eviction \
        "evict-lag|eviction lag, median of $EVICT_FILES files|ms|abs<=1000" \
        "evict-lag-max|eviction lag, largest of $EVICT_FILES files (largest of all rounds)|ms|-"
    rm -rf --one-file-system "$SCRATCH/evict"
}
# ---------------------------------------------------------------------------------------------
# Group restart: from a server's death, or `imagecachefs restart`, to the first answer
# ---------------------------------------------------------------------------------------------

# restart.py DIR SUPERVISOR BIN RUNS: RUNS times, SIGKILL the server (the supervisor's child)
# and time from the kill to the first answered `stat` of a fresh name (ENOENT, which only the
# daemon can say: no cache can answer a name never looked up); then RUNS times
# `BIN restart DIR` and the same `stat`. Prints "ID VALUE" lines (milliseconds), and every
# run's value on stderr.
write_restart_helper() {
    cat >"$SCRATCH/bin/restart.py" <<'PY'
import os, signal, statistics, subprocess, sys, time
d, sup, binary, runs = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])

def children():
    out = []
    for t in os.listdir(f"/proc/{sup}/task"):
        with open(f"/proc/{sup}/task/{t}/children") as f:
            out += [int(x) for x in f.read().split()]
    return out

def answering_server(old, limit=10.0):
    """The server `.imagecache/server` names, once it is a child of the supervisor other
    than `old`."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        try:
            with open(os.path.join(d, ".imagecache/server")) as f:
                pid = int(dict(l.split(": ", 1) for l in f.read().splitlines() if ": " in l)["pid"])
            if pid != old and pid in children():
                return pid
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    sys.exit(f"no new server answered within {limit} s")

def dead(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1].startswith("Z")
    except OSError:
        return True

def first_answer(tag, i):
    try:
        os.stat(os.path.join(d, f"fresh-{tag}-{os.getpid()}-{i}-{time.monotonic_ns()}"))
    except FileNotFoundError:
        return time.perf_counter()
    sys.exit("a fresh name exists")

def show(tag, ms):
    print(f"{tag} {statistics.median(ms):.1f}")
    print(f"{tag}-max {max(ms):.1f}")
    print(f"{tag}: " + " ".join(f"{v:.1f}" for v in ms), file=sys.stderr)

server = answering_server(0)
kill = []
for i in range(runs):
    t0 = time.perf_counter()
    os.kill(server, signal.SIGKILL)
    end = time.monotonic() + 10
    while not dead(server):
        if time.monotonic() > end:
            sys.exit(f"server {server} still alive 10 s after SIGKILL")
        time.sleep(0.0002)
    t1 = first_answer("kill", i)
    kill.append((t1 - t0) * 1e3)
    server = answering_server(server)
    time.sleep(0.2)
show("restart-kill", kill)

upgrade = []
for i in range(runs):
    t0 = time.perf_counter()
    r = subprocess.run([binary, "restart", d], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        sys.exit(f"imagecachefs restart failed ({r.returncode}): {r.stdout.decode()}")
    t1 = first_answer("upgrade", i)
    upgrade.append((t1 - t0) * 1e3)
    server = answering_server(server)
    time.sleep(0.2)
show("restart-upgrade", upgrade)
PY
}

measure_restart() {
    mount_icfs "$SRC"
    run_child python3 "$SCRATCH/bin/restart.py" "$SRC" "$CUR_DAEMON_PID" "$BIN" "$RESTART_RUNS"
}

group_restart() {
    RESTART_RUNS=20
    write_restart_helper
    write_group_notes restart "Restart without unmount" "$(cat <<EOF
One foreground mount per round (\`imagecachefs mount DIR\`: the supervisor and its server), measured
by \`benches/run.sh --groups restart\`. Kill: $RESTART_RUNS times, \`kill -9\` of the server (the
supervisor's child), then, as soon as it is dead, a \`stat\` of a name never looked up before
(\`ENOENT\`: only a server can answer it, no kernel cache can); the time is from the kill to that
\`stat\`'s return. Upgrade: $RESTART_RUNS times \`imagecachefs restart DIR\` (the supervisor re-executes
itself and starts a new server, same binary), then the same \`stat\`; the time is from starting the
command to that \`stat\`'s return. 200 ms pause between runs. Lower is better; the "-max" rows are
the largest of all rounds.
EOF
)"
    run_rounds measure_restart \
        "restart-kill|server \`kill -9\` to first answered request, median of $RESTART_RUNS|ms|abs<50" \
        "restart-kill-max|server \`kill -9\` to first answered request, largest of $RESTART_RUNS|ms|-" \
        "restart-upgrade|\`imagecachefs restart\` to first answered request, median of $RESTART_RUNS|ms|abs<50" \
        "restart-upgrade-max|\`imagecachefs restart\` to first answered request, largest of $RESTART_RUNS|ms|-"
}

# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

describe_configs() {
    local c
    for c in "${CONFIGS[@]}"; do
        case $c in
            native) echo "- native: the plain directory (\`$(findmnt -n -o FSTYPE -T "$SRC" | head -n1)\` on \`$(findmnt -n -o SOURCE -T "$SRC" | head -n1)\`)" ;;
            icfs) echo "- icfs: \`imagecachefs mount DIR${ICFS_OPTS:+ $ICFS_OPTS}\` over the directory itself (foreground daemon, release build)" ;;
            bindfs) echo "- bindfs: \`bindfs${BINDFS_OPTS:+ $BINDFS_OPTS} SRC MNT\` (defaults: single-threaded, kernel page cache; O_DIRECT is not forwarded, so its O_DIRECT rows are served from the page cache)" ;;
            mergerfs) echo "- mergerfs: \`mergerfs${MERGERFS_OPTS:+ $MERGERFS_OPTS} SRC MNT\` (single branch; cache.files=off = direct_io, no FUSE page cache, as mergerfs documents for files changed outside it)" ;;
        esac
    done
}

# One line about the imagecachefs daemon logs: did passthrough engage, anything logged loudly.
icfs_log_summary() {
    local logf pt n
    logf=$(ICFS_LOG)
    [[ -s $logf ]] || return 0
    pt=$(grep -m1 -i 'passthrough' "$logf" | sed 's/^\[[^]]*\] *//') || pt='no line mentions passthrough'
    n=$(grep -c -E 'WARN|ERROR' "$logf") || true
    echo "- imagecachefs log (all mounts): \"$pt\"; $n warning/error line(s)"
}

tool_versions() {
    local v=()
    command -v fio >/dev/null && v+=("$(fio --version)")
    command -v bindfs >/dev/null && v+=("bindfs $(bindfs --version 2>&1 | awk '{ print $2; exit }')")
    command -v mergerfs >/dev/null && v+=("mergerfs $(mergerfs --version 2>&1 | awk '{ print $3; exit }')")
    v+=("$(python3 --version)")
    command -v cc >/dev/null && v+=("cc $(cc -dumpfullversion 2>/dev/null || cc -dumpversion)")
    command -v rustc >/dev/null && v+=("$(rustc --version | awk '{ print $1, $2 }')")
    local joined
    joined=$(IFS=,; echo "${v[*]}")
    echo "${joined//,/, }"
}

write_report() {
    local header
    header=$(cat <<EOF
# imagecachefs performance

Generated by \`benches/run.sh${CMDLINE:+ $CMDLINE}\` on $(date -u +%Y-%m-%dT%H:%M:%SZ) ($(date -u -d "@$RUN_START" +%H:%M)–$(date -u +%H:%M) UTC, one run).
Do not edit by hand: rerun the script.

- machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')), $(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo) memory; load average at start $LOAD_START, at end $(cut -d' ' -f1-3 /proc/loadavg)
- kernel: $(uname -r)
- tools: $(tool_versions); imagecachefs $ICFS_VERSION
- groups: ${BENCH_GROUPS[*]}; $ROUNDS round(s) each, configurations interleaved (each round runs every configuration once, each on a fresh mount, starting one configuration later than the round before); imagecachefs-only measurements: one fresh mount per round
$(describe_configs)
$(icfs_log_summary)

Cells: median over the rounds (ratio to native's median). Only ratios are meaningful: this is a
shared, noisy 2-core VM (every round's value is in the spread tables).
EOF
)
    printf '%s\n' "$header" >"$SCRATCH/report-header.md"
    python3 - "$RESULTS" "$OUT" "$CONFIGS_CSV" "$SCRATCH/report-header.md" "$SCRATCH/notes" \
        "$(IFS=,; echo "${BENCH_GROUPS[*]}")" <<'PY'
import os, statistics, sys
from collections import OrderedDict
results, out, configs, header_path, notes_dir, groups = sys.argv[1:7]
configs, groups = configs.split(","), groups.split(",")
header = open(header_path).read().rstrip("\n")
names = {"native": "native", "icfs": "imagecachefs", "bindfs": "bindfs", "mergerfs": "mergerfs"}
rows = OrderedDict()
for line in open(results):
    group, wid, label, unit, target, config, rnd, value = line.rstrip("\n").split("\t")
    r = rows.setdefault((group, wid), {"group": group, "id": wid, "label": label, "unit": unit,
                                       "target": target, "vals": {}})
    r["vals"].setdefault(config, []).append(None if value == "error" else float(value))

def fmt(v, unit=""):
    if v is None:
        return "error"
    if unit == "IOPS" or abs(v) >= 100:
        return f"{v:,.0f}"
    if v == int(v):
        return f"{v:.0f}"
    return f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}" if abs(v) >= 0.1 else f"{v:.3f}"

def aggregate(wid, vs):
    """Median over the rounds ('-max' rows: the largest); None if any round failed."""
    ok = [v for v in vs if v is not None]
    if not ok or len(ok) != len(vs):
        return None
    return max(ok) if wid.endswith("-max") else statistics.median(ok)

def verdict(r, med):
    """(holds, text) for a row with a target."""
    t, m, unit = r["target"], med.get("icfs"), r["unit"]
    base = med.get("native")
    if m is None:
        return False, "imagecachefs: error"
    if t.startswith("beats:"):
        others = [c for c in t[6:].split(",") if c in configs]
        ok = bool(others) and all(med.get(c) is not None and m > med[c] for c in others)
        return ok, (f"imagecachefs {fmt(m, unit)} {unit} vs " +
                    ", ".join(f"{names[c]} {fmt(med.get(c), unit)}" for c in others) +
                    " (target: above " + " and ".join(names[c] for c in others) + ")")
    if t.startswith("abs"):
        for op in ("<=", ">=", "==", "<", ">"):
            if t[3:].startswith(op):
                lim = float(t[3 + len(op):])
                ok = {"<=": m <= lim, ">=": m >= lim, "==": m == lim, "<": m < lim, ">": m > lim}[op]
                return ok, f"imagecachefs {fmt(m, unit)} {unit} (target {op} {fmt(lim)} {unit})"
        raise SystemExit(f"bad target {t!r}")
    if not base:
        return False, "native: error"
    ratio = m / base
    if t.startswith("within:"):
        x = float(t[7:])
        return ratio >= 1 / x, f"imagecachefs {ratio:.3f}x native (target: within {x:g}x, i.e. >= {1 / x:.3f}x)"
    return ratio >= float(t), f"imagecachefs {ratio:.3f}x native (target >= {float(t):.2f}x)"

lines, verdicts, missed = [header], [], 0
for group in groups:
    grows = [r for r in rows.values() if r["group"] == group]
    if not grows:
        continue
    path = os.path.join(notes_dir, group + ".md")
    lines += [""] + ([open(path).read().rstrip("\n")] if os.path.exists(path) else [f"## {group}"])
    compared = [r for r in grows if set(r["vals"]) - {"icfs"}]
    alone = [r for r in grows if not set(r["vals"]) - {"icfs"}]
    if compared:
        lines += ["", "| workload | unit | " + " | ".join(names[c] for c in configs) + " |",
                  "|---|---|" + "---:|" * len(configs)]
        spread = ["| workload | " + " | ".join(names[c] for c in configs) + " |",
                  "|---|" + "---|" * len(configs)]
        for r in compared:
            unit = r["unit"]
            med = {c: aggregate(r["id"], r["vals"].get(c, [])) for c in configs}
            r["med"] = med
            base = med.get("native")
            cells = []
            for c in configs:
                m = med[c]
                if m is None:
                    cells.append("error" if r["vals"].get(c) else "-")
                elif c == "native" or not base:
                    cells.append(fmt(m, unit))
                else:
                    cells.append(f"{fmt(m, unit)} ({m / base:.2f}x)")
            lines.append(f"| {r['label']} | {unit} | " + " | ".join(cells) + " |")
            spread.append(f"| {r['id']} | " + " | ".join(
                " / ".join(fmt(v, unit) for v in r["vals"].get(c, [])) or "-" for c in configs) + " |")
        lines += ["", "Every round's value (round 1 / round 2 / ...):", ""] + spread
    if alone:
        lines += ["", "| measurement | unit | imagecachefs | every round | target |",
                  "|---|---|---:|---|---|"]
        for r in alone:
            med = {"icfs": aggregate(r["id"], r["vals"]["icfs"])}
            r["med"] = med
            tshow = r["target"].replace("abs", "").replace("==", "= ") if r["target"] != "-" else ""
            lines.append(f"| {r['label']} | {r['unit']} | {fmt(med['icfs'], r['unit'])} | " +
                         " / ".join(fmt(v, r["unit"]) for v in r["vals"]["icfs"]) + f" | {tshow} |")
    for r in grows:
        if r["target"] != "-" and "icfs" in r["vals"]:
            ok, text = verdict(r, r["med"])
            missed += not ok
            verdicts.append(f"- {'holds' if ok else '**MISSED**'}: {r['label']}: {text}")
lines += ["", "## Targets", ""] + (verdicts or ["- (no target in the groups run)"])
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
    RUN_START=$(date +%s)
    parse_args "$@"
    ((EUID == 0)) || die "run as root (it mounts, and drops the page cache)"
    [[ -e /dev/fuse ]] || die "/dev/fuse is missing (modprobe fuse)"
    trap cleanup EXIT
    trap 'log "interrupted: cleaning up"; exit 130' INT
    trap 'log "terminated: cleaning up"; exit 143' TERM
    install_tools
    build_binary
    make_scratch
    copy_binary
    write_python_helpers
    make_test_files
    if uses_icfs; then settle_checksums "$SRC"; fi
    LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
    log "configs: ${CONFIGS[*]}; groups: ${BENCH_GROUPS[*]}; $ROUNDS round(s) x ${RUNTIME} s, file $SIZE"
    local g rc=0
    for g in "${BENCH_GROUPS[@]}"; do
        CUR_GROUP=$g
        log "group $g"
        "group_$g"
    done
    CUR_GROUP=''
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
