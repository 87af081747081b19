#!/usr/bin/env bash
# Builds the Debian package in one command: target/debian/imagecachefs_VERSION-1_ARCH.deb.
# Installs cargo-deb when it is missing, builds the release binary, generates the man pages
# from the clap definitions, makes the packaged copies of the unit and the fstab helper
# (pointing at /usr/bin/imagecachefs), then runs `cargo deb --no-build`. Prints the .deb's
# path last.
set -euo pipefail

case ${1-} in
    -h | --help)
        sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'
        exit 0 ;;
    '') ;;
    *) echo "build-deb: unknown argument $1 (see --help)" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."

if ! cargo deb --version >/dev/null 2>&1; then
    echo "build-deb: installing cargo-deb" >&2
    cargo install cargo-deb --locked
fi
cargo build --release --locked
target=${CARGO_TARGET_DIR:-target}
assets=target/deb-assets
rm -rf "$assets"
mkdir -p "$assets/man"
"$target/release/imagecachefs" man "$assets/man"
# The unit and the helper as installed: the binary is /usr/bin/imagecachefs, not the
# /usr/local/bin of a hand install.
sed 's|/usr/local/bin/imagecachefs|/usr/bin/imagecachefs|g' mount-scripts/imagecachefs.service \
    >"$assets/imagecachefs.service"
grep -q '^packaged_bin=$' mount-scripts/mount.fuse.imagecachefs ||
    { echo "build-deb: mount.fuse.imagecachefs has no packaged_bin= line" >&2; exit 1; }
sed 's|^packaged_bin=$|packaged_bin=/usr/bin/imagecachefs|' mount-scripts/mount.fuse.imagecachefs \
    >"$assets/mount.fuse.imagecachefs"
out=$(cargo deb --no-build --locked 2>&1) || { echo "$out" >&2; exit 1; }
deb=$(printf '%s\n' "$out" | grep '\.deb$' | tail -n 1)
[ -f "$deb" ] || { echo "build-deb: cargo deb did not name a .deb: $out" >&2; exit 1; }
echo "$deb"
