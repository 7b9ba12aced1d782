#!/usr/bin/env bash
# Checks `gpu-feeder gpu --json` against nvidia-smi on a machine with an
# NVIDIA GPU: temperature, memory and utilization of every GPU must agree
# (within a small tolerance: the two read a moment apart).
#
#   scripts/gpu-check.sh [PATH-TO-gpu-feeder]
#
# Without a path, the release binary is built first. Exits 0 when every GPU
# agrees, 1 otherwise, printing both readings side by side.
set -euo pipefail
cd "$(dirname "$0")/.."

bin="${1:-}"
if [ -z "$bin" ]; then
  echo "gpu-check: building the release binary"
  cargo build --release --quiet
  bin=target/release/gpu-feeder
fi
command -v nvidia-smi >/dev/null 2>&1 || { echo "gpu-check: nvidia-smi not found: this needs a machine with the NVIDIA driver" >&2; exit 1; }
command -v python3 >/dev/null 2>&1 || { echo "gpu-check: python3 is needed to compare the readings" >&2; exit 1; }

ours="$(mktemp)"; theirs="$(mktemp)"
trap 'rm -f "$ours" "$theirs"' EXIT
"$bin" gpu --json >"$ours"
nvidia-smi --query-gpu=index,name,temperature.gpu,memory.used,memory.total,utilization.gpu,power.draw \
  --format=csv,noheader,nounits >"$theirs"

python3 - "$ours" "$theirs" <<'PY'
import json, sys
ours = {g["index"]: g for g in json.load(open(sys.argv[1]))["gpus"]}
rows = [l.split(", ") for l in open(sys.argv[2]).read().strip().splitlines()]
mib = 1024 * 1024
bad = 0
print(f"{'GPU':<4} {'what':<14} {'gpu-feeder':>12} {'nvidia-smi':>12}  verdict")
for r in rows:
    i, name, temp, used, total, util, power = int(r[0]), r[1], *r[2:]
    g = ours.get(i)
    if g is None:
        print(f"{i:<4} missing from gpu-feeder's reading"); bad += 1; continue
    checks = [
        ("temperature C", g["temperature_c"], float(temp), 3),
        ("memory used MiB", g["memory_used_bytes"] / mib, float(used), max(256, 0.02 * float(total))),
        ("memory total MiB", g["memory_total_bytes"] / mib, float(total), 2),
        ("utilization %", g["utilization_pct"], float(util), 25),
    ]
    for what, a, b, tol in checks:
        ok = abs(a - b) <= tol
        bad += not ok
        print(f"{i:<4} {what:<14} {a:>12.1f} {b:>12.1f}  {'ok' if ok else 'DIFFERS (tolerance %s)' % tol}")
    print(f"{i:<4} {'name':<14} {g['name']!r} / {name!r}; power {g.get('power_w')} W / {power} W; throttle {g['throttle_reasons']}")
print("gpu-check:", "every GPU agrees" if not bad else f"{bad} reading(s) differ")
sys.exit(1 if bad else 0)
PY
