#!/usr/bin/env bash
# Trains GPT-2 (models/gpt2.ron) at two small layers on kiln.txt, a short text written for
# this example, byte by byte (a vocabulary of 256), with `kiln train` on this CPU. Writes the
# data, metrics.csv, metrics.png and checkpoint.safetensors into OUT (default
# target/tiny_gpt). Extra arguments go to `kiln train` (`--epochs 40`, `--resume …`).
#
# Usage: examples/tiny_gpt/train.sh [OUT] [kiln train options…]
#        KILN=path/to/kiln to use a built binary instead of `cargo run --release`.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="${1:-$root/target/tiny_gpt}"
shift || true
mkdir -p "$out"
python3 "$here/windows.py" "$here/kiln.txt" "$out/text.safetensors" 32 4
read -r -a kiln <<<"${KILN:-cargo run --release --quiet --}"
cd "$root"
"${kiln[@]}" train models/gpt2.ron \
    --set vocab=256 --set ctx=32 --set d=64 --set heads=4 --set layers=2 --set seq=32 --set batch=16 \
    --data "$out/text.safetensors" --holdout 0.1 --lr 3e-3 --epochs 20 --out "$out" "$@"
