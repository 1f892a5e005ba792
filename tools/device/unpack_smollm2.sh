#!/usr/bin/env bash
# On the device: reassembles the SmolLM2-135M-Instruct GGUF from .xfer/part*/ (made by
# pack_smollm2.sh and carried one part per call), checks each piece's and the whole file's
# sha256 recorded at pack time, and converts it (bf16) into
# $KUNSERVE_CACHE_DIR/SmolLM2-135M-Instruct (default .xfer/cache), the registry's place, where
# `--model SmolLM2-135M-Instruct` and tests/workers/test_smollm2_gpu.py find it. Where .whl is
# missing, the small wheels carried in .xfer/part1/whl become .whl (env.sh installs them).
# Idempotent: an existing conversion is kept. Exit status 3: a part is missing (carry it).
# Usage (device, repo root): bash tools/device/unpack_smollm2.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
XFER=.xfer
if [ ! -f "$XFER/part1/PARTS" ]; then
  echo "no $XFER/part1: carry .xfer/part1 (made here by tools/device/pack_smollm2.sh)"
  exit 3
fi
parts=$(cat "$XFER/part1/PARTS")
read -r sha name <"$XFER/part1/SHA256SUMS"
missing=""
for i in $(seq 1 "$parts"); do
  [ -f "$XFER/part$i/SHA256SUMS.piece" ] || missing="$missing .xfer/part$i"
done
if [ -n "$missing" ]; then
  echo "missing:$missing (carry each in a call; the machine keeps them only while warm)"
  exit 3
fi
if [ ! -d .whl ] && [ -d "$XFER/part1/whl" ]; then
  cp -r "$XFER/part1/whl" .whl
fi
source tools/device/env.sh
export KUNSERVE_CACHE_DIR=${KUNSERVE_CACHE_DIR:-$PWD/$XFER/cache}
model="$KUNSERVE_CACHE_DIR/SmolLM2-135M-Instruct"
if [ -f "$model/config.json" ]; then
  echo "already converted: $model"
  exit 0
fi
for i in $(seq 1 "$parts"); do
  (cd "$XFER/part$i" && sha256sum --quiet -c SHA256SUMS.piece)
done
mkdir -p "$XFER/gguf"
gguf="$XFER/gguf/$name"
: >"$gguf"
for i in $(seq 1 "$parts"); do
  cat "$XFER/part$i/$name".* >>"$gguf"
done
echo "$sha  $gguf" | sha256sum --quiet -c -
echo "reassembled $gguf ($(stat -c %s "$gguf") bytes), sha256 $sha"
python3 - "$gguf" "$model" <<'PY'
import sys
import time
from pathlib import Path

from workers.checkpoint.gguf_convert import convert_gguf

start = time.monotonic()
out = convert_gguf(Path(sys.argv[1]), Path(sys.argv[2]))
files = ", ".join(f"{p.name} {p.stat().st_size / 1e6:.1f} MB" for p in sorted(out.iterdir()))
print(f"converted in {time.monotonic() - start:.1f} s into {out}: {files}")
PY
