#!/usr/bin/env bash
# Checks that a compute node is ready for imagecachefs; run it before the first mount.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: preflight.sh [--cache-dir DIR] [--nova-conf FILE]

Checks that this machine is ready for `imagecachefs mount DIR`:
  - running as root, with CAP_SYS_ADMIN (needed to mount and for kernel passthrough)
  - /dev/fuse exists
  - kernel FUSE passthrough: Linux >= 6.9 and CONFIG_FUSE_PASSTHROUGH=y in
    /boot/config-$(uname -r) or /proc/config.gz ("unknown" when neither exists)
  - DIR is a directory, not already an imagecachefs mount (live or dead), and
    holds no entry named .imagecache
  - free inodes on DIR's filesystem (df -i)
  - the hard limit on open files (ulimit -Hn >= 65536 recommended)
  - mount propagation, for Nova in containers: the mount holding DIR is shared
    (so a mount made on DIR reaches containers), and every nova-compute,
    libvirtd and virtqemud running in another mount namespace receives mounts
    from it (its volume is rslave or rshared, not private)
  - processes holding files under DIR open (a warning: imagecachefs finds them
    at mount time and counts them as holders until they close those files)
  - nova.conf sets [image_cache] remove_unused_base_images = False (otherwise
    Nova's own cache manager deletes images behind imagecachefs's back)
  - imagecachefs accepts the configuration: its own check,
    `imagecachefs mount DIR --check --nova-conf FILE`, runs (the binary is
    $IMAGECACHEFS_BIN if set, else imagecachefs on PATH)

Options:
  --cache-dir DIR    the image cache [default: /var/lib/nova/instances/_base]
  --nova-conf FILE   Nova's configuration [default: /etc/nova/nova.conf; the
                     check is skipped with a note when the default is absent]
  -h, --help         this text

Prints one line per check (ok, warn, note or FAIL). Exit status: 0 when
nothing failed (warnings allowed), 1 with the list of failures, 2 bad usage.
EOF
}

cache_dir=/var/lib/nova/instances/_base
nova_conf=/etc/nova/nova.conf
nova_conf_given=0
while [ $# -gt 0 ]; do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --cache-dir) [ $# -ge 2 ] || { echo "preflight: --cache-dir needs a value" >&2; exit 2; }
            cache_dir=$2; shift 2 ;;
        --cache-dir=*) cache_dir=${1#*=}; shift ;;
        --nova-conf) [ $# -ge 2 ] || { echo "preflight: --nova-conf needs a value" >&2; exit 2; }
            nova_conf=$2; nova_conf_given=1; shift 2 ;;
        --nova-conf=*) nova_conf=${1#*=}; nova_conf_given=1; shift ;;
        *) echo "preflight: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

failures=()
warnings=0
ok() { printf 'ok    %s\n' "$*"; }
note() { printf 'note  %s\n' "$*"; }
warn() { printf 'warn  %s\n' "$*"; warnings=$((warnings + 1)); }
fail() { printf 'FAIL  %s\n' "$*"; failures+=("$*"); }

# The absolute path of $1 without touching $1 itself (it may be a dead mount).
absolute() {
    local p=$1 parent name
    while [ "${#p}" -gt 1 ] && [ "${p%/}" != "$p" ]; do p=${p%/}; done
    [ "$p" = / ] && { echo /; return; }
    case $p in
        */*) parent=${p%/*}; name=${p##*/} ;;
        *) parent=.; name=$p ;;
    esac
    [ -n "$parent" ] || parent=/
    parent=$(cd "$parent" 2>/dev/null && pwd -P) || return 1
    [ "$parent" = / ] && parent=
    echo "$parent/$name"
}

# --- privileges ------------------------------------------------------------------------------
uid=$(id -u)
if [ "$uid" -eq 0 ]; then
    ok "running as root"
else
    fail "not running as root (uid $uid): imagecachefs mounts and must run as root"
fi
capeff=$(awk '/^CapEff:/ { print $2 }' /proc/self/status 2>/dev/null || true)
if [ -n "$capeff" ] && (((16#$capeff >> 21) & 1)); then
    ok "CAP_SYS_ADMIN is in the effective capability set"
elif [ -n "$capeff" ]; then
    fail "no CAP_SYS_ADMIN (CapEff $capeff): mounting and kernel FUSE passthrough need it"
fi

# --- FUSE ------------------------------------------------------------------------------------
if [ -c /dev/fuse ]; then
    ok "/dev/fuse exists"
else
    fail "/dev/fuse is missing: load the fuse kernel module (modprobe fuse)"
fi

release=$(uname -r)
if [[ $release =~ ^([0-9]+)\.([0-9]+) ]]; then
    major=${BASH_REMATCH[1]}
    minor=${BASH_REMATCH[2]}
    if [ "$major" -gt 6 ] || { [ "$major" -eq 6 ] && [ "$minor" -ge 9 ]; }; then
        ok "kernel $release is >= 6.9 (FUSE passthrough)"
    else
        fail "kernel $release is older than 6.9: no FUSE passthrough, imagecachefs would serve every VM read itself"
    fi
else
    warn "cannot parse the kernel release '$release'; FUSE passthrough needs Linux >= 6.9"
fi

kconfig=
if [ -r "/boot/config-$release" ]; then
    kconfig=$(grep -E '(^| )CONFIG_FUSE_PASSTHROUGH[= ]' "/boot/config-$release" || true)
    kconfig_from=/boot/config-$release
elif [ -r /proc/config.gz ]; then
    kconfig=$(gzip -dc /proc/config.gz | grep -E '(^| )CONFIG_FUSE_PASSTHROUGH[= ]' || true)
    kconfig_from=/proc/config.gz
else
    kconfig_from=
fi
if [ -z "$kconfig_from" ]; then
    note "CONFIG_FUSE_PASSTHROUGH: unknown (neither /boot/config-$release nor /proc/config.gz exists); the daemon's log says \"passthrough on\" or \"OFF\""
elif [ "$kconfig" = CONFIG_FUSE_PASSTHROUGH=y ]; then
    ok "CONFIG_FUSE_PASSTHROUGH=y ($kconfig_from)"
else
    fail "the kernel is built without CONFIG_FUSE_PASSTHROUGH=y ($kconfig_from): imagecachefs would serve every VM read itself"
fi

# --- the cache directory ---------------------------------------------------------------------
dir=$(absolute "$cache_dir") || dir=
dir_ok=0
if [ -z "$dir" ]; then
    fail "$cache_dir: its parent directory does not exist"
else
    top=$(awk -v want="${dir// /\\040}" '
        { split($0, halves, " - "); split(halves[1], f, " "); split(halves[2], g, " ") }
        f[5] == want { top = g[1] }
        END { print top }
    ' /proc/self/mountinfo)
    if [ "$top" = fuse.imagecachefs ]; then
        # statfs always reaches the daemon; a plain stat may be answered from the kernel's cache.
        if stat -f "$dir" >/dev/null 2>&1; then
            fail "$dir is already an imagecachefs mount (imagecachefs status $dir)"
        else
            fail "$dir is a dead imagecachefs mount (its daemon is gone): run imagecachefs unmount $dir"
        fi
    elif [ ! -e "$dir" ]; then
        warn "$dir does not exist yet: mount --create-dir (the systemd unit uses it; fstab option create_dir) makes it, owned like ${dir%/*}"
    elif [ ! -d "$dir" ]; then
        fail "$dir is not a directory"
    else
        dir_ok=1
        ok "$dir is a directory and not an imagecachefs mount"
        if [ -e "$dir/.imagecache" ] || [ -L "$dir/.imagecache" ]; then
            fail "$dir/.imagecache exists: that name is imagecachefs's status tree, rename it first"
        fi
    fi
fi

if [ "$dir_ok" -eq 1 ]; then
    if read -r inodes ifree < <(df -Pi "$dir" 2>/dev/null | awk 'NR == 2 { print $2, $4 }'); then
        if ! [[ $inodes =~ ^[0-9]+$ ]] || [ "$inodes" -eq 0 ]; then
            note "$dir's filesystem does not report an inode count (allocated on demand)"
        elif [ "$ifree" -lt 1000 ]; then
            fail "only $ifree free inodes on $dir's filesystem (df -i): Nova cannot download images"
        else
            ok "$ifree free inodes on $dir's filesystem"
        fi
    else
        warn "df -i $dir failed"
    fi
fi

# --- mount propagation (Nova in containers) -----------------------------------------------------
# A mount made on DIR reaches another mount namespace (a container's) only through propagation:
# the host's mount holding DIR must be shared, and the container's copy of it a slave or a peer
# of that group (kolla and docker: a volume with :rslave or :rshared; Kubernetes:
# mountPropagation HostToContainer or Bidirectional). A private copy keeps showing the covered
# directory. Only the kernel's mount tables are read: nothing is stat'ed.
# The mount holding $1, in the mountinfo file $2:
# "ID MAJ:MIN ROOT MOUNTPOINT OPTIONAL-FIELDS...".
holding_mount() {
    awk -v want="${1// /\\040}" '
        { split($0, halves, " - "); n = split(halves[1], f, " ") }
        want == f[5] || index(want "/", (f[5] == "/" ? "/" : f[5] "/")) == 1 {
            if (length(f[5]) >= best) {
                best = length(f[5]); opt = ""
                for (i = 7; i <= n; i++) opt = opt " " f[i]
                line = f[1] " " f[3] " " f[4] " " f[5] opt
            }
        }
        END { print line }
    ' "$2"
}
if [ "$dir_ok" -eq 1 ] || [ -d "${dir%/*}" ]; then
    read -r _ host_dev host_root host_mp host_opts <<<"$(holding_mount "$dir" /proc/self/mountinfo)"
    # DIR as a path inside its filesystem (what a container's bind of it shows as its root).
    rel=$dir
    [ "$host_mp" = / ] || rel=${dir#"$host_mp"}
    fs_path=${host_root%/}$rel
    group=
    for o in $host_opts; do
        case $o in shared:*) group=${o#shared:} ;; esac
    done
    if [ -n "$group" ]; then
        ok "$host_mp (holding $dir) is a shared mount (peer group $group): a mount on $dir reaches containers that bind it rslave or rshared"
    else
        warn "$host_mp (holding $dir) is not a shared mount: a mount on $dir reaches no container started before it (mount --make-rshared $host_mp; systemd makes / shared)"
    fi
    own_ns=$(readlink /proc/self/ns/mnt)
    for comm_file in /proc/[0-9]*/comm; do
        pid=${comm_file#/proc/}
        pid=${pid%/comm}
        comm=$(cat "$comm_file" 2>/dev/null) || continue
        case $comm in nova-compute | libvirtd | virtqemud) ;; *) continue ;; esac
        ns=$(readlink "/proc/$pid/ns/mnt" 2>/dev/null) || continue
        [ "$ns" != "$own_ns" ] || continue
        # Where DIR shows in its namespace: every mount of DIR's filesystem whose root holds
        # DIR, at the path where it shows it, if no other mount covers that path there. Each
        # such view must receive from our peer group; one that does not keeps the covered
        # directory (another view receiving, such as a second volume of the same disk, does not
        # help the processes that use this one).
        found=$(awk -v dev="$host_dev" -v group="$group" -v want="${fs_path// /\\040}" '
            { split($0, halves, " - "); n = split(halves[1], f, " ")
              m++; mp[m] = f[5]; dv[m] = f[3]; rt[m] = f[4]; gets[m] = 0
              for (i = 7; i <= n; i++) if (group != "" && (f[i] == "master:" group || f[i] == "shared:" group)) gets[m] = 1 }
            function under(p, top) { return top == "/" || p == top || index(p, top "/") == 1 }
            END {
                verdict = "none"
                for (c = 1; c <= m; c++) {
                    if (dv[c] != dev || !under(want, rt[c])) continue
                    rest = (rt[c] == "/") ? want : substr(want, length(rt[c]) + 1)
                    at = (mp[c] == "/") ? rest : mp[c] rest
                    if (at == "") at = "/"
                    # The mount that path resolves to: the deepest mount point over it, the
                    # last mounted of equals.
                    best = 0
                    for (o = 1; o <= m; o++) if (under(at, mp[o]) && (best == 0 || length(mp[o]) >= length(mp[best]))) best = o
                    if (best != c) continue
                    if (gets[c]) { if (verdict == "none") verdict = "receives" }
                    else { verdict = "private " at; break }
                }
                print verdict
            }
        ' "/proc/$pid/mountinfo" 2>/dev/null) || continue
        case $found in
            receives) ok "pid $pid ($comm) in another mount namespace receives mounts from $host_mp (rslave or rshared)" ;;
            private\ *) fail "pid $pid ($comm) is in a mount namespace whose view of $dir (at ${found#private }) does not receive mounts (private propagation): it would keep seeing the covered $dir; recreate its container with the volume rslave or rshared (OPERATIONS.md, Nova in containers)" ;;
            none) note "pid $pid ($comm) is in another mount namespace without $host_mp's filesystem: not checked" ;;
        esac
    done
fi

# --- limits ----------------------------------------------------------------------------------
hard=$(ulimit -Hn)
if [ "$hard" = unlimited ] || [ "$hard" -ge 65536 ]; then
    ok "hard limit on open files is $hard"
else
    warn "hard limit on open files is $hard here; >= 65536 recommended (imagecachefs.service sets LimitNOFILE=1048576)"
fi

# --- processes holding cache files open -------------------------------------------------------
if [ "$dir_ok" -eq 1 ]; then
    pattern="$(printf '%s' "$dir" | sed 's/[][*?\\]/\\&/g')/*"
    found=$(find /proc/[0-9]*/fd -mindepth 1 -maxdepth 1 -lname "$pattern" -printf '%h %l\n' 2>/dev/null |
        sort -u || true)
    holders=()
    while read -r fddir target; do
        [ -n "$fddir" ] || continue
        pid=${fddir#/proc/}
        pid=${pid%/fd}
        # This script and its own children inherit its caller's descriptors: not holders.
        ancestor=$pid
        while [ "$ancestor" -gt 1 ] && [ "$ancestor" -ne $$ ]; do
            ancestor=$(awk '/^PPid:/ { print $2 }' "/proc/$ancestor/status" 2>/dev/null || echo 0)
            [ -n "$ancestor" ] || ancestor=0
        done
        [ "$ancestor" -eq $$ ] && continue
        comm=$(cat "/proc/$pid/comm" 2>/dev/null) || continue # gone meanwhile
        holders+=("pid $pid ($comm): $target")
    done <<<"$found"
    if [ "${#holders[@]}" -eq 0 ]; then
        ok "no process holds a file under $dir open"
    else
        warn "${#holders[@]} open file(s) under $dir; imagecachefs will count them as held from before the mount until they are closed:"
        printf '        %s\n' "${holders[@]}"
    fi
fi

# --- nova.conf -------------------------------------------------------------------------------
if [ ! -e "$nova_conf" ] && [ "$nova_conf_given" -eq 0 ]; then
    note "$nova_conf not found: remove_unused_base_images not checked (use --nova-conf FILE)"
elif [ ! -r "$nova_conf" ]; then
    fail "$nova_conf cannot be read"
else
    # oslo.config's INI rules: "key = value" or "key: value" (the first = or : splits),
    # # and ; comment lines, section names other than DEFAULT compared lowercased, the last
    # assignment wins; [image_cache] is read before the legacy [DEFAULT] name.
    found=$(awk '
        function trim(s) { sub(/^[ \t]+/, "", s); sub(/[ \t]+$/, "", s); return s }
        /^[#;]/ { next }
        /^\[/ { s = $0; sub(/^\[/, "", s); sub(/\][ \t]*$/, "", s); section = (s == "DEFAULT") ? s : tolower(s); next }
        /^[^ \t]/ && match($0, /[=:]/) {
            key = trim(substr($0, 1, RSTART - 1)); value = trim(substr($0, RSTART + 1))
            if (value ~ /^".*"$/ || value ~ /^'\''.*'\''$/) value = substr(value, 2, length(value) - 2)
            if (key == "remove_unused_base_images" && (section == "image_cache" || section == "DEFAULT"))
                found[section] = NR " " value
        }
        END {
            if ("image_cache" in found) print "image_cache " found["image_cache"]
            else if ("DEFAULT" in found) print "DEFAULT " found["DEFAULT"]
        }
    ' "$nova_conf")
    if [ -z "$found" ]; then
        fail "$nova_conf does not set [image_cache] remove_unused_base_images (Nova's default is True): Nova would delete images behind imagecachefs's back; set it to False"
    else
        read -r section line value <<<"$found"
        where="$nova_conf:$line: [$section] remove_unused_base_images = $value"
        case ${value,,} in
            false | no | off | 0) ok "$where" ;;
            true | yes | on | 1)
                fail "$where: Nova would delete images behind imagecachefs's back; set it to False" ;;
            # Not a boolean: the daemon's own check below refuses it, naming the line.
            *) ;;
        esac
    fi
fi

# --- the daemon's own configuration check ----------------------------------------------------
# What `imagecachefs mount` would refuse (out-of-range values, an instances_path that does not
# exist, ...) is refused here by the same parser, not guessed by this script.
bin=${IMAGECACHEFS_BIN:-}
[ -n "$bin" ] || bin=$(command -v imagecachefs || true)
check=("$bin" mount "${dir:-$cache_dir}" --check)
[ -r "$nova_conf" ] && check+=(--nova-conf "$nova_conf")
if [ -z "$bin" ]; then
    fail "imagecachefs is not on PATH (install it, or set IMAGECACHEFS_BIN): its configuration check did not run"
elif why=$("${check[@]}" 2>&1 >/dev/null); then
    ok "imagecachefs mount --check accepts the configuration"
    # Shared storage (NFS, CephFS, GlusterFS, ...): the daemon evicts nothing there.
    shown=$("${check[@]}" 2>/dev/null || true)
    if printf '%s\n' "$shown" | grep -qx 'storage: shared'; then
        fs=$(printf '%s\n' "$shown" | sed -n 's/^filesystem: //p')
        warn "${dir:-$cache_dir} is on shared storage ($fs): imagecachefs will evict nothing there (--shared to coordinate eviction with the other hosts, --storage local if only this host uses it)"
    fi
else
    fail "imagecachefs refuses the configuration: ${why#imagecachefs: }"
fi

# --- the kernel's FUSE request timeout -----------------------------------------------------------
# Linux 6.14+ aborts a FUSE connection whose oldest request waits longer than this. When the
# imagecachefs server is replaced (a crash, `imagecachefs restart`), requests wait a few
# milliseconds; a timeout shorter than the worst restart kills the mount under every VM.
fuse_sys=${IMAGECACHEFS_FUSE_SYSCTL_DIR:-/proc/sys/fs/fuse}
for knob in default_request_timeout max_request_timeout; do
    [ -r "$fuse_sys/$knob" ] || continue
    secs=$(cat "$fuse_sys/$knob")
    if [ "$secs" != 0 ]; then
        warn "fs.fuse.$knob is $secs: the kernel aborts the mount if a server restart takes longer (set it to 0)"
    else
        ok "fs.fuse.$knob is 0 (no request timeout)"
    fi
done

# --- summary ---------------------------------------------------------------------------------
if [ "${#failures[@]}" -gt 0 ]; then
    echo
    echo "preflight: ${#failures[@]} problem(s) to fix before mounting imagecachefs:"
    printf '  - %s\n' "${failures[@]}"
    exit 1
fi
echo
echo "preflight: ready for imagecachefs ($warnings warning(s))"
