#!/usr/bin/env bash
# Here, with the package index: fetch into bench/.wheels (git-ignored) the x86-64 CPython 3.12 wheels that a bare GPU
# machine lacks for bench/gpu_suite.sh, at the versions of constraints.txt, and list them with their total size
# (the device tool carries at most 64 MiB of working tree: the set must stay under 60 MB).
# The GPU machine already has torch, transformers (+ tokenizers, huggingface_hub), numpy, pillow, pyyaml, safetensors
# tqdm, pyarrow, pandas, fsspec and xxhash; diffusers, bitsandbytes and datasets (our imagefolder reader, with dill and
# multiprocess) it lacks, and peft and accelerate come at the lock's versions.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=bench/.wheels
PACKAGES=(diffusers bitsandbytes peft accelerate datasets dill multiprocess)
LIMIT=$((60 * 1000 * 1000))
rm -rf "$OUT" && mkdir -p "$OUT"
for name in "${PACKAGES[@]}"; do
  pin=$(grep -i "^${name}==" constraints.txt || true)
  [ -n "$pin" ] || { echo "gpu_wheels: $name is not in constraints.txt" >&2; exit 1; }
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$OUT" "$pin" 2>&1 | grep -v "is ignored: it is neither" || true
done
total=0
for f in "$OUT"/*.whl; do
  size=$(stat -c %s "$f"); total=$((total + size))
  printf '%10d  %s\n' "$size" "$(basename "$f")"
done
printf '%10d  total (%d.%d MB)\n' "$total" $((total / 1000000)) $((total % 1000000 / 100000))
[ "$total" -lt "$LIMIT" ] || { echo "gpu_wheels: over 60 MB" >&2; exit 1; }
