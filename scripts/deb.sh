#!/usr/bin/env bash
# Builds the Debian package gpu-feeder_VERSION_ARCH.deb with dpkg-deb.
#
#   scripts/deb.sh [--binary PATH] [--out DIR]
#
#   --binary PATH  the gpu-feeder binary to package (stripped on the way in);
#                  default: target/release/gpu-feeder, built with
#                  `cargo build --release --locked` first
#   --out DIR      where the .deb goes (default: target/debian)
#
# The package holds /usr/bin/gpu-feeder, the systemd unit
# (packaging/systemd/, started from /usr/bin), /etc/gpu-feeder/feeder.toml as
# a conffile (the repository's feeder.toml, whose state lives under
# /var/lib/gpu-feeder), a man page, and the maintainer scripts of
# packaging/debian/: postinst creates the gpu-feeder user, group and state
# directory. The version is the top entry of packaging/debian/changelog,
# whose upstream part must match Cargo.toml's. The last line printed is the
# package's path.
#
# Needs dpkg-deb, dpkg-shlibdeps (Debian dpkg-dev) and strip (binutils).
set -euo pipefail
here=$PWD
cd "$(dirname "$0")/.."

say() { echo "deb.sh: $*" >&2; }
die() { say "$*"; exit 1; }

binary=""
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary="${2:?--binary needs a path}"; shift 2 ;;
    --out) out="${2:?--out needs a folder}"; shift 2 ;;
    -h|--help) sed -n '2,20s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done

# Paths given relative to where the script was called from.
case "$binary" in ""|/*) ;; *) binary="$here/$binary" ;; esac
case "$out" in "") out=target/debian ;; /*) ;; *) out="$here/$out" ;; esac

for tool in dpkg-deb dpkg-shlibdeps dpkg-parsechangelog strip; do
  command -v "$tool" >/dev/null 2>&1 \
    || die "$tool is missing: install Debian's dpkg-dev and binutils (apt-get install dpkg-dev binutils)"
done

pkg=packaging/debian
version=$(dpkg-parsechangelog -l "$pkg/changelog" -S Version)
crate_version=$(sed -n '/^\[package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml | head -n 1)
[ "${version%-*}" = "$crate_version" ] \
  || die "packaging/debian/changelog's top entry is $version but Cargo.toml says $crate_version: add a changelog entry for $crate_version-1"
arch=$(dpkg --print-architecture)

if [ -z "$binary" ]; then
  say "building the release binary (cargo build --release --locked)"
  cargo build --release --locked --bin gpu-feeder >&2
  binary=target/release/gpu-feeder
fi
[ -x "$binary" ] || die "$binary is not an executable"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# dpkg-shlibdeps expects a source tree: debian/control, and the files under
# debian/PACKAGE/.
mkdir -p "$work/debian"
printf 'Source: gpu-feeder\n\nPackage: gpu-feeder\nArchitecture: any\n' > "$work/debian/control"
root="$work/debian/gpu-feeder"
doc="$root/usr/share/doc/gpu-feeder"

install -D -m 0755 "$binary" "$root/usr/bin/gpu-feeder"
strip --strip-unneeded --remove-section=.comment --remove-section=.note "$root/usr/bin/gpu-feeder"

# The unit as the repository has it, started from /usr/bin, without the
# header that tells how to install it by hand.
mkdir -p "$root/lib/systemd/system"
{
  echo "# gpu-feeder under systemd, installed by the gpu-feeder package."
  echo "# Settings: /etc/gpu-feeder/feeder.toml; state: /var/lib/gpu-feeder."
  sed -e '1,/^$/d' -e 's#/usr/local/bin/gpu-feeder#/usr/bin/gpu-feeder#g' \
    packaging/systemd/gpu-feeder.service
} > "$root/lib/systemd/system/gpu-feeder.service"
chmod 0644 "$root/lib/systemd/system/gpu-feeder.service"
grep -q '^ExecStart=/usr/bin/gpu-feeder ' "$root/lib/systemd/system/gpu-feeder.service" \
  || die "packaging/systemd/gpu-feeder.service no longer starts /usr/local/bin/gpu-feeder: update deb.sh"

install -D -m 0644 feeder.toml "$root/etc/gpu-feeder/feeder.toml"
grep -q '^db_path = "/var/lib/gpu-feeder/' "$root/etc/gpu-feeder/feeder.toml" \
  || die "feeder.toml's queue.db_path is not under /var/lib/gpu-feeder, the package's state directory"

install -D -m 0644 "$pkg/copyright" "$doc/copyright"
gzip -9n < "$pkg/changelog" > "$doc/changelog.Debian.gz"
mkdir -p "$root/usr/share/man/man1"
gzip -9n < "$pkg/gpu-feeder.1" > "$root/usr/share/man/man1/gpu-feeder.1.gz"
chmod 0644 "$doc/changelog.Debian.gz" "$root/usr/share/man/man1/gpu-feeder.1.gz"
if [ -f "$pkg/lintian-overrides" ]; then
  install -D -m 0644 "$pkg/lintian-overrides" "$root/usr/share/lintian/overrides/gpu-feeder"
fi

depends=$(cd "$work" && dpkg-shlibdeps -O -e debian/gpu-feeder/usr/bin/gpu-feeder 2>/dev/null \
  | sed -n 's/^shlibs:Depends=//p')
[ -n "$depends" ] || die "dpkg-shlibdeps found no dependencies for $binary"
size=$(du -sk --apparent-size "$root" | cut -f1)

mkdir -p "$root/DEBIAN"
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@INSTALLED_SIZE@/$size/" \
  -e "s/@DEPENDS@/$depends/" "$pkg/control" > "$root/DEBIAN/control"
install -m 0644 "$pkg/conffiles" "$root/DEBIAN/conffiles"
for script in postinst prerm postrm; do
  install -m 0755 "$pkg/$script" "$root/DEBIAN/$script"
done
(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z \
  | xargs -0 md5sum) > "$root/DEBIAN/md5sums"
chmod 0644 "$root/DEBIAN/md5sums"

# Files are stamped with the changelog entry's date, not the build's.
SOURCE_DATE_EPOCH=$(dpkg-parsechangelog -l "$pkg/changelog" -S Timestamp)
export SOURCE_DATE_EPOCH
mkdir -p "$out"
deb="$out/gpu-feeder_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >&2
echo "$deb"
