#!/usr/bin/env bash
# Build the tollgate Debian package with dpkg-deb alone (no cargo-deb).
#
#   deploy/debian/build-deb.sh [--binary PATH] [--out DIR]
#
# --binary  the tollgate binary to package. Default: `cargo build --release`, then
#           target/release/tollgate (or $CARGO_TARGET_DIR/release/tollgate).
# --out     where to write the .deb. Default: target/debian.
#
# The package holds:
#   /usr/bin/tollgate                       the binary, debug info stripped
#   /etc/tollgate/tollgate.toml             deploy/tollgate.example.toml (a conffile)
#   /lib/systemd/system/tollgate-*.service  deploy/systemd/ with /usr/bin/tollgate and
#                                           the `tollgate` system user instead of a
#                                           dynamic one; every other line as there
#   /usr/share/doc/tollgate/                README.md, operations.md, copyright
# postinst creates the `tollgate` system user and /var/lib/tollgate (the spill
# directory, proxy.meter.spill_dir) owned by it; the services are neither enabled
# nor started. `dpkg --purge` removes the user, the spill directory and the config.
#
# The path of the .deb is the last line printed.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
binary=
out=

usage() {
    sed -n '2,9s/^# \{0,1\}//p' "$0" >&2
    exit 2
}

while [ $# -gt 0 ]; do
    case "$1" in
        --binary) binary=${2:?--binary needs a path}; shift 2 ;;
        --out) out=${2:?--out needs a directory}; shift 2 ;;
        -h|--help) usage ;;
        *) echo "build-deb.sh: unknown argument $1" >&2; usage ;;
    esac
done

fail() {
    echo "build-deb.sh: $*" >&2
    exit 1
}

command -v dpkg-deb >/dev/null || fail "dpkg-deb is missing: apt-get install dpkg"
target_dir=${CARGO_TARGET_DIR:-$root/target}
out=${out:-$target_dir/debian}

if [ -z "$binary" ]; then
    (cd "$root" && cargo build --release --locked --bin tollgate) \
        || fail "cargo build --release failed; fix the build or pass --binary PATH"
    binary=$target_dir/release/tollgate
fi
[ -x "$binary" ] || fail "$binary is not an executable file; pass --binary PATH of a built tollgate"

version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' "$root/Cargo.toml")
[ -n "$version" ] || fail "no version in [workspace.package] of $root/Cargo.toml"
arch=$(dpkg --print-architecture)

# Shared libraries the binary needs: only the C library and libgcc's unwinder
# are expected; anything else needs a Depends line added here.
glibc=2.17
if command -v readelf >/dev/null; then
    needed=$(readelf -d "$binary" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p')
    for lib in $needed; do
        case "$lib" in
            libc.so.6|libm.so.6|libdl.so.2|libpthread.so.0|librt.so.1|ld-linux*) ;;
            libgcc_s.so.1) ;;
            *) fail "$binary needs $lib, which the package's Depends do not cover" ;;
        esac
    done
fi
# The newest GLIBC_ symbol version the binary refers to.
newest=$(grep -ao 'GLIBC_2\.[0-9]*' "$binary" | sort -u -V | tail -n 1 | sed 's/GLIBC_//' || true)
glibc=${newest:-$glibc}

stage=$(mktemp -d "${TMPDIR:-/tmp}/tollgate-deb.XXXXXX")
trap 'rm -rf "$stage"' EXIT
pkg=$stage/tollgate_${version}_${arch}
mkdir -p "$pkg/DEBIAN"

install -D -m 0755 "$binary" "$pkg/usr/bin/tollgate"
if command -v strip >/dev/null; then
    strip --strip-debug "$pkg/usr/bin/tollgate"
fi
install -D -m 0644 "$root/deploy/tollgate.example.toml" "$pkg/etc/tollgate/tollgate.toml"
# The shipped config must load with the shipped binary (same source tree).
if ! problem=$(env -i PATH="$PATH" "$pkg/usr/bin/tollgate" check-config "$pkg/etc/tollgate/tollgate.toml" 2>&1 >/dev/null); then
    fail "deploy/tollgate.example.toml does not load with $binary ($problem); build the binary from this tree"
fi

for unit in tollgate-proxy.service tollgate-monitor.service; do
    src=$root/deploy/systemd/$unit
    grep -q '^DynamicUser=yes$' "$src" || fail "$src: expected DynamicUser=yes to replace"
    grep -q '/usr/local/bin/tollgate' "$src" || fail "$src: expected /usr/local/bin/tollgate to replace"
    {
        echo "# Installed by the tollgate Debian package from deploy/systemd/$unit, with"
        echo "# /usr/bin/tollgate and the package's \`tollgate\` system user; enable it with"
        echo "# \`systemctl enable --now ${unit%.service}\` once /etc/tollgate is filled in."
        echo "# See /usr/share/doc/tollgate/operations.md."
        # Drop the source's header comment (manual install steps), keep the rest.
        sed -n '/^\[Unit\]/,$p' "$src" \
            | sed -e 's|/usr/local/bin/tollgate|/usr/bin/tollgate|g' \
                  -e 's|^DynamicUser=yes$|User=tollgate\nGroup=tollgate|'
    } > "$stage/$unit"
    install -D -m 0644 "$stage/$unit" "$pkg/lib/systemd/system/$unit"
done

doc=$pkg/usr/share/doc/tollgate
install -D -m 0644 "$root/README.md" "$doc/README.md"
install -D -m 0644 "$root/docs/operations.md" "$doc/operations.md"
cat > "$doc/copyright" <<'EOF'
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: tollgate

Files: *
License: Apache-2.0
 On Debian systems the full text of the Apache License 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
EOF
chmod 0644 "$doc/copyright"

installed_size=$(du -sk --exclude=DEBIAN "$pkg" | cut -f1)
cat > "$pkg/DEBIAN/control" <<EOF
Package: tollgate
Version: $version
Architecture: $arch
Maintainer: Tollgate operators <root@localhost>
Installed-Size: $installed_size
Depends: libc6 (>= $glibc), libgcc-s1, adduser
Section: net
Priority: optional
Description: metering proxy and usage enforcer for one-agent-per-VPS fleets
 Tollgate meters every byte an AI agent's VPS sends and receives through an
 HTTP forward proxy and a gateway reverse proxy, flushes the counts to
 PostgreSQL exactly once, samples CPU and memory, and blocks users whose plan
 limits and overage budget are exhausted.
 .
 This package installs the tollgate binary, an example configuration in
 /etc/tollgate and systemd units for the proxy and the monitor (not enabled).
EOF
echo /etc/tollgate/tollgate.toml > "$pkg/DEBIAN/conffiles"

cat > "$pkg/DEBIAN/postinst" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
    if ! getent passwd tollgate >/dev/null; then
        adduser --quiet --system --group --no-create-home --home /var/lib/tollgate \
            --shell /usr/sbin/nologin --gecos "Tollgate metering proxy" tollgate
    fi
    # The spill directory (proxy.meter.spill_dir); the proxy unit's StateDirectory.
    install -d -o tollgate -g tollgate -m 0750 /var/lib/tollgate
    # The config may hold the database password: readable by the service only.
    if ! dpkg-statoverride --list /etc/tollgate/tollgate.toml >/dev/null 2>&1; then
        chown root:tollgate /etc/tollgate /etc/tollgate/tollgate.toml
        chmod 0750 /etc/tollgate
        chmod 0640 /etc/tollgate/tollgate.toml
    fi
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload >/dev/null || true
        # An upgrade restarts the services that run (the proxy drains first).
        if [ -n "$2" ]; then
            systemctl try-restart tollgate-proxy.service tollgate-monitor.service >/dev/null || true
        fi
    fi
fi
exit 0
EOF

cat > "$pkg/DEBIAN/prerm" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
    # SIGTERM: the proxy drains and spills what PostgreSQL did not take.
    systemctl stop tollgate-proxy.service tollgate-monitor.service >/dev/null 2>&1 || true
fi
exit 0
EOF

cat > "$pkg/DEBIAN/postrm" <<'EOF'
#!/bin/sh
set -e
case "$1" in
    remove)
        if [ -d /run/systemd/system ]; then
            systemctl daemon-reload >/dev/null || true
        fi
        ;;
    purge)
        # Spill files (also where a dynamic user's StateDirectory would have put
        # them) and what the operator added to /etc/tollgate (env).
        rm -rf /var/lib/tollgate /var/lib/private/tollgate /etc/tollgate
        if getent passwd tollgate >/dev/null; then
            if command -v deluser >/dev/null; then
                deluser --quiet --system tollgate >/dev/null 2>&1 || true
            fi
            if getent passwd tollgate >/dev/null; then
                userdel tollgate
            fi
        fi
        if getent group tollgate >/dev/null; then
            if command -v delgroup >/dev/null; then
                delgroup --quiet --system tollgate >/dev/null 2>&1 || true
            fi
            if getent group tollgate >/dev/null; then
                groupdel tollgate
            fi
        fi
        ;;
esac
exit 0
EOF
chmod 0755 "$pkg/DEBIAN/postinst" "$pkg/DEBIAN/prerm" "$pkg/DEBIAN/postrm"

mkdir -p "$out"
deb=$(cd "$out" && pwd)/tollgate_${version}_${arch}.deb
dpkg-deb --root-owner-group -Zxz --build "$pkg" "$deb" >&2 \
    || fail "dpkg-deb --build failed for $pkg"
echo "$deb"
