#!/usr/bin/env bash
# Builds the local Docker image of the simulated vLLM server (`gpu-feeder sim`)
# that the Docker runtime tests launch. No registry is needed: the image holds
# a single static gpu-feeder binary, imported from a tarball.
#
#   scripts/sim-image.sh [--binary PATH] [IMAGE]
#
# IMAGE defaults to $IMAGE, else gpu-feeder-sim:test. Without --binary, a
# static gpu-feeder is built under target/static first. Running it again is
# cheap: the image is left alone when it already holds the same binary.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  sed -n '2,10s/^# \{0,1\}//p' "$0"
}

say() { echo "sim-image: $*"; }
fail() {
  echo "sim-image: $*" >&2
  exit 1
}

image="${IMAGE:-gpu-feeder-sim:test}"
binary=""
while [ $# -gt 0 ]; do
  case "$1" in
    --binary)
      [ $# -ge 2 ] || fail "--binary needs a path"
      binary="$2"
      shift 2
      ;;
    --binary=*)
      binary="${1#--binary=}"
      shift
      ;;
    -h | --help)
      usage
      exit 0
      ;;
    -*)
      usage >&2
      fail "unknown option $1"
      ;;
    *)
      image="$1"
      shift
      ;;
  esac
done

# The engine first: nothing else is worth doing without it.
if ! info_err="$(docker info 2>&1 >/dev/null)"; then
  echo "$info_err" | tail -n 3 >&2
  fail "the Docker engine does not answer (docker info failed): start it (systemctl start docker, or dockerd &), or check \$DOCKER_HOST and that this user may use the socket"
fi

if [ -z "$binary" ]; then
  say "building a static gpu-feeder in target/static (cargo build --release --target x86_64-unknown-linux-gnu, crt-static)"
  RUSTFLAGS='-C target-feature=+crt-static' CARGO_TARGET_DIR=target/static \
    cargo build --release --target x86_64-unknown-linux-gnu
  binary=target/static/x86_64-unknown-linux-gnu/release/gpu-feeder
fi

[ -f "$binary" ] || fail "no binary at $binary"
[ -x "$binary" ] || fail "$binary is not executable"

# The image has no libc or loader, so the binary must need neither.
ldd_out="$(ldd "$binary" 2>&1 || true)"
if echo "$ldd_out" | grep -Eq 'not a dynamic executable|statically linked'; then
  say "$binary is static ($(echo "$ldd_out" | head -n 1 | sed 's/^[[:space:]]*//'))"
elif command -v file >/dev/null 2>&1 && file -L "$binary" | grep -Eq 'statically linked|static-pie linked'; then
  say "$binary is static (file: $(file -L -b "$binary" | cut -d, -f1-3))"
else
  echo "$ldd_out" | head -n 5 >&2
  fail "$binary is dynamically linked, so it cannot run in an image without a libc: build it with RUSTFLAGS='-C target-feature=+crt-static' and --target x86_64-unknown-linux-gnu, or run this script without --binary"
fi
"$binary" --version >/dev/null 2>&1 || fail "$binary does not run here ($binary --version failed)"

sha="$(sha256sum "$binary" | cut -d' ' -f1)"
label=io.gpu-feeder.sim-binary-sha256
old_id="$(docker image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)"
if [ -n "$old_id" ]; then
  current="$(docker image inspect --format "{{ index .Config.Labels \"$label\" }}" "$image" 2>/dev/null || true)"
  if [ "$current" = "$sha" ]; then
    say "$image already holds this binary (sha256 ${sha:0:12}); nothing to do"
    exit 0
  fi
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
say "making a root file system with /gpu-feeder and /tmp in $work"
mkdir -p "$work/rootfs/tmp"
chmod 1777 "$work/rootfs/tmp"
# Without its debug information the binary is a fraction of the size, and
# every container gets a copy of it on storage drivers like vfs.
if command -v strip >/dev/null 2>&1 && strip --strip-debug -o "$work/rootfs/gpu-feeder" "$binary"; then
  chmod 0755 "$work/rootfs/gpu-feeder"
else
  install -m 0755 "$binary" "$work/rootfs/gpu-feeder"
fi
tar -C "$work/rootfs" --numeric-owner --owner=0 --group=0 -cf "$work/rootfs.tar" .

say "importing it as $image"
docker import \
  --change 'ENTRYPOINT ["/gpu-feeder","sim","--host","0.0.0.0"]' \
  --change "LABEL $label=$sha" \
  "$work/rootfs.tar" "$image" >/dev/null

# The image it replaces, untagged now, goes too (unless a container uses it).
if [ -n "$old_id" ] && [ "$old_id" != "$(docker image inspect --format '{{.Id}}' "$image")" ]; then
  docker image rm "$old_id" >/dev/null 2>&1 || true
fi
say "built $image (binary sha256 ${sha:0:12}); try: docker run --rm --network host $image --port 8000"
